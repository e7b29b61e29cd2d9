"""The listener's audit log (``--audit-log FILE``): one JSON line per association and per C-STORE/C-ECHO with
``time``, ``calling_ae``, ``endpoint``, ``status``, ``bytes``, ``duration_s``; never a header value, never a UID;
the file is created 0600."""

import json
import os
import socket
import stat
import struct

import pydicom
import pytest

from tests.security._listener import associate, listening, records, store, study_files, wait

pytestmark = pytest.mark.integration
KEYS = {"time", "calling_ae", "endpoint", "status", "bytes", "duration_s"}


def test_audit_log_has_one_line_per_association_and_message(sec_pipeline, pydicom_files, tmp_path):
    out, audit = tmp_path / "pacs", tmp_path / "audit" / "dimse.jsonl"
    study = study_files(pydicom_files, tmp_path / "study", n=2, PatientName="SECRET^NAME",
                        PatientBirthDate="19800101")
    old_umask = os.umask(0o022)
    try:
        with listening(sec_pipeline, out, audit_log=str(audit)) as (listener, port):
            assert store(port, study[:1], aet="INTRUDER") == []  # rejected: not an allowed caller
            assoc = associate(port)
            assert int(assoc.send_c_echo().Status) == 0
            assoc.release()
            assert store(port, study) == [0, 0]
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # a 4 GiB A-ASSOCIATE-RQ
                s.sendall(struct.pack(">BBL", 1, 0, 0xFFFFFFFF))
                assert s.recv(1) == b""
            wait(lambda: records(out), 60, "the study's record")
            wait(lambda: len(audit.read_text().splitlines()) >= 7, 10, "seven audit lines")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600
    text = audit.read_text()
    lines = [json.loads(x) for x in text.splitlines()]
    assert all(KEYS <= line.keys() for line in lines)
    got = sorted((x["endpoint"], x["status"], x["calling_ae"]) for x in lines)
    assert got == [("A-ASSOCIATE", "refused-pdu-length", None), ("A-ASSOCIATE", "rejected", "INTRUDER"),
                   ("A-ASSOCIATE", "released", "SCU"), ("A-ASSOCIATE", "released", "SCU"),
                   ("C-ECHO", "0x0000", "SCU"), ("C-STORE", "0x0000", "SCU"), ("C-STORE", "0x0000", "SCU")]
    stores = [x for x in lines if x["endpoint"] == "C-STORE"]
    assert all(x["bytes"] > 1000 and x["duration_s"] >= 0 for x in stores)
    big = next(x for x in lines if x["status"] == "refused-pdu-length")
    assert big["bytes"] == 6  # the header alone was read
    ds = pydicom.dcmread(study[0])
    for value in ("SECRET", "19800101", ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
        assert value not in text
