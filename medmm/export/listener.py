"""``medmm pacs listen``: a DICOM storage SCP that turns each received study into an SR.

    modality / PACS / storescu --C-STORE--> StudyListener   (only calling AE titles in --allowed-aets)
      -> spool/<n>/ one folder per study; the study is complete when no instance came for --study-timeout s
      -> bounded queue (--max-queue studies collecting or waiting; a new study beyond it gets 0xA700)
      -> worker: ReportPipeline (load -> select series -> infer -> write SR) -> out/sr/<uid>.dcm
      -> --forward-to AET@host:port (C-STORE) or http(s)://.../dicom-web (STOW-RS)
      -> out/studies.jsonl: one line per study with its outcome (UIDs, counts, timings, error type and
         message; never patient names or IDs, never the report text)

A failing study (unreadable pixels, no image series, a crash inside the model) is logged as
``failed`` and the listener goes on with the next one. Instances of a study that arrive after it was
reported form a new collection and get their own SR (and log line). Without ``--forward-to`` the SRs stay in
``out/sr/`` (DIMSE has no way back to a caller whose port is not configured).

    medmm pacs listen --aet MEDMM --port 11112 --allowed-aets CT01,PACS --checkpoint C \\
        --forward-to PACS@10.0.0.5:104
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidInputError
from ..utils import optional_import

log = logging.getLogger("medmm.pacs")
OUT_OF_RESOURCES = 0xA700  # C-STORE status: refused, out of resources
SUCCESS_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}  # success and warnings (coercion, elements discarded)


def _check_aet(aet: str, what: str) -> str:
    aet = aet.strip()
    if not aet or len(aet) > 16 or "\\" in aet or not aet.isprintable():
        raise ValueError(f"{what}: '{aet}' is not a valid AE title (1-16 printable characters, no backslash)")
    return aet


@dataclass
class Destination:
    """Where SRs go: ``AET@host:port`` (C-STORE) or an ``http(s)://`` DICOMweb root (STOW-RS)."""

    kind: str
    url: str | None = None
    aet: str | None = None
    host: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> Destination:
        if text.startswith(("http://", "https://")):
            return cls("dicomweb", url=text)
        try:
            aet, hostport = text.split("@", 1)
            host, port = hostport.rsplit(":", 1)
            return cls("dimse", aet=_check_aet(aet, "--forward-to"), host=host, port=int(port))
        except ValueError as e:
            raise ValueError(f"--forward-to '{text}': use AET@host:port or an http(s):// DICOMweb URL ({e})") from e

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


def send_c_store(sr, dest: Destination, calling_aet: str, timeout_s: float = 30.0) -> None:
    """C-STORE one dataset to ``dest``; raises ConnectionError / RuntimeError on failure."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(sr.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.aet)
    if not assoc.is_established:
        raise ConnectionError(f"association with {dest} was not accepted")
    no_delay(assoc)
    try:
        status = assoc.send_c_store(sr)
    finally:
        assoc.release()
    code = int(status.Status) if status and "Status" in status else None
    if code not in SUCCESS_STATUSES:
        raise RuntimeError(f"{dest} answered C-STORE with status {hex(code) if code is not None else 'none'}")


@dataclass
class ListenerConfig:
    """The SCP's identity, who may send, and its bounds."""

    aet: str = "MEDMM"
    """Our AE title; callers must address it (called AE title is checked)."""
    host: str = "127.0.0.1"
    """Bind address. Loopback by default; give the hospital network's interface explicitly."""
    port: int = 11112
    """TCP port."""
    allowed_aets: list[str] = field(default_factory=list)
    """Calling AE titles allowed to store; every other association is rejected."""
    study_timeout_s: float = 5.0
    """A study is complete when no instance of it came for this long."""
    max_queue: int = 16
    """Studies being collected, waiting or in inference at once; a new study beyond this gets 0xA700."""
    max_instances: int = 5000
    """Instances accepted per study; more get 0xA700."""
    forward_to: str | None = None
    """``AET@host:port`` or a DICOMweb URL; None: SRs stay in ``out_dir/sr``."""
    out_dir: str = "runs/pacs"
    """SRs (``sr/``), the study log (``studies.jsonl``) and, by default, the spool."""
    spool_dir: str | None = None
    """Where received instances wait for inference (default ``out_dir/spool``); emptied after each study."""
    keep_studies: bool = False
    """Keep received instances after processing (default: delete them)."""

    def __post_init__(self):
        self.aet = _check_aet(self.aet, "--aet")
        self.allowed_aets = [_check_aet(a, "--allowed-aets") for a in self.allowed_aets if a.strip()]
        if not self.allowed_aets:
            raise ValueError("--allowed-aets: list the calling AE titles that may send studies (e.g. CT01,PACS)")
        if self.study_timeout_s <= 0 or self.max_queue < 1 or self.max_instances < 1:
            raise ValueError("study_timeout_s, max_queue and max_instances must be positive")
        if self.forward_to:
            Destination.parse(self.forward_to)


@dataclass
class _Study:
    uid: str
    folder: Path
    calling_aet: str
    first: float
    last: float
    count: int = 0
    writing: int = 0
    queued_at: float = 0.0


