"""The one DeepSpeed training loop; every stage (``trainer.stage``, :mod:`medmm.training.stages`) runs through it.

ZeRO 0-3, CPU offload, gradient accumulation, bf16 on GPU. Run it as one process
(``python train.py --config C``), under ``torchrun --nproc_per_node N``, under the ``deepspeed``
launcher with a hostfile, or under Slurm's ``srun``. Writes to ``trainer.output_dir``::

    config.yaml       the resolved config
    checkpoints/      resumable DeepSpeed checkpoints (``--resume`` continues from ``latest``)
    tb/               TensorBoard: train/loss, train/lr, train/samples_per_s, the stage's metrics, eval/*
    metrics.jsonl     one line per logged step: step, loss, lr, samples_per_s, the stage's metrics, val_* scores
    loss.png          the loss curve
    errors.jsonl      inputs that failed to load (typed error records naming the file), when any did
    checkpoint/       the final model folder (what the stage saves)

What the loop does for every stage: build the model and data (the stage), the optimiser (AdamW over
the stage's parameters) and schedule (``trainer.lr_schedule``), the DeepSpeed engine; then for each
step, ``grad_accum`` micro-batches of ``stage.loss``; evaluation every ``trainer.eval_every`` steps
(or each epoch) with early stopping on ``stage.monitor``; checkpoints every ``save_every`` steps;
``stage.finish`` and ``stage.save`` at the end.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from ..config import TrainConfig, TrainerConfig, to_dict
from ..data.prepared import prepared_preprocess
from ..errors import ConfigError
from ..modalities import adopt_prepared
from ..utils import locate
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import init_distributed

log = logging.getLogger(__name__)


def build_ds_config(t: TrainerConfig, world_size: int) -> dict:
    """Read the DeepSpeed JSON and fill in batch sizes, clipping and precision from the trainer config."""
    import torch

    path = locate(t.deepspeed)  # recipes name `configs/deepspeed/...`: the shipped copy when run outside a checkout
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"trainer.deepspeed: '{path}' not found") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"trainer.deepspeed: '{path}' is not valid JSON ({e})") from e
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "bf16", "fp16"):
        if key in ds:
            raise ConfigError(f"{path}: '{key}' is set from the trainer config (trainer.*); remove it from the JSON")
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["train_batch_size"] = t.micro_batch_size * t.grad_accum * world_size
    ds["gradient_clipping"] = t.grad_clip
    precision = t.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision in ("bf16", "fp16") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.precision={precision} needs a GPU; use fp32 or auto on CPU")
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 12}
    return ds


def lr_lambda(warmup: int, total: int, min_ratio: float = 0.1, schedule: str = "cosine"):
    """Linear warm-up, then cosine decay to ``min_ratio`` of the peak (``cosine``) or the peak itself (``constant``)."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def to_device(batch, device):
    """Move every tensor of a (nested) batch to ``device``."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def batch_size_of(batch: dict) -> int:
    """Samples in a batch: the first dimension of ``input_ids``, ``x`` or the first tensor found."""
    import torch

    for key in ("input_ids", "x", "labels"):
        if isinstance(batch.get(key), torch.Tensor):
            return int(batch[key].shape[0])
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim():
            return int(v.shape[0])
    return 1


class _EarlyStopping:
    """Best validation score, its step and weights (``restore_best``), and the evaluations since it."""

    def __init__(self, monitor: str | None, patience: int, keep_weights: bool):
        self.monitor, self.patience, self.keep_weights = monitor, patience, keep_weights
        self.best: float | None = None
        self.best_step: int | None = None
        self.stale = 0
        self.weights: dict | None = None

    def update(self, scores: dict, step: int, module) -> bool:
        """Record an evaluation; returns True when training should stop."""
        if not self.monitor:
            return False
        if self.monitor not in scores:
            raise KeyError(f"the stage's monitor '{self.monitor}' is not among its evaluation results {sorted(scores)}")
        value = scores[self.monitor]
        if value is not None and math.isfinite(value) and (self.best is None or value > self.best):
            self.best, self.best_step, self.stale = float(value), step, 0
            if self.keep_weights:
                self.weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            self.stale += 1
        return bool(self.patience) and self.stale >= self.patience

    def state(self) -> dict:
        out = {"best": self.best, "best_step": self.best_step, "stale": self.stale}
        if self.weights is not None:
            out["weights"] = {k: v.cpu() for k, v in self.weights.items()}
        return out

    def load(self, state: dict | None) -> None:
        if state:
            self.best, self.best_step, self.stale = state.get("best"), state.get("best_step"), state.get("stale", 0)
            self.weights = state.get("weights")


def run_training(cfg: TrainConfig, resume: bool = False, trust_checkpoint: bool = False) -> dict:
    """Run ``cfg.trainer.stage`` through the loop; returns a summary (steps, last loss, paths, the stage's results).

    ``resume`` continues from the latest checkpoint, read weights-only (a file that pickles anything else is refused,
    :class:`~medmm.training.checkpoint.CheckpointError`); ``trust_checkpoint`` lets DeepSpeed unpickle it instead.

    Every rank runs this. ZeRO-3 swaps ``torch.nn.functional.linear`` for its memory-efficient version for the whole
    process and never swaps it back; this undoes that when the run ends, so that what the process does next (export
    by tracing, inference) sees plain PyTorch.
    """
    try:
        return _run_training(cfg, resume, trust_checkpoint)
    finally:
        restore_torch_linear()


def restore_torch_linear() -> bool:
    """Undo DeepSpeed ZeRO-3's process-wide replacement of ``torch.nn.functional.linear``; True if it was replaced."""
    import sys

    import torch

    pp = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    original = getattr(getattr(pp, "InsertPostInitMethodToModuleSubClasses", None), "linear_bk", None)
    if original is not None and torch.nn.functional.linear is not original:
        torch.nn.functional.linear = original
        return True
    return False


def _run_training(cfg: TrainConfig, resume: bool = False, trust_checkpoint: bool = False) -> dict:
    rank, world, local_rank = init_distributed()  # sets DS_ACCELERATOR before deepspeed is imported
    import deepspeed
    import torch
    import torch.distributed as dist
    import yaml
    from torch.utils.data import DataLoader

    from ..utils import atomic_write_text, seed_everything
    from .stages import StageContext, get_stage

    t = cfg.trainer
    stage_cls = get_stage(t.stage)
    # what `medmm prepare` recorded (spacing, window, sizes, magnification) goes into the model config, so the
    # checkpoint serves raw inputs the way its shards were made; a config that says otherwise is a ConfigError
    copied = adopt_prepared(cfg.model, prepared_preprocess(cfg.data.datasets))
    if copied and rank == 0:
        log.info("preprocessing copied from the prepared data: %s", copied)
    out = Path(t.output_dir)
    ckpt_root = out / "checkpoints"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if t.cpu_threads:
        torch.set_num_threads(t.cpu_threads)

    seed_everything(t.seed)
    stage = stage_cls(cfg, StageContext(rank, world, local_rank, out))
    model = stage.build_model()
    data = stage.build_data()
    steps_per_epoch = max(1, data.batches_per_epoch // t.grad_accum)
    max_steps = t.epochs * steps_per_epoch if t.epochs else t.max_steps
    eval_every = t.eval_every or (steps_per_epoch if t.epochs else 0)

    ds_config = build_ds_config(t, world)
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if t.restore_best and zero_stage == 3:
        raise ConfigError("trainer.restore_best keeps the best weights in memory: use ZeRO 0-2, not 3")
    if (t.patience or t.restore_best) and not stage.monitor:
        raise ConfigError(f"trainer.patience/restore_best: stage '{t.stage}' has no validation score to follow")
    params = stage.parameters(model)
    if not params:
        raise ConfigError("nothing to train: every parameter of the model is frozen")
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.adam_betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.warmup_steps, max_steps,
                                                                       schedule=t.lr_schedule))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    module = engine.module
    stopper = _EarlyStopping(stage.monitor, t.patience, t.restore_best)

    start_step, stopped_early = 0, False
    if resume:
        state = load_checkpoint(engine, ckpt_root, trust=trust_checkpoint)
        if state is None:
            log.warning("--resume: no checkpoint in %s; starting from step 0", ckpt_root)
        else:
            start_step = int(state["step"])
            stopper.load(state.get("early_stopping"))
            stopped_early = bool((state.get("early_stopping") or {}).get("stopped"))
            if rank == 0:
                print(f"resumed from {ckpt_root} at step {start_step}", flush=True)

    workers = dict(num_workers=data.num_workers, persistent_workers=data.num_workers > 0,
                   pin_memory=torch.cuda.is_available() and data.pin_memory)
    if data.stream is not None:  # shards streamed: the workers build whole micro-batches (medmm.data.streaming)
        loader = DataLoader(data.stream(start_step * t.grad_accum), batch_size=None, **workers)
    else:
        loader = DataLoader(data.dataset, batch_sampler=data.sampler(start_step * t.grad_accum),
                            collate_fn=data.collate, **workers)
    load_errors: dict[str, dict] = {}  # source -> error record, from every worker of this rank
    it = iter(loader)

    writer = bar = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        writer = SummaryWriter(str(out / "tb"))
        bar = tqdm(total=max_steps, initial=start_step, desc=t.stage, unit="step", dynamic_ncols=True)
        print(f"stage={t.stage} world={world} zero={zero_stage} {stage.describe(module)} steps={max_steps} "
              f"{data.description}", flush=True)
    metrics_f = open(out / "metrics.jsonl", "a") if rank == 0 else None

    device = engine.device
    if eval_every and start_step == 0:  # the validation curve's first point: the model before training
        engine.eval()
        scores0 = stage.evaluate(module)
        if rank == 0 and scores0 is not None:
            metrics_f.write(json.dumps({"step": 0, **scores0}) + "\n")
            metrics_f.flush()
    engine.train()
    last_loss = float("nan")
    t0 = time.perf_counter()
    samples_since = 0
    done = start_step
    for step in range(start_step, max_steps if not stopped_early else start_step):
        # Per-step reseeding keeps dropout identical after a resume.
        torch.manual_seed(t.seed * 1_000_003 + step * 1009 + rank)
        step_loss = torch.zeros((), device=device)
        extras: dict[str, float] = {}
        for _ in range(t.grad_accum):
            raw = next(it)
            for e in raw.pop("load_errors", []):
                load_errors.setdefault(str(e.get("path")), e)
            batch = to_device(raw, device)
            loss, logs = stage.loss(engine, batch)
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().float() / t.grad_accum
            for k, v in logs.items():
                extras[k] = extras.get(k, 0.0) + float(v) / t.grad_accum
            samples_since += batch_size_of(batch) * world
        if world > 1:
            dist.all_reduce(step_loss)
            step_loss /= world
        last_loss = float(step_loss)
        done = step + 1
        scores = None
        if eval_every and (done % eval_every == 0 or done == max_steps):
            engine.eval()
            scores = stage.evaluate(module)
            engine.train()
            if scores is not None and stopper.update(scores, done, module):
                stopped_early = True
        if rank == 0 and (done % t.log_every == 0 or done == max_steps or scores is not None or stopped_early):
            dt = time.perf_counter() - t0
            sps = samples_since / max(dt, 1e-9)
            lr = engine.get_lr()[0]
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{sps:.1f}")
            writer.add_scalar("train/loss", last_loss, done)
            writer.add_scalar("train/lr", lr, done)
            writer.add_scalar("train/samples_per_s", sps, done)
            row = {"step": done, "loss": last_loss, "lr": lr, "samples_per_s": sps}
            for k, v in extras.items():
                writer.add_scalar(f"train/{k}", v, done)
                row[k] = v
            for k, v in (scores or {}).items():
                if isinstance(v, (int, float)):
                    writer.add_scalar(f"eval/{k}", v, done)
                row[k] = v
            metrics_f.write(json.dumps(row) + "\n")
            metrics_f.flush()
            t0, samples_since = time.perf_counter(), 0
        if bar is not None:
            bar.update(1)
        if done % t.save_every == 0 or done == max_steps or stopped_early:
            save_checkpoint(engine, ckpt_root, done, {"step": done, "loss": last_loss,
                                                      "early_stopping": {**stopper.state(), "stopped": stopped_early}},
                            t.keep_last)
        if stopped_early:
            if rank == 0:
                print(f"early stop at step {done}: no better {stage.monitor} in {t.patience} evaluations "
                      f"(best {stopper.best} at step {stopper.best_step})", flush=True)
            break

    if t.restore_best and stopper.weights is not None:
        module.load_state_dict(stopper.weights)
    summary = {"stage": t.stage, "step": done, "max_steps": max_steps, "loss": last_loss, "world_size": world,
               "zero_stage": zero_stage, "output_dir": str(out), "checkpoint": str(out / "checkpoint")}
    if stopper.monitor and stopper.best is not None:
        summary.update({"best_" + stopper.monitor: stopper.best, "best_step": stopper.best_step,
                        "stopped_early": stopped_early, "restored_best": bool(t.restore_best)})
    engine.eval()
    summary.update(stage.finish(module, summary) or {})
    stage.save(engine, module, out / "checkpoint", zero_stage, summary)

    for r in stage.load_errors():  # failures met in this process (num_workers=0, featurisation)
        load_errors.setdefault(str(r.get("path")), r)
    gathered = [load_errors]
    if world > 1:  # every rank's (and its workers') failures reach rank 0
        gathered = [None] * world
        dist.all_gather_object(gathered, load_errors)
    if rank == 0:
        bar.close()
        writer.close()
        metrics_f.close()
        merged: dict[str, dict] = {}
        for part in gathered:
            merged.update(part or {})
        if merged:
            with open(out / "errors.jsonl", "a") as f:
                for r in merged.values():
                    f.write(json.dumps(r) + "\n")
            summary["errors"] = len(merged)
        from .plots import plot_loss_curve

        plot_loss_curve(out / "metrics.jsonl", out / "loss.png")
        print(f"final loss {last_loss:.4f}; model written to {out / 'checkpoint'}; loss curve {out / 'loss.png'}",
              flush=True)
    return summary
