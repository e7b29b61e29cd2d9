"""Slide-level classifier: an aggregator from the ``encoders`` registry (gated ABMIL by default) + a linear head.

A saved folder holds ``slide_classifier.json`` (aggregator name and kwargs, class names, bag limits,
format version) and ``model.safetensors``; :meth:`SlideClassifier.from_pretrained` rebuilds from it alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

CONFIG_NAME = "slide_classifier.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


class SlideClassifier(nn.Module):
    """Bag of tile features ``(B, N, D)`` + mask -> class logits ``(B, C)``; ``attention`` gives ``(B, N)``."""

    def __init__(self, aggregator: str, aggregator_kwargs: dict, classes: list[str], dropout: float = 0.25,
                 max_tiles: int = 16384):
        super().__init__()
        from encoders import build_encoder

        if len(classes) < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {classes}")
        self.aggregator_name = aggregator
        self.aggregator_kwargs = dict(aggregator_kwargs)
        self.classes = list(classes)
        self.dropout_p = float(dropout)
        self.max_tiles = int(max_tiles)
        self.aggregator = build_encoder(aggregator, **aggregator_kwargs)
        if self.aggregator.num_tokens is None:
            raise ValueError(f"aggregator '{aggregator}' emits a variable number of tokens; use one that pools the "
                             "bag (abmil)")
        self.head = nn.Sequential(nn.Dropout(dropout),
                                  nn.Linear(self.aggregator.num_tokens * self.aggregator.out_dim, len(classes)))

    @property
    def in_dim(self) -> int:
        return int(getattr(self.aggregator, "in_dim", 0))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        z, _ = self.aggregator(x, mask)  # (B, K, H)
        return self.head(z.flatten(1))  # (B, C)

    @torch.no_grad()
    def attention(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        from ..eval.slide_heatmap import bag_attention

        return bag_attention(self.aggregator, None, x, mask)

    def config(self) -> dict:
        return {"format_version": FORMAT_VERSION, "aggregator": self.aggregator_name,
                "aggregator_kwargs": self.aggregator_kwargs, "classes": self.classes, "dropout": self.dropout_p,
                "max_tiles": self.max_tiles, "in_dim": self.in_dim}

    def save_pretrained(self, out: str | Path) -> Path:
        """Write config + weights into ``out`` atomically (a temporary folder moved into place)."""
        import tempfile

        from safetensors.torch import save_file

        from ..utils import atomic_replace_dir

        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        (tmp / CONFIG_NAME).write_text(json.dumps(self.config(), indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp / WEIGHTS_NAME))
        atomic_replace_dir(tmp, out)
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> SlideClassifier:
        from safetensors.torch import load_file

        from ..utils import read_folder_config

        path = Path(path)
        cfg = read_folder_config(path, CONFIG_NAME, FORMAT_VERSION, "slide classifier folder")
        model = cls(cfg["aggregator"], cfg["aggregator_kwargs"], cfg["classes"], cfg["dropout"], cfg["max_tiles"])
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
        return model.to(device).eval()
