"""`medmm prepare dicom`: bad files are listed and skipped, series become volumes, shards carry no identifiers."""

import csv
import json
import shutil
import tarfile

import numpy as np
import pydicom
import pytest

from medmm.config import PreprocessConfig
from medmm.data.loaders import ImageLoader, VolumeLoader
from medmm.data.prepare_dicom import DicomPrepareOptions, prepare_dicom, read_shard_array
from medmm.io.deid import deidentify, remap_uid

PHI = {"PatientName": "Doe^Jane", "PatientID": "PID-987654", "PatientBirthDate": "19610415",
       "AccessionNumber": "ACC-55501", "InstitutionName": "St Example Hospital",
       "ReferringPhysicianName": "House^Gregory", "OtherPatientIDs": "MRN-424242"}


def _stamp(ds, study_uid):
    for k, v in PHI.items():
        setattr(ds, k, v)
    ds.StudyInstanceUID = study_uid
    ds.add_new(0x00091010, "LO", "private secret PID-987654")  # private tag


@pytest.fixture
def source(tmp_path, pydicom_files):
    src = tmp_path / "src"
    (src / "series").mkdir(parents=True)
    study = pydicom.uid.generate_uid()
    series = pydicom.uid.generate_uid()
    base = pydicom.dcmread(pydicom_files / "CT_small.dcm")
    order = [3, 0, 5, 1, 4, 2]
    for k in range(6):  # shuffled names, reversed InstanceNumber
        ds = base.copy()
        _stamp(ds, study)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, 3.0 * k]
        ds.InstanceNumber = 6 - k
        ds.save_as(src / "series" / f"x{order[k]}.dcm")
    single = pydicom.dcmread(pydicom_files / "MR_small.dcm")
    _stamp(single, study)
    single.save_as(src / "mr.dcm")
    burned = base.copy()
    _stamp(burned, study)
    burned.SeriesInstanceUID = pydicom.uid.generate_uid()
    burned.BurnedInAnnotation = "YES"
    burned.save_as(src / "burned.dcm")
    shutil.copy(pydicom_files / "MR_truncated.dcm", src / "truncated_pixels.dcm")
    raw = (pydicom_files / "CT_small.dcm").read_bytes()
    (src / "cut.dcm").write_bytes(raw[:600])  # header cut mid-element
    (src / "notes.txt").write_text("not a dicom file")
    reports = tmp_path / "reports.csv"
    with open(reports, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["accession", "report"])
        w.writerow(["ACC-55501", "No acute intracranial abnormality."])
    return src, reports, study, series


