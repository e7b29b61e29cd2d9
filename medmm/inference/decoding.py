"""Decoding beyond Hugging Face ``generate``: small pure functions of logits behind one KV-cached loop.

* strategies: :func:`greedy_token`, :func:`sample_token` (temperature 0 = argmax, top-k, top-p),
  :func:`apply_repetition_penalty`, :func:`contrastive_decoding_scores` (expert/amateur, Li et al.
  2022 with the (1+beta)/beta form of O'Brien & Lewis 2023), :func:`contrastive_search_select`
  (Su et al. 2022; HF moved it to the Hub, which is unreachable here);
* :func:`draft_and_verify`: greedy speculative decoding with a draft model, or prompt-lookup
  decoding, whose output equals plain greedy decoding token for token;
* :class:`Session`: several questions about one study reuse the encoded modality features and the
  KV cache of the shared prompt prefix; :meth:`Session.closed_set` scores a fixed answer set.

Everything here runs one sequence at a time (batch of one); batched decoding goes through HF
``generate`` in :mod:`medmm.inference.predictor`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

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


def _stop(tokens: list[int], eos: int | None, max_new: int) -> tuple[list[int], bool]:
    if eos is not None and eos in tokens:
        return tokens[: tokens.index(eos)], True
    if len(tokens) >= max_new:
        return tokens[:max_new], True
    return tokens, False


def decode_loop(runner: CausalRunner, logits: torch.Tensor, cache, choose: Callable[[torch.Tensor, list[int]], int],
                max_new_tokens: int, eos: int | None, on_token: Callable[[int], None] | None = None) -> DecodeResult:
    """One token per forward: ``choose(last_logits (V,), generated) -> token``. ``logits`` are the prompt's last."""
    out: list[int] = []
    forwards = 0
    while True:
        tok = choose(logits, out)
        out.append(tok)
        if on_token is not None and tok != eos:
            on_token(tok)
        out, done = _stop(out, eos, max_new_tokens)
        if done:
            return DecodeResult(out, forwards)
        step_logits, cache, _ = runner.forward(cache, ids=[tok])
        logits = step_logits[-1]
        forwards += 1


class DraftProposer:
    """A draft model proposing ``k`` greedy tokens; keeps its own cache in step with the sequence it is shown.

    With ``prefix_embeds`` (1, P, H) the draft's first P positions are those embeddings (the target's
    spliced prompt, modality features included) instead of token ids: a draft of the target's width
    then sees the image too.
    """

    def __init__(self, draft_llm, prefix_embeds: torch.Tensor | None = None, suppress: list[int] | None = None):
        self.runner = CausalRunner(draft_llm, suppress=suppress)
        self.cache = None
        self.cached: list[int] = []
        self.forwards = 0
        self.prefix_embeds = prefix_embeds
        self.prefix_len = 0 if prefix_embeds is None else prefix_embeds.shape[1]

    def __call__(self, sequence: list[int], k: int) -> list[int]:
        lcp = 0
        for a, b in zip(self.cached, sequence):
            if a != b:
                break
            lcp += 1
        lcp = min(lcp, len(sequence) - 1)  # feed at least the last token to get next-token logits
        if self.cache is None and self.prefix_len:
            _, self.cache, _ = self.runner.forward(None, embeds=self.prefix_embeds)
            self.forwards += 1
            self.cached = list(sequence[: self.prefix_len])
            lcp = min(self.prefix_len, len(sequence) - 1)
            if lcp < self.prefix_len:
                raise ValueError("the draft's embedded prefix is longer than the sequence")
        if self.cache is not None:
            if lcp < self.prefix_len:
                raise ValueError("the sequence no longer starts with the draft's embedded prefix")
            crop_cache(self.cache, lcp)
        logits, self.cache, _ = self.runner.forward(self.cache, ids=sequence[lcp:])
        self.forwards += 1
        self.cached = list(sequence)
        proposal = []
        for i in range(k):
            tok = greedy_token(logits[-1])
            proposal.append(tok)
            if i < k - 1:
                logits, self.cache, _ = self.runner.forward(self.cache, ids=[tok])
                self.forwards += 1
                self.cached.append(tok)
        return proposal


