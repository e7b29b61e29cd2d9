"""Row 4, the listener's side: header values sent by C-STORE (a birth date ``1980-02-31SECRETDOB``, a patient
name, a malformed Series Instance UID, a made-up Modality) stay out of ``studies.jsonl`` and out of the log; the
Study Instance UID, validated, is still recorded."""

import logging
import warnings

import pytest

from tests.security._listener import listening, records, store, study_files

pytestmark = pytest.mark.integration
SECRET = "SECRET"


def test_header_values_stay_out_of_studies_jsonl_and_the_log(sec_pipeline, pydicom_files, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    bad_date = study_files(pydicom_files, tmp_path / "a", PatientBirthDate="1980-02-31SECRETDOB",
                           PatientName="SECRET^NAME")
    bad_series = study_files(pydicom_files, tmp_path / "b", SeriesInstanceUID="1.2.SECRETSERIES",
                             Modality="SECRETMOD", PatientID="SECRETID")
    out = tmp_path / "pacs"
    with warnings.catch_warnings(record=True) as caught, listening(sec_pipeline, out) as (listener, port):
        warnings.simplefilter("always")
        assert store(port, bad_date) == [0]
        assert store(port, bad_series) == [0]
        assert listener.wait_idle(120)
    text = (out / "studies.jsonl").read_text()
    recs = records(out)
    assert len(recs) == 2 and all(r["outcome"] in ("ok", "failed") for r in recs), text
    import pydicom

    assert [r["study_instance_uid"] for r in recs] == [pydicom.dcmread(p[0]).StudyInstanceUID
                                                        for p in (bad_date, bad_series)]  # validated UIDs stay
    assert SECRET not in text
    assert SECRET not in caplog.text
    assert not [str(w.message) for w in caught if SECRET in str(w.message)]
