"""Run one benchmark (generate or read predictions, score, bootstrap, write) and compare two runs.

    run_benchmark("report", "runs/eval/report", predictions="preds.jsonl", options={"dataset": "iu_xray"})
    compare_runs("runs/eval/a", "runs/eval/b")

Every run writes ``OUT/metrics.json``::

    {"benchmark": "report", "protocol": "...", "n": 382,
     "metrics": {"bleu4": {"value": 0.049, "ci95": [0.041, 0.058]}, ...},
     "headline": "bleu4", "scale": 1.0, "options": {...}, "bootstrap": {"resamples": 1000, "seed": 0, ...},
     "errors": 0, "notes": [...], "source": {"checkpoint" | "predictions": ..., "data": [...]}}

and ``OUT/predictions.jsonl`` (one row per item, errors kept with their message, never dropped), plus
``OUT/report.html`` unless ``html=False``. ``n`` counts the scored items (rows without an error).
"""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import InvalidInputError
from ...utils import atomic_write_text, read_jsonl, write_jsonl
from ..bootstrap import bootstrap, paired_bootstrap
from .registry import Benchmark, RunContext, get_benchmark, options_dict

__all__ = ["compare_runs", "format_compare", "format_metrics", "run_benchmark", "score_rows", "unique_ids"]


def unique_ids(rows: list[dict], source: str) -> None:
    """Raise InvalidInputError naming ``source`` when an id (``id``, else ``sample_id``) is missing or repeated."""
    seen: set = set()
    for i, r in enumerate(rows):
        rid = r.get("id", r.get("sample_id"))
        if rid is None:
            raise InvalidInputError(f"{source}:{i + 1}", "a row without an 'id'")
        if rid in seen:
            raise InvalidInputError(f"{source}:{i + 1}", f"id {rid!r} appears twice")
        seen.add(rid)


def score_rows(bench: Benchmark, rows: list[dict], opts, resamples: int = 1000, seed: int = 0, level: float = 0.95,
               progress: bool = True) -> tuple[dict, list[dict]]:
    """Score rows and bootstrap every metric: ``(metrics.json dict, rows with per-item fields)``."""
    ok = [r for r in rows if "error" not in r]
    scored = bench.score(ok, opts)
    try:
        res = bootstrap(scored.stat, len(ok), resamples=resamples, seed=seed, level=level, strata=scored.strata,
                        progress=progress, desc=f"bootstrap {bench.name}")
    finally:
        if scored.close:
            scored.close()
    metrics = {k: {"value": v, "ci95": list(res.ci95[k]) if res.ci95.get(k) else None} for k, v in res.values.items()}
    by_id = {r["id"]: r for r in scored.rows}
    out_rows = [by_id.get(r.get("id"), r) if "error" not in r else r for r in rows]
    result = {"benchmark": bench.name, "protocol": bench.protocol(opts), "n": len(ok), "metrics": metrics,
              "headline": bench.headline, "scale": bench.scale, "options": options_dict(opts),
              "bootstrap": {"resamples": resamples, "seed": seed, "level": level, "method": "percentile",
                            "stratified": scored.strata is not None,
                            "resamples_used": {k: v for k, v in res.used.items() if v != resamples}},
              "errors": len(rows) - len(ok), "notes": scored.notes}
    result.update({k: v for k, v in scored.extra.items() if k not in result})
    return result, out_rows


def run_benchmark(name: str, out: str | Path, *, checkpoint: str | Path | None = None,
                  predictions: str | Path | None = None, data: list[str | Path] | None = None,
                  options: dict | object | None = None, resamples: int = 1000, seed: int = 0, level: float = 0.95,
                  device: str = "auto", batch_size: int = 8, limit: int | None = None, progress: bool = True,
                  html: bool = True, ctx: RunContext | None = None) -> dict:
    """Score a checkpoint (generating) or a predictions file on one benchmark; write ``out``.

    Args:
        name: a registered benchmark (``list_benchmarks()``).
        out: output folder (created).
        checkpoint: a medmm model folder (or a head checkpoint for head benchmarks) to generate with.
        predictions: a JSONL of predictions to score instead (rows as the benchmark documents).
        data: the benchmark's data files; required with ``checkpoint``, optional with ``predictions``.
        options: the benchmark's ``Options`` (an instance or a mapping of its fields).
        resamples, seed, level: the bootstrap (0 resamples: no intervals).
        limit: score only the first ``limit`` records (or predictions).

    Returns:
        The ``metrics.json`` dict.
    """
    bench = get_benchmark(name)
    opts = options if options is not None and not isinstance(options, dict) else bench.options(options)
    if (checkpoint is None) == (predictions is None):
        raise ValueError("give exactly one of checkpoint (generate) or predictions (score a file)")
    records = None
    if data:
        records = bench.load([Path(p) for p in data], opts)[:limit]
        unique_ids(records, ", ".join(str(p) for p in data))
    if checkpoint is not None:
        if records is None:
            raise ValueError(f"benchmark '{name}': generating with a checkpoint needs --data")
        ctx = ctx or RunContext(str(checkpoint), device=device, batch_size=batch_size, progress=progress)
        if ctx.checkpoint is None:
            ctx.checkpoint = str(checkpoint)
        rows = bench.generate(records, opts, ctx)
        source = {"checkpoint": str(checkpoint)}
    else:
        preds = read_jsonl(predictions)[:limit]
        unique_ids(preds, str(predictions))
        rows = bench.from_predictions(preds, records, opts, str(predictions))
        source = {"predictions": str(predictions)}
    if data:
        source["data"] = [str(p) for p in data]
    rows = rows[:limit]  # head benchmarks read whole files: their limit applies to the rows
    result, out_rows = score_rows(bench, rows, opts, resamples, seed, level, progress)
    result["source"] = source
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "predictions.jsonl", out_rows)
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2, ensure_ascii=False))
    if html:
        from ..html import write_report

        write_report(out / "report.html", f"medmm eval {name}", {name: (result, out_rows)},
                     subtitle=str(checkpoint or predictions))
    return result


