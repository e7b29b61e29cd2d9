"""Every YAML recipe in configs/ loads into its dataclass and builds (with a tiny LLM swapped in)."""

import json
from pathlib import Path

import pytest

from medmm.config import TrainConfig, load_config

# configs/tasks/ holds recipes that are not TrainConfigs (e.g. slide classification); their own tests load them.
CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml")
                 if p.parent.name != "tasks")
DS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs" / "deepspeed").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_builds(path, tiny_llm):
    from medmm.model.multimodal import MedMMForCausalLM

    cfg = load_config(TrainConfig, path, [f"model.llm={tiny_llm}"])
    model = MedMMForCausalLM.from_config(cfg.model)
    assert set(model.modality_tokens) == set(cfg.model.modalities)
    assert Path(cfg.trainer.deepspeed).exists()


@pytest.mark.parametrize("path", DS, ids=lambda p: p.name)
def test_deepspeed_json_fills(path):
    from medmm.config import TrainerConfig
    from medmm.training.trainer import build_ds_config

    ds = build_ds_config(TrainerConfig(deepspeed=str(path), micro_batch_size=3, grad_accum=2), world_size=2)
    assert ds["train_batch_size"] == 12
    assert "zero_optimization" in json.loads(path.read_text())
