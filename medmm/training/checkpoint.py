"""Atomic DeepSpeed checkpoints and the final model folder.

Layout of ``<output_dir>/checkpoints``::

    step-00000050/     one DeepSpeed checkpoint (model, optimizer, scheduler, trainer state)
    latest             the tag of the newest complete checkpoint

A checkpoint is written under ``.tmp/`` by every rank, then renamed into place by rank 0, and only
then does ``latest`` (written atomically) point at it: a run killed mid-save resumes from the
previous checkpoint.

``--resume`` reads the checkpoint as tensors and plain data only: DeepSpeed's own checkpoint engine unpickles with
``weights_only=False`` (a crafted ``.pt`` in the folder would run code), so :func:`load_checkpoint` first scans
every ``.pt`` of the tag folder for pickled globals outside PyTorch's weights-only set and the few DeepSpeed
classes its optimizer states hold (:func:`deepspeed_safe_globals`), refusing the folder with a
:class:`CheckpointError` before anything is unpickled, then lends DeepSpeed an engine whose ``load`` is
``torch.load(weights_only=True)`` for the duration of the load. ``--trust-checkpoint`` skips both (DeepSpeed's
own loading: only for a folder you wrote yourself with code that saved other objects).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path

from ..errors import ConfigError, MedmmError, excerpt
from ..utils import atomic_write_text
from .distributed import barrier, is_main

log = logging.getLogger(__name__)


TAG = re.compile(r"^step-\d{8,}$")  # the tags :func:`tag_for` writes; ``latest`` naming anything else is refused
TRUST_HINT = ("resume with --trust-checkpoint only if you wrote this folder yourself and trust every file in it "
              "(DeepSpeed then unpickles it, which can run code)")


class CheckpointError(MedmmError, ValueError):
    """A checkpoint folder is refused on ``--resume``: a file holds pickled objects that are not tensors or plain
    data (a pickle that could run code), or is not a torch zip checkpoint. ``path`` names the file."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {reason}; refused before loading it. {TRUST_HINT}")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def latest_tag(root: str | Path) -> str | None:
    """The newest complete checkpoint's tag, or None."""
    f = Path(root) / "latest"
    if not f.exists():
        return None
    tag = f.read_text().strip()
    return tag if (Path(root) / tag).is_dir() else None


def save_checkpoint(engine, root: str | Path, step: int, client_state: dict, keep_last: int = 2) -> Path:
    """Write a DeepSpeed checkpoint atomically; keeps the newest ``keep_last``."""
    root = Path(root)
    tmp_root = root / ".tmp"
    tag = tag_for(step)
    if is_main():
        shutil.rmtree(tmp_root / tag, ignore_errors=True)
        tmp_root.mkdir(parents=True, exist_ok=True)
    barrier()
    engine.save_checkpoint(str(tmp_root), tag=tag, client_state=client_state, save_latest=False)
    barrier()
    if is_main():
        final = root / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp_root / tag, final)
        atomic_write_text(root / "latest", tag)
        tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
        for old in tags[:-keep_last]:
            shutil.rmtree(root / old, ignore_errors=True)
        log.info("checkpoint %s written", final)
    barrier()
    return root / tag


def load_checkpoint(engine, root: str | Path, trust: bool = False) -> dict | None:
    """Load the newest complete checkpoint into the engine; returns its client state or None.

    Args:
        engine: the DeepSpeed engine.
        root: the ``checkpoints`` folder (``latest`` names the tag).
        trust: load with DeepSpeed's own engine (``weights_only=False``: pickle, which can run code), for a folder
            written by code that saved more than tensors and plain data. Default: weights-only, checked first.

    Raises:
        CheckpointError: (unless ``trust``) ``latest`` names no ``step-NNNNNNNN`` tag, DeepSpeed is set to load a
            universal checkpoint (it unpickles those itself), or a ``.pt`` file of the tag folder holds a pickled
            global outside the weights-only set; nothing of the folder has been unpickled then.
    """
    tag = latest_tag(root)
    if tag is None:
        return None
    if trust:
        log.warning("--trust-checkpoint: %s/%s is unpickled by DeepSpeed with weights_only=False", root, tag)
        path, client_state = engine.load_checkpoint(str(root), tag=tag)
    else:
        if not TAG.match(tag):
            raise CheckpointError(Path(root) / "latest", f"names '{excerpt(tag)}', not a step-NNNNNNNN tag")
        if engine.load_universal_checkpoint():
            raise CheckpointError(Path(root) / tag, "DeepSpeed's universal-checkpoint loading unpickles files itself "
                                  "(weights_only=False)")
        verify_weights_only(Path(root) / tag)
        with weights_only_loads(engine):
            path, client_state = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise RuntimeError(f"{root}/{tag}: DeepSpeed could not load the checkpoint")
    return client_state or {}


