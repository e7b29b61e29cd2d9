"""``medmm pacs http``: a small HTTP API for the same job (FastAPI + uvicorn).

    GET  /v1/health            liveness and the model's identity (no token)
    POST /v1/studies/report    multipart: one study's DICOM files (+ ``question``) -> report JSON,
                               or the DICOM SR itself with ``?format=sr`` (application/dicom)
    POST /v1/ask               JSON {question, modalities: {name: SMILES or DNA sequence}, options?} -> answer
    GET  /openapi.json, /docs, /redoc   the OpenAPI spec and its pages: off (404) unless ``--docs``, and then behind
                               the token (``medmm pacs http --openapi spec.json`` writes the spec to a file)

Every ``/v1`` call except health needs ``Authorization: Bearer <token>``, checked from the request head by an ASGI
middleware before any body byte is read (401). The token comes from ``--token-file`` or ``MEDMM_API_TOKEN`` (at
least 16 characters; its name is ``default``), or several named tokens from ``--tokens-file`` (one ``name token`` per
line, ``#`` comment lines; names key the audit log and the rate limit). The server refuses to start without one.
It binds to 127.0.0.1 unless ``--host`` says otherwise, and answers 413 to a body over ``--max-request-mb``: before
reading it when Content-Length declares it, as soon as a chunked body outgrows it otherwise. One model serves every
request: reports one at a time, concurrent ``/v1/ask`` questions batched (:class:`AskBatcher`; ``--batching
continuous`` by default: text-only greedy questions join Hugging Face's continuous batch as they arrive, the others
share static windows). Uploaded files live in a temporary folder for the duration of the request only.

Hardening flags (``medmm pacs http``; each a :func:`create_app` keyword or :func:`serve` argument):

    --tls-cert F --tls-key F   serve HTTPS (default: plain HTTP; binding a non-loopback host without TLS warns)
    --tls-ca F                 require client certificates signed by this CA (mutual TLS; default: none asked)
    --tokens-file F            named tokens instead of the single --token-file / $MEDMM_API_TOKEN
    --rate-limit N/min         per token name, a sliding window (also N/s, N/h); beyond it 429 + Retry-After
                               (default: no limit); requests without a valid token spend no one's budget
    --audit-log F              one JSON line per request (time, token_name, method, endpoint, status, bytes,
                               duration_s): never a token, a query string, a body or a header; created 0600
    --docs                     serve /docs, /redoc, /openapi.json behind the token (default: off, 404)
    --helper-model NAME=PATH   (repeatable) a draft/amateur model /v1/ask may name in ``params`` (``draft: NAME``):
                               over HTTP a helper model is never a path, only a NAME loaded once at start-up

``/v1/ask`` caps each request (:class:`AskLimits`: 64 options of at most 256 characters, 8 modality values of at most
8192 characters, 16 params with names and string values of at most 64 characters and numbers of magnitude at most
64, ``max_new_tokens`` at most 1024): a 422 naming the field, before the model is touched. Query strings are dropped
from uvicorn's access log lines (a token or an identifier in a URL never reaches a log).

    MEDMM_API_TOKEN=$(cat /etc/medmm/token) medmm pacs http --checkpoint C --port 8080
    medmm pacs http --checkpoint C --host 0.0.0.0 --tls-cert server.pem --tls-key server.key --tls-ca clients-ca.pem \\
        --tokens-file /etc/medmm/tokens --rate-limit 60/min --audit-log /var/log/medmm/audit.jsonl
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations at runtime, and the
# request/response models are defined inside create_app (fastapi and pydantic are imported lazily).
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import re
import shutil
import ssl
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

from ..errors import ConfigError, InvalidInputError, ModalityMismatchError, excerpt
from ..utils import optional_import

log = logging.getLogger("medmm.http")
TOKEN_ENV = "MEDMM_API_TOKEN"
MIN_TOKEN_CHARS = 16
DEFAULT_TOKEN_NAME = "default"  # the name of the single --token-file / $MEDMM_API_TOKEN token
LOOPBACK = ("127.0.0.1", "localhost", "::1")
HEALTH = "/v1/health"  # the one /v1 path open without a token
# Inputs /v1/ask accepts inline. Image, volume and FASTA inputs are files: they come through
# /v1/studies/report as uploads, never as server-side paths a caller could point anywhere.
_INLINE_LOADERS = {"smiles_fingerprint", "dna_tokens"}
_SEQUENCE = re.compile(r"^[A-Za-z]+$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")  # token and helper-model names
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|sec|second|min|minute|h|hour)\s*$")
_PER_S = {"s": 1.0, "sec": 1.0, "second": 1.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}


# ----------------------------------------------------------------------------- tokens
def resolve_token(token_file: str | Path | None = None) -> str:
    """The API token from ``token_file`` or ``$MEDMM_API_TOKEN``; refuses a missing or short one."""
    token = Path(token_file).read_text().strip() if token_file else os.environ.get(TOKEN_ENV, "").strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"an API token of at least {MIN_TOKEN_CHARS} characters is required "
                         f"(--token-file or ${TOKEN_ENV})")
    return token


def load_tokens(path: str | Path) -> dict[str, str]:
    """Named tokens from a ``--tokens-file``: one ``name token`` per line (blank lines and lines starting with ``#``
    skipped). Names are unique (1-64 letters, digits, ``_.@-``), tokens too and at least 16 characters each.

    Raises:
        ValueError: a malformed line, a short or repeated token, a repeated name, or no token at all; the message
            names the line, never a token.
    """
    path = Path(path)
    if path.stat().st_mode & 0o077:
        log.warning("%s can be read by other users: chmod 600 it", path)
    tokens: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{path}:{n}: expected 'name token' (two fields)")
        name, token = fields
        if not _NAME.match(name):
            raise ValueError(f"{path}:{n}: a token name is 1-64 letters, digits or '_.@-', starting with a letter or "
                             "digit")
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"{path}:{n}: the token of '{name}' has fewer than {MIN_TOKEN_CHARS} characters")
        if name in tokens:
            raise ValueError(f"{path}:{n}: the name '{name}' is used twice")
        if token in tokens.values():
            raise ValueError(f"{path}:{n}: the token of '{name}' is used twice")
        tokens[name] = token
    if not tokens:
        raise ValueError(f"{path}: no token (one 'name token' per line)")
    return tokens


def resolve_tokens(token_file: str | Path | None = None, tokens_file: str | Path | None = None) -> dict[str, str]:
    """The server's tokens by name: ``tokens_file`` (``--tokens-file``), else the single token of ``token_file`` or
    ``$MEDMM_API_TOKEN`` named ``default``. The two files exclude each other."""
    if token_file and tokens_file:
        raise ValueError("--token-file and --tokens-file exclude each other: put the single token in the "
                         "tokens-file under a name")
    if tokens_file:
        return load_tokens(tokens_file)
    return {DEFAULT_TOKEN_NAME: resolve_token(token_file)}


class TokenSet:
    """The tokens a server accepts, by name (a single token is named ``default``).

    :meth:`identify` compares a presented token with EVERY entry in constant time (SHA-256 digests of equal length,
    :func:`hmac.compare_digest`, no early exit), so the time taken says neither which entry nor how much matched.
    """

    def __init__(self, tokens: str | Mapping[str, str]):
        if isinstance(tokens, str):
            tokens = {DEFAULT_TOKEN_NAME: tokens}
        if not tokens:
            raise ValueError("at least one API token is required")
        for name, token in tokens.items():
            if not _NAME.match(str(name)):
                raise ValueError("a token name is 1-64 letters, digits or '_.@-'")
            if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
                raise ValueError(f"the API token '{name}' must have at least {MIN_TOKEN_CHARS} characters")
        if len(set(tokens.values())) != len(tokens):
            raise ValueError("two token names share one token")
        self.names = list(tokens)
        self._digests = [(name, hashlib.sha256(token.encode()).digest()) for name, token in tokens.items()]

    def identify(self, presented: str | None) -> str | None:
        """The name of the token ``presented`` (None for none or a wrong one)."""
        given = hashlib.sha256((presented or "").encode()).digest()
        found = None
        for name, digest in self._digests:
            if hmac.compare_digest(given, digest) and found is None:  # compared first: never skipped
                found = name
        return found


def bearer(headers) -> str | None:
    """The credentials of the one ``Authorization: Bearer ...`` header among ASGI ``headers`` (None otherwise)."""
    values = [v for k, v in headers if k == b"authorization"]
    if len(values) != 1:
        return None
    scheme, _, credentials = values[0].decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip() or None


# ----------------------------------------------------------------------------- rate limit
def parse_rate_limit(text: str) -> tuple[int, float]:
    """``--rate-limit``: ``N/min`` (or ``N/s``, ``N/h``) -> (N requests, window in seconds)."""
    m = _RATE.match(str(text))
    if m is None or int(m.group(1)) < 1:
        raise ValueError(f"--rate-limit: expected N/min (or N/s, N/h) with N >= 1, got '{excerpt(text)}'")
    return int(m.group(1)), _PER_S[m.group(2)]


class RateLimiter:
    """At most ``count`` requests per token name in any ``window_s`` seconds (a sliding log, in memory: at most
    ``count`` timestamps per name)."""

    def __init__(self, count: int, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.count, self.window_s, self.clock = count, window_s, clock
        self._seen: dict[str, deque] = {}
        self._lock = threading.Lock()

    def admit(self, name: str) -> float | None:
        """None when the request may go on (and is counted); else the seconds until it would be admitted."""
        with self._lock:
            now = self.clock()
            seen = self._seen.setdefault(name, deque())
            while seen and seen[0] <= now - self.window_s:
                seen.popleft()
            if len(seen) >= self.count:
                return seen[0] + self.window_s - now
            seen.append(now)
            return None


# ----------------------------------------------------------------------------- ASGI middleware
_TOKEN_NAME_KEY = "medmm.token_name"  # where Gate leaves the caller's token name (for AuditLog)


async def _answer(send, status: int, detail: str, headers: tuple = ()) -> None:
    """A small JSON answer sent straight from a middleware; the connection closes after it (a body may be unread)."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


