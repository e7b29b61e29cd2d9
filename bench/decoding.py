"""Decoding benchmark: tokens/s of medmm's decoding strategies, one run, the same prompts, vs HF greedy.

Builds a random tiny Llama (``--layers 8 --hidden 256``) behind a ``vit2d_tiny`` image encoder, saves the
medmm model and reloads it with ``from_pretrained``, then answers the same 4 VQA-RAD questions about one
image with each strategy, generating exactly ``--new-tokens`` tokens per question (EOS is suppressed
everywhere, and HF gets ``min_new_tokens``), batch of one:

* HF ``generate``: greedy, beam search (4 beams), sampling;
* medmm :class:`~medmm.inference.session.Session` loops, a fresh Session per question (image encoded and
  prompt prefilled from scratch each time): greedy, speculative decoding with a draft model (k=4),
  prompt-lookup decoding (k=4);
* prefix-cache session: ONE Session reused for the 4 questions (image encoded once, shared prompt prefix
  KV reused), to compare with the fresh-Session greedy above.

The draft is a layer-skipping self-speculative draft: the target LLM's config with
``num_hidden_layers = max(1, layers // 8)``, holding the target's embeddings, final norm, lm_head and its
first layer(s). With random weights the text is near-random, so acceptance rates are whatever they are:
they are reported, not tuned. Speculative and prompt-lookup outputs are checked to equal greedy's.

Timing: one warm-up pass, then ``--repeats`` passes with the strategies interleaved; the median pass time
gives tokens/s. Writes ``bench/results/decoding.json``; the last printed line is the headline.

Run::

    python bench/decoding.py                       # defaults: --device auto --new-tokens 64 --repeats 3
    python bench/decoding.py --device cpu --new-tokens 32 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
QA_DIR = ROOT / "data" / "sample" / "vqa_rad"
K = 4  # draft tokens per speculative step


def questions(n: int = 4) -> tuple[str, list[str]]:
    """One image of the bundled sample with ``n`` questions about it (questions cycled if it has fewer)."""
    qa = [q for q in json.loads((QA_DIR / "testset.json").read_text()) if (QA_DIR / "images" / q["image_name"]).exists()]
    by_image: dict[str, list[str]] = {}
    for q in qa:
        by_image.setdefault(q["image_name"], []).append(q["question"])
    image, qs = max(by_image.items(), key=lambda kv: len(kv[1]))
    return str(QA_DIR / "images" / image), [qs[i % len(qs)] for i in range(n)]


def build_target(tmp: Path, layers: int, hidden: int, seed: int):
    from medmm.config import ModelConfig, config_from_dict
    from medmm.model.multimodal import MedMMForCausalLM
    from medmm.model.tiny import build_tiny_llm, sample_texts

    llm_dir = build_tiny_llm(tmp / "llm", sample_texts(), family="llama", hidden=hidden, layers=layers,
                             heads=max(1, hidden // 64), kv_heads=max(1, hidden // 128), seed=seed)
    cfg = config_from_dict(ModelConfig, {
        "llm": str(llm_dir), "llm_trainable": "full",
        "modalities": {"image": {"loader": "image", "encoder": {"name": "vit2d_tiny"},
                                 "projector": {"type": "mlp2x_gelu"}, "preprocess": {"image_size": 64}}}})
    torch.manual_seed(seed)
    MedMMForCausalLM.from_config(cfg).save_pretrained(tmp / "medmm")
    return llm_dir, MedMMForCausalLM.from_pretrained(tmp / "medmm").eval()


def prefix_cache_256(args, device) -> dict:
    """Four closed questions per image through a ViT-B/16 at 256 px (256 image tokens), answers of <= 4 tokens:
    one Session (image encoded once, shared prompt prefix KV reused) against re-encoding per question (a fresh
    Session per question, and HF ``generate`` per question), interleaved in the same passes."""
    import transformers

    from medmm.config import ModelConfig, config_from_dict
    from medmm.inference.session import Session
    from medmm.model.multimodal import MedMMForCausalLM
    from medmm.model.tiny import build_tiny_llm, sample_texts

    with tempfile.TemporaryDirectory(prefix="medmm-bench-") as tmp:
        llm_dir = build_tiny_llm(Path(tmp) / "llm", sample_texts(), family="llama", hidden=args.hidden,
                                 layers=args.layers, heads=max(1, args.hidden // 64),
                                 kv_heads=max(1, args.hidden // 128), seed=args.seed)
        cfg = config_from_dict(ModelConfig, {
            "llm": str(llm_dir), "llm_trainable": "full",
            "modalities": {"image": {"loader": "image", "encoder": {"name": "vit2d", "kwargs": {"img_size": 256}},
                                     "projector": {"type": "mlp2x_gelu"}, "preprocess": {"image_size": 256}}}})
        torch.manual_seed(args.seed)
        MedMMForCausalLM.from_config(cfg).save_pretrained(Path(tmp) / "medmm")
        model = MedMMForCausalLM.from_pretrained(Path(tmp) / "medmm").eval().to(device)
    image, qs = questions(4)
    closed = [q if q.endswith("?") else q + "?" for q in qs]
    proc = model.processor(2048)
    n_image_tokens = model.encoders["image"].num_tokens
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    N = 4  # closed answers: at most 4 tokens

    def one_session():
        s = Session(model, proc, {"image": image})
        return [s.generate(q, max_new_tokens=N).tokens for q in closed]

    def fresh_sessions():
        return [Session(model, proc, {"image": image}).generate(q, max_new_tokens=N).tokens for q in closed]

    def hf_per_question():
        outs = []
        for q in closed:
            b = proc.collate([proc.process_prompt({"modalities": {"image": image},
                                                   "conversations": [{"from": "human", "value": q}]})],
                            padding_side="left")
            mods = {k: {kk: vv.to(device) if torch.is_tensor(vv) else vv for kk, vv in v.items()}
                    for k, v in b["modality_inputs"].items()}
            ids = model.generate(b["input_ids"].to(device), b["attention_mask"].to(device), mods, max_new_tokens=N,
                                 do_sample=False)[0].tolist()
            eos = model.tokenizer.eos_token_id
            outs.append(ids[: ids.index(eos)] if eos in ids else ids)
        return outs

    runs = {"prefix_cache_session": one_session, "fresh_session_per_question": fresh_sessions,
            "hf_generate_per_question": hf_per_question}
    times: dict[str, list[float]] = {k: [] for k in runs}
    outs = {}
    with torch.no_grad():
        for rep in range(args.repeats + 1):
            for name, fn in runs.items():
                sync()
                t0 = time.perf_counter()
                outs[name] = fn()
                sync()
                if rep:
                    times[name].append(time.perf_counter() - t0)
                print(f"  pass {rep} {name}: {time.perf_counter() - t0:.2f} s", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    prompt_len = len(Session(model, proc, {"image": image}).prompt_ids(closed[0]))
    return {
        "what": "4 closed questions about one image, answers of at most 4 tokens (greedy, EOS allowed), batch of one; "
                "image through a ViT-B/16 (timm vit_base_patch16_224 at 256 px, random weights) -> "
                f"{n_image_tokens} LLM tokens; median of {args.repeats} interleaved passes after one warm-up",
        "encoder": "vit2d (vit_base_patch16_224, img_size 256)", "image_tokens": n_image_tokens,
        "prompt_tokens_first_question": prompt_len, "questions": closed,
        "llm": {"num_hidden_layers": args.layers, "hidden_size": args.hidden},
        "median_s": med, "times_s": times,
        "speedup_vs_fresh_session": med["fresh_session_per_question"] / med["prefix_cache_session"],
        "speedup_vs_hf_generate": med["hf_generate_per_question"] / med["prefix_cache_session"],
        "identical_answers": outs["prefix_cache_session"] == outs["fresh_session_per_question"]
        == outs["hf_generate_per_question"],
        "transformers": transformers.__version__,
    }


def hf_vs_medmm(args, device) -> dict:
    """Text-only requests (HF's prompt-lookup and assistant paths need ids, not spliced embeddings): the same
    prompts through Predictor with backend=hf and backend=medmm, against HF greedy, interleaved in the same passes.
    The draft is the target's first layer(s) (layer-skip). Every exact strategy is checked to equal greedy."""
    from medmm.config import DecodingConfig
    from medmm.inference.decoding import layer_skip_draft
    from medmm.inference.predictor import Predictor

    with tempfile.TemporaryDirectory(prefix="medmm-bench-") as tmp:
        llm_dir, _ = build_target(Path(tmp), args.layers, args.hidden, args.seed)
        pred = Predictor(Path(tmp) / "medmm", device=device.type)
        draft = layer_skip_draft(pred.model.llm, max(1, args.layers // 8))
        draft.save_pretrained(Path(tmp) / "draft")
        _, qs = questions(4)
        # A report-like prompt that repeats itself gives prompt lookup something to find.
        reqs = [{"id": str(i), "question": f"{q} Findings: {q} Impression: {q}"} for i, q in enumerate(qs)]
        N = args.new_tokens
        spec = {"draft": str(Path(tmp) / "draft"), "num_draft_tokens": K}
        configs = {
            "hf_greedy": DecodingConfig("greedy", N),
            "hf_prompt_lookup": DecodingConfig("prompt_lookup", N, params={"num_draft_tokens": K, "backend": "hf"}),
            "medmm_prompt_lookup": DecodingConfig("prompt_lookup", N, params={"num_draft_tokens": K,
                                                                              "backend": "medmm"}),
            "hf_assistant": DecodingConfig("speculative", N, params={**spec, "backend": "hf"}),
            "medmm_speculative": DecodingConfig("speculative", N, params={**spec, "backend": "medmm"}),
        }
        times: dict[str, list[float]] = {k: [] for k in configs}
        outs: dict[str, list] = {}
        for rep in range(args.repeats + 1):
            for name, d in configs.items():
                t0 = time.perf_counter()
                outs[name] = pred.predict(reqs, d, batch_size=1)
                if rep:
                    times[name].append(time.perf_counter() - t0)
    greedy = [o["answer"] for o in outs["hf_greedy"]]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "what": f"{len(reqs)} text-only prompts, up to {N} new tokens (EOS allowed), batch of one, random weights; "
                f"median of {args.repeats} interleaved passes after one warm-up",
        "median_s": med, "speedup_vs_hf_greedy": {k: med["hf_greedy"] / v for k, v in med.items()},
        "engines": {k: sorted({o.get("engine") for o in v}) for k, v in outs.items()},
        "identical_to_greedy": {k: [o["answer"] for o in v] == greedy for k, v in outs.items()},
        "new_tokens": {k: [o.get("new_tokens") for o in v] for k, v in outs.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per question (EOS suppressed)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes (after one warm-up pass)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "decoding.json"))
    ap.add_argument("--only", choices=["prefix256", "hf_vs_medmm"], help="run one section and merge its figures into --out")
    args = ap.parse_args(argv)
    from medmm.inference.predictor import pick_device

    try:
        device = pick_device(args.device)
    except ValueError as e:
        ap.error(f"--device: {e}")
    args.device = device.type
    if args.only == "prefix256":
        sec = prefix_cache_256(args, device)
        out = Path(args.out)
        result = json.loads(out.read_text()) if out.exists() else {"benchmark": "decoding"}
        result["prefix_cache_256"] = {**sec, "device": args.device, "cpu_threads": torch.get_num_threads()}
        result["prefix_cache_speedup_256"] = round(sec["speedup_vs_fresh_session"], 3)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"prefix cache, {sec['image_tokens']} image tokens: {sec['speedup_vs_fresh_session']:.2f}x vs a fresh "
              f"session per question, {sec['speedup_vs_hf_generate']:.2f}x vs HF generate per question "
              f"(identical answers: {sec['identical_answers']}) ({args.device})")
        return result

    if args.only == "hf_vs_medmm":
        sec = hf_vs_medmm(args, device)
        out = Path(args.out)
        result = json.loads(out.read_text()) if out.exists() else {"benchmark": "decoding"}
        result["hf_vs_medmm_text_only"] = {**sec, "device": args.device, "cpu_threads": torch.get_num_threads(),
                                           "llm": {"num_hidden_layers": args.layers, "hidden_size": args.hidden}}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print("hf vs medmm (text-only): " + ", ".join(f"{k} {v:.2f}x" for k, v in sec["speedup_vs_hf_greedy"].items())
              + f"; identical to greedy: {sec['identical_to_greedy']} ({args.device})")
        return result

    import transformers

    from medmm.inference.decoding import layer_skip_draft
    from medmm.inference.session import Session

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="medmm-bench-") as tmp:
        llm_dir, model = build_target(Path(tmp), args.layers, args.hidden, args.seed)
        model.to(device)
        draft = layer_skip_draft(model.llm, max(1, model.llm.config.num_hidden_layers // 8))
    image, qs = questions(4)
    proc = model.processor(1024)
    eos = model.tokenizer.eos_token_id
    placeholders = [mt.token_id for mt in model.modality_tokens.values()]
    N = args.new_tokens
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def session() -> Session:
        s = Session(model, proc, {"image": image})
        s.runner.suppress.append(eos)  # every strategy generates exactly N tokens
        return s

    batches = []
    for q in qs:
        b = proc.collate([proc.process_prompt({"modalities": {"image": image},
                                               "conversations": [{"from": "human", "value": q}]})],
                        padding_side="left")
        batches.append((b["input_ids"].to(device), b["attention_mask"].to(device),
                        {k: {kk: vv.to(device) if torch.is_tensor(vv) else vv for kk, vv in v.items()}
                         for k, v in b["modality_inputs"].items()}))

    def hf(**kw):
        def run():
            torch.manual_seed(args.seed)
            return [model.generate(ids, mask, mods, max_new_tokens=N, min_new_tokens=N,
                                   suppress_tokens=[eos, *placeholders], **kw)[0].tolist()
                    for ids, mask, mods in batches], []
        return run

    def fresh(method: str, **kw):
        def run():
            res = [getattr(session(), method)(q, max_new_tokens=N, **kw) for q in qs]
            return [r.tokens for r in res], res
        return run

    def reused():
        s = session()
        res = [s.generate(q, max_new_tokens=N) for q in qs]
        return [r.tokens for r in res], res

    strategies = {
        "hf_greedy": hf(do_sample=False), "hf_beam4": hf(do_sample=False, num_beams=4),
        "hf_sample": hf(do_sample=True, temperature=1.0, top_k=0, top_p=1.0),
        "session_greedy": fresh("generate"), "speculative": fresh("speculative", draft_llm=draft, k=K),
        "prompt_lookup": fresh("speculative", prompt_lookup=True, k=K), "prefix_cache_session": reused,
    }
    times: dict[str, list[float]] = {k: [] for k in strategies}
    outputs: dict[str, tuple] = {}
    with torch.no_grad():
        for rep in range(args.repeats + 1):  # pass 0 is the warm-up
            for name, fn in strategies.items():
                sync()
                t0 = time.perf_counter()
                outputs[name] = fn()
                sync()
                if rep:
                    times[name].append(time.perf_counter() - t0)

    greedy = outputs["session_greedy"][0]
    checks = {}
    for name in ("hf_greedy", "speculative", "prompt_lookup", "prefix_cache_session"):
        checks[name] = outputs[name][0] == greedy
        if not checks[name]:
            print(f"  warning: {name} tokens differ from session greedy tokens")
    assert all(checks[k] for k in ("speculative", "prompt_lookup")), "speculative output != greedy output"
    lengths = {k: sorted({len(t) for t in v[0]}) for k, v in outputs.items()}
    assert all(v == [N] for v in lengths.values()), f"not exactly {N} new tokens everywhere: {lengths}"

    n_tok = len(qs) * N
    base = n_tok / statistics.median(times["hf_greedy"])
    stats = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        stats[name] = {"tokens_per_s": n_tok / med, "median_s": med, "times_s": ts,
                       "speedup_vs_hf_greedy": n_tok / med / base,
                       "speedup_vs_session_greedy": statistics.median(times["session_greedy"]) / med}
        res = outputs[name][1]
        if res and any(r.proposed for r in res):
            stats[name].update(
                acceptance_rate=sum(r.accepted for r in res) / max(1, sum(r.proposed for r in res)),
                acceptance_rate_per_question=[round(r.acceptance_rate, 4) for r in res],
                proposed=sum(r.proposed for r in res), accepted=sum(r.accepted for r in res),
                target_forwards=sum(r.forwards for r in res))
        if res:
            stats[name]["reused_prefix_tokens"] = [r.reused_prefix_tokens for r in res]
    lc = model.llm.config
    result = {
        "benchmark": "decoding",
        "what": f"{len(qs)} questions about one image, exactly {N} new tokens each (EOS suppressed), batch of one, "
                "fp32; median of timed passes after one warm-up pass",
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or
        platform.machine(),
        "cpu_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "args": vars(args),
        "config": {"llm": {k: getattr(lc, k) for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                                                      "num_attention_heads", "num_key_value_heads")},
                   "encoder": "vit2d_tiny", "projector": "mlp2x_gelu", "image_size": 64, "k": K,
                   "draft": {"kind": "layer-skipping self-speculative draft: target config with num_hidden_layers="
                                     f"{draft.config.num_hidden_layers}, target's embeddings, final norm, lm_head and "
                                     "first layer(s) copied", "num_hidden_layers": draft.config.num_hidden_layers},
                   "weights": "random: near-random text; acceptance rates are reported as measured",
                   "draft_note": "the draft has the target's width and vocabulary, so Session.speculative feeds it "
                                 "the target's spliced prompt embeddings (image features included)"},
        "image": str(Path(image).relative_to(ROOT)), "questions": qs, "prompt_lengths": [b[0].shape[1] for b in batches],
        "fresh_session": "session_greedy / speculative / prompt_lookup build a new Session per question "
                         "(image encoded + full prefill each time); prefix_cache_session reuses one Session",
        "matches_session_greedy": checks, "strategies": stats,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"device {args.device} ({result['device_name']}), torch {torch.__version__}, transformers "
          f"{transformers.__version__}, llama {lc.num_hidden_layers}x{lc.hidden_size}, draft "
          f"{draft.config.num_hidden_layers} layer(s), {len(qs)} questions x {N} tokens, {args.repeats} repeats")
    for name, s in stats.items():
        acc = f"  acceptance {s['acceptance_rate']:.2f}" if "acceptance_rate" in s else ""
        print(f"  {name:21s} {s['tokens_per_s']:8.1f} tok/s  {s['speedup_vs_hf_greedy']:5.2f}x vs hf_greedy  "
              f"{s['speedup_vs_session_greedy']:5.2f}x vs session_greedy{acc}")
    print(f"  wrote {out}")
    sp = {k: stats[k]["speedup_vs_hf_greedy"] for k in stats}
    print(f"decoding: speculative {sp['speculative']:.1f}x, prompt_lookup {sp['prompt_lookup']:.1f}x, "
          f"prefix-cache session {sp['prefix_cache_session']:.1f}x vs greedy ({args.device})")
    return result


if __name__ == "__main__":
    main()
