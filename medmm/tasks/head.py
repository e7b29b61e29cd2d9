"""A modality encoder + a binary classification head, trained without the LLM (plain torch loop).

The ``configs/tasks/*.yaml`` recipes (:class:`HeadTaskConfig`)::

    medmm train --config configs/tasks/druggability_head.yaml           # = python -m medmm.tasks --config ...
    medmm eval druggability --checkpoint runs/druggability_head/checkpoint --data assay.csv --label-col active

Flow: labelled CSV/TSV -> the task's featuriser (molecules: RDKit pipeline in worker processes;
DNA: k-mer ids) -> split (scaffold / stratified / random) -> AdamW on BCE, early stopping on the
validation AUROC -> temperature scaling fitted on the validation logits -> test metrics before and
after calibration -> a checkpoint folder::

    task.json             the HeadTaskConfig (preprocessing included): the folder rebuilds from itself
    model.safetensors     encoder + head
    encoder.safetensors   the encoder alone (an LLM recipe loads it with encoder.checkpoint=...)
    calibration.json      {"temperature": T}
    metrics.json          validation and test metrics, raw and calibrated
    predictions_test.csv  one row per test molecule/sequence
    split.json            file rows of the train / validation / test parts
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import gzip
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..config import ConfigError, EncoderConfig, PreprocessConfig, config_from_dict, to_dict
from ..errors import InvalidInputError

log = logging.getLogger(__name__)
Item = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- config
@dataclass
class TaskDataConfig:
    """The labelled table and how to split it."""

    path: str = ""
    """CSV or TSV file (``.gz`` allowed) with one input column and one 0/1 label column."""
    input_col: str = "smiles"
    """Column holding the SMILES (druggability) or DNA sequence (sequence_classification)."""
    label_col: str = "label"
    """Column holding the 0/1 label; blank cells are reported and skipped."""
    delimiter: str | None = None
    """Field separator; None = tab for .tsv files, comma otherwise."""
    split: Literal["scaffold", "stratified", "random"] = "scaffold"
    """scaffold (Bemis-Murcko, molecules only) | stratified | random."""
    fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    """Train / validation / test shares."""
    seed: int = 0
    """Seed of the split."""
    workers: int = 2
    """Featurisation worker processes (0 = in this process)."""
    limit: int | None = None
    """Read at most this many rows (quick runs)."""


@dataclass
class HeadConfig:
    """The classification head on the pooled encoder tokens (masked mean and max)."""

    hidden: int = 128
    """Hidden width of the two-layer MLP."""
    dropout: float = 0.1
    """Dropout before the output layer."""


@dataclass
class HeadTrainerConfig:
    """The plain torch training loop."""

    epochs: int = 40
    """Passes over the training part at most."""
    batch_size: int = 64
    """Samples per step."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    patience: int = 10
    """Stop after this many epochs without a better validation AUROC."""
    pos_weight: float | None = None
    """Weight of positives in the loss; None = 1 (keeps the probabilities calibratable by one temperature)."""
    seed: int = 0
    """Seed of initialisation, batch order and dropout."""
    threads: int | None = None
    """torch CPU threads (None = torch's default)."""

    def __post_init__(self):
        for k in ("epochs", "batch_size", "patience"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"trainer.{k} must be positive, got {getattr(self, k)}")


