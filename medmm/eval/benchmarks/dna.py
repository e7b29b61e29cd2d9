"""``dna``: DNA sequence classification by a head model (``configs/tasks/dna_classification_head.yaml``).

    medmm eval dna --checkpoint runs/dna_classification_head/checkpoint --data test.tsv
    medmm eval dna --predictions preds.jsonl        # rows {"id", "label", "prob"} or {"id", "label", "probs"}

The labelled TSV/CSV is read by the checkpoint's ``dna`` featuriser (its sequence and label columns unless
``--input-col``/``--label-col``). Metrics and intervals: :mod:`medmm.eval.benchmarks.head_tasks`.
"""

from __future__ import annotations

from .head_tasks import HeadBenchmark
from .registry import register_benchmark


@register_benchmark
class DNABenchmark(HeadBenchmark):
    name = "dna"
    summary = "DNA sequence classification head: AUROC/AUPRC/Brier/ECE (binary) or accuracy/AUROC (multiclass)"
    featuriser = "dna"
