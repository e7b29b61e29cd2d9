"""Load a medmm model folder and answer requests with Hugging Face ``generate``.

A request is a record ``{"id", "modalities": {name: value}, "question": str}`` or a conversation
record ending with a human turn. Batches are left-padded and grouped by prompt length; each output
records its decoding settings, timings and token counts, or the typed error of a failed request.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from ..config import DecodingConfig
from ..errors import InvalidInputError, ModalityMismatchError


def generation_kwargs(d: DecodingConfig) -> dict:
    """DecodingConfig -> ``generate`` keyword arguments. Temperature 0 means greedy."""
    kw: dict = {"max_new_tokens": d.max_new_tokens, "repetition_penalty": d.repetition_penalty}
    if d.no_repeat_ngram_size:
        kw["no_repeat_ngram_size"] = d.no_repeat_ngram_size
    if d.strategy == "greedy" or (d.strategy == "sample" and d.temperature == 0):
        kw.update(do_sample=False, num_beams=1)
    elif d.strategy == "beam":
        kw.update(do_sample=False, num_beams=d.num_beams, length_penalty=d.length_penalty, early_stopping=True)
    elif d.strategy == "sample":
        kw.update(do_sample=True, temperature=d.temperature, top_k=d.top_k, top_p=d.top_p)
    else:  # pragma: no cover - config Literal guards this
        raise ValueError(f"unknown decoding strategy {d.strategy}")
    return kw


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

    def _aux_model(self, path: str | None):
        """A draft/amateur text-only LM from a local folder (cached per path)."""
        from transformers import AutoModelForCausalLM

        if not path:
            return None
        cache = self.__dict__.setdefault("_aux", {})
        if path not in cache:
            cache[path] = AutoModelForCausalLM.from_pretrained(path, dtype=self.model.llm.dtype).to(self.device).eval()
        return cache[path]

    def session(self, modalities: dict, base_dir: Path | None = None):
        """A :class:`~medmm.inference.decoding.Session` over these inputs (encoded once, prefix KV reused)."""
        from .decoding import Session

        return Session(self.model, self.processor, modalities, base_dir)

    def ask(self, session, question: str, decoding: DecodingConfig, options: list[str] | None = None,
            on_token=None) -> dict:
        """One question in a session, with any strategy; ``options`` gives closed-set answering."""
        t0 = time.perf_counter()
        if options:
            res = session.closed_set(question, list(options))
            out = {"answer": res["answer"], "probs": res["probs"], "new_tokens": 0,
                   "reused_prefix_tokens": res["reused_prefix_tokens"]}
        else:
            d = decoding
            if d.strategy == "speculative":
                r = session.speculative(question, draft_llm=self._aux_model(d.draft), k=d.num_draft_tokens,
                                        max_new_tokens=d.max_new_tokens)
            elif d.strategy == "prompt_lookup":
                r = session.speculative(question, prompt_lookup=True, k=d.num_draft_tokens,
                                        max_new_tokens=d.max_new_tokens)
            elif d.strategy == "contrastive":
                r = session.contrastive_decoding(question, self._aux_model(d.amateur), d.cd_alpha, d.cd_beta,
                                                 d.max_new_tokens)
            elif d.strategy == "contrastive_search":
                r = session.contrastive_search(question, d.penalty_alpha, d.search_top_k, d.max_new_tokens)
            elif d.strategy in ("greedy", "sample"):
                temp = 0.0 if d.strategy == "greedy" else d.temperature
                r = session.generate(question, d.max_new_tokens, temp, d.top_k, d.top_p, d.repetition_penalty,
                                     d.seed, on_token=on_token)
            else:
                raise ValueError(f"strategy '{d.strategy}' runs through batched generate, not a session")
            out = {"answer": self.tokenizer.decode(r.tokens, skip_special_tokens=True).strip(),
                   "new_tokens": len(r.tokens), "reused_prefix_tokens": r.reused_prefix_tokens}
            if r.proposed:
                out["acceptance_rate"] = round(r.acceptance_rate, 4)
                out["target_forwards"] = r.forwards
        out["timing_s"] = {"generate": round(time.perf_counter() - t0, 4)}
        out["decoding"] = dataclasses.asdict(decoding)
        return out

    def predict(self, requests: list[dict], decoding: DecodingConfig | None = None, batch_size: int = 8,
                base_dir: Path | None = None) -> list[dict]:
        """One output per request, in input order. Failed requests carry ``error``; nothing is dropped.

        Requests with ``options`` (closed-set) or ``questions`` (several questions, prefix-cached), and the
        medmm strategies (speculative, prompt_lookup, contrastive, contrastive_search), run one by one
        through a session; the rest are batched through HF ``generate``.
        """
        decoding = decoding or DecodingConfig()
        outputs: list[dict | None] = [None] * len(requests)
        ready = []
        for i, req in enumerate(requests):
            source = f"request {i} (id={req.get('id')})"
            if decoding.strategy in SESSION_STRATEGIES or req.get("options") or req.get("questions"):
                outputs[i] = self._predict_in_session(req, decoding, base_dir, source)
                continue
            try:
                t0 = time.perf_counter()
                sample = self.processor.process_prompt(self.to_conversation(req), base_dir, source)
                ready.append((i, sample, time.perf_counter() - t0))
            except (InvalidInputError, ModalityMismatchError) as e:
                outputs[i] = {"id": req.get("id"), "error": type(e).__name__, "message": str(e)}
        kwargs = generation_kwargs(decoding) if ready else {}
        ready.sort(key=lambda r: r[1]["input_ids"].shape[0])  # group by length: less padding
        settings = dataclasses.asdict(decoding)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ready), desc="generate", unit="req", disable=len(ready) <= batch_size, leave=False)
        for start in range(0, len(ready), batch_size):
            chunk = ready[start: start + batch_size]
            batch = self.processor.collate([s for _, s, _ in chunk], padding_side="left")
            batch = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else
                         {n: {kk: (vv.to(self.device) if isinstance(vv, torch.Tensor) else vv) for kk, vv in d.items()}
                          for n, d in v.items()}) for k, v in batch.items()}
            if decoding.strategy == "sample":
                torch.manual_seed(decoding.seed)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            new = self.model.generate(batch["input_ids"], batch["attention_mask"], batch["modality_inputs"], **kwargs)
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
                    "decoding": settings,
                    "checkpoint": self.checkpoint,
                }
            bar.update(len(chunk))
        bar.close()
        return outputs  # type: ignore[return-value]


    def _predict_in_session(self, req: dict, decoding: DecodingConfig, base_dir, source: str) -> dict:
        try:
            sess = self.session(req.get("modalities") or {}, base_dir)
            questions = req.get("questions") or [req.get("question")]
            if not all(isinstance(q, str) and q for q in questions):
                raise InvalidInputError(source, "a request needs 'question' or a list of 'questions'")
            answers = [self.ask(sess, q, decoding, req.get("options")) for q in questions]
        except (InvalidInputError, ModalityMismatchError) as e:
            return {"id": req.get("id"), "error": type(e).__name__, "message": str(e)}
        if req.get("questions"):
            return {"id": req.get("id"), "answers": [{"question": q, **a} for q, a in zip(questions, answers)],
                    "checkpoint": self.checkpoint}
        return {"id": req.get("id"), **answers[0], "checkpoint": self.checkpoint}


SESSION_STRATEGIES = {"speculative", "prompt_lookup", "contrastive", "contrastive_search"}


def _strip_length(ids: list[int], pad: int | None, eos: int | None) -> int:
    """Number of generated tokens before padding/eos."""
    for j, t in enumerate(ids):
        if t == eos:
            return j
    n = len(ids)
    while n and ids[n - 1] == pad:
        n -= 1
    return n
