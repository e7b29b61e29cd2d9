"""Answer metrics: exact match, closed-question (yes/no) accuracy, open-question recall, token F1, BLEU.

Normalisation lower-cases, strips punctuation and articles (the SQuAD/VQA convention; the per-answer
functions live in :mod:`medmm.scoring`, shared with training's rewards). BLEU is sacrebleu's corpus BLEU (0-100).
"""

from __future__ import annotations

from ..scoring import normalize, recall, token_f1

CLOSED_ANSWERS = {"yes", "no"}
__all__ = ["CLOSED_ANSWERS", "answer_metrics", "is_closed", "normalize", "recall", "token_f1"]


def is_closed(ref: str, answer_type: str | None = None) -> bool:
    if answer_type:
        return answer_type.upper() == "CLOSED"
    return normalize(ref) in CLOSED_ANSWERS


def answer_metrics(predictions: list[str], references: list[str], answer_types: list[str | None] | None = None) -> dict:
    """Corpus-level metrics over paired predictions and references."""
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    n = len(references)
    if n == 0:
        return {"count": 0}
    types = answer_types or [None] * n
    em = [normalize(p) == normalize(r) for p, r in zip(predictions, references)]
    closed = [i for i in range(n) if is_closed(references[i], types[i])]
    open_ = [i for i in range(n) if i not in set(closed)]
    out = {
        "count": n,
        "exact_match": sum(em) / n,
        "token_f1": sum(token_f1(p, r) for p, r in zip(predictions, references)) / n,
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "closed_count": len(closed),
        "open_count": len(open_),
    }
    if closed:
        out["closed_accuracy"] = sum(em[i] for i in closed) / len(closed)
    if open_:
        out["open_recall"] = sum(recall(predictions[i], references[i]) for i in open_) / len(open_)
    return out
