"""``mcts``: Monte-Carlo tree search (PUCT) over step-level expansions, the value head as leaf estimate.

A node is a partial answer; expanding it samples ``step_samples`` next steps (the greedy one first;
duplicates merged) whose priors are their step probabilities under the model. Each of ``num_simulations``
simulations descends by PUCT, ``Q + c_puct * P * sqrt(N_parent) / (1 + N)`` (an unvisited child's Q is its
own value estimate), expands the leaf, and backs up the leaf's value (TS-LLM, arXiv 2309.17179; AlphaZero's
PUCT). The answer follows the most visited children from the root, finished greedily where the tree stops.
All sampling uses the decoding seed's generator: one seed gives one answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import Param, Strategy, at_least_one, positive, register_strategy
from ._search import SCORER, STEP, STEP_SAMPLES, TEMPERATURE, TOP_K, Partial, Searcher, search_step, softmax_priors


@dataclass
class Node:
    part: Partial
    prior: float = 1.0
    visits: int = 0
    total: float = 0.0
    children: list[Node] = field(default_factory=list)
    expanded: bool = False

    def q(self, s: Searcher) -> float:
        return self.total / self.visits if self.visits else s.score(self.part)


def _select(node: Node, c_puct: float, s: Searcher) -> Node:
    sqrt_n = math.sqrt(max(node.visits, 1))
    return max(node.children, key=lambda c: c.q(s) + c_puct * c.prior * sqrt_n / (1 + c.visits))


def _count(node: Node) -> int:
    return 1 + sum(_count(c) for c in node.children)


def mcts(s: Searcher) -> list[int]:
    root = Node(s.root())
    k, mode, c_puct = s.p["step_samples"], s.p["step_delimiter"], s.p["c_puct"]
    for _ in range(s.p["num_simulations"]):
        node, path = root, [root]
        while node.expanded and node.children and not node.part.done:
            node = _select(node, c_puct, s)
            path.append(node)
        if not node.part.done and not node.expanded:
            children = s.expand(node.part, k, mode)
            node.children = [Node(c, p) for c, p in zip(children, softmax_priors(children))]
            node.expanded = True
        value = s.score(node.part) if node is not root or not node.children else max(
            c.q(s) for c in node.children)
        for n in path:
            n.visits += 1
            n.total += value
    node, depth = root, 0
    while node.children and not node.part.done:
        node = max(node.children, key=lambda c: (c.visits, c.q(s)))
        depth += 1
    s.ctx.extra.update(simulations=s.p["num_simulations"], root_visits=root.visits, depth=depth,
                       nodes=_count(root), root_q=round(root.total / max(root.visits, 1), 6),
                       chosen_score=round(node.q(s), 6))
    return s.finish(node.part)


register_strategy(Strategy(
    "mcts", "Monte-Carlo tree search (PUCT) over steps, the value head as leaf estimate; deterministic per seed",
    params=(Param("num_simulations", int, 16, "mcts: simulations (select, expand, evaluate, back up)", at_least_one),
            Param("c_puct", float, 1.0, "mcts: exploration weight of the prior", positive),
            STEP_SAMPLES, STEP, TEMPERATURE, TOP_K, SCORER),
    start=search_step(mcts), needs_hidden=True))
