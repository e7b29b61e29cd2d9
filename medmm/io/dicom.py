"""DICOM -> float32 images in modality units with metadata; series folders -> MONAI MetaTensor volumes.

* ``read_dicom(path)``: one file (any transfer syntax pydicom decodes with the pylibjpeg plugins),
  modality LUT (rescale slope/intercept or LUT sequence) applied, MONOCHROME1 inverted, palette and
  YBR converted to RGB, multi-frame kept as frames. Returns :class:`DicomImage`.
* ``window(img, preset | (center, width))``: VOI windowing to [0, 1].
* ``read_series(folder)``: groups by SeriesInstanceUID, orders slices by their position along the
  slice normal (never by file name or InstanceNumber), takes spacing from the positions, reports
  uneven spacing and gantry tilt, and returns ``(1, D, H, W)`` MetaTensor with its RAS affine.

Metadata never includes patient identifiers: only geometry, modality and UIDs needed downstream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DicomError

log = logging.getLogger(__name__)

WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    # name: (center, width) in HU
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
}


@dataclass
class DicomImage:
    """Pixels ``(frames, H, W)`` (grey, modality units) or ``(frames, H, W, 3)`` (colour), plus metadata."""

    pixels: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def is_color(self) -> bool:
        return self.pixels.ndim == 4


def _meta(ds) -> dict:
    def f(tag, default=None):
        v = ds.get(tag, default)
        return v

    def floats(v):
        return [float(x) for x in v] if v is not None else None

    return {
        "modality": str(f("Modality", "")),
        "photometric": str(f("PhotometricInterpretation", "")),
        "rows": int(f("Rows", 0) or 0),
        "columns": int(f("Columns", 0) or 0),
        "frames": int(f("NumberOfFrames", 1) or 1),
        "pixel_spacing": floats(f("PixelSpacing")),
        "slice_thickness": float(f("SliceThickness")) if f("SliceThickness") not in (None, "") else None,
        "spacing_between_slices": (float(f("SpacingBetweenSlices"))
                                   if f("SpacingBetweenSlices") not in (None, "") else None),
        "orientation": floats(f("ImageOrientationPatient")),
        "position": floats(f("ImagePositionPatient")),
        "study_uid": str(f("StudyInstanceUID", "")),
        "series_uid": str(f("SeriesInstanceUID", "")),
        "sop_uid": str(f("SOPInstanceUID", "")),
        "frame_of_reference_uid": str(f("FrameOfReferenceUID", "")),
        "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else "",
        "window": _file_window(ds),
        **_enhanced_geometry(ds),
    }


def _enhanced_geometry(ds) -> dict:
    """Per-frame positions, orientation and spacing of an enhanced multi-frame CT/MR (functional groups)."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if not per:
        return {}
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]

    def find(item, seq, attr):
        for src in (item, shared):
            if src is not None and seq in src and len(src[seq].value) and attr in src[seq].value[0]:
                return src[seq].value[0].get(attr)
        return None

    positions = [find(f, "PlanePositionSequence", "ImagePositionPatient") for f in per]
    out: dict = {}
    if all(p is not None for p in positions):
        out["frame_positions"] = [[float(v) for v in p] for p in positions]
    ori = find(per[0], "PlaneOrientationSequence", "ImageOrientationPatient")
    if ori is not None:
        out["orientation"] = [float(v) for v in ori]
    ps = find(per[0], "PixelMeasuresSequence", "PixelSpacing")
    if ps is not None:
        out["pixel_spacing"] = [float(v) for v in ps]
    th = find(per[0], "PixelMeasuresSequence", "SliceThickness")
    if th is not None:
        out["slice_thickness"] = float(th)
    return out


def _file_window(ds) -> tuple[float, float] | None:
    c, w = ds.get("WindowCenter"), ds.get("WindowWidth")
    if c is None or w is None:
        return None
    try:
        c = float(c[0]) if hasattr(c, "__len__") and not isinstance(c, str) else float(c)
        w = float(w[0]) if hasattr(w, "__len__") and not isinstance(w, str) else float(w)
    except (TypeError, ValueError):
        return None
    return (c, w) if w > 0 else None


