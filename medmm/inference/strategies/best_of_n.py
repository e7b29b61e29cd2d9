"""``best_of_n``: the greedy answer and N sampled answers, reranked by the value head or a registered reward.

The candidates share the prompt's KV cache (each continues from a copy); sampling draws from the
decoding seed's generator, so one seed gives one answer. Ties keep the earlier candidate (greedy first).
"""

from __future__ import annotations

from . import Param, Strategy, at_least_one, register_strategy
from ._search import SCORER, TEMPERATURE, TOP_K, Searcher, search_step


def best_of_n(s: Searcher) -> list[int]:
    root = s.root()
    candidates = [s.extend(root, greedy=j == 0, mode=None) for j in range(s.p["num_samples"] + 1)]
    best = max(range(len(candidates)), key=lambda i: (s.score(candidates[i]), -i))
    s.ctx.extra.update(candidates=len(candidates), chosen=best, chosen_score=round(candidates[best].score, 6))
    return s.finish(candidates[best])


register_strategy(Strategy(
    "best_of_n", "greedy + N sampled answers, the best by the value head (or a registered reward) kept",
    params=(Param("num_samples", int, 8, "best_of_n: answers sampled besides the greedy one", at_least_one),
            TEMPERATURE, TOP_K, SCORER),
    start=search_step(best_of_n), needs_hidden=True))
