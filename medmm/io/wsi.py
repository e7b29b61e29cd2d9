"""Whole-slide images -> tiles at a target resolution: reading, MPP and level choice, tissue mask, tile grid.

Three readers behind one :class:`Slide` interface (``read_region`` takes level-0 coordinates, as OpenSlide):

- OpenSlide (the ``openslide-python`` + ``openslide-bin`` wheels; no system library): SVS, NDPI,
  MRXS, SCN, Philips/Ventana TIFF, DICOM WSI and tiled generic TIFF.
- tifffile for plain (stripped) and pyramidal TIFF, including SubIFD pyramids that OpenSlide reads
  as a single level. ``backend="auto"`` uses it for TIFFs OpenSlide would treat as generic TIFF.
- highdicom/pydicom (``backend="dicom"``) for DICOM VL Whole Slide Microscopy series: frames placed by
  the TotalPixelMatrix geometry (TILED_FULL order, or the per-frame positions of TILED_SPARSE).
  ``backend="auto"`` opens a DICOM slide with OpenSlide and falls back to this reader when OpenSlide
  cannot (``properties["medmm.openslide_error"]`` then says why).

DICOM slides: a slide is a series (SeriesInstanceUID) of VL WSI instances in one folder, one instance
per pyramid level (plus label/overview images). Open any VOLUME instance of it: OpenSlide and the
DICOM reader both gather the other levels from the same folder. :func:`group_dicom_slides` picks one
file per series for ``prepare wsi``. A DICOM file that is not a VL WSI VOLUME image (a CT, an annotation
object, a label image) raises :class:`SlideError` before any reader sees it.

Resolution: microns per pixel (MPP) come from the slide's metadata (OpenSlide's ``openslide.mpp-x``;
for TIFF the Aperio ``MPP =`` description, OME ``PhysicalSizeX`` or the resolution tags; for DICOM the
PixelSpacing of the shared functional groups, in mm). A slide without it raises :class:`SlideError`
unless the caller passes ``slide_mpp`` (nothing is guessed from the objective power).
:func:`select_level` picks the coarsest level at least as fine as the target MPP (never upsampling)
and the read size that gives ``tile_size`` pixels at the target MPP.

Tissue: :func:`tissue_mask` thresholds the saturation of a low-resolution image (``mask_mpp`` µm per
pixel, 8 by default) with Otsu's method, after a median filter, then removes specks and fills holes.
Otsu is 15 lines of numpy here; scikit-image or OpenCV would add a large dependency for one function.
Otsu assumes two classes, glass and tissue, so :func:`tissue_threshold` falls back to a saturation
floor (``min_saturation``, 0.05) in the two fields where that fails: blank glass (Otsu splits noise
below the floor) and a field that is all tissue (Otsu splits pale from dark tissue; detected as a
lower class of which under a quarter is at glass saturation).
:func:`tile_grid` keeps the non-overlapping grid tiles whose tissue fraction (exact box coverage of
the mask) reaches ``min_tissue``; :func:`save_coords` writes them as CSV + JSON for audit and resume.

Every failure raises :class:`SlideError` naming the file (missing, unsupported, corrupt, truncated).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import SlideError
from .files import check_regular_file

# Suffixes ``prepare wsi`` picks up in a folder (MRXS: the .mrxs file; its data folder sits beside it;
# DICOM: the .dcm files of each series are grouped into one slide by :func:`group_dicom_slides`).
DICOM_SUFFIXES = {".dcm", ".dicom"}
WSI_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff"} | DICOM_SUFFIXES
TIFF_SUFFIXES = {".tif", ".tiff"}
BACKENDS = ("auto", "openslide", "tifffile", "dicom")
VL_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
# MPPs outside this range come from screen-default resolution tags (72 dpi = 352.8 µm), not a microscope.
_MPP_RANGE = (0.01, 100.0)


# --------------------------------------------------------------------------------------------
# Slides


class Slide:
    """A whole-slide image: levels, base MPP, and RGB regions read in level-0 coordinates.

    Attributes:
        path: the file.
        backend: ``openslide``, ``tifffile`` or ``dicom``.
        dimensions: (width, height) per level, level 0 first.
        downsamples: level-0 pixels per level pixel, per level.
        mpp: base microns per pixel (mean of x and y), or None when unknown.
        mpp_source: where ``mpp`` came from (a metadata key, ``user``), or why it is missing.
    """

    backend = ""

    def __init__(self, path: Path, dimensions: list[tuple[int, int]], downsamples: list[float],
                 mpp_xy: tuple[float, float] | None, mpp_source: str, properties: dict[str, str]):
        self.path = Path(path)
        self.dimensions = dimensions
        self.downsamples = downsamples
        self.mpp_xy = mpp_xy
        self.mpp_source = mpp_source
        self.properties = properties

    # ---------------------------------------------------------------- metadata
    @property
    def level_count(self) -> int:
        return len(self.dimensions)

    @property
    def mpp(self) -> float | None:
        return None if self.mpp_xy is None else float(sum(self.mpp_xy) / 2)

    def level_mpp(self, level: int) -> float:
        if self.mpp is None:
            raise SlideError(self.path, "no microns-per-pixel known for this slide")
        return self.mpp * self.downsamples[level]

    def set_mpp(self, mpp: float, source: str = "user") -> None:
        if not (_MPP_RANGE[0] <= mpp <= _MPP_RANGE[1]):
            raise SlideError(self.path, f"slide_mpp={mpp} is not a plausible microscope resolution (µm per pixel)")
        self.mpp_xy, self.mpp_source = (float(mpp), float(mpp)), source

    def describe(self) -> dict:
        """JSON-able summary for manifests."""
        return {"path": str(self.path), "backend": self.backend, "dimensions": [list(d) for d in self.dimensions],
                "downsamples": [round(d, 6) for d in self.downsamples], "mpp": self.mpp,
                "mpp_source": self.mpp_source}

    # ---------------------------------------------------------------- pixels
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of ``size=(w, h)`` level pixels whose top-left is ``location`` in level-0 pixels.

        Pixels outside the scanned area are white. A location that is not a multiple of the level's
        downsample is floored by the tifffile reader (OpenSlide interpolates the sub-pixel offset); tile
        grids from :func:`tile_grid` are aligned, so both readers return the same pixels."""
        if not 0 <= level < self.level_count:
            raise SlideError(self.path, f"level {level} does not exist (the slide has {self.level_count})")
        try:
            return self._read(location, level, size)
        except SlideError:
            raise
        except Exception as e:  # backend errors: corrupt or truncated tile data
            raise SlideError(self.path, f"cannot read {size[0]}x{size[1]} px at level {level}, {tuple(location)}: "
                                        f"{type(e).__name__}: {e}") from e

    def _read(self, location, level, size) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (1% slack)."""
        ok = [i for i, d in enumerate(self.downsamples) if d <= downsample * 1.01]
        return max(ok, key=lambda i: self.downsamples[i]) if ok else 0

    def read_downsampled(self, downsample: float, band: int = 2048) -> np.ndarray:
        """The whole slide at ``downsample`` (level-0 px per output px), RGB uint8.

        Reads the best level in bands of rows, so a slide without low-resolution levels does not
        need its full level 0 in memory at once."""
        from PIL import Image

        downsample = max(float(downsample), 1.0)
        w0, h0 = self.dimensions[0]
        out_w, out_h = max(1, int(math.ceil(w0 / downsample))), max(1, int(math.ceil(h0 / downsample)))
        level = self.best_level(downsample)
        lw, lh = self.dimensions[level]
        ds = self.downsamples[level]
        f = downsample / ds  # level px per output px
        out = np.empty((out_h, out_w, 3), np.uint8)
        rows = max(1, int(band / f))
        for o0 in range(0, out_h, rows):
            o1 = min(out_h, o0 + rows)
            l0, l1 = int(round(o0 * f)), min(lh, max(int(round(o0 * f)) + 1, int(round(o1 * f))))
            region = self.read_region((0, int(round(l0 * ds))), level, (lw, l1 - l0))
            out[o0:o1] = np.asarray(Image.fromarray(region).resize((out_w, o1 - o0), Image.Resampling.BOX))
        return out

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path.name}, levels={self.dimensions}, mpp={self.mpp})"


def _composite_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA (straight alpha) -> RGB on white: unscanned (transparent) areas become background, not black."""
    if rgba.shape[-1] == 3:
        return rgba
    rgb = rgba[..., :3]
    a = rgba[..., 3:4]
    if bool((a == 255).all()):
        return np.ascontiguousarray(rgb)
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a.astype(np.uint16)) + 127) // 255
    return out.astype(np.uint8)


