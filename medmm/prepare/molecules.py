"""``medmm prepare molecules``: CSVs of SMILES with a binary label -> conversation JSONL (standardised by RDKit,
random or scaffold split, optional descriptor Q&A); bad rows go to ``errors.jsonl``.

The random split is a keyed hash of the canonical SMILES (the same molecule is always on the same side), so the
parts of a ``--num-shards`` run (rows picked by a hash of their line, :mod:`medmm.prepare.parts`) split as one run
does; the scaffold split orders every scaffold by size and so needs the whole file (one part only)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..errors import ConfigError, InvalidInputError
from .common import binary_label, read_rows, split_train_eval, write_prepared
from .parts import Part, holds, write_part

log = logging.getLogger(__name__)


def prepare_molecules(csv_path: str | Path, out: str | Path, smiles_col: str = "smiles", label_col: str | None = None,
                      question: str = "Is this molecule likely to be an approved drug? Answer yes or no.",
                      eval_fraction: float = 0.2, seed: int = 0, name: str = "molecules", split: str = "random",
                      workers: int = 0, options=None, qa: bool = False, part: Part | None = None) -> dict:
    """CSV of SMILES (+ optional 0/1 label) -> molecule conversations; invalid SMILES go to errors.jsonl.

    Each SMILES goes through the RDKit pipeline of :mod:`medmm.io.molecules` (``options``: a
    ``StandardiseOptions``) in ``workers`` processes; a record holds the canonical SMILES and its input
    row and text. ``split="scaffold"`` keeps every Bemis-Murcko scaffold on one side of train/eval.
    ``qa=True`` also writes ``<name>_qa_train/eval.jsonl``: one multi-turn record per molecule asking
    about descriptors and drug-likeness rules, answered by RDKit (the molecule Q&A recipe's data).
    ``part``: only the rows whose line falls in this part of a sharded run.
    """
    from ..data.splits import scaffold_split
    from ..io.molecules import molecule_qa, process_molecules

    if split not in ("random", "scaffold"):
        raise ValueError(f"split must be 'random' or 'scaffold', got '{split}'")
    if split == "scaffold" and part is not None and part.num_shards > 1:
        raise ConfigError("prepare molecules: --split scaffold ranks every scaffold of the file by size, so it cannot "
                          "be prepared in parts; use --split random with --num-shards")
    csv_path, out = Path(csv_path), Path(out)
    rows = [(i, r) for i, r in read_rows(csv_path, [smiles_col, label_col]) if holds(part, f"row {i}")]
    features = ("scaffold",) + (("descriptors", "druglikeness") if qa else ())
    mols = process_molecules([r.get(smiles_col) or "" for _, r in rows], [f"{csv_path}:{i}" for i, _ in rows],
                             options, features=features, workers=workers)
    recs, qa_recs, scaffolds, errors = [], [], [], []
    for (i, row), m in zip(rows, mols):
        if not m.ok:
            errors.append(m.error)
            continue
        try:
            rec = {"id": f"{name}-{i}", "modalities": {"mol": m.smiles},
                   "input": {"row": i, "smiles": m.input}}
            if label_col:
                rec["answer_type"] = "CLOSED"
                rec["conversations"] = [{"from": "human", "value": f"<mol>\n{question}"},
                                        {"from": "gpt", "value": "yes" if binary_label(row, label_col, m.source) else "no"}]
            else:
                rec["conversations"] = [{"from": "human", "value": f"<mol>\n{question}"}]
        except InvalidInputError as e:
            errors.append(e.to_record())
            continue
        recs.append(rec)
        scaffolds.append(m.scaffold)
        if qa:
            turns = []
            for k, (q, a) in enumerate(molecule_qa(m.descriptors, m.druglikeness)):
                turns += [{"from": "human", "value": f"<mol>\n{q}" if k == 0 else q}, {"from": "gpt", "value": a}]
            qa_recs.append({"id": f"{name}-qa-{i}", "modalities": {"mol": m.smiles}, "conversations": turns})
    if split == "scaffold" and len(recs) > 1:
        tr, _, ev = scaffold_split(scaffolds, (1 - eval_fraction, 0.0, eval_fraction), seed)
        train, evals = [recs[j] for j in tr], [recs[j] for j in ev]
    else:
        tr = ev = None
        train, evals = split_train_eval(recs, eval_fraction, seed, key=lambda r: r["modalities"]["mol"])
    extra = {"source": str(csv_path), "split": split, "workers": workers}
    write_part(out, part, "molecules", str(csv_path),
               {"smiles_col": smiles_col, "label_col": label_col, "question": question, "eval_fraction": eval_fraction,
                "seed": seed, "name": name, "split": split, "qa": qa,
                "options": dataclasses.asdict(options) if options is not None else None})
    if qa:  # same molecules on the same side as the main records
        ids = {r["id"].rsplit("-", 1)[1] for r in evals}
        write_prepared(out, f"{name}_qa", [r for r in qa_recs if r["id"].rsplit("-", 1)[1] not in ids],
               [r for r in qa_recs if r["id"].rsplit("-", 1)[1] in ids], [], {"source": str(csv_path)})
    return write_prepared(out, name, train, evals, errors, extra)
