"""Preparing in parts (``--num-shards N --shard-index I``) and ``medmm prepare merge``: three parts merged hold the
same records, splits, errors and file outcomes as one unsharded run (VQA-RAD, pydicom's DICOM files, molecules),
and merge refuses parts that do not make one dataset (other salt, missing or repeated part)."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from medmm.cli import main as cli
from medmm.errors import ConfigError
from medmm.prepare.dicom import DicomPrepareOptions, _header, prepare_dicom
from medmm.prepare.molecules import prepare_molecules
from medmm.prepare.parts import Part, merge_parts, part_of
from medmm.prepare.vqa import prepare_vqa

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def _lines(f: Path) -> list[dict]:
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


def _records(d: Path, name: str) -> set[tuple]:
    """(id, split, modalities) of ``d/NAME_{train,eval}.jsonl``; paths resolved from ``d``, shard references cut to
    the sample key (parts and merge name their tars differently)."""

    def norm(v):
        if isinstance(v, str) and "#" in v:
            return v.split("#", 1)[1]
        if isinstance(v, str) and (d / v).exists():
            return os.path.normpath(os.path.abspath(d / v))
        return v

    return {(r["id"], split, json.dumps({k: norm(v) for k, v in r["modalities"].items()}, sort_keys=True),
             json.dumps(r["conversations"], sort_keys=True))
            for split in ("train", "eval") for r in _lines(d / f"{name}_{split}.jsonl")}


def _set(rows: list[dict]) -> set[str]:
    return {json.dumps(r, sort_keys=True) for r in rows}


def _prepare_parts(fn, out: Path, n: int = 3) -> list[Path]:
    dirs = [out / f"part{i}" for i in range(n)]
    for i, d in enumerate(dirs):
        fn(d, Part(n, i))
    return dirs


def test_vqa_three_parts_merge_to_one_run(tmp_path, shared_data):
    """VQA-RAD (real JPEGs) plus rows that fail: the merge of three parts equals one run as sets of records (with
    their split and image path seen from OUT) and of errors; every image is in exactly one part."""
    root = shared_data / "vqa" / "vqa_rad"
    rows = json.loads((root / "testset.json").read_text())
    rows += [{"qid": "bad-1", "image_name": rows[0]["image_name"], "question": "q?"},  # no answer
             {"qid": "bad-2", "image_name": "../outside.jpg", "question": "q?", "answer": "a"},
             {"qid": "bad-3", "image_name": "missing.jpg", "question": "q?", "answer": "a"}, "not an object"]
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps(rows))
    images = root / "images"
    one = prepare_vqa(questions, images, tmp_path / "one")
    dirs = _prepare_parts(lambda d, p: prepare_vqa(questions, images, d, part=p), tmp_path)
    parts = [json.loads((d / "part.json").read_text()) for d in dirs]
    assert [(p["num_shards"], p["shard_index"], p["command"]) for p in parts] == [(3, i, "vqa") for i in range(3)]
    assert all(p["groups"] for p in parts)  # images are spread over the parts, none in two
    assert sum(len(p["groups"]) for p in parts) == len({k for p in parts for k in p["groups"]}) == one["images"]
    merge_parts(dirs, tmp_path / "merged")
    merged = tmp_path / "merged"
    assert one["eval"] > 0 and one["train"] > 0 and one["rejected"] == 4
    assert _records(merged, "vqa") == _records(tmp_path / "one", "vqa")
    assert _set(_lines(merged / "errors.jsonl")) == _set(_lines(tmp_path / "one" / "errors.jsonl"))
    m = json.loads((merged / "manifest.json").read_text())["vqa"]
    assert {k: m[k] for k in ("train", "eval", "rejected", "images", "source")} == \
        {k: one[k] for k in ("train", "eval", "rejected", "images", "source")}
    # a merged record's image path resolves from OUT, as training reads it
    rec = _lines(merged / "vqa_train.jsonl")[0]
    assert (merged / rec["modalities"]["image"]).is_file()

    with pytest.raises(ConfigError, match=r"part\(s\) 2 of 3 missing"):
        merge_parts(dirs[:2], tmp_path / "m2")
    with pytest.raises(ConfigError, match="part 1 of 3 given more than once"):
        merge_parts(dirs + [dirs[1]], tmp_path / "m3")
    other = tmp_path / "other"  # a part made with other options
    prepare_vqa(questions, images, other, eval_fraction=0.5, part=Part(3, 2))
    with pytest.raises(ConfigError, match=f"part {other} has a different options"):
        merge_parts(dirs[:2] + [other], tmp_path / "m4")


def _samples(d: Path) -> set[tuple]:
    """(sample key, split, modality) of every sample in the folder's shards."""
    out = set()
    for tar in d.glob("*.tar"):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".conversations.json"):
                    c = json.loads(t.extractfile(m).read())
                    out.add((m.name.split(".", 1)[0], c["split"], c["modality"]))
    return out


