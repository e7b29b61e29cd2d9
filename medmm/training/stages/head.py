"""``trainer.stage: head``: an encoder + classification head trained on labels, without the LLM.

Section ``head`` (:class:`medmm.config.HeadStageConfig`). Records -> batches: the labelled file is read
by the registered featuriser (``head.featuriser``: molecules, dna, slides; :mod:`medmm.data.featurisers`),
split (scaffold / scaffold_deterministic / stratified / random, or a separate ``head.data.eval_path``), and batched in shuffled
buckets of similar-sized inputs (less padding). Model: an encoder from the ``encoders`` registry and a
head from :mod:`medmm.model.heads`. Loss: BCE on one logit (``objective: binary``), masked BCE on one logit per
label column (``head.data.label_cols``: multi-task, a blank cell is a missing label that counts in neither the
loss nor the metrics; ROC-AUC is averaged over the tasks with both classes present, the MoleculeNet convention)
or cross-entropy (``multiclass``), optionally class-weighted. Logged: the loss, and after every epoch the validation
scores (``val_auroc``, ``val_log_loss`` or ``val_accuracy``, ``val_balanced_accuracy``; early
stopping and ``restore_best`` follow ``val_score``). At the end: temperature scaling fitted on the
validation part (binary), test metrics raw and calibrated. Saved (``<output_dir>/checkpoint``)::

    head_model.json       the head settings (preprocessing included) and temperature: rebuilds from itself
    model.safetensors     encoder + head          encoder.safetensors   the encoder alone
    metrics.json          validation and test metrics       predictions_test.csv   one row per test input
and ``<output_dir>/split.json`` = ``{"train": [...], "val": [...], "test": [...], "rejected": [...]}``: 0-based
numbers of the input file's data rows (the first row after the header is 0); with ``split: none`` the
validation and test numbers are rows of ``eval_path``.

    python train.py --config configs/tasks/druggability_head.yaml head.data.path=assay.csv head.data.label_col=active
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ...errors import ConfigError, InvalidInputError
from . import Stage, StageData, register_stage


class HeadDataset(Dataset):
    """Featurised items + labels; training keys are ``epoch * n + i`` so a lazy item's random subsample is a
    pure function of (seed, epoch, item)."""

    def __init__(self, feats, featuriser, seed: int):
        self.feats, self.featuriser, self.seed = feats, featuriser, seed

    def __len__(self) -> int:
        return len(self.feats.items)

    def __getitem__(self, key: int) -> dict:
        epoch, i = divmod(int(key), len(self.feats.items))
        rng = np.random.default_rng([self.seed, epoch, i])
        return {"item": self.featuriser.load(self.feats.items[i], train=True, rng=rng), "label": self.feats.labels[i]}


class BucketBatchSampler:
    """This rank's micro-batches, endlessly, from micro-step ``start``: each epoch, random windows of 16 batches
    are sorted by input size, cut into batches and the batches shuffled (one numpy stream seeded once, so
    epoch ``e`` is the same whether reached directly or after a resume)."""

    def __init__(self, sizes: list[int], batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        self.sizes, self.bs, self.seed, self.rank, self.world, self.start = sizes, batch_size, seed, rank, world, start
        n_batches = sum(-(-min(16 * batch_size, len(sizes) - w) // batch_size)
                        for w in range(0, len(sizes), 16 * batch_size))
        self.batches_per_epoch = n_batches // world
        if self.batches_per_epoch == 0:
            raise ConfigError(f"{len(sizes)} training items make {n_batches} batches of {batch_size}: fewer than the "
                              f"{world} ranks")

    def _epochs(self):
        rng = np.random.default_rng(self.seed)
        n = len(self.sizes)
        window = 16 * self.bs
        epoch = 0
        while True:
            perm = rng.permutation(n).tolist()
            batches = []
            for w in range(0, n, window):
                chunk = sorted(perm[w: w + window], key=lambda i: self.sizes[i])
                batches += [chunk[s: s + self.bs] for s in range(0, len(chunk), self.bs)]
            batches = [batches[i] for i in rng.permutation(len(batches))]
            mine = batches[self.rank:: self.world][: self.batches_per_epoch]
            yield [[epoch * n + i for i in b] for b in mine]
            epoch += 1

    def __iter__(self):
        skip = self.start
        for batches in self._epochs():
            if skip >= len(batches):
                skip -= len(batches)
                continue
            yield from batches[skip:]
            skip = 0

    def __len__(self) -> int:
        return self.batches_per_epoch


def read_multitask_rows(d, path) -> list:
    """Rows of ``path`` whose label is the tuple of the ``head.data.label_cols`` cells (blank = missing)."""
    from ...data.featurisers import Row, read_table

    table = read_table(path, d.input_col, None, d.delimiter, d.limit)
    missing = [c for c in d.label_cols if table and c not in table[0][1]]
    if missing:
        raise InvalidInputError(path, f"no label columns {missing} (columns: {list(table[0][1])})")
    return [Row(src, row.get(d.input_col) or "", tuple(row.get(c) for c in d.label_cols)) for src, row in table]


def multitask_label_parser(columns: list[str]):
    """``label_of(raw_values, source) -> tuple of 0.0 / 1.0 / nan`` for several 0/1 columns; blank = nan (missing)."""

    def label_of(raw, source: str) -> tuple[float, ...]:
        out = []
        for col, v in zip(columns, raw):
            text = str(v if v is not None else "").strip()
            if not text:
                out.append(float("nan"))
            elif text in ("0", "1", "0.0", "1.0"):
                out.append(float(text))
            else:
                raise InvalidInputError(source, f"label '{text}' in column '{col}' is not 0/1 or blank")
        return tuple(out)

    return label_of


def multitask_metrics(labels, probs) -> dict:
    """MoleculeNet-style scores of several binary tasks with missing labels (nan in ``labels``).

    ``auroc`` is the mean ROC-AUC over the tasks whose observed labels hold both classes; a missing label
    (nan) is left out of every score. ``log_loss`` is over the observed labels.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)  # (n, T), nan = missing
    p = np.clip(np.asarray(probs, dtype=np.float64).reshape(len(y), -1), 1e-7, 1 - 1e-7)  # (n, T)
    per: list[float | None] = []
    for t in range(y.shape[1]):
        seen = ~np.isnan(y[:, t])
        yt = y[seen, t]
        per.append(float(roc_auc_score(yt, p[seen, t])) if 0 < yt.sum() < len(yt) else None)
    scored = [a for a in per if a is not None]
    obs = ~np.isnan(y)
    yo, po = y[obs], p[obs]
    return {"n": int(len(y)), "labels_observed": int(obs.sum()), "positives": int(yo.sum()),
            "auroc": float(np.mean(scored)) if scored else None, "tasks_scored": len(scored),
            "auroc_per_task": per,
            "log_loss": float(-np.mean(yo * np.log(po) + (1 - yo) * np.log(1 - po))) if len(yo) else None}


