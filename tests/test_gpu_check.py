"""``make gpu-check``: the GPU benchmark script runs end to end on the CPU at tiny size (``DRY_RUN=1``); on a GPU,
bf16 forward/backward of the multimodal model agree with fp32."""

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))


def test_make_target_passes_dry_run():
    out = subprocess.run(["make", "-n", "gpu-check", "DRY_RUN=1"], cwd=REPO, capture_output=True, text=True).stdout
    assert "bench/gpu_check.py --dry-run" in out
    out = subprocess.run(["make", "-n", "gpu-check"], cwd=REPO, capture_output=True, text=True).stdout
    assert "bench/gpu_check.py" in out and "--dry-run" not in out


def test_mfu_parts():
    import gpu_check

    assert gpu_check.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_check.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_check.peak_flops("some new card") is None
    assert gpu_check.model_flops_per_token(1_000_000, 2, 64, 128) == 6_000_000 + 12 * 2 * 64 * 128


@pytest.mark.slow
@pytest.mark.deepspeed
def test_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    for k in ("device", "params", "tokens_per_s", "mfu", "decode_tokens_per_s"):
        assert k in d
    assert d["dry_run"] and d["zero_stage"] == 2 and d["gradient_checkpointing"] and d["attn_implementation"] == "sdpa"
    assert d["params"] > d["llm_params"] > 0 and d["encoder_params"] > 0
    assert d["tokens_per_s"] > 0 and d["decode_tokens_per_s"] > 0
    assert d["decode_new_tokens"] * d["decode_batch"] > 0 and len(d["losses"]) == 3


@pytest.mark.gpu
def test_bf16_forward_backward_matches_fp32():
    """The same weights in fp32 and bf16 (SDPA, gradient checkpointing): losses within 2%, gradients aligned."""
    import gpu_check

    s = dict(gpu_check.TINY, hidden=256, layers=4, heads=8, kv_heads=4, intermediate=512, seq=256, batch=2)
    m32, _ = gpu_check.build(s, torch.float32, "sdpa")
    m32 = m32.cuda().train()
    m16, _ = gpu_check.build(s, torch.float32, "sdpa")
    m16.load_state_dict(m32.state_dict())
    m16 = m16.cuda().to(torch.bfloat16).train()
    from medmm.training.loop import to_device

    batch = to_device(gpu_check.batch_of(m32, s), "cuda")
    l32 = m32(**batch).loss
    l32.backward()
    l16 = m16(**batch).loss
    l16.backward()
    assert l16.dtype == torch.bfloat16
    assert float(l16) == pytest.approx(float(l32), rel=2e-2)
    g32 = torch.cat([p.grad.flatten() for p in m32.llm.parameters()])
    g16 = torch.cat([p.grad.float().flatten() for p in m16.llm.parameters()])
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.98
