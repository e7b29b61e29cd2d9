"""PACS integration against a real Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``, started here on loopback
ports with its own storage folder): DICOMweb pull-run-push, the DIMSE listener fed by dcmtk's ``storescu``,
calling AE titles, a bounded queue, and a failing study that does not stop the listener."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
import torch
from pydicom.uid import generate_uid

from medmm.cli import main as cli_main
from medmm.config import DecodingConfig, ModelConfig, config_from_dict
from medmm.model.multimodal import MedMMForCausalLM
from medmm.serve.dicom_sr import read_report
from medmm.serve.listener import OUT_OF_RESOURCES, ListenerConfig, StudyListener
from medmm.serve.study import ReportConfig, ReportPipeline
from medmm.training.distributed import free_port
from tests.conftest import REPO, model_dict
from tests.security._listener import records as _records
from tests.security._listener import wait as _wait

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # from the orthanc-dicomweb package


def _require(orthanc: bool = True, storescu: bool = False) -> None:
    """Fail (not skip) naming exactly what is missing and the Debian packages that provide it."""
    missing = []
    if orthanc and not Path(ORTHANC).exists():
        missing.append(("orthanc", f"the Orthanc server ({ORTHANC})"))
    if orthanc and not DICOMWEB_PLUGIN.exists():
        missing.append(("orthanc-dicomweb", f"Orthanc's DICOMweb plugin ({DICOMWEB_PLUGIN})"))
    if storescu and not shutil.which("storescu"):
        missing.append(("dcmtk", "dcmtk's storescu (not on PATH)"))
    if missing:
        pytest.fail("missing " + "; ".join(f"{what}, from the Debian package {pkg}" for pkg, what in missing)
                    + f". Install with: apt-get install -y {' '.join(pkg for pkg, _ in missing)}"
                    + " (.ci/run installs them before `make test`)")


class Orthanc:
    """A real Orthanc on loopback ports with its own storage folder; it can be stopped and started again
    (same ports, same storage), as a PACS that restarts."""

    aet = "ORTHANC"

    def __init__(self, folder: Path):
        _require(orthanc=True)
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        cfg = {"Name": "medmm-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
               "HttpPort": http_port, "DicomPort": self.dicom_port, "DicomAet": self.aet,
               "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [str(DICOMWEB_PLUGIN)],
               "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "DicomAlwaysAllowStore": True,
               "DicomCheckCalledAet": True}
        (folder / "orthanc.json").write_text(json.dumps(cfg))
        self.proc = None
        self.start()

    def _log_tail(self) -> str:
        return (self.folder / "orthanc.log").read_text(errors="replace")[-2000:]

    def start(self) -> None:
        import requests

        with open(self.folder / "orthanc.log", "a") as log:
            self.proc = subprocess.Popen([ORTHANC, str(self.folder / "orthanc.json")], stdout=log,
                                         stderr=subprocess.STDOUT)
        for _ in range(600):
            if self.proc.poll() is not None:
                pytest.fail(f"Orthanc exited ({self.proc.returncode}): {self._log_tail()}")
            try:
                if requests.get(f"{self.url}/system", timeout=1).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"Orthanc did not start within 60 s: {self._log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def upload(self, path: Path) -> None:
        import requests

        r = requests.post(f"{self.url}/instances", data=Path(path).read_bytes(), timeout=30)
        r.raise_for_status()

    def has_instance(self, sop_uid: str) -> bool:
        """Whether Orthanc stores ``sop_uid`` (its REST API, /tools/lookup)."""
        import requests

        r = requests.post(f"{self.url}/tools/lookup", data=sop_uid, timeout=30)
        r.raise_for_status()
        return any(x["Type"] == "Instance" for x in r.json())

    def sr_instances(self, study_uid: str) -> list:
        """The SR instances of a study, retrieved over WADO-RS."""
        from dicomweb_client.api import DICOMwebClient

        c = DICOMwebClient(self.dicomweb)
        found = c.search_for_instances(study_uid, search_filters={"Modality": "SR"})
        return [c.retrieve_instance(study_uid, f["0020000E"]["Value"][0], f["00080018"]["Value"][0]) for f in found]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc"))
    yield pacs
    pacs.stop()


@pytest.fixture
def own_orthanc(tmp_path):
    """An Orthanc of this test alone (the test stops and starts it)."""
    pacs = Orthanc(tmp_path / "orthanc")
    yield pacs
    pacs.stop()


@pytest.fixture
def storescu():
    _require(orthanc=False, storescu=True)
    return shutil.which("storescu")


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


def test_listen_storescu_sr_reaches_orthanc(orthanc, storescu, checkpoint, pydicom_files, tmp_path):
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
        rejected = subprocess.run([storescu, "-aet", "INTRUDER", "-aec", "MEDMM", "127.0.0.1", str(port),
                                   str(study[0])], capture_output=True, text=True, timeout=60)
        assert rejected.returncode != 0 and "Calling AE Title Not Recognized" in rejected.stdout + rejected.stderr
        sent = subprocess.run([storescu, "-aet", "CT01", "-aec", "MEDMM", "127.0.0.1", str(port), *map(str, study)],
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

    def run_many(self, *args, **kwargs):
        return self.inner.run_many(*args, **kwargs)


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
                                                      out_dir=str(tmp_path / "pacs"), retry_s=1.0,
                                                      forward_to=f"PACS@127.0.0.1:{dead}")).start()
    try:
        assert _store(port, _new_study(pydicom_files / "CT_small.dcm", tmp_path / "s")) == [0]
        assert listener.wait_idle(60)
    finally:
        listener.stop()
    (rec,) = [json.loads(x) for x in (tmp_path / "pacs" / "studies.jsonl").read_text().splitlines()]
    assert rec["outcome"] == "sr_not_delivered" and rec["error"] == "ConnectionError"
    assert rec["send_attempts"] >= 2  # retried before giving up
    assert read_report(rec["sr_file"])["sop_instance_uid"] == rec["sr_sop_instance_uid"]
    kept = tmp_path / "pacs" / "undelivered" / f"{rec['sr_sop_instance_uid']}.dcm"  # waiting for `pacs resend`
    assert rec["kept_in"] == str(kept) and read_report(kept)["sop_instance_uid"] == rec["sr_sop_instance_uid"]


class _LogEvent(logging.Handler):
    """Sets ``event`` when a record on ``logger`` contains ``text`` (here: a delivery is being retried)."""

    def __init__(self, logger: str, text: str):
        super().__init__(logging.WARNING)
        self.text, self.event, self.logger = text, threading.Event(), logging.getLogger(logger)

    def emit(self, record):
        if self.text in record.getMessage():
            self.event.set()

    def __enter__(self):
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)


@pytest.mark.parametrize("via", ["stow-rs", "c-store"])
def test_sr_delivery_retries_until_orthanc_is_back(via, own_orthanc, checkpoint, pydicom_files, tmp_path):
    pacs = own_orthanc
    forward = pacs.dicomweb if via == "stow-rs" else f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}"
    gate = _Gate(ReportPipeline(checkpoint, ReportConfig(decoding=DecodingConfig(max_new_tokens=4))))
    port = free_port()
    listener = StudyListener(gate, ListenerConfig(port=port, allowed_aets=["SCU"], study_timeout_s=0.2,
                                                  out_dir=str(tmp_path / "pacs"), forward_to=forward,
                                                  retry_s=300)).start()
    study = _new_study(pydicom_files / "CT_small.dcm", tmp_path / "s")
    try:
        with _LogEvent("medmm.pacs", "retrying") as retrying:
            assert _store(port, study) == [0]
            assert gate.entered.wait(60)  # the SR is being made ...
            pacs.stop()  # ... and the PACS goes down before it is delivered
            gate.open.set()
            assert retrying.event.wait(120), "the failed delivery was not retried"
            pacs.start()  # back within the retry window
            assert listener.wait_idle(300)
    finally:
        listener.stop()
    (rec,) = [json.loads(x) for x in (tmp_path / "pacs" / "studies.jsonl").read_text().splitlines()]
    assert rec["outcome"] == "ok" and rec["sent_to"] == forward and rec["send_attempts"] >= 2, rec
    assert pacs.has_instance(rec["sr_sop_instance_uid"])
    assert not (tmp_path / "pacs" / "undelivered").exists()


def test_second_burst_amends_the_first_report(orthanc, checkpoint, pydicom_files, tmp_path):
    """Two bursts of one study further apart than the study timeout: one report lineage."""
    study = _new_study(pydicom_files / "CT_small.dcm", tmp_path / "study", n=3)
    src = [pydicom.dcmread(p) for p in study]
    port, out = free_port(), tmp_path / "pacs"
    pipeline = ReportPipeline(checkpoint, ReportConfig(decoding=DecodingConfig(max_new_tokens=4)))
    listener = StudyListener(pipeline, ListenerConfig(port=port, allowed_aets=["SCU"], study_timeout_s=0.2,
                                                      out_dir=str(out), forward_to=orthanc.dicomweb)).start()
    try:
        assert _store(port, study[:1]) == [0]
        assert listener.wait_idle(120)
        assert _store(port, study[1:]) == [0, 0]  # the second burst, after the first SR was made
        assert listener.wait_idle(120)
    finally:
        listener.stop()
    first, second = _records(out)
    assert (first["outcome"], first["instances"], first["study_instances"], first["predecessor_sr"]) == (
        "ok", 1, 1, None)
    assert (second["outcome"], second["instances"], second["study_instances"]) == ("ok", 2, 3)
    assert second["predecessor_sr"] == first["sr_sop_instance_uid"] != second["sr_sop_instance_uid"]

    back = pydicom.dcmread(second["sr_file"])  # the amended SR, read back with pydicom
    (pre_study,) = back.PredecessorDocumentsSequence
    assert pre_study.StudyInstanceUID == src[0].StudyInstanceUID
    (pre_series,) = pre_study.ReferencedSeriesSequence
    first_sr = pydicom.dcmread(first["sr_file"])
    assert pre_series.SeriesInstanceUID == first_sr.SeriesInstanceUID
    (pre,) = pre_series.ReferencedSOPSequence
    assert (pre.ReferencedSOPClassUID, pre.ReferencedSOPInstanceUID) == (first_sr.SOPClassUID,
                                                                         first["sr_sop_instance_uid"])
    assert sorted(read_report(back)["evidence_sop_instance_uids"]) == sorted(d.SOPInstanceUID for d in src)
    assert read_report(first_sr)["evidence_sop_instance_uids"] == [src[0].SOPInstanceUID]
    # both are in the PACS, the newer one naming the older
    in_pacs = {r["sop_instance_uid"]: r for r in map(read_report, orthanc.sr_instances(src[0].StudyInstanceUID))}
    assert in_pacs.keys() == {first["sr_sop_instance_uid"], second["sr_sop_instance_uid"]}
    assert in_pacs[second["sr_sop_instance_uid"]]["predecessor_sop_instance_uids"] == [first["sr_sop_instance_uid"]]
    assert not any((out / "spool").iterdir())  # received instances do not outlive the listener


def test_lineage_outlives_the_instances_and_a_restart(checkpoint, pydicom_files, tmp_path):
    study = _new_study(pydicom_files / "MR_small.dcm", tmp_path / "study", n=3)
    out = tmp_path / "pacs"
    pipeline = ReportPipeline(checkpoint, ReportConfig(decoding=DecodingConfig(max_new_tokens=4)))

    def listener():
        port = free_port()
        cfg = ListenerConfig(port=port, allowed_aets=["SCU"], study_timeout_s=0.2, out_dir=str(out),
                             amend_window_s=0.0)  # instances are let go as soon as the SR is made
        return port, StudyListener(pipeline, cfg).start()

    port, lis = listener()
    try:
        assert _store(port, study[:1]) == [0]
        _wait(lambda: (out / "studies.jsonl").exists() and not any((out / "spool").iterdir()), 120,
              "the first SR and its instances deleted")
        assert _store(port, study[1:2]) == [0]
        _wait(lambda: len(_records(out)) == 2, 120, "the second SR")
    finally:
        lis.stop()
    port, lis = listener()  # a restarted listener finds the lineage in studies.jsonl
    try:
        assert _store(port, study[2:]) == [0]
        _wait(lambda: len(_records(out)) == 3, 120, "the third SR")
    finally:
        lis.stop()
    recs = _records(out)
    assert [r["outcome"] for r in recs] == ["ok"] * 3
    assert [r["study_instances"] for r in recs] == [1, 1, 1]  # made from what was still held
    assert recs[0]["predecessor_sr"] is None
    assert recs[1]["predecessor_sr"] == recs[0]["sr_sop_instance_uid"]
    assert recs[2]["predecessor_sr"] == recs[1]["sr_sop_instance_uid"]
    assert read_report(recs[2]["sr_file"])["predecessor_sop_instance_uids"] == [recs[1]["sr_sop_instance_uid"]]


def test_pull_run_push_twice_amends(orthanc, checkpoint, pydicom_files, tmp_path, capsys):
    (path,) = _new_study(pydicom_files / "MR_small.dcm", tmp_path / "s")
    orthanc.upload(path)
    study_uid = pydicom.dcmread(path).StudyInstanceUID
    printed = []
    for _ in range(2):
        cli_main(["pacs", "pull-run-push", "--dicomweb", orthanc.dicomweb, "--study", study_uid,
                  "--checkpoint", str(checkpoint), "--max-new-tokens", "4", "--retry-seconds", "5"])
        printed.append(json.loads(capsys.readouterr().out))
    assert printed[0]["predecessor_sr"] is None
    assert printed[1]["predecessor_sr"] == printed[0]["sr_sop_instance_uid"]
    assert printed[1]["retrieved_instances"] == 2  # the image and the first SR
    reports = {r["sop_instance_uid"]: r for r in map(read_report, orthanc.sr_instances(study_uid))}
    assert reports[printed[1]["sr_sop_instance_uid"]]["predecessor_sop_instance_uids"] == [
        printed[0]["sr_sop_instance_uid"]]


def _kept_srs(pipeline, pydicom_files, folder: Path, n: int) -> list:
    """``n`` SRs as the listener keeps them when they cannot be delivered: files in ``folder``."""
    folder.mkdir(parents=True)
    srs = []
    for i in range(n):
        (path,) = _new_study(pydicom_files / "CT_small.dcm", folder.parent / f"src{i}")
        sr = pipeline.run(path).sr
        sr.save_as(folder / f"{sr.SOPInstanceUID}.dcm", enforce_file_format=True)
        srs.append(sr)
    return srs


@pytest.mark.parametrize("via", ["stow-rs", "c-store"])
def test_resend_delivers_kept_srs(via, orthanc, checkpoint, pydicom_files, tmp_path, capsys):
    pipeline = ReportPipeline(checkpoint, ReportConfig(decoding=DecodingConfig(max_new_tokens=4)))
    kept = tmp_path / "undelivered"
    srs = _kept_srs(pipeline, pydicom_files, kept, 2)
    to = orthanc.dicomweb if via == "stow-rs" else f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"
    assert not any(orthanc.has_instance(sr.SOPInstanceUID) for sr in srs)
    cli_main(["pacs", "resend", str(kept), "--to", to, "--retry-seconds", "5"])  # returns: exit status 0
    res = json.loads(capsys.readouterr().out)
    assert (res["delivered"], res["failed"], res["to"]) == (2, 0, to)
    for sr in srs:
        assert orthanc.has_instance(sr.SOPInstanceUID)  # it arrived (Orthanc's REST API)
        assert not (kept / f"{sr.SOPInstanceUID}.dcm").exists()
        assert (kept / "delivered" / f"{sr.SOPInstanceUID}.dcm").exists()  # marked: moved aside
    assert {f["sop_instance_uid"] for f in res["files"]} == {sr.SOPInstanceUID for sr in srs}


def test_resend_failure_exits_nonzero_and_keeps_the_files(checkpoint, pydicom_files, tmp_path, capsys):
    pipeline = ReportPipeline(checkpoint, ReportConfig(decoding=DecodingConfig(max_new_tokens=4)))
    kept = tmp_path / "undelivered"
    srs = _kept_srs(pipeline, pydicom_files, kept, 2)
    (kept / "broken.dcm").write_bytes(b"not DICOM")
    with pytest.raises(SystemExit) as e:
        cli_main(["pacs", "resend", str(kept), "--to", f"PACS@127.0.0.1:{free_port()}", "--retry-seconds", "1"])
    assert e.value.code == 1
    res = json.loads(capsys.readouterr().out)
    assert (res["delivered"], res["failed"]) == (0, 3)
    errors = {Path(f["file"]).name: f["error"] for f in res["files"]}
    assert errors == {"broken.dcm": "DicomError", **{f"{sr.SOPInstanceUID}.dcm": "ConnectionError" for sr in srs}}
    assert sorted(p.name for p in kept.iterdir()) == sorted(errors)  # all still waiting, nothing moved aside
    first, second = (f["attempts"] for f in res["files"] if f["error"] == "ConnectionError")
    assert first >= 2 and second == 1  # retried once for the window, then the destination counts as down
    with pytest.raises(SystemExit, match="no such file"):
        cli_main(["pacs", "resend", str(tmp_path / "nowhere"), "--to", f"PACS@127.0.0.1:{free_port()}"])


def test_listener_reports_waiting_studies_in_one_batch(checkpoint, pydicom_files, tmp_path):
    """Studies that queue up while the worker is busy are reported together (one batched generate), with the
    answers they get one by one; a corrupt study fails alone; a second burst of a study waits for the next batch."""
    pipeline = ReportPipeline(checkpoint, ReportConfig(decoding=DecodingConfig(max_new_tokens=8)))
    gate = _Gate(pipeline)
    port, out = free_port(), tmp_path / "pacs"
    listener = StudyListener(gate, ListenerConfig(port=port, allowed_aets=["SCU"], study_timeout_s=0.2, max_queue=8,
                                                  max_batch=8, out_dir=str(out))).start()
    first = _new_study(pydicom_files / "CT_small.dcm", tmp_path / "first")
    two = _new_study(pydicom_files / "MR_small.dcm", tmp_path / "two", n=2)
    ct = _new_study(pydicom_files / "CT_small.dcm", tmp_path / "ct")
    broken = _new_study(pydicom_files / "CT_small.dcm", tmp_path / "broken", truncate_pixels=True)
    mr = _new_study(pydicom_files / "MR_small.dcm", tmp_path / "mr")
    try:
        assert _store(port, first) == [0]
        assert gate.entered.wait(60)  # the worker holds the first study at the gate; the others queue up
        for k, paths in enumerate((two[:1], ct, broken, mr)):
            assert _store(port, paths) == [0]
            _wait(lambda k=k: listener._queue.qsize() == k + 1, 60, f"study {k + 1} queued")
        assert _store(port, two[1:]) == [0]  # a second burst of a queued study
        _wait(lambda: listener._queue.qsize() == 5, 60, "the second burst queued")
        gate.open.set()
        assert listener.wait_idle(120)
    finally:
        listener.stop()
    uid = {pydicom.dcmread(p[0]).StudyInstanceUID: k for k, p in (("first", first), ("two", two), ("ct", ct),
                                                                   ("broken", broken), ("mr", mr))}
    recs = _records(out)
    assert [(uid[r["study_instance_uid"]], r["outcome"], r.get("error"), r["batch_size"]) for r in recs] == [
        ("first", "ok", None, 1), ("two", "ok", None, 4), ("ct", "ok", None, 4), ("broken", "failed", "DicomError", 4),
        ("mr", "ok", None, 4), ("two", "ok", None, 1)]
    assert listener.batch_sizes == {1: 2, 4: 1}
    infer = {r["sr_sop_instance_uid"]: next(s for s in r["steps"] if s["op"] == "infer") for r in recs if "steps" in r}
    assert [(s["batch"], s["generate_batch"]) for s in infer.values()] == [(1, 1), (4, 3), (4, 3), (4, 3), (1, 1)]
    assert recs[5]["predecessor_sr"] == recs[1]["sr_sop_instance_uid"]  # the later burst amends, in order
    assert recs[1]["study_instances"] == recs[5]["study_instances"] == 2
    # batched answers equal the answers the same studies get one by one (greedy)
    for r, paths in ((recs[1], two), (recs[2], ct), (recs[4], mr)):
        assert read_report(r["sr_file"])["text"] == pipeline.run(paths).text
