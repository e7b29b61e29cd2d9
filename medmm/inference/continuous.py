"""Continuous batching for text-only greedy requests: Hugging Face's manager on the wrapped causal LM.

:class:`ContinuousDecoder` keeps one long-lived ``ContinuousBatchingManager``
(``llm.init_continuous_batching``, transformers' paged KV cache) on a :class:`~medmm.inference.predictor.Predictor`'s
LLM. A request joins the running batch as soon as it is submitted and leaves when it ends (end of turn or
``max_new_tokens``), so short answers do not wait for long ones as they do in a static ``generate`` batch.

It serves exactly what it can reproduce: a request without modality inputs, options or several questions, whose
strategy resolves to plain greedy ``generate`` (``greedy`` without repetition penalty or n-gram ban, ``sample`` at
temperature 0). Its prompt is built by the Predictor's processor and its answer cut and decoded as
:meth:`Predictor.predict` does, so both give the same answer. :meth:`ContinuousDecoder.eligible` says why a request
is not served (the caller sends it elsewhere, e.g. the HTTP API's static window batcher); a request whose prompt
plus ``max_new_tokens`` exceeds the per-request cache budget is handed back too (:meth:`submit` returns None).

Sizes are explicit (``num_blocks`` = ``max_running`` x ``max_tokens`` / ``page_size``): left to itself HF sizes the
cache to the device's memory (on CPU, to system RAM: about 17 s to start). The manager's loop runs in a daemon
thread (it is started from one), :meth:`close` stops it, and :meth:`exclusive` pauses it while another caller uses
the model. A request that fails in the manager (a failed forward fails every request in that step, and a fatal
error stops the loop) is decoded again alone by :meth:`Predictor.predict`, so only the request that really fails
fails; a stopped loop is restarted for the next request.

    dec = ContinuousDecoder(predictor, max_running=8)
    out = dec.submit({"id": "q1", "question": "What is the modality?"}, DecodingConfig(max_new_tokens=32))
    dec.close()
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import threading
import time

import torch

from ..config import DecodingConfig
from ..errors import ConfigError, InvalidInputError, ModalityMismatchError
from .predictor import _strip_length, settings
from .strategies import get_strategy, resolve

log = logging.getLogger("medmm.continuous")
# generate kwargs that plain greedy decoding sets; anything else needs a logits processor or a search that
# HF's continuous batching does not run the way generate does (repetition penalty, n-gram ban, sampling, beams).
_PLAIN_GREEDY = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0}
_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3")


class ContinuousDecoder:
    """One HF continuous-batching manager over ``predictor.model.llm`` (see the module docstring).

    Args:
        predictor: the loaded :class:`~medmm.inference.predictor.Predictor`.
        max_running: requests decoded together at most; more wait for a free slot.
        max_tokens: prompt plus new tokens of one request at most (the cache budget per request).
        page_size: tokens per KV-cache page.
        max_batch_tokens: tokens per forward step (prefill chunks and decode tokens together).
        lock: the lock every other user of the model holds (:meth:`exclusive` takes it and pauses the loop).

    Raises:
        ConfigError: the model cannot be served this way (no HF continuous batching for its LLM, or an attention
            implementation it would have to switch under the other paths' feet).
    """

    def __init__(self, predictor, max_running: int = 8, max_tokens: int = 2048, page_size: int = 64,
                 max_batch_tokens: int | None = None, lock: threading.Lock | None = None):
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.predictor = predictor
        llm = predictor.model.llm
        if not hasattr(llm, "init_continuous_batching"):
            raise ConfigError(f"{predictor.checkpoint}: the LLM ({type(llm).__name__}) has no Hugging Face "
                              "continuous batching")
        attn = getattr(llm.config, "_attn_implementation", None)
        if attn not in _ATTENTION:
            raise ConfigError(f"{predictor.checkpoint}: continuous batching would switch the LLM's attention from "
                              f"{attn} to a paged one while other requests use it; load it with sdpa or flash")
        self.llm = llm
        self.max_running, self.max_tokens = max(1, max_running), max(16, max_tokens)
        tok = predictor.tokenizer
        self.eos, self.pad = tok.eos_token_id, tok.pad_token_id
        # The same generation settings as Predictor._generate for a text-only batch (eos, pad, modality
        # placeholders never generated), on top of the LLM's own generation config as generate merges them.
        gen = copy.deepcopy(llm.generation_config)
        gen.update(**_PLAIN_GREEDY, pad_token_id=self.pad, eos_token_id=self.eos, max_new_tokens=64,
                   suppress_tokens=[mt.token_id for mt in predictor.model.modality_tokens.values()] or None)
        pages = -(-self.max_tokens // page_size)
        self.cb_config = ContinuousBatchingConfig(
            num_blocks=self.max_running * pages + 1, page_size=page_size,
            max_batch_tokens=max_batch_tokens or max(256, 64 * self.max_running),
            max_requests_per_batch=self.max_running, auto_switch_to_flash=False,
            use_cuda_graph=None if predictor.device.type == "cuda" else False)
        self.gen = gen
        self._slots = threading.BoundedSemaphore(self.max_running)
        self.lock = lock or threading.Lock()
        self._lock = threading.Lock()  # the bookkeeping below
        self._restart = threading.Lock()
        self._waiting: dict[str, tuple[threading.Event, dict, object]] = {}
        self._ids = itertools.count()
        self._closed = False
        self.running = 0
        """Requests in the manager now."""
        self.running_together: list[int] = []
        """For each served request, the most requests it shared the running batch with (itself included)."""
        self.retried = 0
        """Requests the manager failed and :meth:`Predictor.predict` decoded again alone."""
        self._peak: dict[str, int] = {}
        self.manager = None
        try:
            self._start()
        except (ValueError, TypeError, AttributeError, NotImplementedError, RuntimeError) as e:
            raise ConfigError(f"{predictor.checkpoint}: Hugging Face continuous batching cannot run this LLM "
                              f"({type(llm).__name__}): {e}") from e
        self._check_processors()

    # ------------------------------------------------------------------------------------------- the manager
    def _start(self) -> None:
        """A fresh manager, its loop started from a daemon thread (the loop thread inherits daemon status, so an
        unclosed decoder never keeps the interpreter alive), and a collector thread that hands results out."""
        mgr = self.llm.init_continuous_batching(generation_config=self.gen,
                                               continuous_batching_config=self.cb_config)
        started = threading.Event()
        box: dict = {}

        def collect():
            try:
                with torch.inference_mode():
                    mgr.start()
            except Exception as e:  # noqa: BLE001 - raised again by _start in the caller's thread
                box["error"] = e
                return
            finally:
                started.set()
            while True:
                res = mgr.get_result(timeout=0.1)
                if res is not None:
                    self._deliver(res)
                elif not mgr.is_running():
                    self._fail_waiting(mgr)
                    return

        self.manager = mgr
        self._collector = threading.Thread(target=collect, name="medmm-continuous-collector", daemon=True)
        self._collector.start()
        started.wait()
        if "error" in box:
            raise box["error"]

    def _check_processors(self) -> None:
        """HF drops logits processors it cannot batch; any processor besides the placeholder ban would make the
        answers differ from generate's, so the decoder refuses to serve rather than serve something else."""
        from transformers.generation.logits_process import SuppressTokensLogitsProcessor

        procs = self.manager.logit_processor.logits_processor
        other = [type(p).__name__ for p in procs if not isinstance(p, SuppressTokensLogitsProcessor)]
        if other or (self.gen.suppress_tokens and not procs):
            self.close()
            raise ConfigError(f"{self.predictor.checkpoint}: the LLM's generation config adds logits processors "
                              f"({', '.join(other) or 'placeholder ban dropped'}) that continuous batching does not "
                              "apply as generate does")

    def _deliver(self, res) -> None:
        with self._lock:
            entry = self._waiting.pop(res.request_id, None)
        if entry is not None:
            entry[1]["result"] = res
            entry[0].set()

    def _fail_waiting(self, mgr) -> None:
        """The loop is gone: every request still waiting on it is handed back (and decoded again alone)."""
        with self._lock:
            gone = [rid for rid, (_, _, m) in self._waiting.items() if m is mgr]
            entries = [self._waiting.pop(rid) for rid in gone]
        for done, slot, _ in entries:
            slot["error"] = "the continuous batching loop stopped"
            done.set()

    def _alive(self) -> bool:
        return self.manager is not None and self.manager.is_running()

    @contextlib.contextmanager
    def exclusive(self):
        """Hold :attr:`lock` and pause the manager's loop (its cache and running requests are kept) while the caller
        uses the model."""
        with self.lock:
            mgr = self.manager
            paused = None
            if mgr is not None and mgr.is_running():
                paused = mgr.pause()
                try:
                    paused.__enter__()
                except RuntimeError:  # the loop stopped meanwhile: nothing to pause
                    paused = None
            try:
                yield
            finally:
                if paused is not None:
                    paused.__exit__(None, None, None)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the loop (finishing the requests in it) and release the cache; submit() then refuses."""
        self._closed = True
        mgr, self.manager = self.manager, None
        if mgr is not None and mgr.is_running():
            mgr.stop(block=True, timeout=timeout)

    # ------------------------------------------------------------------------------------------- requests
    def eligible(self, request: dict, decoding: DecodingConfig) -> str | None:
        """None when this decoder reproduces ``Predictor.predict`` for the request; else why it does not."""
        if self._closed:
            return "continuous batching is closed"
        if request.get("modalities"):
            return "modality inputs"
        if request.get("options") or request.get("questions"):
            return "closed set or several questions (a session)"
        try:
            strategy = get_strategy(decoding.strategy)
            params = resolve(decoding)
        except ConfigError as e:
            return str(e)
        if strategy.hf is None or strategy.aux_models or not strategy.hf_batch:
            return f"strategy {strategy.name} is not plain batched generate"
        if params.get("backend", "auto") == "medmm":
            return "backend=medmm asks for medmm's loop"
        kwargs = strategy.hf(params, {})
        if any(kwargs.get(k, v) != v for k, v in _PLAIN_GREEDY.items()) or set(kwargs) - set(_PLAIN_GREEDY):
            return f"strategy {strategy.name} with these settings is not plain greedy"
        return None

    def submit(self, request: dict, decoding: DecodingConfig, timeout: float | None = None) -> dict | None:
        """Decode one request in the running batch; blocks until its answer is ready (thread-safe).

        Returns:
            The output record :meth:`Predictor.predict` gives (``engine`` ``hf_continuous``), an error record for a
            request that cannot be read (``error``/``message``), or None when the request is not for this decoder
            (:meth:`eligible` says no, or its prompt plus ``max_new_tokens`` exceeds ``max_tokens``).
        """
        if self.eligible(request, decoding) is not None:
            return None
        p = self.predictor
        t0 = time.perf_counter()
        try:
            sample = p.processor.process_prompt(p.to_conversation(request), None, f"request (id={request.get('id')})")
        except (InvalidInputError, ModalityMismatchError, ConfigError) as e:
            return {"id": request.get("id"), "error": type(e).__name__, "message": str(e)}
        ids = sample["input_ids"].tolist()
        if len(ids) + decoding.max_new_tokens > self.max_tokens:
            return None
        prep_s = time.perf_counter() - t0
        with self._slots:
            res, dt, together = self._run(ids, decoding.max_new_tokens, timeout)
        if res is None:  # the manager failed this request (or its whole step): decode it again alone
            self.retried += 1
            with self.exclusive():
                return p.predict([request], decoding, batch_size=1)[0]
        new = list(res.generated_tokens)
        n_new = _strip_length(new, self.pad, self.eos)
        self.running_together.append(together)
        return {"id": request.get("id"),
                "answer": p.tokenizer.decode(new[:n_new], skip_special_tokens=True).strip(),
                "prompt_tokens": len(ids), "new_tokens": n_new,
                "timing_s": {"preprocess": round(prep_s, 4), "generate": round(dt, 4)},
                "running_together": together, "engine": "hf_continuous", "decoding": settings(decoding),
                "checkpoint": p.checkpoint}

    def _run(self, ids: list[int], max_new: int, timeout: float | None):
        """(result or None when it failed, seconds, most requests running together) for one admitted request."""
        from transformers.generation.continuous_batching.requests import RequestStatus

        if not self._alive():
            with self._restart:
                if self._closed:
                    raise RuntimeError("continuous batching is closed")
                if not self._alive():
                    log.warning("the continuous batching loop had stopped; starting a new one")
                    self._start()
        with self._lock:
            mgr = self.manager
            rid = f"medmm-{next(self._ids)}"
            done, slot = threading.Event(), {}
            self._waiting[rid] = (done, slot, mgr)
            self.running += 1
            self._peak[rid] = self.running
            for k in self._peak:  # everyone in the batch now runs with this many
                self._peak[k] = max(self._peak[k], self.running)
        t0 = time.perf_counter()
        try:
            if mgr.add_request(ids, request_id=rid, max_new_tokens=max_new) is None:
                slot["error"] = "the continuous batching loop refused the request (stopping)"
            elif not done.wait(timeout):
                mgr.cancel_request(rid)
                raise TimeoutError(f"continuous batching: no answer within {timeout} s")
        finally:
            with self._lock:
                self._waiting.pop(rid, None)
                self.running -= 1
                together = self._peak.pop(rid)
        res = slot.get("result")
        if res is None or res.status != RequestStatus.FINISHED:
            why = slot.get("error") or (res.error if res is not None else "no result")
            log.warning("continuous batching failed a request (%s); decoding it again alone", why)
            return None, time.perf_counter() - t0, together
        return res, time.perf_counter() - t0, together
