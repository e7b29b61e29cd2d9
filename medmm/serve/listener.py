"""``medmm pacs listen``: a DICOM storage SCP that turns each received study into an SR, and
``medmm pacs resend``: delivery of the SRs it could not deliver.

    modality / PACS / storescu --C-STORE--> StudyListener   (only calling AE titles in --allowed-aets)
      -> spool/<n>/ one folder per study; a burst of instances is complete when none came for --study-timeout s
      -> bounded queue (--max-queue studies collecting or waiting; a new study beyond it gets 0xA700)
      -> worker: the next study and those waiting behind it (up to --max-batch, one burst per study)
      -> ReportPipeline.run_many (each study loaded, selected and written alone; one batched generate)
      -> out/sr/<uid>.dcm
      -> --forward-to AET@host:port (C-STORE) or http(s)://.../dicom-web (STOW-RS), retried with back-off
         for --retry-seconds; an SR still not delivered is kept in out/undelivered/ for `medmm pacs resend`
      -> out/studies.jsonl: one line per burst with its outcome (UIDs, counts, timings, error type and
         message; never patient names or IDs, never the report text)

One study, one report lineage: instances of a study that arrive after its SR was made (a second burst,
further apart than --study-timeout) join the instances already received, and the new SR, made from all
of them, lists the previous SR in its Predecessor Documents Sequence (``predecessor_sr`` in the log).
Received instances are kept for --amend-window seconds after a study's last SR so that a later burst
can be reported with them; after that they are deleted (a still later burst is reported from its own
instances, and its SR still names the previous one). The lineage (study -> latest SR file) is rebuilt
from ``studies.jsonl`` when the listener starts.

A failing study (unreadable pixels, no image series, a crash inside the model) is logged as
``failed`` and the listener goes on with the next one; in a batch it fails alone (a crash of the batched
``generate`` is retried study by study). Each log line has ``batch_size``, the studies reported together.
Without ``--forward-to`` the SRs stay in ``out/sr/`` (DIMSE has no way back to a caller whose port is not
configured).

What a stranger on the network can do is bounded before any AE title is checked: each PDU's declared length
is read from its 6-byte header and a PDU longer than :data:`MAX_PDU_BYTES` ends the connection before its body is
read (pynetdicom itself reads whatever length is declared; ``maximum_pdu_size`` only negotiates P-DATA); at most
:data:`MAX_CONNECTIONS` connections are open at once (more are closed unread) and :data:`MAX_ASSOCIATIONS`
associations (more get A-ASSOCIATE-RJ); a peer silent for ``network_timeout`` seconds in the middle of a PDU is
dropped. With ``--tls-cert/--tls-key`` the listener speaks DICOM TLS only (``--tls-ca``: client certificates
signed by that CA are required). ``--audit-log FILE`` gets one JSON line per association and per C-STORE/C-ECHO
(time, calling AE, endpoint, status, bytes, seconds; never header values or UIDs).

Everything the listener writes (spool, SRs, ``studies.jsonl``, the audit log) is 0600 in 0700 folders, and
neither its log nor ``studies.jsonl`` holds header values: UIDs only when they are well-formed, error messages
reduced to lower-case words and DICOM keywords (a quoted value, a name or a date never gets through), and
pydicom's reading validation, whose warnings quote the values, is off while the listener runs.

The spool survives a crash: each study folder holds a ``.study`` record (its Study Instance UID), and on start-up
the listener deletes every folder whose newest file is older than ``--amend-window`` and adopts the others,
which a later burst of the study then amends and which are deleted when their window ends. Instances received
but not yet reported when the listener was killed are not reported after the restart (the sender was told they
were stored; send the study again); they are kept for the window like the rest.

    medmm pacs listen --aet MEDMM --port 11112 --allowed-aets CT01,PACS --checkpoint C \\
        --forward-to PACS@10.0.0.5:104 --retry-seconds 60
    medmm pacs resend runs/pacs/undelivered --to PACS@10.0.0.5:104      delivered files move to .../delivered/
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import struct
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.datadict import keyword_dict

from ..config import ListenerConfig, parse_destination  # noqa: F401  (ListenerConfig: defined there)
from ..config import check_aet as _check_aet  # noqa: F401
from ..errors import DicomError, InvalidInputError, excerpt
from ..io.dicom import open_dataset
from ..utils import optional_import
from .dicomweb import BACKOFF_FIRST_S, BACKOFF_MAX_S

log = logging.getLogger("medmm.pacs")
OUT_OF_RESOURCES = 0xA700  # C-STORE status: refused, out of resources
CANNOT_UNDERSTAND = 0xC000  # C-STORE status: error, cannot understand
SUCCESS_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}  # success and warnings (coercion, elements discarded)
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
MAX_PDU_BYTES = 256 << 10
"""The longest PDU the listener reads. An A-ASSOCIATE-RQ proposing 128 storage contexts with every transfer
syntax pynetdicom knows is 154 KiB; P-DATA PDUs are negotiated at ``AE.maximum_pdu_size`` (16 KiB)."""
MAX_ASSOCIATIONS = 16
"""Associations at once; pynetdicom answers the next one with A-ASSOCIATE-RJ (transient: the caller retries)."""
MAX_CONNECTIONS = 2 * MAX_ASSOCIATIONS
"""TCP connections at once (associations, TLS handshakes, callers yet to send their A-ASSOCIATE-RQ); more are
closed before a byte is read, so a flood of connections holds neither threads nor memory."""
NETWORK_TIMEOUT_S = 60
"""ACSE/DIMSE timeouts, and how long a peer may stay silent in the middle of a PDU or a TLS handshake."""
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600
STUDY_RECORD = ".study"
"""In each spool folder: its Study Instance UID, so that a restarted listener knows whose instances they are."""
_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*[,.;:]?")
_BRACKETED = re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`|\([^()]*\)|\[[^\[\]]*\]|\{[^{}]*\}|<[^<>]*>")
_MODALITIES = frozenset(
    "AR ASMT AU BDUS BI BMD CR CT CTPROTOCOL DG DOC DX ECG EPS ES FID GM HC HD IO IOL IVOCT IVUS KER KO LEN LS MG "
    "MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PLAN PR PT PX REG RESP RF RG RTDOSE RTIMAGE RTPLAN "
    "RTRECORD RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA XC".split())
"""DICOM's defined terms for Modality (PS3.3 C.7.3.1.1.1): the one header text a study record keeps."""


