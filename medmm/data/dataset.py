"""Conversation datasets, the weighted mixture, the resumable batch sampler and collation.

Data order is a pure function of (seed, epoch, rank, micro-step), so ``--resume`` replays exactly
the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from ..errors import ConversationError, InvalidInputError
from ..utils import read_jsonl
from .conversation import IGNORE_INDEX, ConversationEncoder

log = logging.getLogger(__name__)


class Processor:
    """Turns a record into a model sample and a list of samples into a batch.

    Holds the conversation encoder and one input loader per configured modality.
    """

    def __init__(self, encoder: ConversationEncoder, loaders: dict, pad_token_id: int):
        self.encoder = encoder
        self.loaders = loaders
        self.pad_token_id = pad_token_id

    def _modality_items(self, record: dict, source: str, base_dir: Path | None) -> dict[str, list]:
        mods = record.get("modalities") or {}
        if not isinstance(mods, dict):
            raise ConversationError(source, "'modalities' must be a mapping {name: value or [values]}")
        items: dict[str, list] = {}
        for name, value in mods.items():
            if name not in self.loaders:
                raise ConversationError(source, f"modality '{name}' is not configured in this model "
                                                f"(configured: {sorted(self.loaders)})")
            values = value if isinstance(value, list) else [value]
            items[name] = [self.loaders[name].load(v, base_dir) for v in values]
        return items

    def process(self, record: dict, base_dir: Path | None = None, source: str = "<record>") -> dict:
        """Training sample: input_ids, labels, modality items."""
        items = self._modality_items(record, source, base_dir)
        ids, labels = self.encoder.encode(record.get("conversations"), {k: len(v) for k, v in items.items()}, source)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "items": items, "id": record.get("id")}

    def sample_length(self, record: dict, source: str = "<record>") -> int:
        """Tokens of :meth:`process`'s sample, from the conversation alone (no modality input is read)."""
        mods = record.get("modalities") or {}
        if not isinstance(mods, dict):
            raise ConversationError(source, "'modalities' must be a mapping {name: value or [values]}")
        counts = {k: len(v) if isinstance(v, list) else 1 for k, v in mods.items()}
        return len(self.encoder.encode(record.get("conversations"), counts, source)[0])

    def process_pair(self, record: dict, base_dir: Path | None = None, source: str = "<record>") -> dict:
        """Alignment sample: the modality items and the token ids of the last answer (the report) alone."""
        items = self._modality_items(record, source, base_dir)
        if sum(len(v) for v in items.values()) != 1:
            raise ConversationError(source, "an alignment record needs exactly one modality input")
        conv = record.get("conversations") or []
        if not conv or str(conv[-1].get("from", "")).lower() not in ("gpt", "assistant"):
            raise ConversationError(source, "an alignment record needs a final answer (the report)")
        ids = self.encoder.tok(str(conv[-1]["value"]), add_special_tokens=False)["input_ids"][: self.encoder.max_length]
        if not ids:
            raise ConversationError(source, "empty report")
        return {"input_ids": torch.tensor(ids), "items": items, "id": record.get("id")}

    def process_prompt(self, record: dict, base_dir: Path | None = None, source: str = "<request>") -> dict:
        """Generation request: the conversation must end with a human turn."""
        items = self._modality_items(record, source, base_dir)
        ids = self.encoder.encode_prompt(record.get("conversations"), {k: len(v) for k, v in items.items()}, source)
        return {"input_ids": torch.tensor(ids), "items": items, "id": record.get("id")}

    def collate(self, samples: list[dict], padding_side: str = "right", pad_missing_modalities: bool = False) -> dict:
        """Pad to the longest sample; stack modality items in (sample, position) order."""
        n = max(s["input_ids"].shape[0] for s in samples)
        B = len(samples)
        input_ids = torch.full((B, n), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, n), dtype=torch.long)
        labels = torch.full((B, n), IGNORE_INDEX, dtype=torch.long)
        for i, s in enumerate(samples):
            L = s["input_ids"].shape[0]
            sl = slice(n - L, n) if padding_side == "left" else slice(0, L)
            input_ids[i, sl] = s["input_ids"]
            attention_mask[i, sl] = 1
            if "labels" in s:
                labels[i, sl] = s["labels"]
        modality_inputs: dict[str, dict] = {}
        for name, loader in self.loaders.items():
            items = [it for s in samples for it in s["items"].get(name, [])]
            if items:
                modality_inputs[name] = loader.collate(items)
            elif pad_missing_modalities:
                modality_inputs[name] = {**loader.collate([loader.dummy()]), "dummy": True}
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "modality_inputs": modality_inputs}
        if any("labels" in s for s in samples):
            batch["labels"] = labels
        if "position_ids" in samples[0]:
            # A neat-packed batch (medmm.data.packing): positions restart at each document, padding forms one
            # more document, and the model builds the block-diagonal mask from the positions, so no 2D mask.
            position_ids = torch.arange(n).repeat(B, 1)
            for i, s in enumerate(samples):
                L = s["position_ids"].shape[0]
                position_ids[i, :L] = s["position_ids"]
                position_ids[i, L:] = torch.arange(n - L)
            batch["position_ids"] = position_ids
            del batch["attention_mask"]
        if any("load_errors" in s for s in samples):
            # records that failed to load on the way to these samples; they travel with the batch because a
            # DataLoader worker's copy of the dataset is not the trainer's (pop before the forward pass)
            batch["load_errors"] = [e for s in samples for e in s.get("load_errors", [])]
        return batch


