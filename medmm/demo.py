"""``medmm demo``: the main job end to end on the bundled sample, in a few minutes on a CPU.

prepare (tiny tokenizer + Llama, conversation JSONL from VQA-RAD images, pydicom's CT/MR files,
ClinTox SMILES, promoter DNA) -> train (DeepSpeed ZeRO-2, two ranks under torchrun) -> infer (one
request per input kind) -> eval (held-out answers) -> export (merged HF folder) -> the evaluation suite
``configs/eval/demo.yaml`` (``runs/demo/eval/results.json`` and ``report.html``). A tiny randomly
initialised model shows the mechanics, not clinical quality.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .training.distributed import free_port
from .utils import resource_path

# the checkout's files, or the copies an installed wheel ships: the demo runs from any directory
SAMPLE = resource_path("data/sample")
CONFIG = resource_path("configs/demo.yaml")
SUITE = resource_path("configs/eval/demo.yaml")
DEMO_DICOM = ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "JPEG2000.dcm",
              "MR_small_bigendian.dcm", "MR_truncated.dcm"]


def _step(name: str):
    print(f"\n=== {name} ===", flush=True)
    return time.perf_counter()


def run_demo(out: str | Path = "runs/demo", steps: int | None = None, nproc: int = 2,
             config: str | Path = CONFIG) -> dict:
    from .io.dicom import pydicom_test_files
    from .model.tiny import build_tiny_llm, sample_texts
    from .prepare.dicom import prepare_dicom_modality
    from .prepare.genomics import prepare_dna
    from .prepare.molecules import prepare_molecules
    from .prepare.vqa import prepare_vqa

    out = Path(out)
    data = out / "data"
    timings: dict[str, float] = {}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    t = _step("1/6 prepare")
    if data.exists():
        for f in data.glob("*"):
            f.unlink()
    llm_dir = build_tiny_llm(out / "base_llm", sample_texts(SAMPLE))
    manifests = [
        prepare_vqa(SAMPLE / "vqa_rad/testset.json", SAMPLE / "vqa_rad/images", data, name="vqa"),
        prepare_dicom_modality([pydicom_test_files() / f for f in DEMO_DICOM], data, name="dicom"),
        prepare_molecules(SAMPLE / "molecules/clintox_sample.csv", data, label_col="FDA_APPROVED", name="molecules"),
        prepare_dna(SAMPLE / "dna/promoters_sample.tsv", data, name="dna"),
    ]
    for m in manifests:
        print(f"  {m['name']:<10} train={m['train']:<4} eval={m['eval']:<4} rejected={m['rejected']}")
    timings["prepare_s"] = time.perf_counter() - t

    t = _step(f"2/6 train (DeepSpeed ZeRO-2, {nproc} ranks)")
    overrides = [f"model.llm={llm_dir}", f"trainer.output_dir={out}"]
    for i, name in enumerate(["vqa", "dicom", "molecules", "dna"]):
        overrides.append(f"data.datasets.{i}.path={data / (name + '_train.jsonl')}")
    if steps:
        overrides.append(f"trainer.max_steps={steps}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "medmm.training", "--config", str(config), *overrides] if nproc > 1 else \
          [sys.executable, "-m", "medmm.training", "--config", str(config), *overrides]
    subprocess.run(cmd, check=True)
    ckpt = out / "checkpoint"
    timings["train_s"] = time.perf_counter() - t

    t = _step("3/6 infer")
    from .inference.__main__ import main as infer_main

    requests = [
        ("--input", str(pydicom_test_files() / "CT_small.dcm"), "What is the imaging modality of this image?"),
        ("--input", str(next(iter(sorted((SAMPLE / "vqa_rad/images").glob("*.jpg"))))), "Is there an abnormality?"),
        ("--smiles", "CC(=O)Oc1ccccc1C(=O)O", "Is this molecule likely to be an approved drug? Answer yes or no."),
        ("--fasta", str(SAMPLE / "dna/FGFR2_AHCYL1_sample.fasta"), "Does this DNA sequence contain a promoter?"),
    ]
    answers = []
    for flag, value, q in requests:
        res = infer_main(["--checkpoint", str(ckpt), flag, value, "--question", q, "--max-new-tokens", "8"])[0]
        answers.append({"input": value, "question": q, "answer": res.get("answer"), "error": res.get("error")})
    (out / "infer.json").write_text(json.dumps(answers, indent=2))
    timings["infer_s"] = time.perf_counter() - t

    t = _step("4/6 eval")
    from .config import DecodingConfig
    from .eval.runner import evaluate

    metrics = evaluate(ckpt, [data / f"{n}_eval.jsonl" for n in ("vqa", "molecules", "dna")], out / "eval",
                       DecodingConfig(max_new_tokens=8), batch_size=16)
    for name, m in metrics["per_file"].items():
        print(f"  {name:<22} n={m['count']:<4} exact={m.get('exact_match', 0):.3f} "
              f"closed_acc={m.get('closed_accuracy', float('nan')):.3f} bleu={m.get('bleu', 0):.2f}")
    timings["eval_s"] = time.perf_counter() - t

    t = _step("5/6 export (merged Hugging Face folder)")
    from .export.hf import export_hf

    export_dir = export_hf(ckpt, out / "export")
    timings["export_s"] = time.perf_counter() - t

    t = _step("6/6 eval suite (configs/eval/demo.yaml: metrics with 95% CIs, report.html)")
    from .eval.suite import run_suite

    suite = run_suite(SUITE, ckpt, out / "eval", data_root=out)
    for label, res in suite["benchmarks"].items():
        m = res["metrics"][res["headline"]]
        v, ci = (float("nan") if m["value"] is None else m["value"]), (m["ci95"] or [float("nan")] * 2)
        print(f"  {label:<14} n={res['n']:<4} {res['headline']}={v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]")
    timings["suite_s"] = time.perf_counter() - t

    summary = {"output": str(out), "checkpoint": str(ckpt), "export": str(export_dir),
               "metrics": str(out / "eval" / "metrics.json"), "predictions": str(out / "eval" / "predictions.jsonl"),
               "eval_report": str(out / "eval" / "report.html"), "eval_results": str(out / "eval" / "results.json"),
               "infer": str(out / "infer.json"), "tensorboard": str(out / "tb"), "loss_curve": str(out / "loss.png"),
               "errors": str(data / "errors.jsonl"), "timings_s": {k: round(v, 1) for k, v in timings.items()}}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print("\n=== done: what the demo wrote ===")
    for k, v in summary.items():
        if k != "timings_s":
            print(f"  {k:<12} {v}")
    print(f"  timings      {summary['timings_s']}")
    print("Note: tiny randomly initialised models show the mechanics, not clinical quality.")
    return summary