@dataclass
class HeadTaskConfig:
    """Everything ``python -m medmm.tasks`` needs: data, input loader, encoder, head, loop, calibration."""

    task: Literal["druggability", "sequence_classification"] = "druggability"
    """Which featuriser reads the input column: druggability (SMILES) | sequence_classification (DNA)."""
    data: TaskDataConfig = field(default_factory=TaskDataConfig)
    loader: str = "mol_graph"
    """Input loader registry name matching the encoder (mol_graph, smiles_fingerprint, dna_tokens)."""
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(name="mol_gin", trainable="full"))
    """The encoder; ``trainable: frozen`` trains the head alone (a probe on ``encoder.checkpoint``)."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """Input preprocessing (saved in the checkpoint)."""
    head: HeadConfig = field(default_factory=HeadConfig)
    trainer: HeadTrainerConfig = field(default_factory=HeadTrainerConfig)
    calibration: Literal["temperature", "none"] = "temperature"
    """Post-hoc calibration fitted on the validation part."""
    output_dir: str = "runs/druggability_head"
    """Run folder; the checkpoint goes to ``<output_dir>/checkpoint``."""

    def __post_init__(self):
        if self.encoder.trainable == "lora":
            raise ConfigError("encoder.trainable: head tasks train the encoder 'full' or keep it 'frozen'")
        if self.data.split == "scaffold" and self.task != "druggability":
            raise ConfigError("data.split=scaffold needs molecules (task: druggability)")


# ----------------------------------------------------------------------------- reading the labelled table
def parse_label(value: Any, source: str, column: str) -> int:
    """A 0/1 label (``0``, ``1``, ``0.0``, ``1.0``); anything else raises InvalidInputError."""
    text = str(value if value is not None else "").strip()
    if text in ("0", "1", "0.0", "1.0"):
        return int(float(text))
    raise InvalidInputError(source, f"label '{text}' in column '{column}' is not 0/1" if text
                            else f"no label in column '{column}'")


def read_table(path: str | Path, input_col: str, label_col: str | None = None, delimiter: str | None = None,
               limit: int | None = None) -> list[tuple[str, dict]]:
    """Rows ``(source, row)`` of a CSV/TSV (``.gz`` allowed); ``source`` is ``file:line``. Checks the columns."""
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(path, "file not found")
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    delim = delimiter or ("\t" if name.endswith((".tsv", ".txt")) else ",")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        reader = csv.DictReader(f, delimiter=delim)
        cols = reader.fieldnames or []
        for c in (input_col, label_col):
            if c and c not in cols:
                raise InvalidInputError(path, f"no column '{c}' (columns: {cols})")
        rows = []
        for i, row in enumerate(reader, start=2):
            if limit is not None and len(rows) >= limit:
                break
            rows.append((f"{path}:{i}", row))
    return rows


# ----------------------------------------------------------------------------- featurisers (one per task)
@dataclass
class Featurised:
    """The usable rows of a table as loader items, plus the rejected rows' error records."""

    items: list[Item]
    sources: list[str]
    inputs: list[str]
    canonical: list[str]
    """Canonical SMILES or cleaned sequence."""
    labels: list[int | None]
    groups: list[str] | None = None
    """Scaffolds (molecules) for the scaffold split."""
    reports: list[dict] | None = None
    """Per-item extra columns for prediction files (e.g. the drug-likeness rule report)."""
    errors: list[dict] = field(default_factory=list)


Featuriser = Callable[["HeadTaskConfig", list[str], list[str]], Featurised]
_FEATURISERS: dict[str, Featuriser] = {}


def register_featuriser(task: str):
    """Decorator: ``fn(cfg, values, sources) -> Featurised`` for ``task``."""

    def deco(fn):
        _FEATURISERS[task] = fn
        return fn

    return deco


_REPORTERS: dict[str, Callable[[list[str]], list[dict]]] = {}


def register_reporter(task: str):
    """Decorator: ``fn(canonical_inputs) -> [dict]``, extra columns for prediction files (computed only there)."""

    def deco(fn):
        _REPORTERS[task] = fn
        return fn

    return deco


def add_reports(cfg: HeadTaskConfig, feats: Featurised) -> Featurised:
    """Fill ``feats.reports`` with the task's report columns (e.g. drug-likeness rules), if it has any."""
    from . import druggability, sequence  # noqa: F401  (register the reporters)

    if cfg.task in _REPORTERS:
        feats.reports = _REPORTERS[cfg.task](feats.canonical)
    return feats


def featurise(cfg: HeadTaskConfig, values: list[str], sources: list[str],
              labels: list[int | None] | None = None) -> Featurised:
    """Run the task's featuriser; ``labels`` (one per value) are carried onto the surviving rows."""
    from . import druggability, sequence  # noqa: F401  (register the featurisers)

    feats = _FEATURISERS[cfg.task](cfg, values, sources)
    by_source = dict(zip(sources, labels or [None] * len(sources)))
    feats.labels = [by_source[s] for s in feats.sources]
    return feats


def load_labelled(cfg: HeadTaskConfig, path: str | Path | None = None, input_col: str | None = None,
                  label_col: str | None = None) -> Featurised:
    """Read and featurise a labelled table (defaults from ``cfg.data``); bad labels become error records."""
    d = cfg.data
    label_col = label_col or d.label_col
    rows = read_table(path or d.path, input_col or d.input_col, label_col, d.delimiter, d.limit)
    values, sources, labels, errors = [], [], [], []
    for src, row in rows:
        try:
            labels.append(parse_label(row.get(label_col), src, label_col))
            values.append(row.get(input_col or d.input_col) or "")
            sources.append(src)
        except InvalidInputError as e:
            errors.append(e.to_record())
    feats = featurise(cfg, values, sources, labels)
    feats.errors = errors + feats.errors
    return feats


