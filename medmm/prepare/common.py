"""What every ``medmm prepare`` command shares: the train/eval split, the outputs (``NAME_train.jsonl``,
``NAME_eval.jsonl``, ``errors.jsonl``, ``manifest.json``) and reading delimited rows."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from pathlib import Path

from ..errors import InvalidInputError
from ..utils import atomic_write_text, write_jsonl
from .parts import split_of

log = logging.getLogger(__name__)


def split_train_eval(items: list, eval_fraction: float, seed: int, key: Callable[[object], str] = str
                     ) -> tuple[list, list]:
    """``(train, eval)`` in input order: an item is held out when the keyed hash of ``key(item)`` says so
    (:func:`~medmm.prepare.parts.split_of`), about ``eval_fraction`` of them.

    A function of each item's key, not of its position, so the parts of a ``--num-shards`` run split exactly as one
    run over the whole input does (items sharing a key, the questions of one image, stay together); a small set
    may hold out none.
    """
    train, evals = [], []
    for it in items:
        (evals if split_of(key(it), eval_fraction, seed) == "eval" else train).append(it)
    return train, evals


def write_prepared(out: Path, name: str, train: list[dict], evals: list[dict], errors: list[dict], extra: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / f"{name}_train.jsonl", train)
    write_jsonl(out / f"{name}_eval.jsonl", evals)
    if errors:
        with open(out / "errors.jsonl", "a") as f:
            for e in errors:
                f.write(json.dumps(e) + "\n")
    manifest = {"name": name, "train": len(train), "eval": len(evals), "rejected": len(errors), **extra}
    mf = out / "manifest.json"
    allm = json.loads(mf.read_text()) if mf.exists() else {}
    allm[name] = manifest
    atomic_write_text(mf, json.dumps(allm, indent=2))
    return manifest


def read_rows(path: Path, columns: list[str], delimiter: str = ",") -> list[tuple[int, dict]]:
    """``(line, row)`` pairs of a CSV/TSV (``.gz`` allowed); a missing column raises InvalidInputError."""
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for c in columns:
            if c and c not in (reader.fieldnames or []):
                raise InvalidInputError(path, f"no column '{c}' (columns: {reader.fieldnames})")
        return list(enumerate(reader, start=2))


def binary_label(row: dict, col: str, src: str) -> int:
    lab = str(row.get(col) or "").strip()
    if lab not in ("0", "1", "0.0", "1.0"):
        raise InvalidInputError(src, f"label '{lab}' in column '{col}' is not 0/1" if lab else f"no label in column '{col}'")
    return int(float(lab))
