"""Exact speed-ups of greedy decoding: prompt lookup and speculative decoding; and HF speculative sampling.

* ``prompt_lookup``: guesses are the tokens that followed the last earlier match of the current n-gram.
* ``speculative``: a draft model (same tokenizer) guesses ``num_draft_tokens``; the target checks them in
  one forward and keeps the longest agreeing run plus its own next token, so the answer equals greedy.
  A draft of the target's width is fed the target's spliced prompt (it sees the image); a narrower
  text-only draft gets the prompt without placeholders, which HF's assistant path cannot do.
* ``speculative_sampling``: HF's assistant path with sampling (text-only requests).

``backend``: ``auto`` uses Hugging Face ``generate`` for requests without modality inputs and medmm's
loop otherwise; ``hf`` insists on HF (a request with modality inputs is then an error); ``medmm`` always
takes the loop.
"""

from __future__ import annotations

from contextlib import nullcontext

from ...errors import ConfigError
from ..decoding import DraftProposer, crop_cache, greedy_token, narrow_linears, prompt_lookup_proposal
from ..loop import LoopContext
from . import Param, Strategy, at_least_one, non_negative, one_of, register_strategy, unit_interval

K = Param("num_draft_tokens", int, 4, "speculative / prompt_lookup: tokens guessed per verification", at_least_one)
BACKEND = Param("backend", str, "auto", "auto (HF generate for text-only requests, else medmm's loop) | hf | medmm",
                one_of("auto", "hf", "medmm"))
SCHEDULE = Param("draft_schedule", str, "constant", "speculative: constant num_draft_tokens, or heuristic (+2 after "
                 "a guess accepted whole, -1 otherwise; HF's schedule)",
                 one_of("constant", "heuristic"))
CONFIDENCE = Param("draft_confidence", float, 0.0, "speculative (medmm loop): stop guessing at a token the draft "
                   "gives less probability than this (0 = always guess num_draft_tokens; medmm's loop: HF's "
                   "assistant path keeps its own adaptive threshold)",
                   lambda v: None if 0.0 <= v < 1.0 else "must be in [0, 1)", loop_only=True)
QUANTIZE = Param("draft_quantize", str, "none", "speculative: none, or int8 (the draft's linear layers as dynamic "
                 "int8 on CPU: cheaper guesses, the target still checks each one, so the output is unchanged)",
                 one_of("none", "int8"))
RUNNER = Param("draft_runner", str, "auto", "speculative (medmm loop): lean (the draft's own modules over a "
               "preallocated cache, Llama-family drafts), hf (HF's forward), or auto (lean where it can)",
               one_of("auto", "lean", "hf"), loop_only=True)
NARROW = Param("narrow_verify", str, "on", "speculative / prompt_lookup (medmm loop, CPU): on computes the "
               "few-row check as W @ x.T, faster than MKL's x @ W.T for 2-16 rows; off keeps F.linear",
               one_of("on", "off"), loop_only=True)
DRAFT = Param("draft", str, None, "speculative: local folder of a draft causal LM sharing the tokenizer", required=True)


def verify_step(propose, context: list[int], k: int, schedule: str = "constant", narrow: bool = True):
    """Greedy speculative step: ``propose(sequence, k)`` guesses; one target forward checks them all.

    ``schedule="heuristic"`` adapts k as HF's assistant path does: +2 after a guess accepted whole, -1 (down to
    1) otherwise, so a draft that agrees for long runs guesses more per target forward. ``narrow`` runs the
    check under :func:`~..decoding.narrow_linears` (CPU)."""
    state = {"k": k}

    def step(ctx: LoopContext) -> list[int]:
        if not ctx.out and not ctx.pending:  # the first token comes straight from the prompt's logits
            tok = greedy_token(ctx.logits())
            ctx.pending = [tok]
            return [tok]
        guess = propose(context + ctx.out, max(1, min(state["k"], ctx.remaining)))[: max(0, ctx.remaining)]
        past = ctx.cache.get_seq_length()
        fed = ctx.pending
        ctx.pending = []
        with narrow_linears(ctx.runner.llm) if narrow and guess else nullcontext():
            rows = ctx.feed(fed + guess)  # (1 + len(guess), V): fed is the one pending token
        n = 0
        while n < len(guess) and greedy_token(rows[n]) == guess[n]:
            n += 1
        correction = greedy_token(rows[n])
        crop_cache(ctx.cache, past + 1 + n)  # keep the pending token and the accepted guesses
        ctx.proposed += len(guess)
        ctx.accepted += n
        if schedule == "heuristic":
            state["k"] = state["k"] + 2 if guess and n == len(guess) else max(1, state["k"] - 1)
        ctx.pending = [correction]
        return guess[:n] + [correction]

    return step