class OpenSlideSlide(Slide):
    backend = "openslide"

    def __init__(self, path: Path):
        import openslide

        try:
            self._os = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as e:
            raise SlideError(path, "not a readable whole-slide image: OpenSlide does not recognise it (truncated, "
                                   "corrupt, or an unsupported format)") from e
        except openslide.OpenSlideError as e:
            raise SlideError(path, f"corrupt slide: OpenSlide cannot open it ({e})") from e
        props = dict(self._os.properties)
        mpp_xy, source = None, "missing: no openslide.mpp-x/mpp-y in the slide's metadata"
        try:
            mx, my = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
            if _MPP_RANGE[0] <= mx <= _MPP_RANGE[1] and _MPP_RANGE[0] <= my <= _MPP_RANGE[1]:
                mpp_xy, source = (mx, my), "openslide.mpp-x/mpp-y"
        except (KeyError, ValueError):
            pass
        super().__init__(path, [tuple(d) for d in self._os.level_dimensions],
                         [float(d) for d in self._os.level_downsamples], mpp_xy, source, props)

    def _read(self, location, level, size) -> np.ndarray:
        img = self._os.read_region((int(location[0]), int(location[1])), level, (int(size[0]), int(size[1])))
        if img.getchannel("A").getextrema()[0] == 255:  # fully scanned: drop alpha in C, skip the composite
            return np.asarray(img.convert("RGB"))
        return _composite_white(np.asarray(img))

    def close(self) -> None:
        self._os.close()


def _tiff_mpp(tif, page) -> tuple[tuple[float, float] | None, str]:
    """Base MPP of a TIFF from Aperio description, OME-XML, or resolution tags (in that order)."""
    desc = page.description or ""
    m = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", desc)
    if m:
        v = float(m.group(1))
        if _MPP_RANGE[0] <= v <= _MPP_RANGE[1]:
            return (v, v), "ImageDescription MPP ="
    if tif.is_ome and tif.ome_metadata:
        mx = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        my = re.search(r'PhysicalSizeY="([0-9.eE+-]+)"', tif.ome_metadata)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
        scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit.group(1) if unit else "µm")
        if mx and scale:
            x = float(mx.group(1)) * scale
            y = float(my.group(1)) * scale if my else x
            if _MPP_RANGE[0] <= x <= _MPP_RANGE[1]:
                return (x, y), "OME PhysicalSizeX/Y"
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        unit = int(tags["ResolutionUnit"].value)
        per_um = {2: 25400.0, 3: 10000.0}.get(unit)  # inch, centimetre
        xr, yr = tags["XResolution"].value, tags.get("YResolution", tags["XResolution"]).value
        xr = xr[0] / xr[1] if isinstance(xr, tuple) else float(xr)
        yr = yr[0] / yr[1] if isinstance(yr, tuple) else float(yr)
        if per_um and xr > 0 and yr > 0:
            x, y = per_um / xr, per_um / yr
            if _MPP_RANGE[0] <= x <= _MPP_RANGE[1]:
                return (x, y), "TIFF XResolution/ResolutionUnit"
            return None, f"missing: the TIFF resolution tags give {x:.4g} µm/px, a screen default, not a scan"
    return None, "missing: no MPP in the TIFF description, OME metadata or resolution tags"


