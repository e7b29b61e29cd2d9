"""``vqa``: short answers about an image, a study, a molecule or a sequence (VQA-RAD style).

Data: conversation JSONL (``medmm prepare vqa|dicom|molecules|dna``), the last gpt turn being the reference
answer; ``answer_type`` (CLOSED/OPEN) when the source has it. Predictions: ``{"id", "prediction",
"reference"}`` rows (``answer`` is read when ``prediction`` is absent).

Metrics (fractions, items resampled for the intervals):

* ``exact_match``: normalised prediction == normalised reference (lower-case, punctuation and English
  articles removed, white space collapsed; the SQuAD/VQA convention of :func:`medmm.scoring.normalize`);
* ``closed_accuracy``: exact match over closed questions (``answer_type`` CLOSED, else a yes/no reference);
* ``open_recall``: share of the reference's tokens found in the prediction, over open questions;
* ``token_f1``: SQuAD token F1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...scoring import normalize, recall, token_f1
from ..bootstrap import mean_statistic
from .common import generated_rows, load_conversations, rows_from_predictions
from .registry import Benchmark, RunContext, Scored, register_benchmark

CLOSED_ANSWERS = {"yes", "no"}


def is_closed(reference: str, answer_type: str | None = None) -> bool:
    """Closed when the source says so (``answer_type``), else when the reference is yes or no."""
    if answer_type:
        return str(answer_type).upper() == "CLOSED"
    return normalize(reference) in CLOSED_ANSWERS


@register_benchmark
class VQABenchmark(Benchmark):
    name = "vqa"
    summary = "short answers (VQA-RAD style): exact match, closed accuracy, open recall, token F1"
    headline = "exact_match"

    @dataclass
    class Options:
        max_new_tokens: int = 16
        """Tokens generated per answer (with --checkpoint)."""

    def protocol(self, opts) -> str:
        return ("vqa: SQuAD/VQA normalisation (lower-case, no punctuation or articles); closed = answer_type CLOSED "
                "or a yes/no reference; open recall = share of reference tokens in the prediction")

    def load(self, paths: list[Path], opts) -> list[dict]:
        return load_conversations(paths)

    def generate(self, records: list[dict], opts, ctx: RunContext) -> list[dict]:
        return generated_rows(records, ctx, opts.max_new_tokens, "answer", extra=("answer_type",))

    def from_predictions(self, predictions, records, opts, source):
        return rows_from_predictions(predictions, records, source, extra=("answer_type",))

    def score(self, rows: list[dict], opts) -> Scored:
        em, f1, closed, open_ = [], [], [], []
        out = []
        for r in rows:
            e = float(normalize(r["prediction"]) == normalize(r["reference"]))
            c = is_closed(r["reference"], r.get("answer_type"))
            em.append(e)
            f1.append(token_f1(r["prediction"], r["reference"]))
            closed.append(e if c else None)
            rec = None if c else recall(r["prediction"], r["reference"])
            open_.append(rec)
            out.append({**r, "correct": bool(e), "group": "closed" if c else "open",
                        "score": round(f1[-1], 4)})
        n_closed = sum(x is not None for x in closed)
        stat = mean_statistic({"exact_match": em, "closed_accuracy": closed, "open_recall": open_, "token_f1": f1})
        return Scored(stat=stat, rows=out, notes=[f"{n_closed} closed and {len(rows) - n_closed} open questions"])