def draft_and_verify(runner: CausalRunner, logits: torch.Tensor, cache, context: list[int],
                     propose: Callable[[list[int], int], list[int]], k: int, max_new_tokens: int,
                     eos: int | None) -> DecodeResult:
    """Greedy speculative decoding: ``propose(sequence, k)`` guesses, the target checks all guesses in one forward.

    ``logits``/``cache`` come from the target's prefill of the prompt; ``context`` is the token sequence
    the proposer sees (the prompt without modality placeholders, for a text-only draft). The output
    equals greedy decoding of the target, token for token.
    """
    res = DecodeResult([])
    pending = greedy_token(logits)  # the next token, not yet fed to the target
    out = [pending]
    while True:
        out, done = _stop(out, eos, max_new_tokens)
        if done:
            res.tokens = out
            return res
        guess = propose(context + out, k)[: max(0, max_new_tokens - len(out))]
        past = cache.get_seq_length()
        step_logits, cache, _ = runner.forward(cache, ids=[pending] + guess)  # (1 + len(guess), V)
        res.forwards += 1
        n = 0
        while n < len(guess) and greedy_token(step_logits[n]) == guess[n]:
            n += 1
        res.proposed += len(guess)
        res.accepted += n
        correction = greedy_token(step_logits[n])
        crop_cache(cache, past + 1 + n)  # keep pending + accepted guesses
        out += guess[:n] + [correction]
        pending = correction


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


# ----------------------------------------------------------------------------- sessions with a prefix cache


