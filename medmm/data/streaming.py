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

Training (``data.datasets[].format: wds``) reads them through :class:`StreamBatches`: each sample's record (its
``json``/``conversations.json`` member: ``conversations``, ``modality``, ``split``) becomes training records whose
input member is decoded only when the record is loaded; DataLoader workers build whole micro-batches, and the
batches are a pure function of the micro-step, so ``--resume`` continues the stream where it was.
"""

from __future__ import annotations

import glob
import io
import json
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


def _tar_number(field: bytes) -> int:
    """A tar header's numeric field: octal text, or GNU base-256 (high bit set) for large values."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.rstrip(b"\0 ").lstrip(b" ")
    return int(text, 8) if text else 0


def _tar_members(stream, url: str) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of the regular files of a tar stream, in order.

    A plain reader of the ustar/GNU/pax layout (512-byte headers, data padded to 512; pax ``path`` and GNU long
    names honoured): several times faster than ``tarfile``'s stream mode on the small members shards are made of.
    """
    long_name: str | None = None
    pax_name: str | None = None
    read = stream.read
    while True:
        hdr = read(512)
        if not hdr or hdr == b"\0" * 512:
            return
        if len(hdr) < 512:
            raise InvalidInputError(url, "shard cannot be read (truncated tar header)")
        try:
            size = _tar_number(hdr[124:136])
            chk = _tar_number(hdr[148:156])
        except ValueError as e:
            raise InvalidInputError(url, f"shard cannot be read (bad tar header: {e})") from e
        if chk != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise InvalidInputError(url, "shard cannot be read (tar header checksum mismatch)")
        data = read(size)
        if len(data) < size:
            raise InvalidInputError(url, "shard cannot be read (a member is truncated)")
        if size % 512:
            read(512 - size % 512)
        t = hdr[156:157]
        if t == b"L":  # GNU long name: the next member's name
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if t in (b"x", b"g"):  # pax extended header: "<len> key=value\n" records
            pos = 0
            while pos < len(data):
                sp = data.find(b" ", pos)
                if sp < 0:
                    break
                n = int(data[pos:sp])
                key, _, value = data[sp + 1:pos + n - 1].partition(b"=")
                if key == b"path" and t == b"x":
                    pax_name = value.decode("utf-8", "surrogateescape")
                pos += n
            continue
        if t not in (b"0", b"\0", b"7"):  # directories, links, devices: not sample members
            long_name = pax_name = None
            continue
        name = pax_name or long_name
        if name is None:
            name = hdr[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if hdr[257:262] == b"ustar":
                prefix = hdr[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        long_name = pax_name = None
        yield name, data


def shard_samples(url: str) -> Iterator[dict]:
    """The samples of one shard in order (members grouped by key: ``dir/key.ext`` -> ``{"__key__": "dir/key",
    "ext": bytes}``, ``ext`` everything after the first dot of the file name), each with ``__url__``."""
    stream = open_shard(url)
    try:
        cur: dict | None = None
        for name, data in _tar_members(stream, url):
            slash = name.rfind("/")
            dot = name.find(".", slash + 1)
            if dot < 0:
                continue
            key, ext = name[:dot], name[dot + 1:]
            if cur is None or cur["__key__"] != key:
                if cur is not None:
                    yield cur
                cur = {"__key__": key, "__url__": url}
            if ext in cur:
                raise InvalidInputError(url, f"shard cannot be read (member {name} appears twice)")
            cur[ext] = data
        if cur is not None:
            yield cur
    except InvalidInputError:
        raise
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
            n, given, first = 0, 0, []
            for url in order:
                for sample in shard_samples(url):
                    if stride == 1 or n % stride == self.reader:
                        yield sample
                        given += 1
                    elif len(first) < stride:
                        first.append(sample)
                    n += 1
            if n == 0:
                raise InvalidInputError(self.urls[0], f"the source's {len(self.urls)} shard(s) hold no sample")
            if not given:  # fewer samples than readers: this reader repeats one (unavoidable), it never starves
                yield first[self.reader % n]
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


# ----------------------------------------------------------------------------- shard samples -> training records

ARRAY_MEMBERS = ("npz", "npy", "features.npy", "jpg", "jpeg", "png")
"""Members that hold a sample's modality input, in the order they are looked for."""


class Member:
    """A modality input still in its shard bytes; decoded only when the sample is loaded (:func:`decode_member`)."""

    __slots__ = ("ext", "data", "source")

    def __init__(self, ext: str, data: bytes, source: str):
        self.ext, self.data, self.source = ext, data, source

    def __repr__(self) -> str:
        return f"Member({self.source}.{self.ext}, {len(self.data)} bytes)"


