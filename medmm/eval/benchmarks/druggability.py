"""``druggability``: is a molecule an approved drug? AUROC, AUPRC, Brier, ECE of a head model or an LLM checkpoint.

    medmm eval druggability --checkpoint runs/druggability_head/checkpoint --data test.csv --label-col FDA_APPROVED
    medmm eval druggability --checkpoint runs/demo/checkpoint --data runs/demo/data/molecules_eval.jsonl
    medmm eval druggability --predictions preds.jsonl      # rows {"id", "label": 0|1, "prob"}

The data is a labelled CSV (``--smiles-col``, ``--label-col``) or a conversation JSONL (the molecule modality;
label 1 when the reference answer is the first of ``--options``), read by
:func:`medmm.data.featurisers.molecules.read_labelled_molecules`. A head model (``trainer.stage: head``) scores
with its stored temperature; an LLM checkpoint by the closed-set probability of the first option
(:func:`medmm.inference.molecules.llm_logits`), calibrated by a temperature fitted on ``--calibration`` (a
labelled file disjoint from ``--data``) when given. Each row keeps the canonical SMILES and the RDKit rule
report. Metrics: :mod:`medmm.eval.benchmarks.head_tasks` (binary).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .head_tasks import HeadBenchmark, binary_rows, error_rows
from .registry import RunContext, register_benchmark


@register_benchmark
class DruggabilityBenchmark(HeadBenchmark):
    name = "druggability"
    summary = "molecule druggability (head or LLM closed-set yes/no): AUROC, AUPRC, Brier, ECE, log loss, accuracy"
    featuriser = "molecules"

    @dataclass
    class Options:
        smiles_col: str = "smiles"
        """CSV column of the SMILES."""
        label_col: str = "label"
        """CSV column of the 0/1 label."""
        question: str = "Is this molecule likely to be an approved drug? Answer yes or no."
        """LLM checkpoints: the closed-set question."""
        options: str = "yes,no"
        """LLM checkpoints: the closed-set answers, positive first (comma-separated)."""
        calibration: str | None = None
        """LLM checkpoints: a labelled file to fit the temperature on (disjoint from the data)."""
        workers: int = 0
        """RDKit worker processes."""

    def protocol(self, opts) -> str:
        return ("druggability: P(approved) from a head model (stored temperature) or the LLM's closed-set probability "
                f"of '{opts.options.split(',')[0]}'" + (" (temperature fitted on --calibration)" if opts.calibration
                                                         else "") + "; " + super().protocol(opts).split(": ", 1)[1])

    def generate(self, records: list[dict], opts, ctx: RunContext) -> list[dict]:
        from ...data.featurisers.molecules import read_labelled_molecules
        from ...inference.molecules import head_logits, llm_logits, mol_modality
        from ...model.heads import is_head_model
        from ...scoring import fit_temperature, sigmoid

        answers = [o.strip() for o in opts.options.split(",") if o.strip()]
        rows: list[dict] = []
        predictor = None
        temperature = None
        kind = "head" if is_head_model(ctx.checkpoint) else "llm"
        for rec in records:
            smiles, sources, labels, errors = read_labelled_molecules(rec["path"], opts.smiles_col, opts.label_col,
                                                                      answers[0])
            if kind == "head":
                scored, errs, temperature = head_logits(ctx.checkpoint, smiles, sources, labels)
            else:
                predictor = predictor or ctx.predictor()
                pre = predictor.model.config.modalities[mol_modality(predictor.model)].preprocess
                scored, errs = llm_logits(predictor, smiles, sources, opts.question, answers, pre, opts.workers)
                if temperature is None:
                    temperature = 1.0
                    if opts.calibration:
                        c_smi, c_src, c_lab, _ = read_labelled_molecules(opts.calibration, opts.smiles_col,
                                                                         opts.label_col, answers[0])
                        c_rows, _ = llm_logits(predictor, c_smi, c_src, opts.question, answers, pre, opts.workers)
                        by = dict(zip(c_src, c_lab))
                        pairs = [(r["logit"], by[s]) for s, r in c_rows.items() if by[s] is not None]
                        temperature = fit_temperature([z for z, _ in pairs], [y for _, y in pairs])
            done = [(s, x, y) for s, x, y in zip(sources, smiles, labels) if s in scored and y is not None]
            z = np.asarray([scored[s]["logit"] for s, _, _ in done], dtype=np.float64)
            extra = [{"canonical": scored[s]["canonical"], "report": scored[s].get("report", {}),
                      "modalities": {"smiles": scored[s]["canonical"]}} for s, _, _ in done]
            rows += binary_rows([s for s, _, _ in done], [x for _, x, _ in done], [y for _, _, y in done],
                                sigmoid(z / temperature), sigmoid(z), extra)
            rows += error_rows(errors + errs)
            unlabelled = [s for s, y in zip(sources, labels) if y is None and s in scored]
            rows += [{"id": s, "error": "NoLabel", "message": "no label: not scored"} for s in unlabelled]
        for r in rows:
            if "error" not in r:
                r.update(kind=kind, temperature=round(float(temperature or 1.0), 4))
        return rows

    def score(self, rows: list[dict], opts):
        """The binary metrics with intervals, plus ``kind``, ``temperature``, ``raw`` and ``calibrated`` (the
        keys ``medmm eval druggability`` wrote before the registry; ``calibrated`` is None for an LLM scored
        without ``--calibration``)."""
        from ...scoring import binary_metrics

        scored = super().score(rows, opts)
        if rows and all("prob_raw" in r for r in rows):
            y = [int(r["label"]) for r in scored.rows]
            kind, t = rows[0].get("kind"), rows[0].get("temperature", 1.0)
            scored.extra = {"kind": kind, "temperature": t,
                            "raw": binary_metrics(y, [r["prob_raw"] for r in rows]),
                            "calibrated": None if kind == "llm" and t == 1.0 else
                            binary_metrics(y, [r["prob"] for r in rows])}
        return scored
