"""Radiology end to end: VQA-RAD (real JPEGs + questions) prepare -> train -> eval, and DICOM shards ->
contrastive alignment -> report generation -> report metrics. Tiny random models: mechanics, not quality."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pydicom
import pytest

from medmm.eval.runner import evaluate
from medmm.prepare.dicom import DicomPrepareOptions, prepare_dicom
from medmm.prepare.vqa import prepare_vqa
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.deepspeed]

TINY_IMAGE = ["model.modalities.image.encoder.name=vit2d_tiny", "model.modalities.image.encoder.kwargs={}",
              "model.modalities.image.preprocess.image_size=64", "model.modalities.image.encoder.trainable=full"]


def train(config, overrides):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, "-m", "medmm.training", "--config", str(config), *overrides], env=env,
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_vqa_rad_prepare_train_eval(tmp_path, shared_data, tiny_llm):
    vqa = shared_data / "vqa" / "vqa_rad"
    m = prepare_vqa(vqa / "testset.json", vqa / "images", tmp_path / "data")
    assert m["train"] + m["eval"] == 324 and m["rejected"] == 0 and m["images"] == 148
    run = tmp_path / "run"
    train(REPO / "configs/radiology/vqa.yaml",
          [f"model.llm={tiny_llm}", f"data.datasets.0.path={tmp_path / 'data' / 'vqa_train.jsonl'}",
           f"trainer.output_dir={run}", "trainer.max_steps=8", "trainer.micro_batch_size=4", "trainer.save_every=8",
           "trainer.deepspeed=configs/deepspeed/zero0.json", *TINY_IMAGE])
    metrics = evaluate(run / "checkpoint", [tmp_path / "data" / "vqa_eval.jsonl"], tmp_path / "eval", limit=30)
    o = metrics["overall"]
    assert o["count"] == 30 and o["closed_count"] > 0 and o["open_count"] > 0
    assert 0 <= o["closed_accuracy"] <= 1 and 0 <= o["open_recall"] <= 1
    preds = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 30 and all("answer" in p for p in preds)


def test_dicom_align_then_report(tmp_path, pydicom_files, tiny_llm):
    src = tmp_path / "src"
    src.mkdir()
    names = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "liver_1frame.dcm",
             "rtdose_1frame.dcm", "JPEGLSNearLossless_08.dcm", "image_dfl.dcm"]
    # synthetic reports (no licensed report text is available here): one per study, kept short
    texts = ["CT head without contrast. No acute intracranial abnormality.", "MR brain. Normal signal.",
             "CT abdomen. Liver normal.", "MR spine. Mild degenerative change.", "Liver segmentation study.",
             "Dose distribution map.", "Radiograph. No fracture.", "Deflated image. Unremarkable."]
    rows = []
    for i, n in enumerate(names):
        ds = pydicom.dcmread(pydicom_files / n)
        ds.StudyInstanceUID = pydicom.uid.generate_uid()  # one study per file
        ds.save_as(src / n)
        rows.append([ds.StudyInstanceUID, texts[i]])
    with open(tmp_path / "reports.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_uid", "report"])
        w.writerows(rows)
    data = tmp_path / "data"
    m = prepare_dicom(src, data, tmp_path / "reports.csv", DicomPrepareOptions(size_2d=64, salt="t", eval_fraction=0.25))
    assert m["train_records"] >= 4 and m["eval_records"] >= 1
    overrides = [f"model.llm={tiny_llm}", f"data.datasets.0.path={data / 'report_train.jsonl'}",
                 "trainer.max_steps=6", "trainer.micro_batch_size=4", "trainer.save_every=6",
                 "trainer.deepspeed=configs/deepspeed/zero0.json", *TINY_IMAGE]
    r = train(REPO / "configs/radiology/align.yaml", overrides + [f"trainer.output_dir={tmp_path / 'align'}"])
    align_losses = [json.loads(x)["loss"] for x in (tmp_path / "align" / "metrics.jsonl").read_text().splitlines()]
    assert len(align_losses) == 6 and all(x == x for x in align_losses)
    r = train(REPO / "configs/radiology/report.yaml", overrides + [
        f"trainer.output_dir={tmp_path / 'report'}", f"trainer.init_from={tmp_path / 'align' / 'checkpoint'}",
        "model.modalities.volume.encoder.name=vit3d_tiny", "model.modalities.volume.encoder.kwargs={}",
        "model.modalities.volume.preprocess.volume_size=[16,64,64]", "model.gradient_checkpointing=false"])
    assert "initialised from" in r.stdout
    metrics = evaluate(tmp_path / "report" / "checkpoint", [data / "report_eval.jsonl"], tmp_path / "eval",
                       report=True)
    rep = metrics["per_file"]["report_eval.jsonl"]["report"]
    for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "cider"):
        assert 0 <= rep[k] <= (10 if k == "cider" else 1), k
    assert rep["meteor"] is not None or shutil.which("java") is None
