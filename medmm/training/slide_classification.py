"""Slide classification: gated ABMIL (or another pooling aggregator) + a linear head on precomputed tile features.

    medmm prepare wsi slides/ --out runs/wsi --features vit_tile --encoder-checkpoint uni.bin --labels labels.csv
    medmm wsi train --config configs/tasks/slide_classification.yaml train=runs/wsi/slides_train.jsonl
    medmm wsi eval --checkpoint runs/slide_cls/checkpoint --data runs/wsi/slides_eval.jsonl --out runs/slide_cls/eval
    medmm wsi heatmap --checkpoint runs/slide_cls/checkpoint --features runs/wsi/features/S1.safetensors --out S1.png

Data: the JSONL ``prepare wsi --features --labels`` writes (``modalities.slide`` = a feature file,
``label`` = the class name). One bag per step (bags differ in size; the MIL convention), AdamW,
cross-entropy with balanced class weights by default, cosine decay. Training bags larger than
``train_max_tiles`` are randomly subsampled each epoch (a regulariser, and bounded memory); evaluation
uses up to ``max_tiles`` evenly spaced tiles. This is a plain PyTorch loop: an ABMIL head has about
0.7 M parameters and needs no DeepSpeed. Reported metrics come from ``medmm.eval.classification``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..config import EncoderConfig, load_config, to_dict
from ..errors import ConfigError, InvalidInputError


@dataclass
class SlideClassificationConfig:
    """Everything ``medmm wsi train`` needs (``configs/tasks/slide_classification.yaml``)."""

    train: str = ""
    """Slide JSONL (``modalities.slide`` feature file + ``label``), e.g. from ``prepare wsi --features --labels``."""
    eval: str | None = None
    """Held-out slide JSONL scored after every epoch (reported, not used to pick a model)."""
    classes: list[str] = field(default_factory=list)
    """Class names in head order; empty = the sorted labels of ``train``."""
    aggregator: EncoderConfig = field(default_factory=lambda: EncoderConfig(name="abmil", trainable="full"))
    """A pooling slide encoder from the registry (``abmil``; kwargs set in_dim = the tile feature width)."""
    dropout: float = 0.25
    """Dropout before the linear head."""
    epochs: int = 20
    """Passes over the training slides."""
    lr: float = 2e-4
    """Peak learning rate (AdamW), cosine-decayed to 10%."""
    weight_decay: float = 1e-5
    """AdamW weight decay."""
    class_weights: Literal["balanced", "none"] = "balanced"
    """balanced = inverse class frequency in the loss (slide cohorts are rarely balanced)."""
    train_max_tiles: int = 4096
    """Random subset of tiles per training bag and epoch."""
    max_tiles: int = 16384
    """Evenly spaced subset of tiles for evaluation and heat maps."""
    seed: int = 0
    """Seed of initialisation, slide order and tile sampling."""
    output_dir: str = "runs/slide_cls"
    """Run folder: checkpoint/, metrics.jsonl, eval/."""
    device: str = "auto"
    """auto | cpu | cuda."""
    bootstrap: int = 1000
    """Bootstrap resamples for the metrics' 95% intervals (0 = none)."""

    def __post_init__(self):
        for k in ("epochs", "train_max_tiles", "max_tiles"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"{k} must be positive, got {getattr(self, k)}")
        if self.classes and len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"classes has duplicates: {self.classes}")


def _device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def read_slides(path: str | Path) -> list[dict]:
    """Slide records {id, features (absolute path), label}, one per feature file.

    ``prepare wsi`` writes a label record and a report record per slide: records are merged by feature
    file (two different labels for one slide is an error naming both lines); records without a label
    (report only) are skipped, and a file with no labelled slide at all is an error."""
    from ..utils import read_jsonl

    path = Path(path)
    if not path.exists():
        raise InvalidInputError(path, "slide JSONL not found")
    out: dict[str, dict] = {}
    for i, r in enumerate(read_jsonl(path), 1):
        feat = (r.get("modalities") or {}).get("slide") or r.get("features")
        if not feat:
            raise InvalidInputError(f"{path}:{i}", "needs modalities.slide (a tile-feature file)")
        if r.get("label") in (None, ""):
            continue
        fp = Path(feat)
        key = str(fp if fp.is_absolute() else path.parent / fp)
        if key in out and out[key]["label"] != str(r["label"]):
            raise InvalidInputError(f"{path}:{i}", f"slide {feat} is labelled '{r['label']}' here and "
                                                   f"'{out[key]['label']}' at line {out[key]['line']}")
        out.setdefault(key, {"id": r.get("id", f"{path.name}:{i}"), "label": str(r["label"]), "features": key,
                             "line": i})
    if not out:
        raise InvalidInputError(path, "no record has a label")
    return list(out.values())


