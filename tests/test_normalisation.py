"""The ``normalisation`` benchmark (free-text diagnosis -> ICD-10-CM code) and the ``retriever`` training stage."""

import json

import numpy as np
import pytest
import torch

from medmm.config import IndexConfig, TrainConfig, config_from_dict
from medmm.errors import InvalidInputError
from medmm.eval.benchmarks import get_benchmark, list_benchmarks, run_benchmark
from medmm.eval.benchmarks.registry import RunContext
from medmm.retrieval.index import build_index
from medmm.retrieval.sources import icd10cm_table, split_of

pytest.importorskip("bm25s")
pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def icd(tmp_path_factory):
    """I60-I79 as an index (926 codes), and their held-out abbreviated short names as benchmark queries."""
    rows = [r for r in icd10cm_table() if r["code"][:2] in ("I6", "I7")]
    d = tmp_path_factory.mktemp("norm")
    docs = d / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": r["code"], "text": r["long"], "source": "icd10cm"}) + "\n" for r in rows))
    idx = build_index(d / "index", files=[docs], cfg=IndexConfig(dense_dim=64))
    queries = d / "queries.jsonl"
    qs = [{"id": f"q{i}", "query": r["short"], "code": r["code"]} for i, r in enumerate(rows)
          if r["short"].lower() != r["long"].lower() and split_of(r["code"]) == "test"]
    queries.write_text("".join(json.dumps(q) + "\n" for q in qs))
    return idx, queries, qs


def test_registered_and_scores_accuracy_at_1_and_5():
    assert "normalisation" in list_benchmarks()
    b = get_benchmark("normalisation")
    rows = [{"id": "a", "reference": "I63.9", "prediction": "I63.9", "candidates": ["I63.9", "I63.8"]},
            {"id": "b", "reference": "I70.0", "prediction": "I70.1", "candidates": ["I70.1", "I70.0"]},
            {"id": "c", "reference": "I71.2", "prediction": "I10", "candidates": ["I10", "I11", "I12", "I13", "I15",
                                                                                    "I71.2"]}]
    sc = b.score(rows, b.options())
    m = sc.stat(np.arange(3))
    assert m["accuracy@1"] == pytest.approx(1 / 3) and m["accuracy@5"] == pytest.approx(2 / 3)
    assert m["candidate_recall"] == pytest.approx(1.0)


def test_load_rejects_items_without_code(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"id": "x", "query": "htn"}\n')
    b = get_benchmark("normalisation")
    with pytest.raises(InvalidInputError, match="q.jsonl:1"):
        b.load([f], b.options())


def test_retriever_mode_end_to_end_with_cis(icd, tmp_path):
    idx, queries, qs = icd
    b = get_benchmark("normalisation")
    opts = b.options({"index": str(idx.path), "top_k": 10})
    rows = b.generate(b.load([queries], opts), opts, RunContext(checkpoint=None))  # no model is loaded
    assert all(len(r["candidates"]) == 10 and idx.get(r["prediction"]) for r in rows)
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({k: r[k] for k in ("id", "prediction", "candidates")}) + "\n" for r in rows))
    res = run_benchmark("normalisation", tmp_path / "run", predictions=preds, data=[queries], resamples=200)
    m = res["metrics"]
    a1, a5 = m["accuracy@1"], m["accuracy@5"]
    a1 = a1["value"] if isinstance(a1, dict) else a1
    a5 = a5["value"] if isinstance(a5, dict) else a5
    assert 0.3 < a1 <= a5 <= 1.0, m
    assert "ci" in json.dumps(m).lower()
    assert len(qs) == len(rows)


