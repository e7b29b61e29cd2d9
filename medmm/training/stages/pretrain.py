"""``trainer.stage: pretrain``: continued pretraining on in-domain text (the founding recipe's first stage).

Data: ``data.datasets`` with ``format: text``: JSONL files with a ``text`` field or ``.txt`` files (one document per
non-empty line), files or folders, several with mixture weights (``medmm prepare text`` selects and deduplicates
them). A ``format: conversation`` dataset adds captioning documents: each record's modality inputs followed by its
last answer (an image and its report); no loss on the modality positions.

Documents are tokenised (the tokenizer's own special tokens, then EOS) and packed into ``data.max_length`` blocks
(``medmm.data.packing``): ``data.packing: concat`` joins them with attention across documents (LLaMA-Factory's
``pt``), ``neat`` restarts positions and attention at each document, ``none`` gives each document its own padded
row. The loss is the next-token cross-entropy on every text token.

``trainer.eval_fraction`` holds out documents (a hash of their text decides, so the split is stable and exact
duplicates never straddle it). They are packed the same way and scored every ``trainer.eval_every`` steps:
``eval_loss`` (mean negative log-likelihood per token) and ``eval_ppl`` = exp(eval_loss), held-out perplexity,
in ``metrics.jsonl``. Saved: the medmm model folder, as ``sft`` saves it; a later stage's ``trainer.init_from``
carries its language model (merged or as an adapter), encoders and projectors (``medmm.training.warm_start``).
"""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path

from ...errors import ConfigError, InvalidInputError
from . import StageData, register_stage
from .sft import SFTStage

log = logging.getLogger(__name__)


def held_out_loss(model, dataset, collate, batch_size: int, rank: int = 0, world_size: int = 1) -> dict:
    """Token-weighted next-token loss of ``model`` over ``dataset`` (every rank scores its share; summed).

    Every rank runs the same number of forward passes (ZeRO-3 gathers are collective); rows past the end of
    the dataset only keep ranks in step and count nothing. In a neat-packed batch the first token of each
    document is not scored (it would be predicted from another document).

    Returns:
        ``{"eval_loss", "eval_ppl", "eval_tokens"}``.
    """
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from ...data.conversation import IGNORE_INDEX
    from ..loop import to_device

    device = next(model.parameters()).device
    n = len(dataset)
    per_rank = math.ceil(n / world_size)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for k in range(0, per_rank, batch_size):
            idx = [rank + j * world_size for j in range(k, min(k + batch_size, per_rank))]
            batch = collate([dataset[i if i < n else 0] for i in idx])
            batch.pop("load_errors", None)
            labels = batch.pop("labels")
            for r, i in enumerate(idx):
                if i >= n:
                    labels[r] = IGNORE_INDEX
            if "position_ids" in batch:
                labels = labels.masked_fill(batch["position_ids"] == 0, IGNORE_INDEX)
            batch = to_device(batch, device)
            labels = labels.to(device)
            logits = model(**batch).logits  # (B, T, V)
            for r in range(logits.shape[0]):  # row by row: a (T, V) float32 slice at a time
                tgt = labels[r, 1:]
                nll += F.cross_entropy(logits[r, :-1].float(), tgt, ignore_index=IGNORE_INDEX, reduction="sum")
                count += (tgt != IGNORE_INDEX).sum()
    model.train(was_training)
    if world_size > 1:
        dist.all_reduce(nll)
        dist.all_reduce(count)
    if count == 0:
        raise ValueError("the held-out set has no token to score")
    loss = float(nll / count)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_tokens": int(count)}


