"""Classification heads on encoder tokens, and the encoder + head model the ``head`` training stage trains.

Heads are registered builders (``head.type`` in a recipe; ``medmm list heads`` prints them). A builder takes every
architecture argument: ``builder(in_dim, num_tokens, out_dim, hidden, dropout, extra_dim)`` and returns a module
mapping ``tokens (B, N, D), mask (B, N) | None[, features (B, extra_dim)] -> (B, out_dim)``; ``extra_dim`` > 0 =
per-input features read beside the tokens (``head.mol_features``), which a head may refuse.

A saved :class:`HeadModel` folder rebuilds from itself::

    head_model.json       the head stage's settings (featuriser, loader, preprocessing, encoder, head, classes),
                          the fitted temperature, format version
    model.safetensors     encoder + head
    encoder.safetensors   the encoder alone (an LLM recipe loads it with encoder.checkpoint=...)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from encoders.registry import Registry

from .. import __version__
from ..config import HeadStageConfig, config_from_dict, to_dict
from ..errors import ConfigError

CONFIG_NAME = "head_model.json"
WEIGHTS_NAME = "model.safetensors"
ENCODER_NAME = "encoder.safetensors"


def save_encoder_folder(path: str | Path, model: nn.Module, encoder: nn.Module, config_name: str, meta: dict) -> Path:
    """Write ``config_name`` (``meta`` as JSON), ``model.safetensors`` (the whole model) and ``encoder.safetensors``
    (the encoder alone, what ``encoder.checkpoint`` loads) into ``path`` atomically: a temporary folder moved into
    place, removed if anything fails."""
    from safetensors.torch import save_file

    from ..utils import atomic_replace_dir

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        (tmp / config_name).write_text(json.dumps(meta, indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_NAME))
        save_file({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}, str(tmp / ENCODER_NAME))
        atomic_replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
FORMAT_VERSION = 1

HEADS = Registry("head", config_key="head.type")
"""name -> ``builder(in_dim, num_tokens, out_dim, hidden, dropout, extra_dim, extra_dropout) -> nn.Module``."""


def register_head(name: str, summary: str | None = None):
    """Decorator: register ``builder(in_dim, num_tokens, out_dim, hidden, dropout, extra_dim, extra_dropout)
    -> nn.Module`` (``extra_dropout``: the dropout on the ``extra_dim`` per-input features; None = ``dropout``)."""
    return HEADS.register(name, summary=summary)


def list_heads() -> list[str]:
    """Registered head names."""
    return HEADS.names()


def build_head(name: str, in_dim: int, num_tokens: int | None, out_dim: int, hidden: int = 128,
               dropout: float = 0.1, extra_dim: int = 0, extra_dropout: float | None = None) -> nn.Module:
    """Build a registered head; a ConfigError lists the known ones. ``extra_dropout``: the dropout on the
    ``extra_dim`` per-input features (None = ``dropout``)."""
    return HEADS.get(name)(in_dim=in_dim, num_tokens=num_tokens, out_dim=out_dim, hidden=hidden, dropout=dropout,
                        extra_dim=extra_dim, extra_dropout=extra_dropout)


class PooledMLP(nn.Module):
    """Masked mean and max over tokens ``(B, 2D)`` -> two-layer MLP -> ``(B, out_dim)``.

    With ``extra_dim`` > 0 the first layer also reads per-input features ``(B, extra_dim)`` (e.g. a Morgan
    fingerprint), after their own dropout (``extra_dropout``, default ``dropout``):
    ``Linear([LN(pooled), drop(features)])``, kept as two weight blocks (``net.1`` on the pooled half as without
    features, ``extra`` on the features).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 128, dropout: float = 0.1, extra_dim: int = 0,
                 extra_dropout: float | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(2 * in_dim), nn.Linear(2 * in_dim, hidden), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, out_dim))
        self.extra_dim = extra_dim
        if extra_dim:
            self.extra = nn.Sequential(nn.Dropout(dropout if extra_dropout is None else extra_dropout),
                                       nn.Linear(extra_dim, hidden, bias=False))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None,
                features: torch.Tensor | None = None) -> torch.Tensor:
        if (features is None) != (not self.extra_dim):
            raise ValueError(f"this head reads {self.extra_dim} features per input beside the tokens; got "
                             f"{'none' if features is None else tuple(features.shape)}")
        if mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        m = mask.unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * m).sum(1) / m.sum(1).clamp(min=1)  # (B, D)
        mx = tokens.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1).clamp(min=-1e4)  # (B, D)
        h = self.net[1](self.net[0](torch.cat([mean, mx], -1)))  # (B, hidden)
        if features is not None:
            h = h + self.extra(features.to(h.dtype))
        return self.net[4](self.net[3](self.net[2](h)))  # (B, out)


class FlatLinear(nn.Module):
    """The ``K`` tokens of a pooling encoder ``(B, K, D)`` flattened -> Dropout -> Linear -> ``(B, out_dim)``."""

    def __init__(self, in_dim: int, num_tokens: int, out_dim: int, dropout: float = 0.25):
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(num_tokens * in_dim, out_dim))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(tokens.flatten(1))


