"""Pure scoring functions shared by training (validation, early stopping, calibration, rewards) and evaluation.

They sit beside ``errors``, ``utils`` and ``config`` at the bottom of the layer order, so the training
loop can pick a model by validation AUROC and fit its temperature without importing ``medmm.eval``,
and ``medmm.eval`` reports the same numbers. Everything here is a function of arrays and strings:

* answer text: :func:`normalize` (SQuAD/VQA convention), :func:`exact_match`, :func:`token_f1`, :func:`recall`;
* binary probabilities: :func:`binary_metrics` (AUROC, AUPRC, Brier, ECE, log loss, accuracy);
* class probabilities: :func:`classification_metrics` (accuracy, balanced accuracy, AUROC, bootstrap CIs);
* temperature scaling (Guo et al. 2017): :func:`fit_temperature`, :func:`sigmoid`, :func:`logit`.

Temperature scaling divides the logits by one scalar T > 0 fitted to minimise the negative
log-likelihood on held-out data: it changes calibration (Brier, ECE, log loss) and never the ranking
(AUROC, AUPRC).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

# ----------------------------------------------------------------------------- answer text
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize(text: str) -> str:
    """Lower-case, drop punctuation and English articles, collapse white space."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(pred: str, ref: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize(pred) == normalize(ref))


def token_f1(pred: str, ref: str) -> float:
    """F1 of the normalised token bags (SQuAD)."""
    p, r = normalize(pred).split(), normalize(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def recall(pred: str, ref: str) -> float:
    """Share of reference tokens present in the prediction (VQA open-question recall)."""
    p, r = set(normalize(pred).split()), normalize(ref).split()
    return sum(t in p for t in r) / len(r) if r else float(not p)


# ----------------------------------------------------------------------------- temperature scaling
def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def logit(p: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


T_MIN, T_MAX = 0.01, 100.0
"""Bounds of the fitted temperature. T runs to the upper bound when the logits carry no ranking
information (or the wrong one): the calibrated scores are then ~0.5 for every input."""


def fit_temperature(logits: Sequence[float], labels: Sequence[int], max_iter: int = 200) -> float:
    """The T in [T_MIN, T_MAX] minimising the NLL of ``sigmoid(logits / T)``; 1.0 when the labels are all
    one class. (Temperature has no bias term: it cannot move a constant offset, only sharpen or soften.)"""
    import torch

    y = torch.tensor(np.asarray(labels, dtype=np.float64))
    z = torch.tensor(np.asarray(logits, dtype=np.float64))
    if len(y) == 0 or y.min() == y.max():
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return min(max(t, T_MIN), T_MAX) if math.isfinite(t) else T_MAX


# ----------------------------------------------------------------------------- binary probabilities
def expected_calibration_error(labels: Sequence[int], probs: Sequence[float], bins: int = 10) -> float:
    """ECE with ``bins`` equal-width probability bins (|mean prob - positive rate|, weighted by bin size)."""
    y, p = np.asarray(labels, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(p[sel].mean() - y[sel].mean())
    return float(ece)


def binary_metrics(labels: Sequence[int], probs: Sequence[float]) -> dict:
    """AUROC, AUPRC (average precision), Brier score, ECE, log loss and accuracy at 0.5 (sklearn.metrics).

    AUROC and AUPRC are None when only one class is present.
    """
    from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score

    y, p = np.asarray(labels, dtype=int), np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    out: dict = {"n": int(len(y)), "positives": int(y.sum())}
    if len(y) == 0:
        return out
    both = 0 < y.sum() < len(y)
    out["auroc"] = round(float(roc_auc_score(y, p)), 4) if both else None
    out["auprc"] = round(float(average_precision_score(y, p)), 4) if both else None
    out["brier"] = round(float(brier_score_loss(y, p)), 4)
    out["ece"] = round(expected_calibration_error(y, p), 4)
    out["log_loss"] = round(float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1])), 4)
    out["accuracy"] = round(float(((p >= 0.5).astype(int) == y).mean()), 4)
    return out


