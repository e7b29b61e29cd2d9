"""PNG/JPEG (and other Pillow formats) -> float32 arrays in [0, 1], shape (H, W, C).

An image is refused before it is decoded when its header declares more than ``MAX_PIXELS`` pixels: a few bytes of
PNG can declare 100000 x 100000 pixels (a decompression bomb), and every model here resizes to a few hundred
pixels anyway. The cap is Pillow's own ``Image.MAX_IMAGE_PIXELS`` default, applied as an error rather than
Pillow's warning, and whatever ``Image.MAX_IMAGE_PIXELS`` is set to.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ImageError, excerpt
from .files import open_regular

RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
MAX_PIXELS = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS: ~0.25 GiB as RGB bytes, ~1 GiB as float32 RGB


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read a raster image as float32 (H, W, 3) in [0, 1]; alpha is dropped, grey is repeated.

    Args:
        path: the image file; it must be a regular file (a FIFO or device is refused, never opened blocking).
        max_pixels: the most pixels (width x height) the header may declare; raise it deliberately for big scans.

    Raises:
        ImageError: missing or non-regular file, unreadable image, or more pixels than ``max_pixels``.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    with open_regular(path, ImageError) as f:
        try:
            with Image.open(f) as im:  # reads the header only
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError(path, f"declares {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                                           "(a decompression bomb?); not decoded")
                im.load()
                if im.mode in ("I;16", "I;16B", "I"):
                    arr = np.asarray(im, dtype=np.float32)
                    rng = float(arr.max() - arr.min()) or 1.0
                    arr = (arr - arr.min()) / rng
                    return np.repeat(arr[..., None], 3, axis=-1)
                arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        except ImageError:
            raise
        except Image.DecompressionBombError as e:  # Pillow's own guard, when its limit is below ours
            raise ImageError(path, f"over Pillow's pixel limit (a decompression bomb?); not decoded ({e})") from e
        except UnidentifiedImageError as e:  # its message repeats the file object; the path is the source already
            raise ImageError(path, "not a readable image (format not recognised)") from e
        except Exception as e:  # Pillow's decoders raise many types on corrupt data: all are this file's problem
            raise ImageError(path, f"not a readable image ({type(e).__name__}: {excerpt(e, 200)})") from e
    return arr