class Gate:
    """ASGI middleware in front of everything that reads a body: the bearer token is checked from the request head
    (401 before any body byte is read), then the caller's rate limit (429 with ``Retry-After``). ``guarded(path)``
    says which paths need a token; the caller's token name (or None) is left in the scope for :class:`AuditLog`."""

    def __init__(self, app, tokens: TokenSet, guarded: Callable[[str], bool], limiter: RateLimiter | None = None,
                 failures: RateLimiter | None = None):
        self.app, self.tokens, self.guarded, self.limiter, self.failures = app, tokens, guarded, limiter, failures

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        name = self.tokens.identify(bearer(scope.get("headers") or []))
        scope[_TOKEN_NAME_KEY] = name
        if self.guarded(scope.get("path", "")):
            if name is None:
                # Token guessing: each client address may fail only so often; past that it waits out the window
                # (429), so guessing is throttled even though wrong tokens spend no token's budget.
                client = (scope.get("client") or ("?", 0))[0]
                wait = self.failures.admit(client) if self.failures is not None else None
                if wait is not None:
                    return await _answer(send, 429, "too many failed token attempts from this address; retry later",
                                         ((b"retry-after", str(max(1, math.ceil(wait))).encode()),))
                return await _answer(send, 401, "missing or wrong bearer token", ((b"www-authenticate", b"Bearer"),))
            wait = self.limiter.admit(name) if self.limiter is not None else None
            if wait is not None:
                return await _answer(send, 429, "rate limit reached for this token; retry later",
                                     ((b"retry-after", str(max(1, math.ceil(wait))).encode()),))
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: 413 for a declared Content-Length over the limit (before reading the body), and for a
    streamed (chunked) body as soon as it outgrows the limit.

    The 413 is sent from here. Raising inside ``receive`` does not work: FastAPI's request handler turns any error
    while it reads a body into 400 ("There was an error parsing the body"), and so does the multipart parser's caller,
    so the exception never came back here. Instead the app is handed a disconnect, and what it answers after that is
    dropped.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        detail = f"request body over {self.max_bytes} bytes"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _answer(send, 413, detail)
        seen = 0
        started = refused = False

        async def limited_receive():
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    refused = True
                    if not started:
                        await _answer(send, 413, detail)
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg):
            nonlocal started
            if refused:
                return  # the answer was the 413
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refused:  # after a 413 the app's complaints about its lost body are moot
                raise


