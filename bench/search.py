"""Value-guided search against greedy decoding on weight-based dose calculations, with a paired bootstrap CI.

The task: "Paracetamol for a child of 12 kg: what is the dose?"; an answer is checked by arithmetic (its last
number must equal mg/kg x kg). The 47 drugs and their per-dose mg/kg are real paediatric doses; the questions
are synthetic. Drug-weight pairs are split three ways, disjoint: instruction tuning, the value stage's records,
and the test questions. The instruction-tuning answers mix two sources, as clinical Q&A data does. 40 % are worked
calculations, as a dose is checked by hand: the mg/kg, the weight split into tens and units, each part multiplied,
the parts added ("15 mg/kg\\n15 x 32 = 15 x 30 + 15 x 2\\n= 450 + 30\\n= 480 mg", one line per step). 60 % are
terse prescribed doses, rounded to a measurable amount ("Dose: about 500 mg"; ``--terse-style exact`` gives the
exact product instead): right under the exact check only when rounding leaves the dose unchanged (a third of the
pairs). Greedy decoding follows the majority's first token, so the model's most likely answer is the rounded one;
the value head learns from checked outcomes of the model's own samples which kind of answer (and which answer)
verifies. That is the effect measured: search steering a model away from its most likely but less reliable mode.
With both sources exact (``--terse-style exact --terse-share 0.5``), no search beat greedy at this scale: a head
reading a tiny model's states cannot check a product it could not compute.

Steps, all on CPU with a tiny model (a 2-layer Llama of hidden size 64 trained here in a minute; it shows the
mechanics and the effect of search on one model, not clinical quality):

1. a digit-level tokenizer and a tiny causal LM, instruction-tuned on the first split (plain torch loop);
2. ``train.py`` with ``trainer.stage: value`` (DeepSpeed, ZeRO 0): the value head regressed on Monte-Carlo
   returns of answers sampled from that model for the second split, scored by the reward ``dose_final_number``
   (registered here: the answer's last number equals the reference's); saved into the model folder;
3. the test split answered by greedy, ``best_of_n``, ``value_beam`` and ``mcts`` (scorer = the value head);
   with ``--oracle`` also ``best_of_n`` reranked by the reference-checking reward (how often a right answer is
   among the candidates: the ceiling of reranking);
4. accuracy per strategy, and each search minus greedy with a paired bootstrap 95% CI (same questions).

    OMP_NUM_THREADS=1 python bench/search.py --oracle        # writes bench/results/search.json
"""

from __future__ import annotations

import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, bench_parser, environment, write_result

from medmm.data.rewards import reference, register_reward

# Per-dose mg/kg of weight-based paediatric doses: a usual value within the BNF for Children / Lexicomp range
# (loading doses for phenobarbital, phenytoin, levetiracetam and caffeine citrate; pulse dose for methylprednisolone).
# Drugs dosed below 1 mg/kg (morphine, ondansetron, adrenaline...) are left out rather than rounded.
DRUGS = {"paracetamol": 15, "ibuprofen": 10, "amoxicillin": 25, "gentamicin": 7, "ceftriaxone": 50,
         "vancomycin": 15, "acyclovir": 10, "azithromycin": 10, "clindamycin": 10, "cefazolin": 30, "enoxaparin": 1,
         "meropenem": 20, "cefotaxime": 50, "ampicillin": 50, "amikacin": 15, "cefepime": 50, "piperacillin": 100,
         "flucloxacillin": 50, "benzylpenicillin": 50, "fluconazole": 6, "phenobarbital": 20, "phenytoin": 20,
         "prednisolone": 1, "methylprednisolone": 30, "caffeine citrate": 20, "trimethoprim": 4, "doxycycline": 2,
         "teicoplanin": 10, "linezolid": 10, "ganciclovir": 5, "rifampicin": 15, "isoniazid": 10, "ethambutol": 20,
         "pyrazinamide": 35, "carbamazepine": 5, "magnesium sulfate": 50, "furosemide": 1, "amiodarone": 5,
         "tranexamic acid": 15, "naproxen": 5, "cefalexin": 25, "chloramphenicol": 25, "ciprofloxacin": 10,
         "quinine": 10, "praziquantel": 40, "omeprazole": 1, "levetiracetam": 20}
WEIGHTS = range(2, 41)


def question(drug: str, kg: int) -> str:
    return f"{drug.capitalize()} for a child of {kg} kg: what is the dose?"


