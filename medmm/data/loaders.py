"""Modality input loaders: a raw value (path, SMILES, sequence) -> the tensor an encoder takes.

Registry: ``image`` (PNG/JPEG/DICOM -> (C, S, S)), ``volume`` (DICOM series folder or multi-frame
file -> (1, D, H, W)), ``smiles_fingerprint`` (SMILES -> (bits,)), ``dna_tokens`` (sequence or FASTA
-> (L,) ids + mask). Each loader also collates a list of items and makes a dummy item, which the
trainer feeds when a batch lacks the modality (every rank must run every encoder under ZeRO-3).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import PreprocessConfig
from ..errors import InvalidInputError, SequenceError

Item = dict[str, torch.Tensor]


def _resolve(value: str, base_dir: Path | None) -> Path:
    p = Path(value).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return p


def _is_array_ref(value: Any) -> bool:
    v = str(value)
    return ".tar#" in v or v.endswith((".npz", ".npy"))


def _read_array(value: Any, base_dir: Path | None) -> np.ndarray:
    from .prepare_dicom import read_shard_array

    return np.asarray(read_shard_array(str(value), base_dir), dtype=np.float32)


class ModalityLoader:
    """Base class. Subclasses implement ``load``; ``collate`` stacks fixed-size items."""

    name = ""

    def __init__(self, pre: PreprocessConfig):
        self.pre = pre

    def load(self, value: Any, base_dir: Path | None = None) -> Item:  # pragma: no cover - interface
        raise NotImplementedError

    def dummy(self) -> Item:  # pragma: no cover - interface
        raise NotImplementedError

    def collate(self, items: list[Item]) -> Item:
        return {"x": torch.stack([it["x"] for it in items])}


class ImageLoader(ModalityLoader):
    """2D image: PNG/JPEG via Pillow or DICOM (windowed; middle frame of a multi-frame file)."""

    name = "image"

    def load(self, value: Any, base_dir: Path | None = None) -> Item:
        from ..io.dicom import is_dicom_file, read_dicom, window
        from ..io.images import read_image

        if _is_array_ref(value):  # preprocessed by `prepare dicom`: [0, 1], (H, W) or (H, W, 3)
            arr = _read_array(value, base_dir)
            return {"x": self.to_tensor(arr[..., None] if arr.ndim == 2 else arr)}
        path = _resolve(str(value), base_dir)
        if is_dicom_file(path):
            img = read_dicom(path, apply_voi=self.pre.window is None)
            frame = img.pixels[img.pixels.shape[0] // 2]
            if img.is_color or img.meta.get("voi"):
                arr = np.clip(frame, 0.0, 1.0)
                arr = arr if img.is_color else arr[..., None]
            else:
                arr = window(frame, self.pre.window)[..., None]
        else:
            arr = read_image(path)
        return {"x": self.to_tensor(arr)}

    def to_tensor(self, arr: np.ndarray) -> torch.Tensor:
        """(H, W, C) in [0, 1] -> normalised (channels, S, S)."""
        t = torch.from_numpy(np.ascontiguousarray(arr)).float().permute(2, 0, 1)  # (C, H, W)
        c = self.pre.channels
        if t.shape[0] == 1 and c == 3:
            t = t.expand(3, -1, -1)
        elif t.shape[0] == 3 and c == 1:
            t = t.mean(0, keepdim=True)
        s = self.pre.image_size
        t = F.interpolate(t[None], size=(s, s), mode="bilinear", align_corners=False, antialias=True)[0]
        mean = torch.tensor(self.pre.mean).view(-1, 1, 1)
        std = torch.tensor(self.pre.std).view(-1, 1, 1)
        return (t.clamp(0, 1) - mean) / std

    def dummy(self) -> Item:
        s = self.pre.image_size
        return {"x": torch.zeros(self.pre.channels, s, s)}


class VolumeLoader(ModalityLoader):
    """3D volume: a DICOM series folder (or multi-frame file) -> windowed, resized (1, D, H, W)."""

    name = "volume"

    def load(self, value: Any, base_dir: Path | None = None) -> Item:
        from monai.transforms import Resize

        from ..io.dicom import read_series, window

        if _is_array_ref(value):  # preprocessed by `prepare dicom`: (D, H, W) in [0, 1]
            arr = _read_array(value, base_dir).astype(np.float32)
        else:
            vol, _report = read_series(_resolve(str(value), base_dir))
            arr = window(vol.numpy()[0], self.pre.window)  # (D, H, W) in [0, 1]
        t = Resize(tuple(self.pre.volume_size), mode="trilinear")(torch.from_numpy(arr)[None])
        return {"x": torch.as_tensor(t).float()}

    def dummy(self) -> Item:
        return {"x": torch.zeros(1, *self.pre.volume_size)}


class FingerprintLoader(ModalityLoader):
    """SMILES -> standardised molecule -> Morgan fingerprint (bits,)."""

    name = "smiles_fingerprint"

    def load(self, value: Any, base_dir: Path | None = None) -> Item:
        from ..io.molecules import morgan_fingerprint, parse_smiles

        mol = parse_smiles(str(value), source=f"SMILES '{value}'")
        fp = morgan_fingerprint(mol, self.pre.fingerprint_bits, self.pre.fingerprint_radius)
        return {"x": torch.from_numpy(fp)}

    def dummy(self) -> Item:
        return {"x": torch.zeros(self.pre.fingerprint_bits)}


class DnaLoader(ModalityLoader):
    """DNA sequence string, or a FASTA path (first record) -> k-mer ids (L,) + mask, padded in collate."""

    name = "dna_tokens"

    def load(self, value: Any, base_dir: Path | None = None) -> Item:
        from ..io.genomics import FASTA_SUFFIXES, read_fasta, tokenize

        text = str(value)
        source = "<sequence>"
        path = _resolve(text, base_dir) if len(text) < 4096 else None
        if path is not None and (path.suffix.lower() in FASTA_SUFFIXES or "".join(path.suffixes[-2:]) in
                                 FASTA_SUFFIXES) :
            if not path.exists():
                raise SequenceError(path, "FASTA file not found")
            source, text = str(path), read_fasta(path)[0][1]
        ids = torch.from_numpy(tokenize(text, self.pre.kmer, self.pre.max_length, source=source))
        return {"x": ids, "mask": torch.ones_like(ids, dtype=torch.bool)}

    def collate(self, items: list[Item]) -> Item:
        n = max(it["x"].shape[0] for it in items)
        x = torch.zeros(len(items), n, dtype=torch.long)
        m = torch.zeros(len(items), n, dtype=torch.bool)
        for i, it in enumerate(items):
            x[i, : it["x"].shape[0]] = it["x"]
            m[i, : it["x"].shape[0]] = True
        return {"x": x, "mask": m}

    def dummy(self) -> Item:
        ids = torch.full((8,), 2, dtype=torch.long)
        return {"x": ids, "mask": torch.ones(8, dtype=torch.bool)}


_LOADERS: dict[str, Callable[[PreprocessConfig], ModalityLoader]] = {
    "image": ImageLoader,
    "volume": VolumeLoader,
    "smiles_fingerprint": FingerprintLoader,
    "dna_tokens": DnaLoader,
}


def register_loader(name: str, cls: Callable[[PreprocessConfig], ModalityLoader]) -> None:
    _LOADERS[name] = cls


def list_loaders() -> list[str]:
    return sorted(_LOADERS)


def build_loader(name: str, pre: PreprocessConfig) -> ModalityLoader:
    if name not in _LOADERS:
        raise KeyError(f"unknown modality loader '{name}'; registered: {', '.join(list_loaders())}")
    return _LOADERS[name](pre)


__all__ = ["InvalidInputError", "ModalityLoader", "build_loader", "list_loaders", "register_loader"]
