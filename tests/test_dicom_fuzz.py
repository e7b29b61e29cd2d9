"""Fuzzing ``medmm prepare dicom`` with real files made invalid: one header element at a time (every IS/DS/US/UI/DA
element medmm reads: not a number, empty, several values, huge), truncated at a random offset, or with random
bytes flipped in the header. The job must finish every time; each variant gets a ``files.jsonl`` line, every
rejected one is in ``errors.jsonl`` as a typed DicomError, the untouched files beside them are all written, and a
value medmm has a documented fallback for is written with the fallback recorded.

Variants are batched into three prepare runs over small real images (a 128x128 CT, a 10-frame 64x64 MR).
"""

from __future__ import annotations

import json
import random
import struct
import warnings

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from medmm.io.dicom import HEADER_ATTRIBUTES
from medmm.prepare.dicom import DicomPrepareOptions, prepare_dicom

pytestmark = pytest.mark.slow

SOURCES = ("highdicom/ct_image.dcm", "pydicom_data/emri_small.dcm")
FUZZED_VRS = ("IS", "DS", "US", "UI", "DA")
NESTED = {"LUTDescriptor"}  # read inside VOILUTSequence items only
ELEMENTS = sorted(k for k, vr in HEADER_ATTRIBUTES.items() if vr in FUZZED_VRS and k not in NESTED)
MODES = ("non_numeric", "empty", "multi", "huge")
VM = {"PixelSpacing": 2, "ImageOrientationPatient": 6, "ImagePositionPatient": 3}

# what medmm does with an invalid value (medmm.io.dicom.read_dicom's docstring): a DicomError for these ...
REJECTED = {"Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "PixelRepresentation", "RescaleSlope",
            "RescaleIntercept"}
# ... and a recorded fallback for every other element, except where the mutation is still a valid value:
STILL_VALID = {("WindowCenter", "multi"), ("WindowWidth", "multi")}  # several windows: the first is used


def _value(keyword: str, vr: str, mode: str) -> tuple[str, bytes]:
    """(VR written, raw value) of an invalid element."""
    n = VM.get(keyword, 1)
    if vr == "US":
        return {"non_numeric": ("LO", b"ab"), "empty": ("US", b""), "multi": ("US", struct.pack("<HH", 1, 2)),
                "huge": ("US", struct.pack("<H", 65535))}[mode]
    table = {
        "IS": {"non_numeric": b"1A", "empty": b"", "multi": b"2\\3", "huge": b"999999999999"},
        "DS": {"non_numeric": b"abc", "empty": b"", "multi": b"\\".join([b"1.5"] * (n + 1)),
               "huge": b"\\".join([b"1e308"] * n)},
        "UI": {"non_numeric": b"1.2.abc", "empty": b"", "multi": b"1.2.3\\1.2.4", "huge": b"1." + b"9" * 120},
        "DA": {"non_numeric": b"2020AB01", "empty": b"", "multi": b"20200101\\20200202", "huge": b"00010101"},
    }
    raw = table[vr][mode]
    if len(raw) % 2:
        raw += b"\x00" if vr == "UI" else b" "
    return vr, raw


