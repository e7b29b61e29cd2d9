"""Load a medmm model folder and answer requests with any registered decoding strategy.

A request is a record ``{"id", "modalities": {name: value}, "question": str}`` or a conversation
record (LLaVA ``conversations``) ending with a human turn (a final gpt turn is dropped as the
reference); ``options`` asks for closed-set answering and ``questions`` for several questions about one
input. Where Hugging Face ``generate`` runs the strategy (:attr:`Strategy.hf`), requests are batched,
left-padded and grouped by prompt length; sessions, closed sets and the strategies HF lacks run in
medmm's KV-cached loop (:mod:`medmm.inference.loop`). Each output records its decoding settings, the
engine that ran it, timings and token counts, or the typed error of a failed request.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..config import DecodingConfig
from ..errors import ConfigError, InvalidInputError, ModalityMismatchError
from .strategies import Strategy, get_strategy, resolve


def generation_kwargs(d: DecodingConfig, aux: dict | None = None) -> dict:
    """DecodingConfig -> ``generate`` keyword arguments, from the strategy's registry entry."""
    s = get_strategy(d.strategy)
    if s.hf is None:
        raise ConfigError(f"decoding.strategy={s.name} does not run through Hugging Face generate")
    return {"max_new_tokens": d.max_new_tokens, **s.hf(resolve(d), aux or {})}


def settings(d: DecodingConfig) -> dict:
    """The decoding record written beside each answer: strategy, limits and every resolved setting."""
    return {"strategy": d.strategy, "max_new_tokens": d.max_new_tokens, "seed": d.seed, "params": resolve(d)}


def closed_set_check(d: DecodingConfig) -> None:
    """Closed-set answering scores the options; it cannot honour a decoding strategy's settings."""
    if d.strategy != "greedy" or d.params:
        raise ConfigError(f"options (closed-set answering) score each allowed answer; decoding.strategy={d.strategy} "
                          f"{'with ' + ', '.join(d.params) if d.params else ''} does not apply to them")


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda when present, else cpu; asking for cuda without a device is an error, not a fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' was asked for, but no CUDA device is available")
    return torch.device(device)


