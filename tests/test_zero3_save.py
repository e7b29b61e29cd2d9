"""The ZeRO-3 final save: module-by-module gathers streamed into safetensors shards (never the whole model at
once), and the folder it writes equals DeepSpeed's own consolidated fp32 weights (``zero_to_fp32``)."""

import pytest
import torch


def test_stream_shards_roundtrip_and_restore_without_zero(tmp_path):
    """Without ZeRO-3 partitions the gathers are no-ops: the shards hold every parameter once (tied ones too),
    split by size and dtype, memory-map back bit for bit, and the parameters are restored after the swap."""
    from medmm.training.checkpoint import _params_from_shards, mmap_safetensors, stream_zero3_weights

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16), torch.nn.LayerNorm(16),
                            torch.nn.Linear(16, 50, bias=False))
    m[3].weight = m[0].weight  # tied, as an LLM's lm_head and embeddings
    m[1].to(torch.bfloat16)
    index = stream_zero3_weights(m, tmp_path / "s", max_shard_bytes=1000)
    named = dict(m.named_parameters())
    assert set(index) == set(named)  # the tied weight once
    assert len(set(index.values())) >= 3  # the 3200-byte embedding alone, bf16 linear, fp32 norm
    loaded = {}
    for f in set(index.values()):
        part = mmap_safetensors(tmp_path / "s" / f)
        assert len({t.dtype for t in part.values()}) == 1
        loaded.update(part)
    for k, p in named.items():
        assert loaded[k].dtype == p.dtype and torch.equal(loaded[k], p.detach())
    before = {k: p.data for k, p in named.items()}
    with _params_from_shards(m, tmp_path / "s", index):
        assert m[3].weight is m[0].weight and m[0].weight.data.data_ptr() != before["0.weight"].data_ptr()
    assert all(p.data_ptr() == before[k].data_ptr() for k, p in m.named_parameters())


@pytest.mark.deepspeed
@pytest.mark.slow
def test_two_ranks_zero3_final_folder_equals_zero_to_fp32(zero3_two_ranks):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from medmm.model.multimodal import MedMMForCausalLM

    cfg, r = zero3_two_ranks  # 2 ranks, ZeRO-3, 6 steps, saved at steps 3 and 6 (tests/conftest.py)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "zero=3" in r.stdout
    run = cfg.parent / "run"
    assert not list(run.glob(".checkpoint.zero3-shards*"))  # the scratch shards are gone
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    ref = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step-00000006")
    saved = dict(MedMMForCausalLM.from_pretrained(run / "checkpoint").named_parameters())
    assert set(saved) == set(ref)
    init = dict(MedMMForCausalLM.from_pretrained(run / "checkpoint").named_parameters())
    for k, v in ref.items():
        assert torch.equal(saved[k].detach(), v.to(saved[k].dtype)), k
    # the weights did move away from the initial ones (the comparison is not between two untouched models)
    from medmm.config import TrainConfig, load_config
    from medmm.utils import seed_everything

    c = load_config(TrainConfig, cfg)
    seed_everything(c.trainer.seed)
    fresh = dict(MedMMForCausalLM.from_config(c.model).named_parameters())
    assert any(not torch.equal(fresh[k].detach(), init[k].detach()) for k in ref)
