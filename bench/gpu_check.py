"""The GPU path end to end on one CUDA GPU: bf16 training of a ~1B-parameter Llama-shaped model with an image
encoder (SDPA attention, gradient checkpointing, DeepSpeed ZeRO-2), then bf16 decoding.

Random weights built from configs (nothing is downloaded): a Llama of hidden 2048, 16 layers, 32 heads (8 KV
heads), MLP 5632, vocabulary 32000 (about 1.1B parameters, TinyLlama's shape) and a timm ViT-B/16 image encoder
(224 px, 196 patch tokens) behind an ``mlp2x_gelu`` projector, assembled by :class:`MedMMForCausalLM` exactly as
training builds it. The batch is one sample image per sequence plus random text up to ``--seq`` tokens, all
positions supervised. Prints and writes ``bench/results/gpu_check.json``:

- ``tokens_per_s``: trained tokens per second (after ``--warmup`` steps, over ``--steps`` steps);
- ``mfu``: model FLOPs per second over the card's peak dense bf16 FLOPs (``--peak-tflops`` or a table of known
  cards; null when the card is unknown). Model FLOPs per token = 6 x (LLM parameters without the embedding table)
  + 12 x layers x hidden x sequence (attention), plus the encoder's 6 x parameters x patches per image; the
  recomputation of gradient checkpointing is not counted (it is hardware FLOPs, not model FLOPs);
- ``decode_tokens_per_s``: greedy bf16 decoding with the KV cache, ``--decode-batch`` sequences x
  ``--decode-tokens`` new tokens.

``--dry-run`` builds and runs everything on the CPU at tiny size in fp32 (bf16 needs the GPU in DeepSpeed's CPU
path), so the script is known to work where no GPU is (``make gpu-check DRY_RUN=1``; tests/test_gpu_check.py);
its figures mean nothing and it writes ``bench/results/gpu_check_dry_run.json`` unless ``--out`` says otherwise.

Run::

    python bench/gpu_check.py               # on a CUDA GPU, ~3-5 minutes on an H100
    python bench/gpu_check.py --dry-run     # anywhere, ~1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Peak dense bf16 tensor FLOP/s (no sparsity) by substring of torch.cuda.get_device_name().
PEAK_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12),
             ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
             ("RTX 4090", 165e12), ("V100", 125e12)]

FULL = dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=5632, vocab=32000,
            encoder="vit2d", encoder_kwargs={"model_name": "vit_base_patch16_224", "img_size": 224}, image_size=224,
            seq=2048, batch=4, steps=10, warmup=3, decode_batch=8, decode_tokens=128)
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1024, encoder="vit2d_tiny",
            encoder_kwargs={}, image_size=64, seq=64, batch=2, steps=2, warmup=1, decode_batch=2, decode_tokens=8)


def peak_flops(device_name: str) -> float | None:
    """The card's peak dense bf16 FLOP/s from :data:`PEAK_BF16`, or None for an unknown card."""
    for key, flops in PEAK_BF16:
        if key in device_name:
            return flops
    return None


def model_flops_per_token(llm_params_no_embed: int, layers: int, hidden: int, seq: int) -> float:
    """Training FLOPs per token of a decoder (PaLM appendix B): 6N + 12 L H S."""
    return 6 * llm_params_no_embed + 12 * layers * hidden * seq


