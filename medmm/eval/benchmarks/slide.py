"""``slide``: whole-slide classification by a head model (ABMIL over tile features; ``configs/tasks/slide_classification.yaml``).

    medmm eval slide --checkpoint runs/slide_cls/checkpoint --data runs/wsi/slides_eval.jsonl
    medmm eval slide --predictions preds.jsonl      # rows {"id", "label", "probs": {class: p}} (or binary "prob")

The slide JSONL (``medmm prepare wsi --features --labels``) is read by the checkpoint's ``slides`` featuriser.
Metrics and intervals: :mod:`medmm.eval.benchmarks.head_tasks`.
"""

from __future__ import annotations

from .head_tasks import HeadBenchmark
from .registry import register_benchmark


@register_benchmark
class SlideBenchmark(HeadBenchmark):
    name = "slide"
    summary = "slide classification head (ABMIL): accuracy, balanced accuracy, AUROC (or binary metrics)"
    featuriser = "slides"
