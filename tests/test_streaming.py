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
    from medmm.data.streaming import npz_array
    from medmm.prepare.dicom import prepare_dicom
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


# ----------------------------------------------------------------------------- training on streamed shards


def _stream_config(tmp_path, tiny_llm, datasets, modalities=("image",), num_workers=0, **trainer):
    import yaml

    from tests.conftest import REPO, model_dict

    md = model_dict(tiny_llm, llm_trainable="full")
    md["modalities"] = {k: v for k, v in md["modalities"].items() if k in modalities}
    cfg = {"model": md,
           "data": {"datasets": datasets, "max_length": 96, "num_workers": num_workers, "shuffle_buffer": 8},
           "trainer": {"output_dir": str(tmp_path / "run"), "deepspeed": str(REPO / "configs/deepspeed/zero2.json"),
                       "max_steps": 4, "micro_batch_size": 2, "lr": 3e-3, "save_every": 4, "seed": 0, **trainer}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _image_shards(folder, n=12):
    """Shards of the sample VQA-RAD images (``jpg``) with a yes/no conversation in each sample's ``json``."""
    import webdataset as wds

    from tests.conftest import SAMPLE

    imgs = sorted((SAMPLE / "vqa_rad" / "images").glob("*.jpg"))
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, n, 4):
        with wds.TarWriter(str(folder / f"img-{s // 4:06d}.tar")) as w:
            for i in range(s, min(n, s + 4)):
                doc = {"modality": "image", "conversations": [
                    {"from": "human", "value": "<image>\nIs there an abnormality?"},
                    {"from": "gpt", "value": "yes" if i % 3 == 0 else "no"}]}
                w.write({"__key__": f"img{i:04d}", "jpg": imgs[i % len(imgs)].read_bytes(),
                         "json": json.dumps(doc).encode()})
    return str(folder / "img-*.tar")


@pytest.mark.slow
@pytest.mark.deepspeed
def test_streamed_kill_and_resume_matches_uninterrupted(tmp_path, tiny_llm):
    """2 ranks x 2 DataLoader workers on streamed shards: killed mid-run and resumed, the losses are the
    uninterrupted run's (checkpoints every 3 steps, so the resumed loader may start at an odd micro-step)."""
    from tests.test_training import kill_then_resume, losses, torchrun

    shards = _image_shards(tmp_path / "shards")
    kw = dict(max_steps=12, save_every=3)
    ds = [{"format": "wds", "shards": shards}]
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "kill"
    ref_dir.mkdir(), kill_dir.mkdir()
    r = torchrun(_stream_config(ref_dir, tiny_llm, ds, num_workers=2, **kw))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "streamed (wds)" in r.stdout
    ref = losses(ref_dir / "run")
    assert len(ref) == 12

    cfg = _stream_config(kill_dir, tiny_llm, ds, num_workers=2, **kw)
    got, killed_at = kill_then_resume(cfg, kill_dir / "run", "step-00000003", 12)
    assert set(got) == set(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-5), (step, killed_at)


