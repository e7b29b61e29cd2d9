"""Sequence packing: documents and conversations laid into fixed-length blocks instead of padded rows.

``data.packing`` chooses how:

- ``none``: one sample per row, padded to the longest row of its batch (the default).
- ``concat`` (pretraining): documents joined with EOS and cut into ``data.max_length`` blocks; attention and
  positions run across documents, as LLaMA-Factory's ``pt`` stage does.
- ``neat``: attention and positions restart at each document. A block carries per-document ``position_ids``
  (0, 1, ... for each document); the model turns them into a block-diagonal causal mask for SDPA and eager
  attention, or runs FlashAttention's varlen kernel on the flattened batch (see :func:`packed_llm_inputs`).
  A neat-packed block's loss is the token-weighted mean of its documents' own losses.

Two planners place documents: :func:`plan_stream` lays them end to end and cuts every ``block_size`` tokens
(pretraining; a document with modality tokens is never cut), :func:`plan_bins` fits whole samples into blocks
by best-fit decreasing (SFT, where each conversation must stay whole). Plans are pure functions of the lengths,
so every rank builds the same blocks.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset

from ..errors import InvalidInputError
from .conversation import IGNORE_INDEX

log = logging.getLogger(__name__)

PackingMode = Literal["none", "concat", "neat"]


@dataclass(frozen=True)
class Piece:
    """Tokens ``[start, end)`` of document ``doc`` placed in a block."""

    doc: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def plan_stream(lengths: Sequence[int], block_size: int, atomic: Sequence[bool] | None = None,
                drop_last: bool = False) -> list[list[Piece]]:
    """Documents laid end to end and cut every ``block_size`` tokens, in order.

    A document may continue in the next block, except an ``atomic`` one (it holds modality tokens): one that
    does not fit in what is left of a block closes that block (the rest is padding) and opens the next; an
    atomic document longer than a block is cut at ``block_size`` (its modality tokens come first, so only
    text is lost).

    Args:
        lengths: tokens of each document (EOS included).
        block_size: tokens per block.
        atomic: per document, True when it must not be split across blocks.
        drop_last: drop a final block that is not full (LLaMA-Factory's ``pt`` drops the remainder).

    Returns:
        One list of pieces per block; their lengths add up to at most ``block_size``.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    blocks: list[list[Piece]] = []
    cur: list[Piece] = []
    room = block_size
    for d, n in enumerate(lengths):
        if n <= 0:
            continue
        if atomic is not None and atomic[d]:
            n = min(n, block_size)
            if n > room:
                blocks.append(cur)
                cur, room = [], block_size
            cur.append(Piece(d, 0, n))
            room -= n
        else:
            start = 0
            while start < n:
                take = min(room, n - start)
                cur.append(Piece(d, start, start + take))
                start += take
                room -= take
                if room == 0:
                    blocks.append(cur)
                    cur, room = [], block_size
        if room == 0:
            blocks.append(cur)
            cur, room = [], block_size
    if cur and not drop_last:
        blocks.append(cur)
    return [b for b in blocks if b]


def plan_bins(lengths: Sequence[int], block_size: int) -> list[list[int]]:
    """Whole samples into blocks of at most ``block_size`` tokens, best-fit decreasing.

    Samples are taken longest first (ties by index) and each goes into the fullest block it still fits;
    a sample longer than a block gets a block of its own (it was truncated upstream). Deterministic.

    Returns:
        One list of sample indices per block, in the order the samples are laid out in the block.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # Free room of each open bin, kept sorted, for an O(log n) best-fit lookup.
    rooms: list[tuple[int, int]] = []  # (room, bin index)
    for i in order:
        n = lengths[i]
        if n <= 0:
            continue
        k = bisect.bisect_left(rooms, (n, -1))
        if k < len(rooms):
            room, b = rooms.pop(k)
            bins[b].append(i)
            if room - n > 0:
                bisect.insort(rooms, (room - n, b))
        else:
            bins.append([i])
            if block_size - n > 0:
                bisect.insort(rooms, (block_size - n, len(bins) - 1))
    return [sorted(b) for b in bins]


def concat_samples(samples: list[dict], neat: bool = True) -> dict:
    """Join samples (``input_ids``, ``labels``, ``items``) into one row.

    With ``neat`` the row carries ``position_ids`` that restart at 0 for each sample, and the label of each
    sample's first token is ignored (it cannot be predicted from another document). Modality items keep their
    order, sample after sample, which is the order the model splices them in.
    """
    ids = torch.cat([s["input_ids"] for s in samples])
    labels = torch.cat([s["labels"] if "labels" in s else s["input_ids"] for s in samples]).clone()
    out: dict = {"input_ids": ids, "labels": labels, "items": {}, "id": [s.get("id") for s in samples]}
    if neat:
        out["position_ids"] = torch.cat([torch.arange(s["input_ids"].shape[0]) for s in samples])
        starts = torch.tensor([0] + [s["input_ids"].shape[0] for s in samples[:-1]]).cumsum(0)
        labels[starts] = IGNORE_INDEX
    for s in samples:
        for name, vals in s.get("items", {}).items():
            out["items"].setdefault(name, []).extend(vals)
    errors = [e for s in samples for e in s.get("load_errors", [])]
    if errors:
        out["load_errors"] = errors
    return out


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` positions -> ``(B, T)`` document index within each row (a document starts at position 0)."""
    return (position_ids == 0).long().cumsum(-1)


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The ``(B, 1, T, T)`` mask of a neat-packed batch: causal, and only within a document.

    Boolean (True = attend) when ``dtype`` is None, as SDPA takes it; otherwise additive (0 / dtype min),
    as eager attention adds it to the scores.
    """
    seg = segment_ids(position_ids)  # (B, T)
    T = seg.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    mask = (seg.unsqueeze(-1) == seg.unsqueeze(-2)) & causal  # (B, T, T)
    mask = mask.unsqueeze(1)  # (B, 1, T, T)
    if dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")


def packed_llm_inputs(embeds: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor | None,
                      attn_implementation: str | None):
    """Inputs for a Hugging Face causal LM on a neat-packed batch, for its attention implementation.

    - FlashAttention 2/3: the batch is flattened to one row ``(1, B*T)``; transformers then derives the
      ``cu_seqlens`` of the varlen kernel from the restarting ``position_ids`` (it only does so for a batch
      of one row). No mask.
    - flex_attention: no mask; transformers builds the block mask from the packed ``position_ids``.
    - SDPA and eager: a 4D block-diagonal causal mask (boolean for SDPA, additive for eager), which
      transformers passes to the kernel as it is.

    The label at each document start is set to ignore: it would be predicted from the previous document.

    Args:
        embeds: ``(B, T, H)`` input embeddings.
        position_ids: ``(B, T)`` positions restarting at 0 at each document (padding is a document too).
        labels: ``(B, T)`` or None.
        attn_implementation: the LLM config's ``_attn_implementation``.

    Returns:
        ``(embeds, position_ids, labels, attention_mask)`` to pass to the LLM.
    """
    if labels is not None:
        labels = labels.masked_fill(position_ids == 0, IGNORE_INDEX)
    impl = attn_implementation or "eager"
    if impl in FLASH_IMPLEMENTATIONS:
        B, T = position_ids.shape
        flat_labels = None if labels is None else labels.reshape(1, B * T)
        return embeds.reshape(1, B * T, -1), position_ids.reshape(1, B * T), flat_labels, None
    if impl == "flex_attention":
        return embeds, position_ids, labels, None
    dtype = None if impl == "sdpa" else embeds.dtype
    return embeds, position_ids, labels, block_causal_mask(position_ids, dtype)


class PackedConversationDataset(Dataset):
    """SFT samples of one conversation dataset packed into blocks of at most ``block_size`` tokens.

    Lengths come from the conversations alone (no image is read), then :func:`plan_bins` fixes the blocks.
    A record that fails to load is left out of its block (the block gets shorter) and reported once, like
    :class:`~medmm.data.dataset.ConversationDataset` does; a record whose conversation cannot be encoded is
    left out of the plan.

    Args:
        base: a ``ConversationDataset`` in ``sft`` mode (its records, processor, path and ``failed``).
        block_size: tokens per block (``data.max_length``).
    """

    def __init__(self, base, block_size: int):
        self.base = base
        self.block_size = block_size
        self.name = base.name
        self.path = base.path
        lengths = []
        for j, rec in enumerate(base.records):
            try:
                lengths.append(base.processor.sample_length(rec, f"{base.path}:{j + 1} (id={rec.get('id')})"))
            except InvalidInputError as e:
                base.failed.setdefault(j, e.to_record())
                log.warning("skipping record: %s", e)
                lengths.append(0)
        self.lengths = lengths
        self.blocks = plan_bins(lengths, block_size)
        if not self.blocks:
            raise InvalidInputError(base.path, "no record could be encoded for packing")

    @property
    def failed(self) -> dict:
        return self.base.failed

    def __len__(self) -> int:
        return len(self.blocks)

    def fill(self) -> float:
        """Fraction of block tokens that hold a sample (the rest is padding)."""
        return sum(self.lengths) / (len(self.blocks) * self.block_size)

    def __getitem__(self, idx: int) -> dict:
        samples, errors = [], []
        for j in self.blocks[idx]:
            rec = self.base.records[j]
            source = f"{self.base.path}:{j + 1} (id={rec.get('id')})"
            try:
                samples.append(self.base.processor.process(rec, self.base.path.parent, source))
            except InvalidInputError as e:
                errors.append(e.to_record())
                if j not in self.base.failed:
                    self.base.failed[j] = errors[-1]
                    log.warning("skipping record: %s", e)
        if not samples:
            raise InvalidInputError(self.base.path, f"every record of packed block {idx} failed to load")
        out = concat_samples(samples, neat=True)
        if errors:
            out["load_errors"] = out.get("load_errors", []) + errors
        return out


# --------------------------------------------------------------------------------------------
# Pretraining documents


@dataclass
class Document:
    """One pretraining document: its token ids (EOS included) and, for a captioning document, its record.

    A captioning document starts with the modality placeholders of its record (expanded to their slots; no
    loss on them) followed by the record's last answer (e.g. an image and its report); its inputs are read
    when its block is built.
    """

    ids: list[int]
    source: str
    record: dict | None = None
    slots: int = 0
    """Leading modality positions (label ignored)."""
    base_dir: Path | None = None
    """Where the record's relative modality paths resolve (its file's folder)."""


def text_documents(texts: Sequence[str], sources: Sequence[str], tokenizer, batch_size: int = 2048) -> list[Document]:
    """Tokenise documents (the tokenizer's own special tokens, then EOS), in batches."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to end documents with")
    docs: list[Document] = []
    for k in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[k:k + batch_size]), add_special_tokens=True)["input_ids"]
        docs.extend(Document(ids + [eos], src) for ids, src in zip(enc, sources[k:k + batch_size]))
    return docs


