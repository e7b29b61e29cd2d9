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
    from medmm.data.prepare import pydicom_test_files

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