@pytest.mark.slow
@pytest.mark.deepspeed
def test_two_ranks_train_on_prepare_dicom_and_prepare_wsi_shards(tmp_path, tiny_llm, source, shared_data):  # noqa: F811
    """`medmm prepare dicom` shards (a 2D image and a volume, report conversations inside the samples) and
    `medmm prepare wsi` tile shards (a label conversation inside each tile's JSON), streamed by 2 ranks (ZeRO-3),
    a weighted mixture of the two, no JSONL read."""
    from medmm.config import DicomPrepareOptions
    from medmm.prepare.dicom import prepare_dicom
    from medmm.prepare.wsi import prepare_wsi
    from tests.conftest import REPO
    from tests.test_training import losses, torchrun

    src, reports, *_ = source
    dcm = tmp_path / "dicom"
    prepare_dicom(src, dcm, reports, DicomPrepareOptions(size_2d=32, size_3d=(8, 32, 32), workers=1, salt="s1",
                                                         eval_fraction=0))
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "CMU-1-Small-Region.svs").symlink_to(shared_data / "pathology/wsi/CMU-1-Small-Region.svs")
    (tmp_path / "labels.csv").write_text("slide,label\nCMU-1-Small-Region.svs,tumor\n")
    m = prepare_wsi(slides, tmp_path / "wsi", mpp=4.0, tile=32, labels=tmp_path / "labels.csv", slide_mpp=0.5,
                    eval_fraction=0, progress=False)
    assert m["counts"]["tiles"] >= 4
    for f in ("report_train.jsonl", "report_eval.jsonl"):
        (dcm / f).unlink()  # the shards alone
    ds = [{"format": "wds", "shards": str(dcm / "shard-*.tar"), "weight": 1.0, "name": "dicom"},
          {"format": "wds", "shards": str(tmp_path / "wsi" / "shard-*.tar"), "weight": 1.0, "name": "wsi"}]
    cfg = _stream_config(tmp_path, tiny_llm, ds, modalities=("image", "volume"),
                         deepspeed=str(REPO / "configs/deepspeed/zero3.json"))
    r = torchrun(cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world=2" in r.stdout and "streamed (wds)" in r.stdout
    assert "('dicom', 1, 2)" in r.stdout  # 1 shard, 2 samples (the image and the volume series)
    ls = losses(tmp_path / "run")
    assert len(ls) == 4 and all(v == v for v in ls.values())


@pytest.mark.slow
def test_pretrain_text_and_dpo_pairs_stream(tmp_path, tiny_llm):
    """Stage pretrain streams text shards packed on the fly (full blocks, a resume at step k gives the same
    blocks); stage dpo streams preference pairs (chosen rows then rejected rows)."""
    from itertools import islice

    import torch
    import webdataset as wds

    from medmm.config import TrainConfig, apply_overrides, config_from_dict
    from medmm.training.stages import StageContext, get_stage
    from tests.conftest import model_dict

    findings = ["no acute cardiopulmonary process", "small left pleural effusion", "mild cardiomegaly",
                "right lower lobe consolidation", "no pneumothorax", "degenerative changes of the spine"]
    (tmp_path / "text").mkdir()
    (tmp_path / "pairs").mkdir()
    for s in range(3):
        with wds.TarWriter(str(tmp_path / "text" / f"t-{s:06d}.tar")) as w:
            for i in range(60):
                n = s * 60 + i
                w.write({"__key__": f"d{n:05d}", "txt": f"Report {n}: {findings[n % 6]}; {findings[(n * 5) % 6]}."
                         .encode()})
        with wds.TarWriter(str(tmp_path / "pairs" / f"p-{s:06d}.tar")) as w:
            for i in range(8):
                n = s * 8 + i
                rec = {"conversations": [{"from": "human", "value": f"Is there {findings[n % 6]}?"}],
                       "chosen": "yes", "rejected": "no"}
                w.write({"__key__": f"p{n:05d}", "json": json.dumps(rec).encode()})

    def stage(name, shards, **data):
        md = model_dict(tiny_llm)
        md["modalities"] = {}
        if name == "pretrain":
            md["llm_trainable"] = "full"
        raw = {"model": md, "data": {"datasets": [{"format": "wds", "shards": shards}], "max_length": 32,
                                     "num_workers": 0, **data},
               "trainer": {"stage": name, "micro_batch_size": 2, "output_dir": str(tmp_path / name)}}
        cfg = config_from_dict(TrainConfig, apply_overrides(raw, []))
        st = get_stage(name)(cfg, StageContext(output_dir=tmp_path / name))
        st.build_model()
        return st.build_data()

    data = stage("pretrain", str(tmp_path / "text" / "t-*.tar"), packing="concat")
    assert data.stream is not None and data.batches_per_epoch == 90
    full = list(islice(iter(data.stream(0)), 6))
    assert all(b["input_ids"].shape == (2, 32) for b in full)
    assert sum(int((b["labels"] != -100).sum()) for b in full) > 0.9 * 6 * 2 * 32  # packed: blocks are full
    again = list(islice(iter(data.stream(4)), 2))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again, full[4:]))

    data = stage("dpo", str(tmp_path / "pairs" / "p-*.tar"))
    batch = next(iter(data.stream(0)))
    assert batch["input_ids"].shape[0] == 4  # 2 chosen rows, then 2 rejected
    assert data.batches_per_epoch == 12


