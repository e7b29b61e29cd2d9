"""Answer metrics on fixed strings, checked by hand and against sacrebleu."""

import pytest
import sacrebleu

from medmm.eval.metrics import answer_metrics, normalize, recall, token_f1


def test_normalize_and_token_metrics():
    assert normalize("The Left  Lung!") == "left lung"
    assert token_f1("left lung", "the left lung") == 1.0
    assert token_f1("right lung", "left lung") == pytest.approx(0.5)
    assert recall("there is a left lung mass", "left lung") == 1.0
    assert recall("mass", "left lung") == 0.0


def test_answer_metrics():
    preds = ["yes", "No", "left lung", "brain"]
    refs = ["yes", "yes", "the left lung", "liver"]
    m = answer_metrics(preds, refs, ["CLOSED", "CLOSED", "OPEN", "OPEN"])
    assert m["count"] == 4 and m["closed_count"] == 2
    assert m["closed_accuracy"] == 0.5
    assert m["exact_match"] == 0.5
    assert m["open_recall"] == 0.5
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    with pytest.raises(ValueError):
        answer_metrics(["a"], [])