@register_head("mlp")
def mlp_head(in_dim: int, num_tokens: int | None, out_dim: int, hidden: int = 128, dropout: float = 0.1,
             extra_dim: int = 0, extra_dropout: float | None = None) -> nn.Module:
    """Masked mean + max pooling and a two-layer MLP (any encoder; reads ``extra_dim`` features beside it)."""
    return PooledMLP(in_dim, out_dim, hidden, dropout, extra_dim, extra_dropout)


@register_head("linear")
def linear_head(in_dim: int, num_tokens: int | None, out_dim: int, hidden: int = 128,
                dropout: float = 0.25, extra_dim: int = 0, extra_dropout: float | None = None) -> nn.Module:
    """Dropout + one linear layer over the flattened tokens of a pooling encoder (abmil: K = branches)."""
    if extra_dim:
        raise ConfigError("head.type=linear reads the tokens only; per-input features need head.type=mlp")
    if num_tokens is None:
        raise ConfigError("head.type=linear needs an encoder with a fixed number of tokens (a pooling aggregator "
                          "such as abmil); use head.type=mlp")
    return FlatLinear(in_dim, num_tokens, out_dim, dropout)


class FeatureScaler(nn.Module):
    """Standardises the trailing ``n`` columns of per-input features ``(B, F)`` with a mean and scale fitted once on
    the training inputs (:meth:`fit`; chemprop's features scaler), kept as buffers (saved with the weights).

    Not a BatchNorm: the head stage batches molecules of similar size together, and the descriptors follow size
    (weight, atom and ring counts), so batch statistics would differ from batch to batch and from the statistics
    used at prediction (``medmm eval moleculenet`` compares the two).
    A column that is constant on the training inputs keeps scale 1. Standardised values are clipped to
    ``±CLIP``: a rare count (RDKit's ``fr_diazo``, ``NumRadicalElectrons``) has a tiny std, so the few molecules
    that have it would otherwise feed the head values in the hundreds (|z| > 10 for 9 % of MoleculeNet HIV).
    """

    CLIP = 5.0

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("scale", torch.ones(n))

    @property
    def num_features(self) -> int:
        return int(self.mean.numel())

    @torch.no_grad()
    def fit(self, columns: torch.Tensor) -> None:
        """Fit on the training inputs' columns to standardise, ``(N, n)`` (population mean and std)."""
        x = columns.double()
        if x.dim() != 2 or x.shape[1] != self.num_features or x.shape[0] == 0:
            raise ValueError(f"FeatureScaler.fit wants (N>0, {self.num_features}) columns, got {tuple(x.shape)}")
        std = x.std(0, unbiased=False)
        self.mean.copy_(x.mean(0).to(self.mean.dtype))
        self.scale.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)).to(self.scale.dtype))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n = self.num_features
        d = (features[:, -n:] - self.mean.to(features.dtype)) / self.scale.to(features.dtype)
        d = d.clamp(-self.CLIP, self.CLIP)
        return torch.cat([features[:, :-n], d], -1)


