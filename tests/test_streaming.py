"""Streaming webdataset input (medmm.data.streaming): node/worker split, equal epochs, weighted mixture, shuffle,
resume by sample count, pipe: URLs, typed errors."""

import json
from collections import Counter

import pytest

from medmm.data.streaming import ShardStream, count_samples, expand_shards, shard_samples
from medmm.errors import InvalidInputError
from tests.test_prepare_dicom import source  # noqa: F401  (the fixture: a DICOM tree + reports)


def write_shards(folder, prefix, counts):
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for i, c in enumerate(counts):
        with wds.TarWriter(str(folder / f"{prefix}-{i:06d}.tar")) as w:
            for _ in range(c):
                w.write({"__key__": f"{prefix}{n:06d}", "json": json.dumps({"n": n, "src": prefix}).encode()})
                n += 1
    return str(folder / f"{prefix}-{{000000..{len(counts) - 1:06d}}}.tar")


def key(s):
    return s["__key__"]


def test_expand_and_errors(tmp_path):
    pat = write_shards(tmp_path, "a", [3, 2])
    urls = expand_shards(pat)
    assert [u.rsplit("/", 1)[1] for u in urls] == ["a-000000.tar", "a-000001.tar"]
    assert expand_shards(str(tmp_path / "a-*.tar")) == urls
    assert count_samples(urls) == 5
    with pytest.raises(InvalidInputError, match="a-000002.tar: shard not found"):
        expand_shards(str(tmp_path / "a-{000000..000009}.tar"))
    assert [key(s) for s in shard_samples(f"pipe:cat {urls[1]}")] == ["a000003", "a000004"]
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(InvalidInputError, match="bad.tar"):
        list(shard_samples(str(tmp_path / "bad.tar")))


def test_two_ranks_two_workers_split_and_equal_epochs(tmp_path):
    urls = expand_shards(write_shards(tmp_path, "a", [5, 1, 7, 3, 4, 4, 2, 6]))  # 32 samples, uneven shards
    seen = []
    for rank in range(2):
        st = ShardStream([(urls, 1.0)], samples_per_rank=10, rank=rank, world_size=2, seed=1, shuffle_buffer=0)
        per_rank = []
        for w in range(2):
            got = [key(s) for s in st.iter_reader(w, 2)]
            assert len(got) == 5
            per_rank += got
        assert len(per_rank) == 10  # the same number of samples (steps) on every rank
        seen += per_rank
    assert len(set(seen)) == len(seen)  # no sample twice within the epoch across ranks and workers


def test_fewer_shards_than_readers_splits_samples(tmp_path):
    urls = expand_shards(write_shards(tmp_path, "a", [5, 7]))  # 2 shards, 4 readers
    keys = [key(s) for r in range(2) for w in range(2)
            for s in ShardStream([(urls, 1)], 6, rank=r, world_size=2, shuffle_buffer=0).iter_reader(w, 2)]
    assert sorted(keys) == [f"a{i:06d}" for i in range(12)]


def test_mixture_weights_shuffle_and_resume(tmp_path):
    a = expand_shards(write_shards(tmp_path, "a", [50, 50]))
    b = expand_shards(write_shards(tmp_path, "b", [50, 50]))
    st = ShardStream([(a, 3.0), (b, 1.0)], samples_per_rank=400, seed=0, shuffle_buffer=32, epochs=1)
    got = [json.loads(s["json"])["src"] for s in st]
    frac = Counter(got)["a"] / len(got)
    assert 0.68 < frac < 0.82, frac
    full = [key(s) for s in ShardStream([(a, 3.0), (b, 1.0)], 60, seed=5, shuffle_buffer=16, epochs=2)]
    assert len(full) == 120 and full != sorted(full)  # shuffled, two epochs
    resumed = [key(s) for s in ShardStream([(a, 3.0), (b, 1.0)], 60, seed=5, shuffle_buffer=16, epochs=2, start=47)]
    assert resumed == full[47:]  # a resume continues the uninterrupted stream exactly


def test_dataloader_workers(tmp_path):
    from torch.utils.data import DataLoader

    urls = expand_shards(write_shards(tmp_path, "a", [4, 4, 4, 4]))
    st = ShardStream([(urls, 1)], 16, shuffle_buffer=0, decode=lambda s: json.loads(s["json"])["n"])
    got = [int(x) for b in DataLoader(st, batch_size=4, num_workers=2) for x in b]
    assert sorted(got) == list(range(16))


@pytest.mark.slow
def test_prepare_dicom_samples_carry_their_conversations(tmp_path, source):  # noqa: F811
    """Every shard sample of ``prepare dicom`` holds the conversations its JSONL records hold (and its array)."""
    from medmm.config import DicomPrepareOptions
    from medmm.data.prepare_dicom import prepare_dicom
    from medmm.data.streaming import npz_array
    from medmm.utils import read_jsonl

    src, reports, *_ = source
    out = tmp_path / "out"
    m = prepare_dicom(src, out, reports, DicomPrepareOptions(size_2d=32, size_3d=(8, 32, 32), workers=1, salt="s1"))
    urls = expand_shards([str(out / s) for s in m["shards"]])
    samples = {s["__key__"]: s for u in urls for s in shard_samples(u)}
    assert len(samples) == m["series"]
    recs = list(read_jsonl(out / "report_train.jsonl")) + list(read_jsonl(out / "report_eval.jsonl"))
    assert recs
    for r in recs:
        key = r["id"].rsplit("-", 1)[0]
        carried = json.loads(samples[key]["conversations.json"])
        assert carried["modality"] in r["modalities"]
        assert r["conversations"] in carried["conversations"]
        assert npz_array(samples[key]["npz"]).size > 0


