"""The DeepSpeed training loop (ZeRO 0-3, CPU offload, gradient accumulation, bf16 on GPU).

Run it as one process (``python train.py --config C``), under ``torchrun --nproc_per_node N``, under
the ``deepspeed`` launcher with a hostfile, or under Slurm's ``srun``. Writes to ``output_dir``:
``checkpoints/`` (resumable), ``checkpoint/`` (the final medmm model folder), ``tb/`` (TensorBoard),
``metrics.jsonl`` (one line per logged step), ``config.yaml`` (the resolved config).
"""

from __future__ import annotations

import json
import logging
import math
import time
from functools import partial
from pathlib import Path

from ..config import TrainConfig, TrainerConfig, to_dict
from ..errors import ConfigError
from .checkpoint import load_checkpoint, save_checkpoint, save_final_model
from .distributed import init_distributed

log = logging.getLogger(__name__)


def build_ds_config(t: TrainerConfig, world_size: int) -> dict:
    """Read the DeepSpeed JSON and fill in batch sizes, clipping and precision from the trainer config."""
    import torch

    path = Path(t.deepspeed)
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


def lr_lambda(warmup: int, total: int, min_ratio: float = 0.1):
    """Linear warm-up then cosine decay to ``min_ratio`` of the peak."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def load_modules_from(model, folder: str | Path) -> dict:
    """Copy encoder/projector weights of the modalities both models have from a saved medmm folder."""
    from safetensors.torch import load_file

    path = Path(folder) / "modules.safetensors"
    if not path.exists():
        raise ConfigError(f"trainer.init_from: {path} not found (is '{folder}' a medmm model folder?)")
    state = load_file(str(path))
    loaded = {}
    for part in ("encoders", "projectors"):
        for name, module in getattr(model, part).items():
            prefix = f"{part}.{name}."
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if sub:
                module.load_state_dict(sub, strict=True)
                loaded[f"{part}.{name}"] = len(sub)
    if not loaded:
        raise ConfigError(f"trainer.init_from: {folder} shares no modality with this model")
    return loaded


def _to_device(batch, device):
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def run_training(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train; returns a summary (final step, last loss, paths). Every rank runs this."""
    rank, world, local_rank = init_distributed()  # sets DS_ACCELERATOR before deepspeed is imported
    import deepspeed
    import torch
    import torch.distributed as dist
    import yaml
    from torch.utils.data import DataLoader

    from ..data.dataset import ConversationDataset, MixtureDataset, ResumableBatchSampler
    from ..model.multimodal import MedMMForCausalLM
    from ..utils import atomic_write_text, seed_everything

    t = cfg.trainer
    out = Path(t.output_dir)
    ckpt_root = out / "checkpoints"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if not cfg.data.datasets:
        raise ConfigError("data.datasets: at least one dataset is required")

    seed_everything(t.seed)
    model = MedMMForCausalLM.from_config(cfg.model)
    if t.init_from:
        loaded = load_modules_from(model, t.init_from)
        if rank == 0:
            print(f"encoders/projectors initialised from {t.init_from}: {loaded}", flush=True)
    proc = model.processor(cfg.data.max_length, cfg.data.system_prompt)
    datasets = [ConversationDataset(d.path, proc, d.name, mode=t.stage) for d in cfg.data.datasets]
    medmm_model = model
    if t.stage == "align":
        from .align import AlignmentModel

        model = AlignmentModel(medmm_model, t.align_modality, rank, world)
    mixture = MixtureDataset(datasets, [d.weight for d in cfg.data.datasets])

    ds_config = build_ds_config(t, world)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: encoder, projector and LLM are all frozen")
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.warmup_steps, t.max_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))

    start_step = 0
    if resume:
        state = load_checkpoint(engine, ckpt_root)
        if state is None:
            log.warning("--resume: no checkpoint in %s; starting from step 0", ckpt_root)
        else:
            start_step = int(state["step"])
            if rank == 0:
                print(f"resumed from {ckpt_root} at step {start_step}", flush=True)

    sampler = ResumableBatchSampler(mixture, t.micro_batch_size, rank, world, t.seed, cfg.data.epoch_size,
                                    start=start_step * t.grad_accum)
    loader = DataLoader(mixture, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                        collate_fn=partial(proc.collate, pad_missing_modalities=t.stage == "sft"),
                        persistent_workers=cfg.data.num_workers > 0)
    it = iter(loader)

    writer = bar = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        writer = SummaryWriter(str(out / "tb"))
        bar = tqdm(total=t.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        counts = medmm_model.parameter_counts()
        print(f"world={world} zero={zero_stage} params={counts['total']:,} trainable={counts['trainable']:,} "
              f"datasets={[(d.name, len(d)) for d in datasets]}", flush=True)
    metrics_f = open(out / "metrics.jsonl", "a") if rank == 0 else None

    device = engine.device
    engine.train()
    last_loss = float("nan")
    t0 = time.perf_counter()
    samples_since = 0
    for step in range(start_step, t.max_steps):
        # Per-step reseeding keeps dropout identical after a resume.
        torch.manual_seed(t.seed * 1_000_003 + step * 1009 + rank)
        step_loss = torch.zeros((), device=device)
        for _ in range(t.grad_accum):
            batch = _to_device(next(it), device)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().float() / t.grad_accum
            samples_since += batch["input_ids"].shape[0] * world
        if world > 1:
            dist.all_reduce(step_loss)
            step_loss /= world
        last_loss = float(step_loss)
        done = step + 1
        if rank == 0 and (done % t.log_every == 0 or done == t.max_steps):
            dt = time.perf_counter() - t0
            sps = samples_since / max(dt, 1e-9)
            lr = engine.get_lr()[0]
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{sps:.1f}")
            writer.add_scalar("train/loss", last_loss, done)
            writer.add_scalar("train/lr", lr, done)
            writer.add_scalar("train/samples_per_s", sps, done)
            metrics_f.write(json.dumps({"step": done, "loss": last_loss, "lr": lr, "samples_per_s": sps}) + "\n")
            metrics_f.flush()
            t0, samples_since = time.perf_counter(), 0
        if bar is not None:
            bar.update(1)
        if done % t.save_every == 0 or done == t.max_steps:
            save_checkpoint(engine, ckpt_root, done, {"step": done, "loss": last_loss}, t.keep_last)

    final = save_final_model(engine, medmm_model, out / "checkpoint", zero_stage,
                             extra={"training": {"steps": t.max_steps, "final_loss": last_loss, "world_size": world,
                                                 "stage": t.stage,
                                                 "zero_stage": zero_stage,
                                                 "datasets": [d.path for d in cfg.data.datasets]}})
    if rank == 0:
        bar.close()
        writer.close()
        metrics_f.close()
        failed = {d.name: list(d.failed.values()) for d in datasets if d.failed}
        if failed:
            with open(out / "errors.jsonl", "a") as f:
                for recs in failed.values():
                    for r in recs:
                        f.write(json.dumps(r) + "\n")
        from ..eval.plots import plot_loss_curve

        plot_loss_curve(out / "metrics.jsonl", out / "loss.png")
        print(f"final loss {last_loss:.4f}; model written to {final}; loss curve {out / 'loss.png'}", flush=True)
    return {"step": t.max_steps, "loss": last_loss, "output_dir": str(out), "checkpoint": str(out / "checkpoint")}
