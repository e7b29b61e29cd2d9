"""Modalities: per modality, its preprocessing options and THE transform that prepare, training and serving share.

A modality module owns one options dataclass (what ``medmm prepare`` records in ``manifest.json`` and in every
shard sample, and what training copies into the checkpoint's ``preprocess``) and one transform from a raw input to
the array stored in the shards. ``medmm prepare`` calls the transform to write shards; the runtime loaders
(:mod:`medmm.data.loaders`) call the same transform on raw inputs, with the options read back from the checkpoint,
so what a model was trained on is what it is served.

- :mod:`.volume`: CT/MR series -> windowed, resampled, resized ``(D, H, W)`` in [0, 1];
- :mod:`.image`: a DICOM radiograph (one frame) -> windowed, resized ``(S, S[, 3])`` in [0, 1];
- :mod:`.slide`: a whole-slide tile -> ``(T, T, 3)`` uint8 at the recorded magnification;
- :mod:`.prepared`: reading the recorded options back and copying them into a model config.

Layer: above :mod:`medmm.io` (the readers), below :mod:`medmm.prepare` and :mod:`medmm.data`.
"""

from __future__ import annotations

from .image import ImageOptions, dicom_image
from .prepared import OPTIONS, adopt_prepared, options_for_loader
from .slide import TileOptions, slide_tile
from .volume import VolumeOptions, load_volume, volume_array

__all__ = ["OPTIONS", "ImageOptions", "TileOptions", "VolumeOptions", "adopt_prepared", "dicom_image", "load_volume",
           "options_for_loader", "slide_tile", "volume_array"]
