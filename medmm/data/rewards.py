"""The reward registry: score one generated answer against one example, as a pure function.

Preference-data production (rank sampled answers) and search decoding (score finished beams) both
need "how good is this answer for this example"; they look the function up by name::

    from medmm.data.rewards import get_reward, list_rewards, register_reward

    r = get_reward("exact_match")
    r("Yes.", {"conversations": [..., {"from": "gpt", "value": "yes"}]})       # -> 1.0

    @register_reward("length_penalty", "shorter is better")
    def length_penalty(prediction: str, example: dict) -> float:
        return -len(prediction) / 100

A reward takes ``(prediction, example)`` and returns a float; the example is a conversation record
(the reference is its last answer turn, or an explicit ``reference``/``target`` field) and may carry
``answer_choices`` (PromptCBLUE) for closed-set rewards. Rewards are pure: no model, no I/O, so they
sit in ``data/`` below ``training`` and ``inference``.

``medmm list rewards`` prints the registered rewards, one line each.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from encoders.registry import Registry, summary_of

from ..scoring import exact_match, normalize, recall, token_f1
from .conversation import reference_of

RewardFn = Callable[[str, dict], float]


@dataclass(frozen=True)
class RewardSpec:
    """A registered reward: its name, function and one-line description."""

    name: str
    fn: RewardFn
    description: str

    def __call__(self, prediction: str, example: dict) -> float:
        return float(self.fn(prediction, example))


REWARDS = Registry("reward")
"""name -> :class:`RewardSpec`."""


def register_reward(name: str, description: str = ""):
    """Decorator: register ``fn(prediction, example) -> float`` under ``name`` (names are unique); ``description``
    defaults to the first paragraph of its docstring."""

    def deco(fn: RewardFn) -> RewardFn:
        spec = RewardSpec(name, fn, description or summary_of(fn))
        REWARDS.register(name, spec, spec.description)
        return fn

    return deco


def list_rewards() -> list[str]:
    """Registered reward names."""
    return REWARDS.names()


def get_reward(name: str) -> RewardSpec:
    """The registered reward ``name``; a ConfigError lists the known ones."""
    return REWARDS.get(name)


def reference(example: dict) -> str:
    """The reference answer of an example: ``reference``, ``target``, or its last answer turn."""
    for key in ("reference", "target"):
        if isinstance(example.get(key), str):
            return example[key]
    ref = reference_of(example)
    if ref is None:
        raise ValueError("the example has no reference answer (no 'reference'/'target' field and no final gpt turn)")
    return ref


def choices(example: dict) -> list[str]:
    """The allowed answers of an example (``answer_choices`` or ``options``), as a list of strings."""
    raw = example.get("answer_choices", example.get("options"))
    if raw is None:
        return []
    if isinstance(raw, str):
        raw = [c for c in raw.replace("，", ",").split(",")]
    return [str(c).strip() for c in raw if str(c).strip()]


def _contains(text: str, choice: str) -> bool:
    """Whole words for ASCII choices ("no" is not in "know"); a substring for CJK text, which has no spaces."""
    if not choice:
        return False
    if choice.isascii():
        return re.search(rf"(?<!\w){re.escape(choice)}(?!\w)", text) is not None
    return choice in text


def match_choice(prediction: str, allowed: list[str]) -> str | None:
    """The one allowed choice the prediction names: equal after normalisation, else the only choice it contains."""
    norm = normalize(prediction)
    exact = [c for c in allowed if normalize(c) == norm]
    if len(exact) == 1:
        return exact[0]
    found = [c for c in allowed if _contains(norm, normalize(c))]
    return found[0] if len(found) == 1 else None


@register_reward("exact_match", "1 when the normalised answer equals the reference, else 0")
def _exact_match(prediction: str, example: dict) -> float:
    return exact_match(prediction, reference(example))


@register_reward("token_f1", "F1 of the normalised answer tokens against the reference's (SQuAD)")
def _token_f1(prediction: str, example: dict) -> float:
    return token_f1(prediction, reference(example))


@register_reward("recall", "share of the reference's tokens present in the answer (VQA open questions)")
def _recall(prediction: str, example: dict) -> float:
    return recall(prediction, reference(example))


@register_reward("closed_set", "1 when the answer names exactly one allowed choice and it is the reference, else 0")
def _closed_set(prediction: str, example: dict) -> float:
    allowed = choices(example)
    if not allowed:
        raise ValueError("closed_set needs 'answer_choices' (or 'options') in the example")
    picked = match_choice(prediction, allowed)
    return float(picked is not None and normalize(picked) == normalize(reference(example)))
