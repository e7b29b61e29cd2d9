"""Shared fixtures: a tiny tokenizer + Llama saved to disk once per session, and model configs over it.

Plain ``pytest`` runs every tier on CPU; markers (slow, deepspeed, integration, gpu) let CI choose.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one intra-op thread each, inherited by the processes tests start (more busy threads
    # than cores run many times slower); torchrun's ranks have one each already
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO.parent / "shared" / "data").resolve()
SAMPLE = REPO / "data" / "sample"

MOLECULENET = REPO.parent / "shared" / "data" / "molecules" / "moleculenet"


def first_rows(src: Path, dst: Path, n: int) -> Path:
    """A CSV of ``src``'s header and first ``n`` data rows, at ``dst``."""
    import csv

    with open(src, newline="") as f:
        lines = list(csv.reader(f))[: n + 1]
    with open(dst, "w", newline="") as f:
        csv.writer(f).writerows(lines)
    return dst


# `make test` runs the suite on two pytest-xdist workers (`-n auto --dist loadgroup`), grouped by the scheduler
# below. The tests in BOTH_CORES keep both cores busy by themselves (2-rank torchrun jobs, a reference computed in a
# second process): two of them at once would put four busy processes on two cores, so they form one group that runs
# one test after another on one worker, and first, being the longest unit of work, while the other worker runs the
# rest. Every other test is grouped with its file, so a module-scoped fixture (an Orthanc, a server, a checkpoint) is
# built once, on one worker. (xdist's own `xdist_group` marks work by rewriting node ids, which pytest 9.2 no longer
# lets a plugin do; the scheduler sees node ids only, hence a table of them here, checked by
# tests/test_suite_groups.py.)
BOTH_CORES = "both_cores"
BOTH_CORES_TESTS: dict[str, tuple[str, ...]] = {  # file -> test functions; () = every test of the file
    "tests/test_training.py": ("test_two_ranks_lower_loss_on_fixed_batch", "test_kill_and_resume_matches_uninterrupted",
                               "test_two_ranks_zero3_text_only_and_image_conversations"),
    "tests/test_streaming.py": ("test_streamed_kill_and_resume_matches_uninterrupted",
                                "test_two_ranks_train_on_prepare_dicom_and_prepare_wsi_shards"),
    "tests/test_zero3_save.py": ("test_two_ranks_zero3_final_folder_equals_zero_to_fp32",),
    "tests/test_dpo.py": ("test_two_ranks_zero3_lora_dpo_on_vqa_rad_and_clintox_pairs",),
    "tests/test_moleculenet.py": ("test_scaffold_deterministic_matches_reference_hiv",),
    "tests/test_multinode.py": (),
    "tests/test_worker_errors.py": (),
    "tests/test_demo.py": (),
}


def suite_group(nodeid: str) -> str:
    """The group of a test: BOTH_CORES for the tests in BOTH_CORES_TESTS, tests/security for the attack suite (its
    session-scoped checkpoint and servers), else its file."""
    path, _, rest = nodeid.partition("::")
    names = BOTH_CORES_TESTS.get(path)
    if names is not None and (not names or rest.split("[")[0].split("::")[-1] in names):
        return BOTH_CORES
    if path.startswith("tests/security/"):
        return "tests/security"
    return path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Groups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return suite_group(nodeid)

    return Groups(config, log)


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case torch was loaded before the line above


def pytest_collection_modifyitems(config, items):
    import torch

    if hasattr(config, "workerinput"):  # an xdist worker: the both-cores group first (every worker sorts alike)
        items.sort(key=lambda item: suite_group(item.nodeid) != BOTH_CORES)  # stable: the rest keeps its order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.exists():
        pytest.fail(f"../shared/data is missing at {SHARED}; tests read real data from there")
    return SHARED


@pytest.fixture(scope="session")
def pydicom_files() -> Path:
    from medmm.io.dicom import pydicom_test_files

    return pydicom_test_files()


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> Path:
    from medmm.model.tiny import build_tiny_llm, sample_texts

    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm"), sample_texts(SAMPLE))


def model_dict(llm: Path, llm_trainable: str = "lora", image_trainable: str = "full", **extra) -> dict:
    """A small model config over every foundation modality."""
    d = {
        "llm": str(llm),
        "llm_trainable": llm_trainable,
        "lora": {"r": 4, "alpha": 8},
        "modalities": {
            "image": {"loader": "image", "encoder": {"name": "vit2d_tiny", "trainable": image_trainable},
                      "projector": {"type": "mlp2x_gelu"}, "preprocess": {"image_size": 64}},
            "volume": {"loader": "volume", "encoder": {"name": "vit3d_tiny", "trainable": "full"},
                       "projector": {"type": "resampler", "num_queries": 8}},
            "mol": {"loader": "smiles_fingerprint", "encoder": {"name": "mol_fingerprint_tiny", "trainable": "full"},
                    "projector": {"type": "linear"}},
            "dna": {"loader": "dna_tokens", "encoder": {"name": "dna_tiny", "trainable": "full"},
                    "projector": {"type": "resampler", "num_queries": 4}},
        },
    }
    d.update(extra)
    return d


# the run of the zero3_two_ranks fixture, and of what is compared with it
ZERO3_RUN = dict(max_steps=6, save_every=3, deepspeed=str(REPO / "configs/deepspeed/zero3.json"))


@pytest.fixture(scope="session")
def zero3_two_ranks(tiny_llm, tmp_path_factory):
    """One torchrun job of 2 ranks under ZeRO-3 (``make_run``'s records, ZERO3_RUN), launched once for two tests:
    tests/test_zero3_save.py checks its saved folder, tests/test_multinode.py two nodes of one rank against its
    losses. Returns the config's path (the run is in ``run/`` beside it) and the finished process."""
    from tests.test_training import make_run, torchrun

    cfg = make_run(tmp_path_factory.mktemp("zero3_two_ranks"), tiny_llm, **ZERO3_RUN)
    return cfg, torchrun(cfg)


@pytest.fixture
def tiny_model_config(tiny_llm):
    from medmm.config import ModelConfig, config_from_dict

    return config_from_dict(ModelConfig, model_dict(tiny_llm))


@pytest.fixture
def python_exe() -> str:
    return sys.executable