class Session:
    """Questions about one set of modality inputs: encodes them once and reuses the shared prompt prefix's KV cache."""

    def __init__(self, model, processor, modalities: dict, base_dir=None):
        self.model, self.processor = model, processor
        self.runner = CausalRunner(model.llm, suppress=[mt.token_id for mt in model.modality_tokens.values()])
        self.record_modalities = modalities
        items = processor._modality_items({"modalities": modalities}, "<session>", base_dir)
        self.counts = {k: len(v) for k, v in items.items()}
        device = next(model.parameters()).device
        with torch.no_grad():
            self.features = {}
            for name, its in items.items():
                batch = processor.loaders[name].collate(its)
                x = batch["x"].to(device)
                mask = batch.get("mask")
                self.features[name] = model.encode_modality(
                    name, x.to(model.llm.dtype) if x.is_floating_point() else x,
                    None if mask is None else mask.to(device))  # (M, K, H)
        self.prefix_ids: list[int] = []
        self.prefix_cache = None
        self.encodes = 1

    def prompt_ids(self, question: str) -> list[int]:
        conv = [{"from": "human", "value": question}]
        return self.processor.encoder.encode_prompt(conv, self.counts, "<session>")

    def _embed(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor([ids], device=self.runner.embed_tokens.weight.device)
        return self.model.embed(t, features=self.features)  # (1, T, H)

    @torch.no_grad()
    def prefill(self, ids: list[int], use_cache: bool = True):
        """Logits of the prompt's last position and a cache holding the whole prompt; reuses the shared prefix."""
        emb = self._embed(ids)
        lcp = 0
        if use_cache and self.prefix_cache is not None:
            for a, b in zip(self.prefix_ids, ids):
                if a != b:
                    break
                lcp += 1
            lcp = min(lcp, len(ids) - 1)
        # Never let a modality span straddle the reuse boundary: a spliced feature block is all-or-nothing.
        cache = None
        if lcp > 0:
            cache = copy.deepcopy(self.prefix_cache)
            crop_cache(cache, lcp)
        logits, cache, _ = self.runner.forward(cache, embeds=emb[:, lcp:])
        if use_cache and (self.prefix_cache is None or lcp < len(self.prefix_ids)):
            self.prefix_ids, self.prefix_cache = list(ids), copy.deepcopy(cache)
        return logits[-1], cache, lcp

    def generate(self, question: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0, use_cache: bool = True,
                 on_token: Callable[[int], None] | None = None) -> DecodeResult:
        ids = self.prompt_ids(question)
        logits, cache, reused = self.prefill(ids, use_cache)
        g = torch.Generator().manual_seed(seed)

        def choose(lg, prev):
            lg = apply_repetition_penalty(lg, ids + prev, repetition_penalty)
            return sample_token(lg.cpu(), temperature, top_k, top_p, g)

        res = decode_loop(self.runner, logits, cache, choose, max_new_tokens, self.model.tokenizer.eos_token_id,
                          on_token)
        res.reused_prefix_tokens = reused
        return res

    @torch.no_grad()
    def closed_set(self, question: str, options: list[str]) -> dict:
        """Probability of each allowed answer (answer tokens + end of turn), normalised over the options."""
        if len(set(options)) != len(options) or not options:
            raise ValueError("closed-set answering needs distinct, non-empty options")
        ids = self.prompt_ids(question)
        logits, cache, reused = self.prefill(ids)
        eos = self.model.tokenizer.eos_token_id
        scores = []
        for opt in options:
            toks = self.model.tokenizer(opt, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            c = copy.deepcopy(cache)
            step_logits, _, _ = self.runner.forward(c, ids=toks[:-1]) if len(toks) > 1 else (None, None, None)
            all_logits = torch.cat([logits[None], step_logits]) if step_logits is not None else logits[None]
            lp = torch.log_softmax(all_logits, -1)
            scores.append(float(sum(lp[i, t] for i, t in enumerate(toks))))
        probs = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0).tolist()
        best = max(range(len(options)), key=lambda i: probs[i])
        return {"answer": options[best], "probs": dict(zip(options, probs)), "logprobs": dict(zip(options, scores)),
                "reused_prefix_tokens": reused}

    def contrastive_decoding(self, question: str, amateur_llm, alpha: float = 0.1, beta: float = 0.5,
                             max_new_tokens: int = 64) -> DecodeResult:
        """Expert = this model (with its modality tokens); amateur = a text-only LM fed the prompt without them."""
        ids = self.prompt_ids(question)
        logits, cache, reused = self.prefill(ids)
        placeholders = {mt.token_id for mt in self.model.modality_tokens.values()}
        amateur = CausalRunner(amateur_llm)
        a_logits, a_cache, _ = amateur.forward(None, ids=[t for t in ids if t not in placeholders])
        a_last = a_logits[-1]
        eos = self.model.tokenizer.eos_token_id
        out: list[int] = []
        while True:
            tok = greedy_token(contrastive_decoding_scores(logits, a_last, alpha, beta))
            out.append(tok)
            out, done = _stop(out, eos, max_new_tokens)
            if done:
                return DecodeResult(out, reused_prefix_tokens=reused, extra={"alpha": alpha, "beta": beta})
            lg, cache, _ = self.runner.forward(cache, ids=[tok])
            logits = lg[-1]
            al, a_cache, _ = amateur.forward(a_cache, ids=[tok])
            a_last = al[-1]

    def contrastive_search(self, question: str, penalty_alpha: float = 0.6, top_k: int = 4,
                           max_new_tokens: int = 64) -> DecodeResult:
        """Contrastive search (Su et al. 2022): model confidence minus degeneration penalty over top-k candidates."""
        ids = self.prompt_ids(question)
        emb = self._embed(ids)
        logits, cache, hidden = self.runner.forward(None, embeds=emb, hidden=True)
        context_h = hidden  # (T, H)
        last = logits[-1]
        eos = self.model.tokenizer.eos_token_id
        out: list[int] = []
        while True:
            probs = torch.softmax(last, -1)
            top_p, top_i = torch.topk(probs, top_k)
            cand_h, cand_logits = [], []
            for t in top_i.tolist():  # look one step ahead for each candidate
                c = copy.deepcopy(cache)
                lg, _, h = self.runner.forward(c, ids=[t], hidden=True)
                cand_h.append(h[-1])
                cand_logits.append(lg[-1])
            j = contrastive_search_select(top_p, torch.stack(cand_h), context_h, penalty_alpha)
            tok = int(top_i[j])
            out.append(tok)
            out, done = _stop(out, eos, max_new_tokens)
            if done:
                return DecodeResult(out, extra={"penalty_alpha": penalty_alpha, "top_k": top_k})
            _, cache, _ = self.runner.forward(cache, ids=[tok])
            context_h = torch.cat([context_h, cand_h[j][None]])
            last = cand_logits[j]

    def speculative(self, question: str, draft_llm=None, k: int = 4, max_new_tokens: int = 64,
                    prompt_lookup: bool = False, draft_sees_modalities: bool | None = None) -> DecodeResult:
        """Greedy speculative decoding with a draft sharing the tokenizer, or prompt lookup.

        A draft of the target's width is fed the target's spliced prompt embeddings (it sees the
        modality features); a narrower, text-only draft gets the prompt without placeholders.
        """
        ids = self.prompt_ids(question)
        logits, cache, reused = self.prefill(ids)
        placeholders = {mt.token_id for mt in self.model.modality_tokens.values()}
        # A draft can take the target's spliced embeddings when it has the target's width and vocabulary.
        same_width = draft_llm is not None and (
            draft_llm.get_input_embeddings().weight.shape == self.runner.embed_tokens.weight.shape)
        if draft_sees_modalities is None:
            draft_sees_modalities = same_width
        if draft_sees_modalities and not same_width:
            raise ValueError("a draft that sees the modality features needs the target's hidden size and vocabulary")
        context = ids if draft_sees_modalities else [t for t in ids if t not in placeholders]
        if prompt_lookup:
            propose = prompt_lookup_proposal
        elif draft_llm is not None:
            propose = DraftProposer(draft_llm, self._embed(ids) if draft_sees_modalities else None,
                                    suppress=sorted(placeholders) if draft_sees_modalities else None)
        else:
            raise ValueError("speculative decoding needs a draft model or prompt_lookup=True")
        res = draft_and_verify(self.runner, logits, cache, context, propose, k, max_new_tokens,
                               self.model.tokenizer.eos_token_id)
        res.reused_prefix_tokens = reused
        return res
