"""``normalisation``: free-text diagnosis -> ICD-10-CM code (CHIP-CDN style term normalisation): accuracy@1 and @5.

Data: JSON lines ``{"id", "query", "code"}``; ``medmm index queries --out Q.jsonl`` writes the built-in set: codes
of the held-out split (a hash of the code, never trained on by ``trainer.stage: retriever``) whose abbreviated CMS
short name ("Chol d/t Vibrio cholerae 01, biovar eltor") differs from the long name that is indexed, so no query is
the exact indexed text. (The installed ICD-10-CM packages carry no index or inclusion terms; short names are the
free-text queries we have.)

Every item first retrieves candidates from ``--index`` (``medmm index build --source icd10cm``), then:

* ``--mode retriever``: the retrieval order is the answer (no language model is run; ``--checkpoint`` is loaded
  only by ``loglik``);
* ``--mode loglik``: closed-set answering (:meth:`medmm.inference.predictor.Predictor.predict` with ``options``)
  over the ``--top-k`` candidates' descriptions; candidates are re-ranked by the model's probabilities.

``accuracy@1``: the first candidate is the gold code; ``accuracy@5``: the gold code is among the first five;
``candidate_recall``: among all candidates retrieved (the ceiling of ``loglik``).
Predictions files: rows ``{"id", "prediction", "candidates": [codes, best first]}`` (``medmm index predict``
writes them), matched to ``--data`` by id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ...errors import InvalidInputError
from ...utils import read_jsonl
from ..bootstrap import mean_statistic
from .registry import Benchmark, RunContext, Scored, register_benchmark

__all__ = ["NormalisationBenchmark"]


@register_benchmark
class NormalisationBenchmark(Benchmark):
    name = "normalisation"
    summary = "free-text diagnosis -> ICD-10-CM code: retrieve candidates, pick by retrieval or closed-set likelihood"
    headline = "accuracy@1"

    @dataclass
    class Options:
        index: str = ""
        """The retrieval index folder (``medmm index build --source icd10cm``); needed to generate."""
        mode: Literal["retriever", "loglik"] = "retriever"
        """retriever: the retrieval order answers; loglik: the model picks among the top-k candidates."""
        retrieval: Literal["fused", "bm25", "dense"] = "fused"
        """Which ranking gives the candidates."""
        top_k: int = 20
        """Candidates retrieved per query (and shown to the model in loglik mode)."""
        instruction: str = "Which ICD-10-CM description matches this diagnosis?"
        """loglik: the question put before the free-text diagnosis."""

    def protocol(self, opts) -> str:
        how = ("retrieval order" if opts.mode == "retriever"
               else f"closed-set log-likelihood over the top {opts.top_k} candidates' descriptions")
        return (f"normalisation/{opts.mode}: {opts.retrieval} retrieval, then {how}; accuracy@k = exact ICD-10-CM "
                f"code among the first k")

    def load(self, paths: list[Path], opts) -> list[dict]:
        out = []
        for path in paths:
            for i, rec in enumerate(read_jsonl(path)):
                src = f"{path}:{i + 1}"
                q, code = rec.get("query"), rec.get("code")
                if not isinstance(q, str) or not q.strip():
                    raise InvalidInputError(src, "no 'query' text")
                if not isinstance(code, str) or not code.strip():
                    raise InvalidInputError(src, "no 'code'")
                out.append({"id": rec.get("id", f"{Path(path).stem}-{i + 1}"), "question": q.strip(),
                            "reference": code.strip()})
        return out

    def generate(self, records: list[dict], opts, ctx: RunContext) -> list[dict]:
        from ...config import DecodingConfig
        from ...retrieval.index import load_index

        if not opts.index:
            raise InvalidInputError("<options>", "normalisation needs --index (a medmm index build folder)")
        idx = load_index(opts.index)
        hits = idx.search([r["question"] for r in records], opts.top_k, opts.retrieval)
        rows = [{"id": r["id"], "question": r["question"], "reference": r["reference"],
                 "candidates": [h["id"] for h in hs], "prediction": hs[0]["id"] if hs else ""}
                for r, hs in zip(records, hits)]
        if opts.mode == "retriever":
            return rows
        predictor = ctx.predictor()
        reqs, texts = [], []
        for r, hs in zip(records, hits):
            by_text: dict[str, str] = {}
            for h in hs:  # two codes may share a description: the better-ranked one stands for it
                by_text.setdefault(h["text"], h["id"])
            texts.append(by_text)
            reqs.append({"id": r["id"], "question": f"{opts.instruction}\nDiagnosis: {r['question']}",
                         "options": list(by_text)})
        outs = predictor.predict(reqs, DecodingConfig(max_new_tokens=1), ctx.batch_size)
        for row, o, by_text in zip(rows, outs, texts):
            if "error" in o:
                row.update(error=o["error"], message=o.get("message", ""))
                continue
            probs = o.get("probs") or {}
            order = sorted(by_text, key=lambda t: -float(probs.get(t, 0.0)))
            row["candidates"] = [by_text[t] for t in order]
            row["prediction"] = by_text.get(o["answer"], row["candidates"][0] if order else "")
        return rows

    def from_predictions(self, predictions, records, opts, source):
        rows = []
        by_id = {p["id"]: p for p in predictions}
        items = records if records is not None else predictions
        for r in items:
            p = by_id.get(r["id"])
            if p is None:
                raise InvalidInputError(source, f"no prediction for id {r['id']!r}")
            ref = r.get("reference", p.get("reference"))
            if ref is None:
                raise InvalidInputError(f"{source} (id={r['id']})", "no 'reference': give --data with the queries")
            row = {"id": r["id"], "question": r.get("question", p.get("question", "")), "reference": ref}
            if "error" in p:
                row.update(error=p["error"], message=p.get("message", ""))
            else:
                cands = [str(c) for c in (p.get("candidates") or [])]
                pred = str(p.get("prediction", cands[0] if cands else ""))
                row.update(prediction=pred, candidates=cands or [pred])
            rows.append(row)
        return rows

    def score(self, rows: list[dict], opts) -> Scored:
        out, at1, at5, anyk = [], [], [], []
        for r in rows:
            cands = list(r.get("candidates") or [r.get("prediction", "")])
            if r.get("prediction") and (not cands or cands[0] != r["prediction"]):
                cands = [r["prediction"]] + [c for c in cands if c != r["prediction"]]
            ok = bool(cands) and cands[0] == r["reference"]
            at1.append(float(ok))
            at5.append(float(r["reference"] in cands[:5]))
            anyk.append(float(r["reference"] in cands))
            out.append({**r, "correct": ok, "score": at5[-1], "group": r["reference"][:1]})
        return Scored(stat=mean_statistic({"accuracy@1": at1, "accuracy@5": at5, "candidate_recall": anyk}),
                      rows=out)
