"""Druggability: score molecules with a trained head or with the LLM, next to RDKit's drug-likeness rules.

Two ways to a score, one evaluation and one batch-inference path for both:

* head: ``medmm train --config configs/tasks/druggability_head.yaml`` trains ``mol_gin`` + a head on a
  labelled CSV with a Bemis-Murcko scaffold split, calibrated by temperature scaling
  (:mod:`medmm.tasks.head`); the score is the calibrated probability of the positive class;
* LLM: ``configs/druggability_llm.yaml`` fine-tunes the language model on ``<mol>`` yes/no records
  (``medmm prepare molecules ... --label-col L --split scaffold``); the score is the closed-set
  probability of "yes" (:meth:`medmm.inference.decoding.Session.closed_set`), optionally calibrated
  by a temperature fitted on a labelled calibration file.

::

    medmm eval druggability --checkpoint C --data test.csv --smiles-col smiles --label-col FDA_APPROVED
    python infer.py --checkpoint C --molecules in.csv --question "Is this molecule likely to be approved?" --out out.csv

Every input row gets an output row: the canonical SMILES, the score and answer, the rule report
(QED, Lipinski, Veber, PAINS), or the typed error of a row that failed; nothing is dropped.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..errors import InvalidInputError
from .head import Featurised, HeadTaskConfig, register_featuriser, register_reporter

REPORT_COLUMNS = ["qed", "mol_weight", "logp", "tpsa", "hbd", "hba", "rotatable_bonds", "lipinski_pass",
                  "lipinski_violations", "veber_pass", "veber_violations", "pains_alerts"]
DEFAULT_QUESTION = "Is this molecule likely to be an approved drug? Answer yes or no."


def report_of(rec) -> dict:
    """The rule-report columns of a processed molecule (descriptors + drug-likeness rules)."""
    return {c: (rec.druglikeness.get(c) if c in rec.druglikeness else rec.descriptors.get(c)) for c in REPORT_COLUMNS}


def standardise_options(pre):
    from ..io.molecules import StandardiseOptions

    return StandardiseOptions(canonical_tautomer=pre.mol_canonical_tautomer, remove_stereo=pre.mol_remove_stereo,
                              max_heavy_atoms=pre.mol_max_heavy_atoms)


@register_featuriser("druggability")
def featurise_molecules(cfg: HeadTaskConfig, values: list[str], sources: list[str]) -> Featurised:
    """SMILES -> RDKit pipeline in ``cfg.data.workers`` processes -> graph or fingerprint items + scaffolds."""
    from ..data.loaders import MolGraphLoader
    from ..io.molecules import process_molecules

    kind = {"mol_graph": "graph", "smiles_fingerprint": "fingerprint"}.get(cfg.loader)
    if kind is None:
        raise ConfigError(f"loader: druggability takes mol_graph or smiles_fingerprint, not '{cfg.loader}'")
    recs = process_molecules(values, sources, standardise_options(cfg.preprocess),
                             features=(kind, "scaffold"), workers=cfg.data.workers,
                             fingerprint_bits=cfg.preprocess.fingerprint_bits,
                             fingerprint_radius=cfg.preprocess.fingerprint_radius)
    out = Featurised([], [], [], [], [], groups=[])
    for r in recs:
        if not r.ok:
            out.errors.append(r.error)
            continue
        out.items.append(MolGraphLoader.from_graph(r.graph) if kind == "graph" else
                         {"x": torch.from_numpy(r.fingerprint)})
        out.sources.append(r.source)
        out.inputs.append(r.input)
        out.canonical.append(r.smiles)
        out.groups.append(r.scaffold)
    return out


@register_reporter("druggability")
def molecule_reports(canonical: list[str]) -> list[dict]:
    """The rule report (descriptors, Lipinski, Veber, PAINS) of already standardised SMILES."""
    from ..io.molecules import descriptors, druglikeness, parse_smiles

    out = []
    for smi in canonical:
        mol = parse_smiles(smi, standardise=False, max_heavy_atoms=10**6)
        d = descriptors(mol)
        r = druglikeness(mol, d)
        out.append({c: r.get(c, d.get(c)) for c in REPORT_COLUMNS})
    return out


# ----------------------------------------------------------------------------- LLM scores
def mol_modality(model) -> str:
    """The name of the model's molecule modality (the one whose loader reads SMILES)."""
    names = [n for n, m in model.config.modalities.items() if m.loader in ("mol_graph", "smiles_fingerprint")]
    if not names:
        raise ConfigError(f"this model has no molecule modality (modalities: {list(model.config.modalities)})")
    return names[0]


