"""Merged Hugging Face export: the LLM loads with AutoModelForCausalLM and the model gives the same greedy output."""

import pytest
import torch

from medmm.config import ModelConfig, config_from_dict
from medmm.export.hf import export_hf
from medmm.model.multimodal import MedMMForCausalLM
from tests.conftest import model_dict


def test_export_hf_round_trip(tiny_llm, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = MedMMForCausalLM.from_config(config_from_dict(ModelConfig, model_dict(tiny_llm, llm_trainable="lora")))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # make LoRA matter
    ckpt = m.save_pretrained(tmp_path / "ckpt")
    out = export_hf(ckpt, tmp_path / "export")
    assert not (out / "llm_adapter").exists() and (out / "README.md").exists()
    hf = AutoModelForCausalLM.from_pretrained(out / "llm")
    assert not any("lora" in n for n, _ in hf.named_parameters())

    before, after = MedMMForCausalLM.from_pretrained(ckpt).eval(), MedMMForCausalLM.from_pretrained(out).eval()
    proc = before.processor(256)
    req = proc.process_prompt({"modalities": {"mol": "CCO"}, "conversations": [{"from": "human", "value": "drug?"}]})
    batch = proc.collate([req], padding_side="left")
    a = before.generate(batch["input_ids"], batch["attention_mask"], batch["modality_inputs"], max_new_tokens=8,
                        do_sample=False)
    b = after.generate(batch["input_ids"], batch["attention_mask"], batch["modality_inputs"], max_new_tokens=8,
                       do_sample=False)
    assert torch.equal(a, b)
    with torch.no_grad():
        la = before(**proc.collate([req])).logits
        lb = after(**proc.collate([req])).logits
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)
    # a LoRA that changes the output was really merged: the base LLM alone differs
    base = AutoModelForCausalLM.from_pretrained(ckpt / "llm")
    assert not torch.allclose(base.lm_head.weight, hf.lm_head.weight) or not torch.allclose(
        base.model.layers[0].self_attn.q_proj.weight, hf.model.layers[0].self_attn.q_proj.weight)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a medmm model folder"):
        MedMMForCausalLM.from_pretrained(tmp_path)