def caption_document(record: dict, source: str, processor, base_dir: Path | None = None) -> Document:
    """A conversation record with modality inputs and a final answer -> a captioning document.

    Raises:
        ConversationError: no modality input, no final answer, or a modality the model lacks.
    """
    from ..errors import ConversationError

    mods = record.get("modalities") or {}
    if not isinstance(mods, dict) or not mods:
        raise ConversationError(source, "a captioning document needs modality inputs")
    conv = record.get("conversations") or []
    if not conv or str(conv[-1].get("from", "")).lower() not in ("gpt", "assistant"):
        raise ConversationError(source, "a captioning document needs a final answer (the report)")
    tokens = processor.encoder.modality_tokens
    ids: list[int] = []
    for name, value in mods.items():
        if name not in tokens:
            raise ConversationError(source, f"modality '{name}' is not configured in this model "
                                            f"(configured: {sorted(tokens)})")
        n = len(value) if isinstance(value, list) else 1
        ids.extend([tokens[name].token_id] * (tokens[name].slots * n))
    tok = processor.encoder.tok
    text = tok(str(conv[-1]["value"]), add_special_tokens=False)["input_ids"]
    if not text:
        raise ConversationError(source, "empty report")
    return Document(ids + text + [tok.eos_token_id], source, record, slots=len(ids), base_dir=base_dir)


