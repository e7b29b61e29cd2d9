"""``mcq``: item formats, answer parsing, scoring, and closed-set log-likelihood answering with a tiny checkpoint.

The questions are written for this test (MedQA-, CMExam- and plain-style lines), not taken from the exams.
"""

import json

import pytest
import torch

from medmm.errors import InvalidInputError
from medmm.eval.benchmarks import get_benchmark
from medmm.eval.benchmarks.mcq import normalize_item, parse_choice, prompt_of
from medmm.eval.benchmarks.run import run_benchmark

ITEMS = [
    {"id": "medqa-1", "question": "Which imaging modality uses ionising radiation?",
     "options": {"A": "MRI", "B": "CT", "C": "Ultrasound", "D": "Optical coherence tomography"},
     "answer": "CT", "answer_idx": "B", "meta_info": "step1"},
    {"id": "cmexam-1", "Question": "下列哪项是糖尿病的典型症状？", "Options": "A 多饮\nB 咳嗽\nC 头晕\nD 皮疹",
     "Answer": "A"},
    {"id": "plain-1", "question": "First-line drug for type 2 diabetes?",
     "options": ["Metformin", "Insulin glargine", "Warfarin"], "answer": "Metformin"},
    {"id": "multi-1", "Question": "以下哪些属于抗凝药？", "Options": "A 华法林\nB 阿司匹林\nC 肝素\nD 维生素C",
     "Answer": "AC"},
]
OPTS = {"A": "MRI", "B": "CT", "C": "Ultrasound", "D": "Optical coherence tomography"}


def test_item_formats():
    a, b, c, d = (normalize_item(x, f"line {i}") for i, x in enumerate(ITEMS))
    assert a["reference"] == "B" and a["options"]["D"] == "Optical coherence tomography"
    assert b["options"] == {"A": "多饮", "B": "咳嗽", "C": "头晕", "D": "皮疹"} and b["reference"] == "A"
    assert c["options"] == {"A": "Metformin", "B": "Insulin glargine", "C": "Warfarin"} and c["reference"] == "A"
    assert d["reference"] == "AC"
    assert prompt_of(a, "Answer with the letter.").splitlines() == [
        "Which imaging modality uses ionising radiation?", "A. MRI", "B. CT", "C. Ultrasound",
        "D. Optical coherence tomography", "Answer with the letter."]
    with pytest.raises(InvalidInputError, match="neither option letters"):
        normalize_item({"question": "q", "options": ["x", "y"], "answer": "z"}, "bad.jsonl:3")
    with pytest.raises(InvalidInputError, match="no 'options'"):
        normalize_item({"question": "q", "answer": "A"}, "bad.jsonl:4")


@pytest.mark.parametrize("text,expected", [
    ("B", "B"), (" (B) ", "B"), ("b", None), ("A, C", "AC"), ("CA", "AC"), ("A and C", "AC"),
    ("The answer is C.", "C"), ("Answer: D", "D"), ("answer is (B) because", "B"), ("答案是B", "B"), ("选A", "A"),
    ("B. CT uses X-rays", "B"), ("(C) ultrasound", "C"), ("It is computed tomography: CT", "B"),
    ("MRI or CT", None), ("E", None), ("The answer is E", None), ("", None), ("I do not know", None),
    ("A patient", None),
])
def test_parse_choice(text, expected):
    assert parse_choice(text, OPTS) == expected


def _write(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return p


def test_scoring_predictions_by_hand(tmp_path):
    data = _write(tmp_path, "d.jsonl", ITEMS)
    preds = _write(tmp_path, "p.jsonl", [{"id": "medqa-1", "prediction": "The answer is B."},
                                         {"id": "cmexam-1", "prediction": "答案是C"},
                                         {"id": "plain-1", "prediction": "Metformin is first line"},
                                         {"id": "multi-1", "prediction": "A, C"}])
    res = run_benchmark("mcq", tmp_path / "o", predictions=preds, data=[data], options={"mode": "generate"},
                        resamples=100, progress=False, html=False)
    assert res["metrics"]["accuracy"]["value"] == 0.75 and res["metrics"]["parse_rate"]["value"] == 1.0
    rows = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert [r["predicted"] for r in rows] == ["B", "C", "A", "AC"]
    assert [r["correct"] for r in rows] == [True, False, True, True]
    # our own predictions.jsonl scores again without --data (options and references are in the rows)
    again = run_benchmark("mcq", tmp_path / "o2", predictions=tmp_path / "o" / "predictions.jsonl",
                          options={"mode": "generate"}, resamples=0, progress=False, html=False)
    assert again["metrics"]["accuracy"]["value"] == 0.75
    with pytest.raises(InvalidInputError, match="no prediction"):
        run_benchmark("mcq", tmp_path / "o3", predictions=_write(tmp_path, "q.jsonl", [{"id": "medqa-1",
                                                                                          "prediction": "B"}]),
                      data=[data], resamples=0, progress=False, html=False)


@pytest.fixture(scope="module")
def checkpoint(tiny_llm, tmp_path_factory):
    from medmm.config import ModelConfig, config_from_dict
    from medmm.model.multimodal import MedMMForCausalLM
    from tests.conftest import model_dict

    torch.manual_seed(0)
    m = MedMMForCausalLM.from_config(config_from_dict(ModelConfig, model_dict(tiny_llm)))
    return m.save_pretrained(tmp_path_factory.mktemp("mcq_ckpt") / "model")


@pytest.mark.slow
@pytest.mark.parametrize("choices", ["letter", "text"])
def test_loglik_answers_are_the_closed_set_argmax(checkpoint, tmp_path, choices):
    from medmm.inference.predictor import Predictor

    items = ITEMS[:3]
    data = _write(tmp_path, "d.jsonl", items)
    res = run_benchmark("mcq", tmp_path / "o", checkpoint=checkpoint, data=[data], options={"choices": choices},
                        resamples=50, progress=False, html=False)
    rows = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    bench = get_benchmark("mcq")
    opts = bench.options({"choices": choices})
    sess_pred = Predictor(checkpoint)
    for row, raw in zip(rows, items):
        item = normalize_item(raw, "x")
        cands = list(item["options"]) if choices == "letter" else list(item["options"].values())
        direct = sess_pred.session({}).closed_set(prompt_of(item, opts.instruction), cands)
        best = max(direct["probs"], key=direct["probs"].get)
        letter = best if choices == "letter" else {v: k for k, v in item["options"].items()}[best]
        assert row["predicted"] == letter and set(row["probs"]) == set(item["options"])
        assert sum(row["probs"].values()) == pytest.approx(1.0, abs=1e-4)
    assert res["metrics"]["accuracy"]["value"] == sum(r["correct"] for r in rows) / 3
    assert res["protocol"].startswith("mcq/loglik")