# ----------------------------------------------------------------------------- model
class EncoderClassifier(nn.Module):
    """Encoder tokens ``(B, N, D)`` -> masked mean and max ``(B, 2D)`` -> MLP -> one logit per input."""

    def __init__(self, encoder: nn.Module, hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        d = encoder.out_dim
        self.head = nn.Sequential(nn.LayerNorm(2 * d), nn.Linear(2 * d, hidden), nn.GELU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens, tmask = self.encoder(x, mask)  # (B, N, D), (B, N) | None
        if tmask is None:
            tmask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        m = tmask.unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * m).sum(1) / m.sum(1).clamp(min=1)
        mx = tokens.masked_fill(~tmask.unsqueeze(-1), float("-inf")).amax(1).clamp(min=-1e4)
        return self.head(torch.cat([mean, mx], -1)).squeeze(-1)  # (B,)


def build_model(cfg: HeadTaskConfig, load_encoder_weights: bool = True) -> EncoderClassifier:
    from encoders import build_encoder

    try:
        enc = build_encoder(cfg.encoder.name, checkpoint=cfg.encoder.checkpoint if load_encoder_weights else None,
                            **cfg.encoder.kwargs)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        raise ConfigError(f"encoder: {e}") from e
    enc.requires_grad_(cfg.encoder.trainable == "full")
    return EncoderClassifier(enc, cfg.head.hidden, cfg.head.dropout)


def _bucketed_order(items: list[Item], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffled batches of similar-sized inputs: random windows of 16 batches are sorted by size, cut into
    batches and the batches shuffled (less padding for variable-size molecules and sequences)."""
    perm = rng.permutation(len(items)).tolist()
    window = 16 * batch_size
    batches = []
    for w in range(0, len(perm), window):
        chunk = sorted(perm[w: w + window], key=lambda i: items[i]["x"].shape[0])
        batches += [chunk[s: s + batch_size] for s in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _batches(loader, items: list[Item], order: list[int] | list[list[int]], batch_size: int):
    groups = order if order and isinstance(order[0], list) else [
        order[s: s + batch_size] for s in range(0, len(order), batch_size)]
    for idx in groups:
        batch = loader.collate([items[i] for i in idx])
        yield idx, batch["x"], batch.get("mask")


@torch.no_grad()
def predict_logits(model: EncoderClassifier, loader, items: list[Item], batch_size: int = 128) -> np.ndarray:
    """Logits for ``items`` in order (eval mode)."""
    model.eval()
    out = np.zeros(len(items), dtype=np.float64)
    order = sorted(range(len(items)), key=lambda i: items[i]["x"].shape[0])  # similar sizes together
    for idx, x, mask in _batches(loader, items, order, batch_size):
        out[idx] = model(x, mask).double().numpy()
    return out


def train_head(cfg: HeadTaskConfig, model: EncoderClassifier, loader, train: Featurised, val: Featurised) -> dict:
    """Train ``model`` in place; keeps the weights of the epoch with the best validation AUROC."""
    from ..eval.calibration import binary_metrics, sigmoid

    t = cfg.trainer
    torch.manual_seed(t.seed)
    rng = np.random.default_rng(t.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    y = torch.tensor(train.labels, dtype=torch.float32)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=None if t.pos_weight is None else torch.tensor(t.pos_weight))
    best, best_state, history, stale = -float("inf"), copy.deepcopy(model.state_dict()), [], 0
    for epoch in range(t.epochs):
        model.train()
        t0, total, n = time.perf_counter(), 0.0, 0
        for idx, x, mask in _batches(loader, train.items, _bucketed_order(train.items, t.batch_size, rng), t.batch_size):
            loss = loss_fn(model(x, mask), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            total, n = total + float(loss.detach()) * len(idx), n + len(idx)
        vm = binary_metrics(val.labels, sigmoid(predict_logits(model, loader, val.items)))
        score = vm["auroc"] if vm.get("auroc") is not None else -vm.get("log_loss", 0.0)
        history.append({"epoch": epoch + 1, "train_loss": round(total / max(n, 1), 5), "val": vm,
                        "seconds": round(time.perf_counter() - t0, 2)})
        log.info("epoch %d loss %.4f val auroc %s", epoch + 1, total / max(n, 1), vm.get("auroc"))
        if score > best:
            best, best_state, stale = score, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= t.patience:
                break
    model.load_state_dict(best_state)
    return {"epochs_run": len(history), "best_val_score": best, "history": history}


def _subset(f: Featurised, idx: list[int]) -> Featurised:
    pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
    return Featurised([f.items[i] for i in idx], pick(f.sources), pick(f.inputs), pick(f.canonical),
                      pick(f.labels), pick(f.groups), pick(f.reports))


def split_indices(cfg: HeadTaskConfig, f: Featurised) -> tuple[list[int], list[int], list[int]]:
    from ..data.splits import random_split, scaffold_split, stratified_split

    d = cfg.data
    if d.split == "scaffold":
        return scaffold_split(f.groups or [], d.fractions, d.seed)
    if d.split == "stratified":
        return stratified_split(f.labels, d.fractions, d.seed)
    return random_split(len(f.items), d.fractions, d.seed)


# ----------------------------------------------------------------------------- the whole recipe
def run_head_task(cfg: HeadTaskConfig) -> dict:
    """Featurise, split, train, calibrate, evaluate and save; returns the metrics (also in metrics.json)."""
    from ..data.loaders import build_loader
    from ..eval.calibration import T_MAX, T_MIN, binary_metrics, fit_temperature, sigmoid

    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    t0 = time.perf_counter()
    feats = load_labelled(cfg)
    t_feat = time.perf_counter() - t0
    if len(feats.items) < 10:
        raise InvalidInputError(cfg.data.path, f"only {len(feats.items)} usable rows; need at least 10 to train")
    tr, va, te = split_indices(cfg, feats)
    train, val, test = _subset(feats, tr), _subset(feats, va), _subset(feats, te)
    loader = build_loader(cfg.loader, cfg.preprocess)
    model = build_model(cfg)
    t1 = time.perf_counter()
    fit = train_head(cfg, model, loader, train, val)
    t_train = time.perf_counter() - t1
    val_logits = predict_logits(model, loader, val.items)
    temperature = fit_temperature(val_logits, val.labels) if cfg.calibration == "temperature" else 1.0
    test_logits = predict_logits(model, loader, test.items)
    metrics = {
        "task": cfg.task, "data": cfg.data.path, "split": cfg.data.split,
        "rows": {"usable": len(feats.items), "rejected": len(feats.errors), "train": len(tr), "val": len(va),
                 "test": len(te)},
        "temperature": round(temperature, 4), "temperature_at_bound": temperature in (T_MIN, T_MAX),
        "val": {"raw": binary_metrics(val.labels, sigmoid(val_logits)),
                "calibrated": binary_metrics(val.labels, sigmoid(val_logits / temperature))},
        "test": {"raw": binary_metrics(test.labels, sigmoid(test_logits)),
                 "calibrated": binary_metrics(test.labels, sigmoid(test_logits / temperature))},
        "epochs_run": fit["epochs_run"],
        "seconds": {"featurise": round(t_feat, 2), "train": round(t_train, 2)},
    }
    if feats.groups is not None:
        metrics["scaffolds"] = {k: len({feats.groups[i] for i in idx}) for k, idx in
                                (("train", tr), ("val", va), ("test", te))}
    out = Path(cfg.output_dir)
    save_checkpoint(out / "checkpoint", cfg, model, temperature, metrics)
    write_predictions(out / "checkpoint" / "predictions_test.csv", add_reports(cfg, test), sigmoid(test_logits),
                      sigmoid(test_logits / temperature))
    (out / "checkpoint" / "split.json").write_text(json.dumps(
        {"train": train.sources, "val": val.sources, "test": test.sources}))
    (out / "history.json").write_text(json.dumps(fit["history"], indent=1))
    if feats.errors:
        with open(out / "errors.jsonl", "w") as fh:
            fh.writelines(json.dumps(e) + "\n" for e in feats.errors)
    return metrics


# ----------------------------------------------------------------------------- checkpoints and prediction
def save_checkpoint(path: Path, cfg: HeadTaskConfig, model: EncoderClassifier, temperature: float,
                    metrics: dict) -> Path:
    from safetensors.torch import save_file

    from ..utils import atomic_write_text

    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    save_file({k: v.detach().contiguous() for k, v in model.encoder.state_dict().items()},
              str(path / "encoder.safetensors"))
    saved = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, checkpoint=None))
    atomic_write_text(path / "task.json", json.dumps(to_dict(saved), indent=2))
    atomic_write_text(path / "calibration.json", json.dumps({"temperature": temperature}))
    atomic_write_text(path / "metrics.json", json.dumps(metrics, indent=2))
    return path


def is_head_checkpoint(path: str | Path) -> bool:
    """True for a folder written by :func:`save_checkpoint` (it holds ``task.json``)."""
    return (Path(path) / "task.json").is_file()


class HeadPredictor:
    """A saved head checkpoint: featurise raw inputs the way training did and return calibrated scores."""

    def __init__(self, path: str | Path):
        from safetensors.torch import load_file

        from ..data.loaders import build_loader

        path = Path(path)
        if not is_head_checkpoint(path):
            raise InvalidInputError(path, "not a head checkpoint (no task.json)")
        self.cfg: HeadTaskConfig = config_from_dict(HeadTaskConfig, json.loads((path / "task.json").read_text()),
                                                    str(path / "task.json"))
        self.temperature = float(json.loads((path / "calibration.json").read_text())["temperature"])
        self.model = build_model(self.cfg, load_encoder_weights=False)
        self.model.load_state_dict(load_file(str(path / "model.safetensors")))
        self.model.eval()
        self.loader = build_loader(self.cfg.loader, self.cfg.preprocess)

    def predict(self, values: list[str], sources: list[str] | None = None, labels: list[int | None] | None = None,
                reports: bool = True) -> tuple[Featurised, np.ndarray]:
        """Featurise ``values`` (failed ones land in ``.errors``; ``reports`` adds the task's report columns)
        and return their logits."""
        sources = sources or [f"row {i}" for i in range(len(values))]
        feats = featurise(self.cfg, values, sources, labels)
        if reports:
            add_reports(self.cfg, feats)
        return feats, predict_logits(self.model, self.loader, feats.items)


def write_predictions(path: Path, f: Featurised, prob_raw: np.ndarray, prob: np.ndarray) -> None:
    """CSV: source, input, canonical, label, prob_raw, prob (calibrated) and the task's report columns."""
    report_cols = list((f.reports or [{}])[0].keys()) if f.reports else []
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["source", "input", "canonical", "label", "prob_raw", "prob", *report_cols])
        for i in range(len(f.items)):
            rep = f.reports[i] if f.reports else {}
            w.writerow([f.sources[i], f.inputs[i], f.canonical[i], f.labels[i], round(float(prob_raw[i]), 5),
                        round(float(prob[i]), 5), *[_cell(rep.get(c)) for c in report_cols]])


def _cell(v: Any) -> Any:
    return ";".join(map(str, v)) if isinstance(v, (list, tuple)) else v


def main(argv: list[str] | None = None) -> dict:
    """``python -m medmm.tasks --config configs/tasks/X.yaml [key=value ...]``."""
    import argparse

    from ..config import load_config

    ap = argparse.ArgumentParser(prog="python -m medmm.tasks", description="Train an encoder + head recipe.")
    ap.add_argument("--config", required=True, help="a configs/tasks/*.yaml recipe")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.epochs=5")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(HeadTaskConfig, a.config, a.overrides)
    metrics = run_head_task(cfg)
    print(json.dumps(metrics, indent=2))
    return metrics


def is_task_config(argv: list[str]) -> bool:
    """True when ``--config X`` in ``argv`` names a head-task YAML (top-level ``task:`` in :data:`TASKS`), e.g. for
    ``medmm train`` to run :func:`main` instead of the DeepSpeed trainer."""
    import yaml

    for i, a in enumerate(argv):
        path = argv[i + 1] if a == "--config" and i + 1 < len(argv) else a[9:] if a.startswith("--config=") else None
        if path and Path(path).is_file():
            with open(path) as f:
                data = yaml.safe_load(f)
            return isinstance(data, dict) and data.get("task") in TASKS
    return False


TASKS = ("druggability", "sequence_classification")
"""The ``task:`` values of :class:`HeadTaskConfig` (a YAML without one of them is not a head-task recipe)."""
