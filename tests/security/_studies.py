"""Crafted DICOM studies for the study-pipeline rows (1, 3, 4): traversal UIDs, decompression bombs, bad header
values, and a snapshot of a folder tree to prove that nothing outside the server's own folders changed."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from pathlib import Path

import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from tests.security.conftest import AUTH


def ct(pydicom_files: Path, **attrs) -> pydicom.Dataset:
    """CT_small.dcm (a real 128x128 CT slice) with fresh Study/Series/SOP UIDs, then ``attrs`` set as they are."""
    ds = pydicom.dcmread(pydicom_files / "CT_small.dcm")
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def set_raw(ds, keyword: str, value: str) -> None:
    """Put ``value`` in ``ds`` as the raw bytes of its dictionary VR, as a received file holds it (pydicom would
    refuse to set an invalid DS or IS value)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement

    tag = tag_for_keyword(keyword)
    raw = value.encode() + b" " * (len(value.encode()) % 2)
    ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)


def to_bytes(ds) -> bytes:
    """The file bytes of ``ds``, written without pydicom's value validation (crafted values stay as they are)."""
    from medmm.io.dicom import quiet_pydicom

    with quiet_pydicom():
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()


def upload(*blobs: bytes) -> list:
    return [("files", (f"f{i}.dcm", b, "application/dicom")) for i, b in enumerate(blobs)]


def post_study(url: str, *blobs: bytes, **kw):
    import httpx

    return httpx.post(f"{url}/v1/studies/report", files=upload(*blobs), headers=AUTH, timeout=120, **kw)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed): ("dir",), ("link", target) or ("file", sha256)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p))
            elif p.is_dir():
                out[str(p)] = ("dir",)
            else:
                out[str(p)] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def _element(group: int, elem: int, vr: bytes, value_length: int) -> bytes:
    """An explicit VR little endian element header with a 4-byte length (OB/OW/UN/SQ/UT style)."""
    return struct.pack("<HH", group, elem) + vr + b"\0\0" + struct.pack("<I", value_length)


def deflated_bomb(rows: int = 16384, cols: int = 16384, bits: int = 16, n: int | None = None) -> bytes:
    """A Deflated Explicit VR Little Endian file whose pixel data is ``rows x cols`` zeros (16-bit: 512 MiB
    inflated from about 512 KB), or ``n`` zero bytes whatever the header says. The zeros are compressed once per
    16 MiB and repeated: the test never holds them."""
    ds = ct_header(rows, cols, bits)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # written plain, then deflated by hand below
    plain = to_bytes(ds)
    meta_end = _file_meta_end(plain)
    body_head = plain[meta_end:]
    n = rows * cols * bits // 8 if n is None else n
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = 16 << 20
    # after a full flush the compressor starts afresh, so every full chunk of zeros compresses to the same bytes
    head = comp.compress(body_head + _element(0x7FE0, 0x0010, b"OW", n)) + comp.flush(zlib.Z_FULL_FLUSH)
    piece = comp.compress(bytes(chunk)) + comp.flush(zlib.Z_FULL_FLUSH)
    tail = comp.compress(bytes(n % chunk)) + comp.flush() if n % chunk else comp.flush()
    chunks = [head, piece * (n // chunk), tail]
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = to_bytes(_meta_only(ds))
    return head[:_file_meta_end(head)] + b"".join(chunks)


def huge_native(rows: int = 65535, cols: int = 65535, frames: int = 64) -> bytes:
    """An uncompressed file that declares ``frames`` frames of ``rows x cols`` 16-bit pixels but holds 128 bytes."""
    ds = ct_header(rows, cols, 16)
    ds.NumberOfFrames = frames
    ds.PixelData = bytes(128)
    return to_bytes(ds)


def ct_header(rows: int, cols: int, bits: int) -> pydicom.Dataset:
    """A minimal CT image header (no pixel data) of one fresh study."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.PatientName, ds.PatientID = "CT", "Bomb^Test", "BOMB1"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    return ds


def _meta_only(ds) -> pydicom.Dataset:
    from pydicom.dataset import Dataset

    out = Dataset()
    out.file_meta = ds.file_meta
    return out


def _file_meta_end(data: bytes) -> int:
    """Offset of the first byte after the file meta group (preamble, DICM and group 0002)."""
    (group_length,) = struct.unpack("<I", data[140:144])  # (0002,0000) UL, explicit VR: value at 140
    return 144 + group_length
