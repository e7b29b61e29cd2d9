"""Greedy, sampling and beam search: Hugging Face ``generate`` for batches, medmm's loop in sessions.

Greedy and sampling also have a loop step (several questions about one input, streaming) that applies
the same repetition penalty and n-gram ban as ``generate``; beam search runs only through ``generate``.
"""

from __future__ import annotations

from ..decoding import apply_repetition_penalty, banned_ngram_tokens, greedy_token, sample_token
from ..loop import LoopContext, token_step
from . import Param, Strategy, at_least_one, non_negative, positive, register_strategy, unit_interval

REPETITION = (
    Param("repetition_penalty", float, 1.0, "> 1 discourages tokens already in the prompt or answer", positive),
    Param("no_repeat_ngram_size", int, 0, "forbid repeating n-grams of this size (0 = off)", non_negative),
)


def _common_kwargs(p: dict) -> dict:
    kw = {"repetition_penalty": p["repetition_penalty"]}
    if p["no_repeat_ngram_size"]:
        kw["no_repeat_ngram_size"] = p["no_repeat_ngram_size"]
    return kw


def penalised(logits, ctx: LoopContext, p: dict):
    """The loop's logits after the repetition penalty and the n-gram ban (``generate``'s processors)."""
    seq = ctx.prompt + ctx.out
    logits = apply_repetition_penalty(logits, seq, p["repetition_penalty"])
    if p["no_repeat_ngram_size"]:
        banned = banned_ngram_tokens(seq, p["no_repeat_ngram_size"])
        if banned:
            logits = logits.clone()
            logits[banned] = -float("inf")
    return logits


def _greedy_start(ctx: LoopContext, p: dict):
    return token_step(lambda lg, c: greedy_token(penalised(lg, c, p)))


def _sample_start(ctx: LoopContext, p: dict):
    return token_step(lambda lg, c: sample_token(penalised(lg, c, p).cpu(), p["temperature"], p["top_k"], p["top_p"],
                                                 c.generator))


register_strategy(Strategy(
    "greedy", "the most likely token at each step", params=REPETITION,
    hf=lambda p, d: {"do_sample": False, "num_beams": 1, **_common_kwargs(p)},
    start=_greedy_start, exact=True))

register_strategy(Strategy(
    "sample", "sampling with temperature, top-k and top-p (temperature 0 = greedy), seeded",
    params=(Param("temperature", float, 1.0, "sample: softmax temperature; 0 means greedy", non_negative),
            Param("top_k", int, 50, "sample: keep the k most likely tokens (0 = all)", non_negative),
            Param("top_p", float, 1.0, "sample: keep the nucleus of this mass", unit_interval), *REPETITION),
    hf=lambda p, d: ({"do_sample": False, "num_beams": 1} if p["temperature"] == 0 else
                     {"do_sample": True, "temperature": p["temperature"], "top_k": p["top_k"], "top_p": p["top_p"]})
    | _common_kwargs(p),
    start=_sample_start))

register_strategy(Strategy(
    "beam", "beam search (Hugging Face generate only)",
    params=(Param("num_beams", int, 4, "beam: beams kept", at_least_one),
            Param("length_penalty", float, 1.0, "beam: exponent on length when ranking finished beams"),
            *REPETITION),
    hf=lambda p, d: {"do_sample": False, "num_beams": p["num_beams"], "length_penalty": p["length_penalty"],
                     "early_stopping": True, **_common_kwargs(p)}))
