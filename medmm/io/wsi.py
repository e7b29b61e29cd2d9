"""Whole-slide images -> tiles at a target resolution: reading, MPP and level choice, tissue mask, tile grid.

Two readers behind one :class:`Slide` interface (``read_region`` takes level-0 coordinates, as OpenSlide):

- OpenSlide (the ``openslide-python`` + ``openslide-bin`` wheels; no system library): SVS, NDPI,
  MRXS, SCN, Philips/Ventana TIFF, DICOM WSI and tiled generic TIFF.
- tifffile for plain (stripped) and pyramidal TIFF, including SubIFD pyramids that OpenSlide reads
  as a single level. ``backend="auto"`` uses it for TIFFs OpenSlide would treat as generic TIFF.

Resolution: microns per pixel (MPP) come from the slide's metadata (OpenSlide's ``openslide.mpp-x``;
for TIFF the Aperio ``MPP =`` description, OME ``PhysicalSizeX`` or the resolution tags). A slide
without it raises :class:`SlideError` unless the caller passes ``slide_mpp`` (nothing is guessed from
the objective power). :func:`select_level` picks the coarsest level at least as fine as the target
MPP (never upsampling) and the read size that gives ``tile_size`` pixels at the target MPP.

Tissue: :func:`tissue_mask` thresholds the saturation of a low-resolution image (``mask_mpp`` µm per
pixel, 8 by default) with Otsu's method, after a median filter, then removes specks and fills holes.
Otsu is 15 lines of numpy here; scikit-image or OpenCV would add a large dependency for one function.
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

# Suffixes ``prepare wsi`` picks up in a folder (MRXS: the .mrxs file; its data folder sits beside it).
WSI_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff"}
TIFF_SUFFIXES = {".tif", ".tiff"}
# MPPs outside this range come from screen-default resolution tags (72 dpi = 352.8 µm), not a microscope.
_MPP_RANGE = (0.01, 100.0)


# --------------------------------------------------------------------------------------------
# Slides


class Slide:
    """A whole-slide image: levels, base MPP, and RGB regions read in level-0 coordinates.

    Attributes:
        path: the file.
        backend: ``openslide`` or ``tifffile``.
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
        path: the slide file.
        slide_mpp: base microns per pixel to use when the slide's metadata has none (the metadata wins otherwise).
        backend: ``auto`` | ``openslide`` | ``tifffile``.

    Raises:
        SlideError: missing, unsupported, corrupt or truncated file.
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(path, "file not found")
    if path.is_dir():
        raise SlideError(path, "is a folder, not a slide file")
    if backend == "auto":
        backend = choose_backend(path)
    if backend == "openslide":
        slide: Slide = OpenSlideSlide(path)
    elif backend == "tifffile":
        slide = TiffSlide(path)
    else:
        raise ValueError(f"unknown slide backend '{backend}' (auto | openslide | tifffile)")
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
    """Saturation threshold (Otsu, floored at ``min_saturation``)."""

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


def detect_tissue(rgb: np.ndarray, min_saturation: float = 0.05, median: int = 5, min_object_px: int = 16,
                  remove_pen: bool = True) -> tuple[np.ndarray, float]:
    """Tissue mask of a low-resolution RGB image: median-filtered saturation > Otsu threshold.

    The threshold is floored at ``min_saturation`` so a blank slide (only glass) gives an empty mask
    instead of splitting noise in two. With ``remove_pen``, pen-ink pixels (and a 1-pixel rim) are
    left out of the threshold and the mask. Small objects (< ``min_object_px``) are removed, holes filled.
    """
    from scipy import ndimage as ndi

    sat = saturation(rgb)
    if median > 1 and min(sat.shape) >= median:
        sat = ndi.median_filter(sat, size=median)
    pen = ndi.binary_dilation(pen_mask(rgb)) if remove_pen else np.zeros(sat.shape, bool)
    values = sat[~pen] if (~pen).any() else sat
    thr = max(otsu_threshold(values), min_saturation)
    mask = (sat > thr) & ~pen
    if mask.any():
        labels, n = ndi.label(mask)
        sizes = ndi.sum(mask, labels, range(1, n + 1))
        keep = np.zeros(n + 1, bool)
        keep[1:] = sizes >= min_object_px
        mask = ndi.binary_fill_holes(keep[labels])
    return mask, float(thr)


def tissue_mask(slide: Slide, mask_mpp: float = 8.0, max_side: int = 8192) -> TissueMask:
    """Tissue mask at ``mask_mpp`` µm per pixel (or 1/``max_side`` of the slide when the MPP is unknown)."""
    w0, h0 = slide.dimensions[0]
    ds = mask_mpp / slide.mpp if slide.mpp else max(w0, h0) / 2048
    ds = max(1.0, ds, max(w0, h0) / max_side)
    thumb = slide.read_downsampled(ds)
    mask, thr = detect_tissue(thumb)
    return TissueMask(mask, thumb, ds, thr)


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
                                                        "fraction": tissue.fraction, "method": "otsu-saturation"},
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
