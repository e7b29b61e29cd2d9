"""``medmm export --format hf``: merge LoRA into the language model and write a self-contained folder.

The folder is a medmm model folder whose ``llm/`` is a plain Hugging Face causal LM (loadable with
``AutoModelForCausalLM.from_pretrained(out/"llm")``), plus a model card (README.md).
"""

from __future__ import annotations

import json
from pathlib import Path


def export_hf(checkpoint: str | Path, out: str | Path) -> Path:
    from ..model.multimodal import MedMMForCausalLM

    model = MedMMForCausalLM.from_pretrained(checkpoint, merge_lora=True)
    meta = json.loads((Path(checkpoint) / "medmm_config.json").read_text())
    out = model.save_pretrained(out, extra={"exported_from": str(checkpoint), "training": meta.get("training")})
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
    lines += ["", "## Training", f"- Steps: {training.get('steps')}; final loss: {training.get('final_loss')}",
              f"- Data: {', '.join(map(str, training.get('datasets') or [])) or 'unknown'}", "",
              "## Use", "```python", "from medmm.model.multimodal import MedMMForCausalLM",
              f"model = MedMMForCausalLM.from_pretrained('{out}')", "```", "",
              "Not a medical device. Outputs need review by a qualified clinician.", ""]
    (Path(out) / "README.md").write_text("\n".join(lines))
    return Path(out)