# ----------------------------------------------------------------------------- class probabilities
def _auroc(y: np.ndarray, probs: np.ndarray, n_classes: int) -> float | None:
    from sklearn.metrics import roc_auc_score

    present = np.unique(y)
    if len(present) < 2:
        return None
    if n_classes == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    if len(present) < n_classes:
        # OvR over the classes that occur; renormalise their probabilities as sklearn requires.
        p = probs[:, present]
        p = p / np.clip(p.sum(1, keepdims=True), 1e-12, None)
        yy = np.searchsorted(present, y)
        if len(present) == 2:
            return float(roc_auc_score(yy, p[:, 1]))
        return float(roc_auc_score(yy, p, multi_class="ovr", average="macro"))
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def _point(y: np.ndarray, probs: np.ndarray, n_classes: int) -> dict:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    pred = probs.argmax(1)
    return {"accuracy": float(accuracy_score(y, pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if len(np.unique(y)) > 1 else None,
            "auroc": _auroc(y, probs, n_classes)}


def classification_metrics(labels: list[int] | np.ndarray, probs: np.ndarray, classes: list[str] | None = None,
                           bootstrap: int = 0, seed: int = 0, ci: float = 0.95) -> dict:
    """Metrics of predicted class probabilities against integer labels.

    AUROC is scikit-learn's ``roc_auc_score``: the positive class's probability for two classes, macro
    one-vs-rest over classes for more. When a metric is undefined (one class present) it is ``None``
    and ``notes`` says why. Bootstrap intervals resample cases with replacement (percentile method,
    ``seed`` fixed) and skip resamples where a metric is undefined.

    Args:
        labels: (n,) true class indices.
        probs: (n, C) predicted probabilities (rows need not sum exactly to 1).
        classes: class names (for the per-class table); defaults to indices.
        bootstrap: resamples for confidence intervals (0 = none).

    Returns:
        count, accuracy, balanced_accuracy, auroc, per_class (support, recall, auroc one-vs-rest),
        confusion_matrix (rows = truth), ``*_ci`` when bootstrapping, and notes.
    """
    from sklearn.metrics import confusion_matrix, roc_auc_score

    y = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be (n, classes) with n = {y.shape[0]}, got {probs.shape}")
    C = probs.shape[1]
    classes = list(classes) if classes is not None else [str(i) for i in range(C)]
    if len(classes) != C:
        raise ValueError(f"{len(classes)} class names for {C} probability columns")
    if y.size and (y.min() < 0 or y.max() >= C):
        raise ValueError(f"labels must be in [0, {C - 1}]")
    out: dict = {"count": int(y.size), "classes": classes, "notes": []}
    if y.size == 0:
        out.update(accuracy=None, balanced_accuracy=None, auroc=None)
        out["notes"].append("no cases")
        return out
    out.update(_point(y, probs, C))
    if out["auroc"] is None:
        out["notes"].append("AUROC undefined: only one class among the cases")
    if out["balanced_accuracy"] is None:
        out["notes"].append("balanced accuracy undefined: only one class among the cases")
    pred = probs.argmax(1)
    per = {}
    for c, name in enumerate(classes):
        sup = int((y == c).sum())
        auc = None
        if 0 < sup < y.size:
            auc = float(roc_auc_score((y == c).astype(int), probs[:, c]))
        per[name] = {"support": sup, "recall": float((pred[y == c] == c).mean()) if sup else None,
                     "predicted": int((pred == c).sum()), "auroc_ovr": auc}
    out["per_class"] = per
    out["confusion_matrix"] = confusion_matrix(y, pred, labels=list(range(C))).tolist()
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        draws: dict[str, list[float]] = {"accuracy": [], "balanced_accuracy": [], "auroc": []}
        for _ in range(bootstrap):
            idx = rng.integers(0, y.size, y.size)
            m = _point(y[idx], probs[idx], C)
            for k, v in m.items():
                if v is not None:
                    draws[k].append(v)
        lo, hi = (1 - ci) / 2 * 100, (1 + ci) / 2 * 100
        for k, vals in draws.items():
            out[f"{k}_ci"] = [float(np.percentile(vals, lo)), float(np.percentile(vals, hi))] if vals else None
        out["bootstrap"] = {"resamples": bootstrap, "ci": ci, "seed": seed}
    return out
