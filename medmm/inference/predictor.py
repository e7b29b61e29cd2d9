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
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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

    def predict(self, requests: list[dict], decoding: DecodingConfig | None = None, batch_size: int = 8,
                base_dir: Path | None = None) -> list[dict]:
        """One output per request, in input order. Failed requests carry ``error``; nothing is dropped."""
        decoding = decoding or DecodingConfig()
        kwargs = generation_kwargs(decoding)
        outputs: list[dict | None] = [None] * len(requests)
        ready = []
        for i, req in enumerate(requests):
            source = f"request {i} (id={req.get('id')})"
            try:
                t0 = time.perf_counter()
                sample = self.processor.process_prompt(self.to_conversation(req), base_dir, source)
                ready.append((i, sample, time.perf_counter() - t0))
            except (InvalidInputError, ModalityMismatchError) as e:
                outputs[i] = {"id": req.get("id"), "error": type(e).__name__, "message": str(e)}
        ready.sort(key=lambda r: r[1]["input_ids"].shape[0])  # group by length: less padding
        settings = dataclasses.asdict(decoding)
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
        return outputs  # type: ignore[return-value]


def _strip_length(ids: list[int], pad: int | None, eos: int | None) -> int:
    """Number of generated tokens before padding/eos."""
    for j, t in enumerate(ids):
        if t == eos:
            return j
    n = len(ids)
    while n and ids[n - 1] == pad:
        n -= 1
    return n
