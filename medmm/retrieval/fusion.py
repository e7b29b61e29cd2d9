"""Reciprocal-rank fusion (Cormack et al. 2009): ``score(d) = sum_r w_r / (k + rank_r(d))`` over ranked lists."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["reciprocal_rank_fusion"]


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
