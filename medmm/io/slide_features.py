"""A slide's tile features on disk (``medmm prepare wsi --features``): safetensors with the tile coordinates and the
extraction settings in its header (or a plain ``.npy``), and the slide and patient ids derived from file names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..errors import SlideError
from .files import check_regular_file

FEATURES_FORMAT = "medmm.slide_features/1"


def slide_id(path: str | Path) -> str:
    """A key-safe id from the file name: webdataset splits keys at the first dot, so dots become '_'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).stem)


def patient_id(sid: str) -> str:
    """TCGA barcodes share the patient in their first 12 characters (TCGA-XX-XXXX); otherwise the slide is its own."""
    m = re.match(r"(?i)^(tcga-[a-z0-9]{2}-[a-z0-9]{4})", sid)
    return m.group(1).upper() if m else sid


def save_slide_features(path: str | Path, features: np.ndarray, coords: np.ndarray | None, meta: dict) -> Path:
    """Write a slide's tile features ``(N, D)`` (+ level-0 coords ``(N, 2)``) as safetensors, metadata in the header."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"features": np.ascontiguousarray(features, dtype=np.float32)}
    if coords is not None:
        tensors["coords"] = np.ascontiguousarray(coords, dtype=np.int64)
    md = {"format": FEATURES_FORMAT, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=md)
    tmp.replace(path)
    return path


def _feature_file(path: str | Path) -> Path:
    """``path`` as a feature file that may be opened: it exists, is a regular file (a FIFO would block the read)
    and ends in ``.safetensors`` or ``.npy``; else a SlideError naming it."""
    path = Path(path)
    if not path.exists():
        raise SlideError(path, "feature file not found")
    check_regular_file(path, SlideError)
    if path.suffix not in (".npy", ".safetensors"):
        raise SlideError(path, "tile features must be .safetensors or .npy")
    return path


def feature_shape(path: str | Path) -> tuple[int, int]:
    """(tiles, width) of a tile-feature file, read from its header only."""
    path = _feature_file(path)
    try:
        if path.suffix == ".npy":
            shape = np.load(path, mmap_mode="r").shape
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as f:
                if "features" not in set(f.keys()):
                    raise SlideError(path, f"no 'features' tensor (has {sorted(f.keys())})")
                shape = tuple(f.get_slice("features").get_shape())
    except SlideError:
        raise
    except Exception as e:
        raise SlideError(path, f"unreadable feature file: {type(e).__name__}: {e}") from e
    if len(shape) != 2:
        raise SlideError(path, f"features must be (tiles, dim), got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def load_slide_features(path: str | Path) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(features (N, D) float32, coords (N, 2) or None, metadata) from ``.safetensors`` or ``.npy``.

    Raises:
        SlideError: missing or unreadable file, or not a 2-D feature matrix.
    """
    path = _feature_file(path)
    try:
        if path.suffix == ".npy":
            feats, coords, meta = np.load(path, allow_pickle=False), None, {}
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as f:
                keys = set(f.keys())
                if "features" not in keys:
                    raise SlideError(path, f"no 'features' tensor (has {sorted(keys)})")
                feats = f.get_tensor("features")
                coords = f.get_tensor("coords") if "coords" in keys else None
                raw = f.metadata() or {}
            meta = {}
            for k, v in raw.items():
                try:
                    meta[k] = json.loads(v)
                except json.JSONDecodeError:
                    meta[k] = v
    except SlideError:
        raise
    except Exception as e:
        raise SlideError(path, f"unreadable feature file: {type(e).__name__}: {e}") from e
    if feats.ndim != 2:
        raise SlideError(path, f"features must be (tiles, dim), got shape {tuple(feats.shape)}")
    if coords is not None and coords.shape != (feats.shape[0], 2):
        raise SlideError(path, f"coords shape {tuple(coords.shape)} does not match {feats.shape[0]} tiles")
    return feats.astype(np.float32, copy=False), coords, meta