def test_prepare_lists_bad_files_and_writes_the_rest(tmp_path, source):
    src, reports, study, series = source
    out = tmp_path / "out"
    m = prepare_dicom(src, out, reports, DicomPrepareOptions(size_2d=32, size_3d=(8, 32, 32), workers=2, salt="s1",
                                                             eval_fraction=0))
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    bad = {e["path"].split("/")[-1]: e["error"] for e in errors}
    assert bad["notes.txt"] == "DicomError" and bad["cut.dcm"] == "DicomError"
    assert bad["truncated_pixels.dcm"] == "DicomError" and bad["burned.dcm"] == "BurnedInAnnotation"
    assert m["series"] == 2 and m["by_kind"] == {"volume": 1, "image": 1} and m["burned_in_skipped"] == 1
    recs = [json.loads(x) for x in (out / "report_train.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(r["conversations"][1]["value"].startswith("No acute") for r in recs)
    vol_ref = next(r["modalities"]["volume"] for r in recs if "volume" in r["modalities"])
    vol = read_shard_array(vol_ref, out)
    assert vol.shape == (8, 32, 32) and vol.dtype == np.float16
    # slices were ordered by position: the synthetic series has constant pixels per slice index? use means
    x = VolumeLoader(PreprocessConfig(volume_size=[8, 32, 32])).load(vol_ref, out)["x"]
    assert x.shape == (1, 8, 32, 32)
    img_ref = next(r["modalities"]["image"] for r in recs if "image" in r["modalities"])
    assert ImageLoader(PreprocessConfig(image_size=32)).load(img_ref, out)["x"].shape == (3, 32, 32)


def test_no_identifier_anywhere_in_the_output(tmp_path, source):
    src, reports, study, series = source
    out = tmp_path / "out"
    prepare_dicom(src, out, reports, DicomPrepareOptions(size_2d=32, size_3d=(8, 32, 32), salt="s1"))
    blobs = b""
    for p in out.rglob("*"):
        if p.is_file():
            blobs += p.read_bytes()
            if p.suffix == ".tar":
                with tarfile.open(p) as tf:
                    for member in tf.getmembers():
                        blobs += tf.extractfile(member).read()
    for value in [*PHI.values(), "Jane", "19610415", study, series]:
        assert value.encode() not in blobs, value
    again = tmp_path / "again"
    prepare_dicom(src, again, reports, DicomPrepareOptions(size_2d=32, size_3d=(8, 32, 32), salt="s1"))
    keys = lambda d: sorted(json.loads(x)["id"] for f in ("report_train.jsonl", "report_eval.jsonl")  # noqa: E731
                            for x in (d / f).read_text().splitlines())
    assert keys(out) == keys(again)  # same salt, same mapping


def test_deidentify_dataset(pydicom_files):
    ds = pydicom.dcmread(pydicom_files / "CT_small.dcm")
    _stamp(ds, "1.2.3.4")
    ds.StudyDate, ds.SeriesDate = "20200110", "20200112"
    info = deidentify(ds, "salt")
    assert ds.PatientID == info["patient_pseudonym"] != "PID-987654"
    assert "PatientBirthDate" not in ds or ds.PatientBirthDate == ""
    assert ds.AccessionNumber == "" and "InstitutionName" not in ds and "OtherPatientIDs" not in ds
    assert ds.StudyInstanceUID == remap_uid("salt", "1.2.3.4") and len(ds.StudyInstanceUID) <= 64
    assert ds.SOPClassUID == pydicom.dcmread(pydicom_files / "CT_small.dcm").SOPClassUID  # kept
    import datetime as dt

    d1, d2 = (dt.datetime.strptime(x, "%Y%m%d") for x in (ds.StudyDate, ds.SeriesDate))
    assert (d2 - d1).days == 2 and ds.StudyDate != "20200110"  # shifted, interval kept
    assert not any(e.tag.is_private for e in ds) and ds.PatientIdentityRemoved == "YES"


def test_real_tilted_head_ct_is_resampled(tmp_path, shared_data):
    out = tmp_path / "ct"
    m = prepare_dicom(shared_data / "dicom" / "ct_series_head_GE_tilt", out, None,
                      DicomPrepareOptions(window="brain", spacing=(4.0, 2.0, 2.0), size_3d=(16, 64, 64), salt="x"))
    assert m["by_kind"] == {"volume": 1} and m["files_rejected"] == 2  # the licence and readme files
    with tarfile.open(out / m["shards"][0]) as tf:
        meta = json.loads(next(tf.extractfile(x).read() for x in tf.getmembers() if x.name.endswith(".json")))
    assert meta["gantry_tilt_deg"] == pytest.approx(18.5, abs=1.0) and meta["uneven_spacing"]
    assert meta["slices"] == 28 and meta["resampled_to"] == [4.0, 2.0, 2.0]


def test_cli(tmp_path, source, capsys):
    from medmm.cli import main

    src, reports, *_ = source
    main(["prepare", "dicom", str(src), "--out", str(tmp_path / "cli"), "--reports", str(reports),
          "--size", "32:8,32,32", "--salt", "abc"])
    m = json.loads(capsys.readouterr().out)
    assert m["series"] == 2 and m["deidentified"]
