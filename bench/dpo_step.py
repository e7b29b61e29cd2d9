"""DPO-step benchmark: medmm's ``dpo`` stage vs TRL's ``DPOTrainer``, the same tiny model, the same pairs, side by side.

One step = zero_grad + the DPO loss (the reference log-probs through the LoRA adapter disabled, then the policy's, one
forward over chosen + rejected rows each) + backward + AdamW step over the LoRA parameters. medmm runs
``DPOStage.loss`` (:mod:`medmm.training.stages.dpo`) on the model of ``MedMMForCausalLM``; TRL runs
``DPOTrainer.compute_loss`` (its fused LM head, ``use_adapter`` reference) on a peft model of the same LLM folder, with
the same LoRA settings and seed. The pairs are the bundled VQA-RAD closed questions (the right answer chosen, the
other rejected), text-only so both frameworks tokenise them through the same chat template; the batch shapes each
side ends up with are recorded. The first losses must agree (both ln 2: the policy is its reference).

After warm-up the two steps are interleaved (the order alternates every step) so drift hits both equally. Writes
``bench/results/dpo_step.json`` with ``ratio_vs_trl`` = medmm's median step time over TRL's (goal <= 1.1); the last
printed line is the headline figure.

Run::

    python bench/dpo_step.py                        # --size small --pairs 8 --device auto
    python bench/dpo_step.py --size base --device cuda --steps 30
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path

import torch
from common import ROOT, bench_parser, environment, resolve_device, write_result

GOAL = 1.1
SIZES = {"small": dict(hidden=64, layers=2, heads=4, kv_heads=2),
         "base": dict(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1408)}
LORA = {"r": 8, "alpha": 16}


def vqa_pairs(n: int) -> list[dict]:
    """``n`` text-only preference pairs from the bundled VQA-RAD closed questions (cycled when needed)."""
    from medmm.prepare.preferences import pairs_from_labels

    qa = json.loads((ROOT / "data" / "sample" / "vqa_rad" / "testset.json").read_text())
    recs = [{"id": f"q{i}", "answer_type": q.get("answer_type"),
             "conversations": [{"from": "human", "value": q["question"]}, {"from": "gpt", "value": str(q["answer"])}]}
            for i, q in enumerate(qa)]
    pairs = pairs_from_labels(recs)[0]
    if not pairs:
        raise SystemExit("no closed question in data/sample/vqa_rad/testset.json")
    return [pairs[i % len(pairs)] for i in range(n)]


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(ms: list[float]) -> dict:
    return {"median_ms": percentile(ms, 0.5), "p25_ms": percentile(ms, 0.25), "p75_ms": percentile(ms, 0.75),
            "iqr_ms": percentile(ms, 0.75) - percentile(ms, 0.25), "min_ms": min(ms), "n": len(ms)}


def build_medmm(llm_dir: Path, pairs_file: Path, n_pairs: int, work: Path, device: torch.device, seed: int):
    """medmm's dpo stage over a text-only LoRA model: (stage, model, batch on device)."""
    from medmm.config import TrainConfig, config_from_dict
    from medmm.training.loop import to_device
    from medmm.training.stages import StageContext, get_stage

    cfg = config_from_dict(TrainConfig, {
        "model": {"llm": str(llm_dir), "llm_trainable": "lora", "lora": LORA, "modalities": {}},
        "data": {"datasets": [{"path": str(pairs_file)}], "max_length": 512, "num_workers": 0},
        "trainer": {"stage": "dpo", "output_dir": str(work), "micro_batch_size": n_pairs, "seed": seed,
                    "dpo": {"beta": 0.1, "reference": "adapter"}}})
    torch.manual_seed(seed)
    stage = get_stage("dpo")(cfg, StageContext(output_dir=work))
    model = stage.build_model()
    data = stage.build_data()
    batch = data.collate([data.dataset[i] for i in range(n_pairs)])
    batch.pop("load_errors", None)
    return stage, model.to(device).train(), to_device(batch, device)


