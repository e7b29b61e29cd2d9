"""Benchmark registry: ``register_benchmark``, ``get_benchmark(name)``, ``list_benchmarks()``, and the contract.

A benchmark is one module in ``medmm/eval/benchmarks/`` holding one :class:`Benchmark` subclass:

    records --generate / from_predictions--> rows --score--> Scored(stat, rows) --bootstrap--> metrics with CIs

* ``Options``: a dataclass of the benchmark's settings, one attribute docstring each. ``medmm eval NAME``
  derives its flags from it (``--max-new-tokens``, ``--protocol``...) and suite YAML files give the same
  keys under ``options:``; an unknown key fails.
* ``load(paths, opts)``: data files -> records, each with a unique ``id``.
* ``generate(records, opts, ctx)``: answer every record with a checkpoint (``ctx.predictor()``) -> rows.
* ``from_predictions(predictions, records, opts, source)``: rows from an existing predictions file (any
  model's), matched to ``records`` by id when data is given.
* ``score(rows, opts)``: per-item fields filled in (``correct``, ``score``) and a statistic
  ``stat(idx) -> {metric: value}`` that recomputes every headline metric on the items ``idx``; the runner
  bootstraps it (:mod:`medmm.eval.bootstrap`). ``score`` reads nothing but the rows and the options, so
  ``medmm eval compare`` rebuilds it from two saved ``predictions.jsonl`` files.

Rows are plain JSON: ``id``, ``prediction``, ``reference`` and whatever the benchmark adds; the HTML report
shows ``question``, ``reference``, ``prediction``, ``correct``, ``score``, ``group`` and a thumbnail of
``modalities`` when present.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from encoders.registry import Registry

from ..bootstrap import Statistic

__all__ = ["BENCHMARKS", "Benchmark", "RunContext", "Scored", "field_docs", "get_benchmark", "list_benchmarks",
           "register_benchmark"]


@dataclass
class RunContext:
    """What generating needs beyond the data: the checkpoint and how to run it (one loaded model per run)."""

    checkpoint: str | None = None
    device: str = "auto"
    batch_size: int = 8
    progress: bool = True
    _predictor: Any = None

    def predictor(self):
        """The :class:`~medmm.inference.predictor.Predictor` of ``checkpoint``, loaded once."""
        if self.checkpoint is None:
            raise ValueError("this run has no --checkpoint to generate with")
        if self._predictor is None:
            from ...inference.predictor import Predictor

            self._predictor = Predictor(self.checkpoint, device=self.device)
        return self._predictor


@dataclass
class Scored:
    """A benchmark's scoring of its rows.

    ``stat(idx)`` returns every headline metric on the items ``idx`` (positions in ``rows``); ``strata``
    (one label per row) makes the bootstrap resample within labels; ``close`` frees resources (a JVM).
    """

    stat: Statistic
    rows: list[dict]
    strata: list | None = None
    notes: list[str] = field(default_factory=list)
    close: Callable[[], None] | None = None
    extra: dict = field(default_factory=dict)
    """Benchmark-specific keys added to metrics.json beside the standard ones (which they never replace)."""


class Benchmark:
    """Base class of a benchmark; subclasses set the class attributes and implement the four methods."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    headline: ClassVar[str] = ""
    """The metric a summary shows first."""
    scale: ClassVar[float] = 1.0
    """The metrics' full scale (1 for fractions, 100 for PromptCBLUE's official 0-100)."""
    trains: ClassVar[bool] = False
    """True for a benchmark that trains its own models (moleculenet): ``medmm eval NAME`` calls its
    ``main(argv)`` instead of scoring a checkpoint or predictions."""

    @dataclass
    class Options:
        """No options."""

    def protocol(self, opts) -> str:
        """One line naming how the numbers were computed (printed beside every figure)."""
        return self.name

    def load(self, paths: list[Path], opts) -> list[dict]:
        raise NotImplementedError

    def generate(self, records: list[dict], opts, ctx: RunContext) -> list[dict]:
        raise NotImplementedError

    def from_predictions(self, predictions: list[dict], records: list[dict] | None, opts, source: str) -> list[dict]:
        raise NotImplementedError

    def score(self, rows: list[dict], opts) -> Scored:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def options(self, values: dict | None = None, source: str = "<options>"):
        """``Options`` from a mapping (suite YAML, CLI): unknown keys and wrong types raise ConfigError."""
        from ...config import config_from_dict

        return config_from_dict(self.Options, dict(values or {}), source)


BENCHMARKS = Registry("benchmark", modules=("medmm.eval.benchmarks",))
"""name -> :class:`Benchmark` subclass; importing the package (done on the first lookup) registers the built-in ones."""


def register_benchmark(cls: type[Benchmark]) -> type[Benchmark]:
    """Class decorator: register a :class:`Benchmark` subclass under its ``name`` (summary: its ``summary``)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    return BENCHMARKS.register(cls.name, cls, cls.summary or None)


def list_benchmarks() -> list[str]:
    """Registered benchmark names."""
    return BENCHMARKS.names()


def get_benchmark(name: str) -> Benchmark:
    """A new instance of the benchmark registered as ``name``; a ConfigError lists the registered ones."""
    return BENCHMARKS.get(name)()


def field_docs(cls) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal after each field), for ``--help``."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for a, b in zip(body, body[1:]):
        if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def options_dict(opts) -> dict:
    """A plain copy of an ``Options`` instance (for metrics.json)."""
    return dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else {}
