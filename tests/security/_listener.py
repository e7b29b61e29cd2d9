"""Helpers of the DIMSE listener probes (rows 4-7, DICOM TLS, the listener's audit log): crafted studies, a
pynetdicom C-STORE client (plain or TLS), an in-process listener on a free loopback port, and certificates made
with ``openssl`` at test time."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.security.conftest import free_port

AET = "MEDMM"
CALLER = "SCU"


def study_files(pydicom_files: Path, out_dir: Path, n: int = 1, name: str = "CT_small.dcm", **header) -> list[Path]:
    """``n`` instances of one fresh study (new Study/Series/SOP UIDs) made from a real pydicom test file, with
    ``header`` set as raw, unchecked values (what a crafted sender puts on the wire)."""
    from pydicom import config
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import DataElement

    ds = pydicom.dcmread(pydicom_files / name)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    for keyword, value in header.items():
        tag = tag_for_keyword(keyword)
        ds[tag] = DataElement(tag, dictionary_VR(tag), value, validation_mode=config.IGNORE)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    old = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        for i in range(n):
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = i + 1
            paths.append(out_dir / f"{i}.dcm")
            ds.save_as(paths[-1], enforce_file_format=True)
    finally:
        config.settings.writing_validation_mode = old
    return paths


def associate(port: int, aet: str = CALLER, tls=None):
    """A pynetdicom association with the listener (storage and verification contexts); ``tls``: an
    ``ssl.SSLContext`` for DICOM TLS."""
    from pynetdicom import AE, StoragePresentationContexts
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=aet)
    ae.requested_contexts = StoragePresentationContexts[:120]
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    return ae.associate("127.0.0.1", port, ae_title=AET, tls_args=(tls, "127.0.0.1") if tls is not None else None)


def store(port: int, paths: list[Path], aet: str = CALLER, tls=None) -> list[int]:
    """C-STORE ``paths`` in one association; their statuses ([] when the association was not established)."""
    assoc = associate(port, aet, tls)
    if not assoc.is_established:
        return []
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in paths]
    finally:
        assoc.release()


def wait(pred, timeout_s: float, what: str):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        res = pred()
        if res:
            return res
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def records(out: Path) -> list[dict]:
    path = out / "studies.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@contextlib.contextmanager
def listening(pipeline, out: Path, **cfg):
    """A :class:`StudyListener` on a free loopback port, in this process; yields ``(listener, port)``."""
    from medmm.serve.listener import ListenerConfig, StudyListener

    port = free_port()
    cfg = {"aet": AET, "port": port, "allowed_aets": [CALLER], "study_timeout_s": 0.2, "out_dir": str(out), **cfg}
    listener = StudyListener(pipeline, ListenerConfig(**cfg)).start()
    try:
        yield listener, port
    finally:
        listener.stop()


def make_certs(folder: Path) -> Path:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, both signed by the CA, and a
    second CA with a client certificate of its own (a stranger's), made with the ``openssl`` command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl command is missing (Debian package openssl)")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args):
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=folder, timeout=60)

    ext = folder / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for ca in ("ca", "other-ca"):
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
            "-subj", f"/CN=medmm test {ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.pem")
    for name, ca, extra in (("server", "ca", ["-extfile", "san.cnf"]), ("client", "ca", []),
                            ("stranger", "other-ca", [])):
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj",
            f"/CN=medmm test {name}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-days", "2", "-out", f"{name}.pem", *extra)
    return folder  # ca.pem, server.pem/.key, client.pem/.key, other-ca.pem, stranger.pem/.key
