"""Dense retrieval: text encoders behind a registry, and a faiss inner-product index over their unit vectors.

Encoders (``index.dense_encoder``) are registered functions that fit or load one on the corpus; ``medmm list
dense-encoders`` prints them.

The hashed featuriser is why abbreviations still match: "Chol d/t Vibrio" shares character 3- and 4-grams with
"Cholera due to Vibrio", which word-level BM25 cannot see. A :class:`HashedEncoder` is ``unit(X @ W)`` with ``X``
the (N, F) sparse, l2-normalised tf-idf rows and ``W`` (F, D); the bi-encoder is the same map trained in torch as
an ``EmbeddingBag`` with per-sample weights, so training and serving compute the same vectors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from encoders.registry import Registry

from ..errors import ConfigError
from ..utils import optional_import

__all__ = ["DENSE_ENCODERS", "DenseIndex", "HashedEncoder", "HashedFeaturiser", "build_encoder", "list_encoders", "load_encoder",
           "register_encoder"]


class HashedFeaturiser:
    """Text -> sparse tf-idf rows over hashed character n-grams (within word boundaries) and word unigrams.

    Args:
        n_features: hash buckets (F).
        ngram_range: character n-gram sizes.
        idf: (F,) inverse document frequencies; None until :meth:`fit`.
    """

    def __init__(self, n_features: int = 2**16, ngram_range: tuple[int, int] = (3, 4), idf: np.ndarray | None = None):
        self.n_features = int(n_features)
        self.ngram_range = tuple(ngram_range)
        self.idf = idf
        self._fitted = None  # (texts, counts) of the last fit(), for one transform() of that same list

    def _char_counts(self, texts: list[str]):
        """(N, F) hashed ``char_wb`` n-gram counts, equal to sklearn's ``HashingVectorizer(analyzer="char_wb")``.

        ``char_wb`` n-grams never cross a space, so a text's counts are the sum of its words' counts: each distinct
        word is hashed once and texts are (N, V) word counts times (V, F) word n-grams. Medical names repeat their
        words ("fracture", "encounter"), so this costs far less than n-gramming every name one by one.
        """
        fe = optional_import("sklearn.feature_extraction.text", "retrieval")
        sp = optional_import("scipy.sparse", "retrieval")
        chars = fe.HashingVectorizer(analyzer="char_wb", ngram_range=self.ngram_range, n_features=self.n_features,
                                     alternate_sign=False, norm=None, lowercase=True)
        vocab: dict[str, int] = {}
        rows, cols = [], []
        for i, t in enumerate(texts):
            for w in t.lower().split():  # sklearn: lowercase, then whitespace-split words padded with one space
                rows.append(i)
                cols.append(vocab.setdefault(w, len(vocab)))
        if not vocab:
            return sp.csr_matrix((len(texts), self.n_features), dtype=np.float64)
        words = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(texts), len(vocab)))  # (N, V)
        return (words @ chars.transform(list(vocab))).tocsr()  # (N, V) @ (V, F)

    def _counts(self, texts: list[str]):
        fe = optional_import("sklearn.feature_extraction.text", "retrieval")
        words = fe.HashingVectorizer(analyzer="word", n_features=self.n_features, alternate_sign=False, norm=None,
                                     lowercase=True)
        x = self._char_counts(texts) + words.transform(texts)  # (N, F) counts
        x.data = 1.0 + np.log(x.data)  # sublinear tf
        return x.tocsr().astype(np.float32)

    def fit(self, texts: list[str]) -> HashedFeaturiser:
        """Learn the idf of each bucket from ``texts``.

        The counts of ``texts`` are kept for one later :meth:`transform` of the same list object: building an index
        fits on the corpus and then encodes that same corpus, and counting 97k ICD-10-CM names is most of the cost.
        """
        x = self._counts(texts)
        df = np.bincount(x.indices, minlength=self.n_features)
        self.idf = (np.log((1 + x.shape[0]) / (1 + df)) + 1).astype(np.float32)
        self._fitted = (texts, x)
        return self

    def transform(self, texts: list[str]):
        """(N, F) CSR rows, tf-idf weighted and l2-normalised."""
        if self.idf is None:
            raise RuntimeError("HashedFeaturiser: fit() first")
        fitted = self._fitted
        if fitted is not None and fitted[0] is texts:  # the corpus fit() just counted: reuse (once) its counts
            x, self._fitted = fitted[1], None
        else:
            x = self._counts(texts)
        x.data *= self.idf[x.indices]
        norms = np.sqrt(np.asarray(x.multiply(x).sum(1)).ravel())
        norms[norms == 0] = 1
        x.data /= np.repeat(norms, np.diff(x.indptr)).astype(np.float32)
        return x

    def config(self) -> dict:
        return {"n_features": self.n_features, "ngram_range": list(self.ngram_range)}


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=1, keepdims=True)
    n[n == 0] = 1
    return (v / n).astype(np.float32)


class HashedEncoder:
    """``unit(featurise(text) @ W)``: the LSA encoder and the trained bi-encoder at serving time."""

    kind = "hashed"

    def __init__(self, featuriser: HashedFeaturiser, weight: np.ndarray, name: str):
        self.featuriser = featuriser
        self.weight = np.ascontiguousarray(weight, dtype=np.float32)  # (F, D)
        self.name = name

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def encode(self, texts: list[str], batch_size: int = 8192) -> np.ndarray:
        """(N, D) float32 unit vectors."""
        fitted = self.featuriser._fitted
        if fitted is not None and fitted[0] is texts:  # the corpus just fitted: its counts are already there
            x = self.featuriser.transform(texts)  # (N, F)
            out = [np.asarray(x[i:i + batch_size] @ self.weight) for i in range(0, len(texts), batch_size)]
        else:
            out = [np.asarray(self.featuriser.transform(texts[i:i + batch_size]) @ self.weight)
                   for i in range(0, len(texts), batch_size)]
        return _unit(np.concatenate(out) if out else np.zeros((0, self.dim), np.float32))

    def save(self, folder: Path) -> dict:
        """Write ``idf.npy`` and ``weight.npy``; returns the config entries that rebuild it."""
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "idf.npy", self.featuriser.idf)
        np.save(folder / "weight.npy", self.weight)
        return {"encoder": self.name, **self.featuriser.config(), "dim": self.dim}

    @classmethod
    def load(cls, folder: Path, cfg: dict) -> HashedEncoder:
        feat = HashedFeaturiser(cfg["n_features"], tuple(cfg["ngram_range"]), np.load(folder / "idf.npy"))
        return cls(feat, np.load(folder / "weight.npy"), cfg["encoder"])


class SentenceTransformerEncoder:
    """A local sentence-transformers folder (loaded offline)."""

    kind = "sentence_transformers"

    def __init__(self, path: str):
        st = optional_import("sentence_transformers", "retrieval")
        if not Path(path).is_dir():
            raise ConfigError(f"index.dense_model: '{path}' is not a local sentence-transformers folder")
        self.path = str(path)
        self.model = st.SentenceTransformer(self.path, local_files_only=True)
        self.name = "sentence_transformers"

    @property
    def dim(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        v = self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
        return _unit(np.asarray(v, dtype=np.float32))

    def save(self, folder: Path) -> dict:
        return {"encoder": self.name, "path": self.path, "dim": self.dim}


DENSE_ENCODERS = Registry("dense encoder", config_key="index.dense_encoder")
"""name -> ``fn(texts, model_path, dim, seed) -> encoder``."""


def register_encoder(name: str, summary: str | None = None):
    """Decorator: register ``fn(texts, model_path, dim, seed) -> encoder`` (fits or loads an encoder; summary: its
    docstring's first paragraph unless given)."""
    return DENSE_ENCODERS.register(name, summary=summary)


def list_encoders() -> list[str]:
    """Registered dense encoder names."""
    return DENSE_ENCODERS.names()


def build_encoder(name: str, texts: list[str], model_path: str | None = None, dim: int = 256, seed: int = 0):
    """The dense encoder ``name``, fitted on (or loaded for) the corpus ``texts``; a ConfigError lists the
    registered ones."""
    return DENSE_ENCODERS.get(name)(texts, model_path, dim, seed)


@register_encoder("lsa")
def _lsa(texts: list[str], model_path: str | None, dim: int, seed: int) -> HashedEncoder:
    """Hashed character n-grams (tf-idf) -> truncated SVD fitted on the corpus; no training."""
    dec = optional_import("sklearn.decomposition", "retrieval")
    feat = HashedFeaturiser().fit(texts)
    # the SVD basis from a fixed sample of at most 20k documents: minutes faster on 95k ICD-10-CM names, and the
    # idf (fitted on every document) still weights the buckets. The sample is a fresh list, so the counts fit()
    # kept for ``texts`` stay for encoding the corpus right after.
    rng = np.random.default_rng(seed)
    sample = [texts[i] for i in sorted(rng.choice(len(texts), size=min(len(texts), 20000), replace=False))]
    x = feat.transform(sample)
    dim = min(dim, x.shape[0] - 1, feat.n_features - 1)
    svd = dec.TruncatedSVD(n_components=dim, algorithm="randomized", n_iter=3, random_state=seed).fit(x)
    return HashedEncoder(feat, svd.components_.T, "lsa")  # (F, D)


@register_encoder("biencoder")
def _biencoder(texts: list[str], model_path: str | None, dim: int, seed: int) -> HashedEncoder:
    """A folder of ``trainer.stage: retriever`` (``index.dense_model``): hashed n-grams and a trained projection.

    The same featuriser as ``lsa`` and a projection trained contrastively (MedCPT-style in-batch negatives)."""
    if not model_path:
        raise ConfigError("index.dense_encoder=biencoder needs index.dense_model: a folder of trainer.stage retriever")
    return load_encoder(model_path)


@register_encoder("sentence_transformers")
def _st(texts: list[str], model_path: str | None, dim: int, seed: int) -> SentenceTransformerEncoder:
    """Any local sentence-transformers folder (``index.dense_model``; extra ``retrieval``)."""
    if not model_path:
        raise ConfigError("index.dense_encoder=sentence_transformers needs index.dense_model (a local folder)")
    return SentenceTransformerEncoder(model_path)


BIENCODER_CONFIG = "retriever_config.json"


def load_encoder(folder: str | Path):
    """An encoder saved in ``folder`` (an index's ``dense/`` or a retriever-stage output folder)."""
    folder = Path(folder)
    cfg_file = folder / BIENCODER_CONFIG
    if not cfg_file.exists():
        raise FileNotFoundError(f"{folder}: not a dense encoder folder ({BIENCODER_CONFIG} missing)")
    cfg = json.loads(cfg_file.read_text())
    if cfg["encoder"] == "sentence_transformers":
        return SentenceTransformerEncoder(cfg["path"])
    return HashedEncoder.load(folder, cfg)


def save_encoder(encoder, folder: str | Path) -> dict:
    folder = Path(folder)
    cfg = encoder.save(folder)
    (folder / BIENCODER_CONFIG).write_text(json.dumps(cfg, indent=1))
    return cfg


class DenseIndex:
    """A faiss exact inner-product index (``IndexFlatIP``) over unit vectors = cosine similarity."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.index = None

    def build(self, texts: list[str]) -> DenseIndex:
        faiss = optional_import("faiss", "retrieval")
        vecs = self.encoder.encode(texts)  # (N, D)
        self.index = faiss.IndexFlatIP(vecs.shape[1])
        self.index.add(vecs)
        return self

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` per query: ``(indices (Q, k), scores (Q, k))``; -1 pads when the index is smaller."""
        q = self.encoder.encode(queries)
        scores, idx = self.index.search(q, k)
        return idx.astype(np.int64), scores.astype(np.float32)

    def save(self, folder: str | Path) -> None:
        faiss = optional_import("faiss", "retrieval")
        folder = Path(folder)
        save_encoder(self.encoder, folder)
        faiss.write_index(self.index, str(folder / "faiss.index"))

    @classmethod
    def load(cls, folder: str | Path) -> DenseIndex:
        faiss = optional_import("faiss", "retrieval")
        folder = Path(folder)
        self = cls(load_encoder(folder))
        self.index = faiss.read_index(str(folder / "faiss.index"))
        return self
