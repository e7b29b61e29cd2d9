"""Probability benchmarks (``druggability``, ``dna``, ``slide``): metrics equal scikit-learn's, intervals, and
generating with a head model (DNABERT promoter sequences from ../shared/data) and with an LLM (ClinTox SMILES)."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from medmm.errors import InvalidInputError
from medmm.eval.benchmarks.run import run_benchmark
from tests.conftest import SAMPLE


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_binary_rows_equal_sklearn(tmp_path):
    from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.3 * y + 0.7 * rng.random(200), 0, 1)
    preds = _write(tmp_path / "p.jsonl", [{"id": i, "label": int(a), "prob": float(b)} for i, (a, b) in
                                          enumerate(zip(y, p))])
    res = run_benchmark("dna", tmp_path / "o", predictions=preds, resamples=120, progress=False, html=False)
    m = res["metrics"]
    assert m["auroc"]["value"] == pytest.approx(roc_auc_score(y, p), abs=5e-5)
    assert m["auprc"]["value"] == pytest.approx(average_precision_score(y, p), abs=5e-5)
    assert m["brier"]["value"] == pytest.approx(brier_score_loss(y, p), abs=5e-5)
    assert m["accuracy"]["value"] == pytest.approx(((p >= 0.5) == y).mean(), abs=5e-5)
    lo, hi = m["auroc"]["ci95"]
    # Hanley & McNeil's standard error of the AUROC: the bootstrap interval has about its width
    auc, n1, n0 = roc_auc_score(y, p), y.sum(), (1 - y).sum()
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    se = np.sqrt((auc * (1 - auc) + (n1 - 1) * (q1 - auc**2) + (n0 - 1) * (q2 - auc**2)) / (n1 * n0))
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.3)
    assert res["protocol"].startswith("dna:")


def test_multiclass_rows_equal_classification_metrics(tmp_path):
    from medmm.scoring import classification_metrics

    rng = np.random.default_rng(1)
    classes = ["luad", "lusc", "normal"]
    y = rng.integers(0, 3, 60)
    probs = rng.dirichlet([1, 1, 1], 60)
    probs[np.arange(60), y] += 0.5
    probs /= probs.sum(1, keepdims=True)
    preds = _write(tmp_path / "p.jsonl", [{"id": f"slide{i}", "label": classes[a], "probs": dict(zip(classes, b))}
                                          for i, (a, b) in enumerate(zip(y, probs.tolist()))])
    res = run_benchmark("slide", tmp_path / "o", predictions=preds, resamples=20, progress=False, html=False)
    ref = classification_metrics(y, probs, classes)
    for k in ("accuracy", "balanced_accuracy", "auroc"):
        assert res["metrics"][k]["value"] == pytest.approx(ref[k], abs=1e-9), k
    with pytest.raises(InvalidInputError, match="needs 'label'"):
        run_benchmark("slide", tmp_path / "o", predictions=_write(tmp_path / "bad.jsonl", [{"id": 1, "label": "x"}]),
                      resamples=0, progress=False, html=False)


@pytest.mark.slow
def test_dna_head_checkpoint_agrees_with_eval_head(tmp_path, shared_data):
    """An untrained DNA head saved to disk: the benchmark's rows are the head's probabilities, and its metrics
    equal ``medmm eval head`` (helper module medmm.eval.heads) on the same file."""
    from medmm.config import TrainConfig, load_config
    from medmm.eval.heads import evaluate_head
    from medmm.model.heads import build_head_model
    from tests.conftest import REPO

    cfg = load_config(TrainConfig, REPO / "configs/tasks/dna_classification_head.yaml")
    torch.manual_seed(0)
    head = dataclasses.replace(cfg.head, classes=["0", "1"])  # what training resolves for a binary objective
    ckpt = build_head_model(head).save_pretrained(tmp_path / "head")
    lines = (shared_data / "genomics/dna_classification_dnabert/dev.tsv").read_text().splitlines()
    data = tmp_path / "test.tsv"
    data.write_text("\n".join(lines[:41] + ["ACGT-QZ\t1"]) + "\n")  # 40 sequences and one the featuriser rejects
    res = run_benchmark("dna", tmp_path / "o", checkpoint=ckpt, data=[data], resamples=100, progress=False)
    ref = evaluate_head(ckpt, data, tmp_path / "ref", bootstrap=0)
    assert res["n"] == ref["scored"] == 40
    for k in ("auroc", "auprc", "brier", "ece", "accuracy"):
        assert res["metrics"][k]["value"] == pytest.approx(ref["calibrated"][k], abs=1e-4), k
    assert res["errors"] == len(ref["errors"]) >= 1
    with pytest.raises(InvalidInputError, match="'dna' head model"):
        run_benchmark("slide", tmp_path / "o2", checkpoint=ckpt, data=[data], resamples=0, progress=False)


@pytest.mark.slow
def test_druggability_llm_closed_set(tiny_llm, tmp_path):
    from medmm.config import ModelConfig, config_from_dict
    from medmm.inference.predictor import Predictor
    from medmm.model.multimodal import MedMMForCausalLM
    from medmm.prepare.molecules import prepare_molecules
    from tests.conftest import model_dict

    torch.manual_seed(0)
    ckpt = MedMMForCausalLM.from_config(config_from_dict(ModelConfig, model_dict(tiny_llm))).save_pretrained(
        tmp_path / "ckpt")
    prepare_molecules(SAMPLE / "molecules/clintox_sample.csv", tmp_path / "data", label_col="FDA_APPROVED",
                      name="molecules")
    recs = [json.loads(x) for x in (tmp_path / "data" / "molecules_eval.jsonl").read_text().splitlines()[:12]]
    data = _write(tmp_path / "eval.jsonl", recs)
    res = run_benchmark("druggability", tmp_path / "o", checkpoint=ckpt, data=[data], resamples=100, progress=False)
    assert res["n"] == 12 and res["kind"] == "llm" and res["calibrated"] is None
    assert set(res["metrics"]) == {"auroc", "auprc", "brier", "ece", "log_loss", "accuracy"}
    rows = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    sess = Predictor(ckpt).session({"mol": rows[0]["canonical"]})
    p_yes = sess.closed_set("Is this molecule likely to be an approved drug? Answer yes or no.", ["yes", "no"])
    assert rows[0]["prob"] == pytest.approx(p_yes["probs"]["yes"], abs=1e-4)
    labels = [int(r["conversations"][-1]["value"] == "yes") for r in recs]
    assert sorted(r["label"] for r in rows) == sorted(labels)


@pytest.mark.slow
def test_druggability_head_cli_matches_evaluate_druggability(tmp_path, shared_data):
    """`medmm eval druggability` (the registry) on a molecule head: the same numbers, and the same keys (kind, raw,
    calibrated, temperature, errors), as medmm.eval.druggability.evaluate_druggability."""
    from medmm.cli import main as cli
    from medmm.config import TrainConfig, load_config
    from medmm.eval.druggability import evaluate_druggability
    from medmm.model.heads import build_head_model
    from tests.conftest import REPO

    cfg = load_config(TrainConfig, REPO / "configs/tasks/druggability_head.yaml")
    torch.manual_seed(0)
    model = build_head_model(dataclasses.replace(cfg.head, classes=["0", "1"]))
    model.temperature = 1.7
    ckpt = model.save_pretrained(tmp_path / "head")
    rows = (shared_data / "molecules/moleculenet/clintox.csv").read_text().splitlines()
    data = tmp_path / "test.csv"
    data.write_text("\n".join(rows[:31] + ["C1CC,1"]) + "\n")  # 30 molecules and an unclosed ring
    cli(["eval", "druggability", "--checkpoint", str(ckpt), "--data", str(data), "--label-col", "FDA_APPROVED",
         "--out", str(tmp_path / "ev"), "--resamples", "50", "--no-progress"])
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    ref = evaluate_druggability(ckpt, data, tmp_path / "ref", label_col="FDA_APPROVED")
    assert ev["kind"] == ref["kind"] == "head" and ev["temperature"] == ref["temperature"] == 1.7
    assert ev["errors"] == ref["errors"] == 1 and ev["n"] == ref["scored"] == 30
    for k in ("auroc", "brier", "ece", "log_loss"):
        assert ev["raw"][k] == ref["raw"][k] and ev["calibrated"][k] == ref["calibrated"][k], k
        assert ev["metrics"][k]["value"] == ref["calibrated"][k], k
