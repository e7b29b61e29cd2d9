"""``medmm eval suite configs/eval/SUITE.yaml --checkpoint C``: several benchmarks in one run, one page.

A suite file names benchmarks, their data and options (checked against each benchmark's ``Options``)::

    suite: demo
    resamples: 1000
    benchmarks:
      - name: vqa
        data: [data/vqa_eval.jsonl]        # relative to --data-root
        options: {max_new_tokens: 8}
      - name: mcq
        label: mcq_letters                  # the key in results.json (default: name)
        data: [data/mcq.jsonl]

Writes ``OUT/results.json`` (``{"suite", "checkpoint", "benchmarks": {label: <metrics.json>}}``),
``OUT/report.html`` and ``OUT/<label>/{metrics.json,predictions.jsonl}`` per benchmark (so two suite runs
can be compared benchmark by benchmark with ``medmm eval compare``). The checkpoint is loaded once and
shared by the benchmarks that generate with it; an entry may name its own ``checkpoint`` (a head
checkpoint) or a ``predictions`` file to score instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import load_config
from ..errors import ConfigError
from ..utils import atomic_write_text, read_jsonl

__all__ = ["SuiteBenchmark", "SuiteConfig", "run_suite"]


@dataclass
class SuiteBenchmark:
    """One benchmark of a suite."""

    name: str
    """A registered benchmark (``medmm eval list``)."""
    data: list[str] = field(default_factory=list)
    """Data files, relative to ``--data-root``."""
    options: dict[str, Any] = field(default_factory=dict)
    """The benchmark's options (its ``Options`` fields)."""
    label: str | None = None
    """Key in results.json and the output sub-folder (default: ``name``)."""
    checkpoint: str | None = None
    """A checkpoint for this benchmark only (e.g. a head checkpoint); default: the suite's ``--checkpoint``."""
    predictions: str | None = None
    """Score this predictions file (relative to ``--data-root``) instead of generating."""
    limit: int | None = None
    """Score only the first ``limit`` records."""


@dataclass
class SuiteConfig:
    """A list of benchmarks run together."""

    suite: str
    """The suite's name (the page title)."""
    benchmarks: list[SuiteBenchmark] = field(default_factory=list)
    """The benchmarks, in page order."""
    resamples: int = 1000
    """Bootstrap resamples per benchmark."""
    seed: int = 0
    """Bootstrap seed."""
    batch_size: int = 8
    """Generation batch size."""
    max_rows: int = 500
    """Per-item rows shown per benchmark in report.html (all of them are in predictions.jsonl)."""

    def __post_init__(self):
        if not self.benchmarks:
            raise ConfigError(f"suite '{self.suite}': no benchmarks")
        labels = [b.label or b.name for b in self.benchmarks]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise ConfigError(f"suite '{self.suite}': label {sorted(dup)[0]!r} is used twice (set 'label')")
        if self.resamples < 0:
            raise ConfigError(f"suite '{self.suite}': resamples must be >= 0")


def run_suite(config: str | Path, checkpoint: str | Path | None, out: str | Path | None = None,
              data_root: str | Path = ".", overrides: list[str] | None = None, device: str = "auto",
              progress: bool = True) -> dict:
    """Run every benchmark of a suite file; write ``results.json`` and ``report.html`` under ``out``.

    Returns:
        The ``results.json`` dict.
    """
    from .benchmarks import get_benchmark, list_benchmarks
    from .benchmarks.registry import RunContext
    from .benchmarks.run import run_benchmark
    from .html import write_report

    cfg = load_config(SuiteConfig, config, overrides)
    root = Path(data_root)
    out = Path(out or Path("runs") / "eval" / cfg.suite)
    known = set(list_benchmarks())
    for i, b in enumerate(cfg.benchmarks):  # check every entry before the first model is loaded
        if b.name not in known:
            raise ConfigError(f"{config}: benchmarks.{i}.name: unknown benchmark '{b.name}' "
                              f"(known: {', '.join(sorted(known))})")
        if get_benchmark(b.name).trains:
            raise ConfigError(f"{config}: benchmarks.{i}: '{b.name}' trains its own models; run `medmm eval "
                              f"{b.name}` on its own")
        get_benchmark(b.name).options(b.options, f"{config}: benchmarks.{i}.options")
        if b.predictions is None and (b.checkpoint or checkpoint) is None:
            raise ConfigError(f"{config}: benchmarks.{i} ({b.name}): no checkpoint (give --checkpoint) and no "
                              f"predictions file")
    shared = RunContext(str(checkpoint) if checkpoint else None, device=device, batch_size=cfg.batch_size,
                        progress=progress)
    results: dict[str, dict] = {}
    pages: dict[str, tuple[dict, list[dict]]] = {}
    for b in cfg.benchmarks:
        label = b.label or b.name
        kwargs: dict = {"data": [root / d for d in b.data] or None, "options": b.options,
                        "resamples": cfg.resamples, "seed": cfg.seed, "batch_size": cfg.batch_size,
                        "limit": b.limit, "progress": progress, "html": False, "device": device}
        if b.predictions:
            kwargs["predictions"] = root / b.predictions
        elif b.checkpoint:
            kwargs["checkpoint"] = b.checkpoint
        else:
            kwargs["checkpoint"] = checkpoint
            kwargs["ctx"] = shared
        if progress:
            print(f"[suite {cfg.suite}] {label} ({b.name})", flush=True)
        res = run_benchmark(b.name, out / label, **kwargs)
        results[label] = res
        pages[label] = (res, read_jsonl(out / label / "predictions.jsonl"))
    doc = {"suite": cfg.suite, "checkpoint": str(checkpoint) if checkpoint else None, "benchmarks": results}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(doc, indent=2, ensure_ascii=False))
    write_report(out / "report.html", f"medmm eval suite: {cfg.suite}", pages,
                 subtitle=f"checkpoint {checkpoint}" if checkpoint else "", max_rows=cfg.max_rows)
    return doc