class TiffSlide(Slide):
    """Plain or pyramidal TIFF through tifffile: decodes only the tiles/strips a region touches (LRU cached)."""

    backend = "tifffile"

    def __init__(self, path: Path, cache_bytes: int = 64 << 20):
        import tifffile

        try:
            self._tif = tifffile.TiffFile(str(path))
            series = max(self._tif.series, key=lambda s: int(np.prod(s.shape[:2])) if len(s.shape) >= 2 else 0)
            self._pages = [lvl.keyframe for lvl in series.levels]
        except Exception as e:
            raise SlideError(path, f"corrupt or truncated TIFF: {type(e).__name__}: {e}") from e
        dims = []
        for p in self._pages:
            if p.planarconfig != 1 and p.samplesperpixel > 1:
                raise SlideError(path, "planar (separate-channel) TIFF is not supported; save it with contiguous RGB")
            if p.samplesperpixel not in (1, 3, 4) or p.dtype != np.uint8:
                raise SlideError(path, f"unsupported pixels: {p.samplesperpixel} samples of {p.dtype} (need 8-bit "
                                       "RGB, RGBA or grey)")
            dims.append((int(p.imagewidth), int(p.imagelength)))
        w0, h0 = dims[0]
        downs = [float((w0 / w + h0 / h) / 2) for w, h in dims]
        mpp_xy, source = _tiff_mpp(self._tif, self._pages[0])
        props = {"tiff.ImageDescription": self._pages[0].description or ""}
        super().__init__(path, dims, downs, mpp_xy, source, props)
        self._cache: OrderedDict = OrderedDict()
        self._cache_bytes, self._cached = cache_bytes, 0
        self._size = Path(path).stat().st_size

    def _segment(self, level: int, index: int) -> tuple[np.ndarray | None, int, int]:
        """Decoded tile/strip ``index`` of ``level`` as (array (h, w, c) or None, y0, x0)."""
        key = (level, index)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        page = self._pages[level]
        off, count = page.dataoffsets[index], page.databytecounts[index]
        data = None
        if count:
            if off + count > self._size:
                raise SlideError(self.path, f"truncated: level {level} segment {index} ends at byte {off + count}, "
                                            f"beyond the end of the file ({self._size} bytes)")
            fh = self._tif.filehandle
            fh.seek(off)
            data = fh.read(count)
        seg, idx, _shape = page.decode(data, index, jpegtables=page.jpegtables)
        arr = None if seg is None else seg[0]  # (h, w, c)
        val = (arr, int(idx[2]), int(idx[3]))
        self._cache[key] = val
        self._cached += 0 if arr is None else arr.nbytes
        while self._cached > self._cache_bytes and len(self._cache) > 1:
            _, (a, _, _) = self._cache.popitem(last=False)
            self._cached -= 0 if a is None else a.nbytes
        return val

    def _read(self, location, level, size) -> np.ndarray:
        page = self._pages[level]
        ds = self.downsamples[level]
        W, H = self.dimensions[level]
        x, y = int(location[0] // ds), int(location[1] // ds)
        w, h = int(size[0]), int(size[1])
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x0 >= x1 or y0 >= y1:
            return out
        if page.is_tiled:
            tw, th = int(page.tilewidth), int(page.tilelength)
            across = -(-W // tw)
            indices = [r * across + c for r in range(y0 // th, (y1 - 1) // th + 1)
                       for c in range(x0 // tw, (x1 - 1) // tw + 1)]
        else:
            rps = int(page.rowsperstrip or H)
            indices = list(range(y0 // rps, (y1 - 1) // rps + 1))
        for i in indices:
            seg, sy, sx = self._segment(level, i)
            if seg is None:
                continue
            sh, sw = seg.shape[:2]
            ay0, ay1, ax0, ax1 = max(y0, sy), min(y1, sy + sh), max(x0, sx), min(x1, sx + sw)
            if ay0 >= ay1 or ax0 >= ax1:
                continue
            part = seg[ay0 - sy:ay1 - sy, ax0 - sx:ax1 - sx]
            if part.shape[-1] == 1:
                part = np.repeat(part, 3, axis=-1)
            elif part.shape[-1] == 4:
                part = _composite_white(part)
            out[ay0 - y:ay1 - y, ax0 - x:ax1 - x] = part
        return out

    def close(self) -> None:
        self._tif.close()


# --------------------------------------------------------------------------------------------
# DICOM VL Whole Slide Microscopy

_DICOM_HEADER_TAGS = ["SOPClassUID", "SeriesInstanceUID", "ImageType", "TotalPixelMatrixColumns",
                      "TotalPixelMatrixRows"]


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm``/``.dicom`` suffix, or no other slide suffix and the ``DICM`` magic at byte 128 (DICOM files
    often have no suffix; a dual-personality DICOM-TIFF named ``.tif`` stays a TIFF)."""
    suffix = Path(path).suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if suffix in WSI_SUFFIXES:
        return False
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _dicom_header(path: Path):
    """The few header elements that say what a DICOM file is (no pixel data read)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=_DICOM_HEADER_TAGS)
    except InvalidDicomError as e:
        raise SlideError(path, f"not a DICOM file ({e})") from e
    except Exception as e:  # pydicom raises many types on truncated/corrupt headers
        raise SlideError(path, f"unreadable DICOM header: {type(e).__name__}: {e}") from e


def _image_flavour(ds) -> str:
    """Value 3 of ImageType: VOLUME (a pyramid level), THUMBNAIL, LABEL or OVERVIEW (VOLUME when absent)."""
    it = ds.get("ImageType")
    return str(it[2]).upper() if it is not None and len(it) > 2 else "VOLUME"


def check_dicom_wsi(path: Path):
    """The header of a DICOM VL Whole Slide Microscopy VOLUME image.

    Raises:
        SlideError: not DICOM, unreadable, another kind of DICOM object, or the slide's label/overview/thumbnail.
    """
    ds = _dicom_header(path)
    sop = ds.get("SOPClassUID")
    if sop != VL_WSI_SOP_CLASS:
        name = getattr(sop, "name", None) or str(sop or "none")
        raise SlideError(path, f"DICOM but not a VL Whole Slide Microscopy image (SOP class: {name})")
    flavour = _image_flavour(ds)
    if flavour != "VOLUME":
        raise SlideError(path, f"the slide's {flavour} image, not a pyramid level (ImageType value 3 is {flavour}); "
                               "open one of its VOLUME instances")
    return ds


def group_dicom_slides(files: list[Path]) -> list[Path]:
    """One file per DICOM slide among ``files``: the finest VOLUME instance of each (folder, SeriesInstanceUID).

    The other instances of a series (coarser levels, label, overview, thumbnail) are read through that
    file and left out. A file that is not a readable VL WSI instance stays in the list as itself, so that
    opening it raises its :class:`SlideError` (a batch job records it and goes on). A series holding no
    VOLUME instance is represented by one of its files, which fails the same way.
    """
    out: list[Path] = []
    series: dict[tuple[Path, str], list[tuple[bool, int, str, Path]]] = {}
    for p in files:
        p = Path(p)
        try:
            ds = _dicom_header(p)
        except SlideError:
            out.append(p)
            continue
        if ds.get("SOPClassUID") != VL_WSI_SOP_CLASS:
            out.append(p)
            continue
        area = int(ds.get("TotalPixelMatrixColumns") or 0) * int(ds.get("TotalPixelMatrixRows") or 0)
        key = (p.parent, str(ds.get("SeriesInstanceUID") or p))
        series.setdefault(key, []).append((_image_flavour(ds) == "VOLUME", area, p.name, p))
    for members in series.values():
        # Finest VOLUME first; the name breaks ties so the choice does not depend on listing order.
        out.append(min(members, key=lambda m: (not m[0], -m[1], m[2]))[3])
    return sorted(out)


@dataclass
class _DicomLevel:
    """One VL WSI instance: a pyramid level made of frames (tiles) of a total pixel matrix."""

    reader: object
    """highdicom ImageFileReader, open."""
    width: int
    height: int
    tile_w: int
    tile_h: int
    frames: dict
    """(tile row, tile column) -> frame index; a missing key is an unscanned (white) tile."""
    spacing: tuple[float, float] | None
    """PixelSpacing in mm (row spacing = y, column spacing = x), or None."""


def _dicom_level(path: Path) -> _DicomLevel:
    from highdicom.io import ImageFileReader

    try:
        reader = ImageFileReader(str(path))
        reader.open()
        md = reader.metadata
    except Exception as e:
        raise SlideError(path, f"corrupt DICOM slide: {type(e).__name__}: {e}") from e
    try:
        if int(md.get("BitsAllocated", 8)) != 8 or int(md.get("SamplesPerPixel", 3)) not in (1, 3):
            raise SlideError(path, f"unsupported pixels: {md.get('SamplesPerPixel')} samples of "
                                   f"{md.get('BitsAllocated')} bits (need 8-bit RGB or grey)")
        if int(md.get("SamplesPerPixel", 3)) == 1 and md.get("PhotometricInterpretation") != "MONOCHROME2":
            raise SlideError(path, f"unsupported photometric interpretation {md.get('PhotometricInterpretation')}")
        W, H = int(md.TotalPixelMatrixColumns), int(md.TotalPixelMatrixRows)
        tw, th = int(md.Columns), int(md.Rows)
        n = reader.number_of_frames
        across, down = -(-W // tw), -(-H // th)
        frames: dict[tuple[int, int], int] = {}
        per_frame = md.get("PerFrameFunctionalGroupsSequence")
        positions = per_frame is not None and len(per_frame) == n and "PlanePositionSlideSequence" in per_frame[0]
        if md.get("DimensionOrganizationType", "TILED_FULL") == "TILED_FULL" or not positions:
            # TILED_FULL: frames run along rows, then down, then over focal planes and optical paths; the
            # first across x down frames are the first focal plane of the first optical path.
            if n < across * down:
                raise SlideError(path, f"TILED_FULL image has {n} frames, fewer than the {across}x{down} tiles "
                                       f"of its {W}x{H} total pixel matrix")
            frames = {(r, c): r * across + c for r in range(down) for c in range(across)}
        else:
            # TILED_SPARSE: each frame's top-left (1-based) in the total pixel matrix. With several focal
            # planes or optical paths the first frame at a position wins.
            for i, item in enumerate(per_frame):
                pos = item.PlanePositionSlideSequence[0]
                col = int(pos.ColumnPositionInTotalImagePixelMatrix) - 1
                row = int(pos.RowPositionInTotalImagePixelMatrix) - 1
                if col % tw or row % th:
                    raise SlideError(path, f"frame {i + 1} at column {col + 1}, row {row + 1} is off the "
                                           f"{tw}x{th} tile grid (unaligned sparse tiles are not supported)")
                frames.setdefault((row // th, col // tw), i)
        spacing = None
        for groups in (md.get("SharedFunctionalGroupsSequence"), per_frame):
            try:
                ps = groups[0].PixelMeasuresSequence[0].PixelSpacing
                spacing = (float(ps[0]), float(ps[1]))
                break
            except (TypeError, AttributeError, IndexError, KeyError):
                continue
    except SlideError:
        reader.close()
        raise
    except Exception as e:
        reader.close()
        raise SlideError(path, f"unreadable DICOM slide geometry: {type(e).__name__}: {e}") from e
    return _DicomLevel(reader, W, H, tw, th, frames, spacing)


class DicomSlide(Slide):
    """A DICOM VL Whole Slide Microscopy series through highdicom: decodes only the frames a region touches (LRU).

    The levels are the VOLUME instances of the opened file's series in its folder, finest first (one per
    size). Only the first focal plane and optical path are read.
    """

    backend = "dicom"

    def __init__(self, path: Path, cache_bytes: int = 64 << 20):
        path = Path(path)
        head = check_dicom_wsi(path)
        members = [path]
        for q in sorted(path.parent.iterdir()):
            if q == path or not q.is_file() or q.name.startswith(".") or not is_dicom_file(q):
                continue
            try:
                ds = _dicom_header(q)
            except SlideError:  # a broken neighbour is not this slide's problem
                continue
            if (ds.get("SOPClassUID") == VL_WSI_SOP_CLASS and _image_flavour(ds) == "VOLUME"
                    and ds.get("SeriesInstanceUID") == head.get("SeriesInstanceUID")):
                members.append(q)
        self._levels: list[_DicomLevel] = []
        try:
            for q in members:
                lv = _dicom_level(q) if q == path else self._try_level(q)
                if lv is None:
                    continue
                if any((lv.width, lv.height) == (o.width, o.height) for o in self._levels):
                    lv.reader.close()  # another focal plane or optical path of a level already held
                    continue
                self._levels.append(lv)
        except BaseException:
            for lv in self._levels:
                lv.reader.close()
            raise
        self._levels.sort(key=lambda lv: -lv.width * lv.height)
        dims = [(lv.width, lv.height) for lv in self._levels]
        w0, h0 = dims[0]
        downs = [float((w0 / w + h0 / h) / 2) for w, h in dims]
        sp = self._levels[0].spacing
        mpp_xy, source = None, "missing: no PixelSpacing in the shared or per-frame functional groups"
        if sp is not None:
            mx, my = sp[1] * 1000.0, sp[0] * 1000.0  # mm -> µm; PixelSpacing is (row = y, column = x)
            if _MPP_RANGE[0] <= mx <= _MPP_RANGE[1] and _MPP_RANGE[0] <= my <= _MPP_RANGE[1]:
                mpp_xy, source = (mx, my), "DICOM PixelSpacing"
            else:
                source = f"missing: PixelSpacing gives {mx:.4g} µm/px, not a microscope resolution"
        props = {"dicom.levels": str(len(dims))}  # no UIDs: DICOM de-identification treats them as identifiers
        super().__init__(path, dims, downs, mpp_xy, source, props)
        self._cache: OrderedDict = OrderedDict()
        self._cache_bytes, self._cached = cache_bytes, 0

    @staticmethod
    def _try_level(q: Path) -> _DicomLevel | None:
        try:
            return _dicom_level(q)
        except SlideError:  # a coarser level that cannot be read: the finer ones still serve every request
            return None

    def _frame(self, level: int, index: int) -> np.ndarray:
        key = (level, index)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        lv = self._levels[level]
        arr = np.asarray(lv.reader.read_frame(index, correct_color=False))  # (th, tw, 3) or (th, tw)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        arr = arr.astype(np.uint8, copy=False)
        self._cache[key] = arr
        self._cached += arr.nbytes
        while self._cached > self._cache_bytes and len(self._cache) > 1:
            _, a = self._cache.popitem(last=False)
            self._cached -= a.nbytes
        return arr

    def _read(self, location, level, size) -> np.ndarray:
        lv = self._levels[level]
        ds = self.downsamples[level]
        x, y = int(location[0] // ds), int(location[1] // ds)
        w, h = int(size[0]), int(size[1])
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lv.width), min(y + h, lv.height)
        if x0 >= x1 or y0 >= y1:
            return out
        tw, th = lv.tile_w, lv.tile_h
        for r in range(y0 // th, (y1 - 1) // th + 1):
            for c in range(x0 // tw, (x1 - 1) // tw + 1):
                i = lv.frames.get((r, c))
                if i is None:
                    continue
                seg = self._frame(level, i)
                sy, sx = r * th, c * tw
                ay0, ay1, ax0, ax1 = max(y0, sy), min(y1, sy + th), max(x0, sx), min(x1, sx + tw)
                out[ay0 - y:ay1 - y, ax0 - x:ax1 - x] = seg[ay0 - sy:ay1 - sy, ax0 - sx:ax1 - sx]
        return out

    def close(self) -> None:
        for lv in self._levels:
            lv.reader.close()


def choose_backend(path: Path) -> str:
    """``tifffile`` for TIFFs OpenSlide would read as generic TIFF (or not at all), else ``openslide``."""
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return "openslide"
    import openslide

    vendor = openslide.OpenSlide.detect_format(str(path))
    return "tifffile" if vendor in (None, "generic-tiff") else "openslide"


def open_slide(path: str | Path, slide_mpp: float | None = None, backend: str = "auto") -> Slide:
    """Open a whole-slide image.

    Args:
        path: the slide file (for a DICOM slide, any VOLUME instance of its series; the others sit beside it).
        slide_mpp: base microns per pixel to use when the slide's metadata has none (the metadata wins otherwise).
        backend: ``auto`` | ``openslide`` | ``tifffile`` | ``dicom``. ``auto`` reads DICOM with OpenSlide and
            falls back to ``dicom`` (highdicom) when OpenSlide cannot.

    Raises:
        SlideError: missing, unsupported, corrupt or truncated file; a DICOM file that is not a VL WSI VOLUME image.
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise ValueError(f"unknown slide backend '{backend}' ({' | '.join(BACKENDS)})")
    if not path.exists():
        raise SlideError(path, "file not found")
    if path.is_dir():
        raise SlideError(path, "is a folder, not a slide file")
    check_regular_file(path, SlideError)  # a FIFO or device: the readers below would block on it or misread it
    dicom = is_dicom_file(path)
    if dicom:
        check_dicom_wsi(path)  # a CT, an annotation object or a label image fails here, with its name
        if backend == "tifffile":
            raise SlideError(path, "a DICOM slide: use backend auto, openslide or dicom")
    elif backend == "dicom":
        raise SlideError(path, "not a DICOM file (backend 'dicom' reads DICOM VL Whole Slide Microscopy only)")
    if dicom and backend == "auto":
        try:
            slide: Slide = OpenSlideSlide(path)
        except SlideError as e:
            try:
                slide = DicomSlide(path)
            except SlideError as e2:
                raise SlideError(path, f"{e2.reason} (OpenSlide could not read it either: {e.reason})") from e2
            slide.properties["medmm.openslide_error"] = e.reason
    elif backend == "dicom":
        slide = DicomSlide(path)
    elif (choose_backend(path) if backend == "auto" else backend) == "openslide":
        slide = OpenSlideSlide(path)
    else:
        slide = TiffSlide(path)
    if slide.mpp is None and slide_mpp is not None:
        slide.set_mpp(slide_mpp, "user (slide_mpp)")
    return slide


# --------------------------------------------------------------------------------------------
# Resolution


@dataclass(frozen=True)
class LevelChoice:
    """How tiles of ``tile_size`` px at ``target_mpp`` are read: ``read_size`` px at ``level``, resized if needed."""

    level: int
    """Pyramid level read."""
    level_mpp: float
    """MPP of that level."""
    target_mpp: float
    """Requested MPP of the tiles."""
    read_size: int
    """Pixels read per tile side at ``level``."""
    tile_size: int
    """Pixels per tile side after resizing."""
    tile0: float
    """Tile side in level-0 pixels (the grid step)."""
    effective_mpp: float
    """MPP of the tiles as read (differs from the target by the rounding of ``read_size``)."""


def missing_mpp_message(slide: Slide) -> str:
    hint = ""
    power = slide.properties.get("openslide.objective-power") or slide.properties.get("aperio.AppMag")
    if power:
        hint = f" (objective power {power}x is recorded, but MPP is not inferred from it)"
    return (f"no microns-per-pixel in the slide's metadata ({slide.mpp_source}){hint}; give the scan resolution "
            "with --slide-mpp (e.g. 0.25 for a 40x scan)")


def select_level(slide: Slide, target_mpp: float, tile_size: int, tolerance: float = 0.1) -> LevelChoice:
    """The coarsest level whose MPP is at most ``target_mpp`` x (1 + tolerance); never upsamples beyond ``tolerance``.

    Raises:
        SlideError: the slide has no MPP, or the target is finer than the scan.
    """
    if slide.mpp is None:
        raise SlideError(slide.path, missing_mpp_message(slide))
    if target_mpp <= 0 or tile_size <= 0:
        raise ValueError(f"target_mpp and tile_size must be positive, got {target_mpp}, {tile_size}")
    base = slide.mpp
    if target_mpp < base * (1 - tolerance):
        raise SlideError(slide.path, f"target {target_mpp} µm/px is finer than the scan ({base:.4g} µm/px); "
                                     "tiles would be upsampled")
    ok = [i for i in range(slide.level_count) if slide.level_mpp(i) <= target_mpp * (1 + tolerance)]
    level = max(ok, key=slide.level_mpp)
    lmpp = slide.level_mpp(level)
    read = max(1, int(round(tile_size * target_mpp / lmpp)))
    return LevelChoice(level, lmpp, float(target_mpp), read, int(tile_size), read * slide.downsamples[level],
                       lmpp * read / tile_size)


def read_tile(slide: Slide, choice: LevelChoice, x: int, y: int) -> np.ndarray:
    """One tile, RGB uint8 ``(tile_size, tile_size, 3)``, top-left at level-0 ``(x, y)``."""
    region = slide.read_region((x, y), choice.level, (choice.read_size, choice.read_size))
    if choice.read_size == choice.tile_size:
        return region
    from PIL import Image

    mode = Image.Resampling.BOX if choice.read_size > choice.tile_size else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(region).resize((choice.tile_size, choice.tile_size), mode))


# --------------------------------------------------------------------------------------------
# Tissue


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values``: maximises the between-class variance; foreground is ``values > t``."""
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)[:-1].astype(np.float64)
    w1 = hist.sum() - w0
    s0 = np.cumsum(hist * centers)[:-1]
    m0 = s0 / np.maximum(w0, 1)
    m1 = (float((hist * centers).sum()) - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centers[int(np.argmax(between))])


@dataclass
class TissueMask:
    """A boolean tissue mask over a low-resolution image of the slide."""

    mask: np.ndarray
    """(h, w) bool, True = tissue."""
    thumbnail: np.ndarray
    """(h, w, 3) uint8 RGB the mask was computed on."""
    downsample: float
    """Level-0 pixels per mask pixel."""
    threshold: float
    """Saturation threshold (Otsu, or the ``min_saturation`` floor)."""
    method: str = "otsu"
    """How the threshold was chosen: ``otsu``, ``floor`` or ``floor-all-tissue`` (:func:`tissue_threshold`)."""

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of an RGB uint8 image: stained tissue is saturated, glass and background are not."""
    f = rgb.astype(np.float32)
    mx, mn = f.max(-1), f.min(-1)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1), 0.0).astype(np.float32)


# Pen-ink colour boxes (R, G, B bounds) of histolab's red/green/blue pen filters (from the Deep Histopath
# tutorial): red = R > r and G < g and B < b; green = R < r and G > g and B > b; blue = R < r and G < g and B > b.
_RED_PEN = [(150, 80, 90), (110, 20, 30), (185, 65, 105), (195, 85, 125), (220, 115, 145), (125, 40, 70),
            (200, 120, 150), (100, 50, 65), (85, 25, 45)]
_GREEN_PEN = [(150, 160, 140), (70, 110, 110), (45, 115, 100), (30, 75, 60), (195, 220, 210), (225, 230, 225),
              (170, 210, 200), (20, 30, 20), (50, 60, 40), (30, 50, 35), (65, 70, 60), (100, 110, 105),
              (165, 180, 180), (140, 140, 150), (185, 195, 195)]
_BLUE_PEN = [(60, 120, 190), (120, 170, 200), (175, 210, 230), (145, 180, 210), (37, 95, 160), (30, 65, 130),
             (130, 155, 180), (40, 35, 85), (30, 20, 65), (90, 90, 140), (60, 60, 120), (110, 110, 175)]


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels in red, green or blue pen-ink colour boxes (slide annotations, not tissue)."""
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    m = np.zeros(r.shape, bool)
    for R, G, B in _RED_PEN:
        m |= (r > R) & (g < G) & (b < B)
    for R, G, B in _GREEN_PEN:
        m |= (r < R) & (g > G) & (b > B)
    for R, G, B in _BLUE_PEN:
        m |= (r < R) & (g < G) & (b > B)
    return m


# Saturation of glass and unstained background stays below this in the slides we read (median 0.00-0.01,
# 90th percentile <= 0.03 in the CMU and TCGA thumbnails); pale eosin stroma is above it (0.05-0.2).
MIN_SATURATION = 0.05
# Otsu's lower class is glass plus pale tissue. When under this share of it is glass (saturation at or
# below the floor), the field has no glass to separate. Measured on the shared H&E/IHC tiles and slide
# thumbnails: 0.41-1.0 where the field holds glass or white lumen, 0.00-0.11 on crops that are all tissue.
_GLASS_SHARE = 0.25


def tissue_threshold(values: np.ndarray, min_saturation: float = MIN_SATURATION) -> tuple[float, str]:
    """The saturation threshold separating tissue (``> t``) from glass, and how it was chosen.

    Otsu's threshold assumes two classes, glass and tissue. Two fields break that, and both fall back
    to the floor ``min_saturation``:

    - ``floor``: Otsu's threshold is below the floor (a blank slide: it splits noise on glass in two).
    - ``floor-all-tissue``: under a quarter of the class below Otsu's threshold is at glass saturation
      (``<= min_saturation``), so that class is pale tissue, not glass: the field is all tissue and
      Otsu split pale from dark stain (a uniform field is the limit: Otsu returns its one value and
      nothing would pass). Everything above the floor is tissue then, so the mask is full where the
      field is stained.

    Otherwise (``otsu``) Otsu's threshold is used. A scanner whose glass is tinted above the floor
    needs a higher ``min_saturation``.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return float(min_saturation), "floor"
    t = otsu_threshold(v)
    below = v[v <= t]
    if below.size and float((below <= min_saturation).mean()) < _GLASS_SHARE:
        return float(min_saturation), "floor-all-tissue"
    if t < min_saturation:
        return float(min_saturation), "floor"
    return float(t), "otsu"


def _detect_tissue(rgb: np.ndarray, min_saturation: float, median: int, min_object_px: int,
                   remove_pen: bool) -> tuple[np.ndarray, float, str]:
    from scipy import ndimage as ndi

    sat = saturation(rgb)
    if median > 1 and min(sat.shape) >= median:
        sat = ndi.median_filter(sat, size=median)
    pen = ndi.binary_dilation(pen_mask(rgb)) if remove_pen else np.zeros(sat.shape, bool)
    values = sat[~pen] if (~pen).any() else sat
    thr, method = tissue_threshold(values, min_saturation)
    mask = (sat > thr) & ~pen
    if mask.any():
        labels, n = ndi.label(mask)
        sizes = ndi.sum(mask, labels, range(1, n + 1))
        keep = np.zeros(n + 1, bool)
        keep[1:] = sizes >= min(min_object_px, mask.size)  # a whole tiny thumbnail of tissue is not a speck
        mask = ndi.binary_fill_holes(keep[labels])
    return mask, float(thr), method


def detect_tissue(rgb: np.ndarray, min_saturation: float = MIN_SATURATION, median: int = 5, min_object_px: int = 16,
                  remove_pen: bool = True) -> tuple[np.ndarray, float]:
    """Tissue mask of a low-resolution RGB image: median-filtered saturation > :func:`tissue_threshold`.

    The threshold is Otsu's, or the ``min_saturation`` floor on a blank field (so glass gives an empty
    mask instead of split noise) and on a field that is all tissue (so it gives a full mask instead of
    half of it). With ``remove_pen``, pen-ink pixels (and a 1-pixel rim) are left out of the threshold
    and the mask. Small objects (< ``min_object_px``) are removed, holes filled.

    Returns:
        (mask (h, w) bool, threshold).
    """
    mask, thr, _method = _detect_tissue(rgb, min_saturation, median, min_object_px, remove_pen)
    return mask, thr


def tissue_mask(slide: Slide, mask_mpp: float = 8.0, max_side: int = 8192) -> TissueMask:
    """Tissue mask at ``mask_mpp`` µm per pixel (or 1/``max_side`` of the slide when the MPP is unknown)."""
    w0, h0 = slide.dimensions[0]
    ds = mask_mpp / slide.mpp if slide.mpp else max(w0, h0) / 2048
    ds = max(1.0, ds, max(w0, h0) / max_side)
    thumb = slide.read_downsampled(ds)
    mask, thr, method = _detect_tissue(thumb, MIN_SATURATION, 5, 16, True)
    return TissueMask(mask, thumb, ds, thr, method)


# --------------------------------------------------------------------------------------------
# Tile grid


@dataclass
class TileGrid:
    """The kept tiles of a regular grid at the target MPP."""

    coords: np.ndarray
    """(N, 2) int64 level-0 (x, y) of each tile's top-left corner, row-major order."""
    tissue: np.ndarray
    """(N,) float32 tissue fraction of each tile."""
    choice: LevelChoice
    grid: tuple[int, int]
    """(columns, rows) of the full grid before filtering."""
    min_tissue: float

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def _box_coverage(mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """Mean of a binary mask over boxes with fractional corners (mask-pixel units), exactly.

    The summed-area table of a piecewise-constant image is bilinear inside each pixel, so bilinear
    interpolation of the table at fractional corners gives the exact covered area."""
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), np.float64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.float64), 0), 1)

    def S(x, y):
        x = np.clip(x, 0, w)
        y = np.clip(y, 0, h)
        xi, yi = np.minimum(np.floor(x).astype(int), w - 1), np.minimum(np.floor(y).astype(int), h - 1)
        fx, fy = x - xi, y - yi
        return (sat[yi, xi] * (1 - fx) * (1 - fy) + sat[yi, xi + 1] * fx * (1 - fy)
                + sat[yi + 1, xi] * (1 - fx) * fy + sat[yi + 1, xi + 1] * fx * fy)

    area = (x1 - x0) * (y1 - y0)
    return (S(x1, y1) - S(x0, y1) - S(x1, y0) + S(x0, y0)) / np.maximum(area, 1e-12)


def tile_grid(slide: Slide, choice: LevelChoice, tissue: TissueMask | None, min_tissue: float = 0.5) -> TileGrid:
    """Non-overlapping full tiles covering level 0, kept where their tissue fraction is >= ``min_tissue``.

    ``tissue=None`` keeps every grid tile (fraction reported as 1)."""
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue must be in [0, 1], got {min_tissue}")
    w0, h0 = slide.dimensions[0]
    step = choice.tile0
    nx, ny = int(math.floor(w0 / step + 1e-9)), int(math.floor(h0 / step + 1e-9))
    gx, gy = np.meshgrid(np.arange(nx), np.arange(ny))  # row-major: y outer, x inner
    xs = np.round(gx.ravel() * step).astype(np.int64)
    ys = np.round(gy.ravel() * step).astype(np.int64)
    if tissue is None:
        frac = np.ones(xs.shape, np.float32)
    else:
        d = tissue.downsample
        frac = _box_coverage(tissue.mask, xs / d, ys / d, (xs + step) / d, (ys + step) / d).astype(np.float32)
    keep = frac >= min_tissue - 1e-6 if tissue is not None else np.ones(xs.shape, bool)
    coords = np.stack([xs[keep], ys[keep]], 1) if xs.size else np.zeros((0, 2), np.int64)
    return TileGrid(coords.astype(np.int64), frac[keep], choice, (nx, ny), float(min_tissue))


def evenly_spaced(n: int, k: int) -> np.ndarray:
    """Indices of ``k`` of ``n`` items spread evenly (all of them when n <= k): a deterministic bag cap."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


# --------------------------------------------------------------------------------------------
# Coordinates on disk (audit + resume)

COORDS_VERSION = 1


def save_coords(stem: str | Path, slide: Slide, grid: TileGrid, tissue: TissueMask | None, extra: dict | None = None
                ) -> tuple[Path, Path]:
    """Write ``<stem>.csv`` (index, x, y, tissue) and ``<stem>.json`` (slide, level choice, grid, mask)."""
    from ..utils import atomic_write_text

    stem = Path(stem)
    lines = ["index,x,y,tissue"] + [f"{i},{x},{y},{t:.4f}" for i, ((x, y), t) in
                                    enumerate(zip(grid.coords.tolist(), grid.tissue.tolist()))]
    atomic_write_text(stem.with_suffix(".csv"), "\n".join(lines) + "\n")
    meta = {"version": COORDS_VERSION, "slide": slide.describe(), "level_choice": asdict(grid.choice),
            "grid": list(grid.grid), "tiles": len(grid), "min_tissue": grid.min_tissue,
            "coordinates": "level-0 pixels of each tile's top-left corner; tile side = level_choice.tile0 level-0 px",
            "tissue_mask": None if tissue is None else {"downsample": tissue.downsample, "threshold": tissue.threshold,
                                                        "fraction": tissue.fraction,
                                                        "method": f"saturation-{tissue.method}"},
            **(extra or {})}
    atomic_write_text(stem.with_suffix(".json"), json.dumps(meta, indent=2))
    return stem.with_suffix(".csv"), stem.with_suffix(".json")


def load_coords(stem: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read what :func:`save_coords` wrote: (coords (N, 2) int64, tissue (N,), metadata)."""
    stem = Path(stem)
    meta = json.loads(stem.with_suffix(".json").read_text())
    with open(stem.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    coords = np.array([[int(r["x"]), int(r["y"])] for r in rows], np.int64).reshape(-1, 2)
    tissue = np.array([float(r["tissue"]) for r in rows], np.float32)
    if len(coords) != meta["tiles"]:
        raise SlideError(stem.with_suffix(".csv"), f"holds {len(coords)} tiles but its JSON says {meta['tiles']}")
    return coords, tissue, meta


def level_choice_from_dict(d: dict) -> LevelChoice:
    return LevelChoice(**d)
