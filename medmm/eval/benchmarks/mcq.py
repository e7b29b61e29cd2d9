"""``mcq``: medical exam multiple choice (MedQA / CMExam style): accuracy over items.

Data: JSON lines, one question each, in any of these shapes:

* MedQA: ``{"question", "options": {"A": ..., "B": ...}, "answer": <option text>, "answer_idx": "B"}``;
* CMExam: ``{"Question", "Options": "A 选项\\nB 选项...", "Answer": "B"}`` (several letters for
  multiple-answer items, e.g. ``"ACD"``);
* plain: ``{"id", "question", "options": [...] | {...}, "answer": "B"}`` (+ ``modalities`` for images).

``--mode loglik`` (default): closed-set answering (:meth:`medmm.inference.decoding.Session.closed_set`): the
prompt lists the lettered options, each candidate answer (the letter, or with ``--choices text`` the
option's text) is scored by its summed log-likelihood as the answer turn, and the best one is the prediction.
A multiple-answer item can only be right in ``generate`` mode.
``--mode generate``: the model writes an answer, parsed back by :func:`parse_choice` (a bare letter string,
"answer is X" / "答案是X", a leading "X." or the one option text quoted); an unparsed answer counts as wrong
and ``parse_rate`` reports how many parsed.

Predictions: rows ``{"id", "prediction"}`` (a letter string or free text, parsed the same way), matched to
``--data`` by id; without ``--data`` the rows must carry ``options`` and ``reference`` (the gold letters),
as this benchmark's own ``predictions.jsonl`` does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ...config import DecodingConfig
from ...errors import InvalidInputError
from ...utils import read_jsonl
from ..bootstrap import mean_statistic
from .common import modalities_of
from .registry import Benchmark, RunContext, Scored, register_benchmark

__all__ = ["MCQBenchmark", "normalize_item", "parse_choice", "prompt_of"]

LETTERS = "ABCDEFGHIJ"
_OPTION_LINE = re.compile(r"^\s*([A-J])\s*[\.\:：、．\)）]?\s*(.+?)\s*$")
_LETTERS_ONLY = re.compile(r"^[\s\(\（\[]*([A-J](?:[\s,，、和and]*[A-J])*)[\s\)\）\]\.。]*$")
_STATED = re.compile(r"(?:(?i:the\s+)?(?i:correct\s+)?(?i:answer|option)(?:\s+(?i:is))?|答案(?:是|为|应为|应该是)?|选)"
                     r"\s*[:：]?\s*[\(（]?([A-J])(?![A-Za-z])")
# "(B) ...", "B. ...", "B) ...", "B：..."; not "A patient" (a bare letter then a space is an English article)
_LEADING = re.compile(r"^\s*(?:[\(（\[]([A-J])[\)）\]]|([A-J])(?:[\.\:：、．\)）]|$))")


def _options(rec: dict, source: str) -> dict[str, str]:
    raw = rec.get("options", rec.get("Options"))
    if isinstance(raw, dict):
        opts = {str(k).strip().upper(): str(v).strip() for k, v in raw.items()}
    elif isinstance(raw, list):
        opts = {LETTERS[i]: str(v).strip() for i, v in enumerate(raw)}
    elif isinstance(raw, str):
        opts = {}
        for line in raw.splitlines():
            m = _OPTION_LINE.match(line)
            if m:
                opts[m.group(1)] = m.group(2)
    else:
        raise InvalidInputError(source, "no 'options' (a dict of letters, a list, or 'A ...' lines)")
    if len(opts) < 2 or any(k not in LETTERS for k in opts):
        raise InvalidInputError(source, f"options must be at least two, lettered A-J; got {sorted(opts)}")
    return dict(sorted(opts.items()))


def normalize_item(rec: dict, source: str) -> dict:
    """A data line -> ``{"id", "question", "options": {letter: text}, "reference": "AC", "modalities"}``."""
    question = rec.get("question", rec.get("Question"))
    if not isinstance(question, str) or not question.strip():
        raise InvalidInputError(source, "no 'question'")
    opts = _options(rec, source)
    ans = rec.get("answer_idx", rec.get("answer", rec.get("Answer")))
    if ans is None:
        raise InvalidInputError(source, "no answer ('answer_idx', 'answer' or 'Answer')")
    ans = str(ans).strip()
    letters = re.sub(r"[\s,，、]", "", ans).upper()
    if letters and all(c in opts for c in letters):
        gold = "".join(sorted(set(letters)))
    else:
        hits = [k for k, v in opts.items() if v == ans]
        if len(hits) != 1:
            raise InvalidInputError(source, f"the answer {ans[:40]!r} is neither option letters nor one option's text")
        gold = hits[0]
    return {"id": rec.get("id", rec.get("qid")), "question": question.strip(), "options": opts, "reference": gold,
            "modalities": rec.get("modalities") or {}}


def prompt_of(item: dict, instruction: str) -> str:
    """The question, the lettered options one per line, and the instruction."""
    lines = [item["question"], *[f"{k}. {v}" for k, v in item["options"].items()]]
    if instruction:
        lines.append(instruction)
    return "\n".join(lines)


def parse_choice(text: str, options: dict[str, str]) -> str | None:
    """The letters an answer names, sorted (``"B"``, ``"AC"``), or None when it names none.

    Rules, first match wins: the whole text is letters (``"B"``, ``"A, C"``, ``"(B)"``); a stated answer
    (``answer is B``, ``Answer: B``, ``答案是B``, ``选B``); a leading ``B.``/``B)``/``(B)``; exactly one option's text
    appears in the answer. Letters that are not options do not count.
    """
    text = str(text or "").strip()
    if not text:
        return None
    m = _LETTERS_ONLY.match(text)
    if m:
        letters = {c for c in m.group(1) if c in LETTERS}
        if letters and letters <= set(options):
            return "".join(sorted(letters))
    m = _STATED.search(text)
    if m and m.group(1) in options:
        return m.group(1)
    m = _LEADING.match(text)
    if m and (m.group(1) or m.group(2)) in options:
        return m.group(1) or m.group(2)
    low = text.lower()
    hits = [k for k, v in options.items() if v and v.lower() in low]
    return hits[0] if len(hits) == 1 else None


@register_benchmark
class MCQBenchmark(Benchmark):
    name = "mcq"
    summary = "exam multiple choice (MedQA/CMExam): accuracy by closed-set log-likelihood or generate-and-parse"
    headline = "accuracy"

    @dataclass
    class Options:
        mode: Literal["loglik", "generate"] = "loglik"
        """loglik: score each option as the answer; generate: write an answer and parse the letter."""
        choices: Literal["letter", "text"] = "letter"
        """loglik: the candidates are the letters, or the options' texts."""
        instruction: str = "Answer with the letter of the correct option."
        """Last line of the prompt (after the lettered options)."""
        max_new_tokens: int = 16
        """generate: tokens generated per answer."""
        rag: str = ""
        """A ``medmm index build`` folder: retrieved passages go before each question (the same model with and
        without retrieval = two suite entries); rows keep the ``citations``."""
        rag_top_k: int = 3
        """Passages per question with ``rag``."""

    def protocol(self, opts) -> str:
        if opts.mode == "loglik":
            return (f"mcq/loglik: closed-set answering over the option {opts.choices}s (summed log-likelihood of the "
                    f"answer turn + end of turn); accuracy = predicted letter set equals the gold set")
        return "mcq/generate: greedy answer parsed by parse_choice; unparsed = wrong; accuracy over items"

    def load(self, paths: list[Path], opts) -> list[dict]:
        out = []
        for path in paths:
            for i, rec in enumerate(read_jsonl(path)):
                item = normalize_item(rec, f"{path}:{i + 1}")
                item["id"] = item["id"] if item["id"] is not None else f"{Path(path).stem}-{i + 1}"
                item["_file"] = str(path)
                item["modalities"] = modalities_of(item)
                out.append(item)
        return out

    def generate(self, records: list[dict], opts, ctx: RunContext) -> list[dict]:
        predictor = ctx.predictor()
        reqs = []
        for r in records:
            req = {"id": r["id"], "question": prompt_of(r, opts.instruction), "modalities": r.get("modalities") or {}}
            if opts.mode == "loglik":
                cands = list(r["options"]) if opts.choices == "letter" else list(r["options"].values())
                if len(set(cands)) != len(cands):
                    raise InvalidInputError(f"{r.get('_file')} (id={r['id']})", "two options have the same text")
                req["options"] = cands
            reqs.append(req)
        cites = None
        if opts.rag:
            from ...retrieval.index import augment_question, load_index, rag_requests

            # the query is the question alone: the options would pull in passages about every distractor
            plain = [dict(q, question=r["question"]) for q, r in zip(reqs, records)]
            _, cites = rag_requests(plain, load_index(opts.rag), opts.rag_top_k)
            for q, c in zip(reqs, cites):
                q["question"] = augment_question(q["question"], c)[0]
        by_file: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            by_file.setdefault(r.get("_file", ""), []).append(i)
        outs: list[dict] = [{}] * len(records)
        for f, idx in by_file.items():
            res = predictor.predict([reqs[i] for i in idx], DecodingConfig(max_new_tokens=opts.max_new_tokens),
                                    ctx.batch_size, Path(f).parent if f else None)
            for i, o in zip(idx, res):
                outs[i] = o
        rows = []
        for r, o in zip(records, outs):
            row = {k: r[k] for k in ("id", "question", "options", "reference", "modalities")}
            if cites is not None:
                row["citations"] = cites[len(rows)]
            if "error" in o:
                row.update(error=o["error"], message=o.get("message", ""))
            elif opts.mode == "loglik":
                letter_of = {v: k for k, v in r["options"].items()} if opts.choices == "text" else {}
                row["prediction"] = letter_of.get(o["answer"], o["answer"])
                row["probs"] = {letter_of.get(k, k): round(v, 6) for k, v in o["probs"].items()}
            else:
                row["prediction"] = o["answer"]
            rows.append(row)
        return rows

    def from_predictions(self, predictions, records, opts, source):
        rows = []
        if records is None:
            for p in predictions:
                if "error" in p:
                    rows.append({"id": p["id"], "error": p["error"], "message": p.get("message", "")})
                    continue
                for k in ("options", "reference", "prediction"):
                    if k not in p:
                        raise InvalidInputError(f"{source} (id={p['id']})", f"no '{k}': give --data with the questions")
                rows.append({k: p[k] for k in ("id", "question", "options", "reference", "prediction", "modalities",
                                               "probs") if k in p})
            return rows
        by_id = {p["id"]: p for p in predictions}
        missing = [r["id"] for r in records if r["id"] not in by_id]
        if missing:
            raise InvalidInputError(source, f"{len(missing)} questions have no prediction (first: {missing[0]!r})")
        for r in records:
            p = by_id[r["id"]]
            row = {k: r[k] for k in ("id", "question", "options", "reference", "modalities")}
            if "error" in p:
                row.update(error=p["error"], message=p.get("message", ""))
            else:
                text = p.get("prediction", p.get("answer"))
                if text is None:
                    raise InvalidInputError(f"{source} (id={r['id']})", "no 'prediction'")
                row["prediction"] = str(text)
            rows.append(row)
        return rows

    def score(self, rows: list[dict], opts) -> Scored:
        out, correct, parsed = [], [], []
        for r in rows:
            opts_ = {str(k): str(v) for k, v in r["options"].items()}
            pred = parse_choice(r["prediction"], opts_)
            ok = pred is not None and pred == r["reference"]
            correct.append(float(ok))
            parsed.append(float(pred is not None))
            out.append({**r, "predicted": pred, "correct": ok, "group": "parsed" if pred else "unparsed"})
        cols = {"accuracy": correct}
        if opts.mode == "generate":
            cols["parse_rate"] = parsed
        notes = [f"{int(len(parsed) - sum(parsed))} answers named no option"] if sum(parsed) < len(parsed) else []
        return Scored(stat=mean_statistic(cols), rows=out, notes=notes)
