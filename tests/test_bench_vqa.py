"""``vqa``: metrics by hand on written answers, matching predictions to data by id, and generating on VQA-RAD images."""

import json

import pytest
import torch

from medmm.errors import InvalidInputError
from medmm.eval.benchmarks.run import run_benchmark
from tests.conftest import SAMPLE

REFS = [("yes", "CLOSED"), ("no", "CLOSED"), ("left lung", "OPEN"), ("the heart", "OPEN")]
PREDS = ["Yes.", "yes", "lung, left", "An enlarged liver"]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_metrics_by_hand(tmp_path):
    preds = _write(tmp_path / "p.jsonl", [{"id": f"q{i}", "prediction": p, "reference": r, "answer_type": t}
                                          for i, (p, (r, t)) in enumerate(zip(PREDS, REFS))])
    res = run_benchmark("vqa", tmp_path / "o", predictions=preds, resamples=300, progress=False, html=False)
    m = {k: v["value"] for k, v in res["metrics"].items()}
    assert m["exact_match"] == 0.25  # only "Yes." == "yes" after normalisation
    assert m["closed_accuracy"] == 0.5
    # open recall: "left lung" -> 2/2 tokens present; "the heart" -> "heart" (article dropped) absent -> 0
    assert m["open_recall"] == 0.5
    # token F1 (bags of normalised tokens): "yes"/"yes" 1, "yes"/"no" 0, "lung left"/"left lung" 1, 0
    assert m["token_f1"] == pytest.approx((1 + 0 + 1 + 0) / 4)
    lo, hi = res["metrics"]["exact_match"]["ci95"]
    assert 0 <= lo <= 0.25 <= hi <= 1


def test_predictions_matched_to_data_by_id(tmp_path):
    recs = [{"id": f"q{i}", "modalities": {"image": "img.jpg"}, "answer_type": t,
             "conversations": [{"from": "human", "value": f"<image>\nQuestion {i}?"}, {"from": "gpt", "value": r}]}
            for i, (r, t) in enumerate(REFS)]
    data = _write(tmp_path / "d.jsonl", recs)
    preds = _write(tmp_path / "p.jsonl", [{"id": f"q{i}", "answer": p} for i, p in reversed(list(enumerate(PREDS)))])
    res = run_benchmark("vqa", tmp_path / "o", predictions=preds, data=[data], resamples=0, progress=False, html=False)
    assert res["metrics"]["exact_match"]["value"] == 0.25 and res["source"]["data"] == [str(data)]
    rows = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert rows[0]["question"] == "Question 0?" and rows[2]["group"] == "open"
    with pytest.raises(InvalidInputError, match="no prediction"):
        run_benchmark("vqa", tmp_path / "o", predictions=_write(tmp_path / "p2.jsonl", [{"id": "q0", "answer": "y"}]),
                      data=[data], resamples=0, progress=False, html=False)
    with pytest.raises(InvalidInputError, match="match no record"):
        run_benchmark("vqa", tmp_path / "o", data=[data], resamples=0, progress=False, html=False,
                      predictions=_write(tmp_path / "p3.jsonl", [{"id": f"q{i}", "answer": "y"} for i in range(5)]))
    with pytest.raises(InvalidInputError, match="appears twice"):
        run_benchmark("vqa", tmp_path / "o", resamples=0, progress=False, html=False,
                      predictions=_write(tmp_path / "p4.jsonl", [{"id": "a", "answer": "y", "reference": "y"}] * 2))


@pytest.mark.slow
def test_generate_on_vqa_rad_images_keeps_errors(tiny_llm, tmp_path):
    from medmm.config import ModelConfig, config_from_dict
    from medmm.model.multimodal import MedMMForCausalLM
    from medmm.prepare.vqa import prepare_vqa
    from tests.conftest import model_dict

    torch.manual_seed(0)
    ckpt = MedMMForCausalLM.from_config(config_from_dict(ModelConfig, model_dict(tiny_llm))).save_pretrained(
        tmp_path / "ckpt")
    prepare_vqa(SAMPLE / "vqa_rad/testset.json", SAMPLE / "vqa_rad/images", tmp_path / "data", name="vqa")
    recs = (tmp_path / "data" / "vqa_eval.jsonl").read_text().splitlines()[:5]
    bad = json.loads(recs[0])
    bad["id"], bad["modalities"] = "broken", {"image": str(tmp_path / "missing.jpg")}
    data = _write(tmp_path / "eval.jsonl", [json.loads(r) for r in recs] + [bad])
    res = run_benchmark("vqa", tmp_path / "o", checkpoint=ckpt, data=[data], options={"max_new_tokens": 3},
                        resamples=20, progress=False)
    assert res["n"] == 5 and res["errors"] == 1 and res["source"]["checkpoint"] == str(ckpt)
    rows = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert rows[-1]["id"] == "broken" and rows[-1]["error"] == "ImageError"
    assert all(isinstance(r["prediction"], str) and r["modalities"]["image"].endswith(".jpg") for r in rows[:5])
    assert (tmp_path / "o" / "report.html").exists()
