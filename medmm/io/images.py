"""PNG/JPEG (and other Pillow formats) -> float32 arrays in [0, 1], shape (H, W, C)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ImageError

RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def read_image(path: str | Path) -> np.ndarray:
    """Read a raster image as float32 (H, W, 3) in [0, 1]; alpha is dropped, grey is repeated."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I"):
                arr = np.asarray(im, dtype=np.float32)
                rng = float(arr.max() - arr.min()) or 1.0
                arr = (arr - arr.min()) / rng
                return np.repeat(arr[..., None], 3, axis=-1)
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except FileNotFoundError as e:
        raise ImageError(path, "file not found") from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(path, f"not a readable image ({e})") from e
    return arr