def decode_member(m: Member):
    """The array of a member: ``npz``/``npy`` as stored; ``jpg``/``png`` as float32 (H, W, 3) in [0, 1]."""
    import numpy as np

    try:
        if m.ext.endswith(("npz", "npy")):
            return npz_array(m.data)
        from PIL import Image

        with Image.open(io.BytesIO(m.data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except Exception as e:
        raise InvalidInputError(f"{m.source}.{m.ext}", f"shard member cannot be decoded ({e})") from e


def sample_record_doc(sample: dict) -> dict:
    """The JSON record a shard sample carries: its ``conversations.json`` member, else its ``json`` member."""
    raw = sample.get("conversations.json", sample.get("json"))
    src = f"{sample.get('__url__')}#{sample.get('__key__')}"
    if raw is None:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise InvalidInputError(src, f"the sample's JSON cannot be read ({e})") from e
    if not isinstance(doc, dict):
        raise InvalidInputError(src, "the sample's JSON must be an object")
    return doc


def sample_records(sample: dict, split: str | None = "train") -> list[dict]:
    """A shard sample -> its conversation records (cheap: no array is decoded).

    The sample's JSON (:func:`sample_record_doc`) holds ``conversations`` (one conversation, a list of turns, or
    several, a list of lists), optionally ``modality`` (the model modality its array member feeds; default
    ``image``), ``split`` and ``id``. A sample whose split is not ``split`` (when both are set), or without
    conversations (an unlabelled tile), gives no record. Each record's modality value is a :class:`Member`.
    """
    doc = sample_record_doc(sample)
    if split is not None and doc.get("split") not in (None, split):
        return []
    convs = doc.get("conversations") or []
    if convs and isinstance(convs[0], dict):
        convs = [convs]
    key, url = sample.get("__key__"), sample.get("__url__")
    member = next((e for e in ARRAY_MEMBERS if e in sample), None)
    mods = {}
    if member is not None:
        mods = {str(doc.get("modality") or "image"): Member(member, sample[member], f"{url}#{key}")}
    out = []
    for i, conv in enumerate(convs):
        out.append({"id": f"{doc.get('id') or key}-{i}" if len(convs) > 1 else str(doc.get("id") or key),
                    "modalities": mods, "conversations": conv, "source": f"{url}#{key}"})
    return out


def decoded(record: dict) -> dict:
    """``record`` with every :class:`Member` of its modalities decoded into an array."""
    mods = record.get("modalities") or {}
    out = {}
    for k, v in mods.items():
        if isinstance(v, list):
            out[k] = [decode_member(x) if isinstance(x, Member) else x for x in v]
        else:
            out[k] = decode_member(v) if isinstance(v, Member) else v
    return {**record, "modalities": out}


def text_record(sample: dict, split: str | None = "train", text_field: str = "text") -> list[dict]:
    """A text-corpus shard sample -> ``[{"text", "source"}]`` from its ``txt`` member or its JSON's ``text_field``;
    a sample with conversations instead gives its conversation records (captioning documents in stage pretrain)."""
    src = f"{sample.get('__url__')}#{sample.get('__key__')}"
    if "txt" in sample:
        return [{"text": sample["txt"].decode("utf-8", "replace"), "source": src}]
    doc = sample_record_doc(sample)
    if isinstance(doc.get(text_field), str):
        return [{"text": doc[text_field], "source": src}]
    return sample_records(sample, split)


class StreamBatches(IterableDataset):
    """One rank's micro-batches streamed from shards, from micro-step ``start`` on, endlessly.

    The pipeline of a reader: :class:`ShardStream`'s mixture (node/worker split, shuffle buffer) -> ``to_records``
    (cheap: JSON only) -> ``load`` (arrays decoded, tokens; raises :class:`InvalidInputError`) -> optionally ``pack``
    (samples -> packed blocks, stage pretrain) -> ``collate`` of ``micro_batch_size``.

    Order and resume: a DataLoader over an iterable dataset takes batches from its workers in turn, so micro-step
    ``s`` is built by reader ``s % W`` (``W`` = workers, 1 without). A loader made at ``start`` gives its worker
    ``w`` the reader ``(start + w) % W``, which first skips the batches it built before ``start``: without
    ``pack`` by counting records (their JSON is read, their arrays are not decoded), with ``pack`` by planning and
    dropping the blocks (documents are tokenised again; ``pack`` yields callables that build a block, so a skipped
    block's modality inputs are not read). So a resumed run sees exactly
    the batches of the uninterrupted run; the one exception: a batch in which every record failed to load takes
    the next records, which shifts that reader's later batches in a run resumed after it.

    A record that fails to load is left out of its batch, and its error record travels with the batch
    (``load_errors``), so every rank still runs every step.
    """

    def __init__(self, sources: list[tuple[list[str], float]], micro_batch_size: int, to_records: Callable,
                 load: Callable, collate: Callable, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 1000, start: int = 0, pack: Callable | None = None):
        self.stream = ShardStream(sources, 0, rank, world_size, seed, shuffle_buffer)
        self.mbs, self.to_records, self.load, self.collate, self.pack = micro_batch_size, to_records, load, collate, pack
        self.start = start

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        return self.iter_worker(*((info.id, info.num_workers) if info else (0, 1)))

    def _records(self, reader: int, readers: int) -> Iterator[dict]:
        for s in self.stream._raw(reader, readers):
            yield from self.to_records(s)

    def _loaded(self, records: Iterator[dict]) -> Iterator[dict]:
        for rec in records:
            try:
                yield self.load(rec)
            except InvalidInputError as e:
                yield {"load_errors": [e.to_record()]}

    def iter_worker(self, worker: int, workers: int) -> Iterator[dict]:
        """The batches DataLoader worker ``worker`` of ``workers`` yields (micro-steps ``start + worker``,
        ``start + worker + workers``, ...)."""
        from itertools import islice

        reader = (self.start + worker) % workers
        skip = max(0, (self.start - reader + workers - 1) // workers)  # its batches before ``start``
        records = self._records(reader, workers)
        if self.pack is None:
            for _ in islice(records, skip * self.mbs):
                pass
            items = self._loaded(records)
        else:
            items = self.pack(self._loaded(records))
            for _ in islice(items, skip * self.mbs):
                pass
        while True:
            batch, errors = [], []
            while not batch:
                for s in islice(items, self.mbs):
                    if callable(s):  # a packed block built only now (``pack`` yields thunks; skipping builds none)
                        s = s()
                    errors.extend(s.get("load_errors") or [])
                    if "load_errors" in s and len(s) == 1:  # a record that failed to load
                        continue
                    s.pop("load_errors", None)
                    batch.append(s)
            if errors:
                batch[0]["load_errors"] = errors
            yield self.collate(batch)


def count_source(urls: list[str], split: str | None = "train") -> int:
    """Samples of a source (its records' splits considered; reads every shard once)."""
    return sum(1 for u in urls for s in shard_samples(u) if split is None
               or sample_record_doc(s).get("split") in (None, split))


def wds_sources(datasets, world_size: int, micro_batch_size: int, epoch_size: int | None = None):
    """``data.datasets`` of format wds -> ``(sources, batches_per_epoch, description)`` for :class:`StreamBatches`.

    An epoch is ``epoch_size`` samples (default: the sources' ``samples``, counted from the shards when unset),
    split evenly over the ranks: every rank runs the same number of micro-batches.
    """
    from ..errors import ConfigError

    sources, sizes = [], []
    for x in datasets:
        if x.format != "wds":
            raise ConfigError(f"data.datasets[{x.path or x.shards}].format={x.format}: streamed (wds) and in-memory "
                              "datasets cannot be mixed in one run; make every entry format wds")
        urls = expand_shards(x.shards or x.path)
        sources.append((urls, x.weight))
        sizes.append(x.samples if x.samples is not None else count_source(urls, x.split))
        if sizes[-1] == 0:
            raise ConfigError(f"data.datasets[{x.shards or x.path}]: no sample of split {x.split!r} in its shards")
    total = epoch_size or sum(sizes)
    per_rank = total // world_size
    batches = per_rank // micro_batch_size
    if batches == 0:
        raise ConfigError(f"data.datasets: an epoch of {total} samples over {world_size} ranks holds no micro-batch "
                          f"of {micro_batch_size}")
    desc = [(x.name or Path(str(urls[0])).parent.name, len(urls), n) for x, (urls, _), n in zip(datasets, sources,
                                                                                              sizes)]
    return sources, batches, f"streamed (wds) datasets=[(name, shards, samples)] {desc}"


class SourceRecords:
    """``to_records`` of :class:`StreamBatches` for conversation stages: a sample's records, with the ``split`` of
    the source its shard belongs to (``splits``: shard URL -> split) and ``fn`` (default :func:`sample_records`)."""

    def __init__(self, splits: dict[str, str | None], fn: Callable = None):
        self.splits, self.fn = splits, fn or sample_records

    def __call__(self, sample: dict) -> list[dict]:
        return self.fn(sample, self.splits.get(sample.get("__url__"), "train"))


class LoadRecord:
    """``load`` of :class:`StreamBatches`: decode a record's members, then ``fn(record, None, source)`` (e.g.
    :meth:`medmm.data.dataset.Processor.process`)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, record: dict) -> dict:
        return self.fn(decoded(record), None, record.get("source", "<shard sample>"))


def source_splits(datasets, sources) -> dict[str, str | None]:
    """Shard URL -> the ``split`` of the dataset entry that names it."""
    return {u: x.split for x, (urls, _) in zip(datasets, sources) for u in urls}
