"""pycocoevalcap's BLEU-1..4, METEOR 1.5, ROUGE-L and CIDEr-D over a corpus, recomputable on any resample.

The report-generation literature (R2Gen, Chen et al. 2020, and the papers after it) scores with the
COCO caption toolkit: ``Bleu(4)``, ``Meteor()``, ``Rouge()`` on whitespace-tokenised strings
(R2Gen's ``modules/metrics.py::compute_scores``) and ``Cider()`` (CIDEr-D). :class:`CocoCorpus` takes the
per-document statistics from pycocoevalcap's own code once, then aggregates them for any multiset of
documents ``idx`` exactly as pycocoevalcap would score that corpus:

* BLEU: per-document ``testlen``, ``reflen`` (the ``closest`` option; one reference), clipped n-gram
  matches and guesses from ``pycocoevalcap.bleu.bleu_scorer.cook_test``; summed, then pycocoevalcap's
  corpus formula (its ``tiny``/``small`` constants and brevity penalty);
* METEOR: per-document statistics from the METEOR 1.5 jar (``SCORE`` lines), aggregated by the jar
  itself (an ``EVAL`` line over the resampled statistics) - the corpus score is not a mean of segments;
* ROUGE-L: pycocoevalcap's per-document score (beta 1.2), averaged;
* CIDEr-D: document frequencies over the resampled references (a document drawn twice counts twice, as
  it would in a corpus holding it twice), ``log(len(corpus))`` as the reference length, tf-idf vectors,
  clipped cosine, the Gaussian length penalty (sigma 6, on the bigram count, as the reference code
  measures length) and the factor 10, vectorised over flat n-gram tables so a resample costs milliseconds.

``tests/test_bench_report.py`` checks every number against pycocoevalcap's scorers, on the full corpus and on
a resample with repeated documents. METEOR needs Java; without it ``meteor`` is ``None`` and
``meteor_unavailable`` says why.
"""

from __future__ import annotations

import math
import shutil

import numpy as np

__all__ = ["CocoCorpus"]

_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap.bleu.bleu_scorer's constants
_CIDER_N, _CIDER_SIGMA = 4, 6.0


class _MeteorJar:
    """One METEOR 1.5 JVM (pycocoevalcap's jar and flags): statistics per segment, ``EVAL`` over any list."""

    def __init__(self):
        from pycocoevalcap.meteor.meteor import Meteor

        self._m = Meteor()

    def stats(self, hypothesis: str, references: list[str]) -> str:
        return self._m._stat(hypothesis, references)  # the SCORE line pycocoevalcap's compute_score sends

    def evaluate(self, stats: list[str]) -> float:
        """The jar's corpus score over these segment statistics (what ``Meteor.compute_score`` returns)."""
        p = self._m.meteor_p
        p.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
        p.stdin.flush()
        for _ in stats:  # one score per segment, then the corpus score
            p.stdout.readline()
        return float(p.stdout.readline().strip())

    def close(self) -> None:
        p = self._m.meteor_p
        if p.poll() is None:
            p.stdin.close()
            p.kill()
            p.wait()


