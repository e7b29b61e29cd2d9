"""Report metrics against hand computation and the reference implementations on fixed strings."""

import math

import pytest

from medmm.eval.report_metrics import report_metrics

PRED = ["the heart is normal in size . no focal consolidation .", "there is a small left pleural effusion ."]
REF = ["heart size is normal . no focal consolidation .", "small left pleural effusion is present ."]


def test_identical_reports_score_one():
    m = report_metrics(REF, REF, meteor=False)
    for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rougeL"):
        assert m[k] == pytest.approx(1.0), k
    assert m["cider"] > 5  # CIDEr-D is scaled by 10


def test_bleu1_by_hand():
    # one sentence: clipped unigram precision 3/4 and brevity penalty exp(1 - 5/4)
    m = report_metrics(["the cat sat here"], ["the cat sat on mat"], meteor=False)
    assert m["bleu1"] == pytest.approx(0.75 * math.exp(1 - 5 / 4), abs=1e-6)


def test_matches_reference_packages():
    from nltk.translate.bleu_score import corpus_bleu
    from pycocoevalcap.bleu.bleu import Bleu

    m = report_metrics(PRED, REF, meteor=False)
    toks_p = [p.split() for p in PRED]
    toks_r = [[r.split()] for r in REF]
    for n in (1, 2, 3, 4):
        w = tuple([1.0 / n] * n)
        assert m[f"bleu{n}"] == pytest.approx(corpus_bleu(toks_r, toks_p, weights=w), abs=1e-4)
    coco, _ = Bleu(4).compute_score({i: [r] for i, r in enumerate(REF)}, {i: [p] for i, p in enumerate(PRED)},
                                   verbose=0)
    assert m["bleu1"] == pytest.approx(coco[0], abs=0.02)  # coco uses a slightly different brevity rule
    assert 0 < m["rougeL"] < 1 and m["cider"] > 0


@pytest.mark.slow  # needs java: `make test` installs it (scripts/system-deps.sh)
def test_meteor_from_the_jar():
    m = report_metrics(PRED, REF)
    assert 0.2 < m["meteor"] < 1.0
    assert report_metrics(REF, REF)["meteor"] == pytest.approx(1.0, abs=1e-3)
