"""Atomic DeepSpeed checkpoints and the final model folder.

Layout of ``<output_dir>/checkpoints``::

    step-00000050/     one DeepSpeed checkpoint (model, optimizer, scheduler, trainer state)
    latest             the tag of the newest complete checkpoint

A checkpoint is written under ``.tmp/`` by every rank, then renamed into place by rank 0, and only
then does ``latest`` (written atomically) point at it: a run killed mid-save resumes from the
previous checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ..errors import ConfigError
from ..utils import atomic_write_text
from .distributed import barrier, is_main

log = logging.getLogger(__name__)


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


def load_checkpoint(engine, root: str | Path) -> dict | None:
    """Load the newest complete checkpoint into the engine; returns its client state or None."""
    tag = latest_tag(root)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise RuntimeError(f"{root}/{tag}: DeepSpeed could not load the checkpoint")
    return client_state or {}


def save_final_model(engine, model, out_dir: str | Path, zero_stage: int, extra: dict | None = None) -> Path | None:
    """Gather (ZeRO-3) and write ``model.save_pretrained(out_dir, extra=extra)`` on rank 0 (every rank calls it)."""
    out_dir = Path(out_dir)
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if is_main():
                model.save_pretrained(out_dir, extra=extra)
    elif is_main():
        model.save_pretrained(out_dir, extra=extra)
    barrier()
    return out_dir if is_main() else None


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
