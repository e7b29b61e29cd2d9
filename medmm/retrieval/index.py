"""A retrieval index folder: documents + BM25 (bm25s) + dense (faiss), fused by reciprocal rank; loadable offline.

    medmm index build --source icd10cm --out runs/index/icd10cm
    medmm index build notes.jsonl guidelines.csv --out runs/index/notes [index.dense_encoder=biencoder ...]
    medmm index search runs/index/icd10cm "Chol d/t Vibrio cholerae" [--mode fused|bm25|dense] [-k 5]

Folder layout::

    index.json      format version, IndexConfig, sources, document count, build time
    docs.jsonl      one line per indexed passage: id, text, source, metadata (row i = document i)
    bm25/           the bm25s matrices and tokenizer vocabulary
    dense/          the dense encoder (retriever_config.json + weights) and faiss.index

:func:`augment_question` turns hits into a prompt with numbered passages; the answer's ``citations`` are those
passages (``[{"n", "id", "source", "text"}]``), each an indexed document by construction.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

from ..config import IndexConfig, config_from_dict
from ..errors import ConfigError
from ..utils import atomic_replace_dir, read_folder_config
from .bm25 import BM25Index
from .dense import DenseIndex, build_encoder
from .fusion import reciprocal_rank_fusion, tune_rrf
from .sources import Document, chunk_documents, get_source, read_documents

__all__ = ["FORMAT_VERSION", "RetrievalIndex", "attach_citations", "augment_question", "build_index", "cited_numbers",
           "load_index", "rag_requests", "unindexed_citations"]

FORMAT_VERSION = 1
CONFIG_NAME = "index.json"
MODES = ("fused", "bm25", "dense")


class RetrievalIndex:
    """Documents with their BM25 and dense indices; :meth:`search` returns hits as plain dicts."""

    def __init__(self, docs: list[Document], cfg: IndexConfig, bm25: BM25Index, dense: DenseIndex | None,
                 meta: dict | None = None, path: Path | None = None):
        self.docs = docs
        self.cfg = cfg
        self.bm25 = bm25
        self.dense = dense
        self.meta = meta or {}
        self.path = path
        self._by_id = {d.id: i for i, d in enumerate(docs)}

    def __len__(self) -> int:
        return len(self.docs)

    def get(self, doc_id: str) -> Document | None:
        """The indexed document with this id, or None."""
        i = self._by_id.get(doc_id)
        return self.docs[i] if i is not None else None

    def rank(self, queries: list[str], k: int = 10, mode: str = "fused") -> list[list[tuple[int, float]]]:
        """Per query, the top ``k`` ``(document index, score)`` of one retriever or of their fusion."""
        if mode not in MODES:
            raise ConfigError(f"retrieval mode must be one of {MODES}, got {mode!r}")
        if mode == "dense" and self.dense is None:
            raise ConfigError("this index has no dense part (index.dense_encoder: none)")
        if mode == "bm25" or (mode == "fused" and self.dense is None):
            idx, sc = self.bm25.search(queries, k)
            return [[(int(i), float(s)) for i, s in zip(r, srow) if i >= 0] for r, srow in zip(idx, sc)]
        if mode == "dense":
            idx, sc = self.dense.search(queries, k)
            return [[(int(i), float(s)) for i, s in zip(r, srow) if i >= 0] for r, srow in zip(idx, sc)]
        depth = max(k, self.cfg.depth)
        # a retriever with weight 0 cannot change the fused order within the other's top `depth` (its documents
        # score 0 and come after every one of the other's), so it is not run: tuning may fall back to one retriever
        lists, weights = [], []
        for part, w in zip((self.bm25, self.dense), self.cfg.rrf_weights):
            if w > 0:
                lists.append(part.search(queries, depth)[0])
                weights.append(w)
        return [reciprocal_rank_fusion(ls, k=self.cfg.rrf_k, weights=weights, top_k=k) for ls in zip(*lists)]

    def tune_fusion(self, queries: list[str], gold_ids: list[str], at: int = 5) -> dict:
        """Choose ``rrf_k`` and ``rrf_weights`` by recall@``at`` on (query, gold document id) pairs and save them.

        :func:`~.fusion.tune_rrf` picks the fusion on half of the queries and keeps it only if the other half
        confirms that it beats the better single retriever; otherwise the fused mode is that retriever alone. Use
        queries disjoint from any benchmark (for ICD-10-CM: :func:`~.sources.icd10cm_pairs` ``"train"``).
        """
        if self.dense is None:
            raise ConfigError("tuning the fusion needs a dense part (index.dense_encoder is none)")
        known = [(q, self._by_id[g]) for q, g in zip(queries, gold_ids) if g in self._by_id]
        if not known:
            raise ConfigError("none of the tuning queries' gold ids is in the index")
        qs = [q for q, _ in known]
        depth = max(at, self.cfg.depth)
        bi, _ = self.bm25.search(qs, depth)
        di, _ = self.dense.search(qs, depth)
        res = tune_rrf([bi.tolist(), di.tolist()], [g for _, g in known], at=at)
        self.cfg.rrf_k, self.cfg.rrf_weights = res["rrf_k"], res["rrf_weights"]
        self.meta["config"] = dataclasses.asdict(self.cfg)
        self.meta["fusion_tuning"] = res
        if self.path is not None:
            (self.path / CONFIG_NAME).write_text(json.dumps(self.meta, indent=1))
        return res

    def search(self, query: str | list[str], k: int = 5, mode: str = "fused") -> list[dict] | list[list[dict]]:
        """Hits ``{"rank", "id", "source", "text", "metadata", "score"}`` for one query (or a list per query)."""
        single = isinstance(query, str)
        ranked = self.rank([query] if single else list(query), k, mode)
        out = [[{"rank": r + 1, **self.docs[i].to_json(), "score": round(s, 6)} for r, (i, s) in enumerate(hits)]
               for hits in ranked]
        return out[0] if single else out


def build_index(out: str | Path, *, sources: list[str] = (), files: list[str | Path] = (),
                cfg: IndexConfig | None = None, text_field: str = "text", id_field: str = "id") -> RetrievalIndex:
    """Read the built-in ``sources`` and the document ``files``, chunk, index, and write the folder ``out``.

    Document ids must be unique across everything indexed (a ConfigError names the first duplicate).
    """
    cfg = cfg or IndexConfig()
    if not sources and not files:
        raise ConfigError("medmm index build: give document files or --source NAME")
    t0 = time.perf_counter()
    docs: list[Document] = []
    for s in sources:
        docs.extend(get_source(s)())
    for f in files:
        docs.extend(read_documents(f, text_field, id_field))
    docs = chunk_documents(docs, cfg.chunk_words, cfg.chunk_overlap)
    seen: set[str] = set()
    for d in docs:
        if d.id in seen:
            raise ConfigError(f"two documents have the id '{d.id}' (ids must be unique in one index)")
        seen.add(d.id)
    if not docs:
        raise ConfigError("medmm index build: no documents were read")
    texts = [d.text for d in docs]
    t_read = time.perf_counter() - t0
    bm25 = BM25Index(cfg.bm25_k1, cfg.bm25_b).build(texts)
    t_bm25 = time.perf_counter() - t0 - t_read
    dense = None
    if cfg.dense_encoder != "none":
        enc = build_encoder(cfg.dense_encoder, texts, cfg.dense_model, cfg.dense_dim, cfg.seed)
        dense = DenseIndex(enc).build(texts)
    t_dense = time.perf_counter() - t0 - t_read - t_bm25
    meta = {"format_version": FORMAT_VERSION, "config": dataclasses.asdict(cfg), "sources": list(sources),
            "files": [str(f) for f in files], "documents": len(docs),
            "by_source": {s: sum(1 for d in docs if d.source == s) for s in sorted({d.source for d in docs})},
            "build_s": {"read": round(t_read, 3), "bm25": round(t_bm25, 3), "dense": round(t_dense, 3)}}
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    line = json.JSONEncoder(ensure_ascii=False).encode  # one encoder for 97k lines, not one per json.dumps call
    with open(tmp / "docs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(line(d.to_json()) + "\n" for d in docs)
    bm25.save(tmp / "bm25")
    if dense is not None:
        dense.save(tmp / "dense")
    (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=1))
    atomic_replace_dir(tmp, out)
    return RetrievalIndex(docs, cfg, bm25, dense, meta, out)


def load_index(path: str | Path) -> RetrievalIndex:
    """An index folder written by :func:`build_index` (no network; a FileNotFoundError names a missing part)."""
    path = Path(path)
    meta = read_folder_config(path, CONFIG_NAME, FORMAT_VERSION, "medmm retrieval index")
    cfg = config_from_dict(IndexConfig, meta["config"], str(path / CONFIG_NAME))
    docs = []
    with open(path / "docs.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            docs.append(Document(r["id"], r["text"], r["source"], r.get("metadata") or {}))
    bm25 = BM25Index.load(path / "bm25")
    dense = DenseIndex.load(path / "dense") if (path / "dense").is_dir() else None
    return RetrievalIndex(docs, cfg, bm25, dense, meta, path)


def augment_question(question: str, hits: list[dict]) -> tuple[str, list[dict]]:
    """The question with the passages numbered above it, and the citations ``[{"n", "id", "source", "text"}]``.

    Modality placeholders in ``question`` (``<image>``) stay where they are: the passages go before the text.
    """
    citations = [{"n": n, "id": h["id"], "source": h["source"], "text": h["text"]} for n, h in enumerate(hits, 1)]
    if not citations:
        return question, []
    lines = ["Reference passages:"] + [f"[{c['n']}] {c['text']} (source: {c['source']}, id: {c['id']})"
                                       for c in citations]
    lines.append("Use the passages when they help and cite them by number, e.g. [1].")
    return "\n".join(lines) + "\n\n" + question, citations


_CITE = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


def cited_numbers(answer: str) -> set[int]:
    """The passage numbers an answer cites (``[1]``, ``[1, 3]``)."""
    return {int(n) for m in _CITE.finditer(answer or "") for n in m.group(1).split(",")}


def index_config(overrides: list[str]) -> IndexConfig:
    """IndexConfig from ``key=value`` overrides (``index.`` prefix optional)."""
    values: dict = {}
    for kv in overrides:
        k, sep, v = kv.partition("=")
        if not sep:
            raise ConfigError(f"index override '{kv}' is not key=value")
        k = k.removeprefix("index.")
        try:
            values[k] = json.loads(v)
        except json.JSONDecodeError:
            values[k] = v
    return config_from_dict(IndexConfig, values, "index overrides")


def _query_of(req: dict) -> str:
    if isinstance(req.get("question"), str):
        return req["question"]
    if req.get("questions"):
        return " ".join(str(q) for q in req["questions"])
    turns = [t for t in req.get("conversations") or [] if str(t.get("from", "")).lower() in ("human", "user")]
    return str(turns[-1].get("value", "")) if turns else ""


def rag_requests(requests: list[dict], index: RetrievalIndex, k: int = 3, mode: str = "fused"
                 ) -> tuple[list[dict], list[list[dict]]]:
    """Requests with retrieved passages put before their question(s), and each request's citations.

    The query is the request's text (``question``, the ``questions`` joined, or the last human turn of a
    conversation); modalities are untouched, so multimodal requests work the same. Requests are copied.
    """
    if k < 1:
        raise ConfigError(f"--rag-top-k must be >= 1, got {k}")
    queries = [_query_of(r) for r in requests]
    hits = index.search(queries, k, mode) if requests else []
    out, cites = [], []
    for req, hs in zip(requests, hits):
        req = dict(req)
        c: list[dict] = []
        if isinstance(req.get("question"), str):
            req["question"], c = augment_question(req["question"], hs)
        elif req.get("questions"):
            aug = [augment_question(str(q), hs) for q in req["questions"]]
            req["questions"], c = [a for a, _ in aug], (aug[0][1] if aug else [])
        elif req.get("conversations"):
            conv = [dict(t) for t in req["conversations"]]
            for t in reversed(conv):
                if str(t.get("from", "")).lower() in ("human", "user"):
                    t["value"], c = augment_question(str(t.get("value", "")), hs)
                    break
            req["conversations"] = conv
        out.append(req)
        cites.append(c)
    return out, cites


def attach_citations(output: dict, citations: list[dict]) -> dict:
    """``output["citations"]`` = the passages given to the model, each marked ``cited`` when the answer names it.

    Numbers the answer cites that no passage has (``[7]`` when three were given) are listed in
    ``output["citations_unresolved"]`` instead of being dropped silently (the key is absent when there are none).
    """
    answers = [output.get("answer", "")] + [a.get("answer", "") for a in output.get("answers") or []]
    named = set().union(*(cited_numbers(str(a)) for a in answers))
    output["citations"] = [{**c, "cited": c["n"] in named} for c in citations]
    unresolved = sorted(named - {c["n"] for c in citations})
    if unresolved:
        output["citations_unresolved"] = unresolved
    return output


def unindexed_citations(citations: list[dict], index: RetrievalIndex) -> list[dict]:
    """The citations that do not point to an indexed document: an unknown id, or a source or text that differs from
    the document indexed under that id. An empty list means every citation is grounded in ``index``."""
    bad = []
    for c in citations:
        doc = index.get(str(c.get("id")))
        if doc is None or doc.text != c.get("text") or doc.source != c.get("source"):
            bad.append(c)
    return bad
