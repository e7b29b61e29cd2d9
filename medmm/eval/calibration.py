"""Binary probability metrics (AUROC, AUPRC, Brier, ECE, log loss) and temperature scaling.

Temperature scaling (Guo et al. 2017) divides the logits by one scalar T > 0 fitted to minimise the
negative log-likelihood on held-out data: it changes calibration (Brier, ECE, log loss) and never the
ranking (AUROC, AUPRC).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


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
