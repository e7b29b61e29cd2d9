"""The study -> SR chain: series selection, the written Comprehensive SR reads back with its references,
patient module, algorithm identification and flags; typed errors for studies that cannot be reported."""

import copy
import json

import pydicom
import pytest
import torch
from pydicom.uid import generate_uid

from medmm.cli import main as cli_main
from medmm.config import DecodingConfig, ModelConfig, config_from_dict
from medmm.errors import DicomError
from medmm.model.multimodal import MedMMForCausalLM
from medmm.serve.dicom_sr import PATIENT_KEYWORDS, algorithm_info, clean_text, read_report
from medmm.serve.study import ReportConfig, ReportPipeline, load_study, select_series
from tests.conftest import model_dict


@pytest.fixture(scope="module")
def checkpoint(tiny_llm, tmp_path_factory):
    torch.manual_seed(0)
    m = MedMMForCausalLM.from_config(config_from_dict(ModelConfig, model_dict(tiny_llm)))
    return m.save_pretrained(tmp_path_factory.mktemp("ckpt") / "model")


@pytest.fixture(scope="module")
def pipeline(checkpoint):
    return ReportPipeline(checkpoint, ReportConfig(decoding=DecodingConfig(max_new_tokens=8)))


def test_sr_reads_back_with_references_patient_and_algorithm(pipeline, pydicom_files, tmp_path):
    src = pydicom.dcmread(pydicom_files / "CT_small.dcm")
    res = pipeline.run(pydicom_files / "CT_small.dcm")
    path = tmp_path / "sr.dcm"
    res.sr.save_as(path, enforce_file_format=True)

    back = pydicom.dcmread(path)  # a plain DICOM reader sees a Comprehensive SR in the source study
    assert back.SOPClassUID == pydicom.uid.ComprehensiveSRStorage and back.Modality == "SR"
    assert back.StudyInstanceUID == src.StudyInstanceUID
    assert back.SeriesInstanceUID != src.SeriesInstanceUID  # a new series in the same study
    for kw in PATIENT_KEYWORDS:  # the patient module, as in the source
        if kw in src:
            assert back[kw].value == src[kw].value, kw
    assert back.PatientName == "CompressedSamples^CT1" and back.PatientID == src.PatientID
    r = read_report(path)
    assert (r["verification_flag"], r["completion_flag"], r["preliminary_flag"]) == ("UNVERIFIED", "COMPLETE",
                                                                                   "PRELIMINARY")
    assert r["text"] == res.text and r["question"] == "Describe the findings."
    assert r["referenced_sop_instance_uids"] == [src.SOPInstanceUID]
    assert r["evidence_sop_instance_uids"] == [src.SOPInstanceUID]
    alg = algorithm_info(pipeline.predictor.checkpoint)
    assert r["algorithm"]["name"] == alg.name and r["algorithm"]["version"] == alg.version
    assert r["device_observer_uid"] == alg.uid  # same weights, same UID
    assert "strategy=greedy" in r["algorithm"]["parameters"] and "max_new_tokens=8" in r["algorithm"]["parameters"]
    assert back.SoftwareVersions == alg.version

    import highdicom as hd

    sr = hd.sr.srread(path)  # highdicom parses its content tree too
    assert isinstance(sr, hd.sr.ComprehensiveSR)

    # the audit trail: one entry per operator, UIDs and counts, no patient identifiers
    ops = [s["op"] for s in res.record["steps"]]
    assert ops == ["load_study", "select_series", "infer", "write_sr"]
    text = json.dumps(res.record)
    assert src.PatientID not in text and "CompressedSamples" not in text


