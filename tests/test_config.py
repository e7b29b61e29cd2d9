"""Typed config loading: YAML + dotted overrides; unknown keys and wrong types name the key and file."""

import pytest

from medmm.config import ModelConfig, TrainConfig, apply_overrides, config_from_dict, load_config
from medmm.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_and_dotted_overrides(tmp_path):
    p = write(tmp_path, "trainer:\n  max_steps: 5\n  lr: 1e-3\nmodel:\n  llm: x\n")
    cfg = load_config(TrainConfig, p, ["trainer.max_steps=20", "model.modalities.image.encoder.name=vit2d_tiny"])
    assert cfg.trainer.max_steps == 20
    assert cfg.trainer.lr == pytest.approx(1e-3)
    assert cfg.model.modalities["image"].encoder.name == "vit2d_tiny"


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "trainer:\n  max_step: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, p)
    assert "trainer.max_step" in str(e.value) and str(p) in str(e.value)


def test_unknown_override_key(tmp_path):
    p = write(tmp_path, "{}\n")
    with pytest.raises(ConfigError, match="model.foo"):
        load_config(TrainConfig, p, ["model.foo=1"])


def test_wrong_type_names_key(tmp_path):
    p = write(tmp_path, "trainer:\n  max_steps: many\n")
    with pytest.raises(ConfigError, match=r"trainer\.max_steps.*integer"):
        load_config(TrainConfig, p)
    with pytest.raises(ConfigError, match="llm_trainable"):
        config_from_dict(ModelConfig, {"llm_trainable": "half"})


def test_post_init_checks():
    with pytest.raises(ConfigError, match="max_steps"):
        config_from_dict(TrainConfig, {"trainer": {"max_steps": 0}})
    with pytest.raises(ConfigError, match="volume_size"):
        config_from_dict(ModelConfig, {"modalities": {"volume": {"preprocess": {"volume_size": [1, 2]}}}})


def test_list_index_override():
    d = {"data": {"datasets": [{"path": "a"}, {"path": "b"}]}}
    apply_overrides(d, ["data.datasets.1.path=c"])
    assert d["data"]["datasets"][1]["path"] == "c"
    with pytest.raises(ConfigError, match="index"):
        apply_overrides(d, ["data.datasets.5.path=c"])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainConfig, "/nonexistent.yaml")
