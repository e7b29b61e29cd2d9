"""``medmm eval``: answer every record of one or more conversation JSONL files and score the answers.

The last answer (gpt) turn of each record is the reference; the turns before it are the prompt.
Writes ``predictions.jsonl`` (with errors kept per row) and ``metrics.json`` (overall and per file).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import DecodingConfig
from ..data.conversation import reference_of
from ..utils import atomic_write_text, read_jsonl, write_jsonl
from .metrics import answer_metrics

__all__ = ["evaluate", "reference_of"]


def evaluate(checkpoint: str | Path, data: list[str | Path], out_dir: str | Path,
             decoding: DecodingConfig | None = None, batch_size: int = 8, device: str = "auto",
             limit: int | None = None, report: bool = False) -> dict:
    """Run the model over ``data`` files and write predictions and metrics to ``out_dir``.

    ``report=True`` adds the report-generation metrics (BLEU-1..4, ROUGE-L, METEOR, CIDEr) per file.
    """
    from ..inference.predictor import Predictor

    predictor = Predictor(checkpoint, device=device)
    out_dir = Path(out_dir)
    all_rows: list[dict] = []
    per_file: dict[str, dict] = {}
    for path in data:
        path = Path(path)
        records = read_jsonl(path)[:limit]
        outputs = predictor.predict(records, decoding or DecodingConfig(max_new_tokens=16), batch_size, path.parent)
        rows = []
        for rec, out in zip(records, outputs):
            rows.append({**out, "file": path.name, "reference": reference_of(rec), "answer_type": rec.get("answer_type")})
        ok = [r for r in rows if "error" not in r and r["reference"] is not None]
        m = answer_metrics([r["answer"] for r in ok], [r["reference"] for r in ok], [r["answer_type"] for r in ok])
        m["errors"] = len(rows) - len(ok)
        if report and ok:
            from .report_metrics import report_metrics

            m["report"] = report_metrics([r["answer"] for r in ok], [r["reference"] for r in ok])
        per_file[path.name] = m
        all_rows.extend(rows)
    ok = [r for r in all_rows if "error" not in r and r["reference"] is not None]
    metrics = {
        "checkpoint": str(checkpoint),
        "overall": {**answer_metrics([r["answer"] for r in ok], [r["reference"] for r in ok],
                                     [r["answer_type"] for r in ok]), "errors": len(all_rows) - len(ok)},
        "per_file": per_file,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "predictions.jsonl", all_rows)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics
