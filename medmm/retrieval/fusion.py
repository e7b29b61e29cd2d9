"""Reciprocal-rank fusion (Cormack et al. 2009): ``score(d) = sum_r w_r / (k + rank_r(d))`` over ranked lists."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["reciprocal_rank_fusion", "tune_rrf"]


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = 60, weights: Sequence[float] | None = None,
                           top_k: int | None = None) -> list[tuple[int, float]]:
    """Fuse ranked lists of document indices (best first) into one ``[(index, score)]``, best first.

    Args:
        rankings: one list per retriever; a document missing from a list adds nothing for it.
        k: the RRF constant (60 in the paper); larger flattens the rank discount.
        weights: one weight per retriever (default 1 each).
        top_k: keep this many (default all).

    Ties are broken by the best single rank, then by index, so the result is deterministic.
    """
    weights = list(weights) if weights is not None else [1.0] * len(rankings)
    if len(weights) != len(rankings):
        raise ValueError(f"{len(rankings)} rankings but {len(weights)} weights")
    score: dict[int, float] = {}
    best: dict[int, int] = {}
    for w, ranking in zip(weights, rankings):
        for r, d in enumerate(ranking):
            d = int(d)
            if d < 0:  # faiss pads short results with -1
                continue
            score[d] = score.get(d, 0.0) + w / (k + r + 1)
            best[d] = min(best.get(d, r), r)
    fused = sorted(score.items(), key=lambda kv: (-kv[1], best[kv[0]], kv[0]))
    return fused[:top_k] if top_k is not None else fused


def _candidates(bm: Sequence[Sequence[int]], de: Sequence[Sequence[int]], gold: Sequence[int]) -> dict:
    """Flatten each query's candidates (the union of both lists) into arrays: query, document, 0-based rank in each
    list (-1 = absent) and whether it is the gold document."""
    q, doc, rb, rd = [], [], [], []
    for qi, (b, d) in enumerate(zip(bm, de)):
        ranks: dict[int, list[int]] = {}
        for r, x in enumerate(b):
            if int(x) >= 0:
                ranks.setdefault(int(x), [-1, -1])[0] = r
        for r, x in enumerate(d):
            if int(x) >= 0:
                ranks.setdefault(int(x), [-1, -1])[1] = r
        for x, (i, j) in ranks.items():
            q.append(qi), doc.append(x), rb.append(i), rd.append(j)
    q, doc, rb, rd = (np.asarray(v, dtype=np.int64) for v in (q, doc, rb, rd))
    return {"q": q, "doc": doc, "rb": rb, "rd": rd, "gold": doc == np.asarray(gold, dtype=np.int64)[q],
            "n": len(gold)}


def _gold_ranks(c: dict, k: int, w: Sequence[float]) -> np.ndarray:
    """Per query, the 0-based position of the gold document in :func:`reciprocal_rank_fusion`'s order (same scores
    and tie-breaks, computed for every query at once); ``n_candidates`` when the gold is in neither list."""
    sb = np.where(c["rb"] >= 0, w[0] / (k + c["rb"] + 1), 0.0)
    sd = np.where(c["rd"] >= 0, w[1] / (k + c["rd"] + 1), 0.0)
    score = sb + sd  # the same float sums as reciprocal_rank_fusion (BM25 first, then dense)
    big = np.iinfo(np.int64).max
    best = np.minimum(np.where(c["rb"] >= 0, c["rb"], big), np.where(c["rd"] >= 0, c["rd"], big))
    n = c["n"]
    g_score = np.full(n, -np.inf)
    g_best = np.full(n, big)
    g_doc = np.full(n, big)
    gi = np.flatnonzero(c["gold"])
    g_score[c["q"][gi]], g_best[c["q"][gi]], g_doc[c["q"][gi]] = score[gi], best[gi], c["doc"][gi]
    qs = c["q"]
    before = (score > g_score[qs]) | ((score == g_score[qs]) & ((best < g_best[qs]) | ((best == g_best[qs])
                                                                                       & (c["doc"] < g_doc[qs]))))
    pos = np.bincount(qs[before], minlength=n)
    pos[np.isneginf(g_score)] = len(c["q"])  # gold retrieved by neither
    return pos


def tune_rrf(rankings: Sequence[Sequence[Sequence[int]]], gold: Sequence[int], at: int = 5,
             ks: Sequence[int] = (1, 2, 5, 10, 20, 30, 60, 100),
             bm25_weights: Sequence[float] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0),
             confirm_fraction: float = 0.5, resamples: int = 2000, seed: int = 0) -> dict:
    """Choose the RRF constant and (BM25, dense) weights on queries, falling back to one retriever unless fusing
    is shown to help.

    ``rankings`` is ``[bm25_rankings, dense_rankings]`` (per query, document indices best first, -1 padding);
    ``gold`` the right document per query. The queries are split (seeded) into a *tuning* part and a
    *confirmation* part. On the tuning part the fusion grid (``ks`` x BM25 weights against dense weight 1) is
    scored by recall@``at`` (ties: recall@1, then recall@20), and so is each retriever alone. The best fusion is
    kept only if, on the confirmation part it was not chosen on, it beats the better single retriever at
    recall@``at`` with a paired-bootstrap 95% interval of the difference above zero. Otherwise the fusion falls
    back to that retriever alone (weights ``(0, 1)`` or ``(1, 0)``): picking the best of ~100 grid points
    inflates a small gain, and a fusion that only matches the stronger retriever on tuning queries can lose to it
    on others. Use queries disjoint from any benchmark.

    Returns:
        ``rrf_k``, ``rrf_weights`` (the choice), ``choice`` (``fusion``, ``bm25`` or ``dense``), recall@1/@at/@20 of
        the best fusion and of each retriever on both parts, the confirmation difference and its interval, and the
        query counts.
    """
    if not 0 < confirm_fraction < 1:
        raise ValueError(f"confirm_fraction must be in (0, 1), got {confirm_fraction}")
    bm, de = rankings
    n = len(gold)
    if n < 2:
        raise ValueError(f"tuning the fusion needs at least 2 queries, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_confirm = min(max(1, round(n * confirm_fraction)), n - 1)
    parts = {"confirm": np.sort(order[:n_confirm]), "tune": np.sort(order[n_confirm:])}
    c = _candidates(bm, de, gold)

    def hits(k: int, w: Sequence[float]) -> dict[int, np.ndarray]:
        pos = _gold_ranks(c, k, w)
        return {a: pos < a for a in sorted({1, at, 20})}

    def recalls(h: dict[int, np.ndarray], part: str) -> dict:
        return {f"recall@{a}": round(float(v[parts[part]].mean()), 4) for a, v in h.items()}

    def key(h: dict[int, np.ndarray]) -> tuple:
        t = parts["tune"]
        return (int(h[at][t].sum()), int(h[1][t].sum()), int(h[20][t].sum()))

    singles = {"bm25": hits(60, (1.0, 0.0)), "dense": hits(60, (0.0, 1.0))}
    best_single = max(singles, key=lambda m: key(singles[m]))
    best = None
    for k in ks:
        for wb in bm25_weights:
            h = hits(k, (float(wb), 1.0))
            if best is None or key(h) > best[0]:
                best = (key(h), k, [float(wb), 1.0], h)
    _, k, w, h = best
    cf = parts["confirm"]
    diff = h[at][cf].astype(np.float64) - singles[best_single][at][cf]
    rng = np.random.default_rng(seed + 1)
    draws = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(resamples)])
    lo, hi = (float(x) for x in np.percentile(draws, [2.5, 97.5]))
    fuse = lo > 0
    weights = w if fuse else ([0.0, 1.0] if best_single == "dense" else [1.0, 0.0])
    return {"rrf_k": int(k) if fuse else 60, "rrf_weights": weights, "choice": "fusion" if fuse else best_single,
            "best_fusion": {"rrf_k": int(k), "rrf_weights": w, "tune": recalls(h, "tune"),
                            "confirm": recalls(h, "confirm")},
            "single": {m: {"tune": recalls(v, "tune"), "confirm": recalls(v, "confirm")} for m, v in singles.items()},
            f"confirm_diff@{at}": {"vs": best_single, "mean": round(float(diff.mean()), 4),
                                   "ci95": [round(lo, 4), round(hi, 4)]},
            "queries": {"tune": len(parts["tune"]), "confirm": len(parts["confirm"])}}