def build_trl(llm_dir: Path, pairs: list[dict], work: Path, device: torch.device, seed: int):
    """TRL's DPOTrainer over a peft model of the same LLM folder: (trainer, model, batch on device)."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(str(llm_dir))
    torch.manual_seed(seed)
    llm = AutoModelForCausalLM.from_pretrained(str(llm_dir), dtype=torch.float32)
    model = get_peft_model(llm, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                           task_type="CAUSAL_LM", target_modules="all-linear"))
    rows = [{"prompt": [{"role": "user", "content": p["conversations"][-1]["value"]}],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    args = DPOConfig(output_dir=str(work), per_device_train_batch_size=len(pairs), beta=0.1, loss_type=["sigmoid"],
                     max_length=512, bf16=False, fp16=False, use_cpu=device.type == "cpu", report_to=[],
                     logging_strategy="no", save_strategy="no", dataloader_num_workers=0, seed=seed,
                     gradient_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok)
    loader = trainer.get_train_dataloader()
    batch = trainer._prepare_inputs(next(iter(loader)))
    return trainer, trainer.model.to(device).train(), batch


def make_step(loss_fn, params, device: torch.device):
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> tuple[float, float]:
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        sync()
        return (time.perf_counter() - t0) * 1e3, float(loss.detach())

    return step


def main(argv: list[str] | None = None) -> dict:
    ap = bench_parser(__doc__, "dpo_step", SIZES)
    ap.add_argument("--pairs", type=int, default=8, help="preference pairs per step (2x rows per forward)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per framework")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per framework")
    args = ap.parse_args(argv)
    device = resolve_device(ap, args)

    import transformers
    import trl

    from medmm.model.tiny import build_tiny_llm, sample_texts
    from medmm.utils import write_jsonl

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    pairs = vqa_pairs(args.pairs)
    with tempfile.TemporaryDirectory(prefix="medmm-dpo-bench-") as tmp:
        tmp = Path(tmp)
        llm_dir = build_tiny_llm(tmp / "llm", sample_texts(), family="llama", seed=args.seed, **SIZES[args.size])
        write_jsonl(tmp / "pairs.jsonl", pairs)
        stage, mm, mm_batch = build_medmm(llm_dir, tmp / "pairs.jsonl", args.pairs, tmp / "medmm", device, args.seed)
        trainer, tm, trl_batch = build_trl(llm_dir, pairs, tmp / "trl", device, args.seed)

    def medmm_loss():
        return stage.loss(mm, dict(mm_batch))[0]

    def trl_loss():
        return trainer.compute_loss(tm, trl_batch)

    steps = {"medmm": make_step(medmm_loss, [p for p in mm.parameters() if p.requires_grad], device),
             "trl": make_step(trl_loss, [p for p in tm.parameters() if p.requires_grad], device)}
    losses: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.warmup):
        for k, fn in steps.items():
            losses[k].append(fn()[1])
    times: dict[str, list[float]] = {k: [] for k in steps}
    order = list(steps)
    for i in range(args.steps):
        for k in (order if i % 2 == 0 else order[::-1]):
            ms, loss = steps[k]()
            times[k].append(ms)
            losses[k].append(loss)

    stats = {k: summary(v) for k, v in times.items()}
    ratio = stats["medmm"]["median_ms"] / stats["trl"]["median_ms"]
    paired = percentile([a / b for a, b in zip(times["medmm"], times["trl"])], 0.5)
    noisy = any(s["iqr_ms"] > 0.25 * s["median_ms"] for s in stats.values())
    shapes = {"medmm": list(mm_batch["input_ids"].shape), "trl": list(trl_batch["input_ids"].shape)}
    answer_tokens = {"medmm": int((mm_batch["labels"] != -100).sum()), "trl": int(trl_batch["completion_mask"].sum())}
    lc = mm.llm.config
    result = {
        "benchmark": "dpo_step",
        "what": "zero_grad + DPO loss (reference = LoRA adapter disabled; policy) + backward + AdamW over LoRA, fp32",
        **environment(device),
        "transformers": transformers.__version__, "trl_version": trl.__version__, "args": vars(args),
        "config": {"llm": {k: getattr(lc, k) for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                                      "num_hidden_layers", "num_attention_heads")},
                   "lora": LORA, "beta": 0.1, "loss_type": "sigmoid", "batch_shape": shapes,
                   "answer_tokens": answer_tokens},
        "first_loss": {k: v[0] for k, v in losses.items()},
        # same weights, tokens and optimiser: the two loss curves must coincide step after step
        "max_loss_diff": max(abs(a - b) for a, b in zip(losses["medmm"], losses["trl"])),
        "medmm": stats["medmm"], "trl": stats["trl"],
        "ratio_vs_trl": ratio, "paired_ratio_median": paired, "goal": GOAL, "goal_met": ratio <= GOAL, "noisy": noisy,
        "per_step_ms": times, "losses": losses,
    }
    out = write_result(args.out, result)

    print(f"device {args.device} ({result['device_name']}), torch {torch.__version__}, trl {trl.__version__}, "
          f"size {args.size}, {args.pairs} pairs: medmm rows {shapes['medmm']}, trl rows {shapes['trl']}, "
          f"{args.warmup} warm-up + {args.steps} timed steps each, interleaved")
    for k in steps:
        s = stats[k]
        print(f"  {k:5s}: median {s['median_ms']:8.2f} ms  IQR [{s['p25_ms']:.2f}, {s['p75_ms']:.2f}]  "
              f"first loss {losses[k][0]:.4f}  answer tokens {answer_tokens[k]}")
    print(f"  loss curves agree to {result['max_loss_diff']:.1e} over {len(losses['trl'])} steps")
    print(f"  median of per-step-pair ratios {paired:.3f}; goal ratio <= {GOAL}: "
          f"{'met' if ratio <= GOAL else 'NOT met'}; wrote {out}")
    if noisy:
        print("  warning: IQR > 25% of the median; the machine was busy, rerun for a clean figure")
    print(f"dpo_step: ratio_vs_trl = {ratio:.2f} (medmm {stats['medmm']['median_ms']:.1f} ms, "
          f"trl {stats['trl']['median_ms']:.1f} ms, {args.device})")
    return result


if __name__ == "__main__":
    main()
