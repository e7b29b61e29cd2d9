"""``medmm index``: build, query and evaluate retrieval indices.

    medmm index build [FILE ...] [--source NAME ...] --out IDX [--tune icd10cm] [key=value ...]   (medmm list sources)
    medmm index search IDX "query" [-k 5] [--mode fused|bm25|dense]
    medmm index queries --out Q.jsonl [--split test] [--limit N]       ICD-10-CM normalisation queries (leak-free)
    medmm index predict IDX --data Q.jsonl --out P.jsonl [-k 20] [--mode fused]   retriever-only predictions

``key=value`` overrides set :class:`medmm.config.IndexConfig` fields (``dense_encoder=biencoder
dense_model=runs/retriever/checkpoint``). ``predict`` writes rows that ``medmm eval normalisation --predictions``
scores.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time


def tuning_pairs(spec: str, n: int = 4000) -> tuple[list[str], list[str]]:
    """(queries, gold ids) to tune the fusion: ``icd10cm`` = a seeded sample of the training split's short names."""
    if spec == "icd10cm":
        from .sources import icd10cm_pairs

        rows = icd10cm_pairs("train")
        rows = random.Random(0).sample(rows, min(n, len(rows)))
        return [r["query"] for r in rows], [r["code"] for r in rows]
    from ..utils import read_jsonl

    rows = read_jsonl(spec)
    return [str(r["query"]) for r in rows], [str(r.get("id", r.get("code"))) for r in rows]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="medmm index", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="documents -> index folder (BM25 + dense + RRF)")
    b.add_argument("files", nargs="*", help="JSONL (text, id, source, metadata), CSV/TSV (a text column) or .txt")
    b.add_argument("--source", action="append", default=[], help="a built-in source (repeatable; medmm list sources)")
    b.add_argument("--out", required=True)
    b.add_argument("--text-field", default="text")
    b.add_argument("--id-field", default="id")
    b.add_argument("--tune", metavar="PAIRS", help="choose the fusion's rrf_k and weights by recall@5 on queries: "
                   "icd10cm (4,000 short names of the training split, never the benchmark's; half choose, half confirm) "
                   "or a JSONL of "
                   "{query, id}")
    b.add_argument("overrides", nargs="*", default=[], metavar="key=value")
    s = sub.add_parser("search", help="print the top hits of one query")
    s.add_argument("index")
    s.add_argument("query")
    s.add_argument("-k", type=int, default=5)
    s.add_argument("--mode", default="fused", choices=["fused", "bm25", "dense"])
    q = sub.add_parser("queries", help="ICD-10-CM normalisation queries: abbreviated short name -> code")
    q.add_argument("--out", required=True)
    q.add_argument("--split", default="test", choices=["test", "train"])
    q.add_argument("--limit", type=int, help="a seeded sample of this many")
    p = sub.add_parser("predict", help="retriever-only normalisation predictions (top-k codes per query)")
    p.add_argument("index")
    p.add_argument("--data", required=True, help="JSONL of {id, query, code}")
    p.add_argument("--out", required=True)
    p.add_argument("-k", type=int, default=20)
    p.add_argument("--mode", default="fused", choices=["fused", "bm25", "dense"])
    # argparse cannot mix positional files and key=value overrides: split them by '=' first
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [x for x in argv[1:] if "=" in x and not x.startswith("-")] if argv[:1] == ["build"] else []
    a = ap.parse_args([x for x in argv if x not in overrides])

    from ..utils import read_jsonl, write_jsonl
    from .index import build_index, index_config, load_index

    if a.cmd == "build":
        t0 = time.perf_counter()
        idx = build_index(a.out, sources=a.source, files=a.files, cfg=index_config(overrides),
                          text_field=a.text_field, id_field=a.id_field)
        res = {"out": a.out, "documents": len(idx), "by_source": idx.meta["by_source"]}
        if a.tune:
            res["fusion_tuning"] = idx.tune_fusion(*tuning_pairs(a.tune))
        print(json.dumps({**res, "build_s": round(time.perf_counter() - t0, 2)}))
    elif a.cmd == "search":
        for h in load_index(a.index).search(a.query, a.k, a.mode):
            print(json.dumps(h, ensure_ascii=False))
    elif a.cmd == "queries":
        from .sources import icd10cm_pairs

        rows = [{k: r[k] for k in ("id", "query", "code")} for r in icd10cm_pairs(a.split)]
        if a.limit and a.limit < len(rows):
            rows = sorted(random.Random(0).sample(rows, a.limit), key=lambda r: r["id"])
        write_jsonl(a.out, rows)
        print(json.dumps({"out": a.out, "queries": len(rows), "split": a.split}))
    elif a.cmd == "predict":
        idx = load_index(a.index)
        recs = read_jsonl(a.data)
        hits = idx.search([str(r["query"]) for r in recs], a.k, a.mode)
        write_jsonl(a.out, [{"id": r["id"], "prediction": h[0]["id"] if h else "", "candidates": [x["id"] for x in h]}
                            for r, h in zip(recs, hits)])
        print(json.dumps({"out": a.out, "predictions": len(recs), "mode": a.mode}))


if __name__ == "__main__":
    main()
