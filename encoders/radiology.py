"""Radiology encoders: 2D ViT from timm (X-ray, CT/MR slices, photos), 3D ViT from MONAI (CT/MR volumes).

2D input ``(B, C, H, W)``; 3D input ``(B, 1, D, H, W)``. Both return patch tokens ``(B, N, D)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import EncoderOutput, register_encoder


class TimmViT2D(nn.Module):
    """Any timm model with ``forward_features`` -> (B, N, D) patch tokens (prefix tokens dropped)."""

    def __init__(self, model_name: str = "vit_base_patch16_224", img_size: int = 224, in_chans: int = 3,
                 keep_prefix_tokens: bool = False, **kwargs):
        super().__init__()
        import timm

        self.model = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=img_size,
                                       in_chans=in_chans, **kwargs)
        self.keep_prefix_tokens = keep_prefix_tokens
        self.prefix = 0 if keep_prefix_tokens else int(getattr(self.model, "num_prefix_tokens", 0))
        self.out_dim = int(self.model.num_features)
        grid = self.model.patch_embed.grid_size
        self.num_tokens = int(grid[0] * grid[1]) + (int(getattr(self.model, "num_prefix_tokens", 0))
                                                     if keep_prefix_tokens else 0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        feats = self.model.forward_features(x)  # (B, prefix + N, D)
        return EncoderOutput(feats[:, self.prefix:], None)


@register_encoder("vit2d", modality="image")
def vit2d(model_name: str = "vit_base_patch16_224", img_size: int = 224, in_chans: int = 3, **kwargs) -> nn.Module:
    """2D ViT from timm, any timm name; weights come from a local ``checkpoint``."""
    return TimmViT2D(model_name, img_size=img_size, in_chans=in_chans, **kwargs)


@register_encoder("vit2d_tiny", modality="image")
def vit2d_tiny(img_size: int = 64, in_chans: int = 3, embed_dim: int = 32, depth: int = 2, num_heads: int = 2,
               patch_size: int = 16) -> nn.Module:
    """Tiny 2D ViT (width 32, 2 layers) for tests and the demo."""
    return TimmViT2D("vit_tiny_patch16_224", img_size=img_size, in_chans=in_chans, embed_dim=embed_dim,
                     depth=depth, num_heads=num_heads, patch_size=patch_size)


class MonaiViT3D(nn.Module):
    """MONAI ViT over 3D patches -> (B, N, D) tokens."""

    def __init__(self, img_size=(96, 96, 96), patch_size=(16, 16, 16), hidden_size: int = 768, mlp_dim: int = 3072,
                 num_layers: int = 12, num_heads: int = 12, in_channels: int = 1, dropout_rate: float = 0.0):
        super().__init__()
        from monai.networks.nets import ViT

        self.vit = ViT(in_channels=in_channels, img_size=tuple(img_size), patch_size=tuple(patch_size),
                       hidden_size=hidden_size, mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads,
                       classification=False, dropout_rate=dropout_rate)
        self.out_dim = hidden_size
        self.num_tokens = 1
        for s, p in zip(img_size, patch_size):
            if s % p:
                raise ValueError(f"volume size {tuple(img_size)} is not divisible by patch size {tuple(patch_size)}")
            self.num_tokens *= s // p

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        tokens, _ = self.vit(x)  # (B, N, D)
        return EncoderOutput(tokens, None)


@register_encoder("vit3d", modality="volume")
def vit3d(**kwargs) -> nn.Module:
    """3D ViT from MONAI (3D patches) for CT/MR volumes."""
    return MonaiViT3D(**kwargs)


@register_encoder("vit3d_tiny", modality="volume")
def vit3d_tiny(img_size=(16, 64, 64), patch_size=(8, 16, 16), hidden_size: int = 32, num_layers: int = 2,
               num_heads: int = 2) -> nn.Module:
    """Tiny 3D ViT (width 32, 2 layers) for tests and the demo."""
    return MonaiViT3D(img_size=img_size, patch_size=patch_size, hidden_size=hidden_size, mlp_dim=4 * hidden_size,
                      num_layers=num_layers, num_heads=num_heads)


class HFVisionTower(nn.Module):
    """A Hugging Face vision model (CLIP/SigLIP/ViT) from a local folder or a config -> patch tokens."""

    def __init__(self, path: str | None = None, config: dict | None = None, drop_cls: bool = True,
                 feature_layer: int = -1):
        super().__init__()
        from transformers import AutoConfig, AutoModel, CLIPVisionConfig, CLIPVisionModel

        if path:
            cfg = AutoConfig.from_pretrained(path)
            self.model = (CLIPVisionModel.from_pretrained(path) if getattr(cfg, "model_type", "") in
                          ("clip", "clip_vision_model") else AutoModel.from_pretrained(path))
        elif config is not None:
            self.model = CLIPVisionModel(CLIPVisionConfig(**config))
        else:
            raise ValueError("hf_vision needs a local 'path' or a 'config'")
        vcfg = getattr(self.model.config, "vision_config", self.model.config)
        self.drop_cls = drop_cls
        self.feature_layer = feature_layer
        self.out_dim = int(vcfg.hidden_size)
        self.num_tokens = (vcfg.image_size // vcfg.patch_size) ** 2 + (0 if drop_cls else 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        out = self.model(pixel_values=x, output_hidden_states=True)
        feats = out.hidden_states[self.feature_layer]  # (B, 1 + N, D)
        return EncoderOutput(feats[:, 1:] if self.drop_cls else feats, None)


@register_encoder("hf_vision", modality="image")
def hf_vision(path: str | None = None, config: dict | None = None, drop_cls: bool = True,
              feature_layer: int = -1) -> nn.Module:
    """Hugging Face vision tower (CLIP-style) loaded from a local folder, as LLaVA uses."""
    return HFVisionTower(path=path, config=config, drop_cls=drop_cls, feature_layer=feature_layer)


class OpenClipVision(nn.Module):
    """The vision tower of an open_clip model (CLIP, BiomedCLIP-style) from local files -> patch tokens.

    ``model_name`` is an open_clip architecture name, or the name of a JSON config in ``config_dir``
    (e.g. a BiomedCLIP ``open_clip_config.json`` copied there). ``weights`` is a local full-CLIP
    checkpoint (safetensors, or torch loaded with ``weights_only=True``); only the visual tower is kept.
    """

    def __init__(self, model_name: str = "ViT-B-16", config_dir: str | None = None, weights: str | None = None):
        super().__init__()
        import open_clip

        from .registry import load_weights

        if config_dir:
            open_clip.add_model_config(config_dir)
        clip = open_clip.create_model(model_name, pretrained=None)
        if weights:
            load_weights(clip, weights)
        self.visual = clip.visual
        self.visual.output_tokens = True
        self.out_dim = int(getattr(self.visual, "width", None) or self.visual.transformer.width)
        grid = getattr(self.visual, "grid_size", None)
        self.num_tokens = int(grid[0] * grid[1]) if grid is not None else None
        self.image_size = getattr(self.visual, "image_size", None)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        _, tokens = self.visual(x)  # pooled (B, E), tokens (B, N, width)
        return EncoderOutput(tokens, None)


@register_encoder("open_clip_vision", modality="image")
def open_clip_vision(model_name: str = "ViT-B-16", config_dir: str | None = None, weights: str | None = None):
    """open_clip vision tower (CLIP / BiomedCLIP-style) from local config + weights files."""
    return OpenClipVision(model_name, config_dir, weights)
