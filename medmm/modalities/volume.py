"""CT/MR volumes: the one transform from an assembled DICOM series to the ``(D, H, W)`` array a volume encoder takes.

``medmm prepare dicom`` writes :func:`volume_array`'s output into its shards (float16); the ``volume`` loader
(:mod:`medmm.data.loaders`) applies the same function to a raw series at serving time (``infer.py``, the HTTP API,
the DIMSE listener, the study pipeline), with the :class:`VolumeOptions` that prepare recorded and training copied
into the checkpoint's ``preprocess``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import PreprocessConfig
from ..errors import ConfigError, DicomError
from ..io.dicom import WINDOW_PRESETS, read_volumes, window

WINDOW_FALLBACKS = ("file", "minmax")
"""What a volume or image without a window preset is windowed with: ``file`` = the file's own window (its VOI
transform for a single image), else min-max; ``minmax`` = min-max of the values."""


def check_window(window: str | None, fallback: str, what: str) -> None:
    """ConfigError for an unknown preset or fallback (``what`` names the setting)."""
    if window is not None and window not in WINDOW_PRESETS:
        raise ConfigError(f"{what}.window: unknown preset {window!r}; known: {', '.join(WINDOW_PRESETS)}")
    if fallback not in WINDOW_FALLBACKS:
        raise ConfigError(f"{what}.window_fallback must be one of {', '.join(WINDOW_FALLBACKS)}, not {fallback!r}")


@dataclass(frozen=True)
class VolumeOptions:
    """How a series becomes a volume array: window, resampling, size; values in [0, 1], stored as float16."""

    kind = "volume"
    """The key of these options in ``manifest.json``'s ``preprocess`` and in a shard sample's metadata."""
    loaders = ("volume",)
    """The runtime loaders these options configure."""

    window: str | None = None
    """Window preset (lung, mediastinum, bone, brain, abdomen); None = ``window_fallback``."""
    window_fallback: str = "file"
    """Without a preset: ``file`` (the first slice's WindowCenter/Width, else min-max) or ``minmax``."""
    spacing: tuple[float, float, float] | None = None
    """Resample to this spacing in mm (slice, row, column) with MONAI ``Spacing`` before resizing; None keeps
    the grid."""
    size: tuple[int, int, int] = (32, 128, 128)
    """(D, H, W) after resampling."""

    def __post_init__(self):
        check_window(self.window, self.window_fallback, "volume")
        if len(self.size) != 3:
            raise ConfigError(f"volume size needs 3 numbers (D, H, W), got {self.size}")
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ConfigError(f"volume spacing needs 3 positive numbers (mm), got {self.spacing}")
        # tuples of floats/ints, so that options read back from JSON compare equal to the ones written
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        if self.spacing is not None:
            object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))

    def to_record(self) -> dict:
        """The JSON written into the manifest and each shard sample (normalisation and dtype for the reader)."""
        return {"window": self.window, "window_fallback": self.window_fallback,
                "spacing": list(self.spacing) if self.spacing else None, "size": list(self.size),
                "range": [0.0, 1.0], "dtype": "float16"}

    @classmethod
    def from_record(cls, rec: dict) -> VolumeOptions:
        return cls(window=rec.get("window"), window_fallback=rec.get("window_fallback", "file"),
                   spacing=tuple(rec["spacing"]) if rec.get("spacing") else None, size=tuple(rec["size"]))

    def preprocess_fields(self) -> dict:
        """These options as ``PreprocessConfig`` fields (what training copies into the checkpoint)."""
        return {"window": self.window, "window_fallback": self.window_fallback,
                "spacing": list(self.spacing) if self.spacing else None, "prepared_volume_size": list(self.size)}

    @classmethod
    def from_preprocess(cls, pre: PreprocessConfig) -> VolumeOptions:
        """The options a checkpoint's ``preprocess`` serves with (the model's ``volume_size`` when prepare's size
        was never recorded)."""
        return cls(window=pre.window, window_fallback=pre.window_fallback,
                   spacing=tuple(pre.spacing) if pre.spacing else None,
                   size=tuple(pre.prepared_volume_size or pre.volume_size))


def volume_array(volume, file_window: tuple[float, float] | None, opts: VolumeOptions) -> np.ndarray:
    """The transform: a ``(1, D, H, W)`` MetaTensor in modality units (RAS affine) -> float32 ``opts.size`` in [0, 1].

    Windowed first (preset, else the file's window or min-max), then resampled to ``opts.spacing`` (bilinear, onto
    an orthogonal grid: this undoes gantry tilt), then resized (trilinear).
    """
    import torch
    from monai.transforms import Resize, Spacing

    fallback = file_window if opts.window_fallback == "file" else None
    data = window(np.asarray(volume.numpy()[0]), opts.window, fallback)  # (D, H, W) in [0, 1]
    vol = volume.__class__(torch.from_numpy(data)[None], affine=volume.affine)  # (1, D, H, W)
    if opts.spacing:
        vol = Spacing(pixdim=opts.spacing, diagonal=True, mode="bilinear")(vol)
    out = torch.as_tensor(Resize(opts.size, mode="trilinear")(vol))[0]  # (D, H, W)
    return out.numpy().astype(np.float32, copy=False)


def read_volume(path: str | Path):
    """A series folder (or one multi-frame file) -> its one :class:`~medmm.io.dicom.SeriesVolume` (grey).

    Raises:
        DicomError: no volume, several volumes (acquisitions, echoes, orientations), or colour images.
    """
    asm = read_volumes(Path(path))
    if not asm.volumes:
        raise DicomError(path, asm.reason or "no volume in the series")
    if len(asm.volumes) > 1:
        raise DicomError(path, f"the series holds {len(asm.volumes)} volumes ({asm.reason}); pick one")
    vol = asm.volumes[0]
    if vol.is_color:
        raise DicomError(path, "colour images do not form a volume")
    return vol


def load_volume(path: str | Path, opts: VolumeOptions) -> np.ndarray:
    """A raw series -> :func:`volume_array` (the serving side of what ``prepare dicom`` stores)."""
    vol = read_volume(path)
    return volume_array(vol.array, vol.meta.get("window"), opts)

