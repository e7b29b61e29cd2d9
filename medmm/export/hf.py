"""``medmm export --format hf``: merge LoRA into the language model and write a self-contained folder.

The folder is a medmm model folder whose ``llm/`` is a plain Hugging Face causal LM (loadable with
``AutoModelForCausalLM.from_pretrained(out/"llm")``), plus a model card (README.md) that lists the
training data (with the row counts of each prepared set's ``manifest.json``) and the evaluation
metrics (``--metrics``, or ``<run>/eval/metrics.json`` beside the checkpoint when present).
"""

from __future__ import annotations

import json
from pathlib import Path


def find_metrics(checkpoint: str | Path) -> Path | None:
    """``<run>/eval/metrics.json`` for a checkpoint at ``<run>/checkpoint`` (what ``medmm demo`` writes)."""
    cand = Path(checkpoint).resolve().parent / "eval" / "metrics.json"
    return cand if cand.is_file() else None


def _dataset_lines(datasets: list) -> list[str]:
    """One line per training file, with the counts its ``prepare`` manifest recorded when it is still there."""
    lines = []
    for d in datasets:
        p = Path(str(d))
        line = f"- `{p.name}` ({p})"
        mf = p.parent / "manifest.json"
        if mf.is_file():
            try:
                manifest = json.loads(mf.read_text())
            except json.JSONDecodeError:
                manifest = {}
            name = p.name.rsplit("_train.jsonl", 1)[0]
            m = manifest.get(name) if isinstance(manifest.get(name), dict) else None
            if m:
                line += f": {m.get('train')} train / {m.get('eval')} eval rows, {m.get('rejected')} rejected"
                if m.get("source"):
                    line += f"; source `{m['source']}`"
        lines.append(line)
    return lines or ["- unknown (the checkpoint records no training data)"]


def _metric_lines(metrics: dict) -> list[str]:
    """A Markdown table of the overall and per-file evaluation metrics."""
    rows = [("overall", metrics.get("overall") or {})] + list((metrics.get("per_file") or {}).items())
    keys = [k for k in ("count", "exact_match", "token_f1", "bleu", "closed_accuracy", "open_recall", "errors")
            if any(k in r for _, r in rows)]
    lines = ["| set | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in rows:
        cells = [f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def export_hf(checkpoint: str | Path, out: str | Path, metrics: str | Path | None = None) -> Path:
    """Merge LoRA, write the folder and its model card.

    Args:
        checkpoint: a medmm model folder (``MedMMForCausalLM.save_pretrained``).
        out: the export folder (replaced atomically).
        metrics: an evaluation ``metrics.json`` to put in the card; default: the run's ``eval/metrics.json``.
    """
    from ..model.multimodal import MedMMForCausalLM

    model = MedMMForCausalLM.from_pretrained(checkpoint, merge_lora=True)
    meta = json.loads((Path(checkpoint) / "medmm_config.json").read_text())
    metrics_path = Path(metrics) if metrics else find_metrics(checkpoint)
    if metrics_path is not None and not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path}: metrics file not found")
    metrics_data = json.loads(metrics_path.read_text()) if metrics_path else None
    out = model.save_pretrained(out, extra={"exported_from": str(checkpoint), "training": meta.get("training"),
                                            "evaluation": metrics_data})
    counts = model.parameter_counts()
    cfg = model.config
    lines = [
        "---", "library_name: medmm", "tags: [medical, multimodal]", "---", "",
        "# medmm multimodal model", "",
        f"Exported from `{checkpoint}` with LoRA merged into the language model.", "",
        "## Parts",
        f"- Language model: `llm/` ({type(model.llm).__name__}, {counts['llm']:,} parameters); "
        "loads with `AutoModelForCausalLM.from_pretrained`.",
    ]
    for name, m in cfg.modalities.items():
        lines.append(f"- `<{name}>`: loader `{m.loader}`, encoder `{m.encoder.name}`, projector `{m.projector.type}` "
                     f"({model.modality_tokens[name].slots} LLM tokens per input)")
    training = meta.get("training") or {}
    lines += ["", "## Training"]
    if training:
        lines.append(f"- Steps: {training.get('steps')}; final loss: {training.get('final_loss')}; "
                     f"ranks: {training.get('world_size')}; ZeRO stage: {training.get('zero_stage')}")
    lines += ["", "### Training data", *_dataset_lines(training.get("datasets") or [])]
    lines += ["", "## Evaluation"]
    if metrics_data:
        lines += [f"From `{metrics_path}` (checkpoint `{metrics_data.get('checkpoint', checkpoint)}`):", "",
                  *_metric_lines(metrics_data)]
    else:
        lines.append("No evaluation metrics were found (run `medmm eval`, then export with `--metrics`).")
    lines += ["", "## Use", "```python", "from medmm.model.multimodal import MedMMForCausalLM",
              f"model = MedMMForCausalLM.from_pretrained('{out}')", "```", "",
              "## Limitations",
              "Not a medical device. Outputs need review by a qualified clinician; DICOM reports written by "
              "medmm carry `VerificationFlag = UNVERIFIED`.", ""]
    (Path(out) / "README.md").write_text("\n".join(lines))
    return Path(out)