def read_dicom(path: str | Path, stop_before_pixels: bool = False, apply_voi: bool = False) -> DicomImage:
    """Read one DICOM file into modality units. Raises DicomError naming the file and the problem.

    ``apply_voi=True`` returns grey images already through the file's VOI transform (VOI LUT sequence,
    else window center/width) and scaled to [0, 1] over the transform's output range (``meta['voi']``).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except FileNotFoundError as e:
        raise DicomError(path, "file not found") from e
    except InvalidDicomError as e:
        raise DicomError(path, f"not a DICOM file ({e})") from e
    except Exception as e:  # pydicom raises many types on truncated/corrupt headers
        raise DicomError(path, f"unreadable DICOM header ({type(e).__name__}: {e})") from e
    try:
        meta = _meta(ds)
    except (ValueError, TypeError) as e:
        raise DicomError(path, f"invalid header value ({type(e).__name__}: {e})") from e
    if stop_before_pixels:
        return DicomImage(np.zeros((0,), np.float32), meta)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DicomError(path, f"no pixel data (SOP class {ds.get('SOPClassUID', '?')}, modality {meta['modality']})")
    try:
        arr = ds.pixel_array
    except Exception as e:  # decoder errors: truncated frames, missing plugin, bad lengths
        raise DicomError(path, f"pixel data cannot be decoded ({type(e).__name__}: {e})") from e
    photometric = meta["photometric"]
    frames = meta["frames"]
    try:
        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds).astype(np.float32)
            arr = arr / (65535.0 if arr.max() > 255 else 255.0)
        elif arr.ndim == (4 if frames > 1 else 3) and int(ds.get("SamplesPerPixel", 1)) == 3:
            arr = arr.astype(np.float32)  # pydicom 3 converts YBR to RGB by default
            arr = arr / float(2 ** int(ds.get("BitsStored", 8)) - 1)
        else:
            arr = _modality_lut(arr, ds, apply_modality_lut)
            if apply_voi and ("VOILUTSequence" in ds or meta["window"] is not None):
                if "VOILUTSequence" in ds:
                    bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
                    lo, hi = 0.0, float(2**bits - 1)
                else:
                    lo, hi = 0.0, float(2 ** int(ds.get("BitsStored", 16)) - 1)
                arr = np.clip((apply_voi_lut(arr, ds, prefer_lut=True).astype(np.float32) - lo) / (hi - lo), 0, 1)
                meta["voi"] = "lut" if "VOILUTSequence" in ds else "window"
                if photometric == "MONOCHROME1":
                    arr = 1.0 - arr
            elif photometric == "MONOCHROME1":
                arr = arr.max() + arr.min() - arr  # invert so that higher = brighter
    except Exception as e:
        raise DicomError(path, f"LUT cannot be applied ({type(e).__name__}: {e})") from e
    # Normalise to (frames, H, W[, 3])
    color = arr.ndim == (4 if frames > 1 else 3) and arr.shape[-1] == 3
    if frames == 1:
        arr = arr[None]
    if arr.ndim == 3 and color:
        arr = arr[None]
    return DicomImage(np.ascontiguousarray(arr, dtype=np.float32), meta)


def _modality_lut(arr: np.ndarray, ds, apply_modality_lut) -> np.ndarray:
    """Stored values -> modality units as float32. A plain rescale is done in float32 in place (pydicom's
    general function goes through float64 temporaries); LUT sequences go through pydicom."""
    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(arr, ds).astype(np.float32)
    out = arr.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def window(img: np.ndarray, window: str | tuple[float, float] | None = None,
           fallback: tuple[float, float] | None = None) -> np.ndarray:
    """Map modality values to [0, 1] with a preset name, a (center, width), the file's window, or min-max."""
    if isinstance(window, str):
        if window not in WINDOW_PRESETS:
            raise ValueError(f"unknown window preset '{window}'; known: {', '.join(WINDOW_PRESETS)}")
        window = WINDOW_PRESETS[window]
    window = window or fallback
    if window is None:
        lo, hi = float(np.min(img)), float(np.max(img))
    else:
        c, w = window
        lo, hi = c - w / 2.0, c + w / 2.0
    if hi <= lo:
        return np.zeros_like(img, dtype=np.float32)
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def is_dicom_file(path: str | Path) -> bool:
    """True when the file has the DICM preamble marker (or a .dcm suffix)."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


@dataclass
class SeriesReport:
    """What ``read_series`` found: counts, rejected files, spacing problems, tilt."""

    files: int = 0
    slices: int = 0
    rejected: list[dict] = field(default_factory=list)
    spacing: tuple[float, float, float] | None = None
    uneven_spacing: bool = False
    gap_positions: list[int] = field(default_factory=list)
    gantry_tilt_deg: float = 0.0
    series_uid: str = ""
    other_series: list[str] = field(default_factory=list)
    frame_order_only: bool = False
    """True when frames had no plane positions and were stacked in file order."""


def read_series(folder: str | Path, series_uid: str | None = None, spacing_tolerance: float = 0.05,
                files: list[Path] | None = None):
    """Assemble one series (single-frame slices, or one multi-frame file) into a ``(1, D, H, W)`` MetaTensor.

    Slices (or frames of an enhanced CT/MR) are ordered by their position along the slice normal.
    The affine (RAS) uses the real step between slice positions, so a gantry-tilted series keeps
    its true (sheared) geometry and MONAI's ``Spacing``/``Orientation`` resample it correctly; the
    tilt angle, uneven spacing and gaps (missing slices) are reported. Returns ``(volume, report)``.
    """
    import torch
    from monai.data import MetaTensor

    folder = Path(folder)
    if files is not None:
        paths = list(files)
    else:
        paths = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    report = SeriesReport(files=len(paths))
    if files is None and folder.is_dir():  # text files beside the slices (README, LICENSE) are not errors
        skipped = [p for p in paths if p.suffix.lower() in (".txt", ".md", ".json", ".csv", ".pdf")]
        paths = [p for p in paths if p not in set(skipped)]
    images: list[DicomImage] = []
    for p in paths:
        try:
            img = read_dicom(p)
        except DicomError as e:
            report.rejected.append(e.to_record())
            log.warning("skipping %s", e)
            continue
        images.append(img)
    if not images:
        raise DicomError(folder, "no readable DICOM image in the series")
    by_series: dict[str, list[DicomImage]] = {}
    for im in images:
        by_series.setdefault(im.meta["series_uid"], []).append(im)
    if series_uid is None:
        series_uid = max(by_series, key=lambda k: sum(x.pixels.shape[0] for x in by_series[k]))
    if series_uid not in by_series:
        raise DicomError(folder, f"series {series_uid} not found")
    report.series_uid = series_uid
    report.other_series = sorted(k for k in by_series if k != series_uid)
    group = by_series[series_uid]
    if any(im.is_color for im in group):
        raise DicomError(folder, "colour images do not form a volume")

    # (pixels (H, W), position or None) per slice, from files or from the frames of one file
    slices: list[tuple[np.ndarray, list[float] | None]] = []
    ori = group[0].meta.get("orientation")
    for im in group:
        frames_pos = im.meta.get("frame_positions")
        if im.pixels.shape[0] > 1:
            if len(group) > 1:
                raise DicomError(folder, "a multi-frame file inside a series of files")
            for k in range(im.pixels.shape[0]):
                slices.append((im.pixels[k], frames_pos[k] if frames_pos else None))
        else:
            slices.append((im.pixels[0], im.meta.get("position")))
        if im.meta.get("orientation") and ori and not np.allclose(im.meta["orientation"], ori, atol=1e-3):
            raise DicomError(folder, "slices of the series have different orientations; split them first")
    if any(sl[0].shape != slices[0][0].shape for sl in slices):
        raise DicomError(folder, "slices of the series have different sizes")
    ps = group[0].meta.get("pixel_spacing") or [1.0, 1.0]

    if not ori or any(pos is None for _, pos in slices):
        if len(slices) > 1 and len(group) > 1:
            raise DicomError(folder, "slices lack ImageOrientationPatient/ImagePositionPatient; cannot order them")
        # a multi-frame file without plane geometry: keep frame order, spacing from the header
        m0 = group[0].meta
        dz = float(m0.get("spacing_between_slices") or m0.get("slice_thickness") or 1.0)
        report.frame_order_only = True
        log.warning("%s: no plane positions; frames kept in file order, %.2f mm apart", folder.name, dz)
        data = np.stack([sl[0] for sl in slices])
        report.slices, report.spacing = data.shape[0], (dz, float(ps[0]), float(ps[1]))
        affine = _lps_to_ras(np.diag([dz, float(ps[0]), float(ps[1]), 1.0]))
        return MetaTensor(torch.from_numpy(data[None]), affine=torch.from_numpy(affine)), report

    row_dir, col_dir = np.array(ori[:3]), np.array(ori[3:])
    normal = np.cross(row_dir, col_dir)
    pos = np.array([sl[1] for sl in slices], dtype=float)
    dist = pos @ normal
    order = np.argsort(dist, kind="stable")
    pos, dist = pos[order], dist[order]
    gaps = np.diff(dist)
    if len(gaps) and np.any(gaps < 1e-4):
        raise DicomError(folder, "two slices share one position (duplicates or several acquisitions)")
    data = np.empty((len(slices), *slices[0][0].shape), dtype=np.float32)  # (D, H, W), filled in place
    for k, i in enumerate(order):
        data[k] = slices[i][0]
    if len(slices) > 1:
        step = (pos[-1] - pos[0]) / (len(slices) - 1)  # mean step vector (includes tilt shear)
        dz = float(np.median(gaps))
        rel = np.abs(gaps - dz) / max(dz, 1e-6)
        report.uneven_spacing = bool(np.any(rel > spacing_tolerance))
        report.gap_positions = [int(i) for i in np.where(gaps > 1.5 * dz)[0]]
        cosang = abs(float(np.dot(step, normal))) / (np.linalg.norm(step) + 1e-12)
        report.gantry_tilt_deg = float(np.degrees(np.arccos(min(1.0, cosang))))
    else:
        dz = float(group[0].meta.get("slice_thickness") or 1.0)
        step = normal * dz
    if report.uneven_spacing:
        log.warning("%s: uneven slice spacing (%.2f-%.2f mm); the affine uses the mean step", folder.name,
                    gaps.min(), gaps.max())
    if report.gap_positions:
        log.warning("%s: missing slices after positions %s", folder.name, report.gap_positions)
    if report.gantry_tilt_deg > 0.5:
        log.warning("%s: gantry tilt of %.1f deg; the affine keeps the sheared geometry", folder.name,
                    report.gantry_tilt_deg)
    # index (k, i, j) -> LPS: k along the slice step, i along rows (col_dir), j along columns (row_dir)
    lps = np.eye(4)
    lps[:3, 0] = step
    lps[:3, 1] = col_dir * ps[0]
    lps[:3, 2] = row_dir * ps[1]
    lps[:3, 3] = pos[0]
    report.slices = len(slices)
    report.spacing = (float(np.linalg.norm(step)), float(ps[0]), float(ps[1]))
    return MetaTensor(torch.from_numpy(data[None]), affine=torch.from_numpy(_lps_to_ras(lps))), report


def _lps_to_ras(affine: np.ndarray) -> np.ndarray:
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ affine
