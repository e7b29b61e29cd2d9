"""Row 6: C-STORE studies, ``kill -9`` the listener, restart it. Retention lived only in memory, so the spooled
instances outlived ``--amend-window`` forever. The restarted listener must delete what is older than the window
at once, adopt what is younger (a later burst of that study is reported with the instances already received)
and delete it when its window ends.

The killed listener is a real process (SIGKILL), with a model that never answers, so that the studies are still
in the spool; the restarted one runs in this process with the shared tiny model."""

import os
import subprocess
import sys
import time

import pydicom
import pytest

from tests.conftest import REPO
from tests.security._listener import listening, records, store, study_files, wait
from tests.security.conftest import free_port

pytestmark = pytest.mark.integration
WINDOW_S = 600.0
STUCK = """
import sys, threading
from medmm.serve.listener import ListenerConfig, StudyListener

class Stuck:  # a model that never answers: every study received stays in the spool
    def run(self, *a, **k):
        threading.Event().wait()

    run_many = run

cfg = ListenerConfig(aet="MEDMM", port=int(sys.argv[1]), allowed_aets=["SCU"], study_timeout_s=0.2,
                     out_dir=sys.argv[2], amend_window_s=float(sys.argv[3]))
StudyListener(Stuck(), cfg).start()
print("listening", flush=True)
threading.Event().wait()
"""


def _folders(spool) -> dict[str, object]:
    """Study Instance UID -> its spool folder (read from the instances, as the old listener left no record)."""
    out = {}
    for folder in spool.iterdir():
        dcm = next(folder.glob("*.dcm"), None)
        if dcm is not None:
            out[pydicom.dcmread(dcm, stop_before_pixels=True).StudyInstanceUID] = folder
    return out


def _age(folder, seconds: float) -> None:
    """Make ``folder`` and its files look received ``seconds`` ago."""
    t = time.time() - seconds
    for p in [*folder.iterdir(), folder]:
        os.utime(p, (t, t))


def test_spool_is_swept_after_kill_9(sec_pipeline, pydicom_files, tmp_path):
    out, port = tmp_path / "pacs", free_port()
    studies = {k: study_files(pydicom_files, tmp_path / k, n=2 if k == "young" else 1) for k in ("old", "ending",
                                                                                                  "young")}
    uid = {k: pydicom.dcmread(p[0]).StudyInstanceUID for k, p in studies.items()}
    proc = subprocess.Popen([sys.executable, "-c", STUCK, str(port), str(out), str(WINDOW_S)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "listening", proc.stderr.read()
        for k in ("old", "ending"):
            assert store(port, studies[k]) == [0]
        assert store(port, studies["young"][:1]) == [0]  # its second instance comes after the restart
    finally:
        proc.kill()  # SIGKILL: no clean-up runs
        proc.wait(timeout=30)
    folders = _folders(out / "spool")
    assert folders.keys() == set(uid.values())
    _age(folders[uid["old"]], WINDOW_S + 60)  # received before the window
    _age(folders[uid["ending"]], WINDOW_S - 1)  # its window ends a second after the restart

    with listening(sec_pipeline, out, amend_window_s=WINDOW_S) as (listener, port):
        assert not folders[uid["old"]].exists()  # swept at start-up
        assert store(port, studies["young"][1:]) == [0]
        wait(lambda: records(out), 60, "the young study's report")
        wait(lambda: not folders[uid["ending"]].exists(), 30, "the ending study's window to end")
        assert folders[uid["young"]].exists()  # inside its window: kept for a later burst
    (rec,) = records(out)
    assert (rec["study_instance_uid"], rec["instances"], rec["study_instances"]) == (uid["young"], 1, 2)