def measurable(dose: int) -> int:
    """A dose rounded as prescriptions round it to something measurable: to 100 mg from 500 mg, 50 mg from 100 mg,
    10 mg from 20 mg, else to 5 mg (half-way rounds up). A third of the drug-weight pairs come out unchanged."""
    unit = 100 if dose >= 500 else 50 if dose >= 100 else 10 if dose >= 20 else 5
    return unit * ((dose + unit // 2) // unit)


def answer(drug: str, kg: int, worked: bool = True, terse: str = "exact") -> str:
    """The worked answer or the terse one (the dose alone).

    Worked, as a clinician checks a product by hand: the drug's mg/kg, then the weight split into tens and units,
    each part multiplied, and the parts added ("15 mg/kg\n15 x 32 = 15 x 30 + 15 x 2\n= 450 + 30\n= 480 mg").
    Each line is one step for ``value_beam`` and ``mcts``. Terse: the exact dose ("Dose: 480 mg"), or with
    ``terse="rounded"`` the prescribed, rounded one ("Dose: about 500 mg"), which the exact check marks wrong
    unless rounding leaves it unchanged."""
    per = DRUGS[drug]
    if not worked:
        return f"Dose: {per * kg} mg" if terse == "exact" else f"Dose: about {measurable(per * kg)} mg"
    tens, units = kg - kg % 10, kg % 10
    if tens and units:
        return (f"{per} mg/kg\n{per} x {kg} = {per} x {tens} + {per} x {units}\n"
                f"= {per * tens} + {per * units}\n= {per * kg} mg")
    return f"{per} mg/kg\n{per} x {kg} = {per * kg} mg"


def last_number(text: str) -> int | None:
    nums = re.findall(r"\d+", text)
    return int(nums[-1]) if nums else None


@register_reward("dose_final_number", "1 when the answer's last number equals the reference's (dose checks)")
def _final_number(prediction: str, example: dict) -> float:
    return float(last_number(prediction) is not None and last_number(prediction) == last_number(reference(example)))


def correct(text: str, drug: str, kg: int) -> bool:
    return last_number(text) == DRUGS[drug] * kg


def record(drug: str, kg: int, i: int, worked: bool = True, terse: str = "exact") -> dict:
    return {"id": f"dose{i}", "drug": drug, "kg": kg,
            "conversations": [{"from": "human", "value": question(drug, kg)},
                              {"from": "gpt", "value": answer(drug, kg, worked, terse)}]}


def splits(seed: int, n_value: int, n_test: int, n_sft: int):
    pairs = [(d, w) for d in sorted(DRUGS) for w in WEIGHTS]
    random.Random(seed).shuffle(pairs)
    test, value = pairs[:n_test], pairs[n_test:n_test + n_value]
    return pairs[n_test + n_value:n_test + n_value + n_sft], value, test


def build_model(work: Path, sft_pairs, args):
    """Tokenizer (no digit merges) + tiny Llama, instruction-tuned on the SFT split; saved as a medmm folder."""
    import torch

    from medmm.config import ModelConfig
    from medmm.data.dataset import ConversationDataset
    from medmm.model.multimodal import MedMMForCausalLM
    from medmm.model.tiny import build_tiny_llm

    words = [re.sub(r"\d+", " ", question(d, 1) + " " + answer(d, 1) + " " + answer(d, 1, False, args.terse_style))
             for d in DRUGS]
    words += [str(i) for i in range(10)]
    llm = build_tiny_llm(work / "llm", words * 4, hidden=args.hidden, layers=args.layers, heads=4, kv_heads=2,
                         seed=args.seed)
    model = MedMMForCausalLM.from_config(ModelConfig(llm=str(llm), llm_trainable="full"))
    data = work / "sft.jsonl"
    styles = random.Random(args.seed + 1)  # each SFT answer is terse with probability --terse-share
    data.write_text("".join(json.dumps(record(d, w, i, styles.random() >= args.terse_share, args.terse_style)) + "\n"
                            for i, (d, w) in enumerate(sft_pairs)))
    proc = model.processor(128)
    ds = ConversationDataset(data, proc, "sft")
    torch.manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(args.sft_steps):
        for g in opt.param_groups:  # linear decay
            g["lr"] = args.lr * (1 - step / args.sft_steps)
        batch = proc.collate([ds[rng.randrange(len(ds))] for _ in range(args.batch)])
        loss = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    folder = model.save_pretrained(work / "sft_model")
    return folder, {"steps": args.sft_steps, "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
                    "seconds": round(time.perf_counter() - t0, 1),
                    "params": sum(p.numel() for p in model.parameters())}


def train_value(work: Path, base: Path, value_pairs, args) -> tuple[Path, dict]:
    """``train.py --config`` with ``trainer.stage: value`` (Monte-Carlo returns of sampled answers)."""
    import yaml

    import train

    data = work / "value.jsonl"
    data.write_text("".join(json.dumps(record(d, w, i)) + "\n" for i, (d, w) in enumerate(value_pairs)))
    cfg = {"data": {"datasets": [{"path": str(data)}], "max_length": 128, "num_workers": 0},
           "trainer": {"stage": "value", "output_dir": str(work / "value_run"),
                       "deepspeed": str(ROOT / "configs/deepspeed/zero0.json"), "max_steps": args.value_steps,
                       "micro_batch_size": 64, "lr": 3e-3, "save_every": 100000, "seed": args.seed,
                       "lr_schedule": "cosine", "eval_every": args.value_steps},
           "value": {"model": str(base), "source": "samples", "reward": "dose_final_number", "samples": args.value_samples,
                     "temperature": 1.0, "max_new_tokens": args.max_new_tokens, "steps": "line", "width": 256,
                     "eval_fraction": 0.1}}
    path = work / "value.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    train.main(["--config", str(path)])
    folder = work / "value_run" / "checkpoint"
    meta = json.loads((folder / "medmm_config.json").read_text())
    rows = [json.loads(x) for x in (work / "value_run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_mse" in r]
    return folder, {**meta["value_training"], "seconds": round(time.perf_counter() - t0, 1),
                    "val_mse_before": evals[0]["val_mse"] if evals else None,
                    "val_mse_after": evals[-1]["val_mse"] if evals else None,
                    "val_pairwise_acc": evals[-1].get("val_pairwise_acc") if evals else None}


def main(argv=None) -> dict:
    ap = bench_parser(__doc__, "search")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--sft-records", type=int, default=900)
    ap.add_argument("--sft-steps", type=int, default=1000)
    ap.add_argument("--terse-share", type=float, default=0.6, help="share of SFT answers given without working")
    ap.add_argument("--terse-style", choices=("rounded", "exact"), default="rounded",
                    help="terse SFT answers give the prescribed dose rounded to a measurable amount (default) or the "
                         "exact product")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--value-records", type=int, default=250)
    ap.add_argument("--value-samples", type=int, default=6)
    ap.add_argument("--value-steps", type=int, default=300)
    ap.add_argument("--test", type=int, default=120)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--num-samples", type=int, default=6)
    ap.add_argument("--search-temperature", type=float, default=0.7, help="sampling temperature of the candidates")
    ap.add_argument("--beam-width", type=int, default=2)
    ap.add_argument("--step-samples", type=int, default=3)
    ap.add_argument("--simulations", type=int, default=8)
    ap.add_argument("--oracle", action="store_true", help="also best_of_n reranked by the reference-checking reward")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--work", default=None, help="keep the models here (default: a temporary folder)")
    args = ap.parse_args(argv)
    import torch

    from medmm.config import DecodingConfig
    from medmm.eval.bootstrap import mean_statistic, paired_bootstrap
    from medmm.inference.session import Session
    from medmm.model.multimodal import MedMMForCausalLM

    torch.manual_seed(args.seed)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="medmm-search-"))
    work.mkdir(parents=True, exist_ok=True)
    sft_pairs, value_pairs, test_pairs = splits(args.seed, args.value_records, args.test, args.sft_records)
    settings = {k: getattr(args, k) for k in ("hidden", "layers", "sft_records", "sft_steps", "terse_share", "terse_style",
                                              "batch",
                                              "lr", "seed")}
    done = work / "sft.json"
    if (work / "sft_model").is_dir() and done.is_file() and json.loads(done.read_text())["settings"] == settings:
        base, sft_info = work / "sft_model", json.loads(done.read_text())["sft"]  # --work kept it: same settings
    else:
        base, sft_info = build_model(work, sft_pairs, args)
        done.write_text(json.dumps({"settings": settings, "sft": sft_info}))
    print(f"sft: {sft_info}", flush=True)
    folder, value_info = train_value(work, base, value_pairs, args)
    print(f"value stage: {value_info}", flush=True)

    model = MedMMForCausalLM.from_pretrained(folder).eval()
    assert model.value_head is not None, "the value stage's folder must load with its value head"
    proc = model.processor(128)
    temp = {"search_temperature": args.search_temperature}
    strategies = {
        "greedy": DecodingConfig("greedy", args.max_new_tokens, args.seed),
        "best_of_n": DecodingConfig("best_of_n", args.max_new_tokens, args.seed, {"num_samples": args.num_samples, **temp}),
        "value_beam": DecodingConfig("value_beam", args.max_new_tokens, args.seed, {"beam_width": args.beam_width,
                                                                   "step_samples": args.step_samples, **temp}),
        "mcts": DecodingConfig("mcts", args.max_new_tokens, args.seed, {"num_simulations": args.simulations,
                                                       "step_samples": args.step_samples, **temp}),
    }
    if args.oracle:
        strategies["best_of_n_oracle_reward"] = DecodingConfig("best_of_n", args.max_new_tokens, args.seed, {
            "num_samples": args.num_samples, "scorer": "dose_final_number", **temp})
    hits: dict[str, list[int]] = {k: [] for k in strategies}
    seconds = {k: 0.0 for k in strategies}
    examples = []
    for i, (drug, kg) in enumerate(test_pairs):
        rec = record(drug, kg, i)
        sess = Session(model, proc, {})
        q = rec["conversations"][:1]
        row = {"question": question(drug, kg)}
        for name, d in strategies.items():
            t0 = time.perf_counter()
            r = sess.decode(q, d, aux={"example": rec})
            seconds[name] += time.perf_counter() - t0
            text = model.tokenizer.decode(r.tokens, skip_special_tokens=True).strip()
            hits[name].append(int(correct(text, drug, kg)))
            row[name] = text
        if i < 4:
            examples.append(row)
        if (i + 1) % 25 == 0:
            print(f"{i + 1}/{len(test_pairs)} " + " ".join(f"{k}={sum(v) / len(v):.3f}" for k, v in hits.items()),
                  flush=True)
    n = len(test_pairs)
    greedy_stat = mean_statistic({"acc": hits["greedy"]})
    result = {
        "task": "weight-based paediatric dose calculation (synthetic questions, real mg/kg doses of 47 drugs, "
                "checked by arithmetic); drug-weight pairs disjoint between SFT, value-stage and test splits; "
                f"SFT answers worked (exact) or terse ({args.terse_share:.0%} terse, {args.terse_style})",
        "model": f"tiny Llama trained here on CPU: hidden {args.hidden}, {args.layers} layers, "
                 f"{sft_info['params']:,} parameters (a tiny model: mechanics and relative effect, not quality)",
        "n": n, "seeds": {"split_and_training": args.seed, "decoding": args.seed, "bootstrap": args.seed},
        "sft": sft_info, "value_stage": value_info,
        "greedy_acc": sum(hits["greedy"]) / n,
        "strategies": {}, "environment": environment(torch.device("cpu")), "examples": examples,
    }
    for name, d in strategies.items():
        entry = {"acc": sum(hits[name]) / n, "settings": {"strategy": d.strategy, "max_new_tokens": d.max_new_tokens,
                                                            "seed": d.seed, "params": d.params},
                 "seconds_per_question": round(seconds[name] / n, 4)}
        if name != "greedy":
            pb = paired_bootstrap(mean_statistic({"acc": hits[name]}), greedy_stat, n, resamples=args.resamples,
                                  seed=args.seed).metrics["acc"]
            entry.update(diff_vs_greedy=pb["diff"], diff_ci95=list(pb["ci95"]) if pb["ci95"] else None,
                         p_value=pb["p_value"], scorer=d.params.get("scorer", "value"))
        result["strategies"][name] = entry
        result[f"{name}_acc"] = entry["acc"]
    result["paired_bootstrap"] = {"resamples": args.resamples, "level": 0.95,
                                  "statistic": "accuracy(strategy) - accuracy(greedy) on the same questions"}
    out = write_result(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k.endswith("_acc")}, indent=1))
    for name, e in result["strategies"].items():
        if name != "greedy":
            print(f"{name}: {e['acc']:.3f} - greedy {result['greedy_acc']:.3f} = {e['diff_vs_greedy']:+.3f} "
                  f"95% CI {e['diff_ci95']}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
