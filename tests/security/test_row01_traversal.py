"""Row 1: DICOM UIDs that are paths (``../../x``, absolute, an existing ``*.dcm``) must not choose where the study
pipeline writes. Before the fix, ``load_study`` named each series link ``<SOPInstanceUID>.dcm``: the HTTP upload
and the WADO-RS pull created symlinks outside their folders and overwrote an existing file with the upload.

Both entry points are attacked for real: ``POST /v1/studies/report`` on uvicorn, and ``pull_run_push`` against a
real Orthanc holding the crafted study (its DICOMweb plugin serves the UIDs as they are).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import pytest

from tests.security._studies import ct, post_study, snapshot, to_bytes

pytestmark = pytest.mark.integration


def _targets(root: Path) -> dict[str, str]:
    """UIDs an attacker would send, aimed at ``root``: relative traversal, absolute, and an existing file."""
    (root / "rel").mkdir()
    (root / "abs").mkdir()
    victim = root / "victim.dcm"
    victim.write_bytes(b"precious PACS object\n")
    up = "../" * 24  # more than enough to reach / from any temporary folder
    return {"relative": f"{up}{str(root / 'rel' / 'PWNED').lstrip('/')}", "absolute": str(root / "abs" / "PWNED"),
            "existing": str(victim.with_suffix(""))}


def _study(pydicom_files: Path, sop_uid: str, series_uid: str | None = None):
    ds = ct(pydicom_files)
    with warnings.catch_warnings():  # pydicom warns (quoting it) that a path is no UID: that is the attack
        warnings.simplefilter("ignore")
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        if series_uid is not None:
            ds.SeriesInstanceUID = series_uid
    return ds


def _assert_untouched(root: Path, before: dict) -> None:
    after = snapshot(root)
    links = [p for p, v in after.items() if v[0] == "link"]
    assert not links, f"symlinks appeared outside the upload folder: {links}"
    assert after == before, f"files changed outside the upload folder: {set(after.items()) ^ set(before.items())}"
    victim = root / "victim.dcm"
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == hashlib.sha256(b"precious PACS object\n").hexdigest()


def test_http_upload_with_path_uids_writes_nothing_outside(api_url, pydicom_files, tmp_path):
    targets = _targets(tmp_path)
    before = snapshot(tmp_path)
    for kind, uid in targets.items():
        for series_uid in (None, uid):  # the SOP UID alone, then the Series UID too
            r = post_study(api_url, to_bytes(_study(pydicom_files, uid, series_uid)))
            assert r.status_code in (200, 422), (kind, r.status_code, r.text)
            assert str(tmp_path) not in r.text and "/tmp" not in r.text, kind  # no paths echoed back
            _assert_untouched(tmp_path, before)
    # two instances of one series sharing a (valid) SOP UID: neither may replace the other's file
    a = _study(pydicom_files, "1.2.3.4")
    b = _study(pydicom_files, "1.2.3.4")
    b.StudyInstanceUID, b.SeriesInstanceUID = a.StudyInstanceUID, a.SeriesInstanceUID
    r = post_study(api_url, to_bytes(a), to_bytes(b))
    assert r.status_code == 200, r.text
    _assert_untouched(tmp_path, before)


def test_wado_rs_pull_with_path_uids_writes_nothing_outside(sec_pipeline, pydicom_files, tmp_path):
    from medmm.errors import DicomError
    from medmm.serve.dicomweb import pull_run_push
    from tests.test_pacs import Orthanc

    root = tmp_path / "victims"
    root.mkdir()
    targets = _targets(root)
    pacs = Orthanc(tmp_path / "orthanc")
    try:
        studies = []
        for uid in targets.values():
            ds = _study(pydicom_files, uid)
            path = tmp_path / "upload.dcm"
            path.write_bytes(to_bytes(ds))
            pacs.upload(path)
            studies.append(ds.StudyInstanceUID)
        before = snapshot(root)
        for study_uid in studies:
            try:
                pull_run_push(pacs.dicomweb, study_uid, sec_pipeline, push=False)
            except DicomError:
                pass  # refusing the instance is fine; writing outside its folder is not
            _assert_untouched(root, before)
    finally:
        pacs.stop()


def test_series_files_are_named_by_index_inside_the_work_folder(pydicom_files, tmp_path):
    """Whatever the UIDs, the chain's files are ``series/<n>/<index>.dcm`` inside the work folder; two instances
    sharing a SOP Instance UID get two files; a UID that is a path only gets its file rejected (attribute named,
    value not echoed)."""
    from medmm.serve.study import load_study

    src = tmp_path / "in"
    src.mkdir()
    a, b = _study(pydicom_files, "1.2.3.4"), _study(pydicom_files, "1.2.3.4")
    b.StudyInstanceUID, b.SeriesInstanceUID = a.StudyInstanceUID, a.SeriesInstanceUID
    c = _study(pydicom_files, "../../../../" + str(tmp_path / "PWNED").lstrip("/"))
    c.StudyInstanceUID, c.SeriesInstanceUID = a.StudyInstanceUID, a.SeriesInstanceUID
    for name, ds in (("a.dcm", a), ("b.dcm", b), ("c.dcm", c)):
        (src / name).write_bytes(to_bytes(ds))
    work = tmp_path / "work"
    study = load_study(src, work)
    links = [i.link for s in study.series for i in s.instances]
    assert [p.relative_to(work.resolve()).as_posix() for p in links] == ["series/000/000000.dcm",
                                                                          "series/000/000001.dcm"]
    assert len(study.rejected) == 1 and study.rejected[0]["message"].startswith("SOPInstanceUID is ")
    assert "PWNED" not in study.rejected[0]["message"]
    assert not (tmp_path / "PWNED.dcm").exists() and not list(tmp_path.glob("**/PWNED*"))