def build(s: dict, dtype, attn: str):
    """The MedMM model (LLM + image encoder + projector) from configs, random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from medmm.config import ModelConfig, config_from_dict
    from medmm.model.multimodal import MedMMForCausalLM, add_modality_tokens
    from medmm.model.tiny import sample_texts, train_tokenizer

    tok = train_tokenizer(sample_texts(ROOT / "data" / "sample"), vocab_size=1024)
    add_modality_tokens(tok, ["image"])
    c = LlamaConfig(vocab_size=max(s["vocab"], len(tok)), hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                    num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                    max_position_embeddings=max(4096, s["seq"] + s["decode_tokens"] + 512), tie_word_embeddings=False,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    c._attn_implementation = attn
    torch.manual_seed(0)
    llm = LlamaForCausalLM(c).to(dtype)
    mc = config_from_dict(ModelConfig, {
        "llm": "<built in memory>", "llm_trainable": "full", "gradient_checkpointing": True, "attn_implementation": attn,
        "modalities": {"image": {"loader": "image", "encoder": {"name": s["encoder"], "kwargs": s["encoder_kwargs"],
                                                                "trainable": "full"},
                                 "projector": {"type": "mlp2x_gelu"}, "preprocess": {"image_size": s["image_size"]}}}})
    model = MedMMForCausalLM._assemble(mc, llm, tok, load_encoder_weights=False)
    return model.to(dtype), c


def batch_of(model, s: dict, seed: int = 0) -> dict:
    """``batch`` sequences: a sample image then random tokens up to ``seq``, every text position a label."""
    import torch

    img = sorted((ROOT / "data" / "sample" / "vqa_rad" / "images").glob("*.jpg"))[0]
    proc = model.processor(s["seq"])
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(s["batch"]):
        smp = proc.process({"modalities": {"image": str(img)},
                            "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                              {"from": "gpt", "value": "x"}]})
        ids = smp["input_ids"]
        extra = s["seq"] - ids.shape[0]
        rnd = torch.randint(3, len(model.tokenizer) - 1, (max(extra, 0),), generator=g)
        keep = model.tokenizer.convert_tokens_to_ids("<image>")
        rnd[rnd == keep] = 5
        smp["input_ids"] = torch.cat([ids, rnd])[: s["seq"]]
        smp["labels"] = torch.cat([smp["labels"], rnd])[: s["seq"]]
        samples.append(smp)
    return proc.collate(samples)


def run(a) -> dict:
    from medmm.training.distributed import init_distributed

    init_distributed()
    import deepspeed
    import torch

    from medmm.training.loop import to_device

    s = dict(TINY if a.dry_run else FULL)
    for k in ("seq", "batch", "steps", "warmup", "layers"):
        if getattr(a, k) is not None:
            s[k] = getattr(a, k)
    cuda = torch.cuda.is_available() and not a.dry_run
    if not cuda and not a.dry_run:
        raise SystemExit("gpu_check: no CUDA GPU here; run with --dry-run (make gpu-check DRY_RUN=1)")
    dtype = torch.bfloat16 if cuda else torch.float32
    attn = "sdpa"
    model, c = build(s, dtype, attn)
    llm_params = sum(p.numel() for p in model.llm.parameters())
    embed = model.llm.get_input_embeddings().weight.numel()
    enc_params = sum(p.numel() for p in model.encoders["image"].parameters())
    total = sum(p.numel() for p in model.parameters())
    ds = {"train_micro_batch_size_per_gpu": s["batch"], "gradient_accumulation_steps": 1, "train_batch_size": s["batch"],
          "gradient_clipping": 1.0, "zero_optimization": {"stage": 2, "overlap_comm": cuda, "contiguous_gradients": True},
          "steps_per_print": 10**9}
    if cuda:
        ds["bf16"] = {"enabled": True}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=cuda)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    engine.train()
    batch = to_device(batch_of(model, s), engine.device)
    ntok = int(batch["input_ids"].numel())
    times, losses = [], []
    for i in range(s["warmup"] + s["steps"]):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        if i >= s["warmup"]:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    step_s = sum(times) / len(times)
    tokens_per_s = ntok / step_s
    with torch.no_grad():  # image tokens per sample: (1, N, D)
        patches = engine.module.encoders["image"](batch["modality_inputs"]["image"]["x"][:1]).tokens.shape[1]
    flops_tok = model_flops_per_token(llm_params - embed, c.num_hidden_layers, c.hidden_size, s["seq"])
    flops_step = flops_tok * ntok + 6 * enc_params * patches * s["batch"]
    device = torch.cuda.get_device_name(0) if cuda else "cpu (dry run)"
    peak = a.peak_tflops * 1e12 if a.peak_tflops else (peak_flops(device) if cuda else None)
    mfu = flops_step / step_s / peak if peak else None
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    # decoding: the trained module, bf16, KV cache, greedy, a fixed number of new tokens
    module = engine.module.eval()
    module.llm.gradient_checkpointing_disable()  # (checkpointing turns the KV cache off)
    prompt = batch["input_ids"][: s["decode_batch"], :32]
    if prompt.shape[0] < s["decode_batch"]:
        prompt = prompt.repeat((s["decode_batch"] + prompt.shape[0] - 1) // prompt.shape[0], 1)[: s["decode_batch"]]
    gen = dict(max_new_tokens=s["decode_tokens"], min_new_tokens=s["decode_tokens"], do_sample=False, use_cache=True,
               pad_token_id=model.tokenizer.pad_token_id)
    with torch.no_grad():
        module.llm.generate(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                            pad_token_id=model.tokenizer.pad_token_id)  # warm-up
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = module.llm.generate(prompt, **gen)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    new = (out.shape[1] - prompt.shape[1]) * out.shape[0]
    res = {"device": device, "dry_run": bool(a.dry_run), "dtype": str(dtype).replace("torch.", ""),
           "attn_implementation": attn, "gradient_checkpointing": True, "zero_stage": 2, "params": total,
           "llm_params": llm_params, "encoder_params": enc_params, "seq": s["seq"], "micro_batch": s["batch"],
           "steps_timed": s["steps"], "step_s": step_s, "tokens_per_s": tokens_per_s,
           "model_flops_per_step": flops_step, "peak_flops": peak, "mfu": mfu,
           "decode_tokens_per_s": new / dt, "decode_batch": s["decode_batch"], "decode_new_tokens": s["decode_tokens"],
           "max_memory_allocated_gib": mem, "losses": losses, "torch": torch.__version__,
           "deepspeed": deepspeed.__version__}
    if not all(map(lambda x: x == x and abs(x) != float("inf"), losses)):
        raise SystemExit(f"gpu_check: non-finite loss {losses}")
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, fp32: checks the script only")
    ap.add_argument("--seq", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--peak-tflops", type=float, help="the card's peak dense bf16 TFLOP/s (else from a table)")
    ap.add_argument("--out", help="results file (default bench/results/gpu_check.json, or gpu_check_dry_run.json)")
    a = ap.parse_args(argv)
    res = run(a)
    out = Path(a.out or ROOT / "bench" / "results" / ("gpu_check_dry_run.json" if a.dry_run else "gpu_check.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    mfu = f"{res['mfu']:.1%}" if res["mfu"] is not None else "n/a"
    print(f"{res['device']}: {res['params'] / 1e9:.2f}B params, {res['tokens_per_s']:,.0f} train tokens/s, MFU {mfu}, "
          f"{res['decode_tokens_per_s']:,.0f} decode tokens/s -> {out}", flush=True)
    return res


if __name__ == "__main__":
    main()
