"""Evaluation benchmarks, one module each, behind one registry and one contract (see :mod:`.registry`).

    medmm eval NAME --checkpoint C --data D [--out OUT]      generate with a checkpoint, then score
    medmm eval NAME --predictions P [--data D] [--out OUT]   score any model's predictions file
    medmm eval compare RUN_A RUN_B                           paired bootstrap of the difference
    medmm eval suite configs/eval/SUITE.yaml --checkpoint C  several benchmarks, results.json + report.html

Importing this package registers the built-in benchmarks; heavy dependencies are imported when scoring.
"""

from . import dna, druggability, mcq, moleculenet, normalisation, promptcblue, report, slide, vqa  # noqa: F401
from .registry import Benchmark, RunContext, Scored, get_benchmark, list_benchmarks, register_benchmark
from .run import compare_runs, run_benchmark

__all__ = ["Benchmark", "RunContext", "Scored", "compare_runs", "get_benchmark", "list_benchmarks",
           "register_benchmark", "run_benchmark"]
