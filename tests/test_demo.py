"""`medmm demo` end to end (prepare -> DeepSpeed ZeRO-2 on two ranks -> infer -> eval -> export), fewer steps."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.deepspeed, pytest.mark.slow]


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "medmm.cli", "demo", "--out", str(out), "--steps", "40"],
                       capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "what the demo wrote" in r.stdout
    summary = json.loads((out / "demo_summary.json").read_text())
    for key in ("checkpoint", "export", "metrics", "predictions", "infer"):
        assert os.path.exists(summary[key]), key
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["overall"]["count"] > 50
    errors = [json.loads(x) for x in (out / "data" / "errors.jsonl").read_text().splitlines()]
    assert any("MR_truncated.dcm" in e["path"] for e in errors)  # the broken file is reported, the job went on
    answers = json.loads((out / "infer.json").read_text())
    assert len(answers) == 4 and all(a["error"] is None for a in answers)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 40
