"""Sessions: questions about one set of modality inputs, encoded once, sharing the prompt prefix's KV cache.

:meth:`Session.decode` runs any registered strategy that has a loop step (:mod:`medmm.inference.strategies`)
in the one loop of :mod:`medmm.inference.loop`; :meth:`Session.closed_set` scores a fixed answer set.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import DecodingConfig
from ..errors import ConfigError
from .decoding import CausalRunner, DecodeResult, crop_cache
from .loop import LoopContext, run_loop
from .strategies import get_strategy, resolve


class Session:
    """Questions about one set of modality inputs: encodes them once and reuses the shared prompt prefix's KV cache."""

    def __init__(self, model, processor, modalities: dict, base_dir: Path | None = None):
        self.model, self.processor = model, processor
        self.placeholders = sorted(mt.token_id for mt in model.modality_tokens.values())
        self.runner = CausalRunner(model.llm, suppress=self.placeholders)
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

    @property
    def eos(self) -> int | None:
        return self.model.tokenizer.eos_token_id

    def prompt_ids(self, question: str | list[dict]) -> list[int]:
        """A question, or a conversation ending with a human turn (LLaVA records), -> prompt ids."""
        conv = [{"from": "human", "value": question}] if isinstance(question, str) else question
        return self.processor.encoder.encode_prompt(conv, self.counts, "<session>")

    def embed(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor([ids], device=self.runner.embed_tokens.weight.device)
        return self.model.embed(t, features=self.features)  # (1, T, H)

    _embed = embed

    @torch.no_grad()
    def prefill(self, ids: list[int], use_cache: bool = True, hidden: bool = False):
        """Logits of the prompt's last position, a cache holding the whole prompt, and the reused prefix length.

        With ``hidden`` the prompt is run whole (no reuse) and its last hidden states ``(T, H)`` come fourth.
        """
        emb = self.embed(ids)
        lcp = 0
        if use_cache and not hidden and self.prefix_cache is not None:
            for a, b in zip(self.prefix_ids, ids):
                if a != b:
                    break
                lcp += 1
            lcp = min(lcp, len(ids) - 1)
        cache = None
        if lcp > 0:
            cache = copy.deepcopy(self.prefix_cache)
            crop_cache(cache, lcp)
        logits, cache, h = self.runner.forward(cache, embeds=emb[:, lcp:], hidden=hidden)
        if use_cache and (self.prefix_cache is None or lcp < len(self.prefix_ids)):
            self.prefix_ids, self.prefix_cache = list(ids), copy.deepcopy(cache)
        if hidden:
            return logits[-1], cache, lcp, h
        return logits[-1], cache, lcp

    @torch.no_grad()
    def decode(self, question: str | list[dict], decoding: DecodingConfig, aux: dict | None = None,
               on_token: Callable[[int], None] | None = None, use_cache: bool = True) -> DecodeResult:
        """Answer with the registered strategy ``decoding.strategy`` in the one KV-cached loop.

        ``aux`` holds the loaded helper models the strategy names (``draft``, ``amateur``, ``value``).
        """
        s = get_strategy(decoding.strategy)
        params = resolve(decoding)
        if s.start is None:
            raise ConfigError(f"decoding.strategy={s.name} runs only through batched generate; it has no session "
                              "loop (several questions, streaming)")
        ids = self.prompt_ids(question)
        if s.needs_hidden:
            logits, cache, reused, h = self.prefill(ids, hidden=True)
        else:
            (logits, cache, reused), h = self.prefill(ids, use_cache), None
        ctx = LoopContext(self.runner, cache, logits, ids, decoding.max_new_tokens, self.eos,
                          torch.Generator().manual_seed(decoding.seed), prompt_hidden=h, session=self,
                          aux=dict(aux or {}))
        res = run_loop(ctx, s.start(ctx, params), on_token)
        res.reused_prefix_tokens = reused
        return res

    # ------------------------------------------------------------------ shorthands (one loop underneath)
    def generate(self, question, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0, use_cache: bool = True,
                 on_token: Callable[[int], None] | None = None) -> DecodeResult:
        """Greedy (temperature 0) or sampled decoding."""
        if temperature == 0:
            d = DecodingConfig("greedy", max_new_tokens, seed, {"repetition_penalty": repetition_penalty})
        else:
            d = DecodingConfig("sample", max_new_tokens, seed, {"temperature": temperature, "top_k": top_k,
                                                                "top_p": top_p, "repetition_penalty": repetition_penalty})
        return self.decode(question, d, on_token=on_token, use_cache=use_cache)

    def speculative(self, question, draft_llm=None, k: int = 4, max_new_tokens: int = 64,
                    prompt_lookup: bool = False, draft_sees_modalities: bool | None = None) -> DecodeResult:
        """Greedy speculative decoding with a draft model, or prompt lookup, in medmm's loop."""
        if prompt_lookup:
            d = DecodingConfig("prompt_lookup", max_new_tokens, params={"num_draft_tokens": k, "backend": "medmm"})
            return self.decode(question, d)
        if draft_llm is None:
            raise ValueError("speculative decoding needs a draft model or prompt_lookup=True")
        p = {"draft": "<loaded>", "num_draft_tokens": k, "backend": "medmm"}
        if draft_sees_modalities is not None:
            p["draft_sees_modalities"] = "yes" if draft_sees_modalities else "no"
        return self.decode(question, DecodingConfig("speculative", max_new_tokens, params=p), aux={"draft": draft_llm})

    def contrastive_decoding(self, question, amateur_llm, alpha: float = 0.1, beta: float = 0.5,
                             max_new_tokens: int = 64) -> DecodeResult:
        d = DecodingConfig("contrastive", max_new_tokens, params={"amateur": "<loaded>", "cd_alpha": alpha,
                                                                  "cd_beta": beta})
        return self.decode(question, d, aux={"amateur": amateur_llm})

    def contrastive_search(self, question, penalty_alpha: float = 0.6, top_k: int = 4,
                           max_new_tokens: int = 64) -> DecodeResult:
        d = DecodingConfig("contrastive_search", max_new_tokens, params={"penalty_alpha": penalty_alpha,
                                                                         "search_top_k": top_k})
        return self.decode(question, d)

    # ------------------------------------------------------------------ closed-set answering
    @torch.no_grad()
    def closed_set(self, question, options: list[str]) -> dict:
        """Probability of each allowed answer (answer tokens + end of turn), normalised over the options."""
        if len(set(options)) != len(options) or not options:
            raise ValueError("closed-set answering needs distinct, non-empty options")
        ids = self.prompt_ids(question)
        logits, cache, reused = self.prefill(ids)
        eos = self.eos
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
