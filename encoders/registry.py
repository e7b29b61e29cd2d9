"""Encoder registry and factory: ``register_encoder``, ``build_encoder(name, **overrides)``, ``list_encoders``.

A registered builder takes every architecture argument as a keyword; named presets (``*_tiny``)
fix sizes for tests and the demo. ``checkpoint=`` loads local weights (safetensors or a torch
state dict, always with ``weights_only=True``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn


class EncoderOutput(NamedTuple):
    """Encoder result: tokens ``(B, N, D)`` and a ``(B, N)`` bool mask (True = valid) or None."""

    tokens: torch.Tensor
    mask: torch.Tensor | None


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    builder: Callable[..., nn.Module]
    modality: str
    description: str


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(name: str, modality: str, description: str = ""):
    """Decorator: register ``builder(**kwargs) -> nn.Module`` under ``name``."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"encoder '{name}' is registered twice")
        _REGISTRY[name] = EncoderSpec(name, fn, modality, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def list_encoders(modality: str | None = None) -> list[str]:
    """Registered encoder names, optionally only those of one modality."""
    return sorted(k for k, v in _REGISTRY.items() if modality is None or v.modality == modality)


def get_encoder_spec(name: str) -> EncoderSpec:
    if name not in _REGISTRY:
        raise KeyError(f"unknown encoder '{name}'; registered: {', '.join(list_encoders())}")
    return _REGISTRY[name]


def load_weights(module: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load a local weights file into ``module`` (safetensors, or torch with ``weights_only=True``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"encoder weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    missing, unexpected = module.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"{path}: weights do not match the encoder (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return module


def build_encoder(name: str, checkpoint: str | None = None, **overrides) -> nn.Module:
    """Build a registered encoder; ``checkpoint`` loads local weights into it."""
    enc = get_encoder_spec(name).builder(**overrides)
    for attr in ("out_dim", "num_tokens"):
        if not hasattr(enc, attr):
            raise TypeError(f"encoder '{name}' does not define '{attr}'")
    if checkpoint:
        load_weights(enc, checkpoint)
    return enc
