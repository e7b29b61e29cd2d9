"""``trainer.stage: retriever``: a small bi-encoder trained contrastively (InfoNCE, in-batch negatives, MedCPT-style).

Section ``retriever`` (:class:`medmm.config.RetrieverStageConfig`). Pairs: ICD-10-CM short name (query) -> long name
(document) of the codes in the *train* split only (:func:`medmm.retrieval.sources.icd10cm_pairs`; the normalisation
benchmark asks about the other split), or a JSONL of ``{"query", "document"}``. Every other document of the batch
is a negative for a query (MedCPT trains its query and article encoders this way); here one encoder is shared by
queries and documents, which suits short terms on both sides.

The encoder: hashed character n-gram + word tf-idf features -> an ``EmbeddingBag`` (F, D) with the features as
per-sample weights -> unit vector; it starts from an LSA projection of the documents (``retriever.init: lsa``), so
step 0 already retrieves. Saved: ``retriever_config.json``, ``idf.npy``, ``weight.npy`` -- the folder that
``medmm index build ... dense_encoder=biencoder dense_model=OUT/checkpoint`` serves with faiss. Validation:
recall@1 of held-out training pairs against all held-out documents (``val_recall@1``, higher is better).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError, InvalidInputError
from . import Stage, StageData, register_stage, seeded_epoch_batches


class HashedBiEncoder(nn.Module):
    """Sparse tf-idf rows -> (B, D) unit vectors through one ``EmbeddingBag`` (F, D); a fixed temperature."""

    def __init__(self, n_features: int, dim: int, temperature: float, init: np.ndarray | None = None):
        super().__init__()
        self.bag = nn.EmbeddingBag(n_features, dim, mode="sum")
        if init is not None:
            with torch.no_grad():
                self.bag.weight.copy_(torch.from_numpy(np.asarray(init, dtype=np.float32)))
        else:
            nn.init.normal_(self.bag.weight, std=dim ** -0.5)
        self.temperature = temperature

    def embed(self, idx: torch.Tensor, off: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.bag(idx, off, per_sample_weights=w.to(self.bag.weight.dtype)).float(), dim=-1)

    def forward(self, q_idx, q_off, q_w, d_idx, d_off, d_w) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.embed(q_idx, q_off, q_w)  # (B, D)
        d = self.embed(d_idx, d_off, d_w)  # (B, D)
        logits = q @ d.T / self.temperature  # (B, B): query i against every document of the batch
        return F.cross_entropy(logits, torch.arange(len(q), device=q.device)), logits


def _bag(x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A CSR matrix -> EmbeddingBag inputs (indices, offsets, per-sample weights)."""
    return (torch.from_numpy(x.indices.astype(np.int64)), torch.from_numpy(x.indptr[:-1].astype(np.int64)),
            torch.from_numpy(x.data.astype(np.float32)))


def read_pairs(spec: str, split: str, test_fraction: float) -> list[tuple[str, str]]:
    """(query, document) pairs: ``icd10cm`` (the given split) or a JSONL file of ``{"query", "document"}``."""
    if spec == "icd10cm":
        from ...retrieval.sources import icd10cm_pairs

        return [(p["query"], p["long"]) for p in icd10cm_pairs(split, test_fraction)]
    from ...utils import read_jsonl

    out = []
    for i, r in enumerate(read_jsonl(spec)):
        q, d = r.get("query"), r.get("document")
        if not isinstance(q, str) or not isinstance(d, str) or not q.strip() or not d.strip():
            raise InvalidInputError(f"{spec}:{i + 1}", "a pair needs 'query' and 'document' text")
        out.append((q.strip(), d.strip()))
    return out