def safe_message(text: str) -> str:
    """What of an error message may go into a log or ``studies.jsonl``: its lower-case words and DICOM keywords.

    Header values reach error messages from pydicom, highdicom and our own readers, quoted or not; a reader
    cannot know which words are values. So quoted and bracketed spans go whole, and so does every word with a
    digit, a capital letter (a DICOM keyword excepted: ``PatientBirthDate`` names an attribute, never its
    value) or another symbol. ``Unable to convert '1980-02-31SECRETDOB' to 'DA' object`` becomes ``to convert to
    object``; ``no image series to read (series: CT x1)`` keeps ``no image series to read``.
    """
    prev = None
    while prev != text:  # nested brackets, innermost first
        prev, text = text, _BRACKETED.sub(" ", text)
    words = [w for w in text.split() if _WORD.fullmatch(w) or w.rstrip(",.;:") in keyword_dict]
    return " ".join(words)[:300] or "(details withheld: they may quote header values)"


def safe_record(value, key: str = ""):
    """A study's audit record (:class:`medmm.serve.study.StudyReport` ``record``) without header text: UIDs only
    when well-formed (else None), Modality only when it is a defined term (else ``"other"``), and the series
    selection's ``reason`` (it quotes header values) left out. Numbers and our own settings stay."""
    if isinstance(value, dict):
        return {k: safe_record(v, k) for k, v in value.items() if k != "reason"}
    if isinstance(value, list):
        return [safe_record(v, key) for v in value]
    if isinstance(value, str) and key.endswith("uid"):
        return value if _UID.fullmatch(value) and len(value) <= 64 else None
    if isinstance(value, str) and key == "modality":
        return value if value in _MODALITIES else "other"
    return value


def _private_dir(path: Path) -> Path:
    """``path`` as a folder that only its owner can enter (existing folders are narrowed too)."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    os.chmod(path, PRIVATE_DIR)
    return path


def _private_file(path: Path, mode: str = "wb", exclusive: bool = False):
    """Open ``path`` for writing, created 0600 (an existing file is narrowed to 0600 first)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode.startswith("a") else os.O_TRUNC)
    fd = os.open(path, flags | (os.O_EXCL if exclusive else 0), PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)
    return os.fdopen(fd, mode)


@dataclass
class Destination:
    """Where SRs go: ``AET@host:port`` (C-STORE) or an ``http(s)://`` DICOMweb root (STOW-RS)."""

    kind: str
    url: str | None = None
    aet: str | None = None
    host: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str, what: str = "--forward-to") -> Destination:
        return cls(**parse_destination(text, what))

    def __str__(self) -> str:
        return self.url if self.kind == "dicomweb" else f"{self.aet}@{self.host}:{self.port}"


def no_delay(assoc) -> None:
    """Disable Nagle's algorithm on an association's socket. pynetdicom writes a DIMSE message in several small
    sends; with Nagle on, the peer's delayed ACK holds each C-STORE for tens of milliseconds.
    DCMTK does the same by default."""
    import socket

    try:
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # pynetdicom internals moved, or the socket is gone: only slower
        pass


# ---------------------------------------------------------------------------------------------- delivery
class DeliveryRefused(RuntimeError):
    """The destination answered and said no (a permanent association rejection, a failure status, a STOW-RS
    failure): sending the same dataset again will not help, so it is not retried."""


def send_c_store(sr, dest: Destination, calling_aet: str, timeout_s: float = 30.0) -> None:
    """One C-STORE of one dataset to ``dest``.

    Raises:
        ConnectionError: no association (refused, aborted, rejected-transient), no answer, or the peer is out
            of resources (0xA7xx): worth retrying.
        DeliveryRefused: the association was rejected permanently or the C-STORE failed: not worth retrying.
    """
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    own = getattr(getattr(sr, "file_meta", None), "TransferSyntaxUID", None)
    if own and own not in syntaxes:  # a kept file in another transfer syntax is sent as it is
        syntaxes.insert(0, own)
    ae.add_requested_context(sr.SOPClassUID, syntaxes)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.aet)
    if not assoc.is_established:
        rsp = getattr(assoc.acceptor, "primitive", None)
        if assoc.is_rejected and getattr(rsp, "result", None) == 0x01:
            raise DeliveryRefused(f"{dest} rejected the association permanently ({getattr(rsp, 'reason_str', '')})")
        raise ConnectionError(f"association with {dest} was not accepted")
    no_delay(assoc)
    try:
        status = assoc.send_c_store(sr)
    finally:
        assoc.release()
    code = int(status.Status) if status and "Status" in status else None
    if code is None:
        raise ConnectionError(f"{dest} sent no C-STORE response (association aborted or timed out)")
    if code >> 8 == 0xA7:
        raise ConnectionError(f"{dest} is out of resources (C-STORE status {hex(code)})")
    if code not in SUCCESS_STATUSES:
        raise DeliveryRefused(f"{dest} answered C-STORE with status {hex(code)}")


