"""Row 4: an invalid header value (``PatientBirthDate="1980-02-31SECRETDOB"``) must give a typed 4xx or a report
with a documented fallback, never a 500, and the value must reach no log line, error message, error record or
answer. Before the fix the HTTP API answered 500, and pydicom's warning and the traceback logged the raw value.

The HTTP attack goes through real uvicorn (in this process, so ``caplog`` and ``capfd`` see every server log line
and everything written to stderr); the per-file reader and the SR writer are attacked directly too.
"""

from __future__ import annotations

import io
import logging
import warnings

import pydicom
import pytest

from medmm.io.dicom import read_dicom
from medmm.serve.dicom_sr import AlgorithmInfo, build_report_sr
from tests.security._studies import ct, post_study, set_raw, to_bytes

pytestmark = pytest.mark.integration
SECRET = "SECRETDOB"
# the same secret in every text VR the SR copies from the source: dates, times, names, ages, codes, free text
BAD_VALUES = {
    "PatientBirthDate": f"1980-02-31{SECRET}",
    "StudyDate": f"2021-13-45{SECRET}",
    "StudyTime": f"25:61{SECRET}",
    "PatientBirthTime": f"99{SECRET}",
    "PatientAge": f"042Y{SECRET}",
    "PatientSex": f"X{SECRET}",
    "PatientSize": f"1.8m{SECRET}",
    "PatientWeight": f"{SECRET}",
    "ReferringPhysicianName": f"A^B^C^D^E^F={SECRET}==",
}


def _bad(pydicom_files, **extra):
    ds = ct(pydicom_files)
    for k, v in {**BAD_VALUES, **extra}.items():
        set_raw(ds, k, v)
    return ds


def _no_secret(where: str, text: str) -> None:
    assert SECRET not in text, f"the raw header value reached {where}"


@pytest.fixture
def every_log(caplog):
    caplog.set_level(logging.DEBUG)  # every logger, every level: pydicom, medmm, uvicorn
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caplog, caught


def test_http_bad_header_values_never_500_and_never_logged(api_url, pydicom_files, every_log, capfd):
    caplog, caught = every_log
    blob = to_bytes(_bad(pydicom_files))
    r = post_study(api_url, blob)
    assert r.status_code in (200, 422), (r.status_code, r.text)
    _no_secret("the JSON answer", r.text)
    if r.status_code == 200:
        steps = {s["op"]: s for s in r.json()["steps"]}
        assert "PatientBirthDate" in steps["write_sr"]["fallbacks"]  # the keyword is recorded, not the value
        sr = post_study(api_url, blob, params={"format": "sr"})
        assert sr.status_code == 200
        assert SECRET.encode() not in sr.content, "the SR carries the invalid value"
    out = capfd.readouterr()
    for rec in caplog.records:
        _no_secret(f"the log ({rec.name})", rec.getMessage() + (rec.exc_text or ""))
    _no_secret("stderr", out.err)
    _no_secret("stdout", out.out)
    for w in caught:
        _no_secret("a warning", str(w.message))


def test_per_file_reader_and_sr_writer_keep_the_value_out(pydicom_files, tmp_path, every_log, capfd):
    caplog, caught = every_log
    path = tmp_path / "bad.dcm"
    path.write_bytes(to_bytes(_bad(pydicom_files, StudyInstanceUID=f"1.2.{SECRET}")))
    img = read_dicom(path)  # the image itself is fine: invalid identifying values are not needed to read it
    _no_secret("read_dicom's metadata", repr(img.meta))
    assert {f["attribute"] for f in img.meta["fallbacks"]} >= {"StudyInstanceUID", "StudyDate"}

    ds = _bad(pydicom_files)
    algorithm = AlgorithmInfo(name="medmm/test", version="0", uid="2.25.1", fingerprint="0" * 64)
    fallbacks: list[dict] = []
    sr = build_report_sr([ds], [ds], "no finding", "Describe.", algorithm, fallbacks=fallbacks)
    written = io.BytesIO()
    sr.save_as(written, enforce_file_format=True)
    assert SECRET.encode() not in written.getvalue(), "the SR carries an invalid value"
    assert {f["attribute"] for f in fallbacks} >= set(BAD_VALUES)
    _no_secret("the SR fallbacks", repr(fallbacks))
    back = pydicom.dcmread(io.BytesIO(written.getvalue()))
    assert back.PatientName == ds.PatientName and back.PatientID == ds.PatientID  # valid values still copied
    assert "PatientBirthDate" in back and back.PatientBirthDate == ""  # type 2: present, empty

    out = capfd.readouterr()
    for rec in caplog.records:
        _no_secret(f"the log ({rec.name})", rec.getMessage() + (rec.exc_text or ""))
    _no_secret("stderr", out.err + out.out)
    for w in caught:
        _no_secret("a warning", str(w.message))
