"""``report``: radiology report generation, scored as the papers score it.

Data: conversation JSONL whose last gpt turn is the reference report. Predictions: ``{"id", "prediction",
"reference"}`` rows.

``--protocol r2gen`` (default) is the protocol of R2Gen (Chen et al., EMNLP 2020,
github:zhjohnchan/R2Gen) and the report-generation papers that copy its tables:

1. both texts go through R2Gen's report cleaning for the dataset (``--dataset iu_xray`` or ``mimic_cxr``;
   :func:`clean_report_iu_xray`, :func:`clean_report_mimic_cxr`, reimplemented from the rules of its
   ``modules/tokenizers.py``), then white space is collapsed to single spaces - what R2Gen's
   tokenise-then-decode round trip produces. R2Gen also truncates references to ``max_seq_length`` tokens
   and maps words seen fewer than 3 times in training to ``<unk>``; neither is done here (both need
   R2Gen's training split);
2. pycocoevalcap's ``Bleu(4)``, ``Meteor()`` and ``Rouge()`` on the cleaned strings directly (no PTB
   tokenizer), as R2Gen's ``modules/metrics.py::compute_scores`` does, plus pycocoevalcap's ``Cider()``
   (CIDEr-D). See :mod:`medmm.eval.coco`.

``--protocol sacrebleu``: sacrebleu corpus BLEU-1..4 (``13a`` tokens, no smoothing) on the raw texts,
Google ``rouge-score`` ROUGE-L (stemmed, F, averaged), and METEOR/CIDEr-D from pycocoevalcap on lower-cased
word tokens. Its BLEU is not comparable with the R2Gen tables (on 382 IU X-ray reports sacrebleu's BLEU-4
read 0.070 where the R2Gen protocol read 0.049).

Metric names: ``bleu1``..``bleu4``, ``meteor``, ``rougeL``, ``cider`` (CIDEr-D keeps pycocoevalcap's scale,
which is not bounded by 1). Intervals resample documents and recompute each corpus metric.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .common import generated_rows, load_conversations, rows_from_predictions
from .registry import Benchmark, RunContext, Scored, register_benchmark

__all__ = ["ReportBenchmark", "clean_report", "clean_report_iu_xray", "clean_report_mimic_cxr"]

# R2Gen's sentence cleaner pattern, kept verbatim: inside the brackets ``:-\[`` is a range (':' to '['), so it
# also removes ; < = > ? @ and A-Z (already lower-cased), while a plain '-' survives.
_SENT_STRIP = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")


def _replace_n(text: str, old: str, new: str, times: int) -> str:
    for _ in range(times):
        text = text.replace(old, new)
    return text


def _numbering(text: str) -> str:
    """R2Gen's removal of list numbering ("1. ", ". 2. ", " 3. "...), in its order."""
    text = text.replace("1. ", "")
    for k in "2345":
        text = text.replace(f". {k}. ", ". ")
    for k in "2345":
        text = text.replace(f" {k}. ", ". ")
    return text


def _clean_sentences(text: str) -> str:
    sentences = text.strip().lower().split(". ")
    cleaned = []
    for s in sentences:
        s = s.replace('"', "").replace("/", "").replace("\\", "").replace("'", "").strip().lower()
        cleaned.append(_SENT_STRIP.sub("", s))  # empty sentences are kept, as in R2Gen (its filter never drops)
    return " . ".join(cleaned) + " ."


def clean_report_iu_xray(report: str) -> str:
    """R2Gen's IU X-ray cleaning: collapse '..', drop list numbering, split on '. ', strip punctuation."""
    return _clean_sentences(_numbering(_replace_n(report, "..", ".", 3)))


def clean_report_mimic_cxr(report: str) -> str:
    """R2Gen's MIMIC-CXR cleaning: newlines to spaces, collapse '__', double spaces and '..', then as IU X-ray."""
    t = report.replace("\n", " ")
    t = _replace_n(t, "__", "_", 7)
    t = _replace_n(t, "  ", " ", 6)
    t = _replace_n(t, "..", ".", 8)
    return _clean_sentences(_numbering(t))


def clean_report(report: str, dataset: str) -> str:
    """The cleaned report as R2Gen scores it: the dataset's cleaning, then single spaces between tokens."""
    fn = {"iu_xray": clean_report_iu_xray, "mimic_cxr": clean_report_mimic_cxr}[dataset]
    return " ".join(fn(report).split())


def _coco_words(text: str) -> str:
    """Lower-case word tokens (the sacrebleu protocol's input to METEOR/CIDEr-D)."""
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