@register_stage("retriever")
class RetrieverStage(Stage):
    """Query-document pairs -> InfoNCE with in-batch negatives on a hashed n-gram bi-encoder."""

    section = "retriever"
    metrics = ("in_batch_acc",)
    monitor = "val_recall@1"

    def _read(self):
        if hasattr(self, "pairs"):
            return
        from ...retrieval.dense import HashedFeaturiser

        s = self.settings
        pairs = read_pairs(s.pairs, "train", s.test_fraction)
        rng = np.random.default_rng(self.cfg.trainer.seed)
        order = rng.permutation(len(pairs))
        n_val = min(s.eval_pairs, len(pairs) // 5)
        self.val = [pairs[i] for i in order[:n_val]]
        train = [pairs[i] for i in order[n_val:]]
        self.pairs = train[: s.limit] if s.limit else train
        if len(self.pairs) < 2:
            raise ConfigError(f"retriever.pairs '{s.pairs}': {len(self.pairs)} training pairs; need at least 2")
        docs = sorted({d for _, d in pairs})
        self.featuriser = HashedFeaturiser().fit(docs + [q for q, _ in self.pairs])
        self.docs = docs

    def build_model(self) -> nn.Module:
        self._read()
        s = self.settings
        init = None
        if s.init == "lsa":
            from sklearn.decomposition import TruncatedSVD

            rng = np.random.default_rng(self.cfg.trainer.seed)
            sample = [self.docs[i] for i in sorted(rng.choice(len(self.docs), min(len(self.docs), 20000), False))]
            x = self.featuriser.transform(sample)
            dim = min(s.dim, x.shape[0] - 1)
            if dim != s.dim:
                raise ConfigError(f"retriever.dim={s.dim} needs more than {s.dim} documents for init lsa")
            init = TruncatedSVD(dim, algorithm="randomized", n_iter=3, random_state=self.cfg.trainer.seed).fit(x)
            init = init.components_.T  # (F, D)
        self.model = HashedBiEncoder(self.featuriser.n_features, s.dim, s.temperature, init)
        return self.model

    def build_data(self) -> StageData:
        self._read()
        t = self.cfg.trainer
        n = len(self.pairs)
        sampler, per_epoch = seeded_epoch_batches(n, t.micro_batch_size, self.ctx.rank, self.ctx.world_size, t.seed,
                                                  "pairs")

        def collate(samples: list[tuple[str, str]]) -> dict:
            qi, qo, qw = _bag(self.featuriser.transform([q for q, _ in samples]))
            di, do, dw = _bag(self.featuriser.transform([d for _, d in samples]))
            return {"q_idx": qi, "q_off": qo, "q_w": qw, "d_idx": di, "d_off": do, "d_w": dw}

        return StageData(self.pairs, sampler, collate, per_epoch,
                         description=f"pairs={self.settings.pairs} train={n} val={len(self.val)} docs={len(self.docs)}")

    def loss(self, engine, batch):
        loss, logits = engine(**batch)
        acc = (logits.detach().argmax(1) == torch.arange(len(logits), device=logits.device)).float().mean()
        return loss, {"in_batch_acc": float(acc)}

    @torch.no_grad()
    def encode(self, model: HashedBiEncoder, texts: list[str], batch: int = 4096) -> torch.Tensor:
        dev = model.bag.weight.device
        out = []
        for i in range(0, len(texts), batch):
            idx, off, w = _bag(self.featuriser.transform(texts[i:i + batch]))
            out.append(model.embed(idx.to(dev), off.to(dev), w.to(dev)).cpu())
        return torch.cat(out)

    def evaluate(self, model) -> dict | None:
        if not self.val:
            return None
        was = model.training
        model.eval()
        docs = sorted({d for _, d in self.val})
        pos = {d: i for i, d in enumerate(docs)}
        sims = self.encode(model, [q for q, _ in self.val]) @ self.encode(model, docs).T  # (V, Nd)
        gold = torch.tensor([pos[d] for _, d in self.val])
        model.train(was)
        return {"val_recall@1": float((sims.argmax(1) == gold).float().mean())}

    def save(self, engine, model, out_dir: Path, zero_stage: int, summary: dict) -> Path | None:
        from ...retrieval.dense import HashedEncoder, save_encoder

        if zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                weight = model.bag.weight.detach().float().cpu().numpy()
        else:
            weight = model.bag.weight.detach().float().cpu().numpy()
        if not self.ctx.is_main:
            return None
        out_dir = Path(out_dir)
        cfg = save_encoder(HashedEncoder(self.featuriser, weight, "biencoder"), out_dir)
        training = {"stage": self.name, "steps": summary.get("step"), "final_loss": summary.get("loss"),
                    "pairs": self.settings.pairs, "train_pairs": len(self.pairs), "val_pairs": len(self.val),
                    "test_fraction": self.settings.test_fraction, "temperature": self.settings.temperature}
        (out_dir / "training.json").write_text(json.dumps({**cfg, **training}, indent=1))
        return out_dir

    def describe(self, model) -> str:
        return f"bi-encoder buckets={model.bag.num_embeddings:,} dim={model.bag.embedding_dim} " + super().describe(model)
