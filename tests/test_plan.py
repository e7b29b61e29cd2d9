"""``medmm plan``: DeepSpeed's own estimators agree with the plan's model-state figures; parameter counts equal
the built model's; the activation estimate is checked against the tensors autograd really keeps."""

import contextlib
import io
import json
import re

import pytest
import torch

from medmm.training.plan import LlmShape, activation_bytes, make_plan, zero2_model_states, zero3_model_states
from tests.conftest import model_dict

GiB = 2**30


def cold_rows(fn, *args, **kw) -> list[tuple[float, float, str]]:
    """(per CPU GB, per GPU GB, options) of the table a DeepSpeed ``*_all_cold`` estimator prints."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(*args, **kw)
    rows = re.findall(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)$", buf.getvalue(), flags=re.M)
    assert rows, buf.getvalue()
    return [(float(c), float(g), o.replace(" ", "")) for c, g, o in rows]


@pytest.mark.parametrize("total,largest,gpus,nodes", [(7_000_000_000, 131_000_000, 8, 1),
                                                      (70_000_000_000, 1_050_000_000, 8, 4),
                                                      (1_100_000_000, 65_000_000, 1, 1),
                                                      (300_000_000, 25_000_000, 2, 2)])
def test_model_states_equal_deepspeed_all_cold_estimators(total, largest, gpus, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    z2 = cold_rows(estimate_zero2_model_states_mem_needs_all_cold, total, gpus, nodes)
    for cpu, gpu, opts in z2:
        mine = zero2_model_states(total, gpus, nodes, cpu_offload="offload_optimizer=none" not in opts)
        assert (round(mine[0] / GiB, 2), round(mine[1] / GiB, 2)) == pytest.approx((cpu, gpu), abs=0.006), opts
    z3 = cold_rows(estimate_zero3_model_states_mem_needs_all_cold, total, largest, gpus, nodes)
    assert len(z3) == 6
    for cpu, gpu, opts in z3:
        mine = zero3_model_states(total, largest, gpus, nodes, cpu_offload="offload_optimizer=none" not in opts,
                                  cpu_offload_params="offload_param=none" not in opts, zero_init="zero_init=1" in opts)
        assert (round(mine[0] / GiB, 2), round(mine[1] / GiB, 2)) == pytest.approx((cpu, gpu), abs=0.006), opts


def tiny_cfg(tiny_llm, **trainer):
    from medmm.config import TrainConfig, config_from_dict

    md = model_dict(tiny_llm, llm_trainable="lora")
    md["modalities"] = {k: v for k, v in md["modalities"].items() if k in ("image", "mol")}
    return config_from_dict(TrainConfig, {"model": md, "data": {"max_length": 128},
                                          "trainer": {"micro_batch_size": 2, "grad_accum": 3, **trainer}})


def test_plan_counts_equal_the_built_model_and_stages_follow_deepspeed(tiny_llm):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from medmm.model.multimodal import MedMMForCausalLM

    cfg = tiny_cfg(tiny_llm)
    plan = make_plan(cfg, gpus_per_node=4, nodes=2, gpu_memory_gb=80)
    model = MedMMForCausalLM.from_config(cfg.model)
    real = {id(p): p for p in model.parameters()}.values()
    assert plan.total_params == sum(p.numel() for p in real)
    assert plan.trainable_params == sum(p.numel() for p in real if p.requires_grad) < plan.total_params  # LoRA
    assert plan.params["encoders.image"]["total"] == sum(p.numel() for p in model.encoders["image"].parameters())
    assert plan.largest_layer_params == max(sum(p.numel() for p in m.parameters(recurse=False))
                                            for m in model.modules())
    total, largest = plan.total_params, plan.largest_layer_params
    assert plan.model_states["zero2"]["gpu"] == estimate_zero2_model_states_mem_needs(total, 4, 2, cpu_offload=False)[1]
    assert plan.model_states["zero3"]["gpu"] == estimate_zero3_model_states_mem_needs(
        total, largest, 4, 2, cpu_offload=False, cpu_offload_params=False)[1]
    assert plan.model_states["zero3_offload"]["cpu"] == estimate_zero3_model_states_mem_needs(
        total, largest, 4, 2, cpu_offload=True, cpu_offload_params=True)[0]
    assert plan.tokens_per_step == 2 * 3 * 8 * 128
    assert plan.first_fit == "zero2"  # a tiny model fits anywhere
    assert plan.activations["checkpointing"] < plan.activations["no_checkpointing"]
    tight = make_plan(cfg, 1, 1, gpu_memory_gb=(plan.model_states["zero3"]["gpu"] + plan.activations[
        "no_checkpointing"]) / 1e9 * 1.0001, counts=(plan.params, largest, LlmShape(64, 256, 2, 4, 2, 1100)))
    assert tight.fits["zero3"] or tight.fits["zero3_offload"]


def test_cli_plan_json_and_table(tiny_llm, tmp_path, capsys):
    import yaml

    from medmm.cli import main

    cfg = tmp_path / "c.yaml"
    md = model_dict(tiny_llm)
    md["modalities"] = {"image": md["modalities"]["image"]}
    cfg.write_text(yaml.safe_dump({"model": md, "data": {"max_length": 64}}))
    main(["plan", "--config", str(cfg), "--gpus", "2", "--gpu-memory", "24", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert set(d["model_states"]) == {"zero2", "zero3", "zero3_offload"} and d["first_fit"] == "zero2"
    assert d["params"]["llm"]["total"] > 0 and "projectors.image" in d["params"]
    main(["plan", "--config", str(cfg), "--gpus", "2", "--nodes", "2", "--gpu-memory", "24"])
    out = capsys.readouterr().out
    assert "first stage that fits: zero2" in out and "2 node(s) x 2 GPU(s)" in out


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_against_saved_tensors(checkpointing):
    """Bytes of the distinct tensors autograd saves in one fp32 forward of a Llama (hooks count each storage once;
    with checkpointing, the peak of one recomputed layer is added by the estimate, so compare the stored part)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa")
    torch.manual_seed(0)
    m = LlamaForCausalLM(c)
    if checkpointing:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.train()
    b, s = 2, 128
    x = torch.randint(0, 512, (b, s))
    params = {p.data_ptr() for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in params and t.dtype.is_floating_point:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(input_ids=x, labels=x).loss.backward()
    got = sum(seen.values())
    est = activation_bytes(LlmShape.from_hf_config(c), b, s, bytes_per_elem=4, checkpointing=checkpointing)
    if checkpointing:  # the estimate's one recomputed layer lives only inside backward, not among the saved tensors
        est -= 4 * b * s * (6 * 128 + 2 * 64 + 4 * 352)
    assert 0.6 < est / got < 1.6, (est, got)
