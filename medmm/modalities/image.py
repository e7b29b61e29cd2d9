"""2D images: the one transform from a DICOM radiograph (one frame) to the ``(S, S[, 3])`` array in [0, 1].

``medmm prepare dicom`` writes :func:`dicom_image`'s output into its shards for single-image series; the ``image``
loader (:mod:`medmm.data.loaders`) calls it for a raw DICOM file at serving time, with the :class:`ImageOptions`
that prepare recorded and training copied into the checkpoint's ``preprocess``. Both then go through the loader's
channel expansion, resize to the encoder's ``image_size`` and mean/std normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import PreprocessConfig
from ..errors import ConfigError
from ..io.dicom import read_dicom, window
from .volume import check_window


@dataclass(frozen=True)
class ImageOptions:
    """How one DICOM frame becomes an image array: window and size; values in [0, 1], stored as float16."""

    kind = "image"
    """The key of these options in ``manifest.json``'s ``preprocess`` and in a shard sample's metadata."""
    loaders = ("image",)
    """The runtime loaders these options configure."""

    window: str | None = None
    """Window preset; None = ``window_fallback``."""
    window_fallback: str = "file"
    """Without a preset: ``file`` (the file's VOI transform: VOI LUT sequence, else WindowCenter/Width; else
    min-max) or ``minmax``."""
    size: int | None = 224
    """Side of the square image; None keeps the frame's size (the loader then resizes to ``image_size``)."""

    def __post_init__(self):
        check_window(self.window, self.window_fallback, "image")
        if self.size is not None and int(self.size) < 1:
            raise ConfigError(f"image size must be positive, got {self.size}")

    def to_record(self) -> dict:
        return {"window": self.window, "window_fallback": self.window_fallback, "size": self.size,
                "range": [0.0, 1.0], "dtype": "float16"}

    @classmethod
    def from_record(cls, rec: dict) -> ImageOptions:
        return cls(window=rec.get("window"), window_fallback=rec.get("window_fallback", "file"), size=rec.get("size"))

    def preprocess_fields(self) -> dict:
        """These options as ``PreprocessConfig`` fields (what training copies into the checkpoint)."""
        return {"window": self.window, "window_fallback": self.window_fallback, "prepared_image_size": self.size}

    @classmethod
    def from_preprocess(cls, pre: PreprocessConfig) -> ImageOptions:
        return cls(window=pre.window, window_fallback=pre.window_fallback, size=pre.prepared_image_size)


def resize_2d(arr: np.ndarray, size: int | None) -> np.ndarray:
    """(H, W) or (H, W, 3) in [0, 1] -> (size, size[, 3]) float32 (bilinear, antialiased); None keeps it."""
    import torch

    if size is None:
        return np.asarray(arr, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(arr)).float()
    t = t.permute(2, 0, 1) if t.ndim == 3 else t[None]  # (C, H, W)
    t = torch.nn.functional.interpolate(t[None], size=(size, size), mode="bilinear", antialias=True)[0]
    return (t.permute(1, 2, 0) if t.shape[0] == 3 else t[0]).numpy()


def dicom_image(path: str | Path, opts: ImageOptions) -> tuple[np.ndarray, dict]:
    """The transform: a DICOM file's middle frame -> windowed, resized float32 ``(S, S)`` (grey) or ``(S, S, 3)``
    (colour) in [0, 1], and the file's metadata (:func:`medmm.io.dicom.read_dicom`).

    Grey frames: the preset window if given; else (fallback ``file``) the file's VOI transform, MONOCHROME1
    inverted after it; else min-max. Colour frames are clipped to [0, 1].
    """
    img = read_dicom(path, apply_voi=opts.window is None and opts.window_fallback == "file")
    frame = img.pixels[img.pixels.shape[0] // 2]
    if img.is_color or img.meta.get("voi"):
        arr = np.clip(frame, 0.0, 1.0)
    else:
        arr = window(frame, opts.window)
    return resize_2d(arr, opts.size), img.meta