@dataclass
class Delivery:
    """The outcome of :func:`deliver`."""

    ok: bool
    attempts: int
    """Attempts made (1 when the first one succeeded)."""
    seconds: float
    error: str | None = None
    """The last error's type name (``ConnectionError``, ``DeliveryRefused``, ``HTTPError`` ...)."""
    message: str | None = None


def deliver(ds, dest: Destination, calling_aet: str = "MEDMM", retry_s: float = 60.0, token_file=None,
            cancel: threading.Event | None = None) -> Delivery:
    """Send one dataset to ``dest``, retrying failures that may pass (connection refused or dropped, the peer
    busy, HTTP 408/429/5xx) with exponential back-off (0.5 s doubling, at most 10 s apart) until ``retry_s``
    seconds after the first failure, or until ``cancel`` is set.

    STOW-RS retries live in the HTTP session (a urllib3 ``Retry``, :func:`medmm.serve.dicomweb.retry_session`);
    C-STORE retries are this function's bounded loop around :func:`send_c_store`. Never raises for a failed
    delivery: the :class:`Delivery` says what happened.
    """
    t0 = time.monotonic()
    if dest.kind == "dicomweb":
        from .dicomweb import dicomweb_client, store_sr

        failures: list[str] = []
        try:
            store_sr(dicomweb_client(dest.url, token_file, retry_s=retry_s, cancel=cancel, failures=failures), ds)
            return Delivery(True, len(failures) + 1, time.monotonic() - t0)
        except Exception as e:  # requests' ConnectionError/HTTPError, a refusal in the STOW-RS answer
            return Delivery(False, len(failures) + 1, time.monotonic() - t0, type(e).__name__, str(e)[:500])
    attempts, delay, deadline = 0, BACKOFF_FIRST_S, None
    while True:
        attempts += 1
        try:
            send_c_store(ds, dest, calling_aet)
            return Delivery(True, attempts, time.monotonic() - t0)
        except DeliveryRefused as e:
            return Delivery(False, attempts, time.monotonic() - t0, type(e).__name__, str(e)[:500])
        except OSError as e:  # ConnectionError, timeouts, socket errors: the peer may come back
            now = time.monotonic()
            deadline = deadline if deadline is not None else now + retry_s
            wait = min(delay, deadline - now)
            if wait <= 0 or (cancel is not None and cancel.is_set()):
                return Delivery(False, attempts, now - t0, type(e).__name__, str(e)[:500])
            log.warning("C-STORE to %s failed (%s, attempt %d); retrying in %.1f s, for up to %.0f s more", dest,
                        type(e).__name__, attempts, wait, deadline - now)
            if cancel is not None:
                cancel.wait(wait)
            else:
                time.sleep(wait)
            delay = min(delay * 2, BACKOFF_MAX_S)


def resend(path: str | Path, dest: Destination, calling_aet: str = "MEDMM", retry_s: float = 60.0,
           token_file=None) -> dict:
    """Deliver kept SRs: the ``*.dcm`` files directly in folder ``path`` (or the one file ``path``) to ``dest``.

    A delivered file moves to ``delivered/`` beside it; a file that fails stays where it is. Once one file's
    retry window has run out the destination is taken to be down, and the files after it get one attempt each
    (so a long queue does not wait ``retry_s`` per file).

    Returns:
        ``{"to", "delivered", "failed", "files": [{"file", "sop_instance_uid", "study_instance_uid", "outcome",
        "attempts", "moved_to" | "error" + "message"}]}`` (UIDs only, never patient identifiers).
    """

    from ..errors import DicomError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    files = [path] if path.is_file() else sorted(q for q in path.glob("*.dcm") if q.is_file())
    done = path.parent / "delivered" if path.is_file() else path / "delivered"
    out = {"to": str(dest), "delivered": 0, "failed": 0, "files": []}
    window = retry_s
    for f in files:
        row: dict = {"file": str(f)}
        try:
            ds = open_dataset(f)  # the one defensive reader: a broken file is a DicomError naming it
            row.update(sop_instance_uid=str(ds.SOPInstanceUID), study_instance_uid=str(ds.StudyInstanceUID))
            res = deliver(ds, dest, calling_aet, window, token_file)
            row["attempts"] = res.attempts
            if res.ok:
                done.mkdir(exist_ok=True)
                row.update(outcome="delivered", moved_to=str(shutil.move(f, done / f.name)))
            else:
                row.update(outcome="failed", error=res.error, message=res.message)
                if res.attempts > 1:
                    window = 0.0  # retried for the whole window: the destination is down, one attempt each for the rest
        except DicomError as e:
            row.update(outcome="failed", error=type(e).__name__, message=e.reason[:500])
        out["delivered" if row["outcome"] == "delivered" else "failed"] += 1
        out["files"].append(row)
        log.info("%s: %s%s", f.name, row["outcome"], f" ({row['error']}: {row['message']})" if "error" in row else "")
    return out


