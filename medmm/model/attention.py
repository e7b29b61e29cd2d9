"""Attention over the inputs of a bag (the tiles of a slide), read from the model itself.

Gated ABMIL aggregators expose ``attention``; for the ``resampler`` projector, the cross-attention
from its learned queries to the tiles is re-computed and averaged over heads, queries and layers.
Heat maps (:mod:`medmm.inference.heatmap`) draw these weights on the slide thumbnail.
"""

from __future__ import annotations

import torch

from ..errors import InvalidInputError


@torch.no_grad()
def resampler_attention(proj: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Cross-attention of a :class:`medmm.model.projectors.Resampler` over its input tokens, ``(B, N)``.

    Re-runs the resampler's layers with ``need_weights=True`` and averages the weights over heads,
    queries and layers."""
    kv = proj.proj_in(tokens)  # (B, N, D)
    q = proj.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # (B, K, D)
    pad = None if mask is None else ~mask.bool()
    maps = []
    for layer in proj.layers:
        kvn = layer["norm_kv"](kv)
        out, w = layer["attn"](layer["norm_q"](q), kvn, kvn, key_padding_mask=pad, need_weights=True,
                               average_attn_weights=True)  # w: (B, K, N)
        maps.append(w.mean(1))
        q = q + out
        q = q + layer["ff"](layer["norm_ff"](q))
    return torch.stack(maps).mean(0)


@torch.no_grad()
def bag_attention(encoder: torch.nn.Module, projector: torch.nn.Module | None, x: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
    """Attention over the tiles of a batch of bags ``(B, N)`` from an aggregator or a resampler projector."""
    from .projectors import Resampler

    if hasattr(encoder, "attention"):
        return encoder.attention(x, mask)
    if isinstance(projector, Resampler):
        tokens, tmask = encoder(x, mask)
        return resampler_attention(projector, tokens, tmask if tmask is not None else mask)
    raise InvalidInputError(type(encoder).__name__, "this slide model has no attention over tiles (use the abmil "
                                                    "encoder or the resampler projector)")
