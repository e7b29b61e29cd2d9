"""Classification metrics for slide (or any) labels: accuracy, balanced accuracy, AUROC, with bootstrap intervals.

AUROC is scikit-learn's ``roc_auc_score``: the positive class's probability for two classes, macro
one-vs-rest over classes for more. When a metric is undefined (one class present) it is ``None`` and
``notes`` says why; nothing is silently dropped. Bootstrap intervals resample cases with replacement
(percentile method, ``seed`` fixed) and skip resamples where a metric is undefined.
"""

from __future__ import annotations

import numpy as np


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
