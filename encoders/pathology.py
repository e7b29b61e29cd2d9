"""Pathology encoders (modality ``slide``): a timm ViT tile encoder and slide aggregators over bags of tiles.

A slide is a bag of N tiles (thousands). Inputs are either precomputed tile features ``(B, N, D)``
with a ``(B, N)`` mask (True = real tile; bags are padded), or tiles ``(B, N, 3, H, W)`` when an
aggregator is given a ``tile_encoder``.

- ``vit_tile``: any timm ViT, one embedding per tile (CLS, mean of patches, or both). Weights come
  from a local file; UNI-style (plain timm keys) and CONCH-style (``visual.trunk.`` prefix, other
  towers ignored) state dicts are remapped, and position embeddings resized by timm.
- ``abmil``: gated attention MIL (Ilse, Tomczak and Welling, ICML 2018): ``a = softmax(w^T (tanh(V h)
  * sigmoid(U h)))``, slide embedding ``z = sum_i a_i h_i``: a slide costs ``branches`` tokens (1 by default).
- ``slide_tokens``: normalised tile features as tokens, for the ``resampler`` projector, which bounds
  the LLM tokens per slide by its ``num_queries`` whatever N is.

Both aggregators expose ``attention(x, mask) -> (B, N)`` for heat maps.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .registry import EncoderOutput, register_encoder

log = logging.getLogger(__name__)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Key prefixes seen in published tile-encoder checkpoints (DataParallel, Lightning, open_clip/CONCH towers).
_PREFIXES = ("", "module.", "model.", "trunk.", "visual.trunk.", "backbone.", "encoder.", "vision_encoder.")


class TimmTileEncoder(nn.Module):
    """A timm ViT: tiles ``(T, 3, H, W)`` -> one ``out_dim`` embedding each.

    ``forward`` takes a bag ``(B, N, 3, H, W)`` (+ mask) and returns ``(B, N, D)`` tokens; padded tiles
    are not run through the model. A single ``(B, 3, H, W)`` batch gives ``(B, 1, D)``.
    """

    def __init__(self, model_name: str = "vit_large_patch16_224", img_size: int = 224, pool: str = "token",
                 mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD, weights: str | None = None, **timm_kwargs):
        super().__init__()
        import timm

        if pool not in ("token", "avg", "token+avg"):
            raise ValueError(f"pool must be token | avg | token+avg, got {pool}")
        self.trunk = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=img_size,
                                       global_pool="", **timm_kwargs)
        self.pool = pool
        self.img_size = int(img_size)
        self.prefix = int(getattr(self.trunk, "num_prefix_tokens", 1))
        if pool != "avg" and self.prefix == 0:
            raise ValueError(f"{model_name} has no class token; use pool=avg")
        width = int(self.trunk.num_features)
        self.out_dim = 2 * width if pool == "token+avg" else width
        self.num_tokens = None
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        if weights:
            from .registry import load_weights

            load_weights(self, weights)

    def preprocess(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 ``(T, H, W, 3)`` -> normalised float ``(T, 3, img_size, img_size)``."""
        x = tiles.permute(0, 3, 1, 2).float()  # (T, 3, H, W) in [0, 255]
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = nn.functional.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear",
                                          align_corners=False, antialias=True)
        std = self.std.to(x.device)
        # (x / 255 - mean) / std in one fused op, written contiguous
        return torch.addcmul(-self.mean.to(x.device) / std, x, 1.0 / (255.0 * std))

    def embed_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """``(T, 3, H, W)`` normalised tiles -> ``(T, D)``."""
        feats = self.trunk.forward_features(x)  # (T, prefix + P, W)
        cls, patches = feats[:, 0], feats[:, self.prefix:]
        if self.pool == "token":
            return cls
        if self.pool == "avg":
            return patches.mean(1)
        return torch.cat([cls, patches.mean(1)], -1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        if x.ndim == 4:
            x = x.unsqueeze(1)
            mask = None
        B, N = x.shape[:2]
        flat = x.flatten(0, 1)  # (B*N, 3, H, W)
        if mask is None:
            out = self.embed_tiles(flat)
            mask = torch.ones(B, N, dtype=torch.bool, device=x.device)
        else:
            keep = mask.reshape(-1).bool()
            emb = self.embed_tiles(flat[keep])
            out = emb.new_zeros(B * N, emb.shape[-1]).index_copy(0, keep.nonzero().squeeze(1), emb)
        return EncoderOutput(out.view(B, N, -1), mask.bool())

    # UNI/CONCH-style files hold plain timm (or prefixed) keys; medmm's own files hold "trunk." keys.
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = set(self.trunk.state_dict())
        best, hits = "", -1
        for p in _PREFIXES:
            n = sum(1 for k in state_dict if k.startswith(p) and k[len(p):] in own)
            if n > hits:
                best, hits = p, n
        if best == "trunk." or hits <= 0:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        from timm.models.vision_transformer import checkpoint_filter_fn

        sub = {k[len(best):]: v for k, v in state_dict.items() if k.startswith(best)}
        ignored = len(state_dict) - len(sub)
        sub = checkpoint_filter_fn(sub, self.trunk)  # resizes position embeddings to img_size
        extra = sorted(k for k in sub if k not in own and not k.startswith("head"))
        sub = {k: v for k, v in sub.items() if k in own}
        if ignored:
            log.info("tile encoder: took %d tensors under '%s', ignored %d others (other towers/heads)",
                     len(sub), best, ignored)
        res = self.trunk.load_state_dict(sub, strict=False, assign=assign)
        missing = [f"trunk.{k}" for k in res.missing_keys]
        unexpected = [f"trunk.{k}" for k in extra]
        if strict and (missing or unexpected):
            raise RuntimeError(f"tile encoder weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)


@register_encoder("vit_tile", modality="slide")
def vit_tile(model_name: str = "vit_large_patch16_224", img_size: int = 224, pool: str = "token",
             init_values: float | None = 1e-5, dynamic_img_size: bool = True, weights: str | None = None,
             **kwargs) -> nn.Module:
    """timm ViT tile encoder; defaults match UNI (ViT-L/16, LayerScale 1e-5); weights from a local file."""
    if init_values is not None:
        kwargs["init_values"] = init_values
    return TimmTileEncoder(model_name, img_size=img_size, pool=pool, weights=weights,
                           dynamic_img_size=dynamic_img_size, **kwargs)


@register_encoder("vit_tile_tiny", modality="slide")
def vit_tile_tiny(img_size: int = 32, embed_dim: int = 32, depth: int = 2, num_heads: int = 2, patch_size: int = 16,
                  pool: str = "token", weights: str | None = None) -> nn.Module:
    """Tiny ViT tile encoder (width 32, 2 layers) for tests and the demo."""
    return TimmTileEncoder("vit_tiny_patch16_224", img_size=img_size, pool=pool, weights=weights,
                           embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch_size)


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim (tiles) ignoring padded tiles. scores (B, K, N), mask (B, N)."""
    if mask is not None:
        m = mask.bool().unsqueeze(1)  # (B, 1, N)
        if bool((~m).all(dim=-1).any()):
            raise ValueError("a slide bag has no tiles (all masked)")
        scores = scores.masked_fill(~m, float("-inf"))
    return torch.softmax(scores, dim=-1)


class _Bag(nn.Module):
    """Shared: optional tile encoder in front, so an aggregator takes features or tiles."""

    def __init__(self, in_dim: int, tile_encoder: dict | None):
        super().__init__()
        self.tile_encoder = None
        if tile_encoder is not None:
            cfg = dict(tile_encoder)
            name = cfg.pop("name", "vit_tile")
            from .registry import build_encoder

            self.tile_encoder = build_encoder(name, **cfg)
            in_dim = self.tile_encoder.out_dim
        self.in_dim = int(in_dim)

    def features(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.tile_encoder is not None:
            x, _ = self.tile_encoder(x, mask)  # (B, N, D)
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"tile features have width {x.shape[-1]}, the aggregator expects {self.in_dim}")
        return x


class GatedABMIL(_Bag):
    """Gated attention MIL (Ilse et al. 2018) with ``branches`` attention heads -> ``(B, branches, hidden)``."""

    def __init__(self, in_dim: int = 1024, hidden: int = 512, attn_dim: int = 256, branches: int = 1,
                 dropout: float = 0.25, tile_encoder: dict | None = None):
        super().__init__(in_dim, tile_encoder)
        self.fc = nn.Sequential(nn.Linear(self.in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.attn_u = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.attn_w = nn.Linear(attn_dim, branches)
        self.out_dim = hidden
        self.num_tokens = branches

    def _scores(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(self.features(x, mask))  # (B, N, H)
        a = self.attn_w(self.attn_v(h) * self.attn_u(h)).transpose(1, 2)  # (B, K, N)
        return h, _masked_softmax(a, mask)

    def attention(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over tiles ``(B, N)`` (mean over branches; sums to 1 over the real tiles)."""
        return self._scores(x, mask)[1].mean(1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        h, a = self._scores(x, mask)
        return EncoderOutput(a @ h, None)  # (B, K, H)


class SlideTokens(_Bag):
    """Tile features as tokens ``(B, N, dim)`` (LayerNorm, optional Linear + GELU) with the bag mask passed on."""

    def __init__(self, in_dim: int = 1024, dim: int | None = None, tile_encoder: dict | None = None):
        super().__init__(in_dim, tile_encoder)
        self.norm = nn.LayerNorm(self.in_dim)
        self.proj = nn.Identity() if dim is None else nn.Sequential(nn.Linear(self.in_dim, dim), nn.GELU())
        self.out_dim = self.in_dim if dim is None else int(dim)
        self.num_tokens = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        h = self.proj(self.norm(self.features(x, mask)))  # (B, N, D)
        if mask is None:
            mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        return EncoderOutput(h, mask.bool())


@register_encoder("abmil", modality="slide")
def abmil(in_dim: int = 1024, hidden: int = 512, attn_dim: int = 256, branches: int = 1, dropout: float = 0.25,
          tile_encoder: dict | None = None) -> nn.Module:
    """Gated attention MIL over tile features (UNI width 1024 by default): a slide -> ``branches`` tokens."""
    return GatedABMIL(in_dim, hidden, attn_dim, branches, dropout, tile_encoder)


@register_encoder("abmil_tiny", modality="slide")
def abmil_tiny(in_dim: int = 32, hidden: int = 32, attn_dim: int = 16, branches: int = 1, dropout: float = 0.0,
               tile_encoder: dict | None = None) -> nn.Module:
    """Tiny gated ABMIL (width 32) for tests and the demo."""
    return GatedABMIL(in_dim, hidden, attn_dim, branches, dropout, tile_encoder)


@register_encoder("slide_tokens", modality="slide")
def slide_tokens(in_dim: int = 1024, dim: int | None = None, tile_encoder: dict | None = None) -> nn.Module:
    """Tile features as a variable number of tokens; pair with the ``resampler`` projector to bound LLM tokens."""
    return SlideTokens(in_dim, dim, tile_encoder)


@register_encoder("slide_tokens_tiny", modality="slide")
def slide_tokens_tiny(in_dim: int = 32, dim: int | None = None, tile_encoder: dict | None = None) -> nn.Module:
    """Tiny slide_tokens (width 32) for tests and the demo."""
    return SlideTokens(in_dim, dim, tile_encoder)
