"""Streaming webdataset input: shards read in order, never a whole dataset in memory.

A source is a list of shards: local paths, brace patterns (``shard-{000000..000099}.tar``), globs, ``pipe:``
commands and URLs (the schemes ``webdataset.gopen`` knows, else ``fsspec``). :class:`ShardStream` reads a weighted
mixture of sources for one rank:

- split by node and by worker: shard ``i`` of a source goes to reader ``i % (world * workers)`` (reader =
  ``rank * workers + worker``); a source with fewer shards than readers is read whole by every reader, which keeps
  every ``n``-th sample (``n`` = readers) so no sample is seen twice in an epoch;
- a shuffle buffer of ``shuffle_buffer`` samples (reservoir-style, seeded);
- each source cycles through its shards forever (a new seeded shard order each pass), so every rank yields exactly
  ``samples_per_rank`` samples per epoch: every rank runs the same number of steps, whatever the shard sizes;
- everything is a pure function of ``(seed, rank, worker, workers)``: ``start`` skips the first ``start`` samples
  of this reader by reading (not decoding) them again, which is what a resume replays.

Samples come out as webdataset dicts (``__key__``, ``__url__``, one bytes entry per member extension); ``decode``
turns one into what the dataset yields.
"""

from __future__ import annotations

import glob
import io
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from ..errors import InvalidInputError


def expand_shards(spec: str | list[str], base_dir: str | Path | None = None) -> list[str]:
    """Shard URLs of ``spec`` (a string or a list): braces expanded, local globs resolved, files checked."""
    from braceexpand import braceexpand

    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for s in specs:
        for u in braceexpand(str(s)):
            if u.startswith("pipe:") or "://" in u:
                out.append(u)
                continue
            p = Path(u).expanduser()
            if not p.is_absolute() and base_dir is not None:
                p = Path(base_dir) / p
            if any(c in str(p) for c in "*?["):
                hits = sorted(glob.glob(str(p)))
                if not hits:
                    raise InvalidInputError(p, "no shard matches this pattern")
                out.extend(hits)
            elif not p.is_file():
                raise InvalidInputError(p, "shard not found")
            else:
                out.append(str(p))
    if not out:
        raise InvalidInputError(str(spec), "no shards")
    return out


def open_shard(url: str):
    """A binary stream of one shard: ``pipe:`` and webdataset's schemes through ``webdataset.gopen``, other URLs
    through ``fsspec``, local paths as files."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url)
    if "://" in url:
        scheme = url.split("://", 1)[0]
        from webdataset.gopen import gopen, gopen_schemes

        if scheme in gopen_schemes and scheme not in ("file",):
            return gopen(url)
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb", buffering=1 << 20)


def shard_samples(url: str) -> Iterator[dict]:
    """The samples of one shard in order (members grouped by key), each with ``__url__``."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    stream = open_shard(url)
    try:
        yield from group_by_keys(tar_file_expander(iter([{"url": url, "stream": stream}])))
    except Exception as e:  # a truncated or corrupt shard names itself
        raise InvalidInputError(url, f"shard cannot be read ({e})") from e
    finally:
        stream.close()


class _SourceReader:
    """One source's endless sample stream for one reader (its shards, or every n-th sample of all of them)."""

    def __init__(self, urls: list[str], index: int, reader: int, readers: int, seed: int):
        self.urls, self.index, self.reader, self.readers, self.seed = urls, index, reader, readers, seed

    def __iter__(self) -> Iterator[dict]:
        if len(self.urls) >= self.readers:
            mine, stride = [u for i, u in enumerate(self.urls) if i % self.readers == self.reader], 1
        else:  # fewer shards than readers: every reader reads all of them and keeps every n-th sample
            mine, stride = list(self.urls), self.readers
        epoch = 0
        while True:
            order = list(mine)
            # (in stride mode every reader must see the same order, or the n-th samples would overlap)
            who = self.reader if stride == 1 else "all"
            random.Random(f"{self.seed}-{self.index}-{who}-{epoch}").shuffle(order)
            n = 0
            for url in order:
                for sample in shard_samples(url):
                    if stride == 1 or n % stride == self.reader:
                        yield sample
                    n += 1
            epoch += 1


class ShardStream(IterableDataset):
    """A weighted mixture of shard sources for one rank, ``samples_per_rank`` samples per epoch.

    Args:
        sources: ``[(shard URLs, weight), ...]`` (see :func:`expand_shards`).
        samples_per_rank: samples one rank yields per epoch (split over its DataLoader workers).
        rank, world_size: this process and the number of ranks.
        seed: the seed of shard orders, the mixture draws and the shuffle buffer.
        shuffle_buffer: samples held for shuffling (0 = stream order).
        decode: sample dict -> what the dataset yields (default: the dict itself).
        start: samples of this rank already consumed (a resume): skipped by reading them again, not decoded.
        epochs: epochs to yield (None = endless).
    """

    def __init__(self, sources: list[tuple[list[str], float]], samples_per_rank: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000,
                 decode: Callable[[dict], Any] | None = None, start: int = 0, epochs: int | None = 1):
        if not sources:
            raise ValueError("ShardStream needs at least one source")
        self.sources = [(list(u), float(w)) for u, w in sources]
        self.samples_per_rank, self.rank, self.world_size = samples_per_rank, rank, world_size
        self.seed, self.shuffle_buffer, self.decode = seed, shuffle_buffer, decode
        self.start, self.epochs = start, epochs

    def __len__(self) -> int:
        return self.samples_per_rank

    def _raw(self, worker: int, workers: int) -> Iterator[dict]:
        """This reader's endless raw stream: the mixture, then the shuffle buffer."""
        reader = self.rank * workers + worker
        readers = self.world_size * workers
        its = [iter(_SourceReader(u, i, reader, readers, self.seed)) for i, (u, _) in enumerate(self.sources)]
        weights = [w for _, w in self.sources]
        rng = random.Random(f"{self.seed}-mix-{reader}")

        def mixed() -> Iterator[dict]:
            while True:
                yield next(its[rng.choices(range(len(its)), weights)[0]] if len(its) > 1 else its[0])

        if self.shuffle_buffer <= 1:
            yield from mixed()
            return
        buf: list[dict] = []
        srng = random.Random(f"{self.seed}-shuffle-{reader}")
        for s in mixed():
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            j = srng.randrange(len(buf))
            buf[j], s = s, buf[j]
            yield s

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        return self.iter_reader(*((info.id, info.num_workers) if info else (0, 1)))

    def iter_reader(self, worker: int, workers: int) -> Iterator[Any]:
        """What DataLoader worker ``worker`` of ``workers`` yields."""
        # this worker's share of the rank's epoch (the first ones take the remainder)
        per = self.samples_per_rank // workers + (1 if worker < self.samples_per_rank % workers else 0)
        start = self.start // workers + (1 if worker < self.start % workers else 0)
        raw = self._raw(worker, workers)
        for _ in range(start):
            next(raw)
        epoch, k = start // max(per, 1), start % max(per, 1)
        while self.epochs is None or epoch < self.epochs:
            for _ in range(k, per):
                s = next(raw)
                yield self.decode(s) if self.decode else s
            epoch, k = epoch + 1, 0


def count_samples(urls: Iterable[str]) -> int:
    """Samples in the shards (reads every member header; for epoch sizes of small sources and tests)."""
    return sum(1 for u in urls for _ in shard_samples(u))


def npz_array(data: bytes):
    """The array of an ``.npz`` member (``arr``) or an ``.npy`` member."""
    import numpy as np

    loaded = np.load(io.BytesIO(data))
    return loaded["arr"] if hasattr(loaded, "files") else loaded