# ---------------------------------------------------------------------------------------------- the wire
def server_tls_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """The listener's DICOM TLS context: TLS 1.2 or later, ``cert``/``key`` (PEM) as its identity and, with
    ``ca``, a client certificate signed by that CA required of every caller."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        if ca:
            ctx.load_verify_locations(cafile=ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"--tls-cert/--tls-key/--tls-ca: cannot load ({type(e).__name__}: {e})") from e
    return ctx


@dataclass
class _Conn:
    """One TCP connection, for the audit log: what the peer sent and how its association ended."""

    peer: str
    opened: float = field(default_factory=time.monotonic)
    bytes: int = 0
    """Bytes read from the peer (after TLS)."""
    calling_ae: str | None = None
    status: str = "closed"
    """How it ended: closed (no association), released, aborted, rejected, refused-pdu-length, refused-tls, refused-busy."""


class _PduGuard:
    """Frames what pynetdicom reads from one connection into PDUs and ends the connection when a PDU header
    declares more than ``cap`` bytes, before the body is read.

    pynetdicom's DUL reads the 6-byte header (type, reserved, 4-byte big-endian length), then ``recv(length)``,
    which loops until that many bytes have come: a stranger declaring 4 GiB is fed as much memory as it sends.
    The guard replaces the ``recv`` of the connection's :class:`pynetdicom.transport.AssociationSocket` and counts
    the stream itself, so it holds whatever sizes the DUL asks for; refusing returns no bytes, which the DUL reads
    as a closed connection (Evt17: the association is aborted and the socket shut).
    """

    def __init__(self, sock, cap: int, conn: _Conn, on_refuse):
        self._recv, self.cap, self.conn, self.on_refuse = sock.recv, cap, conn, on_refuse
        self._sock = sock
        self._header = bytearray()
        self._body_left = 0
        self.refused = False
        sock.recv = self.recv

    def recv(self, nr_bytes: int) -> bytearray:
        out = bytearray()
        while len(out) < nr_bytes and not self.refused:
            want = min(nr_bytes - len(out), self._body_left or 6 - len(self._header))
            chunk = self._recv(want)
            if not chunk:  # the peer closed: the DUL sees a short read
                break
            self.conn.bytes += len(chunk)
            out += chunk
            if self._body_left:
                self._body_left -= len(chunk)
                continue
            self._header += chunk
            if len(self._header) == 6:
                pdu_type, length = self._header[0], struct.unpack(">L", self._header[2:])[0]
                self._header.clear()
                if length > self.cap:
                    self.refused = True
                    self._shut()
                    self.on_refuse(self.conn, pdu_type, length)
                    return bytearray()
                self._body_left = length
        return out

    def _shut(self) -> None:
        """Close the TCP connection now: unread bytes are dropped by the kernel (the peer gets a reset)."""
        raw = getattr(self._sock, "socket", None)
        if raw is not None:
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_RDWR)


def _server_classes():
    """pynetdicom's threaded association server and request handler, guarded (PDU cap, connection cap, TLS in the
    connection's own thread). Built on first use: pynetdicom is an optional extra."""
    from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

    if not callable(getattr(RequestHandler, "_create_association", None)):  # fail closed on a pynetdicom change
        import pynetdicom

        raise RuntimeError(f"pynetdicom {pynetdicom.__version__}: RequestHandler._create_association is gone, so "
                           "the listener cannot cap PDU lengths; use pynetdicom 2.x or 3.0")

    class GuardedHandler(RequestHandler):
        def handle(self) -> None:
            listener = self.server.listener
            conn = self.conn = _Conn(peer=str(self.client_address[0]))
            try:
                self.request.settimeout(NETWORK_TIMEOUT_S)  # a silent peer cannot hold a read forever
                if listener.tls is not None:
                    # here, in the connection's thread: pynetdicom's own wrap runs in the accept loop, where one
                    # silent client would stall every other
                    try:
                        self.request = listener.tls.wrap_socket(self.request, server_side=True)
                    except (OSError, ssl.SSLError) as e:
                        conn.status = "refused-tls"
                        log.warning("connection from %s closed: TLS handshake failed (%s)", conn.peer,
                                    type(e).__name__)
                        with contextlib.suppress(OSError):
                            self.request.close()
                        listener._audit_conn(conn)
                        return
                super().handle()
            finally:
                self.server.handshakes_done()

        def _create_association(self):
            assoc = super()._create_association()
            self.server.listener._track(assoc, self.conn)
            _PduGuard(assoc.dul.socket, self.server.listener.max_pdu, self.conn, self.server.listener._on_long_pdu)
            return assoc

    class GuardedServer(ThreadedAssociationServer):
        listener = None
        _handshaking = 0

        def process_request(self, request, client_address) -> None:
            with self._count_lock:
                # live association threads whose connection is still open (pynetdicom keeps an acceptor thread
                # waiting for its A-ASSOCIATE-RQ for acse_timeout even after the connection was closed)
                live = sum(1 for a in self.active_associations if self.listener._is_open(a))
                busy = live + self._handshaking >= MAX_CONNECTIONS
                if not busy:
                    self._handshaking += 1
            if busy:  # closed before a byte is read
                conn = _Conn(peer=str(client_address[0]), status="refused-busy")
                self.shutdown_request(request)
                log.warning("connection from %s closed: %d connections open", conn.peer, MAX_CONNECTIONS)
                self.listener._audit_conn(conn)
                return
            super().process_request(request, client_address)

        def handshakes_done(self) -> None:
            with self._count_lock:
                self._handshaking -= 1

        def shutdown(self) -> None:
            with contextlib.suppress(ValueError):  # not in the AE's server list: it was not started by the AE
                super().shutdown()

    GuardedServer._count_lock = threading.Lock()
    return GuardedServer, GuardedHandler


