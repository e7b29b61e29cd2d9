"""``python -m medmm.training --config C [--resume] [key=value ...]`` (what train.py and torchrun call).

``trainer.stage`` in the config names the stage (:mod:`medmm.training.stages`); every stage runs
through the one DeepSpeed loop (:func:`medmm.training.loop.run_training`).
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="train.py", description="Train a medmm model with DeepSpeed; trainer.stage in "
                                 "the config picks the stage (sft, align, head, ...).")
    ap.add_argument("--config", required=True, help="YAML recipe in configs/")
    ap.add_argument("--resume", action="store_true", help="continue from <output_dir>/checkpoints/latest")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="with --resume: let DeepSpeed unpickle the checkpoint (weights_only=False, can run code); "
                         "only for a folder you wrote yourself that the weights-only load refuses")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=20")
    return ap


def main(argv: list[str] | None = None) -> dict:
    """Parse, load the config, run the loop; returns the run's summary."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ..config import TrainConfig, load_config
    from .loop import run_training

    cfg = load_config(TrainConfig, args.config, args.overrides)
    return run_training(cfg, resume=args.resume, trust_checkpoint=args.trust_checkpoint)


if __name__ == "__main__":
    main(sys.argv[1:])