class _SacreCorpus:
    """sacrebleu BLEU-1..4 and rouge-score ROUGE-L per document, recomputable on any resample."""

    def __init__(self, hyps: list[str], refs: list[str]):
        from rouge_score import rouge_scorer
        from sacrebleu.metrics import BLEU

        self.bleu = [BLEU(max_ngram_order=n, smooth_method="none", effective_order=False) for n in (1, 2, 3, 4)]
        # (N, 2 + 2n) per-segment statistics: lengths, then matches and totals per order
        self.stats = [np.asarray(b._extract_corpus_statistics(hyps, [refs]), dtype=np.float64) for b in self.bleu]
        sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        self.rouge = np.asarray([sc.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)], dtype=np.float64)

    def stat(self, idx: np.ndarray) -> dict:
        out = {}
        for n, (b, st) in enumerate(zip(self.bleu, self.stats), 1):
            tot = st[idx].sum(axis=0).astype(int).tolist()
            out[f"bleu{n}"] = b._compute_score_from_stats(tot).score / 100.0
        out["rougeL"] = float(self.rouge[idx].mean())
        return out


@register_benchmark
class ReportBenchmark(Benchmark):
    name = "report"
    summary = "report generation: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D under R2Gen's protocol (or sacrebleu)"
    headline = "bleu4"

    @dataclass
    class Options:
        protocol: Literal["r2gen", "sacrebleu"] = "r2gen"
        """r2gen: R2Gen's cleaning + pycocoevalcap (the papers' tables); sacrebleu: sacrebleu 13a BLEU + rouge-score."""
        dataset: Literal["iu_xray", "mimic_cxr"] = "iu_xray"
        """Which of R2Gen's cleaning functions (r2gen protocol)."""
        meteor: bool = True
        """Compute METEOR 1.5 (starts a JVM; needs java)."""
        max_new_tokens: int = 128
        """Tokens generated per report (with --checkpoint)."""

    def protocol(self, opts) -> str:
        from importlib.metadata import version

        coco = f"pycocoevalcap {version('pycocoevalcap')}"
        if opts.protocol == "r2gen":
            return (f"r2gen/{opts.dataset}: R2Gen clean_report_{opts.dataset} on prediction and reference, single "
                    f"spaces; {coco} Bleu(4) (closest ref length), Meteor 1.5 (-l en -norm), Rouge (ROUGE-L, "
                    f"beta 1.2), Cider (CIDEr-D) on the cleaned strings")
        return (f"sacrebleu: sacrebleu {version('sacrebleu')} corpus BLEU-n (13a, no smoothing) on raw text; "
                f"rouge-score ROUGE-L F (stemmed, mean); {coco} Meteor 1.5 and Cider (CIDEr-D) on lower-cased "
                f"word tokens")

    def load(self, paths: list[Path], opts) -> list[dict]:
        return load_conversations(paths)

    def generate(self, records: list[dict], opts, ctx: RunContext) -> list[dict]:
        return generated_rows(records, ctx, opts.max_new_tokens, "report")

    def from_predictions(self, predictions, records, opts, source):
        return rows_from_predictions(predictions, records, source)

    def score(self, rows: list[dict], opts) -> Scored:
        from ..coco import CocoCorpus

        preds = [r["prediction"] for r in rows]
        refs = [r["reference"] for r in rows]
        notes = []
        if opts.protocol == "r2gen":
            hyps_c = [clean_report(p, opts.dataset) for p in preds]
            refs_c = [clean_report(r, opts.dataset) for r in refs]
            coco = CocoCorpus(hyps_c, refs_c, meteor=opts.meteor)
            stat = coco.stat
            extra = [{"prediction_clean": h, "reference_clean": r} for h, r in zip(hyps_c, refs_c)]
        else:
            coco = CocoCorpus([_coco_words(p) or "empty" for p in preds], [_coco_words(r) for r in refs],
                              meteor=opts.meteor)
            sacre = _SacreCorpus(preds, refs)

            def stat(idx):
                c, s = coco.stat(idx), sacre.stat(idx)
                return {**{f"bleu{n}": s[f"bleu{n}"] for n in (1, 2, 3, 4)}, "meteor": c["meteor"],
                        "rougeL": s["rougeL"], "cider": c["cider"]}

            extra = [{} for _ in rows]
        if coco.meteor_unavailable:
            notes.append(f"meteor: {coco.meteor_unavailable}")
        per = coco.per_document()
        out = [{**r, **e, "score": round(float(per["rougeL"][i]), 4)} for i, (r, e) in enumerate(zip(rows, extra))]
        notes.append("per-item score: pycocoevalcap ROUGE-L of the item")
        return Scored(stat=stat, rows=out, notes=notes, close=coco.close)
