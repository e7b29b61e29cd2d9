"""The xdist grouping of `make test` (tests/conftest.py): the both-cores table names tests that exist, and the
scheduler puts them in one group, every other test in its file's group."""

import importlib
import re
import subprocess
import sys

import pytest

from tests.conftest import BOTH_CORES, BOTH_CORES_TESTS, REPO, suite_group


@pytest.mark.parametrize("path", sorted(BOTH_CORES_TESTS))
def test_both_cores_table_names_existing_tests(path):
    """A renamed or moved test would silently leave the group (and run beside another 2-rank job): the table fails
    here instead."""
    assert (REPO / path).is_file(), path
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    for name in BOTH_CORES_TESTS[path]:
        assert callable(getattr(module, name, None)), f"{path} has no test {name}"


def test_groups_by_table_then_file():
    assert suite_group("tests/test_training.py::test_kill_and_resume_matches_uninterrupted") == BOTH_CORES
    assert suite_group("tests/test_training.py::test_two_ranks_lower_loss_on_fixed_batch[zero2]") == BOTH_CORES
    assert suite_group("tests/test_multinode.py::test_two_nodes_of_one_rank_match_one_node_of_two") == BOTH_CORES
    assert suite_group("tests/test_training.py::test_single_process_zero0") == "tests/test_training.py"
    assert suite_group("tests/test_pacs.py::test_pull_run_push") == "tests/test_pacs.py"
    assert suite_group("tests/security/test_tls.py::Cls::test_x[a@b]") == "tests/security"


@pytest.mark.slow  # ~10 s: two xdist workers start
def test_two_workers_run_each_file_on_one_worker(tmp_path):
    """Through xdist itself: the tests of a file all run on one worker (they would spread over both otherwise)."""
    pytest.importorskip("xdist")
    files = ["tests/test_config.py", "tests/test_bootstrap.py"]
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup",
                        "--no-loadscope-reorder", "-v", "--basetemp", str(tmp_path / "t"), *files],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    workers: dict[str, set[str]] = {}
    for line in r.stdout.splitlines():
        m = re.match(r"\[(gw\d+)\] .*(PASSED|FAILED|SKIPPED|ERROR) (tests/[^:]+)::", line)
        if m:
            workers.setdefault(m[3], set()).add(m[1])
    assert set(workers) == set(files), r.stdout[-3000:]
    assert all(len(w) == 1 for w in workers.values()), workers