def _fresh(src):
    """The source with new Series/SOP instance UIDs, so that each variant is a series of its own."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(src)
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _save(ds, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=False)


def _patch_transfer_syntax(path, raw: bytes) -> None:
    """Rewrite the file meta TransferSyntaxUID (pydicom refuses to write an invalid one) and its group length."""
    data = bytearray(path.read_bytes())
    head = b"\x02\x00\x10\x00UI"
    i = data.index(head, 132)
    old_len = struct.unpack("<H", data[i + 6:i + 8])[0]
    data[i:i + 8 + old_len] = head + struct.pack("<H", len(raw)) + raw
    g = data.index(b"\x02\x00\x00\x00UL\x04\x00", 128)
    group_len = struct.unpack("<I", data[g + 8:g + 12])[0]
    data[g + 8:g + 12] = struct.pack("<I", group_len + len(raw) - old_len)
    path.write_bytes(data)


def _untouched(folder, sources) -> list[str]:
    paths = []
    for src in sources:
        path = folder / f"untouched__{src.stem}.dcm"
        _save(_fresh(src), path)
        paths.append(str(path))
    return paths


def _run(folder, tmp_path, name, workers=1):
    out = tmp_path / f"out_{name}"
    m = prepare_dicom(folder, out, None, DicomPrepareOptions(size_2d=16, size_3d=(4, 16, 16), salt="fuzz",
                                                      workers=workers))
    lines = {x["path"]: x for x in map(json.loads, (out / "files.jsonl").read_text().splitlines())}
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(lines) == sorted(str(p) for p in folder.iterdir())  # one line per file
    assert all(x["outcome"] in ("written", "rejected", "skipped") for x in lines.values())
    by_path = {e["path"]: e for e in errors}
    for path, line in lines.items():
        if line["outcome"] == "rejected":
            assert by_path[path]["error"] == "DicomError" and by_path[path]["message"], line
        if line["outcome"] == "written":
            assert line["series"], line
    assert {e["error"] for e in errors} <= {"DicomError"}  # typed: no stray exception type leaked through
    assert m["files_seen"] == len(lines)
    return m, lines, by_path


@pytest.fixture(scope="module")
def sources(shared_data):
    return [shared_data / "dicom" / s for s in SOURCES]


def test_every_header_element_medmm_reads_made_invalid(tmp_path, sources):
    folder = tmp_path / "elements"
    folder.mkdir()
    variants = {}
    for src in sources:
        for keyword in ELEMENTS:
            for mode in MODES:
                vr, raw = _value(keyword, HEADER_ATTRIBUTES[keyword], mode)
                ds = _fresh(src)
                path = folder / f"{src.stem}__{keyword}__{mode}.dcm"
                if keyword == "TransferSyntaxUID":
                    _save(ds, path)
                    _patch_transfer_syntax(path, raw)
                else:
                    tag = Tag(keyword)
                    ds[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
                    _save(ds, path)
                variants[str(path)] = (keyword, mode)
    assert len(variants) >= 200
    untouched = _untouched(folder, sources)
    m, lines, errors = _run(folder, tmp_path, "elements")
    assert all(lines[p]["outcome"] == "written" for p in untouched)
    for path, (keyword, mode) in variants.items():
        line = lines[path]
        if keyword in REJECTED:
            assert line["outcome"] == "rejected", (keyword, mode, line)
            if mode != "huge":  # a huge Rows is a valid number: the decoder finds the pixel data too short
                assert keyword in errors[path]["message"], (keyword, mode, errors[path])
        else:
            assert line["outcome"] == "written", (keyword, mode, line)
            if (keyword, mode) not in STILL_VALID:
                assert any(f["attribute"] == keyword for f in line.get("fallbacks", [])), (keyword, mode, line)
    print(f"{len(variants)} element variants: {m['files_written']} written, {m['files_rejected']} rejected")


def test_truncated_files(tmp_path, sources):
    rng = random.Random(0)
    folder = tmp_path / "truncated"
    folder.mkdir()
    variants = []
    for src in sources:
        for k in range(30):
            raw = _fresh_bytes(src, folder)  # new UIDs: each variant is a series of its own
            cut = rng.randrange(0, len(raw))
            path = folder / f"{src.stem}__cut{k:02d}_{cut}.dcm"
            path.write_bytes(raw[:cut])
            variants.append(str(path))
    untouched = _untouched(folder, sources)
    m, lines, errors = _run(folder, tmp_path, "truncated")
    assert all(lines[p]["outcome"] == "written" for p in untouched)
    for p in variants:
        line = lines[p]
        # a cut file is never written as if whole: only when it still holds whole frames, with that fallback
        if line["outcome"] == "written":
            assert any(f["attribute"] == "NumberOfFrames" for f in line.get("fallbacks", [])), line
    assert sum(lines[p]["outcome"] == "rejected" for p in variants) >= 40


def test_bytes_flipped_in_the_header(tmp_path, sources):
    rng = random.Random(1)
    folder = tmp_path / "flipped"
    folder.mkdir()
    variants = []
    for src in sources:
        for k in range(40):
            raw = _fresh_bytes(src, folder)  # new UIDs: each variant is a series of its own
            header_end = raw.index(b"\xe0\x7f\x10\x00")  # the pixel data element
            data = bytearray(raw)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(132, header_end)] ^= 1 << rng.randrange(8)
            path = folder / f"{src.stem}__flip{k:02d}.dcm"
            path.write_bytes(bytes(data))
            variants.append(str(path))
    untouched = _untouched(folder, sources)
    m, lines, _ = _run(folder, tmp_path, "flipped", workers=2)  # worker processes too
    assert all(lines[p]["outcome"] == "written" for p in untouched)
    assert len(variants) == 80 and m["files_seen"] == 82
    # a corrupt header that hides the pixel data is an error, not an object without pixels
    assert not [p for p in variants if lines[p]["outcome"] == "skipped"]


def _fresh_bytes(src, folder) -> bytes:
    tmp = folder.parent / f"fresh_{src.stem}.dcm"
    _save(_fresh(src), tmp)
    data = tmp.read_bytes()
    tmp.unlink()
    return data