class AuditLog:
    """``--audit-log``: one JSON line per association and per C-STORE/C-ECHO, in a file created 0600.

    Keys: ``time``, ``calling_ae`` (None before the A-ASSOCIATE-RQ was read), ``peer`` (IP address), ``endpoint``
    (``A-ASSOCIATE``, ``C-STORE``, ``C-ECHO``), ``status`` (an association's end: released, aborted, rejected,
    closed, refused-pdu-length, refused-tls, refused-busy; a DIMSE status as ``0x0000``), ``bytes`` (read from the
    peer: the connection's, or the dataset's) and ``duration_s``. Never header values, never UIDs.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.parent.exists():
            _private_dir(self.path.parent)
        self._lock = threading.Lock()
        self._f = _private_file(self.path, "a")

    def write(self, endpoint: str, status: str, calling_ae, peer: str | None, nbytes: int | None,
              seconds: float) -> None:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "calling_ae": calling_ae, "peer": peer,
                "endpoint": endpoint, "status": status, "bytes": nbytes, "duration_s": round(seconds, 4)}
        with self._lock:
            if not self._f.closed:
                self._f.write(json.dumps(line) + "\n")
                self._f.flush()

    def close(self) -> None:
        with self._lock:
            self._f.close()


# ---------------------------------------------------------------------------------------------- the listener
def _calling_ae(assoc) -> str | None:
    """The caller's AE title as sent (printable, at most 16 characters), for logs and the audit log."""
    title = getattr(getattr(assoc, "requestor", None), "ae_title", None)
    return excerpt(str(title).strip(), 16) if title else None


@dataclass
class _Study:
    """One burst of a study: instances received until none came for ``study_timeout_s``."""

    uid: str
    folder: Path
    calling_aet: str
    first: float
    last: float
    count: int = 0
    writing: int = 0
    queued_at: float = 0.0


@dataclass
class _Held:
    """A study's spool folder, which outlives its bursts by ``amend_window_s``."""

    folder: Path
    bursts: int = 0
    """Bursts collecting, queued or in inference: the folder is in use."""
    idle_since: float = 0.0
    """When the last burst was done (monotonic seconds)."""


