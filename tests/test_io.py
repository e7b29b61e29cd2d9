"""Readers on real inputs: pydicom's own files, the shared head CT series, VQA-RAD JPEGs, RDKit edge cases, FASTA."""

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from medmm.errors import DicomError, ImageError, InvalidInputError, SequenceError, SmilesError
from medmm.io.dicom import read_dicom, read_series, window
from medmm.io.genomics import read_fasta, tokenize, vocab_size
from medmm.io.images import read_image
from medmm.io.molecules import canonical_smiles, morgan_fingerprint, parse_smiles


def pydicom_dcm_files():
    from medmm.io.dicom import pydicom_test_files

    return sorted(pydicom_test_files().glob("*.dcm"))


@pytest.mark.parametrize("path", pydicom_dcm_files(), ids=lambda p: p.name)
def test_every_pydicom_file_reads_or_fails_typed(path):
    try:
        img = read_dicom(path)
    except DicomError as e:
        assert path.name in str(e) and e.reason
        return
    assert img.pixels.dtype == np.float32 and img.pixels.ndim in (3, 4)
    assert np.isfinite(img.pixels).all()
    assert "PatientName" not in img.meta and "patient" not in " ".join(img.meta).lower()


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"])
def test_modality_values_match_pydicom(pydicom_files, name):
    ds = pydicom.dcmread(pydicom_files / name)
    expected = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    np.testing.assert_array_equal(read_dicom(pydicom_files / name).pixels[0], expected)


def test_monochrome1_inverted(shared_data):
    path = shared_data / "dicom" / "highdicom" / "dx_image.dcm"
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    out = read_dicom(path).pixels[0]
    np.testing.assert_allclose(out, raw.max() + raw.min() - raw)


def test_truncated_and_non_dicom(pydicom_files, tmp_path):
    with pytest.raises(DicomError, match="MR_truncated.dcm"):
        read_dicom(pydicom_files / "MR_truncated.dcm")
    junk = tmp_path / "notes.dcm"
    junk.write_text("not a dicom file")
    with pytest.raises(DicomError, match="notes.dcm"):
        read_dicom(junk)


def test_window_presets():
    hu = np.array([-1000.0, 40.0, 80.0, 2000.0])
    w = window(hu, "brain")
    assert w[0] == 0.0 and w[-1] == 1.0 and 0 < w[1] < 1
    with pytest.raises(ValueError, match="unknown window"):
        window(hu, "nope")


def _write_series(tmp_path, src, n=6, dz=2.5):
    """A synthetic CT series from a real slice, written with shuffled names and reversed InstanceNumber."""
    ds0 = pydicom.dcmread(src)
    order = np.random.default_rng(0).permutation(n)
    uid = pydicom.uid.generate_uid()
    for k in range(n):
        ds = ds0.copy()
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, 10.0 + dz * k]
        ds.InstanceNumber = n - k
        arr = ds.pixel_array.copy()
        arr[:] = k * 10
        ds.PixelData = arr.tobytes()
        ds.save_as(tmp_path / f"img_{order[k]:03d}.dcm")
    return uid


def test_series_ordered_by_position(tmp_path, pydicom_files):
    _write_series(tmp_path, pydicom_files / "CT_small.dcm")
    vol, rep = read_series(tmp_path)
    assert vol.shape[0] == 1 and vol.shape[1] == 6
    ds = pydicom.dcmread(pydicom_files / "CT_small.dcm")
    slope, inter = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    means = [float(vol[0, k].mean()) for k in range(6)]
    np.testing.assert_allclose(means, [k * 10 * slope + inter for k in range(6)])
    assert rep.spacing[0] == pytest.approx(2.5) and not rep.uneven_spacing and rep.gantry_tilt_deg < 0.01
    assert vol.affine[2, 0] == pytest.approx(2.5)  # slice step on the z axis of the affine


def test_real_head_ct_with_gantry_tilt(shared_data):
    vol, rep = read_series(shared_data / "dicom" / "ct_series_head_GE_tilt")
    assert vol.shape[1] == 28
    assert not rep.rejected  # the licence and readme beside the slices are passed over
    assert rep.gantry_tilt_deg == pytest.approx(18.5, abs=1.0)
    assert rep.uneven_spacing  # 4 mm then 7 mm slices
    assert not rep.gaps and not rep.gap_positions  # ... which is two spacings, not missing slices


def test_read_image_and_errors(tmp_path):
    from tests.conftest import SAMPLE

    img = read_image(next((SAMPLE / "vqa_rad" / "images").glob("*.jpg")))
    assert img.ndim == 3 and img.shape[2] == 3 and 0 <= img.min() and img.max() <= 1
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(ImageError, match="x.png"):
        read_image(bad)


