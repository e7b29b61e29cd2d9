"""``medmm eval head`` (and ``medmm wsi eval``): a head model (``trainer.stage: head``) on a labelled file.

    medmm eval head --checkpoint runs/slide_cls/checkpoint --data runs/wsi/slides_eval.jsonl --out runs/slide_cls/eval
    medmm eval head --checkpoint runs/dna_classification_head/checkpoint --data test.tsv --label-col label

The file is read by the model's own featuriser (CSV/TSV for molecules and DNA, slide JSONL for slides).
Binary heads: AUROC, AUPRC, Brier, ECE, log loss, accuracy, raw and calibrated (the stored temperature).
Multiclass heads: accuracy, balanced accuracy, AUROC with bootstrap 95% intervals, per-class table,
confusion matrix. Writes ``metrics.json`` and ``predictions.csv``; unreadable inputs are counted and
listed in ``metrics.json`` (``errors``), not guessed.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..scoring import binary_metrics, classification_metrics


def evaluate_head(checkpoint: str | Path, data: str | Path, out_dir: str | Path, bootstrap: int = 1000, seed: int = 0,
                  device: str = "auto", input_col: str | None = None, label_col: str | None = None) -> dict:
    """Score ``data`` with the head model at ``checkpoint``; returns the metrics (also in ``out_dir/metrics.json``)."""
    from ..data.featurisers import featurise_rows, label_parser, with_reports, write_predictions
    from ..inference.head import HeadPredictor
    from ..model.heads import predict_logits
    from ..utils import atomic_write_text

    hp = HeadPredictor(checkpoint, device)
    col = label_col or hp.cfg.data.label_col
    rows = hp.featuriser.read_rows(data, input_col, col)
    feats = featurise_rows(hp.featuriser, rows, label_parser(hp.classes, col))
    logits = predict_logits(hp.model, hp.featuriser, feats.items)
    probs = hp.probabilities(logits)
    if hp.model.binary:
        metrics = {"raw": binary_metrics(feats.labels, hp.probabilities(logits, calibrated=False)),
                   "calibrated": binary_metrics(feats.labels, probs), "temperature": hp.temperature}
    else:
        metrics = classification_metrics(feats.labels, probs, hp.classes, bootstrap=bootstrap, seed=seed)
    metrics.update({"checkpoint": str(checkpoint), "data": str(data), "rows": len(rows), "scored": len(feats),
                    "errors": feats.errors})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_predictions(out_dir / "predictions.csv", with_reports(hp.featuriser, feats), probs, hp.classes,
                      hp.probabilities(logits, calibrated=False) if hp.model.binary else None)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> dict:
    """``medmm eval head --checkpoint C --data D [--out DIR] [--bootstrap N] [--label-col L] [--input-col I]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="medmm eval head", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a head model folder (head_model.json)")
    ap.add_argument("--data", required=True, help="labelled file the model's featuriser reads")
    ap.add_argument("--out", default="runs/eval_head")
    ap.add_argument("--bootstrap", type=int, default=1000, help="multiclass: resamples for the 95%% intervals")
    ap.add_argument("--input-col", help="table column of the inputs (default: the training recipe's)")
    ap.add_argument("--label-col", help="column / JSONL field of the labels (default: the training recipe's)")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    m = evaluate_head(a.checkpoint, a.data, a.out, a.bootstrap, device=a.device, input_col=a.input_col,
                      label_col=a.label_col)
    print(json.dumps({k: v for k, v in m.items() if k != "errors"} | {"errors": len(m["errors"])}, indent=2))
    return m
