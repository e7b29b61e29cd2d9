"""Every YAML recipe in configs/ loads into TrainConfig, names a registered stage, and builds (tiny LLM swapped in)."""

import json
from pathlib import Path

import pytest
import torch

from medmm.config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1] / "configs"
# configs/eval/ holds evaluation suites, not training recipes (tests/test_bench_suite.py loads them)
CONFIGS = sorted(p for p in ROOT.rglob("*.yaml") if p.relative_to(ROOT).parts[0] != "eval")
DS = sorted((ROOT / "deepspeed").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_loads_and_builds(path, tiny_llm):
    from medmm.training.stages import get_stage

    cfg = load_config(TrainConfig, path)
    get_stage(cfg.trainer.stage)  # a registered stage, or a ConfigError naming the registered ones
    assert Path(cfg.trainer.deepspeed).exists()
    if cfg.trainer.stage == "head":  # encoder + head, no LLM: one batch of the loader's dummies through it
        import dataclasses

        from medmm.data.loaders import build_loader
        from medmm.model.heads import build_head_model

        h = cfg.head
        if h.objective == "multiclass" and not h.classes:
            h = dataclasses.replace(h, classes=["a", "b", "c"])
        model = build_head_model(h)
        assert all(p.dim() > 0 for p in model.parameters())  # DeepSpeed broadcasts parameters viewed as bytes
        loader = build_loader(h.loader, h.preprocess)
        batch = loader.collate([loader.dummy(), loader.dummy()])
        logits = model(batch["x"], batch.get("mask"))
        assert logits.shape == ((2,) if h.objective == "binary" else (2, len(h.classes)))
        assert torch.isfinite(logits).all()
        return
    if cfg.trainer.stage == "mol_pretrain":  # GNN + masking head + projection on two molecules' views, no LLM
        from encoders import build_encoder
        from medmm.io.molecules import mol_graph, parse_smiles
        from medmm.training.stages.mol_pretrain import MolPretrainModel, PretrainDataset, collate_views

        s = cfg.mol_pretrain
        model = MolPretrainModel(build_encoder(s.encoder.name, **s.encoder.kwargs), s, s.encoder.name,
                                 s.encoder.kwargs)
        ds = PretrainDataset([mol_graph(parse_smiles(x)) for x in ("CCO", "c1ccccc1O")], s, 0)
        out = model(**collate_views([ds[0], ds[1]]))
        assert torch.isfinite(out["loss"]) and set(s.objectives) <= {"attr_mask", "contrastive"}
        return
    from medmm.model.multimodal import MedMMForCausalLM

    cfg = load_config(TrainConfig, path, [f"model.llm={tiny_llm}"])
    model = MedMMForCausalLM.from_config(cfg.model)
    assert set(model.modality_tokens) == set(cfg.model.modalities)


@pytest.mark.parametrize("path", DS, ids=lambda p: p.name)
def test_deepspeed_json_fills(path):
    from medmm.config import TrainerConfig
    from medmm.training.loop import build_ds_config

    ds = build_ds_config(TrainerConfig(deepspeed=str(path), micro_batch_size=3, grad_accum=2), world_size=2)
    assert ds["train_batch_size"] == 12
    assert "zero_optimization" in json.loads(path.read_text())