@register_stage("pretrain")
class PretrainStage(SFTStage):
    """Documents packed into blocks -> next-token cross-entropy on every text token; held-out perplexity."""

    section = None  # reads cfg.model, cfg.data (format text datasets, packing) and cfg.trainer.eval_fraction
    pad_missing_modalities = True
    metrics = ("tokens",)

    def _documents(self, x, proc) -> tuple[list, list[str]]:
        """One dataset's documents and the text that decides their split."""
        from ...data.packing import caption_document, text_documents
        from ...io.text import iter_documents
        from ...utils import read_jsonl

        if x.format == "text":
            pairs = [(s, t) for s, t in iter_documents(x.path, x.text_field) if t.strip()]
            if not pairs:
                raise InvalidInputError(x.path, "no documents")
            sources, texts = zip(*pairs)
            return text_documents(list(texts), list(sources), proc.encoder.tok), list(texts)
        path = Path(x.path)
        docs, texts = [], []
        for j, rec in enumerate(read_jsonl(path)):
            source = f"{path}:{j + 1} (id={rec.get('id')})"
            try:
                docs.append(caption_document(rec, source, proc, path.parent))
                texts.append(str(rec["conversations"][-1]["value"]))
            except InvalidInputError as e:
                self._failed.setdefault(source, e.to_record())
                log.warning("skipping record: %s", e)
        if not docs:
            raise InvalidInputError(path, "no record could be read as a captioning document")
        return docs, texts

    def build_data(self) -> StageData:
        from ...data.dataset import MixtureDataset, ResumableBatchSampler
        from ...data.packing import DocumentBlockDataset
        from ...io.text import held_out

        d, t = self.cfg.data, self.cfg.trainer
        if not d.datasets:
            raise ConfigError("data.datasets: at least one dataset is required")
        self._failed: dict[str, dict] = {}
        proc = self.medmm.processor(d.max_length, d.system_prompt)
        if any(x.format == "wds" for x in d.datasets):
            return self.build_stream(proc)
        self.datasets, eval_docs = [], []
        for x in d.datasets:
            docs, texts = self._documents(x, proc)
            name = x.name or Path(x.path).stem
            split = [held_out(text, t.eval_fraction, t.seed, purpose="train-eval") for text in texts]
            train = [doc for doc, h in zip(docs, split) if not h]
            if not train:
                raise ConfigError(f"data.datasets[{x.path}]: every document is held out (trainer.eval_fraction)")
            eval_docs.extend(doc for doc, h in zip(docs, split) if h)
            self.datasets.append(DocumentBlockDataset(train, d.max_length, d.packing, proc, name))
        mixture = MixtureDataset(self.datasets, [x.weight for x in d.datasets])
        self.collate = partial(proc.collate, pad_missing_modalities=self.pad_missing_modalities)
        self.eval_set = None
        if eval_docs:
            self.eval_set = DocumentBlockDataset(eval_docs, d.max_length, d.packing, proc, "held_out")
        elif t.eval_fraction > 0:
            log.warning("trainer.eval_fraction=%s held out no document of this corpus; no evaluation", t.eval_fraction)
        self.history: list[dict] = []

        def sampler(start: int) -> ResumableBatchSampler:
            return ResumableBatchSampler(mixture, t.micro_batch_size, self.ctx.rank, self.ctx.world_size, t.seed,
                                         d.epoch_size, start=start)

        desc = [(ds.name, len(ds.docs), f"{len(ds)} blocks", f"fill {ds.fill():.0%}") for ds in self.datasets]
        if self.eval_set is not None:
            desc.append(("held_out", len(self.eval_set.docs), f"{len(self.eval_set)} blocks"))
        return StageData(mixture, sampler, self.collate, sampler(0).batches_per_epoch, num_workers=d.num_workers,
                         pin_memory=d.pin_memory, description=f"packing={d.packing} datasets={desc}")

    def build_stream(self, proc) -> StageData:
        """``format: wds`` corpora streamed and packed on the fly: documents (a ``txt`` member, the JSON's
        ``text_field``, or a conversation sample as a captioning document) packed in windows of
        ``STREAM_PACK_WINDOW`` documents, so only a window's last block may be part-filled. Documents held out by
        ``trainer.eval_fraction`` are left out of training; no held-out evaluation is built from a stream."""
        from ...data.streaming import text_record

        d, t = self.cfg.data, self.cfg.trainer
        text_fields = {x.text_field for x in d.datasets}
        if len(text_fields) > 1:
            raise ConfigError(f"data.datasets[].text_field: streamed corpora must share one field, got {text_fields}")
        self.collate = partial(proc.collate, pad_missing_modalities=self.pad_missing_modalities)
        self.eval_set, self.history = None, []
        records = _HeldOutFilter(partial(text_record, text_field=text_fields.pop()), t.eval_fraction, t.seed)
        return self.streamed_data(_StreamDocument(proc), self.collate, records,
                                  pack=_StreamPacker(proc, d.max_length, d.packing),
                                  label=f"packing={d.packing} window={STREAM_PACK_WINDOW} ")

    def loss(self, engine, batch):
        out = engine(**batch)
        return out.loss, {"tokens": float((batch["labels"] != -100).sum())}

    def evaluate(self, model) -> dict | None:
        if self.eval_set is None:
            return None
        scores = held_out_loss(model, self.eval_set, self.collate, self.cfg.trainer.micro_batch_size, self.ctx.rank,
                               self.ctx.world_size)
        self.history.append(scores)
        return scores

    def finish(self, model, summary: dict) -> dict:
        if not self.history:
            return {}
        out = {"eval_ppl": self.history[-1]["eval_ppl"], "eval_ppl_first": self.history[0]["eval_ppl"]}
        metrics = self.ctx.output_dir / "metrics.jsonl"
        if self.ctx.is_main and metrics.exists():
            from ..plots import plot_metric_curve

            png = plot_metric_curve(metrics, "eval_ppl", self.ctx.output_dir / "eval_ppl.png",
                                    "held-out perplexity", log_scale=True)
            out["eval_ppl_plot"] = str(png) if png else None
        return out

    def load_errors(self) -> list[dict]:
        out = list(getattr(self, "_failed", {}).values())
        for ds in getattr(self, "datasets", []) + ([self.eval_set] if getattr(self, "eval_set", None) else []):
            out.extend(ds.failed.values())
        return out