def _read_run(run: str | Path) -> tuple[dict, list[dict]]:
    run = Path(run)
    for f in ("metrics.json", "predictions.jsonl"):
        if not (run / f).exists():
            raise InvalidInputError(str(run / f), "not found: an evaluation output folder holds metrics.json and "
                                                  "predictions.jsonl")
    try:
        metrics = json.loads((run / "metrics.json").read_text())
    except json.JSONDecodeError as e:
        raise InvalidInputError(str(run / "metrics.json"), f"not valid JSON ({e.msg})") from e
    if "benchmark" not in metrics:
        raise InvalidInputError(str(run / "metrics.json"), "no 'benchmark' key (written by the old `medmm eval`?)")
    return metrics, read_jsonl(run / "predictions.jsonl")


def compare_runs(run_a: str | Path, run_b: str | Path, resamples: int = 1000, seed: int = 0, level: float = 0.95,
                 progress: bool = True) -> dict:
    """Paired bootstrap of A - B per metric over the items both runs scored (the same ids in each).

    Both folders must come from the same benchmark and protocol; the items are matched by id and must be the
    same set (an item errored in either run is left out of both, and counted).
    """
    ma, rows_a = _read_run(run_a)
    mb, rows_b = _read_run(run_b)
    if ma["benchmark"] != mb["benchmark"]:
        raise InvalidInputError(f"{run_a} vs {run_b}", f"different benchmarks ({ma['benchmark']} vs {mb['benchmark']})")
    if ma.get("protocol") != mb.get("protocol"):
        raise InvalidInputError(f"{run_a} vs {run_b}",
                                f"different protocols ({ma.get('protocol')!r} vs {mb.get('protocol')!r})")
    bench = get_benchmark(ma["benchmark"])
    opts = bench.options(ma.get("options"), f"{run_a}/metrics.json: options")
    ids_a = {r["id"] for r in rows_a}
    ids_b = {r["id"] for r in rows_b}
    if ids_a != ids_b:
        raise InvalidInputError(f"{run_a} vs {run_b}", f"not the same items: {len(ids_a - ids_b)} only in A, "
                                                       f"{len(ids_b - ids_a)} only in B")
    errored = {r["id"] for r in rows_a + rows_b if "error" in r}
    a = [r for r in rows_a if r["id"] not in errored]
    by_id = {r["id"]: r for r in rows_b}
    b = [by_id[r["id"]] for r in a]
    sa, sb = bench.score(a, opts), bench.score(b, opts)
    try:
        res = paired_bootstrap(sa.stat, sb.stat, len(a), resamples=resamples, seed=seed, level=level,
                               strata=sa.strata, progress=progress, desc=f"paired bootstrap {bench.name}")
    finally:
        for s in (sa, sb):
            if s.close:
                s.close()
    metrics = {k: {**v, "ci95": list(v["ci95"]) if v["ci95"] else None} for k, v in res.metrics.items()}
    return {"benchmark": bench.name, "protocol": ma.get("protocol"), "n": len(a), "excluded_errors": len(errored),
            "a": str(run_a), "b": str(run_b), "metrics": metrics,
            "bootstrap": {"resamples": resamples, "seed": seed, "level": level, "method": "paired percentile",
                          "p_value": "two-sided, shifted null: (1 + #{|d* - d| >= |d|}) / (1 + resamples)"}}


def _fmt(v, scale: float) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2f}" if scale >= 10 else f"{v:.4f}"


def format_metrics(result: dict) -> str:
    """Human-readable lines: every metric with its interval, and the protocol beside the figures."""
    scale = result.get("scale", 1.0)
    lines = [f"{result['benchmark']}  n={result['n']}  errors={result.get('errors', 0)}",
             f"  protocol: {result['protocol']}"]
    width = max((len(k) for k in result["metrics"]), default=4)
    tag = result["protocol"].split(":", 1)[0]  # the protocol's short name beside every figure
    for k, m in result["metrics"].items():
        ci = m.get("ci95")
        ci_s = f"[{_fmt(ci[0], scale)}, {_fmt(ci[1], scale)}]" if ci else "[no interval]"
        lines.append(f"  {k:<{width}}  {_fmt(m['value'], scale):>8}  95% CI {ci_s:<20}  ({tag})")
    return "\n".join(lines)


def format_compare(result: dict) -> str:
    lines = [f"{result['benchmark']}: A - B over n={result['n']} paired items",
             f"  A: {result['a']}", f"  B: {result['b']}", f"  protocol: {result['protocol']}"]
    width = max((len(k) for k in result["metrics"]), default=4)
    for k, m in result["metrics"].items():
        if m["diff"] is None:
            lines.append(f"  {k:<{width}}  undefined")
            continue
        ci = m["ci95"]
        lines.append(f"  {k:<{width}}  A={m['a']:.4f}  B={m['b']:.4f}  diff={m['diff']:+.4f}  "
                     f"95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]  p={m['p_value']:.4f}" if ci else
                     f"  {k:<{width}}  diff={m['diff']:+.4f}")
    return "\n".join(lines)