def deepspeed_safe_globals() -> list:
    """The DeepSpeed classes its checkpoints pickle besides tensors and plain data, allowed for ``weights_only``:
    the loss scalers and ZeRO stage enum of the ZeRO optimizer states, and the parameter-slice address dataclass
    (ZeRO 1-3, bf16). Each is rebuilt from numbers only (no ``__reduce__`` or ``__setstate__`` of its own)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def verify_weights_only(folder: str | Path) -> list[Path]:
    """Check, without unpickling anything, that every ``.pt`` under ``folder`` loads with ``weights_only=True``.

    Each file's pickle is disassembled (``torch.serialization.get_unsafe_globals_in_checkpoint``) and its globals
    compared with PyTorch's weights-only set plus :func:`deepspeed_safe_globals`. (The weights-only unpickler the
    load then uses enforces the same set, also on what a static scan cannot see.)

    Returns:
        The files checked.

    Raises:
        CheckpointError: naming the first file that is not a torch zip checkpoint or holds another global.
    """
    import torch

    files = sorted(p for p in Path(folder).rglob("*.pt") if p.is_file())
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        for f in files:
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
            except (ValueError, RuntimeError, OSError, KeyError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
                raise CheckpointError(f, f"not a torch zip checkpoint ({excerpt(e, 120)})") from e
            if unsafe:
                raise CheckpointError(f, f"it pickles {len(unsafe)} global(s) that are not tensors or plain data "
                                      f"({excerpt(', '.join(sorted(unsafe)), 160)})")
    return files


class _WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine with ``load`` replaced by ``torch.load(weights_only=True)``; every other call
    (saving, commit) goes to the engine it wraps."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        import torch

        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:  # a global the static scan could not see: still refused, unrun
                raise CheckpointError(path, f"not loadable weights-only ({excerpt(e, 200)})") from e


@contextlib.contextmanager
def weights_only_loads(engine):
    """Lend ``engine`` (DeepSpeed's) a weights-only checkpoint engine for the block: ``load_checkpoint`` reads every
    model and optimizer-state file through ``engine.checkpoint_engine.load``."""
    saved = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyLoads(saved)
    try:
        yield engine
    finally:
        engine.checkpoint_engine = saved


def save_final_model(engine, model, out_dir: str | Path, zero_stage: int, extra: dict | None = None,
                     max_shard_bytes: int = 1 << 30) -> Path | None:
    """Write ``model.save_pretrained(out_dir, extra=extra)`` on rank 0 (every rank calls it).

    Under ZeRO-3 the full model is never gathered at once: :func:`stream_zero3_weights` gathers one module's
    own parameters at a time and rank 0 writes them into safetensors shards as they come (at most
    ``max_shard_bytes`` of pending tensors in memory); rank 0 then points each parameter at its memory-mapped
    copy on disk for ``save_pretrained`` and restores the partitions afterwards. The extra memory of the save
    is the largest module's parameters (on every rank, for one gather) plus one pending shard (rank 0); the
    mapped pages are file-backed and reclaimable.
    """
    out_dir = Path(out_dir)
    if zero_stage == 3:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        scratch = out_dir.parent / f".{out_dir.name}.zero3-shards"
        if is_main():
            shutil.rmtree(scratch, ignore_errors=True)
        barrier()
        try:
            index = stream_zero3_weights(model, scratch, max_shard_bytes=max_shard_bytes)
            if is_main():
                with _params_from_shards(model, scratch, index):
                    model.save_pretrained(out_dir, extra=extra)
        finally:
            if is_main():
                shutil.rmtree(scratch, ignore_errors=True)
    elif is_main():
        model.save_pretrained(out_dir, extra=extra)
    barrier()
    return out_dir if is_main() else None


def save_final_model_gathered_at_once(model, out_dir: str | Path, extra: dict | None = None) -> Path | None:
    """The former ZeRO-3 save: every parameter gathered on every rank at once. Kept only so
    ``bench/zero3_save.py`` can measure what :func:`save_final_model` saves; do not use it for large models."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if is_main():
            model.save_pretrained(out_dir, extra=extra)
    barrier()
    return Path(out_dir) if is_main() else None


def stream_zero3_weights(model, folder: str | Path, max_shard_bytes: int = 1 << 30) -> dict[str, str] | None:
    """Gather ZeRO-3 parameters module by module; rank 0 writes them to ``folder`` as safetensors shards.

    Every rank must call it (the gathers are collective). Each shard holds one dtype (so its tensors can be
    memory-mapped without copies) and is written as soon as its pending tensors reach ``max_shard_bytes``.
    Parameters shared between modules (tied embeddings) are gathered and written once, under the name
    ``model.named_parameters()`` gives them.

    Args:
        model: the engine's module (parameters partitioned by ZeRO-3).
        folder: where the shards and ``index.json`` (parameter name -> shard file) go; created by rank 0.
        max_shard_bytes: flush a dtype's pending tensors into a shard when they reach this many bytes.

    Returns:
        On rank 0 the index ``{parameter name: shard file name}``; None on the other ranks.
    """
    import json

    import deepspeed
    from safetensors.torch import save_file

    folder = Path(folder)
    main = is_main()
    if main:
        folder.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in model.named_parameters()}  # the canonical name of each (possibly shared) parameter
    seen: set[int] = set()
    pending: dict = {}  # dtype -> {name: cpu tensor}
    pending_bytes: dict = {}
    index: dict[str, str] = {}

    def flush(dtype) -> None:
        tensors = pending.pop(dtype, None)
        pending_bytes.pop(dtype, None)
        if tensors:
            fname = f"shard-{len(set(index.values())):05d}.safetensors"
            save_file(tensors, str(folder / fname), metadata={"format": "pt"})
            index.update({k: fname for k in tensors})

    for _, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen and id(p) in names]
        if not own:
            continue
        seen.update(id(p) for p in own)
        with deepspeed.zero.GatheredParameters(own, modifier_rank=None):
            if main:
                for p in own:
                    # (a copy: the gathered buffer is released when the context exits)
                    t = p.detach().to("cpu", copy=True).contiguous()
                    pending.setdefault(t.dtype, {})[names[id(p)]] = t
                    pending_bytes[t.dtype] = pending_bytes.get(t.dtype, 0) + t.numel() * t.element_size()
                    if pending_bytes[t.dtype] >= max_shard_bytes:
                        flush(t.dtype)
    if not main:
        return None
    for dtype in list(pending):
        flush(dtype)
    atomic_write_text(folder / "index.json", json.dumps(index, indent=1))
    return index


