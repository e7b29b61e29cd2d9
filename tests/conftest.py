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


def pytest_collection_modifyitems(config, items):
    import torch

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
    from medmm.data.prepare import pydicom_test_files

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


@pytest.fixture
def tiny_model_config(tiny_llm):
    from medmm.config import ModelConfig, config_from_dict

    return config_from_dict(ModelConfig, model_dict(tiny_llm))


@pytest.fixture
def python_exe() -> str:
    return sys.executable
