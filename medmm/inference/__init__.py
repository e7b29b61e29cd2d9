"""Inference: load a checkpoint, decode with HF ``generate``; ``python -m medmm.inference`` / infer.py."""