def test_tar_reader_matches_tarfile_on_long_and_unicode_names(tmp_path):
    """The plain tar reader gives what ``tarfile`` reads: pax (unicode, > 100 chars) and GNU long names, ustar
    prefixes, directories skipped."""
    import io
    import tarfile

    members = {"d" * 120 + "/k1.json": b"{}", "d" * 120 + "/k1.npy": b"x" * 1000, "größe/k2.txt": b"\xc3\xa4",
               "k3." + "e" * 150: b"", "k4.bin": bytes(range(256)) * 5}
    for fmt, name in ((tarfile.PAX_FORMAT, "pax"), (tarfile.GNU_FORMAT, "gnu"), (tarfile.USTAR_FORMAT, "ustar")):
        path = tmp_path / f"{name}.tar"
        with tarfile.open(path, "w", format=fmt) as tf:
            tf.addfile(_dir_info())
            for n, data in members.items():
                if fmt == tarfile.USTAR_FORMAT and (len(n.rsplit("/", 1)[-1]) > 100 or not n.isascii()):
                    continue
                info = tarfile.TarInfo(n)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        with tarfile.open(path) as tf:
            want = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
        got = {}
        for s in shard_samples(str(path)):
            for ext, data in s.items():
                if not ext.startswith("__"):
                    got[f"{s['__key__']}.{ext}"] = data
        assert got == want, name


def _dir_info():
    import tarfile

    info = tarfile.TarInfo("adir")
    info.type = tarfile.DIRTYPE
    return info


def test_fewer_samples_than_readers_never_starves(tmp_path):
    urls = expand_shards(write_shards(tmp_path, "a", [2]))  # 2 samples, 2 ranks x 2 workers
    got = [key(next(iter(ShardStream([(urls, 1)], 4, rank=r, world_size=2, shuffle_buffer=0).iter_reader(w, 2))))
           for r in range(2) for w in range(2)]
    assert set(got) == {"a000000", "a000001"}


def test_feature_shard_sample_feeds_the_slide_feature_loader():
    """A `prepare wsi --features` sample (``features.npy`` + JSON with modality ``slide``) -> a record whose bag the
    ``slide_features`` loader takes once decoded."""
    import numpy as np

    from medmm.config import PreprocessConfig
    from medmm.data.loaders import build_loader
    from medmm.data.streaming import decoded, sample_records
    from medmm.prepare.wsi import _npy, _sample_conversations

    feats = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    doc = {"slide": "s1", "tiles": 5, **_sample_conversations("slide", {"label": "tumor", "report": "Carcinoma."},
                                                               "train", "Diagnosis?", "Report?")}
    sample = {"__key__": "s1", "__url__": "x.tar", "features.npy": _npy(feats), "coords.npy": _npy(np.zeros((5, 2))),
              "json": json.dumps(doc).encode()}
    recs = sample_records(sample, "train")
    assert [r["conversations"][-1]["value"] for r in recs] == ["tumor", "Carcinoma."]
    assert sample_records(sample, "eval") == []
    item = build_loader("slide_features", PreprocessConfig(slide_feature_dim=8)).load(
        decoded(recs[0])["modalities"]["slide"])
    assert item["x"].shape == (5, 8) and np.allclose(item["x"].numpy(), feats)
