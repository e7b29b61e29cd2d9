"""Training-step benchmark: medmm's multimodal model vs Hugging Face LLaVA, same shapes, same batch.

Times ONE training step (zero_grad + forward + loss + backward + AdamW step) of
``MedMMForCausalLM`` (``hf_vision`` CLIP tower -> ``mlp2x_gelu`` projector -> Llama, all trainable)
against ``transformers.LlavaForConditionalGeneration`` built with the same CLIP vision config, the same
Llama text config (copied from medmm's LLM after the ``<image>`` token was added), the same projector
(``mlp2x_gelu``, ``vision_feature_layer=-2``, CLS dropped) and the very same batch: identical
``input_ids`` (LLaVA's ``image_token_id`` is medmm's ``<image>`` id, expanded to one position per
patch), attention mask, labels and pixel values. Weights are random and differ; shapes and FLOPs match.

After warm-up the two models' steps are interleaved (the order alternates every step) so that clock
and thermal drift hit both equally. Reports per-model median and IQR and the ratio of medians
medmm / llava (goal <= 1.05); writes ``bench/results/train_step.json``; the last printed line is the
headline figure.

Run::

    python bench/train_step.py                      # default: --size small --batch 8 --device auto
    python bench/train_step.py --size base --steps 20 --device cpu
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, bench_parser, environment, resolve_device, write_result

GOAL = 1.05
# vision: CLIPVisionConfig kwargs; llm: build_tiny_llm kwargs (Llama family).
SIZES = {
    "small": {"vision": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             image_size=64, patch_size=8),
              "llm": dict(hidden=64, layers=2, heads=4, kv_heads=2)},
    "base": {"vision": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                            image_size=112, patch_size=14),
             "llm": dict(hidden=384, layers=6, heads=6, kv_heads=2, intermediate=1024)},
}


def records(n: int) -> list[dict]:
    """``n`` VQA-RAD image questions from the bundled sample (cycled when ``n`` exceeds it)."""
    qa_dir = ROOT / "data" / "sample" / "vqa_rad"
    qa = [q for q in json.loads((qa_dir / "testset.json").read_text()) if (qa_dir / "images" / q["image_name"]).exists()]
    return [{"id": f"q{i}", "modalities": {"image": str(qa_dir / "images" / q["image_name"])},
             "conversations": [{"from": "human", "value": f"<image>\n{q['question']}"},
                               {"from": "gpt", "value": str(q["answer"])}]}
            for i, q in enumerate(qa[i % len(qa)] for i in range(n))]


def build_medmm(llm_dir: Path, vision: dict):
    from medmm.config import ModelConfig, config_from_dict
    from medmm.model.multimodal import MedMMForCausalLM

    cfg = config_from_dict(ModelConfig, {
        "llm": str(llm_dir), "llm_trainable": "full",
        "modalities": {"image": {
            "loader": "image",
            "encoder": {"name": "hf_vision", "kwargs": {"config": vision, "feature_layer": -2, "drop_cls": True},
                        "trainable": "full"},
            "projector": {"type": "mlp2x_gelu", "trainable": "full"},
            "preprocess": {"image_size": vision["image_size"]}}}})
    return MedMMForCausalLM.from_config(cfg)


def build_llava(medmm_model, vision: dict, image_token_id: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(**medmm_model.llm.config.to_dict())  # vocab already includes <image>
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=text, image_token_id=image_token_id,
                      projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
                      multimodal_projector_bias=True, tie_word_embeddings=False)
    return LlavaForConditionalGeneration(cfg)


def n_params(model: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def attn_impls(model: torch.nn.Module) -> list[str]:
    return sorted({str(getattr(m.config, "_attn_implementation", None)) for m in model.modules()
                   if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")})


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(ms: list[float]) -> dict:
    return {"median_ms": percentile(ms, 0.5), "p25_ms": percentile(ms, 0.25), "p75_ms": percentile(ms, 0.75),
            "iqr_ms": percentile(ms, 0.75) - percentile(ms, 0.25), "min_ms": min(ms),
            "mean_ms": sum(ms) / len(ms), "n": len(ms)}


def make_step(model, batch: dict, device: torch.device, lr: float = 1e-4):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> tuple[float, float]:
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        sync()
        return (time.perf_counter() - t0) * 1e3, float(loss.detach())

    return step


def main(argv: list[str] | None = None) -> dict:
    ap = bench_parser(__doc__, "train_step", SIZES)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per model")
    args = ap.parse_args(argv)
    device = resolve_device(ap, args)
    size = SIZES[args.size]
    vision = dict(size["vision"])

    import transformers

    from medmm.model.tiny import build_tiny_llm, sample_texts

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="medmm-bench-") as tmp:
        llm_dir = build_tiny_llm(Path(tmp) / "llm", sample_texts(), family="llama", seed=args.seed, **size["llm"])
        torch.manual_seed(args.seed)
        medmm = build_medmm(llm_dir, vision)
        proc = medmm.processor(max_length=1024)
        batch = proc.collate([proc.process(r) for r in records(args.batch)])
    image_id = medmm.modality_tokens["image"].token_id
    torch.manual_seed(args.seed)
    llava = build_llava(medmm, vision, image_id)
    medmm.to(device).train()
    llava.to(device).train()

    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    pixels = batch["modality_inputs"]["image"]["x"].to(device)
    n_patches = (vision["image_size"] // vision["patch_size"]) ** 2
    assert int((ids == image_id).sum()) == args.batch * n_patches, "placeholder expansion mismatch"
    batches = {"medmm": {"input_ids": ids, "attention_mask": mask, "labels": labels,
                         "modality_inputs": {"image": {"x": pixels}}},
               "llava": {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}}
    models = {"medmm": medmm, "llava": llava}
    steps = {k: make_step(models[k], batches[k], device) for k in models}

    first_loss = {}
    for _ in range(args.warmup):
        for k, fn in steps.items():
            first_loss.setdefault(k, fn()[1])
    times: dict[str, list[float]] = {k: [] for k in steps}
    order = list(steps)
    for i in range(args.steps):
        for k in (order if i % 2 == 0 else order[::-1]):
            times[k].append(steps[k]()[0])

    stats = {k: summary(v) for k, v in times.items()}
    ratio = stats["medmm"]["median_ms"] / stats["llava"]["median_ms"]
    paired = percentile([a / b for a, b in zip(times["medmm"], times["llava"])], 0.5)
    noisy = any(s["iqr_ms"] > 0.25 * s["median_ms"] for s in stats.values())
    lc = medmm.llm.config
    result = {
        "benchmark": "train_step", "what": "zero_grad + forward + backward + AdamW step, fp32, all parameters trainable",
        **environment(device),
        "transformers": transformers.__version__,
        "args": vars(args),
        "config": {"vision": vision, "feature_layer": -2, "drop_cls": True, "projector": "mlp2x_gelu",
                   "llm": {k: getattr(lc, k) for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                                      "num_hidden_layers", "num_attention_heads",
                                                      "num_key_value_heads", "tie_word_embeddings")},
                   "batch_shape": list(ids.shape), "image_tokens_per_image": n_patches,
                   "supervised_tokens": int((labels != -100).sum())},
        "params": {k: {"total": n_params(m), "trainable": n_params(m, True)} for k, m in models.items()},
        "attn_implementation": {k: attn_impls(m) for k, m in models.items()},
        "first_loss": first_loss,
        "medmm": stats["medmm"], "llava": stats["llava"],
        "ratio": ratio, "paired_ratio_median": paired, "goal": GOAL, "goal_met": ratio <= GOAL,
        "noisy": noisy,
        "per_step_ms": times,
    }
    out = write_result(args.out, result)

    print(f"device {args.device} ({result['device_name']}), torch {torch.__version__}, "
          f"transformers {result['transformers']}, size {args.size}, batch {list(ids.shape)}, "
          f"{args.warmup} warm-up + {args.steps} timed steps each, interleaved")
    for k in models:
        s, p = stats[k], result["params"][k]
        print(f"  {k:5s}: median {s['median_ms']:8.2f} ms  IQR [{s['p25_ms']:.2f}, {s['p75_ms']:.2f}]  "
              f"params {p['trainable']:,}  first loss {first_loss[k]:.3f}")
    print(f"  median of per-step-pair ratios {paired:.3f}; goal ratio <= {GOAL}: "
          f"{'met' if ratio <= GOAL else 'NOT met'}; wrote {out}")
    if noisy:
        print("  warning: IQR > 25% of the median; the machine was busy, rerun for a clean figure")
    print(f"train_step: medmm/llava step-time ratio = {ratio:.2f} (medmm {stats['medmm']['median_ms']:.1f} ms, "
          f"llava {stats['llava']['median_ms']:.1f} ms, {args.device})")
    return result


if __name__ == "__main__":
    main()
