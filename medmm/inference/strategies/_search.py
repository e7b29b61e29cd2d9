"""What the search strategies share (``best_of_n``, ``value_beam``, ``mcts``): partial answers, steps, scores.

A :class:`Partial` is an answer so far with its own KV cache (the prompt's, copied, plus its tokens),
the next-token logits and the last hidden state ``(H,)``. :meth:`Searcher.extend` grows one by a *step*
(a line, a sentence, or the whole answer), greedily or by seeded sampling; :meth:`Searcher.score` rates
it with the model folder's value head (``trainer.stage: value``) or, for a finished answer, a reward of
:mod:`medmm.data.rewards` against the request's reference (``ctx.aux["example"]``); a reward rates an
unfinished answer by its greedy completion (a Monte-Carlo rollout).

A search runs whole on the loop's first step and hands back its answer plus end-of-turn; every random
choice draws from ``ctx.generator`` (seeded by ``decoding.seed``), so one seed gives one answer.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from ...errors import ConfigError
from ...model.value_head import closes_step
from ..decoding import sample_token
from ..loop import LoopContext
from . import Param, at_least_one, non_negative, one_of


def _scorer(v) -> str | None:
    from ...data.rewards import list_rewards

    return None if v == "value" or v in list_rewards() else f"must be value or a registered reward ({list_rewards()})"


SCORER = Param("scorer", str, "value", "best_of_n / value_beam / mcts: value (the model folder's value head) or a "
               "registered reward scored against the request's reference", _scorer)
TEMPERATURE = Param("search_temperature", float, 1.0, "best_of_n / value_beam / mcts: sampling temperature of the "
                    "candidates (the first candidate is always the greedy one)", non_negative)
TOP_K = Param("search_sample_top_k", int, 0, "best_of_n / value_beam / mcts: sample among the k most likely tokens "
              "(0 = all)", non_negative)
STEP = Param("step_delimiter", str, "line", "value_beam / mcts: a step ends at a newline (line) or also at "
             ". ! ? not after a digit (sentence)", one_of("line", "sentence"))
STEP_SAMPLES = Param("step_samples", int, 4, "value_beam / mcts: continuations sampled per expanded node", at_least_one)


@dataclass
class Partial:
    """An answer so far: its tokens, a cache holding prompt + tokens, next logits ``(V,)``, last hidden ``(H,)``."""

    tokens: list[int]
    cache: object
    logits: torch.Tensor
    hidden: torch.Tensor
    done: bool = False
    logprob: float = 0.0
    """Log-probability of the last step under the model (temperature 1)."""
    score: float | None = None
    extra: dict = field(default_factory=dict)


class Searcher:
    """Grows and rates partial answers for one request (see the module docstring)."""

    def __init__(self, ctx: LoopContext, p: dict):
        self.ctx, self.p = ctx, p
        model = ctx.session.model
        self.tokenizer = model.tokenizer
        self.scorer = p["scorer"]
        if self.scorer == "value":
            if model.value_head is None:
                raise ConfigError("scorer=value: the model folder has no value head (value_head.safetensors); train "
                                  "one with trainer.stage: value, or name a registered reward as the scorer")
            self.head = model.value_head
        else:
            from ...data.rewards import get_reward

            if "example" not in ctx.aux:
                raise ConfigError(f"scorer={self.scorer}: a reward needs the request's reference answer "
                                  "(aux['example']); use scorer=value for requests without one")
            self.reward, self.example = get_reward(self.scorer), ctx.aux["example"]
        if ctx.prompt_hidden is None:
            raise ConfigError("search strategies read the prompt's hidden states (Strategy.needs_hidden)")
        self.max_new = ctx.max_new_tokens
        self._text: dict[int, str] = {}
        self.scored = 0

    def root(self) -> Partial:
        return Partial([], self.ctx.cache, self.ctx.last_logits, self.ctx.prompt_hidden[-1])

    def _token_text(self, tok: int) -> str:
        if tok not in self._text:
            self._text[tok] = self.tokenizer.decode([tok])
        return self._text[tok]

    def step_ends(self, tokens: list[int], mode: str) -> bool:
        """Whether the last token closes a step (:func:`medmm.model.value_head.closes_step`)."""
        prev = self._token_text(tokens[-2]) if len(tokens) > 1 else ""
        return closes_step(self._token_text(tokens[-1]), prev, mode)

    @torch.no_grad()
    def extend(self, part: Partial, greedy: bool, mode: str | None) -> Partial:
        """``part`` grown by one step (``mode`` line/sentence) or to the end (``mode`` None); ``part`` is unchanged."""
        ctx = self.ctx
        cache, logits, hidden = copy.deepcopy(part.cache), part.logits, part.hidden
        tokens, logprob, done = list(part.tokens), 0.0, False
        while True:
            t = 0.0 if greedy else self.p["search_temperature"]
            tok = sample_token(logits.float().cpu(), t, self.p["search_sample_top_k"], 1.0, ctx.generator)
            logprob += float(torch.log_softmax(logits.float(), -1)[tok])
            if tok == ctx.eos:
                done = True
                break
            tokens.append(tok)
            lg, cache, h = ctx.runner.forward(cache, ids=[tok], hidden=True)
            ctx.forwards += 1
            logits, hidden = lg[-1], h[-1]
            if len(tokens) >= self.max_new:
                done = True
                break
            if mode is not None and self.step_ends(tokens, mode):
                break
        return Partial(tokens, cache, logits, hidden, done, logprob)

    def expand(self, part: Partial, n: int, mode: str | None) -> list[Partial]:
        """The greedy step and ``n - 1`` sampled ones, duplicates merged (a duplicate adds to ``extra['count']``)."""
        out: dict[tuple, Partial] = {}
        for j in range(n):
            child = self.extend(part, greedy=j == 0, mode=mode)
            key = (tuple(child.tokens), child.done)
            if key in out:
                out[key].extra["count"] += 1
            else:
                child.extra["count"] = 1
                out[key] = child
        return list(out.values())

    def text(self, part: Partial) -> str:
        return self.tokenizer.decode(part.tokens, skip_special_tokens=True).strip()

    @torch.no_grad()
    def score(self, part: Partial) -> float:
        """The value head's estimate; or the reward of the finished answer (of its greedy completion when unfinished)."""
        if part.score is None:
            self.scored += 1
            if self.scorer == "value":
                part.score = float(self.head(part.hidden.float()))
            else:
                final = part if part.done else self.extend(part, greedy=True, mode=None)
                part.score = float(self.reward(self.text(final), self.example))
        return part.score

    def finish(self, part: Partial) -> list[int]:
        """The loop's tokens for a chosen answer: finished with greedy decoding if needed, then end-of-turn."""
        if not part.done:
            part = self.extend(part, greedy=True, mode=None)
        self.ctx.pending = []
        self.ctx.extra.update(scored=self.scored)
        if len(part.tokens) < self.max_new and self.ctx.eos is not None:
            return part.tokens + [self.ctx.eos]
        return part.tokens or [self.ctx.eos]


def search_step(run):
    """A loop step that runs ``run(searcher) -> tokens`` once; the loop then stops at its end-of-turn."""

    def start(ctx: LoopContext, p: dict):
        searcher = Searcher(ctx, p)

        def step(c: LoopContext) -> list[int]:
            if c.out:
                raise RuntimeError("a search strategy answers in one step")
            return run(searcher)

        return step

    return start


def softmax_priors(children: list[Partial]) -> list[float]:
    """PUCT priors of sampled children: their step probabilities under the model, renormalised."""
    m = max(c.logprob for c in children)
    w = [math.exp(c.logprob - m) for c in children]
    s = sum(w)
    return [x / s for x in w]
