"""Reciprocal-rank fusion (Cormack et al. 2009): ``score(d) = sum_r w_r / (k + rank_r(d))`` over ranked lists."""

from __future__ import annotations

from collections.abc import Sequence

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


def tune_rrf(rankings: Sequence[Sequence[Sequence[int]]], gold: Sequence[int], at: int = 5,
             ks: Sequence[int] = (1, 5, 10, 20, 60), bm25_weights: Sequence[float] = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0),
             ) -> dict:
    """Pick the RRF constant and the (BM25, dense) weights that maximise recall@``at`` (then recall@1) on queries.

    ``rankings`` is ``[bm25_rankings, dense_rankings]`` (per query, document indices best first); ``gold`` the right
    document per query. The grid holds the dense-only (BM25 weight 0) and BM25-only fusions, so on these queries the
    choice is never worse than the better single retriever. Tune on queries disjoint from any benchmark.
    """
    bm, de = rankings
    grid = [(k, (w, 1.0)) for k in ks for w in bm25_weights] + [(k, (1.0, 0.0)) for k in ks]
    best = None
    for k, w in grid:
        hits_at, hits_1 = 0, 0
        for b, d, g in zip(bm, de, gold):
            top = [i for i, _ in reciprocal_rank_fusion([b, d], k=k, weights=w, top_k=at)]
            hits_at += g in top
            hits_1 += bool(top) and top[0] == g
        key = (hits_at, hits_1)
        if best is None or key > best[0]:
            best = (key, k, w)
    (h_at, h_1), k, w = best
    n = max(len(gold), 1)
    return {"rrf_k": k, "rrf_weights": list(w), f"recall@{at}": h_at / n, "recall@1": h_1 / n, "queries": len(gold)}
