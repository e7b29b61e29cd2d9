"""``medmm prepare preferences``: the production of preference pairs (the records they make are read back by
:mod:`medmm.data.preferences`).

- :func:`pairs_from_labels`: closed-set data (VQA yes/no, ``prepare molecules`` druggability labels, records with
  ``answer_choices``): the right answer chosen, a wrong option rejected;
- :func:`pairs_from_samples`: N sampled answers per prompt (sampled by ``medmm prepare preferences --sample``, which
  runs a model) ranked by a registered reward (:mod:`medmm.data.rewards`); best and worst kept as a pair when the
  margin passes.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

from ..data.conversation import reference_of
from ..data.preferences import role_of
from ..data.rewards import RewardSpec, choices
from ..errors import ConversationError, InvalidInputError
from ..scoring import normalize
from ..utils import write_jsonl

_OR = re.compile(r"([\w][\w-]*)\s+or\s+([\w][\w-]*)", re.IGNORECASE)  # "A or B" in a question


def closed_options(record: dict) -> list[str] | None:
    """The allowed answers of a closed question, or None when they are unknown.

    In order: the record's ``answer_choices``/``options``; yes/no when the reference answer is yes or no; the two
    words around an "X or Y" of the question when the answer is one of them ("Is this an MRI or CT?" -> MRI, CT).
    """
    listed = choices(record)
    if listed:
        return listed
    answer = reference_of(record)
    if answer is None:
        return None
    norm = normalize(answer)
    if norm in ("yes", "no"):
        return ["yes", "no"]
    question = next((str(t.get("value", "")) for t in reversed(record.get("conversations") or [])
                     if role_of(t) == "user"), "")
    for a, b in _OR.findall(question):
        if norm in (normalize(a), normalize(b)) and normalize(a) != normalize(b):
            return [a, b]
    return None


def _prompt_of(record: dict, source: str) -> list[dict]:
    conv = record.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2 or role_of(conv[-1]) != "assistant" or role_of(conv[-2]) != "user":
        raise ConversationError(source, "needs conversations ending with a human question and its answer")
    return [dict(t) for t in conv[:-1]]


def pairs_from_labels(records: list[dict], source: str = "<data>", seed: int = 0) -> tuple[list[dict], list[dict], dict]:
    """Closed-set labelled conversations -> preference pairs: the reference answer chosen, a wrong option rejected.

    Open questions (``answer_type: OPEN``, or no known options) are skipped and counted, not errors; a reference
    answer outside its own options is an error. With several wrong options one is drawn, seeded by ``seed`` and
    the record id, so reruns give the same file.

    Returns:
        ``(pairs, error records, counts)``.
    """
    pairs, errors, counts = [], [], Counter()
    for j, rec in enumerate(records):
        src = f"{source}:{j + 1} (id={rec.get('id')})"
        counts["read"] += 1
        try:
            if str(rec.get("answer_type", "")).upper() == "OPEN":
                counts["skipped_open"] += 1
                continue
            prompt = _prompt_of(rec, src)
            options = closed_options(rec)
            if not options:
                counts["skipped_open"] += 1
                continue
            answer = reference_of(rec)
            right = [o for o in options if normalize(o) == normalize(answer)]
            if not right:
                raise ConversationError(src, f"the answer is not one of the options {options}")
            wrong = [o for o in options if normalize(o) != normalize(answer)]
            if not wrong:
                raise ConversationError(src, "no wrong option to reject")
            rejected = random.Random(f"{seed}:{rec.get('id', j)}").choice(wrong)
        except InvalidInputError as e:
            errors.append(e.to_record())
            continue
        pair = {"id": rec.get("id", f"pair-{j}"), "modalities": rec.get("modalities") or {}, "conversations": prompt,
                "chosen": answer, "rejected": rejected, "answer_choices": options}
        if rec.get("rejected_modalities") is not None:
            pair["rejected_modalities"] = rec["rejected_modalities"]
        pairs.append(pair)
        counts["pairs"] += 1
    return pairs, errors, dict(counts)


def pairs_from_samples(records: list[dict], samples: list[list[str]], reward: RewardSpec, min_margin: float = 0.0,
                       source: str = "<prompts>") -> tuple[list[dict], list[dict], dict]:
    """Sampled answers -> preference pairs: per prompt, the best answer by ``reward`` chosen and the worst rejected.

    ``samples[i]`` holds the answers sampled for ``records[i]``; the reward sees the record (its reference answer,
    its ``answer_choices``). A pair is kept when ``best - worst >= min_margin`` and the margin is above zero;
    identical answers never make a pair. A reward that cannot score a record (no reference) is an error record.

    Returns:
        ``(pairs, error records, counts)``.
    """
    if len(samples) != len(records):
        raise ValueError(f"{len(samples)} lists of samples for {len(records)} prompts")
    pairs, errors, counts = [], [], Counter()
    for j, (rec, answers) in enumerate(zip(records, samples)):
        src = f"{source}:{j + 1} (id={rec.get('id')})"
        counts["read"] += 1
        conv = rec.get("conversations") or []
        prompt = conv[:-1] if conv and role_of(conv[-1]) == "assistant" else conv
        try:
            if not prompt or role_of(prompt[-1]) != "user":
                raise ConversationError(src, "needs conversations ending with a human question (and its reference)")
            scored = []
            for a in dict.fromkeys(x.strip() for x in answers if x and x.strip()):  # distinct, in sampled order
                try:
                    scored.append((reward(a, rec), a))
                except ValueError as e:
                    raise InvalidInputError(src, f"reward '{reward.name}': {e}") from e
        except InvalidInputError as e:
            errors.append(e.to_record())
            continue
        if len(scored) < 2:
            counts["skipped_too_few_distinct"] += 1
            continue
        best = max(scored, key=lambda s: s[0])
        worst = min(scored, key=lambda s: s[0])
        margin = best[0] - worst[0]
        if margin <= 0 or margin < min_margin:
            counts["skipped_margin"] += 1
            continue
        pair = {"id": rec.get("id", f"pair-{j}"), "modalities": rec.get("modalities") or {},
                "conversations": [dict(t) for t in prompt], "chosen": best[1], "rejected": worst[1],
                "scores": {"reward": reward.name, "chosen": best[0], "rejected": worst[0], "n": len(answers)}}
        for k in ("answer_choices", "options"):
            if k in rec:
                pair[k] = rec[k]
        pairs.append(pair)
        counts["pairs"] += 1
    return pairs, errors, dict(counts)


def write_pairs(out: str | Path, pairs: list[dict], errors: list[dict], counts: dict, extra: dict) -> dict:
    """Write the pairs (JSONL), append failures to ``errors.jsonl`` beside them; returns the summary."""

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, pairs)
    if errors:
        with open(out.parent / "errors.jsonl", "a") as f:
            for e in errors:
                f.write(json.dumps(e) + "\n")
    return {"out": str(out), **counts, "errors": len(errors), **extra}
