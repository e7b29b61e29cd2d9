"""``medmm eval druggability``: AUROC / AUPRC / Brier / ECE of a head model or an LLM checkpoint on labelled molecules.

    medmm eval druggability --checkpoint C --data test.csv --smiles-col smiles --label-col FDA_APPROVED
    medmm eval druggability --checkpoint C --data molecules_eval.jsonl --calibration calib.csv

A head model (``trainer.stage: head``) uses its stored temperature; an LLM checkpoint is scored by the
closed-set probability of "yes" and calibrated only when ``--calibration`` (a labelled file, disjoint
from ``--data``) is given. Writes ``predictions.csv`` (one row per input row, errors included) and
``metrics.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from ..data.featurisers.molecules import REPORT_COLUMNS, read_labelled_molecules
from ..inference.molecules import DEFAULT_QUESTION, cell, head_logits, llm_logits, mol_modality
from ..scoring import T_MAX, T_MIN, binary_metrics, fit_temperature, sigmoid


def evaluate_druggability(checkpoint: str | Path, data: str | Path, out_dir: str | Path, smiles_col: str = "smiles",
                          label_col: str | None = "label", question: str = DEFAULT_QUESTION,
                          options: list[str] | None = None, calibration: str | Path | None = None,
                          workers: int = 0, device: str = "auto") -> dict:
    """Score ``data`` with ``checkpoint`` and write ``predictions.csv`` and ``metrics.json`` into ``out_dir``.

    Returns:
        the metrics: ``kind`` (head | llm), rows, scored, errors, temperature, ``raw`` and ``calibrated``
        binary metrics (``calibrated`` is None for an uncalibrated LLM).
    """
    from ..model.heads import is_head_model
    from ..utils import atomic_write_text

    options = options or ["yes", "no"]
    smiles, sources, labels, errors = read_labelled_molecules(data, smiles_col, label_col, options[0])
    if is_head_model(checkpoint):
        rows, errs, temperature = head_logits(checkpoint, smiles, sources, labels)
        errors += errs
        kind = "head"
    else:
        from ..inference.predictor import Predictor

        pred = Predictor(checkpoint, device=device)
        pre = pred.model.config.modalities[mol_modality(pred.model)].preprocess
        rows, errs = llm_logits(pred, smiles, sources, question, options, pre, workers)
        errors += errs
        temperature, kind = 1.0, "llm"
        if calibration:
            c_smiles, c_sources, c_labels, _ = read_labelled_molecules(calibration, smiles_col, label_col, options[0])
            c_rows, _ = llm_logits(pred, c_smiles, c_sources, question, options, pre, workers)
            by = dict(zip(c_sources, c_labels))
            pairs = [(r["logit"], by[s]) for s, r in c_rows.items() if by[s] is not None]
            temperature = fit_temperature([z for z, _ in pairs], [y for _, y in pairs])
    done = [(s, y) for s, y in zip(sources, labels) if s in rows and y is not None]
    z = np.array([rows[s]["logit"] for s, _ in done])
    y = [lab for _, lab in done]
    known = set(sources)
    metrics = {"checkpoint": str(checkpoint), "kind": kind, "data": str(data),
               "rows": len(sources) + len([e for e in errors if e.get("path") not in known]), "scored": len(done),
               "errors": len(errors), "temperature": round(temperature, 4),
               "temperature_at_bound": temperature in (T_MIN, T_MAX), "raw": binary_metrics(y, sigmoid(z)),
               "calibrated": binary_metrics(y, sigmoid(z / temperature)) if temperature != 1.0 or kind == "head"
               else None}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    err_by = {e.get("path"): e for e in errors}
    with open(out_dir / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["source", "input", "canonical_smiles", "label", "prob_raw", "prob", *REPORT_COLUMNS, "error"])
        for s, smi, lab in zip(sources, smiles, labels):
            r = rows.get(s)
            if r is None:
                e = err_by.get(s, {})
                w.writerow([s, smi, "", lab, "", "", *[""] * len(REPORT_COLUMNS), e.get("message", "not scored")])
                continue
            w.writerow([s, smi, r["canonical"], lab, round(float(sigmoid(np.array(r["logit"]))), 5),
                        round(float(sigmoid(np.array(r["logit"] / temperature))), 5),
                        *[cell(r["report"].get(c)) for c in REPORT_COLUMNS], ""])
        for e in errors:  # rows rejected before featurising (bad labels) are listed too
            if e.get("path") not in known:
                w.writerow([e.get("path"), "", "", "", "", "", *[""] * len(REPORT_COLUMNS), e.get("message")])
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> dict:
    """``medmm eval druggability --checkpoint C --data D [--smiles-col S --label-col L] [--calibration F]``."""
    ap = argparse.ArgumentParser(prog="medmm eval druggability",
                                 description="AUROC / AUPRC / Brier of a druggability head or LLM checkpoint.")
    ap.add_argument("--checkpoint", required=True, help="head model folder (head_model.json) or medmm model folder")
    ap.add_argument("--data", required=True, help="labelled CSV (--smiles-col, --label-col) or conversation JSONL")
    ap.add_argument("--smiles-col", default="smiles")
    ap.add_argument("--label-col", default="label")
    ap.add_argument("--question", default=DEFAULT_QUESTION, help="LLM checkpoints: the yes/no question")
    ap.add_argument("--options", default="yes,no", help="LLM checkpoints: closed-set answers, positive first")
    ap.add_argument("--calibration", help="LLM checkpoints: labelled file to fit the temperature on")
    ap.add_argument("--workers", type=int, default=0, help="RDKit worker processes")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="runs/eval_druggability")
    a = ap.parse_args(argv)
    m = evaluate_druggability(a.checkpoint, a.data, a.out, a.smiles_col, a.label_col, a.question,
                              [o.strip() for o in a.options.split(",") if o.strip()], a.calibration, a.workers,
                              a.device)
    print(json.dumps(m, indent=2))
    return m
