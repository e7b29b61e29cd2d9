"""Molecule encoders. Input: Morgan fingerprint bits ``(B, bits)`` (made by ``medmm.io.molecules``)."""

from __future__ import annotations

import torch
from torch import nn

from .registry import EncoderOutput, register_encoder


class FingerprintMLP(nn.Module):
    """Fingerprint -> MLP -> ``num_tokens`` tokens of width ``hidden``."""

    def __init__(self, bits: int = 2048, hidden: int = 256, num_tokens: int = 4, layers: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        dims = [bits] + [hidden] * (layers - 1) + [hidden * num_tokens]
        mods: list[nn.Module] = []
        for i in range(len(dims) - 1):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                mods += [nn.GELU(), nn.Dropout(dropout)]
        self.mlp = nn.Sequential(*mods)
        self.out_dim, self.num_tokens, self.bits = hidden, num_tokens, bits

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        if x.shape[-1] != self.bits:
            raise ValueError(f"fingerprint has {x.shape[-1]} bits, the encoder expects {self.bits}")
        return EncoderOutput(self.mlp(x.float()).view(x.shape[0], self.num_tokens, self.out_dim), None)


@register_encoder("mol_fingerprint_mlp", modality="mol")
def mol_fingerprint_mlp(bits: int = 2048, hidden: int = 256, num_tokens: int = 4, layers: int = 2,
                        dropout: float = 0.0) -> nn.Module:
    """Morgan-fingerprint MLP emitting a few tokens per molecule."""
    return FingerprintMLP(bits, hidden, num_tokens, layers, dropout)


@register_encoder("mol_fingerprint_tiny", modality="mol")
def mol_fingerprint_tiny(bits: int = 2048, hidden: int = 32, num_tokens: int = 2) -> nn.Module:
    """Tiny fingerprint MLP for tests and the demo."""
    return FingerprintMLP(bits, hidden, num_tokens, layers=2)