class StudyListener:
    """The storage SCP, its study collector and one inference worker around a :class:`ReportPipeline`."""

    def __init__(self, pipeline, config: ListenerConfig):
        optional_import("pynetdicom")
        self.pipeline = pipeline
        self.cfg = config
        self.tls = server_tls_context(config.tls_cert, config.tls_key, config.tls_ca) if config.tls_cert else None
        self.out = _private_dir(Path(config.out_dir))
        self.spool = _private_dir(Path(config.spool_dir) if config.spool_dir else self.out / "spool")
        self.kept = self.out / "undelivered"
        _private_dir(self.out / "sr")
        if self.kept.exists():
            _private_dir(self.kept)
        self.log_path = self.out / "studies.jsonl"
        if self.log_path.exists():
            os.chmod(self.log_path, PRIVATE_FILE)
        self.dest = Destination.parse(config.forward_to) if config.forward_to else None
        self._lock = threading.Lock()
        self._log_lock = threading.Lock()
        self._pending: dict[str, _Study] = {}
        self._held: dict[str, _Held] = {}
        self._last_sr: dict[str, Path] = self._lineage_from_log()
        self._queue: queue.Queue[_Study] = queue.Queue(maxsize=config.max_queue)
        self._waiting: list[_Study] = []  # taken from the queue by the worker, not yet processed (worker's own)
        self._in_flight = 0  # bursts queued or in inference (counted under the lock from queueing to done)
        self._refused: set[str] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = None
        self._conns: dict[int, _Conn] = {}  # id(association) -> its connection, while it is open
        self.max_pdu = MAX_PDU_BYTES
        self.audit = AuditLog(config.audit_log) if config.audit_log else None
        self._validation = None  # pydicom's reading validation mode before start()
        self.counts = {"ok": 0, "failed": 0, "sr_not_delivered": 0, "refused": 0, "rejected_associations": 0,
                       "refused_connections": 0}
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        """Studies reported together -> how many times the worker did so."""
        self._ids = itertools.count(self._sweep_spool())

    def _sweep_spool(self) -> int:
        """Retention that survives a crash: delete the spool folders of an earlier run whose newest file is older
        than ``amend_window_s`` (all of them kept with ``keep_studies``) and adopt the others, which a later
        burst of their study joins and which the collector deletes when their window ends. Half-received files
        (``.*.part``) go. Returns the next free folder number."""
        now_wall, now = time.time(), time.monotonic()
        last_id = -1
        for folder in sorted(p for p in self.spool.iterdir() if p.is_dir() and not p.is_symlink()):
            number = folder.name.split("-", 1)[0]
            last_id = max(last_id, int(number)) if number.isdigit() else last_id
            files = [f for f in folder.iterdir() if f.is_file()]
            age = now_wall - max([folder.stat().st_mtime] + [f.stat().st_mtime for f in files])
            if not self.cfg.keep_studies and age >= self.cfg.amend_window_s:
                shutil.rmtree(folder, ignore_errors=True)
                continue
            for f in files:
                if f.name.endswith(".part"):
                    f.unlink(missing_ok=True)
            _private_dir(folder)
            uid = self._study_of(folder)
            key = uid if uid is not None and uid not in self._held else f"?{folder.name}"  # never a UID
            self._held[key] = _Held(folder, idle_since=now - max(age, 0.0))
        if self._held:
            log.info("spool: %d study folder(s) of an earlier run kept for their amend window", len(self._held))
        return last_id + 1

    @staticmethod
    def _study_of(folder: Path) -> str | None:
        try:
            uid = json.loads((folder / STUDY_RECORD).read_text())["study_instance_uid"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return uid if isinstance(uid, str) and _UID.fullmatch(uid) else None

    def _lineage_from_log(self) -> dict[str, Path]:
        """Study UID -> its latest SR file, from an earlier run's ``studies.jsonl``."""
        last: dict[str, Path] = {}
        if not self.log_path.exists():
            return last
        for line in self.log_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if rec.get("sr_file") and rec.get("study_instance_uid") and Path(rec["sr_file"]).exists():
                last[rec["study_instance_uid"]] = Path(rec["sr_file"])
        return last

    # -------------------------------------------------------------------------------------- DIMSE side
    def _ae(self):
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.cfg.aet)
        ae.require_calling_aet = list(self.cfg.allowed_aets)
        ae.require_called_aet = True
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.maximum_associations = MAX_ASSOCIATIONS
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = NETWORK_TIMEOUT_S
        # P-DATA PDUs are negotiated below the PDU cap, with room for peers that count the header in
        self.max_pdu = max(MAX_PDU_BYTES, (ae.maximum_pdu_size or 0) + (64 << 10))
        return ae

    # audit: each connection is tracked from its A-ASSOCIATE-RQ to its close
    def _track(self, assoc, conn: _Conn) -> None:
        with self._lock:
            self._conns[id(assoc)] = conn

    def _is_open(self, assoc) -> bool:
        conn = self._conns.get(id(assoc))
        return conn is not None and not conn.status.startswith("refused")

    def _conn(self, event) -> _Conn:
        return self._conns.get(id(event.assoc)) or _Conn(peer="?")

    def _ended(self, status: str):
        def handler(event) -> None:
            conn = self._conn(event)
            conn.status = status
            conn.calling_ae = _calling_ae(event.assoc)
        return handler

    def _on_accepted(self, event) -> None:
        no_delay(event.assoc)
        conn = self._conn(event)
        conn.status, conn.calling_ae = "accepted", _calling_ae(event.assoc)

    def _on_conn_close(self, event) -> None:
        assoc = event.assoc
        if getattr(assoc.requestor, "primitive", None) is None:
            # closed before its A-ASSOCIATE-RQ: pynetdicom's acceptor thread would still wait acse_timeout for it
            # and count against maximum_associations; an empty item makes it give up now
            with contextlib.suppress(AttributeError):
                assoc.dul.to_user_queue.put(None)
        with self._lock:
            conn = self._conns.pop(id(assoc), None)
        if conn is not None:
            if conn.status == "accepted":  # closed without A-RELEASE or A-ABORT
                conn.status = "closed"
            self._audit_conn(conn)

    def _audit_conn(self, conn: _Conn) -> None:
        if conn.status.startswith("refused"):
            with self._lock:
                self.counts["refused_connections"] += 1
        if self.audit is not None:
            self.audit.write("A-ASSOCIATE", conn.status, conn.calling_ae, conn.peer, conn.bytes,
                             time.monotonic() - conn.opened)

    def _on_long_pdu(self, conn: _Conn, pdu_type: int, length: int) -> None:
        conn.status = "refused-pdu-length"
        log.warning("connection from %s closed: a PDU of type 0x%02X declared %d bytes (at most %d are read)",
                    conn.peer, pdu_type, length, self.max_pdu)

    def _on_echo(self, event) -> int:
        if self.audit is not None:
            self.audit.write("C-ECHO", "0x0000", _calling_ae(event.assoc), self._conn(event).peer, 0, 0.0)
        return 0x0000

    def _on_store(self, event) -> int:
        t0 = time.monotonic()
        status = CANNOT_UNDERSTAND
        try:
            status = self._store(event)
            return status
        finally:
            if self.audit is not None:
                data = getattr(event.request, "DataSet", None)
                nbytes = data.getbuffer().nbytes if hasattr(data, "getbuffer") else None
                self.audit.write("C-STORE", f"0x{status:04X}", _calling_ae(event.assoc), self._conn(event).peer,
                                 nbytes, time.monotonic() - t0)

    def _store(self, event) -> int:
        ds = event.dataset
        study_uid, sop = str(ds.get("StudyInstanceUID", "")), str(ds.get("SOPInstanceUID", ""))
        if not (_UID.fullmatch(study_uid) and _UID.fullmatch(sop) and len(sop) <= 64 and len(study_uid) <= 64):
            # the SOP Instance UID names the spooled file: nothing but digits and dots gets near a path
            log.warning("instance from AE '%s' refused: missing or malformed Study/SOP Instance UID",
                        _calling_ae(event.assoc))
            return CANNOT_UNDERSTAND
        now = time.monotonic()
        with self._lock:
            st = self._pending.get(study_uid)
            if st is None:
                if len(self._pending) + self._in_flight >= self.cfg.max_queue:
                    self._refuse(study_uid, event.assoc.requestor.ae_title, "queue full")
                    return OUT_OF_RESOURCES
                held = self._held.get(study_uid)
                if held is None:  # a new study (or one whose instances were already let go)
                    held = self._held[study_uid] = _Held(self.spool / f"{next(self._ids):06d}-{int(time.time())}")
                held.bursts += 1
                st = _Study(study_uid, held.folder, str(event.assoc.requestor.ae_title), now, now)
                self._pending[study_uid] = st
                self._refused.discard(study_uid)
            if st.count + st.writing >= self.cfg.max_instances:
                self._refuse(study_uid, st.calling_aet, f"more than {self.cfg.max_instances} instances")
                return OUT_OF_RESOURCES
            st.writing += 1
        try:
            if not st.folder.exists():
                _private_dir(st.folder)
                with _private_file(st.folder / STUDY_RECORD, "w") as f:  # whose folder, for a restarted listener
                    json.dump({"study_instance_uid": study_uid}, f)
            # the bytes as received, with a file meta header: no decode/re-encode of the pixels. Written under a
            # hidden name and renamed, so a report being made from this folder never reads half a file.
            part = st.folder / f".{sop}.part"
            with _private_file(part) as f:
                f.write(event.encoded_dataset(include_meta=True))
            os.replace(part, st.folder / f"{sop}.dcm")
        finally:
            with self._lock:
                st.writing -= 1
                st.count += 1
                st.last = time.monotonic()
        return 0x0000

    def _refuse(self, study_uid: str, aet, why: str) -> None:
        if study_uid in self._refused:
            return
        self._refused.add(study_uid)
        self.counts["refused"] += 1
        self._log({"study_instance_uid": study_uid, "calling_aet": str(aet), "outcome": "refused", "error": why})

    def _on_rejected(self, event) -> None:
        self.counts["rejected_associations"] += 1
        self._ended("rejected")(event)
        log.warning("association from AE '%s' at %s rejected (not in --allowed-aets or wrong called AE title)",
                    _calling_ae(event.assoc), self._conn(event).peer)

    # -------------------------------------------------------------------------------------- studies
    def _collector(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                done = [s for s in self._pending.values()
                        if s.writing == 0 and now - s.last >= self.cfg.study_timeout_s]
                for s in done:
                    del self._pending[s.uid]
                    s.queued_at = now
                    self._in_flight += 1
                    self._queue.put_nowait(s)  # admission keeps the queue below its bound
                expired = [] if self.cfg.keep_studies else [
                    uid for uid, h in self._held.items()
                    if h.bursts == 0 and now - h.idle_since >= self.cfg.amend_window_s]
                folders = [self._held.pop(uid).folder for uid in expired]
            for f in folders:  # outside the lock: a large study takes a while to delete
                shutil.rmtree(f, ignore_errors=True)
            self._stop.wait(min(0.2, self.cfg.study_timeout_s / 4))

    def _next_batch(self) -> list[_Study]:
        """The next study and the studies waiting behind it, in arrival order, up to ``max_batch``; a later burst of
        a study already in the batch waits for a later batch (it amends this one's SR, so bursts stay in order)."""
        if not self._waiting:
            try:
                self._waiting.append(self._queue.get(timeout=0.2))
            except queue.Empty:
                return []
        if self.cfg.max_batch > 1:
            while True:  # everything already queued (the queue is bounded by max_queue)
                try:
                    self._waiting.append(self._queue.get_nowait())
                except queue.Empty:
                    break
        batch, later, uids = [], [], set()
        for st in self._waiting:
            if len(batch) < self.cfg.max_batch and st.uid not in uids:
                batch.append(st)
                uids.add(st.uid)
            else:
                later.append(st)
        self._waiting = later
        return batch

    def _worker(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if not batch:
                continue
            try:
                self._process(batch)
            finally:
                with self._lock:
                    now = time.monotonic()
                    for st in batch:
                        self._in_flight -= 1
                        held = self._held.get(st.uid)
                        if held is not None:
                            held.bursts -= 1
                            held.idle_since = now
                for st in batch:  # the window starts now, for a listener restarted after a crash too
                    with contextlib.suppress(OSError):
                        os.utime(st.folder / STUDY_RECORD)

    def _process(self, batch: list[_Study]) -> None:
        """Report the studies of ``batch`` (distinct studies) with one batched inference, then save, deliver and
        log each SR in turn. Each study holds every instance received so far, and amends the study's latest SR
        (single worker, one burst of a study per batch: bursts run in order)."""
        t0 = time.monotonic()
        predecessors = [self._predecessor(st.uid) for st in batch]
        results: list
        if len(batch) == 1:
            try:
                results = [self.pipeline.run(batch[0].folder, predecessor=predecessors[0])]
            except Exception as e:  # handled per study in _finish
                results = [e]
        else:
            try:  # each study's own failure comes back in its place; this catches a crash of the call itself
                results = self.pipeline.run_many([st.folder for st in batch], predecessors=predecessors)
            except Exception as e:
                results = [e] * len(batch)
        self.batch_sizes[len(batch)] += 1
        for st, res in zip(batch, results):
            rec: dict = {"study_instance_uid": st.uid, "calling_aet": st.calling_aet, "instances": st.count,
                         "receive_s": round(st.last - st.first, 3), "queue_wait_s": round(t0 - st.queued_at, 3),
                         "batch_size": len(batch)}
            self._finish(st, rec, res)

    def _finish(self, st: _Study, rec: dict, res) -> None:
        """Save, deliver and log one study's outcome (``res``: its StudyReport or the exception that failed it)."""
        try:
            if isinstance(res, Exception):
                raise res
            sr_path = self.out / "sr" / f"{res.sr.SOPInstanceUID}.dcm"
            with _private_file(sr_path) as f:
                res.sr.save_as(f, enforce_file_format=True)
            self._last_sr[st.uid] = sr_path
            rec.update({k: v for k, v in safe_record(res.record).items() if k != "study_instance_uid"})
            rec["study_instances"] = res.record["steps"][0]["instances"]
            rec["sr_file"] = str(sr_path)
            if self.dest is not None:
                sent = deliver(res.sr, self.dest, self.cfg.aet, self.cfg.retry_s, cancel=self._stop)
                rec["send_attempts"], rec["send_s"] = sent.attempts, round(sent.seconds, 3)
                if sent.ok:
                    rec["outcome"], rec["sent_to"] = "ok", str(self.dest)
                else:  # kept for `medmm pacs resend`
                    rec.update(outcome="sr_not_delivered", error=sent.error, message=sent.message,
                               kept_in=str(self._keep(sr_path)))
            else:
                rec["outcome"] = "ok"
        except InvalidInputError as e:  # messages may quote header values: only their safe words are kept
            rec.update(outcome="failed", error=type(e).__name__, message=safe_message(e.reason))
        except Exception as e:  # a crash inside one study must not stop the listener
            log.error("study %s: inference crashed (%s: %s); traceback, its message withheld:\n%s", st.uid,
                      type(e).__name__, safe_message(str(e)), "".join(traceback.format_tb(e.__traceback__)))
            rec.update(outcome="failed", error=type(e).__name__, message=safe_message(str(e)))
        rec["total_s"] = round(time.monotonic() - st.first, 3)
        self.counts[rec["outcome"]] += 1
        self._log(rec)

    def _predecessor(self, study_uid: str):
        """The header of the study's latest SR, or None (none yet, or its file is gone: a new lineage starts)."""
        path = self._last_sr.get(study_uid)
        if path is None:
            return None
        try:
            return open_dataset(path, stop_before_pixels=True)
        except (OSError, DicomError) as e:  # deleted or damaged by hand: report the study anyway, without the link
            log.warning("study %s: the previous SR %s cannot be read (%s); the new SR will not amend it", study_uid,
                        path.name, type(e).__name__)
            return None

    def _keep(self, sr_path: Path) -> Path:
        """Put an undelivered SR in ``out/undelivered/`` (a hard link to the copy in ``out/sr/`` when possible)."""
        _private_dir(self.kept)
        dest = self.kept / sr_path.name
        try:
            os.link(sr_path, dest)
        except OSError:  # another file system, or links not supported
            shutil.copy2(sr_path, dest)
        return dest

    def _log(self, rec: dict) -> None:
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **rec}
        with self._log_lock, _private_file(self.log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        log.info("study %s: %s%s", rec.get("study_instance_uid"), rec.get("outcome"),
                 f" ({rec.get('error')}: {rec.get('message', '')})" if rec.get("error") else "")

    # -------------------------------------------------------------------------------------- lifecycle
    def start(self) -> StudyListener:
        """Listen (plain DIMSE, or DICOM TLS with ``tls_cert``) and start the collector and the worker.

        While the listener runs, pydicom's reading validation is off in this process: its warnings quote the
        offending header values (``stop()`` restores it)."""
        from pydicom import config as pydicom_config
        from pynetdicom import evt

        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its DEBUG level dumps datasets
        self._validation = pydicom_config.settings.reading_validation_mode
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        server_class, handler_class = _server_classes()
        # make_server, not start_server: pynetdicom wraps TLS in its accept loop and has no PDU cap; ours does
        # both in each connection's thread (ssl_context stays None here)
        self._server = self._ae().make_server(
            (self.cfg.host, self.cfg.port), server_class=server_class, request_handler=handler_class,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                          (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_ACCEPTED, self._on_accepted),
                          (evt.EVT_RELEASED, self._ended("released")), (evt.EVT_ABORTED, self._ended("aborted")),
                          (evt.EVT_CONN_CLOSE, self._on_conn_close)])
        self._server.listener = self
        t = threading.Thread(target=self._server.serve_forever, name="medmm-dimse", daemon=True)
        t.start()
        for fn in (self._collector, self._worker):
            t = threading.Thread(target=fn, name=f"medmm-{fn.__name__.strip('_')}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("listening as %s on %s:%d (%s); allowed callers: %s; SRs to %s", self.cfg.aet, self.cfg.host,
                 self.cfg.port, "DICOM TLS" + (", client certificates required" if self.cfg.tls_ca else "")
                 if self.tls else "plain DIMSE", ",".join(self.cfg.allowed_aets), self.dest or self.out / "sr")
        return self

    def busy(self) -> bool:
        with self._lock:
            return bool(self._pending or self._in_flight)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every received study has been processed (True) or ``timeout_s`` passed (False)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if not self.busy():
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Stop accepting, let the running batch finish (its SR deliveries stop retrying), log studies left
        unprocessed, delete the received instances (unless ``keep_studies``)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._stop.set()
        for t in self._threads:
            t.join(timeout=600)
        left = list(self._pending.values()) + self._waiting
        self._waiting = []
        while not self._queue.empty():
            left.append(self._queue.get_nowait())
        for st in left:
            self._log({"study_instance_uid": st.uid, "calling_aet": st.calling_aet, "instances": st.count,
                       "outcome": "not_processed", "error": "listener stopped"})
        if not self.cfg.keep_studies:  # received instances do not outlive the listener
            with self._lock:
                folders = [h.folder for h in self._held.values()]
                self._held.clear()
            for f in folders:
                shutil.rmtree(f, ignore_errors=True)
        if self._validation is not None:
            from pydicom import config as pydicom_config

            pydicom_config.settings.reading_validation_mode = self._validation
            self._validation = None
        if self.audit is not None:
            self.audit.close()

    def serve_forever(self) -> None:
        """Run until SIGINT/SIGTERM."""
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        self.start()
        print(json.dumps({"listening": f"{self.cfg.aet}@{self.cfg.host}:{self.cfg.port}", "tls": self.tls is not None,
                          "allowed_aets": self.cfg.allowed_aets, "forward_to": str(self.dest) if self.dest else None,
                          "log": str(self.log_path)}), flush=True)
        while not stop.wait(0.5):
            pass
        self.stop()
        print(json.dumps({"stopped": True, **self.counts, "batch_sizes": dict(sorted(self.batch_sizes.items()))}),
              flush=True)
