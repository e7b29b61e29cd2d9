"""``trainer.init_from`` carries the LLM (merged or as an adapter), encoders and projectors into the next stage."""

import pytest
import torch

from medmm.errors import ConfigError
from tests.conftest import model_dict

TEXT = "The lungs are clear. No acute abnormality of the head."


def _build(tiny_llm, modalities=(), **kw):
    from medmm.config import ModelConfig, config_from_dict
    from medmm.model.multimodal import MedMMForCausalLM

    d = model_dict(tiny_llm, **kw)
    d["modalities"] = {k: v for k, v in d["modalities"].items() if k in modalities}
    return MedMMForCausalLM.from_config(config_from_dict(ModelConfig, d))


def _perturb(model, seed=1):
    """Stand-in for training: move every trainable tensor (LoRA matrices, modules_to_save, projectors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _text_logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0]  # (T, V)


@pytest.fixture
def pretrained(tiny_llm, tmp_path):
    """A text-only 'pretrain' result: LoRA + a trained lm_head copy, saved as a medmm folder."""
    src = _build(tiny_llm, llm_trainable="lora", lora={"r": 4, "alpha": 8, "modules_to_save": ["lm_head"]})
    _perturb(src)
    src.save_pretrained(tmp_path / "pretrain")
    return src, tmp_path / "pretrain"


def test_merged_llm_carried_into_a_model_with_a_new_modality(tiny_llm, pretrained):
    from medmm.training.warm_start import warm_start

    src, folder = pretrained
    ids = torch.tensor(src.tokenizer(TEXT)["input_ids"])
    expected = _text_logits(src, ids)
    # the SFT model adds <image> (a vocabulary one longer) and a fresh LoRA of another rank
    dst = _build(tiny_llm, modalities=("image",), llm_trainable="lora", lora={"r": 8, "alpha": 16})
    before = _text_logits(dst, ids)
    loaded = warm_start(dst, folder, "merged")
    assert loaded["llm"] > 0
    got = _text_logits(dst, ids)
    v = expected.shape[-1]
    assert got.shape[-1] == v + 1  # the new placeholder's column
    torch.testing.assert_close(got[:, :v], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before[:, :v], expected, atol=1e-3)
    # the new adapter still trains (and starts as a no-op: lora_B is zero)
    assert any(p.requires_grad for n, p in dst.llm.named_parameters() if "lora_" in n)


def test_adapter_carried_and_trained_on(tiny_llm, pretrained):
    from medmm.training.warm_start import warm_start

    src, folder = pretrained
    ids = torch.tensor(src.tokenizer(TEXT)["input_ids"])
    expected = _text_logits(src, ids)
    dst = _build(tiny_llm, modalities=("image",), llm_trainable="lora",
                 lora={"r": 4, "alpha": 8, "modules_to_save": ["lm_head"]})
    loaded = warm_start(dst, folder, "adapter")
    assert loaded["llm_adapter"] > 0
    torch.testing.assert_close(_text_logits(dst, ids)[:, :expected.shape[-1]], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="adapter"):
        warm_start(_build(tiny_llm, llm_trainable="lora", lora={"r": 8, "alpha": 16}), folder, "adapter")
    with pytest.raises(ConfigError, match="llm_trainable: lora"):
        warm_start(_build(tiny_llm, llm_trainable="full"), folder, "adapter")


def test_encoders_and_projectors_carried_and_none_leaves_the_llm(tiny_llm, tmp_path):
    from medmm.training.warm_start import warm_start

    src = _build(tiny_llm, modalities=("image", "mol"), llm_trainable="full")
    _perturb(src)
    src.save_pretrained(tmp_path / "stage1")
    dst = _build(tiny_llm, modalities=("image",), llm_trainable="frozen")
    ref = {k: v.clone() for k, v in dst.llm.state_dict().items()}
    loaded = warm_start(dst, tmp_path / "stage1", "none")
    assert set(loaded) == {"encoders.image", "projectors.image"}
    for k, v in src.projectors["image"].state_dict().items():
        torch.testing.assert_close(dst.projectors["image"].state_dict()[k], v)
    assert all(torch.equal(v, ref[k]) for k, v in dst.llm.state_dict().items())
    warm_start(dst, tmp_path / "stage1", "merged")  # now the LLM comes too
    ids = torch.tensor(src.tokenizer(TEXT)["input_ids"])
    torch.testing.assert_close(_text_logits(dst, ids), _text_logits(src, ids)[:, :-1], atol=1e-5, rtol=1e-5)


def test_not_a_medmm_folder(tiny_llm, tmp_path):
    from medmm.training.warm_start import warm_start

    with pytest.raises(ConfigError, match="not a medmm model folder"):
        warm_start(_build(tiny_llm), tmp_path, "merged")
