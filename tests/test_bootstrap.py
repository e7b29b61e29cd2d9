"""Bootstrap intervals against closed forms, seeding, strata, and the paired test (``medmm eval compare``)."""

import json
import math

import numpy as np
import pytest

from medmm.errors import InvalidInputError
from medmm.eval.benchmarks.run import compare_runs, run_benchmark
from medmm.eval.bootstrap import bootstrap, mean_statistic, paired_bootstrap, resample_indices

Z = 1.959963984540054  # the 97.5th normal percentile


def test_accuracy_interval_matches_the_binomial_closed_form():
    n, k = 1000, 700  # accuracy 0.7 on 1000 items
    correct = [1.0] * k + [0.0] * (n - k)
    res = bootstrap(mean_statistic({"accuracy": correct}), n, resamples=4000, seed=0)
    p = k / n
    half = Z * math.sqrt(p * (1 - p) / n)  # Wald: 0.0284
    lo, hi = res.ci95["accuracy"]
    assert res.values["accuracy"] == p
    assert lo == pytest.approx(p - half, abs=0.004) and hi == pytest.approx(p + half, abs=0.004)
    # Wilson's interval is within 0.001 of Wald's here; the bootstrap sits between both within the tolerance
    centre = (p + Z**2 / (2 * n)) / (1 + Z**2 / n)
    w = Z * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2)) / (1 + Z**2 / n)
    assert lo == pytest.approx(centre - w, abs=0.004) and hi == pytest.approx(centre + w, abs=0.004)


@pytest.mark.slow
def test_coverage_of_the_true_accuracy():
    # 200 simulated test sets of 1000 items with true accuracy 0.8: ~95% of the intervals hold 0.8
    rng = np.random.default_rng(1)
    hits = 0
    for s in range(200):
        correct = (rng.random(1000) < 0.8).astype(float)
        lo, hi = bootstrap(mean_statistic({"a": correct}), 1000, resamples=400, seed=s).ci95["a"]
        hits += lo <= 0.8 <= hi
    assert 0.90 <= hits / 200 <= 0.99


def test_seeded_and_reproducible():
    vals = list(np.random.default_rng(0).random(50))
    a = bootstrap(mean_statistic({"m": vals}), 50, resamples=300, seed=7)
    b = bootstrap(mean_statistic({"m": vals}), 50, resamples=300, seed=7)
    c = bootstrap(mean_statistic({"m": vals}), 50, resamples=300, seed=8)
    assert a.ci95 == b.ci95 and a.ci95 != c.ci95
    assert bootstrap(mean_statistic({"m": vals}), 50, resamples=0).ci95 == {"m": None}


def test_strata_keep_their_sizes():
    strata = ["a"] * 3 + ["b"] * 7
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = resample_indices(10, rng, strata)
        assert sum(i < 3 for i in idx) == 3 and len(idx) == 10


def test_undefined_metric_resamples_are_skipped_and_counted():
    vals = [None] * 9 + [1.0]  # defined on one item: most resamples miss it
    res = bootstrap(mean_statistic({"m": vals}), 10, resamples=200, seed=0)
    assert res.values["m"] == 1.0 and 0 < res.used["m"] < 200 and res.ci95["m"] == (1.0, 1.0)


def test_paired_difference_matches_the_closed_form():
    # paired accuracies on 1000 items: A right and B wrong on 120, the reverse on 60
    n, b_only_a, c_only_b = 1000, 120, 60
    a = np.zeros(n)
    b = np.zeros(n)
    a[:500] = b[:500] = 1  # both right
    a[500:500 + b_only_a] = 1
    b[500 + b_only_a:500 + b_only_a + c_only_b] = 1
    res = paired_bootstrap(mean_statistic({"acc": a}), mean_statistic({"acc": b}), n, resamples=4000, seed=0)
    m = res.metrics["acc"]
    d = (b_only_a - c_only_b) / n
    se = math.sqrt(b_only_a + c_only_b - (b_only_a - c_only_b) ** 2 / n) / n  # paired proportions
    assert m["diff"] == pytest.approx(d)
    assert m["ci95"][0] == pytest.approx(d - Z * se, abs=0.004) and m["ci95"][1] == pytest.approx(d + Z * se, abs=0.004)
    z = d / se  # 4.5: two-sided normal p ~ 7e-6; with 4000 resamples the bootstrap p is its floor
    assert m["p_value"] == pytest.approx(1 / 4001)
    same = paired_bootstrap(mean_statistic({"acc": a}), mean_statistic({"acc": a}), n, resamples=200, seed=0)
    assert same.metrics["acc"]["diff"] == 0 and same.metrics["acc"]["p_value"] == 1.0
    assert z > 4


def test_paired_p_value_for_a_small_difference():
    # 30 vs 24 discordant items out of 1000. The resampled difference (times n) is an integer with sd
    # sqrt(54 - 36/1000), and the test counts |d* - d| >= |d| (ties included), so the normal approximation
    # takes a half-step correction: z = (6 - 0.5) / 7.35, two-sided p = 0.454 (McNemar's uncorrected: 0.41)
    n = 1000
    a, b = np.zeros(n), np.zeros(n)
    a[:30] = 1
    b[30:54] = 1
    p = paired_bootstrap(mean_statistic({"x": a}), mean_statistic({"x": b}), n, resamples=4000, seed=2).metrics["x"]
    z = 5.5 / math.sqrt(54 - 36 / n)
    assert p["p_value"] == pytest.approx(math.erfc(z / math.sqrt(2)), abs=0.03)


def _vqa_run(tmp_path, name, answers):
    refs = ["yes", "no", "left lung", "yes", "heart", "no", "right kidney", "yes"]
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prediction": a, "reference": r}) + "\n"
                            for i, (a, r) in enumerate(zip(answers, refs))))
    return run_benchmark("vqa", tmp_path / name, predictions=path, resamples=200, progress=False, html=False)


def test_compare_two_runs(tmp_path):
    _vqa_run(tmp_path, "a", ["yes", "no", "left lung", "yes", "heart", "no", "right kidney", "yes"])
    _vqa_run(tmp_path, "b", ["no", "no", "lung", "yes", "liver", "yes", "kidney", "yes"])
    res = compare_runs(tmp_path / "a", tmp_path / "b", resamples=300, seed=0, progress=False)
    m = res["metrics"]["exact_match"]
    assert res["n"] == 8 and m["a"] == 1.0 and m["b"] == 3 / 8 and m["diff"] == pytest.approx(5 / 8)
    assert 0 < m["ci95"][0] <= m["diff"] <= m["ci95"][1] and m["p_value"] < 0.05
    _vqa_run(tmp_path, "c", ["yes"] * 8)
    (tmp_path / "c" / "predictions.jsonl").write_text(
        "\n".join((tmp_path / "c" / "predictions.jsonl").read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(InvalidInputError, match="not the same items"):
        compare_runs(tmp_path / "a", tmp_path / "c", resamples=10, progress=False)
