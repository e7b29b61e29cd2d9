"""Row 7: the listener's output (spool, SRs, undelivered SRs, ``studies.jsonl``) was 0644 in 0755
folders, readable by every local user, while ``prepare`` writes 0600. It must be 0600 files in 0700 folders, under
the usual umask 022."""

import os
import stat

import pytest

from tests.security._listener import listening, records, store, study_files, wait
from tests.security.conftest import free_port

pytestmark = pytest.mark.integration


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_listener_output_is_private(sec_pipeline, pydicom_files, tmp_path):
    out = tmp_path / "pacs"
    old_umask = os.umask(0o022)
    try:  # the SR cannot be delivered (nothing listens there): it is kept in undelivered/ as well
        with listening(sec_pipeline, out, forward_to=f"PACS@127.0.0.1:{free_port()}", retry_s=0.0) as (_, port):
            assert store(port, study_files(pydicom_files, tmp_path / "study")) == [0]
            wait(lambda: records(out), 60, "the study's record")
            # everything, the spooled instances included (held for the amend window until the listener stops)
            files = {p: (_mode(p), p.is_dir()) for p in out.rglob("*")}
    finally:
        os.umask(old_umask)
    assert records(out)[0]["outcome"] == "sr_not_delivered"
    kinds = {p.relative_to(out).parts[0] for p in files}
    assert {"spool", "sr", "undelivered", "studies.jsonl"} <= kinds
    assert any(p.suffix == ".dcm" and "spool" in p.parts for p in files)
    assert _mode(out) == 0o700
    wrong = {str(p.relative_to(out)): oct(m) for p, (m, is_dir) in files.items() if m != (0o700 if is_dir else 0o600)}
    assert not wrong
