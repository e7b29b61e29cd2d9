"""Druggability scores for molecules, from a trained head model or from the LLM, next to RDKit's drug-likeness rules.

* head: ``python train.py --config configs/tasks/druggability_head.yaml`` trains ``mol_gin`` + a head
  (``trainer.stage: head``); the score is the calibrated probability of the positive class;
* LLM: ``configs/druggability_llm.yaml`` fine-tunes the language model on ``<mol>`` yes/no records; the
  score is the closed-set probability of "yes" (:meth:`medmm.inference.session.Session.closed_set`).

::

    python infer.py --checkpoint C --molecules in.csv --question "Is this molecule likely to be approved?" --out out.csv

Every input row gets an output row: the canonical SMILES, the score and answer, the rule report
(QED, Lipinski, Veber, PAINS), or the typed error of a row that failed; nothing is dropped.
Evaluation against labels is :mod:`medmm.eval.druggability`.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ..errors import ConfigError, InvalidInputError

DEFAULT_QUESTION = "Is this molecule likely to be an approved drug? Answer yes or no."


def mol_modality(model) -> str:
    """The name of the model's molecule modality (the one whose loader reads SMILES)."""
    names = [n for n, m in model.config.modalities.items() if m.loader in ("mol_graph", "smiles_fingerprint")]
    if not names:
        raise ConfigError(f"this model has no molecule modality (modalities: {list(model.config.modalities)})")
    return names[0]


def llm_scores(predictor, smiles: list[str], question: str, options: list[str]) -> list[dict]:
    """Closed-set answers for each (already standardised) SMILES: ``{answer, probs, score, logit}`` or ``{error}``.

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


def llm_logits(predictor, smiles: list[str], sources: list[str], question: str, options: list[str], pre,
               workers: int) -> tuple[dict[str, dict], list[dict]]:
    """source -> {canonical, report, answer, score, logit} for rows that worked; error records for the rest."""
    from ..data.featurisers.molecules import report_of, standardise_options
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


def head_logits(checkpoint: str | Path, smiles: list[str], sources: list[str],
                labels: list[int | None] | None = None) -> tuple[dict[str, dict], list[dict], float]:
    """A head model's scores: source -> {canonical, report, logit}, error records, and its temperature."""
    from .head import HeadPredictor

    hp = HeadPredictor(checkpoint)
    if not hp.model.binary:
        raise InvalidInputError(checkpoint, f"a molecule score needs a binary head; this one has classes {hp.classes}")
    feats, logits = hp.predict(smiles, sources, labels)
    rows = {s: {"canonical": c, "report": rep, "logit": float(z)}
            for s, c, rep, z in zip(feats.sources, feats.canonical, feats.reports or [{}] * len(feats), logits)}
    return rows, feats.errors, hp.temperature


def predict_molecules_csv(checkpoint: str | Path, csv_in: str | Path, out_csv: str | Path, smiles_col: str = "smiles",
                          question: str | None = None, options: list[str] | None = None, workers: int = 0,
                          device: str = "auto", predictor=None) -> dict:
    """One output row per input row: the input's columns + canonical_smiles, score, answer, the rule report, error.

    ``score`` is the closed-set probability of ``options[0]`` (default "yes") for an LLM checkpoint, the
    calibrated positive-class probability for a head model (whose ``answer`` is yes when score >= 0.5).
    """
    from ..data.featurisers import read_table
    from ..data.featurisers.molecules import REPORT_COLUMNS
    from ..model.heads import is_head_model
    from ..scoring import sigmoid

    options = options or ["yes", "no"]
    rows = read_table(csv_in, smiles_col)
    sources = [s for s, _ in rows]
    smiles = [r.get(smiles_col) or "" for _, r in rows]
    if is_head_model(checkpoint):
        scored, errors, temperature = head_logits(checkpoint, smiles, sources)
        results = {}
        for s, r in scored.items():
            p = float(sigmoid(r["logit"] / temperature))
            results[s] = {**r, "score": p, "answer": "yes" if p >= 0.5 else "no"}
    else:
        from .predictor import Predictor

        if not question:
            raise InvalidInputError(checkpoint, "an LLM checkpoint needs --question")
        pred = predictor or Predictor(checkpoint, device=device)
        pre = pred.model.config.modalities[mol_modality(pred.model)].preprocess
        results, errors = llm_logits(pred, smiles, sources, question, options, pre, workers)
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
                            **{c: cell(r["report"].get(c)) for c in REPORT_COLUMNS}})
            w.writerow({k: out.get(k, "") for k in in_cols + out_cols})
    return {"written": str(out_csv), "rows": len(rows), "scored": len(rows) - n_err, "errors": n_err}


def cell(v):
    """A CSV cell: booleans as 0/1, lists joined with ';'."""
    if isinstance(v, bool):
        return int(v)
    return ";".join(map(str, v)) if isinstance(v, (list, tuple)) else v
