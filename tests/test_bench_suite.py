"""Suites: every configs/eval/*.yaml loads and validates, bad suites fail naming the key, results.json's shape."""

import json
from pathlib import Path

import pytest

from medmm.config import load_config
from medmm.errors import ConfigError
from medmm.eval.benchmarks import get_benchmark, list_benchmarks
from medmm.eval.suite import SuiteConfig, run_suite
from tests.conftest import REPO

SUITES = sorted((REPO / "configs" / "eval").glob("*.yaml"))


def test_there_are_suites():
    assert {p.stem for p in SUITES} >= {"demo", "radiology", "promptcblue", "exams", "heads"}


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.name)
def test_suite_config_loads_and_every_entry_validates(path):
    cfg = load_config(SuiteConfig, path)
    assert cfg.benchmarks
    for i, b in enumerate(cfg.benchmarks):
        assert b.name in list_benchmarks()
        get_benchmark(b.name).options(b.options, f"{path}: benchmarks.{i}.options")
        assert b.data or b.predictions


def _suite(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "suite.yaml"
    p.write_text(text)
    return p


def test_bad_suites_fail_before_any_model_loads(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'benchmark'"):
        load_config(SuiteConfig, _suite(tmp_path, "suite: s\nbenchmark: []\n"))
    with pytest.raises(ConfigError, match="used twice"):
        load_config(SuiteConfig, _suite(tmp_path, "suite: s\nbenchmarks: [{name: vqa}, {name: vqa}]\n"))
    bad_opt = _suite(tmp_path, "suite: s\nbenchmarks: [{name: report, data: [x], options: {protocol: bleu}}]\n")
    with pytest.raises(ConfigError, match=r"benchmarks.0.options.*not one of"):
        run_suite(bad_opt, checkpoint="/nonexistent", out=tmp_path / "o")
    with pytest.raises(ConfigError, match="unknown benchmark 'vqqa'"):
        run_suite(_suite(tmp_path, "suite: s\nbenchmarks: [{name: vqqa, data: [x]}]\n"), "/c", tmp_path / "o")
    with pytest.raises(ConfigError, match="no checkpoint"):
        run_suite(_suite(tmp_path, "suite: s\nbenchmarks: [{name: vqa, data: [x]}]\n"), None, tmp_path / "o")


def test_suite_of_prediction_files_writes_results_and_page(tmp_path):
    (tmp_path / "vqa.jsonl").write_text("".join(json.dumps({"id": i, "prediction": p, "reference": r}) + "\n"
                                                for i, (p, r) in enumerate([("yes", "yes"), ("no", "yes")])))
    (tmp_path / "report.jsonl").write_text(json.dumps({"id": "a", "prediction": "No acute disease.",
                                                       "reference": "No acute cardiopulmonary disease."}) + "\n")
    cfg = _suite(tmp_path, "suite: files\nresamples: 30\nbenchmarks:\n"
                           "  - {name: vqa, predictions: vqa.jsonl}\n"
                           "  - {name: report, label: reports, predictions: report.jsonl, options: {meteor: false}}\n")
    doc = run_suite(cfg, None, tmp_path / "out", data_root=tmp_path, progress=False)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(doc))
    assert set(on_disk) == {"suite", "checkpoint", "benchmarks"} and on_disk["suite"] == "files"
    assert list(on_disk["benchmarks"]) == ["vqa", "reports"]
    for label, m in on_disk["benchmarks"].items():
        assert {"benchmark", "protocol", "n", "metrics"} <= set(m)
        assert all(set(v) == {"value", "ci95"} for v in m["metrics"].values())
        assert m == json.loads((tmp_path / "out" / label / "metrics.json").read_text())
    assert on_disk["benchmarks"]["vqa"]["metrics"]["exact_match"]["value"] == 0.5
    page = (tmp_path / "out" / "report.html").read_text()
    assert 'id="bench-vqa"' in page and 'id="bench-reports"' in page and "r2gen/iu_xray" in page