@pytest.mark.parametrize("smiles,expected", [
    ("CC(=O)[O-].[Na+]", "CC(=O)O"),  # salt stripped and neutralised
    ("c1ccccc1.CCO", "c1ccccc1"),  # largest fragment
    ("C[C@H](N)C(=O)O", "C[C@H](N)C(=O)O"),  # stereo kept
    ("c1cc[nH]c1", "c1cc[nH]c1"),
])
def test_smiles_standardised(smiles, expected):
    assert canonical_smiles(parse_smiles(smiles)) == expected


@pytest.mark.parametrize("smiles,reason", [
    ("", "empty"),
    ("C(C)(C)(C)(C)C", "[Vv]alence"),  # pentavalent carbon
    ("c1cccn1", "kekul"),  # aromatic N without H
    ("C1CC", "ring|unclosed"),
    ("C" * 300, "over the limit"),
])
def test_smiles_rejected_with_reason(smiles, reason):
    with pytest.raises(SmilesError, match=reason) as e:
        parse_smiles(smiles, source="row 7")
    assert "row 7" in str(e.value)


def test_fingerprint():
    fp = morgan_fingerprint(parse_smiles("CCO"), bits=512)
    assert fp.shape == (512,) and fp.sum() > 0


def test_dna_tokenize_and_fasta(shared_data):
    ids = tokenize("ACGTN RYu", k=1)
    assert ids.tolist() == [2, 3, 4, 5, 1, 1, 1, 5]
    k3 = tokenize("ACGTA", k=3)
    assert len(k3) == 3 and k3.max() < vocab_size(3)
    assert tokenize("AAAANAAAA", k=3).tolist().count(1) == 3  # every k-mer touching N is unknown
    with pytest.raises(SequenceError, match="not nucleotides"):
        tokenize("ACGTXZ")
    recs = read_fasta(shared_data / "genomics" / "fasta_pyfaidx" / "genes.fasta")
    assert len(recs) == 20 and all(len(s) > 100 for _, s in recs)
    with pytest.raises(SequenceError):
        read_fasta(shared_data / "genomics" / "vcf_cyvcf2" / "empty.vcf")
    assert issubclass(SequenceError, InvalidInputError)


def test_enhanced_ct_frames_ordered_by_position(shared_data):
    path = shared_data / "dicom" / "pydicom_data" / "eCT_Supplemental.dcm"
    img = read_dicom(path)
    assert len(img.meta["frame_positions"]) == 2 and img.meta["orientation"]
    vol, rep = read_series(path)
    assert vol.shape[1] == 2 and rep.slices == 2 and not rep.frame_order_only
    normal = np.cross(img.meta["orientation"][:3], img.meta["orientation"][3:])
    step = np.array(img.meta["frame_positions"]) @ normal
    assert rep.spacing[0] == pytest.approx(abs(step[1] - step[0]), rel=1e-4)


@pytest.mark.parametrize("name", ["emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm", "emri_small_RLE.dcm"])
def test_multiframe_without_plane_geometry(shared_data, name):
    # these test files carry no functional groups: frames stay in file order, spacing from the header
    vol, rep = read_series(shared_data / "dicom" / "pydicom_data" / name)
    assert vol.shape == (1, 10, 64, 64) and rep.frame_order_only and rep.spacing[0] == pytest.approx(1.2)


def test_voi_lut_sequence(shared_data):
    from pydicom.pixels import apply_voi_lut

    path = shared_data / "dicom" / "pydicom_data" / "vlut_04.dcm"
    ds = pydicom.dcmread(path)
    img = read_dicom(path, apply_voi=True)
    assert img.meta["voi"] == "lut" and 0 <= img.pixels.min() and img.pixels.max() <= 1
    ref = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds).astype(np.float32), ds, prefer_lut=True)
    np.testing.assert_allclose(img.pixels[0] * (2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1), ref, atol=1e-2)


def test_broken_j2k_is_typed(shared_data):
    with pytest.raises(DicomError, match="too_short"):
        read_dicom(shared_data / "dicom" / "pydicom_data" / "emri_small_jpeg_2k_lossless_too_short.dcm")


# ----------------------------------------------------------------------------- header values (issue 10)


