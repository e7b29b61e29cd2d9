"""``python -m medmm.training --config C [--resume] [key=value ...]`` (what train.py and torchrun call)."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    from ..tasks.head import is_task_config

    if is_task_config(argv):  # configs/tasks/*.yaml: encoder + head recipes run their own plain torch loop
        from ..tasks.head import main as task_main

        return task_main(argv)
    ap = argparse.ArgumentParser(prog="train.py", description="Train a medmm model with DeepSpeed.")
    ap.add_argument("--config", required=True, help="YAML recipe in configs/")
    ap.add_argument("--resume", action="store_true", help="continue from <output_dir>/checkpoints/latest")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=20")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ..config import TrainConfig, load_config
    from .trainer import run_training

    cfg = load_config(TrainConfig, args.config, args.overrides)
    return run_training(cfg, resume=args.resume)


if __name__ == "__main__":
    main(sys.argv[1:])
