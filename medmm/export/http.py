"""``medmm pacs http``: a small HTTP API for the same job (FastAPI + uvicorn).

    GET  /v1/health            liveness and the model's identity (no token)
    POST /v1/studies/report    multipart: one study's DICOM files (+ ``question``) -> report JSON,
                               or the DICOM SR itself with ``?format=sr`` (application/dicom)
    POST /v1/ask               JSON {question, modalities: {name: SMILES or DNA sequence}, options?} -> answer
    GET  /openapi.json, /docs  the OpenAPI spec (``medmm pacs http --openapi spec.json`` writes it to a file)

Every ``/v1`` call except health needs ``Authorization: Bearer <token>``; the token comes from
``--token-file`` or ``MEDMM_API_TOKEN`` (at least 16 characters) and the server refuses to start
without one. It binds to 127.0.0.1 unless ``--host`` says otherwise, and answers 413 to a body over
``--max-request-mb`` before reading it. One model serves every request: reports one at a time,
concurrent ``/v1/ask`` questions batched (:class:`AskBatcher`; ``--batching continuous`` by default: text-only greedy
questions join Hugging Face's continuous batch as they arrive, the others share static windows).
Uploaded files live in a temporary folder for the duration of the request only.

    MEDMM_API_TOKEN=$(cat /etc/medmm/token) medmm pacs http --checkpoint C --port 8080
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations at runtime, and the
# request/response models are defined inside create_app (fastapi and pydantic are imported lazily).
import hmac
import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Annotated, Literal

from ..errors import ConfigError, InvalidInputError, ModalityMismatchError
from ..utils import optional_import

log = logging.getLogger("medmm.http")
TOKEN_ENV = "MEDMM_API_TOKEN"
MIN_TOKEN_CHARS = 16
# Inputs /v1/ask accepts inline. Image, volume and FASTA inputs are files: they come through
# /v1/studies/report as uploads, never as server-side paths a caller could point anywhere.
_INLINE_LOADERS = {"smiles_fingerprint", "dna_tokens"}
_SEQUENCE = re.compile(r"^[A-Za-z]+$")


def resolve_token(token_file: str | Path | None = None) -> str:
    """The API token from ``token_file`` or ``$MEDMM_API_TOKEN``; refuses a missing or short one."""
    token = Path(token_file).read_text().strip() if token_file else os.environ.get(TOKEN_ENV, "").strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"an API token of at least {MIN_TOKEN_CHARS} characters is required "
                         f"(--token-file or ${TOKEN_ENV})")
    return token


class BodyLimit:
    """ASGI middleware: 413 for a declared Content-Length over the limit, and for a streamed body that outgrows it."""

    class _TooLarge(Exception):
        pass

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, scope, receive, send):
        from starlette.responses import JSONResponse

        await JSONResponse({"detail": f"request body over {self.max_bytes} bytes"}, status_code=413)(scope, receive,
                                                                                                       send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, receive, send)
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyLimit._TooLarge
            return msg

        async def tracking_send(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyLimit._TooLarge:
            if not started:
                await self._reject(scope, receive, send)


BATCHING = ("continuous", "window", "off")
_STOP = object()  # the window worker's stop signal


class AskBatcher:
    """Serves concurrent ``/v1/ask`` requests on one model, in one of three modes (``batching``):

    * ``continuous``: a request that plain greedy ``generate`` would answer (text only, no options, greedy without
      repetition penalty or n-gram ban) joins the running batch of Hugging Face's continuous batching manager as
      soon as it arrives and leaves when it ends (:class:`~medmm.inference.continuous.ContinuousDecoder`, the same
      answers as :meth:`Predictor.predict`); every other request takes the window path below. Where the model
      cannot be served that way the batcher runs as ``window`` (:attr:`continuous_refused` says why);
    * ``window``: static batching: requests that arrive within ``window_s`` of the first one and share its decoding
      settings run as ONE :meth:`Predictor.predict` call (HF ``generate`` batches them; sessions and closed sets run
      one by one inside it). When that call fails, its requests run again one by one, so only the failing one fails;
    * ``off``: one request at a time.

    One worker thread runs the window path; ``submit`` blocks until its answer is ready and marks it with the path
    that served it (``batching``). :attr:`served` counts requests per path, :attr:`batches` the sizes of the window
    path's predict calls, and the continuous decoder's ``running_together`` how many requests decoded together.
    """

    def __init__(self, predictor, model_lock: threading.Lock, max_batch: int = 8, window_s: float = 0.01,
                 batching: str = "window", max_tokens: int = 2048):
        import collections
        import queue

        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got {batching!r}")
        self.predictor, self.lock = predictor, model_lock
        self.max_batch, self.window_s = (1 if batching == "off" else max(1, max_batch)), window_s
        self.mode = batching
        self.continuous = None
        self.continuous_refused: str | None = None
        if batching == "continuous":
            from ..inference.continuous import ContinuousDecoder

            try:
                self.continuous = ContinuousDecoder(predictor, self.max_batch, max_tokens, lock=model_lock)
            except ConfigError as e:
                log.warning("continuous batching is not available, using the window batcher: %s", e)
                self.continuous_refused, self.mode = str(e), "window"
        self.queue: queue.Queue = queue.Queue()
        self.batches: list[int] = []  # sizes of the predict() calls made (for tests and the bench)
        self.served: collections.Counter = collections.Counter()  # requests per path
        self._count = threading.Lock()
        self._worker = threading.Thread(target=self._run, name="medmm-ask-batcher", daemon=True)
        self._worker.start()

    def exclusive(self):
        """The context every other user of the model enters: the model lock, with the continuous loop paused."""
        return self.continuous.exclusive() if self.continuous is not None else self.lock

    def submit(self, record: dict, decoding) -> dict:
        if self.continuous is not None:
            out = self.continuous.submit(record, decoding)  # None: not for the continuous path
            if out is not None:
                with self._count:
                    self.served["continuous"] += 1
                return {**out, "batching": "continuous"}
        done = threading.Event()
        slot: dict = {}
        self.queue.put((record, decoding, slot, done))
        done.wait()
        if "exception" in slot:
            raise slot["exception"]
        path = "off" if self.max_batch == 1 else "window"
        with self._count:
            self.served[path] += 1
        return {**slot["out"], "batching": path}

    def close(self) -> None:
        """Stop the continuous loop (finishing its requests) and the window worker."""
        if self.continuous is not None:
            self.continuous.close()
        self.queue.put(_STOP)

    def _predict(self, group: list, decoding) -> None:
        try:
            with self.exclusive():
                outs = self.predictor.predict([g[0] for g in group], decoding, batch_size=self.max_batch)
            self.batches.append(len(group))
            for g, out in zip(group, outs):
                g[2]["out"] = out
        except Exception as e:  # noqa: BLE001 - handed to the waiting request(s)
            if len(group) > 1:  # one request may have failed the whole call: run each alone
                for g in group:
                    self._predict([g], decoding)
                return
            group[0][2]["exception"] = e

    def _run(self) -> None:
        import dataclasses
        import queue
        import time

        held = None
        while True:
            first = held if held is not None else self.queue.get()
            held = None
            if first is _STOP:
                return
            group = [first]
            key = dataclasses.asdict(first[1])
            deadline = time.monotonic() + self.window_s
            while len(group) < self.max_batch:
                try:
                    item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP or dataclasses.asdict(item[1]) != key:
                    held = item  # other settings (or the stop): the next batch starts with it
                    break
                group.append(item)
            self._predict(group, first[1])
            for g in group:
                g[3].set()


def create_app(pipeline, token: str, max_request_bytes: int = 256 << 20, max_batch: int = 8,
               batch_window_s: float = 0.01, batching: str = "continuous"):
    """The FastAPI app around a loaded :class:`~medmm.export.study.ReportPipeline`.

    ``batching`` chooses how concurrent ``/v1/ask`` requests share the model (:class:`AskBatcher`): ``continuous``
    (the default; ``window`` where the model cannot), ``window`` or ``off``. The app stops the batcher on shutdown.
    """
    optional_import("fastapi")
    from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, UploadFile
    from fastapi.responses import Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from pydantic import BaseModel, Field

    from .. import __version__
    from ..config import DecodingConfig
    from ..inference.predictor import closed_set_check
    from ..inference.strategies import list_strategies, resolve

    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the API token must have at least {MIN_TOKEN_CHARS} characters")
    import contextlib

    model_lock = threading.Lock()  # one model: one report or one batch of questions at a time
    predictor = pipeline.predictor
    batcher = AskBatcher(predictor, model_lock, max_batch, batch_window_s, batching)
    bearer = HTTPBearer(auto_error=False, description="the token from --token-file or $MEDMM_API_TOKEN")

    def require_token(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if creds is None or not hmac.compare_digest(creds.credentials.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    class Health(BaseModel):
        status: str
        model: str
        version: str
        model_uid: str

    class Step(BaseModel):
        op: str
        s: float

        model_config = {"extra": "allow"}

    class ReportOut(BaseModel):
        report: str = Field(description="the generated report text (also in the SR)")
        study_instance_uid: str
        sr_sop_instance_uid: str
        sr_series_instance_uid: str
        verification_flag: str = Field(description="always UNVERIFIED: a clinician must verify the report")
        algorithm: dict
        steps: list[Step] = Field(description="the audit trail: load_study, select_series, infer, write_sr")

    class AskIn(BaseModel):
        question: str = Field(min_length=1, max_length=4000)
        modalities: dict[str, str] = Field(default_factory=dict,
                                           description="modality name -> SMILES or DNA sequence (inline values only)")
        options: list[str] | None = Field(default=None, description="closed-set answers to score (returns probs)")
        max_new_tokens: int = Field(default=64, ge=1, le=1024)
        strategy: str = Field(default="greedy", description="a registered decoding strategy: "
                              + ", ".join(list_strategies()))
        seed: int = Field(default=0, description="seed for sampling and search")
        params: dict[str, str | int | float] = Field(
            default_factory=dict, description="the strategy's own settings (as infer.py's flags, e.g. num_beams); "
            "a setting the strategy does not take is a 422")

    class AskOut(BaseModel):
        answer: str
        probs: dict[str, float] | None = None
        new_tokens: int | None = None
        decoding: dict | None = None
        batching: str | None = Field(default=None, description="the path that served it: continuous, window or off")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()  # the continuous loop finishes its requests and releases its cache

    app = FastAPI(title="medmm", version=__version__, lifespan=lifespan,
                  description="Reports from a medmm multimodal model. Not a medical device: every report is "
                              "UNVERIFIED until a clinician verifies it.")
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    app.state.batcher = batcher

    @app.get("/v1/health", response_model=Health)
    def health() -> Health:
        a = pipeline.algorithm
        return Health(status="ok", model=a.name, version=a.version, model_uid=a.uid)

    @app.post("/v1/studies/report", response_model=ReportOut, dependencies=[Depends(require_token)],
              responses={200: {"content": {"application/dicom": {}},
                               "description": "the report JSON, or the SR with ?format=sr"},
                         401: {"description": "missing or wrong token"}, 413: {"description": "body too large"},
                         422: {"description": "the study cannot be read or reported (typed error record)"}})
    def report_study(files: Annotated[list[UploadFile], File(description="the DICOM instances of one study")],
                     question: Annotated[str | None, Form(max_length=4000)] = None,
                     format: Annotated[Literal["json", "sr"], Query(description="json: report JSON; sr: the SR")] = "json"):
        with tempfile.TemporaryDirectory(prefix="medmm-upload-") as tmp:
            folder = Path(tmp) / "upload"
            folder.mkdir()
            for i, f in enumerate(files):
                with open(folder / f"{i:06d}.dcm", "wb") as out:
                    shutil.copyfileobj(f.file, out)
            try:
                with batcher.exclusive():
                    res = pipeline.run(folder, work_dir=Path(tmp) / "work", question=question)
            except InvalidInputError as e:
                rec = e.to_record()
                rec["path"] = rec["path"].replace(tmp, "<upload>")  # no server paths in answers
                rec["message"] = rec["message"].replace(tmp, "<upload>")
                raise HTTPException(422, rec) from e
        if format == "sr":
            import io

            buf = io.BytesIO()
            res.sr.save_as(buf, enforce_file_format=True)
            return Response(buf.getvalue(), media_type="application/dicom",
                            headers={"Content-Disposition": f'attachment; filename="{res.sr.SOPInstanceUID}.dcm"'})
        return ReportOut(report=res.text, study_instance_uid=res.record["study_instance_uid"],
                         sr_sop_instance_uid=str(res.sr.SOPInstanceUID),
                         sr_series_instance_uid=str(res.sr.SeriesInstanceUID),
                         verification_flag=str(res.sr.VerificationFlag), algorithm=res.record["algorithm"],
                         steps=res.record["steps"])

    @app.post("/v1/ask", response_model=AskOut, dependencies=[Depends(require_token)],
              responses={401: {"description": "missing or wrong token"}, 413: {"description": "body too large"},
                         422: {"description": "invalid input (typed error record)"}})
    def ask(req: AskIn) -> AskOut:
        mods = predictor.model.config.modalities
        for name, value in req.modalities.items():
            if name not in mods:
                raise HTTPException(422, {"error": "ConversationError", "path": name,
                                          "message": f"unknown modality; the model has {', '.join(mods)}"})
            if mods[name].loader not in _INLINE_LOADERS:
                raise HTTPException(422, {"error": "ConversationError", "path": name,
                                          "message": "file inputs go through /v1/studies/report"})
            if mods[name].loader == "dna_tokens" and not _SEQUENCE.match(value):
                raise HTTPException(422, {"error": "SequenceError", "path": name,
                                          "message": "a DNA input must be a sequence of letters"})
        record = {"id": "ask", "modalities": dict(req.modalities), "question": req.question}
        if req.options:
            record["options"] = list(req.options)
        try:
            decoding = DecodingConfig(strategy=req.strategy, max_new_tokens=req.max_new_tokens, seed=req.seed,
                                      params=dict(req.params))
            resolve(decoding)
            if req.options:
                closed_set_check(decoding)
        except ConfigError as e:
            raise HTTPException(422, {"error": "ConfigError", "message": str(e)}) from e
        try:
            out = batcher.submit(record, decoding)  # concurrent questions share one batched generate
        except (InvalidInputError, ModalityMismatchError, ConfigError) as e:
            raise HTTPException(422, {"error": type(e).__name__, "message": str(e)}) from e
        if "error" in out:
            raise HTTPException(422, {"error": out["error"], "message": out["message"]})
        return AskOut(answer=out["answer"], probs=out.get("probs"), new_tokens=out.get("new_tokens"),
                      decoding=out.get("decoding"), batching=out.get("batching"))

    return app


def serve(pipeline, token: str, host: str = "127.0.0.1", port: int = 8080, max_request_bytes: int = 256 << 20,
          batching: str = "continuous") -> None:
    """Run the API with uvicorn until interrupted."""
    uvicorn = optional_import("uvicorn")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding to %s: the API is reachable from the network; put TLS in front of it", host)
    uvicorn.run(create_app(pipeline, token, max_request_bytes, batching=batching), host=host, port=port,
                log_level="info")