def test_series_selection_volume_and_image(checkpoint, pipeline, shared_data, pydicom_files, tmp_path):
    series = shared_data / "dicom" / "ct_series_head_GE_tilt"
    n = len(list(series.glob("*.dcm")))
    study = load_study(series, tmp_path / "a")
    cfg = pipeline.predictor.model.config
    sel = select_series(study, cfg, ReportConfig())
    assert (sel.loader, sel.modality, len(sel.instances)) == ("volume", "volume", n)
    positions = [i.position for i in sel.instances]
    assert positions == sorted(positions)  # ordered along the slice normal
    # the same series with a higher threshold goes through the image modality: the middle slice only
    sel = select_series(study, cfg, ReportConfig(min_volume_slices=n + 1))
    middle = sorted(sel.series.images, key=lambda i: i.position)[n // 2]
    assert sel.loader == "image" and sel.instances == [middle]
    res = pipeline.run(series)
    assert len(read_report(res.sr)["referenced_sop_instance_uids"]) == n
    # a series filter that matches nothing is an error naming the study
    with pytest.raises(DicomError, match="no image series"):
        select_series(load_study(pydicom_files / "CT_small.dcm", tmp_path / "b"), cfg,
                      ReportConfig(series_modalities=["MR"]))


def test_studies_that_cannot_be_reported(pipeline, pydicom_files, tmp_path):
    ct, mr = pydicom.dcmread(pydicom_files / "CT_small.dcm"), pydicom.dcmread(pydicom_files / "MR_small.dcm")
    with pytest.raises(DicomError, match="2 studies"):
        pipeline.run([ct, mr])
    (tmp_path / "notes.txt").write_text("not DICOM")
    with pytest.raises(DicomError, match="no readable DICOM instance"):
        pipeline.run(tmp_path)
    # an SR alone: nothing to read
    sr = pipeline.run([ct]).sr
    with pytest.raises(DicomError, match="no image series"):
        pipeline.run([sr])
    # pixels that cannot be decoded: the predictor's typed error comes through
    bad = pydicom.dcmread(pydicom_files / "CT_small.dcm")
    bad.SOPInstanceUID = generate_uid()
    bad.PixelData = bad.PixelData[:100]
    with pytest.raises(DicomError, match="inference failed"):
        pipeline.run([bad])


def test_in_memory_datasets_and_question_override(pipeline, pydicom_files):
    ds = pydicom.dcmread(pydicom_files / "MR_small.dcm")
    del ds.file_meta  # as DIMSE delivers it: no file meta group
    res = pipeline.run([ds], question="Is there a lesion?")
    r = read_report(res.sr)
    assert r["question"] == "Is there a lesion?" and "question=Is there a lesion?" in r["algorithm"]["parameters"]
    assert r["referenced_sop_instance_uids"] == [ds.SOPInstanceUID]


def test_clean_text_drops_control_characters():
    assert clean_text("a\x08b\tc\nd\x00\x9b ") == "ab\tc\nd"


def test_cli_report(checkpoint, pydicom_files, tmp_path, capsys):
    out = tmp_path / "sr.dcm"
    cli_main(["pacs", "report", "--checkpoint", str(checkpoint), "--input", str(pydicom_files / "MR_small.dcm"),
              "--out", str(out), "--max-new-tokens", "4", "--question", "Which sequence?"])
    printed = json.loads(capsys.readouterr().out)
    r = read_report(out)
    assert r["text"] == printed["report"] and r["question"] == "Which sequence?"


def test_amended_report_lists_its_predecessor(pipeline, pydicom_files, tmp_path):
    ct = pydicom.dcmread(pydicom_files / "CT_small.dcm")
    first = pipeline.run([ct]).sr
    first_path = tmp_path / "first.dcm"
    first.save_as(first_path, enforce_file_format=True)
    second = copy.deepcopy(ct)
    second.SOPInstanceUID = generate_uid()  # a second instance of the same study, arrived later
    res = pipeline.run([ct, second], predecessor=first_path)
    path = tmp_path / "second.dcm"
    res.sr.save_as(path, enforce_file_format=True)

    back = pydicom.dcmread(path)  # as a PACS reads it: plain pydicom
    (study,) = back.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == ct.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    (ref,) = series.ReferencedSOPSequence
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (first.SOPClassUID, first.SOPInstanceUID)
    r = read_report(path)
    assert r["predecessor_sop_instance_uids"] == [first.SOPInstanceUID]
    assert sorted(r["evidence_sop_instance_uids"]) == sorted([ct.SOPInstanceUID, second.SOPInstanceUID])
    assert res.record["predecessor_sr"] == first.SOPInstanceUID
    assert res.record["sr_sop_instance_uid"] != first.SOPInstanceUID
    assert read_report(first_path)["predecessor_sop_instance_uids"] == []
    # an SR of another study cannot be amended by this one
    mr = pydicom.dcmread(pydicom_files / "MR_small.dcm")
    with pytest.raises(DicomError, match="another study"):
        pipeline.run([mr], predecessor=first)


def _fresh(src, n: int = 1, truncate_pixels: bool = False) -> list:
    """A new study (new Study/Series/SOP UIDs) of ``n`` in-memory copies of a real file."""
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    if truncate_pixels:
        ds.PixelData = ds.PixelData[:64]
    out = []
    for i in range(n):
        d = copy.deepcopy(ds)
        d.SOPInstanceUID = d.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        d.InstanceNumber = i + 1
        out.append(d)
    return out


def test_run_many_equals_run_one_by_one_and_failures_stay_alone(pipeline, shared_data, pydicom_files, tmp_path):
    ct_sr = pipeline.run(pydicom_files / "CT_small.dcm").sr  # the SR the first study amends
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("not DICOM")
    sources = [pydicom_files / "CT_small.dcm",
               _fresh(pydicom_files / "MR_small.dcm"),
               tmp_path / "notes",  # fails at load
               shared_data / "dicom" / "ct_series_head_GE_tilt",  # a volume: a shorter prompt, so left padding
               _fresh(pydicom_files / "CT_small.dcm", truncate_pixels=True),  # fails inside the batched predict
               _fresh(pydicom_files / "MR_small.dcm", n=2)]
    predecessors = [ct_sr, None, None, None, None, None]
    many = pipeline.run_many(sources, predecessors)

    assert [type(r).__name__ for r in many] == ["StudyReport", "StudyReport", "DicomError", "StudyReport",
                                                "DicomError", "StudyReport"]
    assert "no readable DICOM instance" in many[2].reason and "inference failed" in many[4].reason
    for i in (0, 1, 3, 5):  # greedy: the batched answers are the one-by-one answers
        one = pipeline.run(sources[i], predecessor=predecessors[i])
        assert many[i].text == one.text, i
        assert [s["op"] for s in many[i].record["steps"]] == ["load_study", "select_series", "infer", "write_sr"]
        r = read_report(many[i].sr)
        assert r["text"] == many[i].text and r["study_instance_uid"] == one.record["study_instance_uid"]
    infer = [next(s for s in many[i].record["steps"] if s["op"] == "infer") for i in (0, 1, 3, 5)]
    assert {(s["batch"], s["generate_batch"]) for s in infer} == {(5, 4)}  # 5 loaded, 4 reached generate
    assert len({s["prompt_tokens"] for s in infer}) == 2  # image and volume prompts differ in length
    assert many[0].record["predecessor_sr"] == ct_sr.SOPInstanceUID
    assert read_report(many[0].sr)["predecessor_sop_instance_uids"] == [ct_sr.SOPInstanceUID]
    assert many[1].record["predecessor_sr"] is None


def test_run_many_falls_back_one_by_one_when_the_batch_crashes(pipeline, pydicom_files, monkeypatch):
    good, bad = _fresh(pydicom_files / "MR_small.dcm"), _fresh(pydicom_files / "CT_small.dcm")
    real = pipeline.predictor.predict

    def predict(requests, *a, **k):  # a crash inside the model whenever the bad study is in the call
        if any(r["id"] == bad[0].StudyInstanceUID for r in requests):
            raise RuntimeError("CUDA error: device-side assert triggered")
        return real(requests, *a, **k)

    expected = pipeline.run(good).text
    monkeypatch.setattr(pipeline.predictor, "predict", predict)
    ok, crashed = pipeline.run_many([good, bad])
    assert isinstance(crashed, RuntimeError) and "device-side assert" in str(crashed)
    assert ok.text == expected
    (step,) = [s for s in ok.record["steps"] if s["op"] == "infer"]
    assert (step["batch"], step["generate_batch"]) == (2, 1)  # asked again on its own