class HeadModel(nn.Module):
    """Encoder tokens -> head -> logits: ``(B,)`` for the binary objective, ``(B, C)`` for multiclass.

    ``config`` is the head stage's settings with ``classes`` resolved; ``temperature`` the calibration
    fitted after training (1.0 = none).
    """

    def __init__(self, config: HeadStageConfig, encoder: nn.Module, head: nn.Module, temperature: float = 1.0,
                 feature_norm: int = 0):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.head = head
        self.temperature = float(temperature)
        self.feature_norm = FeatureScaler(feature_norm) if feature_norm else None  # the trailing descriptor columns

    @property
    def classes(self) -> list[str]:
        return list(self.config.classes)

    @property
    def binary(self) -> bool:
        return self.config.objective == "binary"

    @property
    def tasks(self) -> int:
        """Binary tasks (logits per input): ``len(data.label_cols)`` for a multi-task head, else 1."""
        return max(1, len(self.config.data.label_cols))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                features: torch.Tensor | None = None) -> torch.Tensor:
        tokens, tmask = self.encoder(x, mask)  # (B, N, D), (B, N) | None
        if features is not None and self.feature_norm is not None:
            features = self.feature_norm(features.to(tokens.dtype))
        logits = self.head(tokens, tmask) if features is None else self.head(tokens, tmask, features)  # (B, out)
        return logits.squeeze(-1) if self.binary and self.tasks == 1 else logits  # (B,) | (B, T) | (B, C)

    @torch.no_grad()
    def attention(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The aggregator's attention over the inputs of each bag ``(B, N)`` (abmil)."""
        from .attention import bag_attention

        return bag_attention(self.encoder, None, x, mask)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write config + weights into ``path`` atomically (a temporary folder moved into place)."""
        saved = dataclasses.replace(self.config, encoder=dataclasses.replace(self.config.encoder, checkpoint=None))
        meta = {"format_version": FORMAT_VERSION, "medmm_version": __version__, "head": to_dict(saved),
                "temperature": self.temperature, **(extra or {})}
        if self.feature_norm is not None:  # the descriptor columns, which another RDKit may list differently
            from ..io.molecules import rdkit2d_names

            meta["rdkit2d_names"] = list(rdkit2d_names())
        return save_encoder_folder(path, self, self.encoder, CONFIG_NAME, meta)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> HeadModel:
        """Rebuild from a folder written by :meth:`save_pretrained`; in eval mode on ``device``."""
        from safetensors.torch import load_file

        from ..utils import read_folder_config

        path = Path(path)
        meta = read_folder_config(path, CONFIG_NAME, FORMAT_VERSION, "head model folder")
        cfg = config_from_dict(HeadStageConfig, meta["head"], str(path / CONFIG_NAME))
        if "rdkit2d_names" in meta:
            from ..io.molecules import rdkit2d_names

            if tuple(meta["rdkit2d_names"]) != rdkit2d_names():
                raise ConfigError(f"{path / CONFIG_NAME}: the model reads RDKit's 2D descriptors as the RDKit it was "
                                  "trained with listed them, and this RDKit lists others (head.mol_features="
                                  f"{cfg.mol_features}); install the training RDKit")
        model = build_head_model(cfg, load_encoder_weights=False)
        weights = load_file(str(path / WEIGHTS_NAME))
        if "feature_norm.running_mean" in weights:  # saved before the FeatureScaler replaced the descriptors' BatchNorm
            raise ConfigError(f"{path / WEIGHTS_NAME}: this model standardises its RDKit descriptors with a BatchNorm, "
                              "which an older medmm used; retrain it (the BatchNorm misread size-bucketed batches)")
        model.load_state_dict(weights)
        model.temperature = float(meta.get("temperature", 1.0))
        return model.to(device).eval()


def feature_dims(cfg: HeadStageConfig) -> tuple[int, int]:
    """``(all, standardised)``: per-input features the head reads beside the encoder's tokens
    (``head.mol_features``: the fingerprint bits as they are, then the RDKit descriptors, which a
    :class:`FeatureScaler` fitted on the training molecules standardises); ``(0, 0)`` = none."""
    from ..data.featurisers.molecules import mol_feature_kinds
    from ..io.molecules import rdkit2d_names

    kinds = mol_feature_kinds(cfg.mol_features)
    bits = cfg.preprocess.fingerprint_bits if "fingerprint" in kinds else 0
    desc = len(rdkit2d_names()) if "rdkit2d" in kinds else 0
    return bits + desc, desc


def is_head_model(path: str | Path) -> bool:
    """True for a folder written by :meth:`HeadModel.save_pretrained`."""
    return (Path(path) / CONFIG_NAME).is_file()


def build_head_model(cfg: HeadStageConfig, load_encoder_weights: bool = True) -> HeadModel:
    """Encoder from the ``encoders`` registry + head from this one; ``cfg.classes`` must be resolved for multiclass."""
    from encoders import build_encoder

    if cfg.objective == "multiclass" and len(cfg.classes) < 2:
        raise ConfigError(f"head.classes: a multiclass head needs at least 2 classes, got {cfg.classes}")
    try:
        enc = build_encoder(cfg.encoder.name, checkpoint=cfg.encoder.checkpoint if load_encoder_weights else None,
                            **cfg.encoder.kwargs)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        raise ConfigError(f"head.encoder: {e}") from e
    enc.requires_grad_(cfg.encoder.trainable == "full")
    out = max(1, len(cfg.data.label_cols)) if cfg.objective == "binary" else len(cfg.classes)
    extra, normed = feature_dims(cfg)
    head = build_head(cfg.type, in_dim=enc.out_dim, num_tokens=enc.num_tokens, out_dim=out, hidden=cfg.hidden,
                      dropout=cfg.dropout, extra_dim=extra, extra_dropout=cfg.feature_dropout)
    return HeadModel(cfg, enc, head, feature_norm=normed)


@torch.no_grad()
def predict_logits(model: HeadModel, featuriser, items: list[dict], batch_size: int = 128) -> np.ndarray:
    """Logits of ``items`` in input order, eval mode: ``(n,)`` for a binary head, ``(n, C)`` for multiclass.

    Items of similar size are batched together (less padding); lazy items (slides) are read by the
    featuriser (``featuriser.load``) one batch at a time.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    width = model.tasks if model.binary else len(model.classes)
    out = np.zeros((len(items), width), dtype=np.float64)
    order = sorted(range(len(items)), key=lambda i: item_size(items[i]))  # similar sizes together
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        batch = featuriser.collate([featuriser.load(items[i]) for i in idx])
        x, mask, feats = batch["x"].to(device), batch.get("mask"), batch.get("features")
        x = x.to(next(model.parameters()).dtype) if x.is_floating_point() else x
        logits = model(x, None if mask is None else mask.to(device), None if feats is None else feats.to(device))
        out[idx] = logits.reshape(len(idx), width).double().cpu().numpy()
    model.train(was_training)
    return out[:, 0] if model.binary and model.tasks == 1 else out  # (n,) | (n, T) | (n, C)


def item_size(item: dict) -> int:
    """Inputs in one featurised item (atoms, nucleotides, tiles); 0 when it is read lazily."""
    x = item.get("x")
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else 0