def _split(cfg, feats) -> tuple[list[int], list[int], list[int]]:
    from ...data.splits import random_split, scaffold_split, stratified_split

    d = cfg.data
    if d.split == "scaffold":
        return scaffold_split(feats.groups or [], d.fractions, d.seed)
    if d.split == "stratified":
        return stratified_split(feats.labels, d.fractions, d.seed)
    return random_split(len(feats.items), d.fractions, d.seed)


def _deterministic_parts(rows, feats, fractions) -> tuple[list[int], list[int], list[int]]:
    """The ``scaffold_deterministic`` parts as positions in ``feats``: the split is made over every row RDKit
    parses as written (scaffolds with chirality, Hu et al. 2020), so it equals the published procedure's
    whatever the featuriser later rejects; a rejected row is simply absent from its part."""
    from ...data.splits import scaffold_deterministic_rows

    rows_of = scaffold_deterministic_rows([r.value for r in rows], fractions)
    part_of = {k: p for p, name in enumerate(("train", "val", "test")) for k in rows_of[name]}
    row_of = {r.source: k for k, r in enumerate(rows)}
    out: tuple[list[int], list[int], list[int]] = ([], [], [])
    for i, src in enumerate(feats.sources):
        p = part_of.get(row_of[src])
        if p is not None:
            out[p].append(i)
    return out


