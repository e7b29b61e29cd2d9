"""The real DeepSpeed engine on CPU (gloo): one process, two ranks under torchrun, ZeRO 0-3, kill and resume; the
stage registry (a toy stage registered here runs through train.py); text-only and mixed conversations."""

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
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MEDMM_PORT_CHOSEN"):
        e.pop(k, None)  # set in this process by the in-process runs below; a child chooses its own
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
        if "loss" in r:  # (the step-0 row of a stage with validation holds its scores only)
            out[r["step"]] = r["loss"]  # a resumed run rewrites steps after its checkpoint: keep the last
    return out


def kill_then_resume(cfg, run_dir, after: str, max_steps: int) -> tuple[dict, str]:
    """Start 2 ranks on ``cfg``, SIGKILL the whole group once checkpoint ``after`` (e.g. ``step-00000008``) is the
    latest, resume with ``--resume``; returns the resumed run's losses by step and the checkpoint it was killed at."""
    from medmm.training.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "medmm.training", "--config", str(cfg)]
    p = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                         start_new_session=True)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if latest.exists() and latest.read_text().strip() >= after:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run finished before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)  # every rank dies at once, wherever it is
    p.wait()
    killed_at = latest.read_text().strip()
    assert killed_at < f"step-{max_steps:08d}"
    r = torchrun(cfg, extra=["--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    return losses(run_dir), killed_at


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


# ZeRO-3 on two ranks lowers the loss in test_two_ranks_zero3_text_only_and_image_conversations (and saves in
# tests/test_zero3_save.py): a third 25 s run here would add nothing those do not check
@pytest.mark.parametrize("ds", ["zero2"])
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
    kw = dict(n_records=16, max_steps=24, save_every=4, micro_batch_size=2)  # killed after step 8: 16 steps resumed
    r = torchrun(make_run(ref_dir, tiny_llm, **kw))
    assert r.returncode == 0, r.stderr[-3000:]
    ref = losses(ref_dir / "run")

    cfg = make_run(kill_dir, tiny_llm, **kw)
    got, killed_at = kill_then_resume(cfg, kill_dir / "run", "step-00000008", 24)
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


# ----------------------------------------------------------------------------- the stage registry
import torch  # noqa: E402
from torch import nn  # noqa: E402

from medmm.training.stages import Stage, StageData, get_stage, list_stages, register_stage  # noqa: E402


@register_stage("toy_regression")
class ToyRegressionStage(Stage):
    """A stage defined in a test file: least squares on 64 fixed points, validated on 32 more."""

    metrics = ("abs_err",)
    monitor = "val_neg_mse"

    def _points(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 3, generator=g)
        return x, x @ torch.tensor([1.5, -2.0, 0.5]) + 0.25

    def build_model(self):
        return nn.Linear(3, 1)

    def build_data(self):
        x, y = self._points(64, 0)
        bs = self.cfg.trainer.micro_batch_size
        data = [{"x": x[i], "y": y[i]} for i in range(64)]

        def sampler(start):
            step = start
            while True:  # a pure function of the micro-step: resumable
                g = torch.Generator().manual_seed(step // (64 // bs))
                perm = torch.randperm(64, generator=g).tolist()
                k = step % (64 // bs)
                yield perm[k * bs:(k + 1) * bs]
                step += 1

        collate = lambda s: {"x": torch.stack([r["x"] for r in s]), "y": torch.stack([r["y"] for r in s])}  # noqa
        return StageData(data, sampler, collate, batches_per_epoch=64 // bs, description="toy=64")

    def loss(self, engine, batch):
        err = engine(batch["x"]).squeeze(-1) - batch["y"]
        return (err ** 2).mean(), {"abs_err": float(err.detach().abs().mean())}

    def evaluate(self, model):
        x, y = self._points(32, 1)
        with torch.no_grad():
            return {"val_neg_mse": -float(((model(x).squeeze(-1) - y) ** 2).mean())}

    def save(self, engine, model, out_dir, zero_stage, summary):
        if self.ctx.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), out_dir / "toy.pt")
            return out_dir
        return None


def toy_config(tmp_path, **trainer):
    cfg = {"trainer": {"stage": "toy_regression", "output_dir": str(tmp_path / "run"),
                       "deepspeed": str(REPO / "configs/deepspeed/zero0.json"), "epochs": 6, "micro_batch_size": 8,
                       "lr": 0.05, "lr_schedule": "constant", "save_every": 8, "seed": 0, **trainer}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_stage_registered_in_a_test_runs_through_train_py(tmp_path):
    import train

    assert "toy_regression" in list_stages() and {"sft", "align", "head"} <= set(list_stages())
    res = train.main(["--config", str(toy_config(tmp_path))])
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert res["stage"] == "toy_regression" and res["step"] == res["max_steps"] == 6 * 8
    assert [r["step"] for r in rows if "val_neg_mse" in r] == [0, 8, 16, 24, 32, 40, 48]  # before, after each epoch
    assert rows[-1]["loss"] < 0.05 * rows[1]["loss"] and "abs_err" in rows[1]
    assert res["best_val_neg_mse"] > -0.05 and (tmp_path / "run" / "checkpoint" / "toy.pt").exists()
    assert (tmp_path / "run" / "loss.png").exists()


def test_resume_replays_the_uninterrupted_run_and_early_stopping(tmp_path):
    """Two epochs, then --resume to six: the losses equal one six-epoch run's; patience stops a run early."""
    import train

    ref = train.main(["--config", str(toy_config(tmp_path / "a"))])
    train.main(["--config", str(toy_config(tmp_path / "b", epochs=2))])
    got = train.main(["--config", str(toy_config(tmp_path / "b")), "--resume"])
    assert got["step"] == ref["step"] and got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert losses(tmp_path / "b" / "run")[48] == pytest.approx(losses(tmp_path / "a" / "run")[48], rel=1e-5)
    # lr 0 never improves on the first evaluation: patience 2 stops after the third epoch
    stop = train.main(["--config", str(toy_config(tmp_path / "c", lr=0.0, patience=2, restore_best=True))])
    assert stop["stopped_early"] and stop["step"] == 24 and stop["best_step"] == 8


def test_unknown_stage_lists_the_registered_ones():
    from medmm.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown stage 'nope'.*head.*sft"):
        get_stage("nope")


# ----------------------------------------------------------------------------- text-only conversations
def mixed_records(n_text=12, n_image=4):
    imgs = sorted((SAMPLE / "vqa_rad" / "images").glob("*.jpg"))
    facts = [("What is the capital of France?", "Paris"), ("Name a beta blocker.", "metoprolol"),
             ("What does CT stand for?", "computed tomography"), ("Is aspirin an NSAID?", "yes")]
    recs = [{"id": f"t{i}", "conversations": [{"from": "human", "value": facts[i % 4][0]},
                                              {"from": "gpt", "value": facts[i % 4][1]}]} for i in range(n_text)]
    recs += [{"id": f"i{i}", "modalities": {"image": str(imgs[i])},
              "conversations": [{"from": "human", "value": "<image>\nIs there an abnormality?"},
                                {"from": "gpt", "value": "yes" if i % 2 else "no"}]} for i in range(n_image)]
    return recs


def records_loss(model, cfg, recs):
    model.eval()
    proc = model.processor(cfg.data.max_length)
    with torch.no_grad():
        batch = proc.collate([proc.process(r) for r in recs], pad_missing_modalities=True)
        return float(model(**batch).loss)


def test_two_ranks_zero3_text_only_and_image_conversations(tmp_path, tiny_llm):
    """Most micro-batches hold no image: every rank still runs the image encoder (dummy input), so ZeRO-3's
    collective gathers never hang; the saved model has learned the training records."""
    from medmm.config import TrainConfig, load_config
    from medmm.model.multimodal import MedMMForCausalLM
    from medmm.utils import seed_everything, write_jsonl

    recs = mixed_records()
    write_jsonl(tmp_path / "mixed.jsonl", recs)
    md = model_dict(tiny_llm, llm_trainable="full")
    md["modalities"] = {"image": md["modalities"]["image"]}
    cfg_d = {"model": md, "data": {"datasets": [{"path": str(tmp_path / "mixed.jsonl")}], "max_length": 128,
                                   "num_workers": 0},
             "trainer": {"output_dir": str(tmp_path / "run"), "deepspeed": str(REPO / "configs/deepspeed/zero3.json"),
                         "max_steps": 24, "micro_batch_size": 2, "lr": 3e-3, "save_every": 12, "seed": 0}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg_d))
    r = torchrun(path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world=2" in r.stdout and "zero=3" in r.stdout
    cfg = load_config(TrainConfig, path)
    seed_everything(cfg.trainer.seed)  # the loop seeds before building: the same initial weights
    before = records_loss(MedMMForCausalLM.from_config(cfg.model), cfg, recs)
    after = records_loss(MedMMForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint"), cfg, recs)
    print(f"loss on the training records: untrained {before:.4f}, reloaded after training {after:.4f}")
    assert after < 0.6 * before, (before, after)


def test_text_only_model_from_prepared_instructions_trains_and_answers(tmp_path, tiny_llm):
    """`medmm prepare instructions` (PromptCBLUE lines) -> train.py with a model that has no modality at all ->
    the saved model answers a text-only request."""
    from medmm.cli import main as cli
    from medmm.inference.predictor import Predictor

    lines = [{"input": f"问题{i}：以下症状属于哪个科室？选项：内科，外科", "target": ["内科", "外科"][i % 2],
              "answer_choices": ["内科", "外科"], "task_type": "cls", "task_dataset": "CMID", "sample_id": f"s{i}"}
             for i in range(10)]
    src = tmp_path / "pcb.jsonl"
    src.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    cli(["prepare", "instructions", str(src), "--format", "promptcblue", "--out", str(tmp_path / "data"),
         "--eval-fraction", "0.2"])
    cfg = {"model": {"llm": str(tiny_llm), "llm_trainable": "full", "modalities": {}},
           "data": {"datasets": [{"path": str(tmp_path / "data" / "train.jsonl")}], "max_length": 96, "num_workers": 0},
           "trainer": {"output_dir": str(tmp_path / "run"), "deepspeed": str(REPO / "configs/deepspeed/zero0.json"),
                       "max_steps": 4, "micro_batch_size": 2, "lr": 1e-3, "save_every": 4}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(path)], env=env(), capture_output=True,
                       text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(losses(tmp_path / "run")) == 4
    out = Predictor(tmp_path / "run" / "checkpoint").predict(
        [{"id": "q", "modalities": {}, "question": lines[0]["input"]}])[0]
    assert "error" not in out and isinstance(out["answer"], str)
