"""Text-only instruction data -> conversation JSONL: ``medmm prepare instructions FILE --format F --out DIR``.

Formats (a JSON array or JSON lines):

``alpaca``
    ``{"instruction", "input"?, "output", "system"?, "history"?: [[question, answer], ...]}``; the human
    turn is the instruction, then a blank line and the input when there is one.
``sharegpt``
    ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}], "system"?}`` or the OpenAI-style
    ``{"messages": [{"role": "user"|"assistant"|"system", "content"}]}``; turns must alternate, human first,
    and end with an answer.
``promptcblue``
    PromptCBLUE lines ``{"input", "target", "answer_choices", "task_type", "task_dataset", "sample_id"}``;
    the six fields are kept in each record (evaluation reads them: closed-set answers, per-task scores).

Writes ``DIR/train.jsonl`` and ``DIR/eval.jsonl`` (a seeded hash of each record's id; ``--eval-fraction``),
``DIR/errors.jsonl`` for rejected records (typed errors naming file and line) and ``DIR/manifest.json``.
A record has no ``modalities``: text-only conversations train with ``trainer.stage: sft``, alone or
mixed with multimodal datasets in ``data.datasets``. With ``--num-shards`` a part takes the records whose place in
the file hashes into it (:mod:`medmm.prepare.parts`); the split, by id, is the same in every part.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConversationError, InvalidInputError
from ..utils import atomic_write_text, write_jsonl
from .parts import Part, holds, split_of, write_part

FORMATS = ("alpaca", "sharegpt", "promptcblue")
PROMPTCBLUE_FIELDS = ("input", "target", "answer_choices", "task_type", "task_dataset", "sample_id")
_HUMAN = {"human", "user"}
_GPT = {"gpt", "assistant", "model", "chatgpt", "bard"}


def read_records(path: str | Path) -> list[tuple[str, object]]:
    """``(source, record)`` pairs of a JSON array or JSON-lines file; a line that is not JSON becomes an error later."""
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(path, "file not found")
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidInputError(path, f"not valid JSON ({e})") from e
        return [(f"{path}:[{i}]", r) for i, r in enumerate(data)]
    out: list[tuple[str, object]] = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{path}:{i}", json.loads(line)))
            except json.JSONDecodeError as e:
                out.append((f"{path}:{i}", InvalidInputError(f"{path}:{i}", f"not valid JSON ({e.msg})")))
    return out


def _text(rec: dict, key: str, source: str, required: bool = True) -> str:
    v = rec.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        if required:
            raise ConversationError(source, f"'{key}' is missing or empty")
        return ""
    if not isinstance(v, str):
        raise ConversationError(source, f"'{key}' must be a string, got {type(v).__name__}")
    return v


def from_alpaca(rec: dict, source: str) -> dict:
    """One Alpaca record -> a conversation record."""
    instruction = _text(rec, "instruction", source)
    inp = _text(rec, "input", source, required=False)
    output = _text(rec, "output", source)
    conv = []
    if rec.get("system"):
        conv.append({"from": "system", "value": _text(rec, "system", source)})
    for j, pair in enumerate(rec.get("history") or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ConversationError(source, f"history[{j}] must be [question, answer]")
        conv += [{"from": "human", "value": pair[0]}, {"from": "gpt", "value": pair[1]}]
    conv += [{"from": "human", "value": f"{instruction}\n\n{inp}" if inp.strip() else instruction},
             {"from": "gpt", "value": output}]
    return {"conversations": conv}


def from_sharegpt(rec: dict, source: str) -> dict:
    """One ShareGPT (``conversations``) or OpenAI-style (``messages``) record -> a conversation record."""
    turns = rec.get("conversations", rec.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise ConversationError(source, "needs a non-empty 'conversations' (or 'messages') list")
    conv = []
    if rec.get("system"):
        conv.append({"from": "system", "value": _text(rec, "system", source)})
    expect = "human"
    for j, t in enumerate(turns):
        if not isinstance(t, dict):
            raise ConversationError(source, f"turn {j} is not an object")
        role = str(t.get("from", t.get("role", ""))).lower()
        value = t.get("value", t.get("content"))
        if not isinstance(value, str):
            raise ConversationError(source, f"turn {j} has no text ('value' or 'content')")
        if role == "system":
            if any(c["from"] != "system" for c in conv):
                raise ConversationError(source, f"turn {j}: a system turn may only come first")
            conv.append({"from": "system", "value": value})
            continue
        kind = "human" if role in _HUMAN else "gpt" if role in _GPT else None
        if kind is None:
            raise ConversationError(source, f"turn {j}: unsupported role '{role}' (human/user, gpt/assistant, system)")
        if kind != expect:
            raise ConversationError(source, f"turn {j}: expected a {expect} turn, got '{role}' (turns alternate, "
                                            "human first)")
        conv.append({"from": kind, "value": value})
        expect = "gpt" if kind == "human" else "human"
    if conv[-1]["from"] != "gpt":
        raise ConversationError(source, "the conversation must end with an answer (gpt/assistant) turn")
    return {"conversations": conv}


def from_promptcblue(rec: dict, source: str) -> dict:
    """One PromptCBLUE line -> a conversation record keeping its six fields."""
    missing = [k for k in PROMPTCBLUE_FIELDS if k not in rec]
    if missing:
        raise ConversationError(source, f"PromptCBLUE fields missing: {missing}")
    inp, target = _text(rec, "input", source), _text(rec, "target", source)
    choices = rec["answer_choices"]
    if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
        raise ConversationError(source, "'answer_choices' must be a list of strings or null")
    out = {"id": str(rec["sample_id"]), "conversations": [{"from": "human", "value": inp},
                                                         {"from": "gpt", "value": target}]}
    out.update({k: rec[k] for k in PROMPTCBLUE_FIELDS})
    return out


CONVERTERS = {"alpaca": from_alpaca, "sharegpt": from_sharegpt, "promptcblue": from_promptcblue}


def prepare_instructions(path: str | Path, fmt: str, out: str | Path, eval_fraction: float = 0.05, seed: int = 0,
                         name: str | None = None, part: Part | None = None) -> dict:
    """Convert an instruction file to ``out/train.jsonl`` + ``out/eval.jsonl``; returns the manifest.

    Args:
        path: the JSON array or JSON-lines file.
        fmt: alpaca | sharegpt | promptcblue.
        eval_fraction: share of the records held out in ``eval.jsonl`` (a hash of the id keyed by ``seed``;
            a small file may hold out none).
        name: prefix of generated record ids (default: the file stem).
        part: only the records that fall in this part of a sharded run.
    """
    if fmt not in CONVERTERS:
        raise ValueError(f"unknown instruction format '{fmt}'; known: {', '.join(FORMATS)}")
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    path, out = Path(path), Path(out)
    name = name or path.stem
    records, errors = [], []
    for i, (source, rec) in enumerate(read_records(path)):
        if not holds(part, f"record {i}"):
            continue
        try:
            if isinstance(rec, InvalidInputError):
                raise rec
            if not isinstance(rec, dict):
                raise ConversationError(source, f"a record must be an object, got {type(rec).__name__}")
            conv = CONVERTERS[fmt](rec, source)
            conv.setdefault("id", str(rec.get("id", f"{name}-{i}")))
            records.append(conv)
        except InvalidInputError as e:
            errors.append(e.to_record())
    train = [r for r in records if split_of(r["id"], eval_fraction, seed) == "train"]
    evals = [r for r in records if split_of(r["id"], eval_fraction, seed) == "eval"]
    write_part(out, part, "instructions", str(path), {"format": fmt, "eval_fraction": eval_fraction, "seed": seed,
                                                       "name": name})
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", evals)
    if errors:
        write_jsonl(out / "errors.jsonl", errors)
    manifest = {"name": name, "format": fmt, "source": str(path), "train": len(train), "eval": len(evals),
                "rejected": len(errors), "eval_fraction": eval_fraction, "seed": seed}
    if fmt == "promptcblue":
        tasks: dict[str, int] = {}
        for r in records:
            tasks[r["task_dataset"]] = tasks.get(r["task_dataset"], 0) + 1
        manifest["task_datasets"] = dict(sorted(tasks.items()))
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False))
    return manifest
