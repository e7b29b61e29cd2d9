"""Report-generation metrics, computed by the reference packages the field reports with.

* BLEU-1..4: sacrebleu corpus BLEU with ``max_ngram_order=n`` (no smoothing, ``13a`` tokenizer);
* ROUGE-L: Google's ``rouge-score`` (F-measure, stemming), averaged over reports;
* METEOR: the METEOR 1.5 jar shipped in ``pycocoevalcap`` (needs Java; reported as None with the
  reason when Java is missing, never silently dropped);
* CIDEr-D: ``pycocoevalcap`` (the captioning reference implementation; IDF over the references).
"""

from __future__ import annotations

import shutil


def _coco_tokenize(texts: list[str]) -> list[str]:
    """Lower-case, punctuation split off (what pycocoevalcap's PTB tokenizer does, without Java)."""
    import re

    return [" ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", t.lower())) for t in texts]


def report_metrics(predictions: list[str], references: list[str], meteor: bool = True) -> dict:
    """Corpus metrics over paired generated and reference reports (``meteor=False`` skips the JVM)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not references:
        return {"count": 0}
    out: dict = {"count": len(references)}
    for n in (1, 2, 3, 4):
        bleu = sacrebleu.metrics.BLEU(max_ngram_order=n, smooth_method="none", effective_order=False)
        out[f"bleu{n}"] = bleu.corpus_score(predictions, [references]).score / 100.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    out["rougeL"] = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(references)
    gts = {i: [r] for i, r in enumerate(_coco_tokenize(references))}
    res = {i: [p if p.strip() else "empty"] for i, p in enumerate(_coco_tokenize(predictions))}
    from pycocoevalcap.cider.cider import Cider

    out["cider"] = float(Cider().compute_score(gts, res)[0])
    if not meteor:
        out["meteor"] = None
    elif shutil.which("java"):
        from pycocoevalcap.meteor.meteor import Meteor

        m = Meteor()
        try:
            out["meteor"] = float(m.compute_score(gts, res)[0])
        finally:  # stop the JVM
            m.meteor_p.stdin.close()
            m.meteor_p.kill()
            m.meteor_p.wait()
    else:
        out["meteor"] = None
        out["meteor_unavailable"] = "java not found (METEOR 1.5 runs on the JVM)"
    return out
