"""Preference pairs at run time: records -> chosen/rejected samples -> batches.

A preference record is a conversation whose last turn is the human prompt, and two answers::

    {"id": "vqa-11", "modalities": {"image": "synpic42202.jpg"},
     "conversations": [{"from": "human", "value": "<image>\\nIs there evidence of an aortic aneurysm?"}],
     "chosen": "yes", "rejected": "no"}

``rejected_modalities`` (optional) gives the rejected answer other inputs (e.g. a corrupted image); by default
both answers see ``modalities``. Each answer becomes one training sequence, prompt + answer, whose labels are
the answer's tokens alone (earlier answers of a multi-turn prompt are context, not scored).

Length: a pair whose prompt, or a modality placeholder, would be cut by ``data.max_length`` is dropped when the
dataset is built, with its reason in ``errors.jsonl`` (a cut placeholder is the "image features and image tokens
do not match" failure of other frameworks); an answer longer than what is left is truncated, as TRL does.

Production of pairs (``medmm prepare preferences``) is :mod:`medmm.prepare.preferences`.

Precomputed reference log-probs (``trainer.dpo.reference: precomputed``) are stored per pair with a digest of
both token sequences, so a file made for other data or another tokenizer is refused (:func:`read_reference`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, ConversationError, InvalidInputError
from ..utils import read_jsonl
from .conversation import IGNORE_INDEX, ROLES

log = logging.getLogger(__name__)
REFERENCE_FORMAT = "medmm-dpo-reference"
REFERENCE_VERSION = 1


# ----------------------------------------------------------------------------------------------- encoding
def role_of(turn) -> str | None:
    if not isinstance(turn, dict):
        return None
    return ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())


def _answer(record: dict, key: str, source: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConversationError(source, f"a preference record needs a non-empty '{key}' answer")
    return value


def _counts(mods, source: str) -> dict[str, int]:
    if mods is None:
        return {}
    if not isinstance(mods, dict):
        raise ConversationError(source, "'modalities' must be a mapping {name: value or [values]}")
    return {k: len(v) if isinstance(v, list) else 1 for k, v in mods.items()}


def _encode_answer(encoder, conv: list[dict], answer: str, counts: dict[str, int], which: str,
                   source: str) -> tuple[list[int], list[int]]:
    """prompt + answer -> (ids, labels) with labels on this answer's tokens only."""
    ids, labels = encoder.encode(conv + [{"from": "gpt", "value": answer}], counts, source)  # raises on a cut placeholder
    prompt = encoder.encode_prompt(conv, counts, source)  # raises when the prompt alone is over max_length
    if ids[: len(prompt)] != prompt:
        raise ConversationError(source, "the chat template does not render the prompt as a prefix of prompt + answer")
    labels = [IGNORE_INDEX] * len(prompt) + labels[len(prompt):]
    if all(t == IGNORE_INDEX for t in labels):
        raise ConversationError(source, f"the {which} answer is cut away entirely by max_length={encoder.max_length} "
                                        f"(the prompt takes {len(prompt)} tokens)")
    return ids, labels


def encode_pair(processor, record: dict, source: str = "<record>") -> dict:
    """Check a preference record and tokenise both answers (no modality input is read).

    Returns:
        ``{"chosen": (ids, labels), "rejected": (ids, labels)}``.

    Raises:
        ConversationError: a malformed record, a prompt that does not end with a human turn, identical answers, or
            a prompt or modality placeholder that ``max_length`` would cut.
    """
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise ConversationError(source, "'conversations' must be a non-empty list ending with the human prompt")
    if role_of(conv[-1]) != "user":
        raise ConversationError(source, "a preference record's conversations end with a human turn (the prompt); "
                                        "the answers go in 'chosen' and 'rejected'")
    chosen, rejected = _answer(record, "chosen", source), _answer(record, "rejected", source)
    if chosen.strip() == rejected.strip():
        raise ConversationError(source, "'chosen' and 'rejected' are the same answer")
    counts = _counts(record.get("modalities"), source)
    rmods = record.get("rejected_modalities")
    rcounts = counts if rmods is None else _counts(rmods, source)
    enc = processor.encoder
    return {"chosen": _encode_answer(enc, conv, chosen, counts, "chosen", source),
            "rejected": _encode_answer(enc, conv, rejected, rcounts, "rejected", source)}