STREAM_PACK_WINDOW = 64
"""Documents a streamed corpus packs together (stage pretrain, ``format: wds``)."""


class _HeldOutFilter:
    """A stream's records less the documents ``trainer.eval_fraction`` holds out (the same rule as in memory)."""

    def __init__(self, fn, fraction: float, seed: int):
        self.fn, self.fraction, self.seed = fn, fraction, seed

    def __call__(self, sample: dict, split: str | None) -> list[dict]:
        from ...io.text import held_out

        out = []
        for r in self.fn(sample, split):
            text = r["text"] if "text" in r else str((r.get("conversations") or [{}])[-1].get("value", ""))
            if not (self.fraction and held_out(text, self.fraction, self.seed, purpose="train-eval")):
                out.append(r)
        return out


class _StreamDocument:
    """A streamed record -> a :class:`~medmm.data.packing.Document` (a text document, or a captioning one)."""

    def __init__(self, proc):
        self.proc = proc

    def __call__(self, rec: dict):
        from ...data.packing import Document, caption_document

        if "text" in rec:
            tok = self.proc.encoder.tok
            ids = tok(rec["text"], add_special_tokens=True)["input_ids"]
            return Document(ids + [tok.eos_token_id], rec["source"])
        return caption_document(rec, rec["source"], self.proc)


class _DecodingProcessor:
    """The processor as :class:`~medmm.data.packing.DocumentBlockDataset` uses it, decoding shard members first."""

    def __init__(self, proc):
        self.proc, self.pad_token_id = proc, proc.pad_token_id

    def _modality_items(self, record: dict, source: str, base_dir):
        from ...data.streaming import decoded

        return self.proc._modality_items(decoded(record), source, base_dir)


class _StreamPacker:
    """Documents -> packed blocks, ``STREAM_PACK_WINDOW`` documents at a time; yields zero-argument callables that
    build each block (so a resume skips blocks without reading their inputs), and passes load failures on."""

    def __init__(self, proc, block_size: int, packing: str):
        self.proc, self.block_size, self.packing = _DecodingProcessor(proc), block_size, packing

    def __call__(self, docs):
        from ...data.packing import DocumentBlockDataset

        window = []
        for doc in docs:
            if isinstance(doc, dict):  # a record that failed to become a document: its error goes on
                yield doc
                continue
            if doc.ids:
                window.append(doc)
            if len(window) == STREAM_PACK_WINDOW:
                ds = DocumentBlockDataset(window, self.block_size, self.packing, self.proc, "stream")
                yield from (partial(ds.__getitem__, i) for i in range(len(ds)))
                window = []
