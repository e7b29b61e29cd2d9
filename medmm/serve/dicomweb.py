"""``medmm pacs pull-run-push``: one study over DICOMweb in, its SR back out.

    WADO-RS retrieve (dicomweb-client) -> ReportPipeline (load -> select -> infer -> write SR) -> STOW-RS store

    medmm pacs pull-run-push --dicomweb http://pacs:8042/dicom-web --study 1.2.3... --checkpoint C

If the study already holds a medmm SR, the new SR amends the latest one (it is listed in the new SR's
Predecessor Documents Sequence), so re-running a study extends one report lineage.

Authentication: ``--token-file`` (a bearer token, read from a file so it never shows in ``ps``) or
``MEDMM_DICOMWEB_USER`` / ``MEDMM_DICOMWEB_PASSWORD`` in the environment (HTTP basic).

Retries: with ``retry_s`` the client's HTTP session retries refused connections, dropped requests and
408/429/5xx answers with exponential back-off (0.5 s doubling, at most 10 s apart) until ``retry_s`` seconds
after the first failure (:class:`WindowRetry`, a urllib3 ``Retry``); STOW-RS of one SR is idempotent, so POST
is retried too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from ..errors import DicomError
from ..io.dicom import quiet_pydicom
from ..utils import optional_import

log = logging.getLogger("medmm.pacs")
RETRY_STATUSES = (408, 429, 500, 502, 503, 504)
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 10.0


def _window_retry_class():
    from urllib3.util.retry import Retry

    class WindowRetry(Retry):
        """A urllib3 ``Retry`` bounded by time instead of a count: retries go on until ``window_s`` seconds after
        the first failure (or until ``cancel`` is set). Back-off 0.5, 1, 2, 4, 8, 10, 10 ... s, never past the
        window. ``failures`` (shared by the copies urllib3 makes) collects one line per failed attempt."""

        def __init__(self, *args, window_s: float = 60.0, started: float | None = None,
                     cancel: threading.Event | None = None, failures: list | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.window_s, self.started, self.cancel = window_s, started, cancel
            self.failures = failures if failures is not None else []

        def new(self, **kw):
            kw.setdefault("window_s", self.window_s)
            kw.setdefault("started", self.started if self.started is not None else time.monotonic())
            kw.setdefault("cancel", self.cancel)
            kw.setdefault("failures", self.failures)
            return super().new(**kw)

        def remaining_s(self) -> float:
            return self.window_s - (time.monotonic() - self.started) if self.started is not None else self.window_s

        def is_exhausted(self) -> bool:
            if self.cancel is not None and self.cancel.is_set():
                return True
            return super().is_exhausted() or (self.started is not None and self.remaining_s() <= 0)

        def get_backoff_time(self) -> float:
            n = len(self.history)  # failed attempts so far
            if n == 0:
                return 0.0
            return max(0.0, min(BACKOFF_FIRST_S * 2 ** (n - 1), BACKOFF_MAX_S, self.remaining_s()))

        def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
            where = f"{_pool.host}:{_pool.port}" if _pool is not None else "?"
            why = f"{type(error).__name__}" if error is not None else f"HTTP {getattr(response, 'status', '?')}"
            self.failures.append(f"{method} {where}: {why}")
            new = super().increment(method, url, response, error, _pool, _stacktrace)  # raises when exhausted
            log.warning("%s %s failed (%s, attempt %d); retrying in %.1f s, for up to %.0f s more", method, where,
                        why, len(new.history), new.get_backoff_time(), max(0.0, new.remaining_s()))
            return new

        def sleep_for_retry(self, response) -> bool:
            retry_after = self.get_retry_after(response)
            if retry_after:
                self._wait(min(retry_after, max(0.0, self.remaining_s())))
                return True
            return False

        def _sleep_backoff(self) -> None:
            self._wait(self.get_backoff_time())

        def _wait(self, seconds: float) -> None:
            if seconds > 0:
                (self.cancel.wait if self.cancel is not None else time.sleep)(seconds)

    return WindowRetry


def retry_session(retry_s: float, session=None, cancel: threading.Event | None = None, failures: list | None = None):
    """A requests Session (``session`` or a new one) whose requests retry for ``retry_s`` s (see module docstring)."""
    import requests
    from requests.adapters import HTTPAdapter

    session = session or requests.Session()
    retry = _window_retry_class()(
        total=None, connect=None, read=None, other=None, redirect=5, status=None, status_forcelist=RETRY_STATUSES,
        allowed_methods=None,  # every method, POST included
        raise_on_status=False,  # the last answer goes back to dicomweb-client, which raises with its status
        window_s=max(0.0, retry_s), cancel=cancel, failures=failures)
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def dicomweb_client(url: str, token_file: str | Path | None = None, retry_s: float | None = None,
                    cancel: threading.Event | None = None, failures: list | None = None, timeout_s: float = 60.0):
    """A DICOMwebClient with bearer or basic authentication when configured.

    Args:
        url: the DICOMweb root.
        token_file: a file holding a bearer token.
        retry_s: retry failed requests for this long (:func:`retry_session`); None: dicomweb-client's own
            retries (a few attempts on 408/429/503/504 only).
        cancel: set it to end the retries early (a stopping listener).
        failures: a list that receives one line per failed attempt.
        timeout_s: connect and read timeout of each request.
    """
    optional_import("dicomweb_client")
    from dicomweb_client.api import DICOMwebClient

    headers = {}
    session = None
    if token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise ValueError(f"{token_file}: empty token file")
        headers["Authorization"] = f"Bearer {token}"
    elif os.environ.get("MEDMM_DICOMWEB_USER"):
        from dicomweb_client.session_utils import create_session_from_user_pass

        session = create_session_from_user_pass(os.environ["MEDMM_DICOMWEB_USER"],
                                                os.environ.get("MEDMM_DICOMWEB_PASSWORD", ""))
    if retry_s is not None:
        session = retry_session(retry_s, session, cancel, failures)
    client = DICOMwebClient(url=url, headers=headers or None, session=session, timeout=timeout_s)
    if retry_s is not None:
        client.set_http_retry_params(retry=False)  # one retry layer: its own would repeat our whole window
    return client


def store_sr(client, sr) -> None:
    """STOW-RS one SR; raises when the server does not confirm the instance."""
    resp = client.store_instances([sr])
    failed = resp.get("FailedSOPSequence") if resp is not None else None
    if failed:
        raise RuntimeError(f"STOW-RS refused SR {sr.SOPInstanceUID}: {failed}")


def latest_medmm_sr(instances):
    """The newest medmm Comprehensive SR among ``instances`` (by content date and time), or None.

    The values are compared as text without pydicom's validation (its warnings would quote them); an instance
    whose values cannot be decoded is not a medmm SR."""
    from pydicom.uid import ComprehensiveSRStorage

    def ours(ds) -> bool:
        try:
            return ds.get("SOPClassUID") == ComprehensiveSRStorage and str(ds.get("Manufacturer", "")) == "medmm"
        except Exception:  # noqa: BLE001  (an undecodable value: not one of ours)
            return False

    def when(ds) -> tuple[str, str]:
        try:
            return str(ds.get("ContentDate", "")), str(ds.get("ContentTime", ""))
        except Exception:  # noqa: BLE001
            return "", ""

    with quiet_pydicom():
        return max((ds for ds in instances if ours(ds)), key=when, default=None)


def pull_run_push(url: str, study_uid: str, pipeline, push: bool = True, token_file: str | Path | None = None,
                  client=None, retry_s: float | None = None) -> dict:
    """Retrieve ``study_uid``, run ``pipeline`` (a :class:`~medmm.serve.study.ReportPipeline`), store the SR.

    A medmm SR already in the study becomes the new SR's predecessor (``predecessor_sr`` in the record).
    ``retry_s``: how long failed requests are retried (see :func:`dicomweb_client`).

    The instances are written to the pipeline's work folder under names it chooses (``incoming/000000.dcm``),
    never under their UIDs, and are held to the pipeline's pixel budget (``ReportConfig.max_decoded_mib``)
    before anything is decoded (:func:`~medmm.serve.study.load_study`).

    Returns the study's audit record with the report text under ``report`` and the SR's UIDs.
    """
    client = client or dicomweb_client(url, token_file, retry_s=retry_s)
    instances = client.retrieve_study(study_uid)  # WADO-RS: list of pydicom Datasets
    log.info("retrieved study %s: %d instance(s)", study_uid, len(instances))
    if not instances:
        raise DicomError(f"study {study_uid}", f"{url} returned no instances")
    res = pipeline.run(instances, predecessor=latest_medmm_sr(instances))
    if push:
        store_sr(client, res.sr)
        log.info("stored SR %s in study %s", res.sr.SOPInstanceUID, study_uid)
    return {**res.record, "retrieved_instances": len(instances), "stored": push, "report": res.text,
            "sr_series_instance_uid": str(res.sr.SeriesInstanceUID)}
