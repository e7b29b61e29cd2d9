"""Featurisers: labelled files and raw inputs -> encoder inputs for the ``head`` training stage and its predictor.

One registered class per kind of input (``head.featuriser`` in a recipe); ``medmm list featurisers`` prints them.

Adding a kind of input is one module in this folder::

    from medmm.data.featurisers import Featurised, Featuriser, register_featuriser

    @register_featuriser("proteins")
    class ProteinFeaturiser(Featuriser):
        def featurise(self, values, sources) -> Featurised: ...

A featuriser never drops a row silently: every rejected input becomes an error record (the typed
error's ``to_record()``) in ``Featurised.errors``.
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from encoders.registry import Registry

from ...config import HeadStageConfig
from ...errors import ConfigError, InvalidInputError

Item = dict[str, Any]


@dataclass
class Row:
    """One input of a labelled file: where it came from, the raw value and the raw label (None if blank)."""

    source: str
    value: str
    label: Any = None


@dataclass
class Featurised:
    """The usable inputs as loader items, in input order, plus the rejected inputs' error records."""

    items: list[Item] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    canonical: list[str] = field(default_factory=list)
    """Canonical SMILES, cleaned sequence or resolved feature file."""
    labels: list[int | None] = field(default_factory=list)
    """Class indices (binary: 0/1), or None for unlabelled inputs."""
    groups: list[str] | None = None
    """Scaffolds (molecules) for the scaffold split."""
    reports: list[dict] | None = None
    """Per-item extra columns for prediction files (e.g. the drug-likeness rule report)."""
    errors: list[dict] = field(default_factory=list)

    def subset(self, idx: list[int]) -> Featurised:
        """The items at ``idx`` (errors are not carried)."""
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return Featurised(pick(self.items), pick(self.sources), pick(self.inputs), pick(self.canonical),
                          pick(self.labels), pick(self.groups), pick(self.reports))

    def __len__(self) -> int:
        return len(self.items)


class Featuriser:
    """Base class. Subclasses implement :meth:`featurise`; the rest has table defaults.

    Args:
        cfg: the head stage's settings (loader, preprocessing, data columns, workers).
    """

    name: ClassVar[str] = ""
    report_columns: ClassVar[list[str]] = []
    """Extra prediction-file columns :meth:`reports` fills (empty = none)."""

    def __init__(self, cfg: HeadStageConfig):
        from ..loaders import build_loader

        self.cfg = cfg
        try:
            self.loader = build_loader(cfg.loader, cfg.preprocess)
        except ConfigError as e:
            raise ConfigError(f"head.loader: {e}") from e

    # ------------------------------------------------------------------ reading
    def read_rows(self, path: str | Path, input_col: str | None = None, label_col: str | None = None,
                  labelled: bool = True) -> list[Row]:
        """The rows of a labelled CSV/TSV (columns from ``head.data`` unless given)."""
        d = self.cfg.data
        col, lab = input_col or d.input_col, (label_col or d.label_col) if labelled else None
        return [Row(src, row.get(col) or "", row.get(lab) if lab else None)
                for src, row in read_table(path, col, lab, d.delimiter, d.limit)]

    def featurise(self, values: list[str], sources: list[str]) -> Featurised:  # pragma: no cover - interface
        """Raw inputs -> items (failures go to ``errors``); ``labels`` are left empty."""
        raise NotImplementedError

    # ------------------------------------------------------------------ batches
    def load(self, item: Item, train: bool = False, rng: np.random.Generator | None = None) -> Item:
        """The loader item a batch holds (lazy featurisers read it here; ``rng`` is set when training)."""
        return item

    def collate(self, items: list[Item]) -> Item:
        return self.loader.collate(items)

    def reports(self, canonical: list[str]) -> list[dict] | None:
        """Extra prediction-file columns per input (e.g. drug-likeness rules); None when the kind has none."""
        return None


FEATURISERS = Registry("featuriser", config_key="head.featuriser", package=__name__)
"""name -> :class:`Featuriser` subclass; every module of this folder registers its class when first looked up."""


def register_featuriser(name: str, summary: str | None = None):
    """Class decorator: register a :class:`Featuriser` subclass under ``name`` and set its ``name``; ``summary``
    (for ``medmm list featurisers``) defaults to its docstring's first paragraph."""
    return FEATURISERS.register_subclass(name, Featuriser, summary)


def list_featurisers() -> list[str]:
    """Registered featuriser names."""
    return FEATURISERS.names()


def build_featuriser(cfg: HeadStageConfig) -> Featuriser:
    """The featuriser ``cfg.featuriser`` for these settings; a ConfigError lists the registered ones."""
    return FEATURISERS.get(cfg.featuriser)(cfg)


# ----------------------------------------------------------------------------- labelled tables
def parse_label(value: Any, source: str, column: str) -> int:
    """A 0/1 label (``0``, ``1``, ``0.0``, ``1.0``); anything else raises InvalidInputError."""
    text = str(value if value is not None else "").strip()
    if text in ("0", "1", "0.0", "1.0"):
        return int(float(text))
    raise InvalidInputError(source, f"label '{text}' in column '{column}' is not 0/1" if text
                            else f"no label in column '{column}'")


