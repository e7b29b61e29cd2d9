"""Multi-node training: two torchrun "nodes" of one rank each, on loopback (static rendezvous, as on two hosts
with a shared file system), train step for step like one node of two ranks (ZeRO-3)."""

import subprocess
import sys

import pytest

from tests.conftest import REPO, ZERO3_RUN
from tests.test_training import env, losses, make_run

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]


def test_two_nodes_of_one_rank_match_one_node_of_two(tmp_path, tiny_llm, zero3_two_ranks):
    from medmm.training.distributed import free_port

    one_cfg, r = zero3_two_ranks  # one node of two ranks, ZERO3_RUN (tests/conftest.py)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = one_cfg.parent, tmp_path / "two_nodes"
    two.mkdir()
    cfg = make_run(two, tiny_llm, **ZERO3_RUN)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                               "-m", "medmm.training", "--config", str(cfg)],
                              env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "world=2" in outs[0][0] and "zero=3" in outs[0][0]
    a, b = losses(one / "run"), losses(two / "run")
    assert set(a) == set(b) == set(range(1, 7))
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    assert (two / "run" / "checkpoint" / "medmm_config.json").exists()
