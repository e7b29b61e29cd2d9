"""The benchmark registry's contract, parametrized over every registered benchmark, and the ``medmm eval`` CLI."""

import argparse
import dataclasses
import json

import pytest

from medmm.cli import main as cli
from medmm.errors import ConfigError
from medmm.eval.__main__ import _add_option_flags, is_eval_command
from medmm.eval.benchmarks import Benchmark, get_benchmark, list_benchmarks, register_benchmark
from medmm.eval.benchmarks.registry import field_docs

ISSUE_BENCHMARKS = {"vqa", "report", "promptcblue", "mcq", "druggability", "dna", "slide"}


def test_every_benchmark_of_the_issue_is_registered():
    assert ISSUE_BENCHMARKS <= set(list_benchmarks())


@pytest.mark.parametrize("name", list_benchmarks())
def test_benchmark_contract(name):
    b = get_benchmark(name)
    assert isinstance(b, Benchmark) and b.name == name and b.summary and b.headline
    if b.trains:  # trains its own models (moleculenet): its own command line, no records -> rows contract
        assert callable(getattr(b, "main", None)) and isinstance(b.protocol(b.options()), str)
        return
    opts = b.options()
    assert dataclasses.is_dataclass(opts)
    docs = field_docs(b.Options)
    for f in dataclasses.fields(b.Options):
        assert docs.get(f.name), f"{name}.Options.{f.name} has no docstring"
    assert isinstance(b.protocol(opts), str) and len(b.protocol(opts)) > 10
    ap = argparse.ArgumentParser()
    names = _add_option_flags(ap, b.Options)
    assert names == [f.name for f in dataclasses.fields(b.Options)]
    assert vars(ap.parse_args([])) == {n: None for n in names}  # defaults come from the dataclass, not argparse
    for cls in (type(b),):
        for method in ("load", "generate", "from_predictions", "score"):
            assert getattr(cls, method) is not getattr(Benchmark, method), f"{name} does not implement {method}"


def test_options_reject_unknown_keys_and_wrong_types():
    b = get_benchmark("report")
    assert b.options({"protocol": "sacrebleu"}).protocol == "sacrebleu"
    with pytest.raises(ConfigError, match="unknown key 'protocl'"):
        b.options({"protocl": "r2gen"})
    with pytest.raises(ConfigError, match="not one of"):
        b.options({"protocol": "bleu"})
    with pytest.raises(ConfigError, match="expected an integer"):
        b.options({"max_new_tokens": "many"})


def test_registering_twice_is_an_error():
    class Dup(Benchmark):
        name = "vqa"

    with pytest.raises(ValueError, match="registered twice"):
        register_benchmark(Dup)
    with pytest.raises(ConfigError, match="unknown benchmark 'nope'"):
        get_benchmark("nope")


def test_cli_routes(tmp_path, capsys):
    assert is_eval_command(["vqa"]) and is_eval_command(["compare"]) and not is_eval_command(["--checkpoint"])
    cli(["eval", "list"])
    assert set(capsys.readouterr().out.split()) >= ISSUE_BENCHMARKS
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": 1, "prediction": "Yes.", "reference": "yes"}) + "\n")
    cli(["eval", "vqa", "--predictions", str(preds), "--out", str(tmp_path / "o"), "--resamples", "20",
         "--no-progress"])
    out = capsys.readouterr().out
    assert "exact_match" in out and "95% CI" in out and "protocol:" in out
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["metrics"]["exact_match"]["value"] == 1.0
    assert (tmp_path / "o" / "report.html").exists()
    with pytest.raises(SystemExit):  # the old form still parses its own flags (and needs --checkpoint)
        cli(["eval", "--data", "x.jsonl"])
    assert "--report-metrics" in capsys.readouterr().err
