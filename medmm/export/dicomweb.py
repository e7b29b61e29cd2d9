"""``medmm pacs pull-run-push``: one study over DICOMweb in, its SR back out.

    WADO-RS retrieve (dicomweb-client) -> ReportPipeline (load -> select -> infer -> write SR) -> STOW-RS store

    medmm pacs pull-run-push --dicomweb http://pacs:8042/dicom-web --study 1.2.3... --checkpoint C

Authentication: ``--token-file`` (a bearer token, read from a file so it never shows in ``ps``) or
``MEDMM_DICOMWEB_USER`` / ``MEDMM_DICOMWEB_PASSWORD`` in the environment (HTTP basic).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..utils import optional_import

log = logging.getLogger("medmm.pacs")


def dicomweb_client(url: str, token_file: str | Path | None = None):
    """A DICOMwebClient with bearer or basic authentication when configured."""
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
    return DICOMwebClient(url=url, headers=headers or None, session=session)


def store_sr(client, sr) -> None:
    """STOW-RS one SR; raises when the server does not confirm the instance."""
    resp = client.store_instances([sr])
    failed = resp.get("FailedSOPSequence") if resp is not None else None
    if failed:
        raise RuntimeError(f"STOW-RS refused SR {sr.SOPInstanceUID}: {failed}")


def pull_run_push(url: str, study_uid: str, pipeline, push: bool = True, token_file: str | Path | None = None,
                  client=None) -> dict:
    """Retrieve ``study_uid``, run ``pipeline`` (a :class:`~medmm.export.study.ReportPipeline`), store the SR.

    Returns the study's audit record with the report text under ``report`` and the SR's UIDs.
    """
    client = client or dicomweb_client(url, token_file)
    instances = client.retrieve_study(study_uid)  # WADO-RS: list of pydicom Datasets
    log.info("retrieved study %s: %d instance(s)", study_uid, len(instances))
    if not instances:
        from ..errors import DicomError

        raise DicomError(f"study {study_uid}", f"{url} returned no instances")
    res = pipeline.run(instances)
    if push:
        store_sr(client, res.sr)
        log.info("stored SR %s in study %s", res.sr.SOPInstanceUID, study_uid)
    return {**res.record, "retrieved_instances": len(instances), "stored": push, "report": res.text,
            "sr_series_instance_uid": str(res.sr.SeriesInstanceUID)}
