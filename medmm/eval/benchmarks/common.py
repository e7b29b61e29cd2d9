"""Pieces shared by the text benchmarks: conversation records, generating with a checkpoint, reading predictions."""

from __future__ import annotations

from pathlib import Path

from ...config import DecodingConfig
from ...data.conversation import reference_of
from ...errors import InvalidInputError
from ...utils import read_jsonl
from .registry import RunContext

__all__ = ["generate_answers", "generated_rows", "load_conversations", "modalities_of", "prediction_text", "question_of",
           "rows_from_predictions"]


def modalities_of(record: dict) -> dict:
    """A record's modalities with file paths made absolute (relative ones are relative to its data file)."""
    mods = dict(record.get("modalities") or {})
    base = Path(record["_file"]).parent if record.get("_file") else None
    for k, v in mods.items():
        if base is not None and isinstance(v, str) and not Path(v).is_absolute() and (base / v).exists():
            mods[k] = str((base / v).resolve())
    return mods


def load_conversations(paths: list[Path]) -> list[dict]:
    """Conversation JSONL records (``modalities`` + ``conversations`` ending with the reference answer).

    Each record keeps its file in ``_file`` (modality paths are relative to it); a record without an id gets
    ``<file stem>-<line>``.
    """
    out = []
    for path in paths:
        for i, rec in enumerate(read_jsonl(path)):
            rec = dict(rec)
            rec.setdefault("id", f"{Path(path).stem}-{i + 1}")
            rec["_file"] = str(path)
            out.append(rec)
    return out


def question_of(record: dict) -> str:
    """The last human turn of a conversation record (placeholders such as ``<image>`` removed), or ``question``."""
    if "question" in record:
        return str(record["question"])
    turns = [t for t in record.get("conversations") or [] if str(t.get("from", t.get("role", ""))).lower()
             in ("human", "user")]
    text = str(turns[-1].get("value", turns[-1].get("content", ""))) if turns else ""
    lines = [ln for ln in text.splitlines() if not (ln.strip().startswith("<") and ln.strip().endswith(">"))]
    return "\n".join(lines).strip()


def generate_answers(records: list[dict], ctx: RunContext, decoding: DecodingConfig) -> list[dict]:
    """Predictor outputs for conversation records, in order; a failed record's output carries ``error``."""
    predictor = ctx.predictor()
    outputs: list[dict | None] = [None] * len(records)
    by_file: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_file.setdefault(r.get("_file", ""), []).append(i)
    for f, idx in by_file.items():
        reqs = [{k: v for k, v in records[i].items() if k != "_file"} for i in idx]
        outs = predictor.predict(reqs, decoding, ctx.batch_size, Path(f).parent if f else None)
        for i, o in zip(idx, outs):
            outputs[i] = o
    return outputs  # type: ignore[return-value]


def generated_rows(records: list[dict], ctx: RunContext, max_new_tokens: int, what: str,
                   extra: tuple[str, ...] = ()) -> list[dict]:
    """Generate an answer per conversation record and pair it with the record's reference.

    Each row is ``{id, question, modalities, reference, *extra, prediction}``; a failed record keeps ``error`` and
    ``message`` instead of a prediction, and one without a reference (its last turn is not the model's) gets
    ``error: NoReference`` (``what`` names the reference in that message: "answer", "report").
    """
    outs = generate_answers(records, ctx, DecodingConfig(max_new_tokens=max_new_tokens))
    rows = []
    for rec, out in zip(records, outs):
        row = {"id": rec["id"], "question": question_of(rec), "modalities": modalities_of(rec),
               **{k: rec.get(k) for k in extra}, "reference": reference_of(rec)}
        if "error" in out:
            row.update(error=out["error"], message=out.get("message", ""))
        elif row["reference"] is None:
            row.update(error="NoReference", message=f"the record has no reference {what} (last turn not gpt)")
        else:
            row["prediction"] = out["answer"]
        rows.append(row)
    return rows


def prediction_text(row: dict, source: str) -> str:
    """A predictions row's generated text: ``prediction``, else ``answer`` (what ``medmm infer`` writes)."""
    for k in ("prediction", "answer"):
        if k in row and row[k] is not None:
            return str(row[k])
    raise InvalidInputError(f"{source} (id={row.get('id')})", "a predictions row needs 'prediction' (or 'answer')")


def rows_from_predictions(predictions: list[dict], records: list[dict] | None, source: str,
                          extra: tuple[str, ...] = ()) -> list[dict]:
    """Rows ``{id, prediction, reference, question, modalities, *extra}`` from a predictions file.

    With ``records`` (``--data``), every record must have a prediction (matched by id) and the reference,
    question and modalities come from the record; without, each predictions row must hold ``reference``.
    Predictions whose id is not in ``records`` are an error (they would be silently unscored otherwise).
    """
    rows = []
    if records is None:
        for p in predictions:
            if "error" in p:
                rows.append({"id": p["id"], "error": p["error"], "message": p.get("message", "")})
                continue
            if p.get("reference") is None:
                raise InvalidInputError(f"{source} (id={p.get('id')})", "no 'reference': give --data with references "
                                                                        "or write them into the predictions")
            rows.append({"id": p["id"], "prediction": prediction_text(p, source), "reference": str(p["reference"]),
                         **{k: p[k] for k in ("question", "modalities", *extra) if k in p}})
        return rows
    by_id = {p["id"]: p for p in predictions}
    missing = [r["id"] for r in records if r["id"] not in by_id]
    if missing:
        raise InvalidInputError(source, f"{len(missing)} records have no prediction (first: {missing[0]!r})")
    known = {r["id"] for r in records}
    unknown = [p["id"] for p in predictions if p["id"] not in known]
    if unknown:
        raise InvalidInputError(source, f"{len(unknown)} predictions match no record in --data (first: {unknown[0]!r})")
    for rec in records:
        p = by_id[rec["id"]]
        if "error" in p:
            rows.append({"id": rec["id"], "error": p["error"], "message": p.get("message", "")})
            continue
        ref = reference_of(rec) if "conversations" in rec else rec.get("reference", rec.get("answer"))
        if ref is None:
            raise InvalidInputError(f"{rec.get('_file', source)} (id={rec['id']})", "the record has no reference answer")
        rows.append({"id": rec["id"], "prediction": prediction_text(p, source), "reference": str(ref),
                     "question": question_of(rec), "modalities": modalities_of(rec),
                     **{k: rec[k] for k in extra if k in rec}})
    return rows
