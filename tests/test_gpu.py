"""GPU-only paths: bf16 training through DeepSpeed and flash/SDPA attention. Skipped with a reason on CPU."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_bf16_forward_backward_on_gpu(tiny_llm):
    from medmm.config import ModelConfig, TrainerConfig, config_from_dict
    from medmm.model.multimodal import MedMMForCausalLM
    from medmm.training.loop import build_ds_config
    from tests.conftest import model_dict

    cfg = config_from_dict(ModelConfig, model_dict(tiny_llm, llm_trainable="lora", attn_implementation="sdpa"))
    m = MedMMForCausalLM.from_config(cfg).cuda().to(torch.bfloat16)
    proc = m.processor(256)
    b = proc.collate([proc.process({"modalities": {"mol": "CCO"}, "conversations": [
        {"from": "human", "value": "drug?"}, {"from": "gpt", "value": "yes"}]})])
    b = {k: (v.cuda() if torch.is_tensor(v) else {n: {kk: vv.cuda() for kk, vv in d.items()} for n, d in v.items()})
         for k, v in b.items()}
    loss = m(**b).loss
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.bfloat16
    assert build_ds_config(TrainerConfig(precision="auto"), 1).get("bf16") == {"enabled": True}
