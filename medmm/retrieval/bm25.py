"""Lexical retrieval: BM25 over word tokens with ``bm25s`` (sparse matrices, saved as ``.npy`` files, no pickle)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..utils import optional_import

__all__ = ["BM25Index"]


class BM25Index:
    """A ``bm25s`` BM25 index plus the tokenizer vocabulary that queries must share.

    Args:
        k1, b: BM25 parameters.
        method: the bm25s variant (``lucene``, ``robertson``, ``atire``, ``bm25l``, ``bm25+``).
        stopwords: ``en`` or none.
    """

    def __init__(self, k1: float = 1.5, b: float = 0.75, method: str = "lucene", stopwords: str | None = "en"):
        self.params = {"k1": k1, "b": b, "method": method, "stopwords": stopwords}
        self.model = None
        self.tokenizer = None

    def _new_tokenizer(self):
        bm25s = optional_import("bm25s", "retrieval")
        return bm25s.tokenization.Tokenizer(stopwords=self.params["stopwords"] or [])

    def build(self, texts: list[str]) -> BM25Index:
        """Index ``texts`` (document i is row i)."""
        bm25s = optional_import("bm25s", "retrieval")
        self.tokenizer = self._new_tokenizer()
        ids = self.tokenizer.tokenize(texts, return_as="ids", show_progress=False)
        self.model = bm25s.BM25(k1=self.params["k1"], b=self.params["b"], method=self.params["method"])
        self.model.index(ids, show_progress=False)
        return self

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` documents per query: ``(indices (Q, k), scores (Q, k))``; -1 pads when fewer match."""
        if self.model is None:
            raise RuntimeError("BM25Index: build() or load() first")
        ids = self.tokenizer.tokenize(queries, update_vocab=False, return_as="ids", show_progress=False)
        n = self.model.scores["num_docs"]
        kk = min(k, n)
        # a query with no known token has no ids; bm25s would fail on it, so score those as empty
        empty = [i for i, q in enumerate(ids) if not q]
        safe = [q if q else [0] for q in ids]
        docs, scores = self.model.retrieve(safe, k=kk, show_progress=False, n_threads=0)
        docs, scores = np.asarray(docs, dtype=np.int64), np.asarray(scores, dtype=np.float32)
        docs[scores <= 0] = -1  # no matching term: not a hit
        for i in empty:
            docs[i] = -1
        if kk < k:
            docs = np.pad(docs, ((0, 0), (0, k - kk)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, k - kk)))
        return docs, scores

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save(str(folder), show_progress=False)
        self.tokenizer.save_vocab(str(folder))
        (folder / "medmm_bm25.json").write_text(json.dumps(self.params))

    @classmethod
    def load(cls, folder: str | Path) -> BM25Index:
        bm25s = optional_import("bm25s", "retrieval")
        folder = Path(folder)
        params = json.loads((folder / "medmm_bm25.json").read_text())
        self = cls(**params)
        self.model = bm25s.BM25.load(str(folder), show_progress=False)
        self.tokenizer = self._new_tokenizer()
        self.tokenizer.load_vocab(str(folder))
        return self
