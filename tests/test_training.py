"""The real DeepSpeed engine on CPU (gloo): one process, two ranks under torchrun, ZeRO 0-3, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SAMPLE, model_dict

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]


def make_run(tmp_path, tiny_llm, n_records=4, **trainer):
    imgs = sorted((SAMPLE / "vqa_rad" / "images").glob("*.jpg"))
    recs = []
    for i in range(n_records):
        if i % 2 == 0:
            recs.append({"id": f"r{i}", "modalities": {"image": str(imgs[i])},
                         "conversations": [{"from": "human", "value": "<image>\nIs there an abnormality?"},
                                           {"from": "gpt", "value": "yes" if i % 4 == 0 else "no"}]})
        else:
            recs.append({"id": f"r{i}", "modalities": {"mol": ["CCO", "c1ccccc1O"][i % 2 == 1]},
                         "conversations": [{"from": "human", "value": "<mol>\nIs this drug-like?"},
                                           {"from": "gpt", "value": "no" if i % 3 else "yes"}]})
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    md = model_dict(tiny_llm, llm_trainable="full")
    md["modalities"] = {k: v for k, v in md["modalities"].items() if k in ("image", "mol")}
    cfg = {
        "model": md,
        "data": {"datasets": [{"path": str(data)}], "max_length": 128},
        "trainer": {"output_dir": str(tmp_path / "run"), "deepspeed": str(REPO / "configs/deepspeed/zero2.json"),
                    "max_steps": 12, "micro_batch_size": 2, "lr": 3e-3, "save_every": 4, "seed": 0, **trainer},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def env():
    e = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    e.pop("DS_ACCELERATOR", None)  # the trainer must choose the CPU accelerator by itself
    return e


def torchrun(cfg, nproc=2, extra=(), **kw):
    from medmm.training.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "medmm.training", "--config", str(cfg), *extra]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600, cwd=REPO, **kw)


def losses(run_dir):
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["loss"]  # a resumed run rewrites steps after its checkpoint: keep the last
    return out


def test_single_process_zero0(tmp_path, tiny_llm):
    cfg = make_run(tmp_path, tiny_llm, max_steps=6, deepspeed=str(REPO / "configs/deepspeed/zero0.json"))
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(cfg)], env=env(), capture_output=True,
                       text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "checkpoint" / "medmm_config.json").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert len(losses(run)) == 6
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("ds", ["zero1", "zero3_offload"])
def test_single_process_other_stages_with_accumulation(tmp_path, tiny_llm, ds):
    cfg = make_run(tmp_path, tiny_llm, max_steps=8, grad_accum=2, micro_batch_size=1, save_every=8,
                   deepspeed=str(REPO / f"configs/deepspeed/{ds}.json"))
    r = subprocess.run([sys.executable, "-m", "medmm.training", "--config", str(cfg)], env=env(),
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    ls = losses(tmp_path / "run")
    assert len(ls) == 8 and ls[8] < ls[1], ls


@pytest.mark.parametrize("ds", ["zero2", "zero3"])
def test_two_ranks_lower_loss_on_fixed_batch(tmp_path, tiny_llm, ds):
    cfg = make_run(tmp_path, tiny_llm, max_steps=15, deepspeed=str(REPO / f"configs/deepspeed/{ds}.json"))
    r = torchrun(cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world=2" in r.stdout and f"zero={ds[-1]}" in r.stdout
    ls = losses(tmp_path / "run")
    assert ls[15] < 0.6 * ls[1], ls
    from medmm.model.multimodal import MedMMForCausalLM

    m = MedMMForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint")  # ZeRO-3 params were gathered
    assert m.parameter_counts()["total"] > 0


def test_kill_and_resume_matches_uninterrupted(tmp_path, tiny_llm):
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "kill"
    ref_dir.mkdir(), kill_dir.mkdir()
    kw = dict(n_records=16, max_steps=40, save_every=4, micro_batch_size=2)
    r = torchrun(make_run(ref_dir, tiny_llm, **kw))
    assert r.returncode == 0, r.stderr[-3000:]
    ref = losses(ref_dir / "run")

    cfg = make_run(kill_dir, tiny_llm, **kw)
    from medmm.training.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "medmm.training", "--config", str(cfg)]
    p = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                         start_new_session=True)
    latest = kill_dir / "run" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if latest.exists() and latest.read_text().strip() >= "step-00000008":
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run finished before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)  # every rank dies at once, wherever it is
    p.wait()
    killed_at = latest.read_text().strip()
    assert killed_at < "step-00000040"

    r = torchrun(cfg, extra=["--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    got = losses(kill_dir / "run")
    assert set(got) == set(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-5), (step, killed_at)


def test_latest_ignores_incomplete(tmp_path):
    from medmm.training.checkpoint import latest_tag

    root = tmp_path / "checkpoints"
    (root / "step-00000004").mkdir(parents=True)
    (root / ".tmp" / "step-00000008").mkdir(parents=True)  # a save that was killed
    (root / "latest").write_text("step-00000004")
    assert latest_tag(root) == "step-00000004"
    (root / "latest").write_text("step-00000008")
    assert latest_tag(root) is None
