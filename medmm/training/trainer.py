"""The loop moved to :mod:`medmm.training.loop`; these names stay importable from here for older code."""

from .loop import build_ds_config, lr_lambda, run_training

__all__ = ["build_ds_config", "lr_lambda", "run_training"]
