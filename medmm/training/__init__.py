"""Training: the DeepSpeed loop, checkpoints, distributed setup. ``python -m medmm.training --config C``."""
