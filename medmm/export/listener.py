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

    medmm pacs listen --aet MEDMM --port 11112 --allowed-aets CT01,PACS --checkpoint C \\
        --forward-to PACS@10.0.0.5:104 --retry-seconds 60
    medmm pacs resend runs/pacs/undelivered --to PACS@10.0.0.5:104      delivered files move to .../delivered/
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import queue
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import ListenerConfig, parse_destination  # noqa: F401  (ListenerConfig: defined there)
from ..config import check_aet as _check_aet  # noqa: F401
from ..errors import InvalidInputError
from ..utils import optional_import
from .dicomweb import BACKOFF_FIRST_S, BACKOFF_MAX_S

log = logging.getLogger("medmm.pacs")
OUT_OF_RESOURCES = 0xA700  # C-STORE status: refused, out of resources
CANNOT_UNDERSTAND = 0xC000  # C-STORE status: error, cannot understand
SUCCESS_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}  # success and warnings (coercion, elements discarded)
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


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
    sends; with Nagle on, the peer's delayed ACK holds each C-STORE ~40 ms (measured 48 ms -> 5 ms on loopback).
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

    STOW-RS retries live in the HTTP session (a urllib3 ``Retry``, :func:`medmm.export.dicomweb.retry_session`);
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
    import pydicom

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
            try:
                ds = pydicom.dcmread(f)
            except Exception as e:  # pydicom raises many types on broken files
                raise DicomError(f, f"not a readable DICOM file ({type(e).__name__}: {e})") from e
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


# ---------------------------------------------------------------------------------------------- the listener
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
        self.out = Path(config.out_dir)
        self.spool = Path(config.spool_dir) if config.spool_dir else self.out / "spool"
        self.kept = self.out / "undelivered"
        (self.out / "sr").mkdir(parents=True, exist_ok=True)
        self.spool.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "studies.jsonl"
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
        self._ids = itertools.count()
        self.counts = {"ok": 0, "failed": 0, "sr_not_delivered": 0, "refused": 0, "rejected_associations": 0}
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        """Studies reported together -> how many times the worker did so."""

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
        ae.maximum_associations = 16
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60
        return ae

    def _on_store(self, event) -> int:
        ds = event.dataset
        study_uid, sop = str(ds.get("StudyInstanceUID", "")), str(ds.get("SOPInstanceUID", ""))
        if not (_UID.fullmatch(study_uid) and _UID.fullmatch(sop) and len(sop) <= 64):
            # the SOP Instance UID names the spooled file: nothing but digits and dots gets near a path
            log.warning("instance from AE '%s' refused: missing or malformed Study/SOP Instance UID",
                        event.assoc.requestor.ae_title)
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
            st.folder.mkdir(parents=True, exist_ok=True)
            # the bytes as received, with a file meta header: no decode/re-encode of the pixels. Written under a
            # hidden name and renamed, so a report being made from this folder never reads half a file.
            part = st.folder / f".{sop}.part"
            part.write_bytes(event.encoded_dataset(include_meta=True))
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
        r = event.assoc.requestor
        log.warning("association from AE '%s' at %s rejected (not in --allowed-aets or wrong called AE title)",
                    r.ae_title, r.address)

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
            res.sr.save_as(sr_path, enforce_file_format=True)
            self._last_sr[st.uid] = sr_path
            rec.update({k: v for k, v in res.record.items() if k != "study_instance_uid"})
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
        except InvalidInputError as e:
            rec.update(outcome="failed", error=type(e).__name__, message=e.reason[:500])
        except Exception as e:  # a crash inside one study must not stop the listener
            log.exception("study %s: inference crashed", st.uid)
            rec.update(outcome="failed", error=type(e).__name__, message=str(e)[:500])
        rec["total_s"] = round(time.monotonic() - st.first, 3)
        self.counts[rec["outcome"]] += 1
        self._log(rec)

    def _predecessor(self, study_uid: str):
        """The header of the study's latest SR, or None (none yet, or its file is gone: a new lineage starts)."""
        import pydicom

        path = self._last_sr.get(study_uid)
        if path is None:
            return None
        try:
            return pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as e:  # deleted or damaged by hand: report the study anyway, without the link
            log.warning("study %s: the previous SR %s cannot be read (%s); the new SR will not amend it", study_uid,
                        path.name, type(e).__name__)
            return None

    def _keep(self, sr_path: Path) -> Path:
        """Put an undelivered SR in ``out/undelivered/`` (a hard link to the copy in ``out/sr/`` when possible)."""
        self.kept.mkdir(parents=True, exist_ok=True)
        dest = self.kept / sr_path.name
        try:
            os.link(sr_path, dest)
        except OSError:  # another file system, or links not supported
            shutil.copy2(sr_path, dest)
        return dest

    def _log(self, rec: dict) -> None:
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **rec}
        with self._log_lock, open(self.log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        log.info("study %s: %s%s", rec.get("study_instance_uid"), rec.get("outcome"),
                 f" ({rec.get('error')}: {rec.get('message', '')})" if rec.get("error") else "")

    # -------------------------------------------------------------------------------------- lifecycle
    def start(self) -> StudyListener:
        from pynetdicom import evt

        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its DEBUG level dumps datasets
        self._server = self._ae().start_server(
            (self.cfg.host, self.cfg.port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected),
                          (evt.EVT_ACCEPTED, lambda event: no_delay(event.assoc))])
        for fn in (self._collector, self._worker):
            t = threading.Thread(target=fn, name=f"medmm-{fn.__name__.strip('_')}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("listening as %s on %s:%d; allowed callers: %s; SRs to %s", self.cfg.aet, self.cfg.host,
                 self.cfg.port, ",".join(self.cfg.allowed_aets), self.dest or self.out / "sr")
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

    def serve_forever(self) -> None:
        """Run until SIGINT/SIGTERM."""
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        self.start()
        print(json.dumps({"listening": f"{self.cfg.aet}@{self.cfg.host}:{self.cfg.port}",
                          "allowed_aets": self.cfg.allowed_aets, "forward_to": str(self.dest) if self.dest else None,
                          "log": str(self.log_path)}), flush=True)
        while not stop.wait(0.5):
            pass
        self.stop()
        print(json.dumps({"stopped": True, **self.counts, "batch_sizes": dict(sorted(self.batch_sizes.items()))}),
              flush=True)