class CocoCorpus:
    """Paired hypotheses and references (one each, already tokenised and space-separated).

    Args:
        hypotheses: generated texts, one per document.
        references: reference texts, one per document.
        meteor: start the METEOR jar (needs ``java``); ``False`` reports ``meteor`` as ``None``.

    ``stat(idx)`` returns ``bleu1..bleu4, meteor, rougeL, cider`` for the documents ``idx`` (repeats allowed);
    call :meth:`close` (or use ``with``) to stop the JVM.
    """

    def __init__(self, hypotheses: list[str], references: list[str], meteor: bool = True):
        from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test
        from pycocoevalcap.rouge.rouge import Rouge

        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
        self.n = len(references)
        # BLEU: (N, 10) = testlen, reflen, guess1..4, correct1..4
        rows = []
        for h, r in zip(hypotheses, references):
            c = cook_test(h, cook_refs([r]))
            reflen = min((abs(x - c["testlen"]), x) for x in c["reflen"])[1]  # option "closest"
            rows.append([c["testlen"], reflen, *c["guess"], *c["correct"]])
        self._bleu = np.asarray(rows, dtype=np.float64).reshape(-1, 10)
        rouge = Rouge()
        self._rouge = np.asarray([rouge.calc_score([h], [r]) for h, r in zip(hypotheses, references)],
                                 dtype=np.float64)
        self._cider_setup(hypotheses, references)
        self.meteor_unavailable: str | None = None
        self._jar: _MeteorJar | None = None
        self._meteor_stats: list[str] = []
        if not meteor:
            self.meteor_unavailable = "METEOR switched off"
        elif shutil.which("java") is None:
            self.meteor_unavailable = "java not found (METEOR 1.5 runs on the JVM)"
        else:
            self._jar = _MeteorJar()
            self._meteor_stats = [self._jar.stats(h, [r]) for h, r in zip(hypotheses, references)]

    # ------------------------------------------------------------------ CIDEr-D
    def _cider_setup(self, hyps: list[str], refs: list[str]) -> None:
        from pycocoevalcap.cider.cider_scorer import precook

        vocab: dict[tuple, int] = {}
        hyp_counts = [{vocab.setdefault(g, len(vocab)): float(c) for g, c in precook(t, _CIDER_N).items()} for t in hyps]
        ref_counts = [{vocab.setdefault(g, len(vocab)): float(c) for g, c in precook(t, _CIDER_N).items()} for t in refs]
        order = np.zeros(len(vocab), dtype=np.int64)
        for g, j in vocab.items():
            order[j] = len(g) - 1
        self._V = len(vocab)

        def entries(counts: list[dict[int, float]]):  # flat (doc, n-gram, count) triples of every document
            doc = np.asarray([i for i, d in enumerate(counts) for _ in d], dtype=np.int64)
            gram = np.asarray([g for d in counts for g in d], dtype=np.int64)
            tf = np.asarray([c for d in counts for c in d.values()], dtype=np.float64)
            return doc, gram, tf, doc * _CIDER_N + order[gram]  # the last: a (doc, order) cell for bincount

        self._h = entries(hyp_counts)
        self._r = entries(ref_counts)
        # n-grams a document's hypothesis and reference share: the only terms of the clipped dot product
        common = [(i, g, h[g], ref_counts[i][g]) for i, h in enumerate(hyp_counts) for g in h if g in ref_counts[i]]
        c_doc = np.asarray([c[0] for c in common], dtype=np.int64)
        c_gram = np.asarray([c[1] for c in common], dtype=np.int64)
        c_h = np.asarray([c[2] for c in common], dtype=np.float64)
        c_r = np.asarray([c[3] for c in common], dtype=np.float64)
        self._c = (c_gram, np.minimum(c_h, c_r) * c_r, c_doc * _CIDER_N + order[c_gram])
        # the reference code's "length" counts bigrams (its n-gram index 1)
        self._len_h = np.asarray([max(len(t.split()) - 1, 0) for t in hyps], dtype=np.float64)
        self._len_r = np.asarray([max(len(t.split()) - 1, 0) for t in refs], dtype=np.float64)

    def _cider(self, counts: np.ndarray) -> float:
        """Mean CIDEr-D over a corpus holding document i ``counts[i]`` times."""
        m = counts.sum()
        if m == 0:
            return float("nan")
        cells = self.n * _CIDER_N
        r_doc, r_gram, r_tf, r_cell = self._r
        df = np.bincount(r_gram, weights=counts[r_doc], minlength=self._V)  # (V,) document frequency (ref n-gram sets)
        w = math.log(float(m)) - np.log(np.maximum(1.0, df))  # (V,) idf; >= 0 since df <= m
        h_doc, h_gram, h_tf, h_cell = self._h
        nh = np.sqrt(np.bincount(h_cell, weights=(h_tf * w[h_gram]) ** 2, minlength=cells)).reshape(self.n, _CIDER_N)
        nr = np.sqrt(np.bincount(r_cell, weights=(r_tf * w[r_gram]) ** 2, minlength=cells)).reshape(self.n, _CIDER_N)
        c_gram, c_weight, c_cell = self._c
        # min(tf_h w, tf_r w) * tf_r w = w^2 min(tf_h, tf_r) tf_r, as w >= 0
        dot = np.bincount(c_cell, weights=w[c_gram] ** 2 * c_weight, minlength=cells).reshape(self.n, _CIDER_N)
        both = (nh != 0) & (nr != 0)
        val = np.where(both, dot / np.where(both, nh * nr, 1.0), dot)  # (N, 4) clipped cosine per order
        delta = self._len_h - self._len_r
        val = val * np.exp(-(delta**2) / (2 * _CIDER_SIGMA**2))[:, None]
        score = val.mean(axis=1) * 10.0  # (N,) mean over orders, one reference, times 10
        return float((counts * score).sum() / m)

    # ------------------------------------------------------------------ all metrics
    def _bleu_scores(self, idx: np.ndarray) -> list[float]:
        tot = self._bleu[idx].sum(axis=0)
        testlen, reflen, guess, correct = tot[0], tot[1], tot[2:6], tot[6:10]
        out, b = [], 1.0
        for k in range(4):
            b *= (float(correct[k]) + _TINY) / (float(guess[k]) + _SMALL)
            out.append(b ** (1.0 / (k + 1)))
        ratio = (testlen + _TINY) / (reflen + _SMALL)
        if ratio < 1:
            out = [x * math.exp(1 - 1 / ratio) for x in out]
        return out

    def stat(self, idx: np.ndarray) -> dict[str, float | None]:
        """All metrics on the documents ``idx`` (an int array; repeats allowed)."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            return {k: None for k in ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rougeL", "cider")}
        b = self._bleu_scores(idx)
        out: dict[str, float | None] = {f"bleu{k + 1}": float(b[k]) for k in range(4)}
        out["meteor"] = self._jar.evaluate([self._meteor_stats[i] for i in idx]) if self._jar else None
        out["rougeL"] = float(self._rouge[idx].mean())
        out["cider"] = self._cider(np.bincount(idx, minlength=self.n).astype(np.float64))
        return out

    def per_document(self) -> dict[str, np.ndarray]:
        """Per-document ROUGE-L and sentence BLEU-4 (pycocoevalcap's per-image list), for item rows."""
        bl = self._bleu
        tiny, small = _TINY, _SMALL
        b = np.ones(self.n)
        for k in range(4):
            b = b * (bl[:, 6 + k] + tiny) / (bl[:, 2 + k] + small)
        bleu4 = b ** 0.25
        ratio = (bl[:, 0] + tiny) / (bl[:, 1] + small)
        bleu4 = np.where(ratio < 1, bleu4 * np.exp(1 - 1 / np.where(ratio < 1, ratio, 1.0)), bleu4)
        return {"rougeL": self._rouge.copy(), "bleu4": bleu4}

    def close(self) -> None:
        if self._jar is not None:
            self._jar.close()
            self._jar = None

    def __enter__(self) -> CocoCorpus:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # a forgotten close() must not leave a JVM behind
        try:
            self.close()
        except Exception:
            pass