def pair_digest(chosen_ids: Sequence[int], rejected_ids: Sequence[int]) -> str:
    """A short digest of both token sequences (ties a precomputed reference to its exact inputs)."""
    return hashlib.sha1(json.dumps([list(chosen_ids), list(rejected_ids)]).encode()).hexdigest()[:16]


class PreferenceDataset(Dataset):
    """A preference JSONL file; relative modality paths resolve against its folder.

    Pairs that cannot be trained on (malformed, a prompt or placeholder cut by ``max_length``) are dropped when the
    dataset is built and listed in :attr:`failed` (they reach ``errors.jsonl``). A pair whose modality input fails
    to load is replaced by the next one, the failure travelling with the sample (``load_errors``), as in
    :class:`medmm.data.dataset.ConversationDataset`.
    """

    def __init__(self, path: str | Path, processor, name: str | None = None, max_retries: int = 16):
        self.path = Path(path)
        self.processor = processor
        self.name = name or self.path.stem
        self.max_retries = max_retries
        self.failed: dict[str, dict] = {}
        self.pairs: list[dict] = []
        records = read_jsonl(self.path)
        if not records:
            raise InvalidInputError(self.path, "no records")
        key_path = str(self.path.resolve())
        for j, rec in enumerate(records):
            source = f"{self.path}:{j + 1} (id={rec.get('id')})"
            try:
                enc = encode_pair(processor, rec, source)
            except InvalidInputError as e:
                self.failed[source] = e.to_record()
                log.warning("dropping preference pair: %s", e)
                continue
            (c_ids, c_lab), (r_ids, r_lab) = enc["chosen"], enc["rejected"]
            self.pairs.append({"record": rec, "source": source, "key": (key_path, j + 1),
                               "digest": pair_digest(c_ids, r_ids), "chosen": (c_ids, c_lab),
                               "rejected": (r_ids, r_lab)})
        if not self.pairs:
            raise InvalidInputError(self.path, f"none of its {len(records)} records is a usable preference pair "
                                               f"(first reason: {next(iter(self.failed.values()))['message']})")
        self.reference: dict | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def attach_reference(self, table: dict, file: str | Path) -> None:
        """Give every pair its precomputed reference log-probs from ``table`` (:func:`read_reference`)."""
        for p in self.pairs:
            entry = table.get(p["key"])
            if entry is None:
                raise ConfigError(f"trainer.dpo.reference_file: {file} has no reference log-probs for {p['source']}; "
                                  "rerun `medmm prepare dpo-reference` for this data")
            if entry["digest"] != p["digest"]:
                raise ConfigError(f"trainer.dpo.reference_file: {file} was computed for other tokens of {p['source']} "
                                  "(data, tokenizer or data.max_length changed); rerun `medmm prepare dpo-reference`")
        self.reference = table

    def __getitem__(self, idx: int) -> dict:
        errors: list[dict] = []
        for k in range(self.max_retries):
            p = self.pairs[(idx + k) % len(self.pairs)]
            try:
                sample = self.load(p)
                sample["load_errors"] = errors
                return sample
            except InvalidInputError as e:
                errors.append(e.to_record())
                if p["source"] not in self.failed:
                    self.failed[p["source"]] = errors[-1]
                    log.warning("skipping preference pair: %s", e)
        raise InvalidInputError(self.path, f"{self.max_retries} consecutive pairs failed to load")

    def load(self, p: dict) -> dict:
        """One pair of :attr:`pairs` as a sample: both sequences and their modality inputs (read now)."""
        rec, base = p["record"], self.path.parent
        items = self.processor._modality_items(rec, p["source"], base)
        ritems = items
        if rec.get("rejected_modalities") is not None:
            ritems = self.processor._modality_items({"modalities": rec["rejected_modalities"]}, p["source"], base)
        (c_ids, c_lab), (r_ids, r_lab) = p["chosen"], p["rejected"]
        sample = {"chosen": {"input_ids": torch.tensor(c_ids), "labels": torch.tensor(c_lab), "items": items},
                  "rejected": {"input_ids": torch.tensor(r_ids), "labels": torch.tensor(r_lab), "items": ritems},
                  "key": p["key"], "id": rec.get("id")}
        if self.reference is not None:
            entry = self.reference[p["key"]]
            sample["ref"] = (entry["chosen"], entry["rejected"])
        return sample