def llm_scores(predictor, smiles: list[str], question: str, options: list[str]) -> list[dict]:
    """Closed-set answers for each (already standardised) SMILES: ``{answer, probs, logit}`` or ``{error}``.

    ``logit`` = log p(option 0) - log p(option 1) (temperature-scalable); with more options, the log-odds of
    option 0 against the rest.
    """
    from ..errors import ModalityMismatchError

    name = mol_modality(predictor.model)
    out = []
    for smi in smiles:
        try:
            res = predictor.session({name: smi}).closed_set(question, options)
        except (InvalidInputError, ModalityMismatchError) as e:
            out.append({"error": type(e).__name__, "message": str(e)})
            continue
        p0 = min(max(res["probs"][options[0]], 1e-12), 1 - 1e-12)
        out.append({"answer": res["answer"], "probs": res["probs"], "score": p0, "logit": math.log(p0 / (1 - p0))})
    return out


# ----------------------------------------------------------------------------- labelled data for evaluation
def read_labelled_molecules(path: str | Path, smiles_col: str, label_col: str | None,
                            positive: str = "yes") -> tuple[list[str], list[str], list[int | None], list[dict]]:
    """``(smiles, sources, labels, errors)`` from a CSV (``smiles_col``/``label_col``) or a conversation JSONL.

    In a JSONL, the SMILES is the record's molecule modality and the label is 1 when its last (gpt)
    answer is ``positive`` (case-insensitive), else 0.
    """
    from ..eval.runner import reference_of
    from ..utils import read_jsonl
    from .head import parse_label, read_table

    path = Path(path)
    smiles, sources, labels, errors = [], [], [], []
    if path.suffix == ".jsonl":
        for i, rec in enumerate(read_jsonl(path), start=1):
            src = f"{path}:{i} (id={rec.get('id')})"
            mods = rec.get("modalities") or {}
            value = next((v for v in mods.values() if isinstance(v, str)), None)
            ref = reference_of(rec)
            if value is None:
                errors.append(InvalidInputError(src, "no molecule in 'modalities'").to_record())
                continue
            smiles.append(value)
            sources.append(src)
            labels.append(None if ref is None else int(ref.strip().lower().rstrip(".") == positive.lower()))
        return smiles, sources, labels, errors
    for src, row in read_table(path, smiles_col, label_col):
        try:
            labels.append(parse_label(row.get(label_col), src, label_col) if label_col else None)
        except InvalidInputError as e:
            errors.append(e.to_record())
            continue
        smiles.append(row.get(smiles_col) or "")
        sources.append(src)
    return smiles, sources, labels, errors


def _llm_logits(predictor, smiles: list[str], sources: list[str], question: str, options: list[str], pre,
                workers: int) -> tuple[dict[str, dict], list[dict]]:
    """source -> {canonical, report, answer, score, logit} for rows that worked; error records for the rest."""
    from ..io.molecules import process_molecules

    recs = process_molecules(smiles, sources, standardise_options(pre), features=("druglikeness",), workers=workers)
    ok = [r for r in recs if r.ok]
    scores = llm_scores(predictor, [r.smiles for r in ok], question, options)
    rows, errors = {}, [r.error for r in recs if not r.ok]
    for r, s in zip(ok, scores):
        if "error" in s:
            errors.append({"path": r.source, **s})
        else:
            rows[r.source] = {"canonical": r.smiles, "report": report_of(r), **s}
    return rows, errors


def evaluate_druggability(checkpoint: str | Path, data: str | Path, out_dir: str | Path, smiles_col: str = "smiles",
                          label_col: str | None = "label", question: str = DEFAULT_QUESTION,
                          options: list[str] | None = None, calibration: str | Path | None = None,
                          workers: int = 0, device: str = "auto") -> dict:
    """AUROC / AUPRC / Brier / ECE of a head or LLM checkpoint on labelled molecules, raw and calibrated.

    A head checkpoint uses its stored temperature; an LLM checkpoint is calibrated only when
    ``calibration`` (a labelled CSV/JSONL, disjoint from ``data``) is given.
    Writes ``predictions.csv`` (one row per input row, errors included) and ``metrics.json``.
    """
    from ..eval.calibration import T_MAX, T_MIN, binary_metrics, fit_temperature, sigmoid
    from ..utils import atomic_write_text
    from .head import HeadPredictor, is_head_checkpoint

    options = options or ["yes", "no"]
    smiles, sources, labels, errors = read_labelled_molecules(data, smiles_col, label_col, options[0])
    if is_head_checkpoint(checkpoint):
        pred = HeadPredictor(checkpoint)
        feats, logits = pred.predict(smiles, sources, labels)
        temperature, kind = pred.temperature, "head"
        rows = {s: {"canonical": c, "report": rep, "logit": float(z)}
                for s, c, rep, z in zip(feats.sources, feats.canonical, feats.reports, logits)}
        errors += feats.errors
    else:
        from ..inference.predictor import Predictor

        pred = Predictor(checkpoint, device=device)
        pre = pred.model.config.modalities[mol_modality(pred.model)].preprocess
        rows, errs = _llm_logits(pred, smiles, sources, question, options, pre, workers)
        errors += errs
        temperature, kind = 1.0, "llm"
        if calibration:
            c_smiles, c_sources, c_labels, _ = read_labelled_molecules(calibration, smiles_col, label_col, options[0])
            c_rows, _ = _llm_logits(pred, c_smiles, c_sources, question, options, pre, workers)
            by = dict(zip(c_sources, c_labels))
            pairs = [(r["logit"], by[s]) for s, r in c_rows.items() if by[s] is not None]
            temperature = fit_temperature([z for z, _ in pairs], [y for _, y in pairs])
    done = [(s, y) for s, y in zip(sources, labels) if s in rows and y is not None]
    z = np.array([rows[s]["logit"] for s, _ in done])
    y = [lab for _, lab in done]
    metrics = {"checkpoint": str(checkpoint), "kind": kind, "data": str(data), "rows": len(sources) + len(
        [e for e in errors if e.get("path") not in set(sources)]), "scored": len(done), "errors": len(errors),
        "temperature": round(temperature, 4), "temperature_at_bound": temperature in (T_MIN, T_MAX),
        "raw": binary_metrics(y, sigmoid(z)),
        "calibrated": binary_metrics(y, sigmoid(z / temperature)) if temperature != 1.0 or kind == "head" else None}
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
                        *[_cell(r["report"].get(c)) for c in REPORT_COLUMNS], ""])
        for e in errors:  # rows rejected before featurising (bad labels) are listed too
            if e.get("path") not in set(sources):
                w.writerow([e.get("path"), "", "", "", "", "", *[""] * len(REPORT_COLUMNS), e.get("message")])
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def _cell(v):
    if isinstance(v, bool):
        return int(v)
    return ";".join(map(str, v)) if isinstance(v, (list, tuple)) else v


