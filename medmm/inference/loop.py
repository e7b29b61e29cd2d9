"""The one KV-cached decoding loop that every medmm strategy's step runs in (batch of one).

A step is ``step(ctx) -> tokens``: it reads :meth:`LoopContext.logits` (the next-token logits, feeding
the tokens still pending), chooses one or more tokens, and leaves in ``ctx.pending`` those it has not
fed to the model yet. :func:`run_loop` appends them, stops at end of turn or ``max_new_tokens``, and
streams them. Greedy is ``ctx.pending = [argmax]``; speculative decoding feeds the pending token and
its guesses in one forward and keeps only the correction pending.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .decoding import CausalRunner, DecodeResult


@dataclass
class LoopContext:
    """State of one decode: the target's cache after the prompt, its last logits, what was generated."""

    runner: CausalRunner
    cache: object
    last_logits: torch.Tensor
    """(V,) logits after the prompt (then after the last fed token)."""
    prompt: list[int]
    max_new_tokens: int
    eos: int | None
    generator: torch.Generator
    prompt_hidden: torch.Tensor | None = None
    """(T, H) last hidden states of the prompt, for strategies that ask for them."""
    session: object = None
    """The :class:`~medmm.inference.session.Session` (modality features, tokenizer, placeholders)."""
    aux: dict = field(default_factory=dict)
    """Loaded helper models by setting name (``draft``, ``amateur``, ``value``)."""
    out: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    forwards: int = 0
    proposed: int = 0
    accepted: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.out)

    def feed(self, ids: list[int], hidden: bool = False):
        """Run ``ids`` after the cache; returns their logits ``(len(ids), V)`` (and hidden ``(len, H)``)."""
        logits, self.cache, h = self.runner.forward(self.cache, ids=ids, hidden=hidden)
        self.forwards += 1
        self.last_logits = logits[-1]
        return (logits, h) if hidden else logits

    def logits(self) -> torch.Tensor:
        """Next-token logits ``(V,)``, feeding the pending tokens first."""
        if self.pending:
            ids, self.pending = self.pending, []
            self.feed(ids)
        return self.last_logits


def cut(tokens: list[int], eos: int | None, max_new: int) -> tuple[list[int], bool]:
    """Tokens before the first end-of-turn, at most ``max_new``; and whether decoding is over."""
    if eos is not None and eos in tokens:
        return tokens[: tokens.index(eos)], True
    if len(tokens) >= max_new:
        return tokens[:max_new], True
    return tokens, False


def run_loop(ctx: LoopContext, step: Callable[[LoopContext], list[int]],
             on_token: Callable[[int], None] | None = None) -> DecodeResult:
    """Call ``step`` until end of turn or ``max_new_tokens``; returns the tokens and the step's counters."""
    while True:
        new = step(ctx)
        if not new:
            raise RuntimeError("a decoding step returned no token")
        before = len(ctx.out)
        ctx.out, done = cut(ctx.out + list(new), ctx.eos, ctx.max_new_tokens)
        if on_token is not None:
            for t in ctx.out[before:]:
                on_token(t)
        if done:
            return DecodeResult(ctx.out, ctx.forwards, ctx.proposed, ctx.accepted, extra=dict(ctx.extra))


def token_step(choose: Callable[[torch.Tensor, LoopContext], int]) -> Callable[[LoopContext], list[int]]:
    """A one-token-per-forward step from ``choose(logits (V,), ctx) -> token``."""

    def step(ctx: LoopContext) -> list[int]:
        tok = choose(ctx.logits(), ctx)
        ctx.pending = [tok]
        return [tok]

    return step