def _lookup_start(ctx: LoopContext, p: dict):
    return verify_step(lambda seq, k: prompt_lookup_proposal(seq, k, p["max_ngram"]), ctx.prompt,
                       p["num_draft_tokens"], narrow=p["narrow_verify"] == "on")


def _speculative_start(ctx: LoopContext, p: dict):
    draft = ctx.aux["draft"]
    sess = ctx.session
    same_width = draft.get_input_embeddings().weight.shape == ctx.runner.embed_tokens.weight.shape
    sees = same_width if p["draft_sees_modalities"] == "auto" else p["draft_sees_modalities"] == "yes"
    if sees and not same_width:
        raise ConfigError("draft_sees_modalities=yes needs a draft with the target's hidden size and vocabulary")
    placeholders = set(sess.placeholders)
    context = ctx.prompt if sees else [t for t in ctx.prompt if t not in placeholders]
    propose = DraftProposer(draft, sess.embed(ctx.prompt) if sees else None,
                            suppress=sorted(placeholders) if sees else None, confidence=p["draft_confidence"],
                            runner=p["draft_runner"])
    return verify_step(propose, context, p["num_draft_tokens"], p["draft_schedule"], p["narrow_verify"] == "on")


def _assistant_kwargs(p: dict, aux: dict) -> dict:
    return {"assistant_model": aux["draft"], "num_assistant_tokens": p["num_draft_tokens"],
            "num_assistant_tokens_schedule": p.get("draft_schedule", "constant")}


register_strategy(Strategy(
    "prompt_lookup", "greedy, guessing from earlier n-grams of the prompt and answer (exact)",
    params=(K, Param("max_ngram", int, 3, "prompt_lookup: longest n-gram matched", at_least_one), BACKEND, NARROW),
    hf=lambda p, aux: {"do_sample": False, "num_beams": 1, "prompt_lookup_num_tokens": p["num_draft_tokens"],
                       "max_matching_ngram_size": p["max_ngram"]},
    hf_batch=False, hf_text_only=True, start=_lookup_start, exact=True))

register_strategy(Strategy(
    "speculative", "greedy, guessed by a draft model and verified by the target (exact)",
    params=(DRAFT, K, BACKEND,
            Param("draft_sees_modalities", str, "auto", "speculative (medmm loop): feed the draft the spliced "
                  "prompt (auto = when it has the target's width)", one_of("auto", "yes", "no")), SCHEDULE, CONFIDENCE, QUANTIZE, RUNNER, NARROW),
    hf=lambda p, aux: {"do_sample": False, "num_beams": 1, **_assistant_kwargs(p, aux)},
    hf_batch=False, hf_text_only=True, start=_speculative_start, exact=True, aux_models=("draft",)))

register_strategy(Strategy(
    "speculative_sampling", "sampling with a draft model's guesses (HF assistant path; text-only requests)",
    params=(DRAFT, K, Param("temperature", float, 1.0, "sample: softmax temperature; 0 means greedy", non_negative),
            Param("top_k", int, 50, "sample: keep the k most likely tokens (0 = all)", non_negative),
            Param("top_p", float, 1.0, "sample: keep the nucleus of this mass", unit_interval)),
    hf=lambda p, aux: {"do_sample": p["temperature"] > 0, "temperature": p["temperature"] or 1.0, "top_k": p["top_k"],
                       "top_p": p["top_p"], **_assistant_kwargs(p, aux)},
    hf_batch=False, hf_text_only=True, aux_models=("draft",)))