@register_stage("head")
class HeadStage(Stage):
    """Labelled molecules / DNA / slides -> encoder + head, BCE or cross-entropy, calibrated and tested at the end."""

    section = "head"
    monitor = "val_score"

    # ------------------------------------------------------------------ data
    def _read(self) -> None:
        from ...data.featurisers import build_featuriser, featurise_rows, label_parser, resolve_classes

        h = self.settings
        if self.cfg.data.datasets:
            raise ConfigError("data.datasets: the head stage reads its labelled file from head.data.path")
        if not h.data.path:
            raise ConfigError("head.data.path: the labelled file is required")
        t0 = time.perf_counter()
        self.featuriser = build_featuriser(h)
        self.multitask = bool(h.data.label_cols)
        read = self._read_multitask if self.multitask else self.featuriser.read_rows
        rows = read(h.data.path)
        self.classes = resolve_classes(h.objective, h.classes, rows)
        label_of = multitask_label_parser(h.data.label_cols) if self.multitask else \
            label_parser(self.classes, h.data.label_col)
        feats = featurise_rows(self.featuriser, rows, label_of)
        self.errors = list(feats.errors)
        self.rows = rows
        row_of = {r.source: k for k, r in enumerate(rows)}
        if h.data.split == "none":
            held_rows = read(h.data.eval_path)
            held = featurise_rows(self.featuriser, held_rows, label_of)
            self.errors += held.errors
            self.train, self.val, self.test = feats, held, held
            self.parts = (list(range(len(feats))), [], [])
            held_of = {r.source: k for k, r in enumerate(held_rows)}
            used = [row_of[s] for s in feats.sources]
            held_idx = [held_of[s] for s in held.sources]
            self.split_rows = {"train": used, "val": held_idx, "test": held_idx,
                               "rejected": sorted(set(range(len(rows))) - set(used))}
        else:
            if len(feats) < 10:
                raise InvalidInputError(h.data.path, f"only {len(feats)} usable rows; need at least 10 to train")
            self.parts = _deterministic_parts(rows, feats, h.data.fractions) \
                if h.data.split == "scaffold_deterministic" else _split(h, feats)
            self.train, self.val, self.test = (feats.subset(p) for p in self.parts)
            named = {k: sorted(row_of[feats.sources[i]] for i in p) for k, p in zip(("train", "val", "test"),
                                                                                  self.parts)}
            used = {k for v in named.values() for k in v}
            self.split_rows = named | {"rejected": sorted(set(range(len(rows))) - used)}
        if not len(self.train) or not len(self.val):
            raise InvalidInputError(h.data.path, f"the split left {len(self.train)} training and {len(self.val)} "
                                                 "validation items; both parts need some")
        self.all = feats
        self.seconds_featurise = time.perf_counter() - t0

    def _read_multitask(self, path) -> list:
        return read_multitask_rows(self.settings.data, path)

    def build_model(self):
        from ...model.heads import build_head_model

        self._read()
        h = dataclasses.replace(self.settings, classes=self.classes)
        self.model = build_head_model(h)
        if self.model.feature_norm is not None:  # the descriptor columns' scaler, fitted on the training molecules
            n = self.model.feature_norm.num_features
            self.model.feature_norm.fit(torch.stack([it["features"][-n:] for it in self.train.items]))
        in_dim = getattr(self.model.encoder, "in_dim", None)
        if h.loader == "slide_features" and in_dim is not None and in_dim != h.preprocess.slide_feature_dim:
            raise ConfigError(f"head.encoder.kwargs.in_dim={in_dim} but head.preprocess.slide_feature_dim="
                              f"{h.preprocess.slide_feature_dim}: set both to the tile-feature width")
        self.class_weight = None
        if h.class_weights == "balanced" and self.multitask:
            raise ConfigError("head.class_weights=balanced is not defined for a multi-task head (data.label_cols)")
        if h.class_weights == "balanced":
            y = np.asarray(self.train.labels)
            counts = np.bincount(y, minlength=len(self.classes)).astype(np.float64)
            self.class_weight = torch.tensor(len(y) / (len(self.classes) * np.maximum(counts, 1)), dtype=torch.float32)
        self.t_start = time.perf_counter()
        return self.model

    def build_data(self) -> StageData:
        from ...model.heads import item_size

        t = self.cfg.trainer
        ds = HeadDataset(self.train, self.featuriser, t.seed)
        sizes = [item_size(it) for it in self.train.items]

        def sampler(start: int) -> BucketBatchSampler:
            return BucketBatchSampler(sizes, t.micro_batch_size, t.seed, self.ctx.rank, self.ctx.world_size, start)

        def collate(samples: list[dict]) -> dict:
            batch = self.featuriser.collate([s["item"] for s in samples])
            dtype = torch.float32 if self.model.binary else torch.long
            return {"x": batch["x"], "mask": batch.get("mask"), "features": batch.get("features"),
                    "labels": torch.tensor([s["label"] for s in samples], dtype=dtype)}

        return StageData(ds, sampler, collate, sampler(0).batches_per_epoch,
                         description=f"featuriser={self.featuriser.name} train={len(self.train)} val={len(self.val)} "
                                     f"test={len(self.test)} rejected={len(self.errors)}")

    # ------------------------------------------------------------------ loss and validation
    def loss(self, engine, batch):
        x = batch["x"]
        if x.is_floating_point():
            x = x.to(next(engine.module.parameters()).dtype)
        mask = batch["mask"] if isinstance(batch.get("mask"), torch.Tensor) else None
        feats = batch["features"] if isinstance(batch.get("features"), torch.Tensor) else None
        logits = engine(x, mask) if feats is None else engine(x, mask, feats)
        y = batch["labels"]
        if self.multitask:  # (B, T) with nan = missing: masked out of the mean
            z, y = logits.float().reshape(len(y), -1), y.float().reshape(len(y), -1)
            seen = ~torch.isnan(y)
            per = F.binary_cross_entropy_with_logits(z, torch.nan_to_num(y), reduction="none")
            return (per * seen).sum() / seen.sum().clamp(min=1), {}
        w = None if self.class_weight is None else self.class_weight.to(logits.device)
        if self.model.binary:
            pos = None if w is None else (w[1] / w[0]).reshape(1)
            return F.binary_cross_entropy_with_logits(logits.float(), y.float(), pos_weight=pos), {}
        return F.cross_entropy(logits.float(), y, weight=w), {}

    def _logits(self, model, feats) -> np.ndarray:
        from ...model.heads import predict_logits

        return predict_logits(model, self.featuriser, feats.items)  # every rank runs the forwards (ZeRO-3 gathers)

    def _probs(self, z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        from ...scoring import sigmoid

        if z.ndim == 1 or self.multitask:  # one probability per logit (binary, multi-task)
            return sigmoid(z / temperature)
        z = z / temperature
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def _metrics(self, labels, probs: np.ndarray, bootstrap: int = 0) -> dict:
        from ...scoring import binary_metrics, classification_metrics

        if self.multitask:
            return multitask_metrics(labels, probs)
        if probs.ndim == 1:
            return binary_metrics(labels, probs)
        return classification_metrics(labels, probs, self.classes, bootstrap=bootstrap, seed=self.cfg.trainer.seed)

    def evaluate(self, model) -> dict:
        m = self._metrics(self.val.labels, self._probs(self._logits(model, self.val)))
        if model.binary:
            score = m["auroc"] if m.get("auroc") is not None else -m.get("log_loss", 0.0)
            return {"val_auroc": m.get("auroc"), "val_log_loss": m.get("log_loss"), "val_score": score}
        score = m["auroc"] if m.get("auroc") is not None else m.get("accuracy")
        return {"val_accuracy": m.get("accuracy"), "val_balanced_accuracy": m.get("balanced_accuracy"),
                "val_auroc": m.get("auroc"), "val_score": score}

    # ------------------------------------------------------------------ the end: calibrate, test, save
    def finish(self, model, summary: dict) -> dict:
        from ...scoring import T_MAX, T_MIN, fit_temperature

        h = self.settings
        t_train = time.perf_counter() - self.t_start
        z_val, z_test = self._logits(model, self.val), self._logits(model, self.test)
        temperature = 1.0
        if model.binary and h.calibration == "temperature" and self.multitask:  # one T over the observed labels
            yv = np.asarray(self.val.labels, dtype=np.float64).reshape(len(z_val), -1)
            seen = ~np.isnan(yv)
            temperature = fit_temperature(z_val.reshape(len(yv), -1)[seen], yv[seen].astype(int)) if seen.any() else 1.0
        elif model.binary and h.calibration == "temperature":
            temperature = fit_temperature(z_val, self.val.labels)
        model.temperature = temperature
        self.test_probs_raw, self.test_probs = self._probs(z_test), self._probs(z_test, temperature)
        metric = {}
        for name, feats, z, boot in (("val", self.val, z_val, 0), ("test", self.test, z_test, h.bootstrap)):
            raw = self._metrics(feats.labels, self._probs(z), boot)
            metric[name] = {"raw": raw, "calibrated": raw if temperature == 1.0 else
                            self._metrics(feats.labels, self._probs(z, temperature), boot)}
        metrics = {
            "featuriser": h.featuriser, "objective": h.objective, "classes": self.classes, "data": h.data.path,
            "split": h.data.split,
            "rows": {"usable": len(self.all), "rejected": len(self.errors), "train": len(self.train),
                     "val": len(self.val), "test": len(self.test)},
            "temperature": round(temperature, 4), "temperature_at_bound": temperature in (T_MIN, T_MAX),
            "val": metric["val"], "test": metric["test"],
            "steps": summary["step"], "best_step": summary.get("best_step"),
            "seconds": {"featurise": round(self.seconds_featurise, 2), "train": round(t_train, 2)},
        }
        if self.all.groups is not None and h.data.split != "none":
            metrics["scaffolds"] = {k: len({self.all.groups[i] for i in idx}) for k, idx in
                                    zip(("train", "val", "test"), self.parts)}
        self.metrics = metrics
        return {"metrics": metrics}

    def save(self, engine, model, out_dir: Path, zero_stage: int, summary: dict) -> Path | None:
        from ...data.featurisers import with_reports, write_predictions
        from ...utils import atomic_write_text
        from ..checkpoint import save_final_model

        training = {"stage": self.name, "steps": summary["step"], "final_loss": summary["loss"],
                    "world_size": summary["world_size"], "zero_stage": zero_stage, "data": self.settings.data.path}
        path = save_final_model(engine, model, out_dir, zero_stage, extra={"training": training})
        if path is None:  # not rank 0
            return None
        if self.multitask:
            _write_multitask_predictions(path / "predictions_test.csv", self.test, self.test_probs,
                                         self.settings.data.label_cols)
        else:
            write_predictions(path / "predictions_test.csv", with_reports(self.featuriser, self.test),
                              self.test_probs, self.classes, self.test_probs_raw if model.binary else None)
        atomic_write_text(path / "metrics.json", json.dumps(self.metrics, indent=2))
        atomic_write_text(Path(self.cfg.trainer.output_dir) / "split.json", json.dumps(self.split_rows))
        return path

    def load_errors(self) -> list[dict]:
        return list(getattr(self, "errors", []))

    def describe(self, model) -> str:
        return f"{super().describe(model)} encoder={self.settings.encoder.name} head={self.settings.type} " \
               f"classes={self.classes}"


def _write_multitask_predictions(path: Path, feats, probs: np.ndarray, tasks: list[str]) -> None:
    """One CSV row per item: source, input, canonical, then ``label_<task>`` (blank = missing), ``prob_<task>``."""
    import csv

    probs = np.asarray(probs).reshape(len(feats.items), -1)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["source", "input", "canonical", *[f"label_{t}" for t in tasks], *[f"prob_{t}" for t in tasks]])
        for i in range(len(feats.items)):
            labs = ["" if np.isnan(v) else int(v) for v in feats.labels[i]]
            w.writerow([feats.sources[i], feats.inputs[i], feats.canonical[i], *labs,
                        *[round(float(p), 5) for p in probs[i]]])