class AuditWriter:
    """Appends one JSON line per record to the audit log, a file created 0600 (made 0600 if it was not). The file
    is opened for each line (O_APPEND), so a rotated log is created again, 0600 as well."""

    _FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, self._FLAGS, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        line = (json.dumps(record, separators=(", ", ": ")) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, self._FLAGS, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)


class AuditLog:
    """ASGI middleware around everything else, so 401, 413 and 429 are audited too: one line per HTTP request with
    ``time`` (UTC), ``token_name`` (None without a valid token), ``method``, ``endpoint`` (the route's path;
    ``<unknown>`` for a path no route has, so a client's text never lands there), ``status``, ``bytes`` (request
    body bytes received) and ``duration_s``. Never a token, a query string, a header or a body.

    The line is written before the last byte of the answer is sent: when a client has its answer, the line is there.
    """

    def __init__(self, app, writer: AuditWriter, endpoints: Callable[[], frozenset]):
        self.app, self.writer, self.endpoints = app, writer, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        received = 0
        status = None
        written = False

        def record(code) -> None:
            nonlocal written
            if written:
                return
            written = True
            path = scope.get("path", "")
            self.writer.write({"time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                               "token_name": scope.get(_TOKEN_NAME_KEY), "method": scope.get("method"),
                               "endpoint": path if path in self.endpoints() else "<unknown>", "status": code,
                               "bytes": received, "duration_s": round(time.perf_counter() - t0, 6)})

        async def counting_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
            return msg

        async def auditing_send(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            elif msg["type"] == "http.response.body" and not msg.get("more_body", False):
                record(status)
            await send(msg)

        try:
            await self.app(scope, counting_receive, auditing_send)
        except BaseException:
            record(500 if status is None else status)  # the server's error answer follows
            raise
        record(status)


class _NoQueryStrings(logging.Filter):
    """Drops the query string from uvicorn's access lines (their third argument is the path with the query): a token
    or an identifier a client put in a URL never reaches a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


def redact_access_log() -> None:
    """Install :class:`_NoQueryStrings` on uvicorn's access logger (once)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _NoQueryStrings) for f in access.filters):
        access.addFilter(_NoQueryStrings())


# ----------------------------------------------------------------------------- TLS and the server
def tls_options(cert: str | Path | None = None, key: str | Path | None = None,
                ca: str | Path | None = None) -> dict:
    """uvicorn's TLS keyword arguments: HTTPS with ``cert`` and ``key`` (PEM); with ``ca`` a client certificate
    signed by that CA is required (``ssl.CERT_REQUIRED``). ``{}`` without TLS.

    Raises:
        ValueError: a flag without its partner, a missing file, or a certificate and key that do not load.
    """
    if cert is None and key is None:
        if ca is not None:
            raise ValueError("--tls-ca needs --tls-cert and --tls-key")
        return {}
    if cert is None or key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    for flag, f in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)):
        if f is not None and not Path(f).is_file():
            raise ValueError(f"{flag}: {f} is not a file")
    try:  # a bad pair fails here, at start-up, not at the first handshake
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cert), str(key))
        if ca is not None:
            ctx.load_verify_locations(str(ca))
    except ssl.SSLError as e:
        raise ValueError(f"--tls-cert/--tls-key/--tls-ca do not load: {e}") from e
    out = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    if ca is not None:
        out.update(ssl_ca_certs=str(ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return out


def server_options(host: str = "127.0.0.1", port: int = 8080, tls_cert: str | Path | None = None,
                   tls_key: str | Path | None = None, tls_ca: str | Path | None = None) -> dict:
    """``uvicorn.run`` keyword arguments: the bind address, TLS (:func:`tls_options`), no ``server`` header. Warns
    when a non-loopback address is bound without TLS."""
    tls = tls_options(tls_cert, tls_key, tls_ca)
    if host not in LOOPBACK and not tls:
        log.warning("binding to %s without TLS: tokens and reports cross the network in clear; use --tls-cert and "
                    "--tls-key (or a TLS proxy in front)", host)
    return {"host": host, "port": port, "server_header": False, **tls}


def parse_helper_models(specs: list[str] | None) -> dict[str, str]:
    """``--helper-model NAME=PATH`` (repeatable) -> {name: path}; names unique, 1-64 letters, digits, ``_.@-``."""
    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not path or not _NAME.match(name):
            raise ValueError(f"--helper-model: expected NAME=PATH with a NAME of letters, digits or '_.@-', got "
                             f"'{excerpt(spec)}'")
        if name in out:
            raise ValueError(f"--helper-model: the name '{name}' is given twice")
        out[name] = path
    return out


@dataclasses.dataclass(frozen=True)
class AskLimits:
    """Caps on one ``/v1/ask`` request, checked before the model is touched; each is a 422 naming the field."""

    max_options: int = 64
    """closed-set answers scored in one request"""
    max_option_chars: int = 256
    """characters of one option"""
    max_modalities: int = 8
    """modality values in one request"""
    max_modality_chars: int = 8192
    """characters of one modality value (a SMILES or a DNA sequence)"""
    max_params: int = 16
    """strategy settings in one request"""
    max_param_chars: int = 64
    """characters of a setting's name and of a string value (a helper model's name, ``backend``, ...)"""
    max_param_number: float = 64
    """magnitude of a numeric setting (``num_beams``, ``num_samples``, ``num_simulations``, ``top_k``, ...)"""
    max_new_tokens: int = 1024
    """tokens generated for one answer"""

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



def create_app(pipeline, token: str | Mapping[str, str], max_request_bytes: int = 256 << 20, max_batch: int = 8,
               batch_window_s: float = 0.01, batching: str = "continuous", *, limits: AskLimits | None = None,
               helper_models: Mapping[str, str | Path] | None = None, rate_limit: str | None = None,
               audit_log: str | Path | None = None, docs: bool = False, auth_failure_limit: str | None = "30/min"):
    """The FastAPI app around a loaded :class:`~medmm.serve.study.ReportPipeline`.

    Args:
        pipeline: the loaded pipeline; its predictor answers ``/v1/ask``.
        token: the API token (named ``default``), or named tokens ``{name: token}`` (``--tokens-file``).
        max_request_bytes: a larger body is a 413.
        max_batch, batch_window_s: how many ``/v1/ask`` questions share a generate call, and how long to wait.
        batching: how concurrent ``/v1/ask`` requests share the model (:class:`AskBatcher`): ``continuous`` (the
            default; ``window`` where the model cannot), ``window`` or ``off``. The app stops the batcher on shutdown.
        limits: the caps on one ``/v1/ask`` request (default :class:`AskLimits`).
        helper_models: ``{name: local folder}``: the draft/amateur models ``/v1/ask`` may name (by name only),
            loaded here, once. Default: none, and every helper-model setting is a 422.
        rate_limit: ``"N/min"`` (:func:`parse_rate_limit`) per token name; beyond it 429. Default: none.
        audit_log: a file that gets one JSON line per request (:class:`AuditLog`), created 0600. Default: none.
        docs: serve ``/docs``, ``/redoc`` and ``/openapi.json`` (behind the token). Default: off (404);
            ``app.openapi()`` gives the spec either way.
        auth_failure_limit: ``"N/min"``: at most N requests with a missing or wrong token per client address in the
            window; beyond it 429 until the window has passed (throttles token guessing). None: no limit.
    """
    optional_import("fastapi")
    from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from pydantic import BaseModel, Field

    from .. import __version__
    from ..config import DecodingConfig
    from ..inference.predictor import closed_set_check
    from ..inference.strategies import get_strategy, list_strategies, resolve

    tokens = TokenSet(token)
    limits = limits or AskLimits()
    limiter = RateLimiter(*parse_rate_limit(rate_limit)) if rate_limit else None
    failures = RateLimiter(*parse_rate_limit(auth_failure_limit)) if auth_failure_limit else None
    audit = AuditWriter(audit_log) if audit_log else None
    helpers = dict(helper_models or {})
    for name in helpers:
        if not _NAME.match(str(name)):
            raise ValueError(f"helper model name '{excerpt(name)}': 1-64 letters, digits or '_.@-'")
    predictor = pipeline.predictor
    if helpers:
        predictor.load_helpers(helpers)  # at start-up, once; requests name them and never load anything
    redact_access_log()
    model_lock = threading.Lock()  # one model: one report or one batch of questions at a time
    batcher = AskBatcher(predictor, model_lock, max_batch, batch_window_s, batching)
    auth = HTTPBearer(auto_error=False, description=f"a token from --tokens-file or --token-file / ${TOKEN_ENV}")

    def require_token(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(auth)]) -> None:
        # Gate has checked it already, before the body; this keeps the check where the spec declares it.
        if creds is None or tokens.identify(creds.credentials) is None:
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def refuse(field: str, message: str, error: str = "InvalidInputError"):
        return HTTPException(422, {"error": error, "path": field, "message": message})

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
        modalities: dict[str, str] = Field(
            default_factory=dict, description=f"modality name -> SMILES or DNA sequence (inline values only; at most "
            f"{limits.max_modalities} of at most {limits.max_modality_chars} characters)")
        options: list[str] | None = Field(default=None, description="closed-set answers to score (returns probs; at "
                                          f"most {limits.max_options} of at most {limits.max_option_chars} characters)")
        max_new_tokens: int = Field(default=64, ge=1, le=limits.max_new_tokens)
        strategy: str = Field(default="greedy", description="a registered decoding strategy: "
                              + ", ".join(list_strategies()))
        seed: int = Field(default=0, ge=-(2**63), le=2**63 - 1, description="seed for sampling and search")
        params: dict[str, str | int | float] = Field(
            default_factory=dict, description="the strategy's own settings (as infer.py's flags, e.g. num_beams); "
            "a setting the strategy does not take is a 422. A helper model (draft, amateur) is the NAME of one the "
            f"server was started with (--helper-model), never a path. At most {limits.max_params} settings; names "
            f"and strings of at most {limits.max_param_chars} characters, numbers of magnitude at most "
            f"{limits.max_param_number:g}")

    class AskOut(BaseModel):
        answer: str
        probs: dict[str, float] | None = None
        new_tokens: int | None = None
        decoding: dict | None = None
        batching: str | None = Field(default=None, description="the path that served it: continuous, window or off")

    def check_caps(req: AskIn) -> None:
        """Row-8 caps: a 422 naming the field, before anything touches the model."""
        lim = limits
        if req.options is not None:
            if len(req.options) > lim.max_options:
                raise refuse("options", f"at most {lim.max_options} options (got {len(req.options)})")
            for i, option in enumerate(req.options):
                if len(option) > lim.max_option_chars:
                    raise refuse(f"options[{i}]", f"at most {lim.max_option_chars} characters (got {len(option)})")
            if len(set(req.options)) != len(req.options) or not all(req.options):  # else a 500 from the session
                raise refuse("options", "options must be distinct and non-empty")
        if len(req.modalities) > lim.max_modalities:
            raise refuse("modalities", f"at most {lim.max_modalities} modality values (got {len(req.modalities)})")
        for name, value in req.modalities.items():
            if len(value) > lim.max_modality_chars:
                raise refuse(f"modalities.{excerpt(name)}",
                             f"at most {lim.max_modality_chars} characters (got {len(value)})")
        if len(req.params) > lim.max_params:
            raise refuse("params", f"at most {lim.max_params} settings (got {len(req.params)})")
        for name, value in req.params.items():
            if len(name) > lim.max_param_chars:
                raise refuse("params", f"a setting's name has at most {lim.max_param_chars} characters "
                                       f"(got {len(name)})")
            if isinstance(value, str) and len(value) > lim.max_param_chars:
                raise refuse(f"params.{name}", f"at most {lim.max_param_chars} characters (got {len(value)})")
            if not isinstance(value, str) and not abs(value) <= lim.max_param_number:  # NaN is refused as well
                raise refuse(f"params.{name}", f"a number of magnitude at most {lim.max_param_number:g}")

    def check_helpers(decoding) -> None:
        """Row 2: a helper model is a NAME from the allow-list, never a path; one answer for every other value, so
        it says nothing about the server's folders."""
        s = get_strategy(decoding.strategy)
        for param in s.aux_models:
            if decoding.params.get(param) not in helpers:
                allowed = ", ".join(sorted(helpers)) or "none is configured"
                raise refuse(f"params.{param}", f"{s.name}: '{param}' is the name of a helper model the server was "
                             f"started with (--helper-model NAME=PATH), never a path; names: {allowed}", "ConfigError")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()  # the continuous loop finishes its requests and releases its cache

    app = FastAPI(title="medmm", version=__version__, lifespan=lifespan,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None,
                  description="Reports from a medmm multimodal model. Not a medical device: every report is "
                              "UNVERIFIED until a clinician verifies it.")
    # Starlette runs the last added middleware first: AuditLog (sees every answer) -> Gate (token, rate limit; no
    # body read) -> BodyLimit -> the routes.
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    app.add_middleware(Gate, tokens=tokens, limiter=limiter, failures=failures,
                       guarded=lambda path: path != HEALTH and (docs or path == "/v1" or path.startswith("/v1/")))
    if audit is not None:
        routes: list[frozenset] = []

        def endpoints() -> frozenset:
            if not routes:
                routes.append(frozenset(getattr(r, "path", "") for r in app.routes))
            return routes[0]

        app.add_middleware(AuditLog, writer=audit, endpoints=endpoints)
    app.state.batcher = batcher
    app.state.tokens = tokens
    app.state.limits = limits

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        # FastAPI's own answer repeats each offending input in full ("input"): name the field and the problem only
        errors = [{"type": e.get("type"), "loc": [excerpt(x) if isinstance(x, str) else x for x in e.get("loc", ())],
                   "msg": excerpt(e.get("msg", ""), 200)} for e in exc.errors()[:8]]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.get(HEALTH, response_model=Health)
    def health() -> Health:
        a = pipeline.algorithm
        return Health(status="ok", model=a.name, version=a.version, model_uid=a.uid)

    @app.post("/v1/studies/report", response_model=ReportOut, dependencies=[Depends(require_token)],
              responses={200: {"content": {"application/dicom": {}},
                               "description": "the report JSON, or the SR with ?format=sr"},
                         401: {"description": "missing or wrong token"}, 413: {"description": "body too large"},
                         422: {"description": "the study cannot be read or reported (typed error record)"},
                         429: {"description": "rate limit reached (Retry-After)"}})
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
                         422: {"description": "invalid input or over a cap (typed error record naming the field)"},
                         429: {"description": "rate limit reached (Retry-After)"}})
    def ask(req: AskIn) -> AskOut:
        check_caps(req)
        mods = predictor.model.config.modalities
        for name, value in req.modalities.items():
            if name not in mods:
                raise refuse(excerpt(name), f"unknown modality; the model has {', '.join(mods)}", "ConversationError")
            if mods[name].loader not in _INLINE_LOADERS:
                raise refuse(name, "file inputs go through /v1/studies/report", "ConversationError")
            if mods[name].loader == "dna_tokens" and not _SEQUENCE.match(value):
                raise refuse(name, "a DNA input must be a sequence of letters", "SequenceError")
        record = {"id": "ask", "modalities": dict(req.modalities), "question": req.question}
        if req.options:
            record["options"] = list(req.options)
        try:
            decoding = DecodingConfig(strategy=req.strategy, max_new_tokens=req.max_new_tokens, seed=req.seed,
                                      params=dict(req.params))
            resolve(decoding)
            check_helpers(decoding)
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


def serve(pipeline, token: str | Mapping[str, str], host: str = "127.0.0.1", port: int = 8080,
          max_request_bytes: int = 256 << 20, batching: str = "continuous", *, tls_cert: str | Path | None = None,
          tls_key: str | Path | None = None, tls_ca: str | Path | None = None, **app_options) -> None:
    """Run the API with uvicorn until interrupted: HTTPS with ``tls_cert``/``tls_key``, client certificates
    required with ``tls_ca``; ``app_options`` go to :func:`create_app` (limits, helper_models, rate_limit,
    audit_log, docs)."""
    uvicorn = optional_import("uvicorn")
    options = server_options(host, port, tls_cert, tls_key, tls_ca)
    app = create_app(pipeline, token, max_request_bytes, batching=batching, **app_options)
    uvicorn.run(app, **options, log_level="info")