# ----------------------------------------------------------------------------- batch inference over a CSV
def predict_molecules_csv(checkpoint: str | Path, csv_in: str | Path, out_csv: str | Path, smiles_col: str = "smiles",
                          question: str | None = None, options: list[str] | None = None, workers: int = 0,
                          device: str = "auto", predictor=None) -> dict:
    """One output row per input row: the input's columns + canonical_smiles, score, answer, the rule report, error.

    ``score`` is the closed-set probability of ``options[0]`` (default "yes") for an LLM checkpoint, the
    calibrated positive-class probability for a head checkpoint (whose ``answer`` is yes when score >= 0.5).
    """
    from .head import HeadPredictor, is_head_checkpoint, read_table

    options = options or ["yes", "no"]
    rows = read_table(csv_in, smiles_col)
    sources = [s for s, _ in rows]
    smiles = [r.get(smiles_col) or "" for _, r in rows]
    if is_head_checkpoint(checkpoint):
        from ..eval.calibration import sigmoid

        hp = HeadPredictor(checkpoint)
        feats, logits = hp.predict(smiles, sources)
        probs = sigmoid(logits / hp.temperature)
        results = {s: {"canonical": c, "report": rep, "score": float(p), "answer": "yes" if p >= 0.5 else "no"}
                   for s, c, rep, p in zip(feats.sources, feats.canonical, feats.reports, probs)}
        errors = feats.errors
    else:
        from ..inference.predictor import Predictor

        if not question:
            raise InvalidInputError(checkpoint, "an LLM checkpoint needs --question")
        pred = predictor or Predictor(checkpoint, device=device)
        pre = pred.model.config.modalities[mol_modality(pred.model)].preprocess
        results, errors = _llm_logits(pred, smiles, sources, question, options, pre, workers)
    err_by = {e.get("path"): e for e in errors}
    in_cols = [k for k in rows[0][1] if k is not None] if rows else [smiles_col]
    out_cols = [c for c in ["canonical_smiles", "score", "answer", *REPORT_COLUMNS, "error", "error_kind"]
                if c not in in_cols]
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    n_err = 0
    with open(out_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=in_cols + out_cols)
        w.writeheader()
        for src, row in rows:
            out = dict(row)
            r = results.get(src)
            if r is None:
                n_err += 1
                e = err_by.get(src, {"message": "not scored", "kind": ""})
                out.update({"error": e.get("message"), "error_kind": e.get("kind", e.get("error", ""))})
            else:
                out.update({"canonical_smiles": r["canonical"], "score": round(r["score"], 5), "answer": r["answer"],
                            **{c: _cell(r["report"].get(c)) for c in REPORT_COLUMNS}})
            w.writerow({k: out.get(k, "") for k in in_cols + out_cols})
    return {"written": str(out_csv), "rows": len(rows), "scored": len(rows) - n_err, "errors": n_err}


# ----------------------------------------------------------------------------- CLI
def eval_main(argv: list[str] | None = None) -> dict:
    """``medmm eval druggability --checkpoint C --data D [--smiles-col S --label-col L] [--calibration F]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="medmm eval druggability",
                                 description="AUROC / AUPRC / Brier of a druggability head or LLM checkpoint.")
    ap.add_argument("--checkpoint", required=True, help="head checkpoint folder (task.json) or medmm model folder")
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