def _bag(path: str, k: int, rng: np.random.Generator | None, in_dim: int) -> tuple[torch.Tensor, np.ndarray | None]:
    from ..data.slides import load_slide_features
    from ..errors import SlideError
    from ..io.wsi import evenly_spaced

    feats, coords, _ = load_slide_features(path)
    if feats.shape[0] == 0:
        raise SlideError(path, "the slide has no tiles")
    if feats.shape[1] != in_dim:
        raise SlideError(path, f"tile features have width {feats.shape[1]}, the aggregator expects {in_dim}")
    if feats.shape[0] > k:
        idx = np.sort(rng.choice(feats.shape[0], k, replace=False)) if rng is not None else \
            evenly_spaced(feats.shape[0], k)
        feats = feats[idx]
        coords = None if coords is None else coords[idx]
    return torch.from_numpy(np.ascontiguousarray(feats)), coords


@torch.no_grad()
def predict(model, slides: list[dict], device: torch.device) -> tuple[list, list[dict]]:
    """Class probabilities ``(n, C)`` for slide records; unreadable slides are returned as errors, not guessed."""
    from ..errors import SlideError

    model.eval()
    probs, errors = [], []
    for s in slides:
        try:
            x, _ = _bag(s["features"], model.max_tiles, None, model.in_dim)
        except SlideError as e:
            errors.append(e.to_record())
            probs.append(None)
            continue
        probs.append(torch.softmax(model(x[None].to(device)), -1)[0].float().cpu().numpy())
    return probs, errors


def _metrics(model, slides, device, bootstrap: int, seed: int) -> tuple[dict, list[dict]]:
    from ..eval.classification import classification_metrics

    probs, errors = predict(model, slides, device)
    idx = {c: i for i, c in enumerate(model.classes)}
    rows, ys, ps = [], [], []
    for s, p in zip(slides, probs):
        if s["label"] not in idx:
            raise InvalidInputError(s["id"], f"label '{s['label']}' is not one of the model's classes {model.classes}")
        if p is None:
            continue
        ys.append(idx[s["label"]])
        ps.append(p)
        rows.append({"id": s["id"], "label": s["label"], "prediction": model.classes[int(np.argmax(p))],
                     "probabilities": {c: float(v) for c, v in zip(model.classes, p)}})
    m = classification_metrics(ys, np.array(ps).reshape(-1, len(model.classes)), model.classes, bootstrap=bootstrap,
                               seed=seed)
    m["errors"] = errors
    return m, rows