@pytest.mark.slow  # featurises ~600 pairs per step on CPU
def test_retriever_stage_learns_in_batch(tmp_path):
    """A few optimiser steps of the stage's model and loss (no DeepSpeed) raise validation recall from random init."""
    from medmm.training.stages import get_stage, list_stages

    assert "retriever" in list_stages()
    pairs = tmp_path / "pairs.jsonl"
    rows = [r for r in icd10cm_table() if r["code"][:2] in ("I6", "I7") and r["short"] != r["long"]]
    pairs.write_text("".join(json.dumps({"query": r["short"], "document": r["long"]}) + "\n" for r in rows))
    cfg = config_from_dict(TrainConfig, {"trainer": {"stage": "retriever", "micro_batch_size": 64, "seed": 0,
                                                     "output_dir": str(tmp_path / "run")},
                                         "retriever": {"pairs": str(pairs), "init": "random", "dim": 32,
                                                       "eval_pairs": 100}})
    stage = get_stage("retriever")(cfg)
    model = stage.build_model()
    data = stage.build_data()
    before = stage.evaluate(model)["val_recall@1"]
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    batches = iter(data.sampler(0))

    class Engine:  # what the loop's DeepSpeed engine offers the stage: a call
        def __call__(self, **b):
            return model(**b)

    for _ in range(40):
        batch = data.collate([data.dataset[i] for i in next(batches)])
        loss, logs = stage.loss(Engine(), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = stage.evaluate(model)["val_recall@1"]
    assert after > before + 0.1, (before, after)
    out = stage.save(None, model, tmp_path / "ckpt", 0, {"step": 40, "loss": float(loss.detach())})
    from medmm.retrieval.dense import load_encoder

    enc = load_encoder(out)
    v = enc.encode(["Cerebral infarction", "Atherosclerosis of aorta"])
    assert v.shape == (2, 32) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    idx = build_index(tmp_path / "bi_idx", files=[pairs], text_field="document",
                      cfg=IndexConfig(dense_encoder="biencoder", dense_model=str(out)))
    assert idx.meta["config"]["dense_encoder"] == "biencoder" and len(idx.search("cerebral infarct", 3, "dense")) == 3


@pytest.mark.slow
@pytest.mark.deepspeed
def test_retriever_stage_through_the_loop(tmp_path):
    """``trainer.stage: retriever`` under the one DeepSpeed loop: metrics logged, the encoder folder saved and served."""
    from pathlib import Path

    from medmm.retrieval.dense import load_encoder
    from medmm.training.loop import run_training

    pairs = tmp_path / "pairs.jsonl"
    rows = [r for r in icd10cm_table() if r["code"][:2] == "I7" and r["short"] != r["long"]]
    pairs.write_text("".join(json.dumps({"query": r["short"], "document": r["long"]}) + "\n" for r in rows))
    repo = Path(__file__).resolve().parents[1]
    cfg = config_from_dict(TrainConfig, {
        "trainer": {"stage": "retriever", "output_dir": str(tmp_path / "run"), "max_steps": 6, "micro_batch_size": 32,
                    "deepspeed": str(repo / "configs/deepspeed/zero0.json"), "lr": 0.05, "eval_every": 3,
                    "save_every": 6, "seed": 0},
        "retriever": {"pairs": str(pairs), "init": "random", "dim": 16, "eval_pairs": 50}})
    summary = run_training(cfg)
    assert summary["step"] == 6
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("in_batch_acc" in r for r in logged) and any("val_recall@1" in r for r in logged)
    enc = load_encoder(tmp_path / "run" / "checkpoint")
    assert enc.encode(["aortic aneurysm"]).shape == (1, 16)


@pytest.mark.slow  # builds the tiny LLM checkpoint
def test_loglik_mode_picks_among_retrieved_candidates(icd, tiny_llm, tmp_path):
    from medmm.config import ModelConfig
    from medmm.model.multimodal import MedMMForCausalLM
    from tests.conftest import model_dict

    torch.manual_seed(0)
    ckpt = MedMMForCausalLM.from_config(config_from_dict(ModelConfig, model_dict(tiny_llm))).save_pretrained(
        tmp_path / "model")
    idx, queries, _ = icd
    b = get_benchmark("normalisation")
    records = b.load([queries], b.options())[:4]
    retr = b.generate(records, b.options({"index": str(idx.path), "top_k": 5}), RunContext(checkpoint=None))
    opts = b.options({"index": str(idx.path), "top_k": 5, "mode": "loglik"})
    rows = b.generate(records, opts, RunContext(checkpoint=str(ckpt), device="cpu"))
    for r, base in zip(rows, retr):
        assert "error" not in r, r
        assert r["prediction"] == r["candidates"][0] and set(r["candidates"]) <= set(base["candidates"])
    assert b.score(rows, opts).stat(np.arange(len(rows)))["candidate_recall"] is not None