def _with_raw(tmp_path, src, keyword, vr, raw, name="x.dcm"):
    """``src`` saved with one element replaced by raw bytes (any VR, any value), read back by pydicom."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = pydicom.dcmread(src)
    tag = Tag(keyword)
    if len(raw) % 2:
        raw += b" "
    ds[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
    path = tmp_path / name
    ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=False)
    return path


@pytest.mark.parametrize("keyword,vr,raw,call,expected,problem", [
    ("NumberOfFrames", "IS", b"1A", ("integer", 1), 1, "not an integer"),
    ("SliceThickness", "DS", b"1.5\\2.5", ("number", None), None, "2 values where one is expected"),
    ("PixelSpacing", "DS", b"abc\\1", ("numbers", 2), None, "not a number"),
    ("ImagePositionPatient", "DS", b"1e400\\0\\0", ("numbers", 3), None, "not a finite number"),
    ("SpacingBetweenSlices", "DS", b"", ("number", None), None, "empty"),
    ("SeriesInstanceUID", "UI", b"1.2.abc", ("uid", ""), "", "not a valid UID"),
    ("StudyInstanceUID", "UI", b"1." + b"9" * 80, ("uid", ""), "", "longer than 64"),
    ("StudyDate", "DA", b"20201301", ("date", ""), "", "not a valid date"),
    ("AcquisitionNumber", "IS", b"99999999999", ("integer", None), None, "out of range"),
])
def test_header_reader_falls_back_and_records(tmp_path, pydicom_files, keyword, vr, raw, call, expected, problem):
    import json

    from medmm.io.dicom import HeaderReader

    path = _with_raw(tmp_path, pydicom_files / "CT_small.dcm", keyword, vr, raw)
    reader = HeaderReader(pydicom.dcmread(path), path)
    method, arg = call
    kwargs = {"lo": -(2**31), "hi": 2**31 - 1} if method == "integer" else {}
    if method == "numbers":
        value = reader.numbers(keyword, arg, None, lo=-1e6, hi=1e6)
    elif method == "number":
        value = reader.number(keyword, None)
    else:
        value = getattr(reader, method)(keyword, arg, **kwargs)
    assert value == expected
    (rec,) = reader.fallbacks
    assert rec["attribute"] == keyword and problem in rec["problem"] and rec["fallback"] == expected
    assert raw.strip().decode() not in json.dumps(reader.fallbacks) or not raw.strip()  # the value is never quoted


def test_header_reader_wrong_vr_and_required(tmp_path, pydicom_files):
    from medmm.io.dicom import HeaderReader

    ok = _with_raw(tmp_path, pydicom_files / "CT_small.dcm", "Rows", "LO", b"128", "ok.dcm")
    reader = HeaderReader(pydicom.dcmread(ok), ok)
    assert reader.integer("Rows", required=True) == 128 and not reader.fallbacks  # a number under the wrong VR
    assert read_dicom(ok).pixels.shape == (1, 128, 128)  # and the decoder is given a clean US value
    bad = _with_raw(tmp_path, pydicom_files / "CT_small.dcm", "Rows", "LO", b"ab", "bad.dcm")
    with pytest.raises(DicomError, match=r"bad\.dcm: Rows is not an integer"):
        read_dicom(bad)
    slope = _with_raw(tmp_path, pydicom_files / "CT_small.dcm", "RescaleSlope", "DS", b"1\\2", "slope.dcm")
    with pytest.raises(DicomError, match="RescaleSlope has 2 values"):  # modality values would be wrong
        read_dicom(slope)
    with pytest.raises(KeyError, match="HEADER_ATTRIBUTES"):  # every attribute read is declared
        HeaderReader(pydicom.dcmread(ok), ok).integer("InstanceNumber")


def test_number_of_frames_1a_is_counted_from_the_pixel_data(pydicom_files):
    # pydicom's own badVR.dcm: NumberOfFrames '1A' (pydicom's pixel_array raises ValueError on it)
    path = pydicom_files / "badVR.dcm"
    img = read_dicom(path)
    assert img.pixels.shape == (15, 10, 10) and img.meta["frames"] == 15
    assert {"attribute": "NumberOfFrames", "problem": "is not an integer", "fallback": 15} in img.meta["fallbacks"]
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 15
    np.testing.assert_array_equal(img.pixels, apply_modality_lut(ds.pixel_array, ds).astype(np.float32))


def test_missing_transfer_syntax_falls_back_to_the_encoding_read(pydicom_files, tmp_path):
    ds = pydicom.dcmread(pydicom_files / "MR_small.dcm")
    expected = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    del ds.file_meta.TransferSyntaxUID
    ds.save_as(tmp_path / "no_ts.dcm", implicit_vr=False, little_endian=True, enforce_file_format=False)
    img = read_dicom(tmp_path / "no_ts.dcm")
    np.testing.assert_array_equal(img.pixels[0], expected)
    assert any(f["attribute"] == "TransferSyntaxUID" for f in img.meta["fallbacks"])


# ----------------------------------------------------------------------------- series assembly (issue 10)


def _stack(tmp_path, pydicom_files, positions, **per_slice):
    """Synthetic CT slices at ``positions`` (z, mm); ``per_slice`` gives attribute lists; pixels differ by index."""
    ds0 = pydicom.dcmread(pydicom_files / "CT_small.dcm")
    uid = pydicom.uid.generate_uid()
    for k, z in enumerate(positions):
        ds = ds0.copy()
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, pydicom.uid.generate_uid()
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        for name, values in per_slice.items():
            setattr(ds, name, values[k])
        arr = ds.pixel_array.copy()
        arr[:] = k
        ds.PixelData = arr.tobytes()
        ds.save_as(tmp_path / f"s{k:02d}.dcm")
    return sorted(tmp_path.glob("s*.dcm"))


def test_echoes_are_split_by_the_attribute_that_gives_fewest_volumes(tmp_path, pydicom_files):
    from medmm.io.dicom import read_volumes

    # two echoes at four positions; AcquisitionNumber differs on every slice (as on some scanners), so it would
    # also separate them, into eight single slices: EchoNumbers, giving two volumes, is the one chosen
    _stack(tmp_path, pydicom_files, [0, 2, 4, 6] * 2, EchoNumbers=[1] * 4 + [2] * 4, AcquisitionNumber=list(range(8)))
    asm = read_volumes(tmp_path)
    assert asm.outcome == "split" and "EchoNumbers" in asm.reason
    assert sorted(v.label for v in asm.volumes) == ["EchoNumbers=1", "EchoNumbers=2"]
    assert all(v.report.slices == 4 and v.report.spacing[0] == pytest.approx(2.0) for v in asm.volumes)
    with pytest.raises(DicomError, match="read_volumes"):
        read_series(tmp_path)


def test_same_position_same_pixels_is_a_duplicate_and_an_unplaceable_slice_is_rejected_alone(tmp_path,
                                                                                            pydicom_files):
    from medmm.io.dicom import read_volumes

    paths = _stack(tmp_path, pydicom_files, [0, 2, 4, 6, 8])
    twin = pydicom.dcmread(paths[2])
    twin.SOPInstanceUID = pydicom.uid.generate_uid()  # another SOP instance, same position and pixels
    twin.save_as(tmp_path / "t_twin.dcm")
    lost = pydicom.dcmread(paths[4])
    lost.SOPInstanceUID = pydicom.uid.generate_uid()
    del lost.ImagePositionPatient
    lost.save_as(tmp_path / "u_no_position.dcm")
    asm = read_volumes(tmp_path)
    assert asm.outcome == "kept" and asm.duplicates_dropped == [str(tmp_path / "t_twin.dcm")]
    assert [r["path"] for r in asm.rejected] == [str(tmp_path / "u_no_position.dcm")]
    vol, rep = read_series(tmp_path)
    assert vol.shape[1] == 5 and rep.duplicates_dropped and not rep.gaps
    np.testing.assert_allclose([float(vol[0, k].mean()) for k in range(5)],
                               [float(read_dicom(p).pixels.mean()) for p in paths])


def test_gaps_are_found_against_the_local_step(tmp_path, pydicom_files):
    from medmm.io.dicom import read_volumes

    # 2 mm then 5 mm slices (two protocols in one series): no gap; one slice missing in each part
    z = [0, 2, 4, 6, 8, 10, 15, 20, 25, 30]
    for name in ("full", "gappy"):
        (tmp_path / name).mkdir()
    _stack(tmp_path / "full", pydicom_files, z)
    assert read_volumes(tmp_path / "full").gap_positions == []
    _stack(tmp_path / "gappy", pydicom_files, [v for v in z if v not in (4, 20)])
    asm = read_volumes(tmp_path / "gappy")
    assert asm.outcome == "kept" and asm.gap_positions == [[0.0, 0.0, 4.0], [0.0, 0.0, 20.0]]
    split = read_volumes(tmp_path / "gappy", on_gap="split")
    assert split.outcome == "split" and [v.report.slices for v in split.volumes] == [2, 4, 2]
    reject = read_volumes(tmp_path / "gappy", on_gap="reject")
    assert reject.outcome == "rejected" and len(reject.rejected) == 8 and "missing" in reject.reason


def test_same_sop_uid_is_a_duplicate_only_with_the_same_pixels(tmp_path, pydicom_files):
    import shutil

    from medmm.io.dicom import read_volumes

    paths = _stack(tmp_path, pydicom_files, [0, 2, 4])
    shutil.copy(paths[1], tmp_path / "t_copy.dcm")  # the same file twice
    clash = pydicom.dcmread(paths[1])  # a UID reused for another image (a data error): nothing is lost
    clash.ImagePositionPatient = [0.0, 0.0, 6.0]
    arr = clash.pixel_array.copy()
    arr[:] = 7
    clash.PixelData = arr.tobytes()
    clash.save_as(tmp_path / "u_clash.dcm")
    asm = read_volumes(tmp_path)
    assert asm.duplicates_dropped == [str(tmp_path / "t_copy.dcm")]
    assert asm.outcome == "kept" and asm.volumes[0].report.slices == 4 and "SOPInstanceUID" in asm.reason