def train(cfg: SlideClassificationConfig) -> dict:
    """Train, save ``output_dir/checkpoint``, write ``metrics.jsonl``; returns the final metrics."""
    from ..model.slide_classifier import SlideClassifier
    from ..utils import seed_everything, write_jsonl

    if not cfg.train:
        raise ConfigError("train: the path of a slide JSONL is required")
    seed_everything(cfg.seed)
    device = _device(cfg.device)
    slides = read_slides(cfg.train)
    classes = cfg.classes or sorted({s["label"] for s in slides})
    unknown = sorted({s["label"] for s in slides} - set(classes))
    if unknown:
        raise ConfigError(f"train: labels {unknown} are not in classes {classes}")
    model = SlideClassifier(cfg.aggregator.name, cfg.aggregator.kwargs, classes, cfg.dropout, cfg.max_tiles)
    if cfg.aggregator.checkpoint:
        from encoders.registry import load_weights

        load_weights(model.aggregator, cfg.aggregator.checkpoint)
    if cfg.aggregator.trainable == "frozen":
        model.aggregator.requires_grad_(False)
    model.to(device)
    y = np.array([classes.index(s["label"]) for s in slides])
    counts = np.bincount(y, minlength=len(classes)).astype(np.float64)
    w = None
    if cfg.class_weights == "balanced":
        w = torch.tensor(len(y) / (len(classes) * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    loss_fn = torch.nn.CrossEntropyLoss(weight=w)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(slides)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))  # cosine to 10%
    rng = np.random.default_rng(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "metrics.jsonl"
    log_path.write_text("")
    eval_slides = read_slides(cfg.eval) if cfg.eval else []
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        losses = []
        for i in rng.permutation(len(slides)):
            x, _ = _bag(slides[i]["features"], cfg.train_max_tiles, rng, model.in_dim)
            logits = model(x[None].to(device))
            loss = loss_fn(logits, torch.tensor([y[i]], device=device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        rec = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "seconds": round(time.perf_counter() - t0, 3)}
        if eval_slides:
            m, _ = _metrics(model, eval_slides, device, 0, cfg.seed)
            rec.update({f"eval_{k}": m[k] for k in ("accuracy", "balanced_accuracy", "auroc")})
        history.append(rec)
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    model.save_pretrained(out / "checkpoint")
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    result = {"checkpoint": str(out / "checkpoint"), "epochs": history}
    if eval_slides:
        m, rows = _metrics(model, eval_slides, device, cfg.bootstrap, cfg.seed)
        (out / "eval").mkdir(exist_ok=True)
        (out / "eval" / "metrics.json").write_text(json.dumps(m, indent=2))
        write_jsonl(out / "eval" / "predictions.jsonl", rows)
        result["eval"] = {k: m[k] for k in ("count", "accuracy", "balanced_accuracy", "auroc")}
    return result


def evaluate(checkpoint: str | Path, data: str | Path, out: str | Path, bootstrap: int = 1000, seed: int = 0,
             device: str = "auto") -> dict:
    """Score a saved classifier on a slide JSONL: ``out/metrics.json`` + ``out/predictions.jsonl``."""
    from ..model.slide_classifier import SlideClassifier
    from ..utils import write_jsonl

    dev = _device(device)
    model = SlideClassifier.from_pretrained(checkpoint, dev)
    m, rows = _metrics(model, read_slides(data), dev, bootstrap, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(m, indent=2))
    write_jsonl(out / "predictions.jsonl", rows)
    return m


def heatmap(checkpoint: str | Path, features: str | Path, out_png: str | Path, slide: str | None = None,
            slide_mpp: float | None = None, device: str = "auto") -> dict:
    """Attention heat map of a saved classifier on one slide's feature file; also its class probabilities."""
    from ..data.slides import load_slide_features
    from ..errors import SlideError
    from ..eval.slide_heatmap import render_slide_heatmap
    from ..model.slide_classifier import SlideClassifier

    dev = _device(device)
    model = SlideClassifier.from_pretrained(checkpoint, dev)
    x, coords = _bag(str(features), model.max_tiles, None, model.in_dim)
    _f, _c, meta = load_slide_features(features)
    if coords is None:
        raise SlideError(features, "no tile coordinates in the feature file (write it with "
                                   "`medmm prepare wsi --features`)")
    src = slide or meta.get("source")
    if not src or not Path(src).exists():
        raise SlideError(features, f"the slide '{src}' is not here; pass --slide with its current path")
    with torch.no_grad():
        att = model.attention(x[None].to(dev))[0].float().cpu().numpy()
        probs = torch.softmax(model(x[None].to(dev)), -1)[0].float().cpu().numpy()
    pred = model.classes[int(probs.argmax())]
    info = render_slide_heatmap(src, coords, float(meta["tile0"]), att, out_png, slide_mpp=slide_mpp,
                                title=f"{Path(src).name}: predicted {pred} (p={probs.max():.2f})")
    return {**info, "prediction": pred, "probabilities": {c: float(p) for c, p in zip(model.classes, probs)}}


def main(argv: list[str] | None = None) -> None:
    """``medmm wsi train|eval|heatmap``."""
    import argparse

    ap = argparse.ArgumentParser(prog="medmm wsi", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a slide classifier (aggregator + head)")
    t.add_argument("--config", required=True)
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. epochs=5 aggregator.kwargs.in_dim=768")
    e = sub.add_parser("eval", help="accuracy, balanced accuracy, AUROC (+ bootstrap 95%% CI)")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--bootstrap", type=int, default=1000)
    h = sub.add_parser("heatmap", help="thumbnail + tissue mask + attention heat map (PNG)")
    h.add_argument("--checkpoint", required=True)
    h.add_argument("--features", required=True, help="a slide's .safetensors from `medmm prepare wsi --features`")
    h.add_argument("--slide", help="the slide file, if it moved since the features were written")
    h.add_argument("--slide-mpp", type=float)
    h.add_argument("--out", required=True)
    for p in (e, h):
        p.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    if a.cmd == "train":
        res = train(load_config(SlideClassificationConfig, a.config, a.overrides))
    elif a.cmd == "eval":
        res = evaluate(a.checkpoint, a.data, a.out, a.bootstrap, device=a.device)
    else:
        res = heatmap(a.checkpoint, a.features, a.out, a.slide, a.slide_mpp, a.device)
    print(json.dumps(res, indent=2))