# ----------------------------------------------------------------------------- records, batches, resume by step


def write_conv_shards(folder, counts, split_every=0, bad=()):
    """Shards of samples carrying their conversation (``json``) and a (4, 4) array (``npy``); sample ``n`` says
    ``answer n``. ``split_every``: every k-th sample is marked eval; ``bad``: samples whose npy is corrupt."""
    import io

    import numpy as np
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for i, c in enumerate(counts):
        with wds.TarWriter(str(folder / f"c-{i:06d}.tar")) as w:
            for _ in range(c):
                buf = io.BytesIO()
                np.save(buf, np.full((4, 4), n, np.float32))
                doc = {"modality": "image", "conversations": [{"from": "human", "value": "<image>\nWhich?"},
                                                              {"from": "gpt", "value": f"answer {n}"}]}
                if split_every:
                    doc["split"] = "eval" if n % split_every == 0 else "train"
                w.write({"__key__": f"k{n:06d}", "json": json.dumps(doc).encode(),
                         "npy": b"broken" if n in bad else buf.getvalue()})
                n += 1
    return expand_shards(str(folder / "c-*.tar"))


def _load(rec):
    from medmm.data.streaming import decoded

    arr = decoded(rec)["modalities"]["image"]
    return {"n": int(arr[0, 0]), "answer": rec["conversations"][-1]["value"]}


def _collate(samples):
    return {"n": [s["n"] for s in samples], "load_errors": [e for s in samples for e in s.get("load_errors", [])]}


def test_sample_records_split_and_decoding(tmp_path):
    from medmm.data.streaming import sample_records

    urls = write_conv_shards(tmp_path, [6], split_every=3)
    samples = list(shard_samples(urls[0]))
    train = [r for s in samples for r in sample_records(s, "train")]
    assert [_load(r)["n"] for r in train] == [1, 2, 4, 5]  # 0 and 3 are eval
    assert [_load(r)["n"] for s in samples for r in sample_records(s, "eval")] == [0, 3]
    assert len([r for s in samples for r in sample_records(s, None)]) == 6
    del samples[0]["json"]  # no record: no training sample (an unlabelled tile)
    assert sample_records(samples[0], "train") == []
    assert all(_load(r)["answer"] == f"answer {_load(r)['n']}" for r in train)


def test_stream_batches_resume_at_any_step_with_workers(tmp_path):
    """Batches are a pure function of the micro-step: a loader made at step k (0 or 2 DataLoader workers) yields
    the uninterrupted run's batches from k on; a record that fails to load is left out and its error travels."""
    from torch.utils.data import DataLoader

    from medmm.data.streaming import SourceRecords, StreamBatches

    urls = write_conv_shards(tmp_path, [7, 5, 9, 3], bad=(22,))  # 24 samples, one corrupt (in a shard of rank 1)

    def batches(start, workers, n):
        sb = StreamBatches([(urls, 1.0)], 3, SourceRecords({}), _load, _collate, rank=1, world_size=2, seed=3,
                           shuffle_buffer=4, start=start)
        it = iter(DataLoader(sb, batch_size=None, num_workers=workers))
        return [next(it) for _ in range(n)]

    for workers in (0, 2):
        full = batches(0, workers, 12)
        for k in (3, 5):
            assert [b["n"] for b in batches(k, workers, 12 - k)] == [b["n"] for b in full[k:]], (workers, k)
    seen = [n for b in full for n in b["n"]]
    assert 22 not in seen and len(set(seen)) > 10
    errs = [e for b in full for e in b["load_errors"]]
    assert errs and all("k000022.npy" in e["path"] for e in errs)


def test_stream_two_ranks_disjoint_and_equal(tmp_path):
    from medmm.data.streaming import SourceRecords, StreamBatches

    urls = write_conv_shards(tmp_path, [5, 5, 5, 5])
    per_rank = []
    for rank in range(2):
        sb = StreamBatches([(urls, 1.0)], 2, SourceRecords({}), _load, _collate, rank=rank, world_size=2,
                           shuffle_buffer=0)
        it = sb.iter_worker(0, 1)
        per_rank.append([n for _ in range(5) for n in next(it)["n"]])  # 10 samples = one epoch of each rank
    assert len(per_rank[0]) == len(per_rank[1]) == 10
    assert sorted(per_rank[0] + per_rank[1]) == list(range(20))


def test_dataset_config_formats():
    from medmm.config import DatasetConfig
    from medmm.errors import ConfigError

    assert DatasetConfig(path="a.jsonl", format="jsonl").format == "conversation"
    assert DatasetConfig(shards="s-{0..3}.tar", format="wds").shards == "s-{0..3}.tar"
    with pytest.raises(ConfigError, match="wds needs shards"):
        DatasetConfig(format="wds")