def mmap_safetensors(path: str | Path) -> dict:
    """The tensors of a one-dtype safetensors file, each memory-mapped copy-on-write (nothing read into memory)."""
    import json
    import struct

    import numpy as np
    import torch

    path = Path(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    if not header:
        return {}
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
    out = {}
    for name, h in header.items():
        begin, end = h["data_offsets"]
        if end == begin:
            out[name] = torch.empty(h["shape"], dtype=dtypes[h["dtype"]])
            continue
        # one mapping per tensor: each gets its own storage, so savers that look for shared storage (tied
        # weights) see none; one dtype per file keeps every offset aligned for the view
        raw = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + n + begin, shape=(end - begin,))
        out[name] = torch.from_numpy(raw).view(dtypes[h["dtype"]]).reshape(h["shape"])
    return out


class _params_from_shards:
    """Point every parameter of ``model`` at its memory-mapped copy in the shards; restore the ZeRO-3
    partitions (empty ``.data``) on exit."""

    def __init__(self, model, folder: Path, index: dict[str, str]):
        self.model, self.folder, self.index = model, Path(folder), index
        self.saved: list = []

    def __enter__(self):
        tensors: dict = {}
        for fname in sorted(set(self.index.values())):
            tensors.update(mmap_safetensors(self.folder / fname))
        for name, p in self.model.named_parameters():
            self.saved.append((p, p.data))
            p.data = tensors[name]
        return self

    def __exit__(self, *exc):
        for p, data in self.saved:
            p.data = data
        self.saved.clear()
        return False


def load_modules_from(model, folder: str | Path) -> dict:
    """Copy encoder/projector weights of the modalities both models have from a saved medmm folder
    (``trainer.init_from``); returns ``{"encoders.NAME": tensors loaded}``."""
    from safetensors.torch import load_file

    path = Path(folder) / "modules.safetensors"
    if not path.exists():
        raise ConfigError(f"trainer.init_from: {path} not found (is '{folder}' a medmm model folder?)")
    state = load_file(str(path))
    loaded = {}
    for part in ("encoders", "projectors"):
        for name, module in getattr(model, part).items():
            prefix = f"{part}.{name}."
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if sub:
                module.load_state_dict(sub, strict=True)
                loaded[f"{part}.{name}"] = len(sub)
    if not loaded:
        raise ConfigError(f"trainer.init_from: {folder} shares no modality with this model")
    return loaded
