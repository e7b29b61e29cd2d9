"""Contrastive decoding (expert vs amateur, Li et al. 2022) and contrastive search (Su et al. 2022).

Neither is in Hugging Face ``generate`` (contrastive search moved to the Hub, unreachable here), so both
run in medmm's loop. The amateur of contrastive decoding is a text-only LM fed the prompt without the
modality placeholders.
"""

from __future__ import annotations

import copy

import torch

from ..decoding import CausalRunner, contrastive_decoding_scores, contrastive_search_select, greedy_token
from ..loop import LoopContext
from . import Param, Strategy, at_least_one, non_negative, register_strategy, unit_interval


def _cd_start(ctx: LoopContext, p: dict):
    amateur = CausalRunner(ctx.aux["amateur"])
    placeholders = set(ctx.session.placeholders)
    state = {"cache": None, "last": None}
    a_logits, state["cache"], _ = amateur.forward(None, ids=[t for t in ctx.prompt if t not in placeholders])
    state["last"] = a_logits[-1]

    def step(c: LoopContext) -> list[int]:
        if c.out:  # the amateur sees the token the expert is about to be fed
            lg, state["cache"], _ = amateur.forward(state["cache"], ids=[c.out[-1]])
            state["last"] = lg[-1]
        tok = greedy_token(contrastive_decoding_scores(c.logits(), state["last"], p["cd_alpha"], p["cd_beta"]))
        c.pending = [tok]
        return [tok]

    ctx.extra.update(alpha=p["cd_alpha"], beta=p["cd_beta"])
    return step


def _cs_start(ctx: LoopContext, p: dict):
    state = {"context_h": ctx.prompt_hidden}  # (T, H)

    def step(c: LoopContext) -> list[int]:
        probs = torch.softmax(c.logits(), -1)
        top_p, top_i = torch.topk(probs, p["search_top_k"])
        cand_h = []
        for t in top_i.tolist():  # look one step ahead for each candidate
            _, _, h = c.runner.forward(copy.deepcopy(c.cache), ids=[t], hidden=True)
            cand_h.append(h[-1])
        j = contrastive_search_select(top_p, torch.stack(cand_h), state["context_h"], p["penalty_alpha"])
        state["context_h"] = torch.cat([state["context_h"], cand_h[j][None]])
        tok = int(top_i[j])
        c.pending = [tok]
        return [tok]

    ctx.extra.update(penalty_alpha=p["penalty_alpha"], top_k=p["search_top_k"])
    return step


register_strategy(Strategy(
    "contrastive", "contrastive decoding: (1+beta) log p_expert - beta log p_amateur over plausible tokens",
    params=(Param("amateur", str, None, "contrastive: local folder of the amateur causal LM (same tokenizer)",
                  required=True),
            Param("cd_alpha", float, 0.1, "contrastive: keep tokens with p >= alpha * max p", unit_interval),
            Param("cd_beta", float, 0.5, "contrastive: the amateur's weight (0 = greedy)", non_negative)),
    start=_cd_start, aux_models=("amateur",)))

register_strategy(Strategy(
    "contrastive_search", "contrastive search: confidence minus similarity to the context (alpha 0 = greedy)",
    params=(Param("penalty_alpha", float, 0.6, "contrastive_search: degeneration penalty", non_negative),
            Param("search_top_k", int, 4, "contrastive_search: candidates looked ahead per step", at_least_one)),
    start=_cs_start, needs_hidden=True))
