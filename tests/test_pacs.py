"""PACS integration against a real Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``, started here on loopback
ports with its own storage folder): DICOMweb pull-run-push, the DIMSE listener fed by dcmtk's ``storescu``,
calling AE titles, a bounded queue, and a failing study that does not stop the listener."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import torch
from pydicom.uid import generate_uid

from medmm.cli import main as cli_main
from medmm.config import DecodingConfig, ModelConfig, config_from_dict
from medmm.export.dicom_sr import read_report
from medmm.export.listener import OUT_OF_RESOURCES, ListenerConfig, StudyListener
from medmm.export.study import ReportConfig, ReportPipeline
from medmm.model.multimodal import MedMMForCausalLM
from medmm.training.distributed import free_port
from tests.conftest import REPO, model_dict

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # from the orthanc-dicomweb package


@dataclass
class Orthanc:
    url: str
    dicomweb: str
    aet: str
    dicom_port: int

    def upload(self, path: Path) -> None:
        import requests

        r = requests.post(f"{self.url}/instances", data=Path(path).read_bytes(), timeout=30)
        r.raise_for_status()

    def sr_instances(self, study_uid: str) -> list:
        """The SR instances of a study, retrieved over WADO-RS."""
        from dicomweb_client.api import DICOMwebClient

        c = DICOMwebClient(self.dicomweb)
        found = c.search_for_instances(study_uid, search_filters={"Modality": "SR"})
        return [c.retrieve_instance(study_uid, f["0020000E"]["Value"][0], f["00080018"]["Value"][0]) for f in found]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    import requests

    if not (Path(ORTHANC).exists() and DICOMWEB_PLUGIN.exists() and shutil.which("storescu")):
        pytest.fail("these tests need the Debian packages orthanc, orthanc-dicomweb and dcmtk (installed by .ci/run)")
    d = tmp_path_factory.mktemp("orthanc")
    http_port, dicom_port = free_port(), free_port()
    cfg = {"Name": "medmm-test", "StorageDirectory": str(d / "db"), "IndexDirectory": str(d / "db"),
           "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
           "AuthenticationEnabled": False, "Plugins": [str(DICOMWEB_PLUGIN)],
           "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "DicomAlwaysAllowStore": True,
           "DicomCheckCalledAet": True}
    (d / "orthanc.json").write_text(json.dumps(cfg))
    log = open(d / "orthanc.log", "w")
    proc = subprocess.Popen([ORTHANC, str(d / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    for _ in range(300):
        try:
            if requests.get(f"{url}/system", timeout=1).ok:
                break
        except requests.ConnectionError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"Orthanc did not start: {(d / 'orthanc.log').read_text()[-2000:]}")
    if proc.poll() is not None:
        pytest.fail(f"Orthanc exited ({proc.returncode}): {(d / 'orthanc.log').read_text()[-2000:]}")
    yield Orthanc(url, f"{url}/dicom-web", "ORTHANC", dicom_port)
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def checkpoint(tiny_llm, tmp_path_factory):
    torch.manual_seed(0)
    m = MedMMForCausalLM.from_config(config_from_dict(ModelConfig, model_dict(tiny_llm)))
    return m.save_pretrained(tmp_path_factory.mktemp("ckpt") / "model")


def _new_study(src: Path, out_dir: Path, n: int = 1, truncate_pixels: bool = False) -> list[Path]:
    """A fresh study (new Study/Series/SOP UIDs) with ``n`` instances of a real file's pixels and patient."""
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    if truncate_pixels:
        ds.PixelData = ds.PixelData[:64]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        paths.append(out_dir / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _wait(pred, timeout_s: float, what: str):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        res = pred()
        if res:
            return res
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_pull_run_push(orthanc, checkpoint, pydicom_files, capsys):
    for name in ("CT_small.dcm", "MR_small.dcm"):
        src = pydicom.dcmread(pydicom_files / name)
        orthanc.upload(pydicom_files / name)
        cli_main(["pacs", "pull-run-push", "--dicomweb", orthanc.dicomweb, "--study", src.StudyInstanceUID,
                  "--checkpoint", str(checkpoint), "--max-new-tokens", "6"])
        printed = json.loads(capsys.readouterr().out)
        srs = orthanc.sr_instances(src.StudyInstanceUID)
        assert len(srs) == 1, name
        sr = srs[0]
        rep = read_report(sr)
        assert rep["sop_instance_uid"] == printed["sr_sop_instance_uid"]
        assert rep["text"] == printed["report"] and rep["verification_flag"] == "UNVERIFIED"
        assert rep["study_instance_uid"] == src.StudyInstanceUID
        assert rep["referenced_sop_instance_uids"] == [src.SOPInstanceUID]
        assert rep["evidence_sop_instance_uids"] == [src.SOPInstanceUID]
        assert (sr.PatientName, sr.PatientID) == (src.PatientName, src.PatientID)
        assert printed["retrieved_instances"] == 1 and printed["stored"] is True


def test_listen_storescu_sr_reaches_orthanc(orthanc, checkpoint, pydicom_files, tmp_path):
    study = _new_study(pydicom_files / "CT_small.dcm", tmp_path / "study", n=2)
    src = [pydicom.dcmread(p) for p in study]
    port = free_port()
    out = tmp_path / "pacs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "medmm.cli", "pacs", "listen", "--aet", "MEDMM", "--port", str(port),
           "--allowed-aets", "CT01,PACS", "--forward-to", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
           "--study-timeout", "0.5", "--out", str(out), "--checkpoint", str(checkpoint), "--max-new-tokens", "6"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        first = proc.stdout.readline()  # printed once the SCP is listening
        assert first and json.loads(first)["listening"] == f"MEDMM@127.0.0.1:{port}", proc.stderr.read()
        rejected = subprocess.run(["storescu", "-aet", "INTRUDER", "-aec", "MEDMM", "127.0.0.1", str(port),
                                   str(study[0])], capture_output=True, text=True, timeout=60)
        assert rejected.returncode != 0 and "Calling AE Title Not Recognized" in rejected.stdout + rejected.stderr
        sent = subprocess.run(["storescu", "-aet", "CT01", "-aec", "MEDMM", "127.0.0.1", str(port), *map(str, study)],
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        srs = _wait(lambda: orthanc.sr_instances(src[0].StudyInstanceUID), 60, "the SR in Orthanc")
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]
    rep = read_report(srs[0])
    assert rep["verification_flag"] == "UNVERIFIED" and rep["text"]
    assert sorted(rep["evidence_sop_instance_uids"]) == sorted(d.SOPInstanceUID for d in src)
    assert rep["referenced_sop_instance_uids"][0] in {d.SOPInstanceUID for d in src}
    records = [json.loads(x) for x in (out / "studies.jsonl").read_text().splitlines()]
    assert [(r["outcome"], r["instances"], r["calling_aet"]) for r in records] == [("ok", 2, "CT01")]
    assert records[0]["sr_sop_instance_uid"] == rep["sop_instance_uid"]
    assert records[0]["sent_to"] == f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"
    log_text = (out / "studies.jsonl").read_text() + stderr
    assert str(src[0].PatientID) not in log_text and "CompressedSamples" not in log_text  # no patient identifiers
    assert "rejected" in stderr and json.loads(stdout.strip().splitlines()[-1])["rejected_associations"] == 1
    assert not any((out / "spool").iterdir())  # received instances are not kept


class _Gate:
    """A pipeline wrapper that holds each study until the test opens the gate (makes the queue bound observable)."""

    def __init__(self, inner):
        self.inner, self.predictor, self.algorithm = inner, inner.predictor, inner.algorithm
        self.entered, self.open = threading.Event(), threading.Event()

    def run(self, *args, **kwargs):
        self.entered.set()
        assert self.open.wait(60)
        return self.inner.run(*args, **kwargs)


def _store(port: int, paths: list[Path], aet: str = "SCU") -> list[int]:
    from pynetdicom import AE, StoragePresentationContexts

    ae = AE(ae_title=aet)
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDMM")
    if not assoc.is_established:
        return []
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in paths]
    finally:
        assoc.release()