class DocumentBlockDataset(Dataset):
    """Pretraining documents packed into blocks of ``block_size`` tokens; the loss is on every text token.

    Args:
        docs: the documents, in order.
        block_size: tokens per block (``data.max_length``).
        packing: ``concat`` (attention across documents), ``neat`` (positions and attention restart at each
            document) or ``none`` (one document per sample, cut into ``block_size`` pieces).
        processor: loads a captioning document's inputs (and names the pad token).
        name: display name.
    """

    def __init__(self, docs: list[Document], block_size: int, packing: PackingMode, processor, name: str = "text"):
        if packing not in ("none", "concat", "neat"):
            raise ValueError(f"unknown packing '{packing}'")
        if not docs:
            raise ValueError(f"{name}: no documents")
        self.docs, self.block_size, self.packing = docs, block_size, packing
        self.processor, self.name = processor, name
        self.failed: dict[int, dict] = {}
        if packing == "none":
            self.blocks = [[Piece(d, s, min(s + block_size, len(doc.ids)))]
                           for d, doc in enumerate(docs) for s in range(0, len(doc.ids), block_size)
                           if doc.record is None or s == 0]
        else:
            self.blocks = plan_stream([len(d.ids) for d in docs], block_size, [d.record is not None for d in docs])
        self.tokens = sum(p.length for b in self.blocks for p in b)

    def __len__(self) -> int:
        return len(self.blocks)

    def fill(self) -> float:
        """Fraction of block tokens that hold a document."""
        return self.tokens / (len(self.blocks) * self.block_size)

    def __getitem__(self, idx: int) -> dict:
        pieces, errors = [], []
        for p in self.blocks[idx]:
            doc = self.docs[p.doc]
            ids = torch.tensor(doc.ids[p.start:p.end])
            labels = ids.clone()
            labels[: max(0, doc.slots - p.start)] = IGNORE_INDEX  # modality positions are inputs, not targets
            sample = {"input_ids": ids, "labels": labels, "items": {}}
            if doc.record is not None:
                try:
                    sample["items"] = self.processor._modality_items(doc.record, doc.source, doc.base_dir)
                except InvalidInputError as e:
                    errors.append(e.to_record())
                    if p.doc not in self.failed:
                        self.failed[p.doc] = errors[-1]
                        log.warning("skipping document: %s", e)
                    continue
            pieces.append(sample)
        if not pieces:  # only captioning documents that failed: an all-padding block with no loss
            pad = torch.full((1,), self.processor.pad_token_id)
            pieces = [{"input_ids": pad, "labels": torch.full((1,), IGNORE_INDEX), "items": {}}]
        out = concat_samples(pieces, neat=self.packing == "neat")
        if errors:
            out["load_errors"] = errors
        return out
