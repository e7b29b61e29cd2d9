"""LLaVA-style conversations -> token ids and labels, through the tokenizer's chat template.

A record is ``{"id", "modalities": {name: value | [values]}, "conversations": [{"from": "human"|"gpt",
"value": ...}]}``. Each modality item appears in the human text as one placeholder ``<name>``; a
record whose text has none gets them prepended to its first human turn. The placeholder token is
expanded to the number of LLM tokens its projector emits. Labels are ``-100`` on everything but the
assistant answers (and their end-of-turn token), so prompts and modality tokens are never learned.

The chat template is rendered turn by turn and the differences between successive renderings are
tokenised separately; a template that does not render prefixes consistently is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConversationError

IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class ModalityToken:
    """A modality placeholder: its text, token id and how many LLM positions it expands to."""

    text: str
    token_id: int
    slots: int


def to_messages(conversations: list[dict], source: str, system_prompt: str | None = None) -> list[dict]:
    """LLaVA ``conversations`` -> chat-template messages ``[{role, content}]``, validated."""
    if not isinstance(conversations, list) or not conversations:
        raise ConversationError(source, "'conversations' must be a non-empty list")
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "value" not in turn:
            raise ConversationError(source, f"turn {i} needs 'from' and 'value'")
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        if role is None:
            raise ConversationError(source, f"turn {i}: unknown role '{turn.get('from')}' (use human/gpt)")
        msgs.append({"role": role, "content": str(turn["value"])})
    return msgs


def reference_of(record: dict) -> str | None:
    """The reference answer of a conversation record: its last turn when that is an answer (gpt), else None."""
    conv = record.get("conversations") or []
    if conv and isinstance(conv[-1], dict) and str(conv[-1].get("from", conv[-1].get("role", ""))).lower() in (
            "gpt", "assistant"):
        return str(conv[-1].get("value", conv[-1].get("content", "")))
    return None


class ConversationEncoder:
    """Renders and tokenises conversations for one tokenizer and a set of modality placeholders."""

    def __init__(self, tokenizer, modality_tokens: dict[str, ModalityToken], max_length: int = 2048,
                 system_prompt: str | None = None):
        self.tok = tokenizer
        self.modality_tokens = modality_tokens
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    # ------------------------------------------------------------------ rendering
    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if self.has_template:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        # Plain fallback for tokenizers without a chat template.
        out = []
        for m in messages:
            if m["role"] == "system":
                out.append(f"{m['content']}\n\n")
            elif m["role"] == "user":
                out.append(f"USER: {m['content']}\n")
            else:
                out.append(f"ASSISTANT: {m['content']}{self.tok.eos_token or ''}\n")
        if add_generation_prompt:
            out.append("ASSISTANT: ")
        return "".join(out)

    def _segments(self, messages: list[dict], source: str, for_generation: bool) -> list[tuple[str, bool]]:
        """Split the rendering into (text, is_answer) pieces."""
        segs: list[tuple[str, bool]] = []
        prev = ""
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if k == 0:
                raise ConversationError(source, "the conversation starts with an answer (gpt) turn")
            prompt = self.render(messages[:k], add_generation_prompt=True)
            full = self.render(messages[: k + 1], add_generation_prompt=False)
            if not prompt.startswith(prev) or not full.startswith(prompt):
                raise ConversationError(source, "the chat template does not render turns as prefixes of each other")
            segs.append((prompt[len(prev):], False))
            segs.append((full[len(prompt):], True))
            prev = full
        if for_generation:
            if messages[-1]["role"] == "assistant":
                raise ConversationError(source, "a prompt for generation must end with a human turn")
            prompt = self.render(messages, add_generation_prompt=True)
            if not prompt.startswith(prev):
                raise ConversationError(source, "the chat template does not render turns as prefixes of each other")
            segs.append((prompt[len(prev):], False))
        elif not segs:
            raise ConversationError(source, "no answer (gpt) turn to train on")
        return segs

    # ------------------------------------------------------------------ placeholders
    def _insert_placeholders(self, messages: list[dict], counts: dict[str, int], source: str) -> list[dict]:
        messages = [dict(m) for m in messages]
        user_idx = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not user_idx:
            raise ConversationError(source, "no human turn")
        for name, mt in self.modality_tokens.items():
            in_text = sum(m["content"].count(mt.text) for m in messages if m["role"] == "user")
            in_answers = sum(m["content"].count(mt.text) for m in messages if m["role"] == "assistant")
            if in_answers:
                raise ConversationError(source, f"placeholder {mt.text} appears in an answer turn")
            n = counts.get(name, 0)
            if in_text == 0 and n > 0:
                first = messages[user_idx[0]]
                first["content"] = (mt.text + "\n") * n + first["content"]
            elif in_text != n:
                raise ConversationError(
                    source, f"{in_text} {mt.text} placeholder(s) in the text but {n} '{name}' input(s)")
        unknown = set(counts) - set(self.modality_tokens)
        if unknown:
            raise ConversationError(source, f"modalities {sorted(unknown)} are not configured in this model "
                                            f"(configured: {sorted(self.modality_tokens)})")
        return messages

    def _tokenize(self, segs: list[tuple[str, bool]], source: str) -> tuple[list[int], list[int]]:
        expand = {mt.token_id: mt.slots for mt in self.modality_tokens.values()}
        ids: list[int] = []
        labels: list[int] = []
        for text, is_answer in segs:
            piece = self.tok(text, add_special_tokens=False)["input_ids"]
            for t in piece:
                reps = expand.get(t, 1)
                if reps > 1 and is_answer:
                    raise ConversationError(source, "modality placeholder inside an answer")
                ids.extend([t] * reps)
                labels.extend([t if is_answer and t not in expand else IGNORE_INDEX] * reps)
        return ids, labels

    def _check_length(self, ids: list[int], labels: list[int], source: str):
        if len(ids) <= self.max_length:
            return ids, labels
        special = {mt.token_id for mt in self.modality_tokens.values()}
        if any(t in special for t in ids[self.max_length:]):
            raise ConversationError(source, f"{len(ids)} tokens with modality tokens beyond max_length="
                                            f"{self.max_length}; raise data.max_length")
        return ids[: self.max_length], labels[: self.max_length]

    # ------------------------------------------------------------------ public
    def encode(self, conversations: list[dict], counts: dict[str, int], source: str = "<record>"):
        """Training sample -> (input_ids, labels)."""
        messages = self._insert_placeholders(to_messages(conversations, source, self.system_prompt), counts, source)
        ids, labels = self._tokenize(self._segments(messages, source, for_generation=False), source)
        if all(lab == IGNORE_INDEX for lab in labels):
            raise ConversationError(source, "every answer token was masked")
        return self._check_length(ids, labels, source)

    def encode_prompt(self, conversations: list[dict], counts: dict[str, int], source: str = "<request>") -> list[int]:
        """Generation prompt (ends with the assistant prefix) -> input_ids."""
        messages = self._insert_placeholders(to_messages(conversations, source, self.system_prompt), counts, source)
        ids, _ = self._tokenize(self._segments(messages, source, for_generation=True), source)
        if len(ids) > self.max_length:
            raise ConversationError(source, f"prompt of {len(ids)} tokens is longer than max_length={self.max_length}")
        return ids
