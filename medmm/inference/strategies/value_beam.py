"""``value_beam``: step-level beam search guided by the value head (a step is a line or a sentence).

Each unfinished beam is extended by ``step_samples`` steps (the greedy one and seeded samples); the
``beam_width`` best of all candidates by value (finished beams compete unchanged) are kept, until every
kept beam has finished. The answer is the best finished beam.
"""

from __future__ import annotations

from . import Param, Strategy, at_least_one, register_strategy
from ._search import SCORER, STEP, STEP_SAMPLES, TEMPERATURE, TOP_K, Searcher, search_step


def value_beam(s: Searcher) -> list[int]:
    beams = [s.root()]
    rounds = 0
    while not all(b.done for b in beams):
        rounds += 1
        pool = []
        for b in beams:
            pool.extend([b] if b.done else s.expand(b, s.p["step_samples"], s.p["step_delimiter"]))
        seen, unique = set(), []
        for c in pool:  # two beams can reach the same answer
            key = (tuple(c.tokens), c.done)
            if key not in seen:
                seen.add(key)
                unique.append(c)
        order = sorted(range(len(unique)), key=lambda i: (-s.score(unique[i]), i))
        beams = [unique[i] for i in order[: s.p["beam_width"]]]
    best = max(range(len(beams)), key=lambda i: (s.score(beams[i]), -i))
    s.ctx.extra.update(rounds=rounds, chosen_score=round(beams[best].score, 6))
    return s.finish(beams[best])


register_strategy(Strategy(
    "value_beam", "step-level beam search (a step = a line or a sentence) ranked by the value head",
    params=(Param("beam_width", int, 3, "value_beam: partial answers kept after each step", at_least_one),
            STEP_SAMPLES, STEP, TEMPERATURE, TOP_K, SCORER),
    start=search_step(value_beam), needs_hidden=True))