def collate_pairs(processor, samples: list[dict], pad_missing_modalities: bool = True) -> dict:
    """Pairs -> one batch of ``2B`` rows: the B chosen sequences, then the B rejected ones (one forward pass).

    ``pad_missing_modalities`` gives every modality of the model an input (a zero-weighted dummy where no row has
    one), so every rank runs every encoder at every step: mixed text-only and multimodal pairs cannot hang ZeRO-3.
    With precomputed references the batch carries ``ref_logps`` ``(2B,)`` in the same order.
    """
    rows = [s["chosen"] for s in samples] + [s["rejected"] for s in samples]
    batch = processor.collate(rows, pad_missing_modalities=pad_missing_modalities)
    if all("ref" in s for s in samples):
        batch["ref_logps"] = torch.tensor([s["ref"][0] for s in samples] + [s["ref"][1] for s in samples],
                                          dtype=torch.float64)
    errors = [e for s in samples for e in s.get("load_errors", [])]
    if errors:
        batch["load_errors"] = errors
    return batch


# ----------------------------------------------------------------------------------------------- reference file
def write_reference(path: str | Path, header: dict, rows: list[dict]) -> Path:
    """Write precomputed reference log-probs: a header line, then one line per pair (dataset, line, digest, logps)."""
    from ..utils import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = {"format": REFERENCE_FORMAT, "version": REFERENCE_VERSION, **header}
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in [head, *rows]))
    return path


def read_reference(path: str | Path) -> tuple[dict, dict]:
    """Read a file of :func:`write_reference`: ``(header, {(dataset, line): {"digest", "chosen", "rejected"}})``."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"trainer.dpo.reference_file: '{path}' not found (medmm prepare dpo-reference writes it)")
    rows = read_jsonl(path)
    if not rows or rows[0].get("format") != REFERENCE_FORMAT:
        raise InvalidInputError(path, f"not a {REFERENCE_FORMAT} file (medmm prepare dpo-reference writes them)")
    if rows[0].get("version") != REFERENCE_VERSION:
        raise InvalidInputError(path, f"format version {rows[0].get('version')}, this medmm reads {REFERENCE_VERSION}")
    table = {(r["dataset"], int(r["line"])): {"digest": r["digest"], "chosen": float(r["chosen"]),
                                               "rejected": float(r["rejected"])} for r in rows[1:]}
    return rows[0], table


# ----------------------------------------------------------------------------- streamed pairs (format wds)


def preference_records(sample: dict, split: str | None = "train") -> list[dict]:
    """A shard sample -> its preference pair (``[]`` when it holds none or is of another split).

    The sample's JSON (``json`` or ``conversations.json`` member) is a preference record (``conversations``,
    ``chosen``, ``rejected``, optional ``rejected_modalities`` given as values) plus optionally ``modality`` and
    ``split``; its array member (``npz``/``npy``/``jpg``/``png``) is the input of ``modality`` (default ``image``)
    unless the record names ``modalities`` itself. Nothing is decoded here.
    """
    from .streaming import ARRAY_MEMBERS, Member, sample_record_doc

    doc = sample_record_doc(sample)
    if "chosen" not in doc or "rejected" not in doc or (split is not None and doc.get("split") not in (None, split)):
        return []
    key, url = sample.get("__key__"), sample.get("__url__")
    mods = doc.get("modalities")
    member = next((e for e in ARRAY_MEMBERS if e in sample), None)
    if mods is None and member is not None:
        mods = {str(doc.get("modality") or "image"): Member(member, sample[member], f"{url}#{key}")}
    return [{**doc, "id": doc.get("id") or key, "modalities": mods or {}, "source": f"{url}#{key}",
             "key": (str(url), str(key))}]


class StreamPairLoader:
    """``load`` of :class:`medmm.data.streaming.StreamBatches` for preference stages: a streamed pair -> the sample
    :class:`PreferenceDataset` makes (tokens of both answers, modality inputs decoded and loaded)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, rec: dict) -> dict:
        from .streaming import decoded

        source = rec["source"]
        enc = encode_pair(self.processor, rec, source)
        (c_ids, c_lab), (r_ids, r_lab) = enc["chosen"], enc["rejected"]
        rec = decoded(rec)
        items = self.processor._modality_items(rec, source, None)
        ritems = items
        if rec.get("rejected_modalities") is not None:
            ritems = self.processor._modality_items({"modalities": rec["rejected_modalities"]}, source, None)
        return {"chosen": {"input_ids": torch.tensor(c_ids), "labels": torch.tensor(c_lab), "items": items},
                "rejected": {"input_ids": torch.tensor(r_ids), "labels": torch.tensor(r_lab), "items": ritems},
                "key": rec["key"], "id": rec.get("id")}