BINARY_CLASSES = ["0", "1"]
"""The classes of a binary head whose labels are 0/1 numbers."""


def resolve_classes(objective: str, classes: list[str], rows: list[Row]) -> list[str]:
    """The output classes: ``classes`` when given, 0/1 for a binary head, else the sorted labels of ``rows``."""
    if classes:
        return list(classes)
    if objective == "binary":
        return list(BINARY_CLASSES)
    return sorted({str(r.label).strip() for r in rows if str(r.label if r.label is not None else "").strip()})


def label_parser(classes: list[str], column: str):
    """``label_of(raw, source) -> class index`` for these classes; 0/1 classes also take ``0.0``/``1.0``.

    A blank or unknown label raises InvalidInputError naming the source."""
    if list(classes) == BINARY_CLASSES:
        return lambda raw, src: parse_label(raw, src, column)
    index = {c: i for i, c in enumerate(classes)}

    def label_of(raw: Any, source: str) -> int:
        text = str(raw if raw is not None else "").strip()
        if text not in index:
            raise InvalidInputError(source, f"label '{text}' in '{column}' is not one of the classes {list(classes)}"
                                    if text else f"no label in '{column}'")
        return index[text]

    return label_of


def read_table(path: str | Path, input_col: str, label_col: str | None = None, delimiter: str | None = None,
               limit: int | None = None) -> list[tuple[str, dict]]:
    """Rows ``(source, row)`` of a CSV/TSV (``.gz`` allowed); ``source`` is ``file:line``. Checks the columns."""
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(path, "file not found")
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    delim = delimiter or ("\t" if name.endswith((".tsv", ".txt")) else ",")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        reader = csv.DictReader(f, delimiter=delim)
        cols = reader.fieldnames or []
        for c in (input_col, label_col):
            if c and c not in cols:
                raise InvalidInputError(path, f"no column '{c}' (columns: {cols})")
        rows = []
        for i, row in enumerate(reader, start=2):
            if limit is not None and len(rows) >= limit:
                break
            rows.append((f"{path}:{i}", row))
    return rows


def featurise_rows(featuriser: Featuriser, rows: list[Row], label_of) -> Featurised:
    """Parse each row's label with ``label_of(raw, source) -> int`` (failures become error records, and the row
    is not featurised), featurise the rest and carry their labels onto the surviving items."""
    values, sources, labels, errors = [], [], [], []
    for r in rows:
        try:
            labels.append(label_of(r.label, r.source))
            values.append(r.value)
            sources.append(r.source)
        except InvalidInputError as e:
            errors.append(e.to_record())
    feats = featuriser.featurise(values, sources)
    by_source = dict(zip(sources, labels))
    feats.labels = [by_source[s] for s in feats.sources]
    feats.errors = errors + feats.errors
    return feats


def with_reports(featuriser: Featuriser, feats: Featurised) -> Featurised:
    """Fill ``feats.reports`` with the featuriser's report columns, if it has any."""
    feats.reports = featuriser.reports(feats.canonical)
    return feats


def write_predictions(path: str | Path, feats: Featurised, probs: np.ndarray, classes: list[str],
                      probs_raw: np.ndarray | None = None) -> Path:
    """One CSV row per item: source, input, canonical, label, then the scores and the featuriser's report columns.

    Binary (``probs`` of shape (n,)): ``prob_raw`` and ``prob`` (calibrated) of the positive class.
    Multiclass (``probs`` (n, C)): ``prediction`` and one ``prob_<class>`` column per class.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    probs = np.asarray(probs)
    binary = probs.ndim == 1
    report_cols = list(feats.reports[0].keys()) if feats.reports else []
    score_cols = ["prob_raw", "prob"] if binary else ["prediction", *[f"prob_{c}" for c in classes]]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["source", "input", "canonical", "label", *score_cols, *report_cols])
        for i in range(len(feats.items)):
            lab = feats.labels[i] if feats.labels else None
            label = lab if binary or lab is None else classes[lab]
            if binary:
                raw = probs if probs_raw is None else probs_raw
                scores = [round(float(raw[i]), 5), round(float(probs[i]), 5)]
            else:
                scores = [classes[int(np.argmax(probs[i]))], *[round(float(p), 5) for p in probs[i]]]
            rep = feats.reports[i] if feats.reports else {}
            w.writerow([feats.sources[i], feats.inputs[i], feats.canonical[i], label, *scores,
                        *[_cell(rep.get(c)) for c in report_cols]])
    return path


def _cell(v: Any) -> Any:
    if isinstance(v, bool):
        return int(v)
    return ";".join(map(str, v)) if isinstance(v, (list, tuple)) else v


__all__ = ["BINARY_CLASSES", "Featurised", "Featuriser", "Row", "build_featuriser", "featurise_rows",
           "label_parser", "list_featurisers", "parse_label", "resolve_classes", "read_table", "register_featuriser", "with_reports", "write_predictions"]