def test_dicom_three_parts_merge_to_one_run(tmp_path, pydicom_files):
    """pydicom's test files: three parts merged hold the same shard samples with the same split, the same records,
    errors and files.jsonl outcomes as one run; each patient is in one part; the salt's fingerprint (not the salt)
    is recorded."""
    opts = DicomPrepareOptions(salt="shared-secret", size_2d=32, size_3d=(4, 16, 16), task="vqa")
    reports = tmp_path / "qa.csv"  # a question for every study, so the conversation JSONLs are not empty
    studies = sorted({h["study"] for p in sorted(pydicom_files.rglob("*")) if p.is_file()
                      for h in [_header(str(p))] if h.get("study")})
    reports.write_text("study_uid,question,answer\n" + "".join(f"{s},What is shown?,an image\n" for s in studies))
    one = prepare_dicom(pydicom_files, tmp_path / "one", reports, opts)
    dirs = _prepare_parts(lambda d, p: prepare_dicom(pydicom_files, d, reports, opts, part=p), tmp_path)
    info = merge_parts(dirs, tmp_path / "merged")
    merged = tmp_path / "merged"
    ref = _samples(tmp_path / "one")
    assert {s for _, s, _ in ref} == {"train", "eval"}  # both sides are exercised
    assert _samples(merged) == ref
    assert all(_samples(d) for d in dirs)  # every part got patients
    assert _records(merged, "vqa") == _records(tmp_path / "one", "vqa") != set()
    assert _set(_lines(merged / "errors.jsonl")) == _set(_lines(tmp_path / "one" / "errors.jsonl"))
    assert _set(_lines(merged / "files.jsonl")) == _set(_lines(tmp_path / "one" / "files.jsonl"))
    m = json.loads((merged / "manifest.json").read_text())
    for k in ("files_seen", "files_written", "files_rejected", "files_skipped", "series", "series_seen", "studies",
              "train_records", "eval_records", "by_kind", "options", "salt_fingerprint"):
        assert m[k] == one[k], k
    assert set(m["series_outcomes"]) == set(one["series_outcomes"])
    assert sorted(m["shards"]) == sorted(p.name for p in merged.glob("*.tar"))
    assert info["files_linked"] + info["files_copied"] == len(m["shards"])
    fp = one["salt_fingerprint"]
    assert fp and "shared-secret" not in json.dumps(info) and info["salt_fingerprint"] == fp
    assert not (merged / ".deid_salt").exists()


def test_dicom_parts_need_one_salt(tmp_path, pydicom_files, monkeypatch):
    """A part never invents its own salt; parts de-identified with different salts do not merge (naming the part)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm"):
        shutil.copy(pydicom_files / name, src / name)
    monkeypatch.delenv("MEDMM_DEID_SALT", raising=False)
    opts = DicomPrepareOptions(size_2d=16, size_3d=(2, 8, 8))
    with pytest.raises(ConfigError, match="must share the de-identification salt"):
        prepare_dicom(src, tmp_path / "nosalt", None, opts, part=Part(2, 0))
    a = prepare_dicom(src, tmp_path / "p0", None, DicomPrepareOptions(salt="one", size_2d=16, size_3d=(2, 8, 8)),
                      part=Part(2, 0))
    b = prepare_dicom(src, tmp_path / "p1", None, DicomPrepareOptions(salt="two", size_2d=16, size_3d=(2, 8, 8)),
                      part=Part(2, 1))
    assert a["salt_fingerprint"] != b["salt_fingerprint"]
    with pytest.raises(ConfigError, match=f"part {tmp_path / 'p1'} was de-identified with a different salt"):
        merge_parts([tmp_path / "p0", tmp_path / "p1"], tmp_path / "merged")


def test_molecules_three_parts_merge_to_one_run(tmp_path):
    """ClinTox sample rows and some bad SMILES: same records, split and errors; the split keys on the molecule."""
    csv = tmp_path / "mols.csv"
    src = (SAMPLE / "molecules" / "clintox_sample.csv").read_text().splitlines()
    header = src[0].split(",")
    bad = [",".join("not-a-smiles" if c == "smiles" else "1" for c in header)] * 2
    csv.write_text("\n".join(src[:81] + bad + [src[1]]) + "\n")  # src[1] again: the same molecule on one side

    prepare_molecules(csv, tmp_path / "one", label_col="FDA_APPROVED", name="mols")
    dirs = _prepare_parts(lambda d, p: prepare_molecules(csv, d, label_col="FDA_APPROVED", name="mols", part=p),
                          tmp_path)
    merge_parts(dirs, tmp_path / "merged")
    one = _records(tmp_path / "one", "mols")
    assert _records(tmp_path / "merged", "mols") == one and {s for _, s, _, _ in one} == {"train", "eval"}
    side = {json.loads(mods)["mol"]: s for _, s, mods, _ in one}
    assert len(side) < len(one)  # the repeated molecule: one side for both of its rows
    errs = _lines(tmp_path / "one" / "errors.jsonl")
    assert len(errs) >= 2 and _set(_lines(tmp_path / "merged" / "errors.jsonl")) == _set(errs)
    with pytest.raises(ConfigError, match="scaffold"):
        prepare_molecules(csv, tmp_path / "sc", split="scaffold", part=Part(2, 0))


def test_shard_flags_are_checked(tmp_path):
    """Out-of-range or lone flags are one-line ConfigErrors, before any work; the part of a key depends only on the
    key and N."""
    q = SAMPLE / "vqa_rad" / "testset.json"
    base = ["prepare", "vqa", str(q), "--images", str(SAMPLE / "vqa_rad" / "images"), "--out", str(tmp_path / "o")]
    for flags, msg in ((["--shard-index", "3", "--num-shards", "3"], "--shard-index must be in 0..2"),
                       (["--shard-index", "0"], "--shard-index needs --num-shards"),
                       (["--num-shards", "0", "--shard-index", "0"], "--num-shards must be at least 1"),
                       (["--num-shards", "2"], "--num-shards needs --shard-index")):
        with pytest.raises(ConfigError, match=msg) as e:
            cli(base + flags)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()
    assert [part_of(f"row {i}", 4) for i in range(20)] == [part_of(f"row {i}", 4) for i in range(20)]
    assert len({part_of(f"row {i}", 4) for i in range(50)}) == 4