class StudyListener:
    """The storage SCP, its study collector and one inference worker around a :class:`ReportPipeline`."""

    def __init__(self, pipeline, config: ListenerConfig):
        optional_import("pynetdicom")
        self.pipeline = pipeline
        self.cfg = config
        self.out = Path(config.out_dir)
        self.spool = Path(config.spool_dir) if config.spool_dir else self.out / "spool"
        (self.out / "sr").mkdir(parents=True, exist_ok=True)
        self.spool.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "studies.jsonl"
        self.dest = Destination.parse(config.forward_to) if config.forward_to else None
        self._lock = threading.Lock()
        self._log_lock = threading.Lock()
        self._pending: dict[str, _Study] = {}
        self._queue: queue.Queue[_Study] = queue.Queue(maxsize=config.max_queue)
        self._busy = 0
        self._refused: set[str] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = None
        self._ids = itertools.count()
        self.counts = {"ok": 0, "failed": 0, "sr_not_delivered": 0, "refused": 0, "rejected_associations": 0}

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
        study_uid, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
        now = time.monotonic()
        with self._lock:
            st = self._pending.get(study_uid)
            if st is None:
                if len(self._pending) + self._queue.qsize() + self._busy >= self.cfg.max_queue:
                    self._refuse(study_uid, event.assoc.requestor.ae_title, "queue full")
                    return OUT_OF_RESOURCES
                folder = self.spool / f"{next(self._ids):06d}-{int(time.time())}"
                st = _Study(study_uid, folder, str(event.assoc.requestor.ae_title), now, now)
                self._pending[study_uid] = st
            if st.count + st.writing >= self.cfg.max_instances:
                self._refuse(study_uid, st.calling_aet, f"more than {self.cfg.max_instances} instances")
                return OUT_OF_RESOURCES
            st.writing += 1
        try:
            st.folder.mkdir(parents=True, exist_ok=True)
            # the bytes as received, with a file meta header: no decode/re-encode of the pixels
            (st.folder / f"{sop}.dcm").write_bytes(event.encoded_dataset(include_meta=True))
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
                    self._queue.put_nowait(s)  # admission keeps the queue below its bound
            self._stop.wait(min(0.2, self.cfg.study_timeout_s / 4))

    def _worker(self) -> None:
        while not self._stop.is_set():
            try:
                st = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            with self._lock:
                self._busy += 1
            try:
                self._process(st)
            finally:
                with self._lock:
                    self._busy -= 1

    def _process(self, st: _Study) -> None:
        t0 = time.monotonic()
        rec: dict = {"study_instance_uid": st.uid, "calling_aet": st.calling_aet, "instances": st.count,
                     "receive_s": round(st.last - st.first, 3), "queue_wait_s": round(t0 - st.queued_at, 3)}
        try:
            res = self.pipeline.run(st.folder)
            sr_path = self.out / "sr" / f"{res.sr.SOPInstanceUID}.dcm"
            res.sr.save_as(sr_path, enforce_file_format=True)
            rec.update({k: v for k, v in res.record.items() if k != "study_instance_uid"})
            rec["sr_file"] = str(sr_path)
            if self.dest is not None:
                try:
                    t_send = time.monotonic()
                    self._send(res.sr)
                    rec["outcome"], rec["sent_to"] = "ok", str(self.dest)
                    rec["send_s"] = round(time.monotonic() - t_send, 3)
                except Exception as e:  # network, refusal: the SR stays on disk for a retry
                    rec.update(outcome="sr_not_delivered", error=type(e).__name__, message=str(e)[:500])
            else:
                rec["outcome"] = "ok"
        except InvalidInputError as e:
            rec.update(outcome="failed", error=type(e).__name__, message=e.reason[:500])
        except Exception as e:  # a crash inside one study must not stop the listener
            log.exception("study %s: inference crashed", st.uid)
            rec.update(outcome="failed", error=type(e).__name__, message=str(e)[:500])
        finally:
            if not self.cfg.keep_studies:
                shutil.rmtree(st.folder, ignore_errors=True)
        rec["total_s"] = round(time.monotonic() - st.first, 3)
        self.counts[rec["outcome"]] += 1
        self._log(rec)

    def _send(self, sr) -> None:
        if self.dest.kind == "dicomweb":
            from .dicomweb import dicomweb_client, store_sr

            store_sr(dicomweb_client(self.dest.url), sr)
        else:
            send_c_store(sr, self.dest, self.cfg.aet)

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
            return bool(self._pending or self._queue.qsize() or self._busy)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every received study has been processed (True) or ``timeout_s`` passed (False)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if not self.busy():
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Stop accepting, let the running study finish, log studies left unprocessed."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._stop.set()
        for t in self._threads:
            t.join(timeout=600)
        left = list(self._pending.values())
        while not self._queue.empty():
            left.append(self._queue.get_nowait())
        for st in left:
            self._log({"study_instance_uid": st.uid, "calling_aet": st.calling_aet, "instances": st.count,
                       "outcome": "not_processed", "error": "listener stopped"})
            if not self.cfg.keep_studies:
                shutil.rmtree(st.folder, ignore_errors=True)

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
        print(json.dumps({"stopped": True, **self.counts}), flush=True)
