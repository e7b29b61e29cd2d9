"""Reading back what ``medmm prepare`` stored: one array of a webdataset shard (``shard-000000.tar#key.npz``) or a
plain ``.npz``/``.npy`` file. Runtime loaders and the preparing commands share it, so a shard is read one way."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..errors import DicomError, InvalidInputError
from .files import check_regular_file


def read_shard_array(ref: str, base_dir: Path | None = None) -> np.ndarray:
    """``shard-000000.tar#key.npz`` (or a plain .npz/.npy path) -> the stored array."""
    import tarfile

    path, _, member = str(ref).partition("#")
    p = Path(path)
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    if not p.exists():
        raise InvalidInputError(p, "array file not found")
    check_regular_file(p)  # a FIFO named like a shard would block the read below
    if member:
        index = _TAR_INDEX.get(str(p))
        if index is None:
            with tarfile.open(p) as tf:
                index = {m.name: (m.offset_data, m.size) for m in tf.getmembers()}
            _TAR_INDEX[str(p)] = index
        if member not in index:
            raise InvalidInputError(f"{p}#{member}", "member not in the shard")
        off, size = index[member]
        with open(p, "rb") as f:
            f.seek(off)
            data = f.read(size)
        src = io.BytesIO(data)
    else:
        src = p
    try:
        loaded = np.load(src)
        return loaded["arr"] if hasattr(loaded, "files") else loaded
    except Exception as e:
        raise DicomError(ref, f"stored array cannot be read ({e})") from e


_TAR_INDEX: dict[str, dict] = {}
