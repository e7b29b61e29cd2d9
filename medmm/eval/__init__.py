"""Evaluation: text and VQA metrics, and the runner behind ``medmm eval``."""
