"""``medmm eval``: score a checkpoint or a predictions file on a registered benchmark, compare runs, run suites.

    medmm eval list                 (= medmm list benchmarks)
    medmm eval NAME --checkpoint C --data D [D ...] [--out OUT] [benchmark flags]
    medmm eval NAME --predictions P [--data D ...] [--out OUT] [benchmark flags]
    medmm eval compare RUN_A RUN_B [--resamples 1000] [--seed 0] [--out diff.json]
    medmm eval suite configs/eval/SUITE.yaml --checkpoint C [--out DIR] [--data-root DIR] [key=value ...]

Each benchmark's flags come from its ``Options`` dataclass (``medmm eval NAME --help`` lists them). Every
figure is printed with its 95% bootstrap interval and the protocol that produced it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from typing import Literal

__all__ = ["is_eval_command", "main"]

SUBCOMMANDS = ("list", "compare", "suite")


def is_eval_command(argv: list[str]) -> bool:
    """True when ``argv`` starts with a benchmark name or one of list/compare/suite."""
    if not argv:
        return False
    from .benchmarks import list_benchmarks

    return argv[0] in SUBCOMMANDS or argv[0] in list_benchmarks()


def _add_option_flags(ap: argparse.ArgumentParser, options_cls) -> list[str]:
    """One flag per ``Options`` field (default None: only given flags override the dataclass defaults)."""
    from .benchmarks.registry import field_docs

    hints = typing.get_type_hints(options_cls)
    docs = field_docs(options_cls)
    names = []
    for f in dataclasses.fields(options_cls):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) is not Literal and len(args) == 1:  # X | None
            tp = args[0]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = f"{docs.get(f.name, '')} (default: {default})"
        if tp is bool:
            ap.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif typing.get_origin(tp) is Literal:
            ap.add_argument(flag, dest=f.name, choices=list(typing.get_args(tp)), default=None, help=help_)
        elif tp in (int, float, str):
            ap.add_argument(flag, dest=f.name, type=tp, default=None, help=help_)
        else:
            ap.add_argument(flag, dest=f.name, type=json.loads, default=None, help=help_ + " [JSON]")
        names.append(f.name)
    return names


def _benchmark(name: str, argv: list[str]) -> None:
    from .benchmarks import get_benchmark
    from .benchmarks.run import format_metrics, run_benchmark

    bench = get_benchmark(name)
    ap = argparse.ArgumentParser(prog=f"medmm eval {name}", description=bench.summary)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="generate with this checkpoint, then score")
    src.add_argument("--predictions", help="score this predictions JSONL instead")
    ap.add_argument("--data", nargs="+", help="the benchmark's data files (required with --checkpoint)")
    ap.add_argument("--out", default=f"runs/eval/{name}", help="output folder (metrics.json, predictions.jsonl)")
    ap.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (0: no intervals)")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--limit", type=int, help="only the first N records")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-html", action="store_true", help="do not write OUT/report.html")
    ap.add_argument("--json", action="store_true", help="print metrics.json instead of the table")
    opt_names = _add_option_flags(ap.add_argument_group(f"{name} options"), bench.Options)
    a = ap.parse_args(argv)
    options = {k: getattr(a, k) for k in opt_names if getattr(a, k) is not None}
    res = run_benchmark(name, a.out, checkpoint=a.checkpoint, predictions=a.predictions, data=a.data,
                        options=options, resamples=a.resamples, seed=a.seed, device=a.device,
                        batch_size=a.batch_size, limit=a.limit, progress=not a.no_progress, html=not a.no_html)
    if a.json:
        print(json.dumps(res, indent=2, ensure_ascii=False))
    else:
        print(format_metrics(res))
        print(f"  wrote {a.out}/metrics.json, {a.out}/predictions.jsonl" + ("" if a.no_html else f", {a.out}/report.html"))


def _compare(argv: list[str]) -> None:
    from .benchmarks.run import compare_runs, format_compare

    ap = argparse.ArgumentParser(prog="medmm eval compare",
                                 description="paired bootstrap of A - B per metric over the same items")
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the comparison as JSON here")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    res = compare_runs(a.run_a, a.run_b, a.resamples, a.seed, progress=not a.no_progress)
    if a.out:
        from ..utils import atomic_write_text

        atomic_write_text(a.out, json.dumps(res, indent=2, ensure_ascii=False))
    print(json.dumps(res, indent=2, ensure_ascii=False) if a.json else format_compare(res))


def _suite(argv: list[str]) -> None:
    from .suite import run_suite

    ap = argparse.ArgumentParser(prog="medmm eval suite")
    ap.add_argument("config", help="a suite YAML (configs/eval/*.yaml)")
    ap.add_argument("--checkpoint", help="the model every benchmark generates with (unless an entry names its own)")
    ap.add_argument("--out", help="output folder (default runs/eval/<suite>)")
    ap.add_argument("--data-root", default=".", help="the data paths in the suite are relative to this folder")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="dotted overrides of the suite file, e.g. resamples=200")
    a = ap.parse_args(argv)
    doc = run_suite(a.config, a.checkpoint, a.out, a.data_root, a.overrides, a.device, progress=not a.no_progress)
    from .benchmarks.run import format_metrics

    for res in doc["benchmarks"].values():
        print(format_metrics(res))
    out = a.out or f"runs/eval/{doc['suite']}"
    print(f"wrote {out}/results.json and {out}/report.html")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .benchmarks import get_benchmark, list_benchmarks
    from .benchmarks.registry import BENCHMARKS

    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "list":  # the same lines as ``medmm list benchmarks``
        print("\n".join(BENCHMARKS.lines()))
    elif cmd == "compare":
        _compare(rest)
    elif cmd == "suite":
        _suite(rest)
    elif cmd in list_benchmarks() and get_benchmark(cmd).trains:  # trains its own models (moleculenet)
        get_benchmark(cmd).main(rest)
    elif cmd in list_benchmarks():
        _benchmark(cmd, rest)
    else:
        raise SystemExit(f"medmm eval: unknown benchmark '{cmd}'; benchmarks: {', '.join(list_benchmarks())}")


if __name__ == "__main__":
    main()
