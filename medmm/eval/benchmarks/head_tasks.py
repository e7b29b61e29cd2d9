"""Shared base of the probability benchmarks (``druggability``, ``dna``, ``slide``): labels + predicted probabilities.

Rows: ``{"id", "label", "prob"}`` for a binary task (``prob`` = calibrated probability of class 1, labels
0/1) or ``{"id", "label", "probs": {class: p}}`` for a multiclass one (``label`` a class name). With
``--checkpoint``, a head model (``trainer.stage: head``) is read through its own featuriser
(:class:`medmm.inference.head.HeadPredictor`), exactly as ``medmm eval head`` does; with ``--predictions``, any
model's rows in that shape are scored (``--data`` is not needed: the labels are in the rows).

Metrics with intervals (items resampled; a resample holding one class leaves AUROC/AUPRC undefined and is
skipped for them):

* binary: ``auroc``, ``auprc``, ``brier``, ``ece`` (10 bins), ``log_loss``, ``accuracy`` (at 0.5) -
  :func:`medmm.scoring.binary_metrics`, i.e. scikit-learn, rounded to 4 decimals;
* multiclass: ``accuracy``, ``balanced_accuracy``, ``auroc`` (macro one-vs-rest) -
  :func:`medmm.scoring.classification_metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from ...errors import InvalidInputError
from .registry import Benchmark, RunContext, Scored

__all__ = ["HeadBenchmark", "binary_rows", "multiclass_rows"]

BINARY_KEYS = ("auroc", "auprc", "brier", "ece", "log_loss", "accuracy")
MULTICLASS_KEYS = ("accuracy", "balanced_accuracy", "auroc")


def _label01(v, source: str) -> int:
    if isinstance(v, bool):
        return int(v)
    s = str(v).strip().lower()
    if s in ("1", "1.0", "yes", "true"):
        return 1
    if s in ("0", "0.0", "no", "false"):
        return 0
    raise InvalidInputError(source, f"a binary label must be 0 or 1, got {v!r}")


def binary_rows(sources, inputs, labels, probs, probs_raw=None, extra=None) -> list[dict]:
    """Rows of a binary task (``probs`` = calibrated P(class 1)), at full precision: rounding would create
    ties and move the AUROC of a model whose scores are close together."""
    rows = []
    for i, (s, x, y, p) in enumerate(zip(sources, inputs, labels, probs)):
        r = {"id": s, "input": x, "label": int(y), "reference": str(int(y)), "prob": float(p),
             "prediction": "1" if p >= 0.5 else "0"}
        if probs_raw is not None:
            r["prob_raw"] = float(probs_raw[i])
        if extra is not None:
            r.update(extra[i])
        rows.append(r)
    return rows


def multiclass_rows(sources, inputs, labels, probs, classes, extra=None) -> list[dict]:
    """Rows of a multiclass task (``labels`` class indices, ``probs`` (n, C))."""
    rows = []
    for i, (s, x, y, p) in enumerate(zip(sources, inputs, labels, probs)):
        r = {"id": s, "input": x, "label": classes[int(y)], "reference": classes[int(y)],
             "probs": {c: float(q) for c, q in zip(classes, p)}, "prediction": classes[int(np.argmax(p))]}
        if extra is not None:
            r.update(extra[i])
        rows.append(r)
    return rows


def error_rows(errors: list[dict]) -> list[dict]:
    """Rows for inputs the featuriser rejected (their typed error kept, never dropped)."""
    return [{"id": e.get("path", f"error-{i}"), "error": e.get("error", "InvalidInputError"),
             "message": e.get("message", "")} for i, e in enumerate(errors)]


class HeadBenchmark(Benchmark):
    """A classification benchmark scored from probabilities; subclasses name the featuriser they expect."""

    featuriser: ClassVar[str] = ""
    headline = "auroc"

    @dataclass
    class Options:
        input_col: str | None = None
        """Column of the inputs (default: the head recipe's)."""
        label_col: str | None = None
        """Column / JSONL field of the labels (default: the head recipe's)."""

    def protocol(self, opts) -> str:
        return (f"{self.name}: binary - sklearn AUROC, AUPRC (average precision), Brier, ECE (10 bins), log loss, "
                f"accuracy at 0.5 on calibrated probabilities; multiclass - accuracy, balanced accuracy, macro "
                f"one-vs-rest AUROC")

    def load(self, paths: list[Path], opts) -> list[dict]:
        # the files are read by the checkpoint's featuriser (its columns and parsing), in generate()
        return [{"id": str(p), "path": str(p)} for p in paths]

    def generate(self, records: list[dict], opts, ctx: RunContext) -> list[dict]:
        from ...data.featurisers import featurise_rows, label_parser
        from ...inference.head import HeadPredictor
        from ...model.heads import predict_logits

        hp = HeadPredictor(ctx.checkpoint, ctx.device)
        if hp.cfg.featuriser != self.featuriser:
            raise InvalidInputError(ctx.checkpoint, f"a '{hp.cfg.featuriser}' head model; benchmark '{self.name}' "
                                                    f"scores '{self.featuriser}' heads")
        col = opts.label_col or hp.cfg.data.label_col
        rows: list[dict] = []
        for rec in records:
            data = hp.featuriser.read_rows(rec["path"], opts.input_col, col)
            feats = featurise_rows(hp.featuriser, data, label_parser(hp.classes, col))
            logits = predict_logits(hp.model, hp.featuriser, feats.items)
            probs = hp.probabilities(logits)
            if hp.model.binary:
                rows += binary_rows(feats.sources, feats.inputs, feats.labels, probs,
                                    hp.probabilities(logits, calibrated=False))
            else:
                rows += multiclass_rows(feats.sources, feats.inputs, feats.labels, probs, hp.classes)
            rows += error_rows(feats.errors)
        return rows

    def from_predictions(self, predictions, records, opts, source):
        rows = []
        for p in predictions:
            if "error" in p:
                rows.append({"id": p["id"], "error": p["error"], "message": p.get("message", "")})
                continue
            if "label" not in p or ("prob" not in p and "probs" not in p):
                raise InvalidInputError(f"{source} (id={p.get('id')})", "a row needs 'label' and 'prob' (binary) or "
                                                                        "'probs' ({class: p})")
            rows.append(dict(p))
        return rows

    def score(self, rows: list[dict], opts) -> Scored:
        from ...scoring import binary_metrics, classification_metrics

        if not rows:
            return Scored(stat=lambda idx: {}, rows=[], notes=["no scored items"])
        binary = "prob" in rows[0]
        out = []
        if binary:
            y = np.asarray([_label01(r["label"], f"id={r['id']}") for r in rows])
            p = np.asarray([float(r["prob"]) for r in rows], dtype=np.float64)
            for r, yy, pp in zip(rows, y, p):
                out.append({**r, "label": int(yy), "correct": bool((pp >= 0.5) == yy), "group": f"label {yy}"})

            def stat(idx):
                m = binary_metrics(y[idx], p[idx])
                return {k: m.get(k) for k in BINARY_KEYS}

            return Scored(stat=stat, rows=out, notes=[f"{int(y.sum())} positives of {len(y)}"])
        classes = list(rows[0]["probs"])
        index = {c: i for i, c in enumerate(classes)}
        try:
            y = np.asarray([index[str(r["label"])] for r in rows])
            probs = np.asarray([[float(r["probs"][c]) for c in classes] for r in rows], dtype=np.float64)
        except KeyError as e:
            raise InvalidInputError("predictions", f"a label or class missing from 'probs': {e}") from e
        for r, yy, pr in zip(rows, y, probs):
            out.append({**r, "correct": bool(int(np.argmax(pr)) == yy), "group": classes[yy]})

        def stat(idx):
            m = classification_metrics(y[idx], probs[idx], classes)
            return {k: m.get(k) for k in MULTICLASS_KEYS}

        return Scored(stat=stat, rows=out, notes=[f"{len(classes)} classes: {', '.join(classes)}"])
