"""Whole-slide tiles: the one transform from a slide to its tiles, at the magnification prepare recorded.

``medmm prepare wsi`` lays its tile grid with :func:`tile_plan` and reads tiles with :func:`read_tiles`; the
``slide_tiles`` loader (:mod:`medmm.data.loaders`) does the same at serving time, with the :class:`TileOptions`
that prepare recorded and training copied into the checkpoint's ``preprocess``. Tiles are RGB uint8; the loaders
scale them to [0, 1] (lossless PNG shards keep them exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import PreprocessConfig
from ..errors import ConfigError
from ..io.wsi import LevelChoice, Slide, TileGrid, read_tile, select_level, tile_grid, tissue_mask


@dataclass(frozen=True)
class TileOptions:
    """Which tiles a slide yields and at what magnification."""

    kind = "slide_tile"
    """The key of these options in ``manifest.json``'s ``preprocess`` and in a shard sample's metadata."""
    loaders = ("slide_tiles", "image")
    """The runtime loaders these options configure (tile shards train the ``image`` loader)."""

    mpp: float = 0.5
    """Microns per pixel of the tiles (the magnification)."""
    tile: int = 224
    """Tile side in pixels at ``mpp``."""
    min_tissue: float = 0.5
    """Least tissue fraction (Otsu mask) of a kept tile."""
    mask_mpp: float = 8.0
    """Microns per pixel of the tissue mask."""
    scan_mpp: float | None = None
    """Scan MPP assumed for slides whose metadata has none."""

    def __post_init__(self):
        if self.mpp <= 0 or self.tile < 1 or self.mask_mpp <= 0:
            raise ConfigError(f"tile options need positive mpp, tile and mask_mpp, got {self}")

    def to_record(self) -> dict:
        return {"mpp": self.mpp, "tile": self.tile, "min_tissue": self.min_tissue, "mask_mpp": self.mask_mpp,
                "scan_mpp": self.scan_mpp, "range": [0, 255], "dtype": "uint8"}

    @classmethod
    def from_record(cls, rec: dict) -> TileOptions:
        return cls(mpp=float(rec["mpp"]), tile=int(rec["tile"]), min_tissue=float(rec.get("min_tissue", 0.5)),
                   mask_mpp=float(rec.get("mask_mpp", 8.0)), scan_mpp=rec.get("scan_mpp"))

    def preprocess_fields(self) -> dict:
        """These options as ``PreprocessConfig`` fields (what training copies into the checkpoint)."""
        return {"slide_mpp": self.mpp, "slide_tile": self.tile, "slide_min_tissue": self.min_tissue,
                "slide_mask_mpp": self.mask_mpp, "slide_scan_mpp": self.scan_mpp}

    @classmethod
    def from_preprocess(cls, pre: PreprocessConfig) -> TileOptions:
        return cls(mpp=pre.slide_mpp, tile=pre.slide_tile, min_tissue=pre.slide_min_tissue,
                   mask_mpp=pre.slide_mask_mpp, scan_mpp=pre.slide_scan_mpp)


def tile_plan(slide: Slide, opts: TileOptions) -> tuple[LevelChoice, TileGrid, object]:
    """The level read at ``opts.mpp``, the tissue mask and the grid of kept tiles: ``(choice, grid, mask)``."""
    choice = select_level(slide, opts.mpp, opts.tile)
    mask = tissue_mask(slide, opts.mask_mpp)
    return choice, tile_grid(slide, choice, mask, opts.min_tissue), mask


def read_tiles(slide: Slide, choice: LevelChoice, coords: np.ndarray) -> np.ndarray:
    """The transform: tiles with level-0 top-left ``coords`` (N, 2) -> RGB uint8 (N, T, T, 3)."""
    if len(coords) == 0:
        return np.zeros((0, choice.tile_size, choice.tile_size, 3), np.uint8)
    return np.stack([read_tile(slide, choice, int(x), int(y)) for x, y in coords])


def slide_tile(slide: Slide, opts: TileOptions, x: int, y: int) -> np.ndarray:
    """One tile (T, T, 3) uint8 at level-0 ``(x, y)`` and ``opts``' magnification."""
    return read_tiles(slide, select_level(slide, opts.mpp, opts.tile), np.array([[x, y]]))[0]