class Predictor:
    """A loaded model plus its processor; ``predict`` runs batches of requests."""

    def __init__(self, checkpoint: str | Path, device: str = "auto", max_length: int = 2048,
                 dtype: torch.dtype | None = None):
        from ..model.multimodal import MedMMForCausalLM

        self.device = pick_device(device)
        if dtype is None and self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16
        self.checkpoint = str(checkpoint)
        self.model = MedMMForCausalLM.from_pretrained(checkpoint, merge_lora=True, dtype=dtype).to(self.device).eval()
        self.processor = self.model.processor(max_length)
        self.tokenizer = self.model.tokenizer

    @staticmethod
    def to_conversation(request: dict) -> dict:
        """Accept ``question`` shorthand or full ``conversations`` (a final gpt turn is dropped as reference)."""
        if "conversations" in request:
            conv = list(request["conversations"])
            if conv and str(conv[-1].get("from", "")).lower() in ("gpt", "assistant"):
                conv = conv[:-1]
        elif "question" in request:
            conv = [{"from": "human", "value": str(request["question"])}]
        else:
            raise InvalidInputError(str(request.get("id", "<request>")), "a request needs 'question' or 'conversations'")
        return {"id": request.get("id"), "modalities": request.get("modalities") or {}, "conversations": conv}

    def load_helpers(self, helpers: Mapping[str, str | Path]) -> None:
        """Make helper models (draft, amateur) available by NAME: ``{name: local folder}``, each loaded now, once.

        A server (the HTTP API's ``--helper-model NAME=PATH`` allow-list) lets requests name only these; a
        strategy's ``draft``/``amateur`` setting equal to a name then takes that model, and nothing is loaded later.

        Raises:
            ConfigError: a folder does not exist, or a name is given another folder than before.
        """
        names = self.__dict__.setdefault("_helper_names", {})
        for name, path in helpers.items():
            real = os.path.realpath(path)
            if names.get(name, real) != real:
                raise ConfigError(f"helper model '{name}' already names another folder")
            if not Path(real).is_dir():
                raise ConfigError(f"helper model '{name}': {path} is not a folder")
            names[name] = real
            self._aux_model(name)

    def _aux_model(self, path: str, match_vocab: bool = False, quantize: str = "none"):
        """A draft/amateur LM from a local folder, or by a name :meth:`load_helpers` gave it. Loaded from disk once
        per real path (spellings of one folder, symlinks included, share it) and cached; ``match_vocab`` pads its
        vocabulary to the target's (HF's assistant path compares the two; the added rows are modality placeholders,
        never accepted); ``quantize="int8"`` gives a draft dynamic int8 linear layers (:func:`~.decoding.quantize_draft`).
        Both are made in memory from the loaded model."""
        cache = self.__dict__.setdefault("_aux", {})
        real = self.__dict__.get("_helper_names", {}).get(path) or os.path.realpath(path)
        key = (real, match_vocab, quantize)
        if key in cache:
            return cache[key]
        if quantize == "int8":  # an int8 copy of the float model (which stays cached for HF's assistant path)
            from .decoding import quantize_draft

            cache[key] = quantize_draft(self._aux_model(real, match_vocab))
        elif match_vocab:
            m = self._aux_model(real)
            n = self.model.llm.get_input_embeddings().weight.shape[0]
            if m.get_input_embeddings().weight.shape[0] < n:
                m = copy.deepcopy(m)
                m.resize_token_embeddings(n, mean_resizing=False)
            cache[key] = m
        else:
            from transformers import AutoModelForCausalLM

            if not Path(real).is_dir():
                raise ConfigError(f"{path}: the helper model folder does not exist")
            cache[key] = AutoModelForCausalLM.from_pretrained(real, dtype=self.model.llm.dtype).to(self.device).eval()
        return cache[key]

    def aux_models(self, strategy: Strategy, params: dict, for_hf: bool = False) -> dict:
        """The helper models a strategy names (``draft``, ``amateur``), loaded."""
        return {name: self._aux_model(params[name], match_vocab=for_hf,
                                      quantize=params.get("draft_quantize", "none") if name == "draft" else "none")
                for name in strategy.aux_models}

    def encoder_inputs(self, request: dict, base_dir: Path | None = None) -> dict[str, np.ndarray]:
        """The arrays this request hands each encoder: ``{modality key: x}``, ``x`` as collated for the encoder
        ``(M, ...)`` (M = the request's inputs of that modality), float32 before any cast to the model's dtype.

        The same loaders and collation as :meth:`predict` and sessions, so ``infer.py --dump-inputs`` shows
        exactly what the model saw (for parity checks against the training loader).
        """
        sample = self.processor.process_prompt(self.to_conversation(request), base_dir, str(request.get("id")))
        inputs = self.processor.collate([sample], padding_side="left")["modality_inputs"]
        return {name: inp["x"].detach().cpu().numpy() for name, inp in inputs.items()}

    def session(self, modalities: dict, base_dir: Path | None = None):
        """A :class:`~medmm.inference.session.Session` over these inputs (encoded once, prefix KV reused)."""
        from .session import Session

        return Session(self.model, self.processor, modalities, base_dir)

    def ask(self, session, question: str | list[dict], decoding: DecodingConfig, options: list[str] | None = None,
            on_token=None) -> dict:
        """One question (or conversation) in a session, with any strategy that has a loop step; ``options`` gives
        closed-set answering."""
        t0 = time.perf_counter()
        if options:
            closed_set_check(decoding)
            res = session.closed_set(question, list(options))
            out = {"answer": res["answer"], "probs": res["probs"], "new_tokens": 0,
                   "reused_prefix_tokens": res["reused_prefix_tokens"], "engine": "closed_set"}
        else:
            s = get_strategy(decoding.strategy)
            params = resolve(decoding)
            if params.get("backend") == "hf":
                raise ConfigError(f"decoding.strategy={s.name} with backend=hf cannot run in a session "
                                  "(modality inputs, several questions or streaming); use backend=auto or medmm")
            r = session.decode(question, decoding, self.aux_models(s, params), on_token=on_token)
            out = {"answer": self.tokenizer.decode(r.tokens, skip_special_tokens=True).strip(),
                   "new_tokens": len(r.tokens), "reused_prefix_tokens": r.reused_prefix_tokens, "engine": "loop"}
            if r.proposed:
                out["acceptance_rate"] = round(r.acceptance_rate, 4)
                out["target_forwards"] = r.forwards
        out["timing_s"] = {"generate": round(time.perf_counter() - t0, 4)}
        out["decoding"] = settings(decoding)
        return out

    def route(self, req: dict, strategy: Strategy, params: dict) -> str:
        """``hf`` (batched ``generate``) or ``loop`` (a session) for one request; ConfigError when neither can."""
        wants_session = bool(req.get("options") or req.get("questions"))
        has_modalities = bool(req.get("modalities"))
        backend = params.get("backend", "auto")
        if wants_session:
            if req.get("options"):
                return "loop"  # closed set: checked in ask()
            if strategy.start is None:
                raise ConfigError(f"decoding.strategy={strategy.name} has no session loop; several questions need "
                                  "a strategy that has one")
            return "loop"
        loop_only = [p.name for p in strategy.params if p.loop_only and params.get(p.name, p.default) != p.default]
        if backend == "hf" and loop_only:
            raise ConfigError(f"decoding.strategy={strategy.name} backend=hf: Hugging Face generate cannot honour "
                              f"{', '.join(loop_only)}; use backend=auto or medmm")
        hf_ok = (strategy.hf is not None and not (strategy.hf_text_only and has_modalities) and backend != "medmm"
                 and not loop_only)
        if backend == "hf" and not hf_ok:
            raise ConfigError(f"decoding.strategy={strategy.name} backend=hf: Hugging Face generate cannot take this "
                              "request's modality inputs on this path; use backend=auto or medmm")
        if hf_ok:
            return "hf"
        if strategy.start is None:
            raise ConfigError(f"decoding.strategy={strategy.name} runs through Hugging Face generate only, which "
                              "cannot take modality inputs for it; send a text-only request")
        return "loop"

    def predict(self, requests: list[dict], decoding: DecodingConfig | None = None, batch_size: int = 8,
                base_dir: Path | None = None) -> list[dict]:
        """One output per request, in input order. Failed requests carry ``error``; nothing is dropped.

        The strategy and its settings are checked first (a ConfigError for the whole call); a request the
        strategy cannot serve (e.g. beam search with several questions) gets a ConfigError record.
        """
        decoding = decoding or DecodingConfig()
        strategy = get_strategy(decoding.strategy)
        params = resolve(decoding)
        outputs: list[dict | None] = [None] * len(requests)
        ready = []
        for i, req in enumerate(requests):
            source = f"request {i} (id={req.get('id')})"
            try:
                route = self.route(req, strategy, params)
                if route == "loop":
                    outputs[i] = self._predict_in_session(req, decoding, base_dir, source)
                    continue
                t0 = time.perf_counter()
                sample = self.processor.process_prompt(self.to_conversation(req), base_dir, source)
                ready.append((i, sample, time.perf_counter() - t0))
            except (InvalidInputError, ModalityMismatchError, ConfigError) as e:
                outputs[i] = {"id": req.get("id"), "error": type(e).__name__, "message": str(e)}
        if ready:
            self._generate_batches(requests, ready, outputs, decoding, strategy, params,
                                   batch_size if strategy.hf_batch else 1)
        return outputs  # type: ignore[return-value]

    def _generate_batches(self, requests, ready, outputs, decoding, strategy, params, batch_size) -> None:
        kwargs = {"max_new_tokens": decoding.max_new_tokens,
                  **strategy.hf(params, self.aux_models(strategy, params, for_hf=True))}
        ready.sort(key=lambda r: r[1]["input_ids"].shape[0])  # group by length: less padding
        record = settings(decoding)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ready), desc="generate", unit="req", disable=len(ready) <= batch_size, leave=False)
        for start in range(0, len(ready), batch_size):
            chunk = ready[start: start + batch_size]
            batch = self.processor.collate([s for _, s, _ in chunk], padding_side="left")
            batch = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else
                         {n: {kk: (vv.to(self.device) if isinstance(vv, torch.Tensor) else vv) for kk, vv in d.items()}
                          for n, d in v.items()}) for k, v in batch.items()}
            torch.manual_seed(decoding.seed)  # sampling strategies: the same seed gives the same answers
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            new = self._generate(batch, kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            for row, (i, sample, prep_s) in enumerate(chunk):
                ids = new[row].tolist()
                n_new = _strip_length(ids, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
                text = self.tokenizer.decode(ids[:n_new], skip_special_tokens=True).strip()
                outputs[i] = {
                    "id": requests[i].get("id"),
                    "answer": text,
                    "prompt_tokens": int(sample["input_ids"].shape[0]),
                    "new_tokens": n_new,
                    "timing_s": {"preprocess": round(prep_s, 4), "generate_batch": round(dt, 4)},
                    "batch_size": len(chunk),
                    "engine": "hf",
                    "decoding": record,
                    "checkpoint": self.checkpoint,
                }
            bar.update(len(chunk))
        bar.close()

    def _generate(self, batch: dict, kwargs: dict) -> torch.Tensor:
        """New tokens ``(B, new)``; a batch without modality inputs goes to the LLM as ids (HF's prompt-lookup
        and assistant paths need ids, and text-only embeddings are just the ids' embeddings)."""
        if batch["modality_inputs"]:
            return self.model.generate(batch["input_ids"], batch["attention_mask"], batch["modality_inputs"], **kwargs)
        ids = batch["input_ids"]
        kw = {"pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": self.tokenizer.eos_token_id,
              "suppress_tokens": [mt.token_id for mt in self.model.modality_tokens.values()], **kwargs}
        return self.model.llm.generate(input_ids=ids, attention_mask=batch["attention_mask"], **kw)[:, ids.shape[1]:]

    def _predict_in_session(self, req: dict, decoding: DecodingConfig, base_dir, source: str) -> dict:
        try:
            sess = self.session(req.get("modalities") or {}, base_dir)
            if req.get("questions"):
                questions = req["questions"]
                if not isinstance(questions, list) or not all(isinstance(q, str) and q for q in questions):
                    raise InvalidInputError(source, "'questions' must be a list of non-empty strings")
                prompts: list = list(questions)
            else:
                prompts = [self.to_conversation(req)["conversations"]]
            answers = [self.ask(sess, q, decoding, req.get("options")) for q in prompts]
        except (InvalidInputError, ModalityMismatchError, ConfigError) as e:
            return {"id": req.get("id"), "error": type(e).__name__, "message": str(e)}
        if req.get("questions"):
            return {"id": req.get("id"), "answers": [{"question": q, **a} for q, a in zip(req["questions"], answers)],
                    "checkpoint": self.checkpoint}
        return {"id": req.get("id"), **answers[0], "checkpoint": self.checkpoint}


def _strip_length(ids: list[int], pad: int | None, eos: int | None) -> int:
    """Number of generated tokens before padding/eos."""
    for j, t in enumerate(ids):
        if t == eos:
            return j
    n = len(ids)
    while n and ids[n - 1] == pad:
        n -= 1
    return n
