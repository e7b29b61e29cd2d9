"""Row 14: FIFOs, dangling links and link loops where a CLI expects files.

Before: a FIFO as a manifest row made ``infer.py --manifest`` hang for ever (``open()`` on a FIFO waits for a
writer), and ``medmm prepare dicom`` skipped a FIFO, a dangling link and a link loop without the ``files.jsonl`` line
it promises for every file. Now every loader checks that a path is a regular file before opening it (a typed error
per row otherwise), and ``prepare dicom`` gives every entry of its input a line, non-regular ones rejected with why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from medmm.cli import main
from tests.conftest import REPO
from tests.security._user_files import jsonl, png

HANG_S = 120  # far beyond the few seconds a run takes: reaching it means a reader blocked on a FIFO


def _run(cmd: list[str], cwd, what: str) -> subprocess.CompletedProcess:
    """``cmd`` in a subprocess, so a reader blocked on a FIFO fails the test instead of hanging the suite."""
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_S, cwd=cwd,
                             env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO)))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} still running after {HANG_S} s: a reader blocked on a FIFO")
    assert run.returncode == 0, run.stderr[-2000:]
    return run


@pytest.fixture(scope="module")
def small_checkpoint(tiny_llm, tmp_path_factory):
    """A tiny random model over image, mol and dna (no volume encoder: the subprocess loads it faster)."""
    from medmm.config import ModelConfig, config_from_dict
    from medmm.model.multimodal import MedMMForCausalLM
    from tests.conftest import model_dict

    d = model_dict(tiny_llm)
    del d["modalities"]["volume"]
    torch.manual_seed(0)
    return MedMMForCausalLM.from_config(config_from_dict(ModelConfig, d)).save_pretrained(
        tmp_path_factory.mktemp("row14") / "model")


def test_infer_manifest_with_fifo_rows_finishes(small_checkpoint, tmp_path):
    for name in ("pipe.png", "pipe.dcm", "pipe.fa", "pipe.tar"):
        os.mkfifo(tmp_path / name)
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    png(tmp_path / "ok.png", 90, 16)
    rows = [{"id": "ok-image", "modalities": {"image": "ok.png"}, "question": "modality?"},
            {"id": "fifo-image", "modalities": {"image": "pipe.png"}, "question": "modality?"},
            {"id": "fifo-dicom", "modalities": {"image": "pipe.dcm"}, "question": "modality?"},
            {"id": "fifo-fasta", "modalities": {"dna": "pipe.fa"}, "question": "promoter?"},
            {"id": "fifo-shard", "modalities": {"image": "pipe.tar#key.npz"}, "question": "modality?"},
            {"id": "dangling", "modalities": {"image": "gone.png"}, "question": "modality?"},
            {"id": "ok-mol", "modalities": {"mol": "CCO"}, "question": "drug?"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    _run([sys.executable, str(REPO / "infer.py"), "--checkpoint", str(small_checkpoint), "--manifest",
          str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--max-new-tokens", "2"], tmp_path, "infer.py --manifest")

    res = {r["id"]: r for r in jsonl(tmp_path / "o.jsonl")}
    assert list(res) == [r["id"] for r in rows]
    assert "answer" in res["ok-image"] and "answer" in res["ok-mol"]
    for rid in ("fifo-image", "fifo-dicom", "fifo-fasta", "fifo-shard"):
        assert "error" in res[rid] and "FIFO" in res[rid]["message"], res[rid]
    assert res["dangling"]["error"] == "ImageError" and "dangling" in res["dangling"]["message"]


def test_prepare_dicom_gives_every_entry_a_files_line(pydicom_files, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    shutil.copy(pydicom_files / "CT_small.dcm", src / "ct.dcm")
    shutil.copy(pydicom_files / "MR_small.dcm", src / "sub" / "mr.dcm")
    os.mkfifo(src / "pipe.dcm")
    (src / "dangling.dcm").symlink_to(src / "nowhere.dcm")
    (src / "loop.dcm").symlink_to(src / "loop.dcm")
    (src / "sub" / "up").symlink_to(src)  # a link back up the tree: listed, never walked into
    out = tmp_path / "out"

    main(["prepare", "dicom", str(src), "--out", str(out), "--size", "16", "--salt", "t"])

    lines = {os.path.relpath(x["path"], src): x for x in jsonl(out / "files.jsonl")}
    assert sorted(lines) == ["ct.dcm", "dangling.dcm", "loop.dcm", "pipe.dcm", "sub/mr.dcm", "sub/up"]
    assert lines["ct.dcm"]["outcome"] == "written" and lines["sub/mr.dcm"]["outcome"] == "written"
    why = {name: (line["outcome"], line.get("message") or line.get("reason", "")) for name, line in lines.items()}
    assert why["pipe.dcm"][0] == "rejected" and "FIFO" in why["pipe.dcm"][1]
    assert why["dangling.dcm"][0] == "rejected" and "dangling" in why["dangling.dcm"][1]
    assert why["loop.dcm"][0] == "rejected" and "loop" in why["loop.dcm"][1]
    assert why["sub/up"][0] == "skipped" and "link to a folder" in why["sub/up"][1]
    errors = {os.path.relpath(e["path"], src) for e in jsonl(out / "errors.jsonl")}
    assert {"pipe.dcm", "dangling.dcm", "loop.dcm"} <= errors
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files_seen"] == 6 and manifest["files_rejected"] == 3 and manifest["files_skipped"] == 1


LOADER_PROBE = """
import json, sys
from medmm.config import PreprocessConfig
from medmm.data.loaders import build_loader
from medmm.errors import InvalidInputError

out = {}
for loader, value in json.loads(sys.argv[1]):
    try:
        build_loader(loader, PreprocessConfig()).load(value)
        out[loader] = "loaded"
    except InvalidInputError as e:
        out[loader] = [type(e).__name__, e.reason]
print(json.dumps(out))
"""


def test_every_path_loader_refuses_a_fifo(tmp_path):
    for name in ("vol.dcm", "feats.npy", "slide.svs", "seq.fasta"):
        os.mkfifo(tmp_path / name)
    probes = [["volume", "vol.dcm"], ["slide_features", "feats.npy"], ["slide_tiles", "slide.svs"],
              ["dna_tokens", "seq.fasta"]]

    run = _run([sys.executable, "-c", LOADER_PROBE, json.dumps(probes)], tmp_path, "the loaders")

    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert res == {"volume": ["DicomError", "is a FIFO (named pipe), not a regular file"],
                   "slide_features": ["SlideError", "is a FIFO (named pipe), not a regular file"],
                   "slide_tiles": ["SlideError", "is a FIFO (named pipe), not a regular file"],
                   "dna_tokens": ["SequenceError", "is a FIFO (named pipe), not a regular file"]}
