"""Projectors: encoder tokens ``(B, N, D_enc)`` (+ mask) -> LLM tokens ``(B, K, D_llm)``.

``linear`` and ``mlp2x_gelu`` keep K = N (the encoder must emit a fixed N); ``resampler`` uses
learned queries with masked cross-attention, so K = ``num_queries`` whatever N is: a volume or a
slide of thousands of tokens costs a bounded number of LLM tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from encoders.registry import Registry

PROJECTORS = Registry("projector", config_key="projector.type")
"""name -> ``builder(in_dim, out_dim, **kwargs) -> nn.Module``."""


def register_projector(name: str, summary: str | None = None):
    """Decorator: register ``builder(in_dim, out_dim, **kwargs)`` under ``name`` (summary: its docstring's first
    paragraph unless given)."""
    return PROJECTORS.register(name, summary=summary)


def list_projectors() -> list[str]:
    """Registered projector names."""
    return PROJECTORS.names()


def build_projector(name: str, in_dim: int, out_dim: int, **kwargs) -> nn.Module:
    """Build a registered projector (a ConfigError lists the registered ones). Every projector exposes
    ``num_tokens(n_in) -> K``."""
    return PROJECTORS.get(name)(in_dim=in_dim, out_dim=out_dim, **kwargs)


class _TokenwiseProjector(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def num_tokens(self, n_in: int | None) -> int | None:
        return n_in

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)  # (B, N, D_llm)


@register_projector("linear")
def linear(in_dim: int, out_dim: int, **_) -> nn.Module:
    """One linear layer per token (K = N)."""
    return _TokenwiseProjector(nn.Linear(in_dim, out_dim))


@register_projector("mlp2x_gelu")
def mlp2x_gelu(in_dim: int, out_dim: int, **_) -> nn.Module:
    """LLaVA-1.5's projector: Linear -> GELU -> Linear per token (K = N)."""
    return _TokenwiseProjector(nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)))


def _tracing() -> bool:
    return bool(torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export())


class Resampler(nn.Module):
    """Perceiver-style resampler: ``num_queries`` learned queries cross-attend to the (masked) input tokens."""

    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 32, depth: int = 1, heads: int = 4, **_):
        super().__init__()
        if out_dim % heads:
            raise ValueError(f"resampler width {out_dim} is not divisible by heads={heads}")
        self.n_queries = num_queries
        self.proj_in = nn.Linear(in_dim, out_dim)
        self.queries = nn.Parameter(torch.randn(num_queries, out_dim) * out_dim**-0.5)
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleDict({
                "norm_q": nn.LayerNorm(out_dim),
                "norm_kv": nn.LayerNorm(out_dim),
                "attn": nn.MultiheadAttention(out_dim, heads, batch_first=True),
                "norm_ff": nn.LayerNorm(out_dim),
                "ff": nn.Sequential(nn.Linear(out_dim, 4 * out_dim), nn.GELU(), nn.Linear(4 * out_dim, out_dim)),
            }))
        self.norm_out = nn.LayerNorm(out_dim)

    def num_tokens(self, n_in: int | None) -> int:
        return self.n_queries

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        kv = self.proj_in(x)  # (B, N, D)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, K, D)
        pad = None if mask is None else ~mask.bool()  # True = ignore
        # A data-dependent check: skipped while torch.export / ONNX / TorchScript trace the graph.
        if pad is not None and not _tracing() and bool(pad.all(dim=1).any()):
            raise ValueError("resampler got an input whose tokens are all masked")
        for layer in self.layers:
            kvn = layer["norm_kv"](kv)
            attn, _ = layer["attn"](layer["norm_q"](q), kvn, kvn, key_padding_mask=pad, need_weights=False)
            q = q + attn
            q = q + layer["ff"](layer["norm_ff"](q))
        return self.norm_out(q)  # (B, K, D)


@register_projector("resampler")
def resampler(in_dim: int, out_dim: int, num_queries: int = 32, depth: int = 1, heads: int = 4, **_) -> nn.Module:
    """Perceiver-style resampler: ``num_queries`` learned queries cross-attend to the masked tokens (K fixed)."""
    return Resampler(in_dim, out_dim, num_queries=num_queries, depth=depth, heads=heads)
