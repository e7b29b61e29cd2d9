"""Training: the one DeepSpeed loop (``loop.py``), its stages (``stages/``: sft, align, head, ...), checkpoints and
distributed setup. ``python train.py --config C`` = ``python -m medmm.training --config C``."""