class ConversationDataset(Dataset):
    """A conversation JSONL file. Relative modality paths resolve against the file's folder.

    A record that fails to load (corrupt DICOM, invalid SMILES, bad conversation) is logged once
    and replaced by the next readable record, so every rank keeps the same number of steps. The sample
    returned carries the failures met on its way under ``load_errors`` (error records naming the file and
    line), so they reach ``errors.jsonl`` from DataLoader worker processes too.
    """

    def __init__(self, path: str | Path, processor: Processor, name: str | None = None, max_retries: int = 16,
                 mode: str = "sft"):
        if mode not in ("sft", "align"):
            raise ValueError(f"unknown dataset mode {mode}")
        self.mode = mode
        self.path = Path(path)
        self.records = read_jsonl(self.path)
        if not self.records:
            raise InvalidInputError(self.path, "no records")
        self.processor = processor
        self.name = name or self.path.stem
        self.max_retries = max_retries
        self.failed: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, idx: int) -> dict:
        errors: list[dict] = []
        for k in range(self.max_retries):
            j = (idx + k) % len(self.records)
            rec = self.records[j]
            source = f"{self.path}:{j + 1} (id={rec.get('id')})"
            try:
                fn = self.processor.process if self.mode == "sft" else self.processor.process_pair
                sample = fn(rec, self.path.parent, source)
                sample["load_errors"] = errors
                return sample
            except InvalidInputError as e:
                errors.append(e.to_record())
                if j not in self.failed:
                    self.failed[j] = errors[-1]
                    log.warning("skipping record: %s", e)
        raise InvalidInputError(self.path, f"{self.max_retries} consecutive records failed to load")


class MixtureDataset(Dataset):
    """Several datasets sampled with relative weights; index = flat position over the components."""

    def __init__(self, datasets: list[Dataset], weights: list[float]):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("a mixture needs one weight per dataset")
        self.datasets = datasets
        self.weights = [w / sum(weights) for w in weights]
        self.offsets = [0]
        for d in datasets:
            self.offsets.append(self.offsets[-1] + len(d))

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, flat: int) -> dict:
        for d, (lo, hi) in enumerate(zip(self.offsets[:-1], self.offsets[1:])):
            if lo <= flat < hi:
                return self.datasets[d][flat - lo]
        raise IndexError(flat)

    def epoch_order(self, epoch: int, seed: int, epoch_size: int | None = None) -> list[int]:
        """Flat indices of one mixture epoch: each dataset drawn in proportion to its weight."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        size = epoch_size or len(self)
        counts = [int(round(w * size)) for w in self.weights]
        order: list[int] = []
        for d, c in enumerate(counts):
            n = len(self.datasets[d])
            reps = math.ceil(c / n) if c else 0
            perm = torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[:c] if reps else torch.tensor([])
            order.extend((perm.long() + self.offsets[d]).tolist())
        shuffle = torch.randperm(len(order), generator=g).tolist()
        return [order[i] for i in shuffle]


class ResumableBatchSampler(Sampler[list[int]]):
    """Infinite micro-batches for one rank, starting at micro-step ``start``; a pure function of the seed."""

    def __init__(self, mixture: MixtureDataset, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, epoch_size: int | None = None, start: int = 0):
        self.mixture, self.mbs, self.rank, self.world = mixture, micro_batch_size, rank, world_size
        self.seed, self.epoch_size, self.start = seed, epoch_size, start
        per_rank = len(mixture.epoch_order(0, seed, epoch_size)) // world_size
        self.batches_per_epoch = per_rank // micro_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"an epoch of {per_rank} samples per rank holds no micro-batch of {micro_batch_size}")

    def batch_at(self, micro_step: int) -> list[int]:
        epoch, b = divmod(micro_step, self.batches_per_epoch)
        order = self.mixture.epoch_order(epoch, self.seed, self.epoch_size)[self.rank:: self.world]
        return order[b * self.mbs: (b + 1) * self.mbs]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        cache_epoch, order = -1, []
        while True:
            epoch, b = divmod(step, self.batches_per_epoch)
            if epoch != cache_epoch:
                order = self.mixture.epoch_order(epoch, self.seed, self.epoch_size)[self.rank:: self.world]
                cache_epoch = epoch
            yield order[b * self.mbs: (b + 1) * self.mbs]
            step += 1

    def __len__(self) -> int:  # one epoch; the iterator itself is infinite
        return self.batches_per_epoch


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a conversation JSONL file (errors name the file and line)."""
    return read_jsonl(path)
