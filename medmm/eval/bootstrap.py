"""Bootstrap confidence intervals and paired bootstrap tests over evaluation items.

Every headline metric of a benchmark is a function of the items it scored. A *statistic* here is a callable
``stat(idx) -> {metric: value}`` that recomputes all metrics on the items ``idx`` (an integer array that may
repeat items): per-item means average ``values[idx]``; corpus metrics (BLEU, CIDEr-D, METEOR, micro F1)
re-aggregate the resampled documents' statistics and recompute, so a resample is scored exactly as a
corpus of those documents would be.

* :func:`bootstrap` - percentile intervals (Efron & Tibshirani 1993, ch. 13): resample items with
  replacement ``resamples`` times, recompute, take the 2.5th and 97.5th percentiles.
* :func:`paired_bootstrap` - two systems scored on the same items: the same resampled items for both,
  the difference per metric, its percentile interval and a two-sided p-value for "no difference"
  (the shifted-null test of Berg-Kirkpatrick et al. 2012: how often a resampled difference lies farther
  from the observed one than the observed one lies from zero; add-one smoothed).

``strata`` (one label per item) resamples within each stratum, keeping every stratum's size (PromptCBLUE:
each task keeps its item count). Resamples are drawn from ``numpy.random.default_rng(seed)``: same seed,
same intervals. Metrics undefined on a resample (``None`` or NaN, e.g. AUROC of a one-class resample) are
skipped for that metric and the number of resamples used is reported.

Run ``python -m pytest tests/test_bootstrap.py`` for the checks against closed-form intervals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

Statistic = Callable[[np.ndarray], dict[str, float | None]]

__all__ = ["BootstrapResult", "PairedResult", "Statistic", "bootstrap", "mean_statistic", "paired_bootstrap",
           "resample_indices"]


@dataclass
class BootstrapResult:
    """Point values (all items), percentile intervals and the settings that produced them."""

    values: dict[str, float | None]
    ci95: dict[str, tuple[float, float] | None]
    resamples: int
    seed: int
    level: float = 0.95
    used: dict[str, int] = field(default_factory=dict)
    """Resamples on which each metric was defined (fewer than ``resamples`` when some were undefined)."""


@dataclass
class PairedResult:
    """Per metric: A's value, B's value, A - B, the interval of the difference and the p-value."""

    metrics: dict[str, dict]
    resamples: int
    seed: int
    level: float = 0.95


def resample_indices(n: int, rng: np.random.Generator, strata: Sequence | np.ndarray | None = None,
                     groups: list[np.ndarray] | None = None) -> np.ndarray:
    """One bootstrap resample of ``range(n)``: ``n`` draws with replacement, within strata when given."""
    if strata is None:
        return rng.integers(0, n, n)
    groups = groups if groups is not None else _groups(strata)
    return np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups]) if groups else np.zeros(0, int)


def _groups(strata) -> list[np.ndarray]:
    labels = np.asarray(list(strata), dtype=object)
    order: dict = {}
    for i, s in enumerate(labels):
        order.setdefault(s, []).append(i)
    return [np.asarray(v, dtype=np.int64) for v in order.values()]


def _defined(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _percentiles(draws: list[float], level: float) -> tuple[float, float] | None:
    if not draws:
        return None
    lo, hi = np.percentile(np.asarray(draws, dtype=np.float64), [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="resample", disable=not enabled, leave=False, mininterval=0.5)


def bootstrap(stat: Statistic, n: int, resamples: int = 1000, seed: int = 0, level: float = 0.95,
              strata: Sequence | None = None, progress: bool = False, desc: str = "bootstrap") -> BootstrapResult:
    """Percentile bootstrap intervals of every metric ``stat`` returns.

    Args:
        stat: recomputes all metrics on the items ``idx`` (an int array, repeats allowed).
        n: number of items.
        resamples: bootstrap resamples (0 gives point values and no intervals).
        seed: seeds ``numpy.random.default_rng``.
        level: coverage of the intervals (0.95 -> 2.5th and 97.5th percentiles).
        strata: a label per item; resampling happens within each label's items.
        progress: show a progress bar (tqdm) over the resamples.

    Returns:
        :class:`BootstrapResult` with the point values on all items and an interval per metric (``None`` when
        the metric was undefined on every resample or ``resamples`` is 0).
    """
    values = stat(np.arange(n))
    if n == 0:  # nothing to resample
        resamples = 0
    draws: dict[str, list[float]] = {k: [] for k in values}
    rng = np.random.default_rng(seed)
    groups = _groups(strata) if strata is not None else None
    with _progress(resamples, desc, progress and resamples > 0) as bar:
        for _ in range(resamples):
            m = stat(resample_indices(n, rng, strata, groups))
            for k, v in m.items():
                if _defined(v):
                    draws.setdefault(k, []).append(float(v))
            bar.update(1)
    ci = {k: (_percentiles(d, level) if resamples else None) for k, d in draws.items()}
    return BootstrapResult(values=values, ci95=ci, resamples=resamples, seed=seed, level=level,
                           used={k: len(d) for k, d in draws.items()})


def paired_bootstrap(stat_a: Statistic, stat_b: Statistic, n: int, resamples: int = 1000, seed: int = 0,
                     level: float = 0.95, strata: Sequence | None = None, progress: bool = False,
                     desc: str = "paired bootstrap") -> PairedResult:
    """Paired bootstrap of A - B per metric over the same ``n`` items (row ``i`` of A and of B is one item).

    The p-value is two-sided for H0: no difference, by the shifted-null rule
    ``p = (1 + #{|d* - d| >= |d|}) / (1 + B)`` over the ``B`` resamples where both metrics are defined.
    """
    a0, b0 = stat_a(np.arange(n)), stat_b(np.arange(n))
    if n == 0:
        resamples = 0
    names = [k for k in a0 if k in b0]
    diffs: dict[str, list[float]] = {k: [] for k in names}
    rng = np.random.default_rng(seed)
    groups = _groups(strata) if strata is not None else None
    with _progress(resamples, desc, progress and resamples > 0) as bar:
        for _ in range(resamples):
            idx = resample_indices(n, rng, strata, groups)
            a, b = stat_a(idx), stat_b(idx)
            for k in names:
                if _defined(a.get(k)) and _defined(b.get(k)):
                    diffs[k].append(float(a[k]) - float(b[k]))
            bar.update(1)
    out: dict[str, dict] = {}
    for k in names:
        if not (_defined(a0[k]) and _defined(b0[k])):
            out[k] = {"a": a0[k], "b": b0[k], "diff": None, "ci95": None, "p_value": None, "resamples_used": 0}
            continue
        d = float(a0[k]) - float(b0[k])
        ds = np.asarray(diffs[k], dtype=np.float64)
        p = float((1 + np.sum(np.abs(ds - d) >= abs(d) - 1e-12)) / (1 + len(ds))) if len(ds) else None
        out[k] = {"a": float(a0[k]), "b": float(b0[k]), "diff": d, "ci95": _percentiles(diffs[k], level),
                  "p_value": p, "resamples_used": int(len(ds))}
    return PairedResult(metrics=out, resamples=resamples, seed=seed, level=level)


def mean_statistic(columns: dict[str, Sequence[float | None]]) -> Statistic:
    """A statistic averaging per-item columns; ``None`` entries are left out of that column's mean.

    ``{"exact_match": [1, 0, 1], "open_recall": [None, 0.5, None]}`` -> means over the resampled items (the
    second over the items where it is defined; ``None`` when none is).
    """
    arrays = {}
    for k, vals in columns.items():
        v = np.asarray([np.nan if x is None else float(x) for x in vals], dtype=np.float64)
        arrays[k] = v

    def stat(idx: np.ndarray) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for k, v in arrays.items():
            sel = v[idx]
            sel = sel[~np.isnan(sel)]
            out[k] = float(sel.mean()) if sel.size else None
        return out

    return stat
