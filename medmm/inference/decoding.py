"""Decoding beyond Hugging Face ``generate``: small pure functions of logits behind one KV-cached loop.

* strategies: :func:`greedy_token`, :func:`sample_token` (temperature 0 = argmax, top-k, top-p),
  :func:`apply_repetition_penalty`, :func:`contrastive_decoding_scores` (expert/amateur, Li et al.
  2022 with the (1+beta)/beta form of O'Brien & Lewis 2023), :func:`contrastive_search_select`
  (Su et al. 2022; HF moved it to the Hub, which is unreachable here);
* proposers for speculative decoding: :func:`prompt_lookup_proposal`, :class:`DraftProposer`,
  :func:`layer_skip_draft`;
* :class:`CausalRunner`: the incremental KV-cached forward (batch of one) under :mod:`medmm.inference.loop`;
  :func:`narrow_linears` for the few-row forward that checks a draft's guesses on a CPU.

The strategies built from these live in :mod:`medmm.inference.strategies` (one module each, registered);
sessions with a prefix cache in :mod:`medmm.inference.session`.
"""

from __future__ import annotations

import copy
import math
import types
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ConfigError

# ----------------------------------------------------------------------------- pure functions


def greedy_token(logits: torch.Tensor) -> int:
    """argmax of ``(V,)`` logits."""
    return int(torch.argmax(logits))


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k and the nucleus of mass ``top_p``. ``(V,)`` -> ``(V,)``."""
    logits = logits.clone()
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = -math.inf
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= top_p  # keep the token that crosses top_p
        logits[idx[drop]] = -math.inf
    return logits


def sample_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> int:
    """Sample from ``(V,)`` logits; temperature 0 means argmax."""
    if temperature == 0:
        return greedy_token(logits)
    probs = torch.softmax(filter_top_k_top_p(logits.float() / temperature, top_k, top_p), -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def apply_repetition_penalty(logits: torch.Tensor, previous: list[int], penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already in ``previous`` (divide positive, multiply negative logits)."""
    if penalty == 1.0 or not previous:
        return logits
    logits = logits.clone()
    idx = torch.tensor(sorted(set(previous)), device=logits.device)
    vals = logits[idx]
    logits[idx] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def banned_ngram_tokens(sequence: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already in ``sequence`` (HF's ``no_repeat_ngram_size``)."""
    if n <= 0 or len(sequence) + 1 < n:
        return []
    tail = tuple(sequence[len(sequence) - n + 1:]) if n > 1 else ()
    return sorted({sequence[i + n - 1] for i in range(len(sequence) - n + 1)
                   if tuple(sequence[i: i + n - 1]) == tail})


def contrastive_decoding_scores(expert_logits: torch.Tensor, amateur_logits: torch.Tensor, alpha: float = 0.1,
                                beta: float = 0.5) -> torch.Tensor:
    """(1+beta) log p_expert - beta log p_amateur over the alpha-plausible set (others -inf).

    The plausible set keeps tokens with p_expert >= alpha * max p_expert. beta = 0 is greedy on the expert.
    """
    lp_e = torch.log_softmax(expert_logits.float(), -1)
    lp_a = torch.log_softmax(amateur_logits.float(), -1)
    if lp_a.shape[-1] < lp_e.shape[-1]:  # a text-only amateur lacks the expert's added (placeholder) tokens
        lp_a = torch.cat([lp_a, lp_a.min().expand(lp_e.shape[-1] - lp_a.shape[-1])])
    lp_a = lp_a[: lp_e.shape[-1]]
    plausible = lp_e >= math.log(alpha) + lp_e.max()
    scores = (1 + beta) * lp_e - beta * lp_a
    return scores.masked_fill(~plausible, -math.inf)


def contrastive_search_select(probs: torch.Tensor, candidate_hidden: torch.Tensor, context_hidden: torch.Tensor,
                              alpha: float) -> int:
    """Index of the candidate maximising (1-alpha) p(v) - alpha max_j cos(h_v, h_j).

    ``probs`` (k,), ``candidate_hidden`` (k, H), ``context_hidden`` (T, H).
    """
    sim = F.cosine_similarity(candidate_hidden.unsqueeze(1).float(), context_hidden.unsqueeze(0).float(), dim=-1)
    score = (1 - alpha) * probs.float() - alpha * sim.max(dim=1).values
    return int(torch.argmax(score))


def prompt_lookup_proposal(sequence: list[int], k: int, max_ngram: int = 3) -> list[int]:
    """Prompt-lookup decoding's proposer: the tokens that followed the latest earlier match of the last n-gram."""
    for n in range(max_ngram, 0, -1):
        if len(sequence) <= n:
            continue
        tail = sequence[-n:]
        for start in range(len(sequence) - n - 1, -1, -1):
            if sequence[start: start + n] == tail:
                follow = sequence[start + n: start + n + k]
                if follow:
                    return follow
    return []


# ----------------------------------------------------------------------------- the cached runner


def crop_cache(cache, length: int) -> None:
    """Cut a cache back to its first ``length`` positions (transformers 5 takes a negative count to remove)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


class CausalRunner:
    """Incremental forward of an HF causal LM (batch of one) over embeddings or ids, with a DynamicCache."""

    def __init__(self, llm, suppress: list[int] | None = None):
        self.llm = llm
        self.embed_tokens = llm.get_input_embeddings()
        self.suppress = list(suppress or [])  # token ids never generated (modality placeholders)

    @torch.no_grad()
    def forward(self, cache, ids: list[int] | None = None, embeds: torch.Tensor | None = None,
                hidden: bool = False):
        """Feed ``ids`` or ``embeds`` (1, T, H) after ``cache``; returns (logits (T, V), cache, last hidden (T, H))."""
        from transformers import DynamicCache

        if embeds is None:
            embeds = self.embed_tokens(torch.tensor([ids], device=self.embed_tokens.weight.device))
        cache = cache if cache is not None else DynamicCache()
        past = cache.get_seq_length()
        T = embeds.shape[1]
        out = self.llm(inputs_embeds=embeds, cache=cache, use_cache=True,
                       attention_mask=torch.ones(1, past + T, dtype=torch.long, device=embeds.device),
                       output_hidden_states=hidden)
        h = out.hidden_states[-1][0] if hidden else None
        logits = out.logits[0].float()
        if self.suppress:
            logits[:, self.suppress] = -math.inf
        return logits, out.cache, h


NARROW_ROWS = 16  # inputs of 2..16 rows (a verification of up to 15 guesses) take the weight-first product


def _weight_first_linear(self, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` computing a narrow input as ``W @ x.T`` (transposed back): the same product."""
    rows = x.numel() // x.shape[-1]
    if not 1 < rows <= NARROW_ROWS:
        return F.linear(x, self.weight, self.bias)
    y = torch.mm(self.weight, x.reshape(rows, x.shape[-1]).t()).t()  # (rows, out)
    if self.bias is not None:
        y = y + self.bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


@contextmanager
def narrow_linears(llm):
    """Within the block, the CPU ``nn.Linear`` layers of ``llm`` compute inputs of 2-16 rows as ``W @ x.T``.

    Checking k guesses is a forward of k + 1 rows. On a CPU, MKL's ``x @ W.T`` for so few rows is no
    longer a matrix-vector product and costs well over the one-row step while reading the same weights;
    the weight-first product of the same numbers can cost less (``bench/decoding.py`` times one check both ways;
    which wins depends on the CPU). One row (greedy's step) and long prompts keep ``F.linear``. The
    layers get their own ``forward`` for the block and lose it after; other devices are left alone.
    """
    mods = [m for m in llm.modules() if type(m) is torch.nn.Linear and m.weight.device.type == "cpu"]
    for m in mods:
        m.forward = types.MethodType(_weight_first_linear, m)
    try:
        yield
    finally:
        for m in mods:
            m.__dict__.pop("forward", None)


@dataclass
class DecodeResult:
    """Generated token ids plus counters that benchmarks and the JSON record report."""

    tokens: list[int]
    forwards: int = 0
    proposed: int = 0
    accepted: int = 0
    reused_prefix_tokens: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class DraftProposer:
    """A draft model proposing up to ``k`` greedy tokens; keeps its own cache in step with the sequence it is shown.

    With ``confidence`` > 0 it stops early at a guess it gives less probability than that (HF's
    ``assistant_confidence_threshold``): fewer draft forwards and a narrower check where the draft is unsure.

    With ``prefix_embeds`` (1, P, H) the draft's first P positions are those embeddings (the target's
    spliced prompt, modality features included) instead of token ids: a draft of the target's width
    then sees the image too.

    ``runner``: ``auto`` runs a Llama-family draft through :class:`~.lean.LeanRunner` (the same modules
    without HF's per-call machinery) and any other through HF's forward; ``lean`` insists (an unsupported
    draft is then a :class:`~medmm.errors.ConfigError`); ``hf`` always takes HF's forward.
    """

    def __init__(self, draft_llm, prefix_embeds: torch.Tensor | None = None, suppress: list[int] | None = None,
                 confidence: float = 0.0, runner: str = "auto"):
        from .lean import LeanRunner, lean_unsupported

        self.lean = None
        if runner != "hf":
            why = lean_unsupported(draft_llm)
            if why is None:
                self.lean = LeanRunner(draft_llm, suppress=suppress)
            elif runner == "lean":
                raise ConfigError(f"draft_runner=lean cannot run this draft: {why}")
        self.runner = None if self.lean else CausalRunner(draft_llm, suppress=suppress)
        self.confidence = confidence  # stop guessing at a token the draft gives less than this probability
        self.cache = None
        self.started = False
        self.cached: list[int] = []
        self.forwards = 0
        self.prefix_embeds = prefix_embeds
        self.prefix_len = 0 if prefix_embeds is None else prefix_embeds.shape[1]

    def _feed(self, ids: list[int] | None = None, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``ids`` / ``embeds`` after the draft's cache; the last position's logits (V,)."""
        self.forwards += 1
        self.started = True
        if self.lean is not None:
            return self.lean.forward(ids, embeds)
        logits, self.cache, _ = self.runner.forward(self.cache, ids=ids, embeds=embeds)
        return logits[-1]

    def _crop(self, length: int) -> None:
        if self.lean is not None:
            self.lean.crop(length)
        else:
            crop_cache(self.cache, length)

    def __call__(self, sequence: list[int], k: int) -> list[int]:
        lcp = 0
        for a, b in zip(self.cached, sequence):
            if a != b:
                break
            lcp += 1
        lcp = min(lcp, len(sequence) - 1)  # feed at least the last token to get next-token logits
        if not self.started and self.prefix_len:
            self._feed(embeds=self.prefix_embeds)
            self.cached = list(sequence[: self.prefix_len])
            lcp = min(self.prefix_len, len(sequence) - 1)
            if lcp < self.prefix_len:
                raise ValueError("the draft's embedded prefix is longer than the sequence")
        if self.started:
            if lcp < self.prefix_len:
                raise ValueError("the sequence no longer starts with the draft's embedded prefix")
            self._crop(lcp)
        logits = self._feed(ids=sequence[lcp:])
        self.cached = list(sequence)
        proposal = []
        for i in range(k):
            tok = greedy_token(logits)
            if i and self.confidence and float(torch.softmax(logits, -1)[tok]) < self.confidence:
                break  # the target would likely reject it: verify the guesses so far (the first is always kept)
            proposal.append(tok)
            if i < k - 1:
                logits = self._feed(ids=[tok])
                self.cached.append(tok)
        return proposal


def quantize_draft(draft_llm):
    """The draft with its linear layers (attention, MLP, lm_head) as dynamic int8 (PyTorch's fbgemm kernels, CPU).

    A draft only guesses and the target checks every guess at full precision, so the output stays greedy's; on a
    CPU, where a small model's step is bound by reading its weights, a quarter of the bytes makes each guess cheaper
    (``bench/decoding.py`` measures it). A copy: the float model is left as it was.

    Raises:
        ConfigError: the draft is not on the CPU (the kernels are CPU only).
    """
    import warnings

    if next(draft_llm.parameters()).device.type != "cpu":
        raise ConfigError("draft_quantize=int8 runs on the CPU only (PyTorch's dynamic int8 kernels)")
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice (moving to torchao)
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(draft_llm), {torch.nn.Linear}, dtype=torch.qint8).eval()


def layer_skip_draft(llm, num_layers: int):
    """A self-speculative draft: the target's first ``num_layers`` decoder layers, embeddings, norm and head.

    Works for HF decoder-only models whose config has ``num_hidden_layers`` (Llama, Qwen2, Mistral, Phi-3).
    """
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(llm.config)
    if not 0 < num_layers <= cfg.num_hidden_layers:
        raise ValueError(f"num_layers must be in 1..{cfg.num_hidden_layers}, got {num_layers}")
    cfg.num_hidden_layers = num_layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:num_layers]
    draft = AutoModelForCausalLM.from_config(cfg).to(device=llm.device, dtype=llm.dtype)
    missing, _ = draft.load_state_dict(llm.state_dict(), strict=False)
    if missing:
        raise ValueError(f"draft weights missing from the target: {missing[:5]}")
    return draft.eval()