def test_listener_survives_failures_and_bounds_its_queue(orthanc, checkpoint, pydicom_files, tmp_path):
    pipeline = ReportPipeline(checkpoint, ReportConfig(decoding=DecodingConfig(max_new_tokens=4)))
    gate = _Gate(pipeline)
    port = free_port()
    listener = StudyListener(gate, ListenerConfig(port=port, allowed_aets=["SCU"], study_timeout_s=0.2, max_queue=1,
                                                  out_dir=str(tmp_path / "pacs"),
                                                  forward_to=orthanc.dicomweb)).start()  # SRs by STOW-RS
    try:
        assert _store(port, _new_study(pydicom_files / "CT_small.dcm", tmp_path / "x"), aet="NOPE") == []
        broken = _new_study(pydicom_files / "CT_small.dcm", tmp_path / "broken", truncate_pixels=True)
        crash = _new_study(pydicom_files / "MR_small.dcm", tmp_path / "crash")
        good = _new_study(pydicom_files / "MR_small.dcm", tmp_path / "good")
        assert _store(port, broken) == [0]
        assert gate.entered.wait(30)  # the broken study is in inference, held at the gate
        assert _store(port, crash) == [OUT_OF_RESOURCES]  # max_queue=1: a second study is refused
        gate.open.set()
        assert listener.wait_idle(60)
        real_predict = pipeline.predictor.predict
        calls = []

        def crashing_predict(*a, **k):  # a crash inside the model (not an input error) for one study
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("CUDA error: device-side assert triggered")
            return real_predict(*a, **k)

        pipeline.predictor.predict = crashing_predict
        assert _store(port, crash) == [0]
        assert listener.wait_idle(60)
        assert _store(port, good) == [0]
        assert listener.wait_idle(60)
    finally:
        listener.stop()
    records = [json.loads(x) for x in (tmp_path / "pacs" / "studies.jsonl").read_text().splitlines()]
    uid = {pydicom.dcmread(p[0]).StudyInstanceUID: k for k, p in (("broken", broken), ("crash", crash),
                                                                   ("good", good))}
    got = [(uid[r["study_instance_uid"]], r["outcome"], r.get("error")) for r in records]
    assert got == [("crash", "refused", "queue full"), ("broken", "failed", "DicomError"),
                   ("crash", "failed", "RuntimeError"), ("good", "ok", None)]
    assert listener.counts["rejected_associations"] == 1
    sr_files = list((tmp_path / "pacs" / "sr").glob("*.dcm"))
    good_uid = pydicom.dcmread(good[0]).StudyInstanceUID
    assert len(sr_files) == 1 and read_report(sr_files[0])["study_instance_uid"] == good_uid
    assert records[-1]["sent_to"] == orthanc.dicomweb
    assert [read_report(x)["sop_instance_uid"] for x in orthanc.sr_instances(good_uid)] == [
        records[-1]["sr_sop_instance_uid"]]


def test_undeliverable_sr_is_kept_and_logged(checkpoint, pydicom_files, tmp_path):
    port, dead = free_port(), free_port()  # nothing listens on ``dead``
    pipeline = ReportPipeline(checkpoint, ReportConfig(decoding=DecodingConfig(max_new_tokens=4)))
    listener = StudyListener(pipeline, ListenerConfig(port=port, allowed_aets=["SCU"], study_timeout_s=0.2,
                                                      out_dir=str(tmp_path / "pacs"),
                                                      forward_to=f"PACS@127.0.0.1:{dead}")).start()
    try:
        assert _store(port, _new_study(pydicom_files / "CT_small.dcm", tmp_path / "s")) == [0]
        assert listener.wait_idle(60)
    finally:
        listener.stop()
    (rec,) = [json.loads(x) for x in (tmp_path / "pacs" / "studies.jsonl").read_text().splitlines()]
    assert rec["outcome"] == "sr_not_delivered" and rec["error"] == "ConnectionError"
    assert read_report(rec["sr_file"])["sop_instance_uid"] == rec["sr_sop_instance_uid"]  # kept for a retry
