"""``medmm export --format onnx|torchscript``: each modality's encoder + projector as one graph.

What the folder holds::

    <modality>.onnx | <modality>.pt   x [, mask] -> tokens (B, K, H_llm); the batch axis is dynamic;
                                      variable-length inputs (DNA) are right-padded to ``pad_to`` + mask
    embed_tokens.onnx, llm.onnx       with ``--with-llm`` (ONNX only): ids -> embeddings, and
                                      inputs_embeds + attention_mask -> logits (no KV cache)
    tokenizer/, medmm_config.json     preprocessing and tokens travel with the graphs
    export_manifest.json              per graph: file, input names/dtypes/shapes, tokens per input
    validation.json                   per graph: max abs diff against PyTorch at batch sizes 1 and 3

Each graph is run again (onnxruntime, or ``torch.jit.load``) on fresh inputs of batch sizes other
than the one it was traced with, and compared with the PyTorch module; the export fails if a graph
differs by more than ``atol + rtol * max|reference|``. ONNX uses the ``torch.export`` (dynamo)
exporter and falls back to the TorchScript-based one when a module has data-dependent Python
control flow (the resampler's all-masked check); ``validation.json`` names the exporter used.

    medmm export --checkpoint runs/demo/checkpoint --format onnx --out runs/onnx [--with-llm]
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..utils import atomic_write_text, optional_import

# Real values for loaders whose inputs are not plain float tensors (random ids would be out of vocabulary).
_EXAMPLE_VALUES = {
    "smiles_fingerprint": ["CCO", "CC(=O)Oc1ccccc1C(=O)O", "c1ccccc1", "CN1CCC[C@H]1c2cccnc2"],
    "dna_tokens": ["ACGTACGTAC", "GATTACA" * 9, "TTGACA" + "N" * 5 + "TATAAT" * 4, "ACGT" * 30],
}
BATCH_SIZES = (1, 3)


class EncoderProjector(nn.Module):
    """One modality's encoder + projector: ``x (B, ...) [, mask] -> (B, K, H)`` LLM tokens."""

    def __init__(self, encoder: nn.Module, projector: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        feats, fmask = self.encoder(x, mask)  # (B, N, D), (B, N) or None
        return self.projector(feats, fmask)  # (B, K, H)


class LLMLogits(nn.Module):
    """The language model without KV cache: ``inputs_embeds (B, T, H), attention_mask (B, T) -> logits (B, T, V)``."""

    def __init__(self, llm: nn.Module):
        super().__init__()
        self.llm = llm

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False).logits


class EmbedTokens(nn.Module):
    """``input_ids (B, T) -> (B, T, H)``: the LLM's token embeddings, to splice modality tokens into."""

    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids)


def load_for_export(checkpoint: str | Path):
    """The model with LoRA merged everywhere (LLM and any LoRA-adapted encoder/projector), in eval mode."""
    from ..model.multimodal import MedMMForCausalLM

    model = MedMMForCausalLM.from_pretrained(checkpoint, merge_lora=True).eval()
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        LoraLayer = ()  # noqa: N806
    for mod in list(model.encoders.modules()) + list(model.projectors.modules()):
        if LoraLayer and isinstance(mod, LoraLayer) and not mod.merged:
            mod.merge()  # the graph then holds one matmul per layer, not base + A @ B
    return model


def example_batch(loader_name: str, loader, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """A batch of ``batch`` inputs the loader could produce: real values, or seeded noise of the dummy's shape."""
    values = _EXAMPLE_VALUES.get(loader_name)
    if values:
        items = [loader.load(values[(seed + i) % len(values)]) for i in range(batch)]
    else:
        g = torch.Generator().manual_seed(seed)
        items = []
        for _ in range(batch):
            d = loader.dummy()
            x = d["x"]
            items.append({**d, "x": torch.randn(x.shape, generator=g) if x.is_floating_point() else x})
    return loader.collate(items)


def pad_to(b: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """Right-pad a variable-length batch (``x (B, L)`` + ``mask (B, L)``) to ``length`` with masked zeros."""
    n = b["x"].shape[1]
    if n > length:
        raise ValueError(f"input of {n} tokens is longer than the graph's fixed length {length}")
    return {"x": torch.nn.functional.pad(b["x"], (0, length - n)),
            "mask": torch.nn.functional.pad(b["mask"], (0, length - n), value=False)}


def _args(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (b["x"], b["mask"]) if b.get("mask") is not None else (b["x"],)


def _diff(ref: torch.Tensor, out: np.ndarray, valid: torch.Tensor | None = None) -> tuple[float, float]:
    """(max |out - ref|, max |ref|) over the ``valid`` positions (all when None)."""
    r = ref.detach().float().numpy()
    d = np.abs(out.astype(np.float32) - r)
    if valid is not None:
        v = valid.numpy().astype(bool)
        d, r = d[v], r[v]
    return float(d.max()), float(np.abs(r).max())


def _export_onnx_module(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_name: str,
                        dynamic: dict[str, dict[int, str]], exporter: str, opset: int) -> tuple[str, str | None]:
    """Export with the dynamo exporter (fallback: TorchScript-based). Returns (exporter used, fallback reason)."""
    optional_import("onnx")
    with _no_mha_fastpath():
        return _export_onnx_inner(module, args, path, input_names, output_name, dynamic, exporter, opset)


class _no_mha_fastpath:
    """Turn off nn.TransformerEncoderLayer's fused eval path (``aten::_transformer_encoder_layer_fwd``), which
    no ONNX exporter translates; the unfused ops compute the same thing."""

    def __enter__(self):
        self.prev = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)

    def __exit__(self, *exc):
        torch.backends.mha.set_fastpath_enabled(self.prev)


def _export_onnx_inner(module, args, path, input_names, output_name, dynamic, exporter, opset):
    reason = None
    if exporter in ("auto", "dynamo"):
        # Dim.DYNAMIC lets torch.export derive each axis's range (and the equalities between inputs) itself.
        shapes = {name: {ax: torch.export.Dim.DYNAMIC for ax in dynamic.get(name, {})} for name in input_names}
        log_sink = io.StringIO()  # the dynamo exporter prints progress and, on failure, the whole graph
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(log_sink), contextlib.redirect_stderr(log_sink):
                warnings.simplefilter("ignore")
                torch.onnx.export(module, args, str(path), input_names=input_names, output_names=[output_name],
                                  dynamic_shapes=shapes, dynamo=True, opset_version=opset, verbose=False)
            return "dynamo", None
        except Exception as e:  # torch.export raises many types for unsupported code
            if exporter == "dynamo":
                raise
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
            for p in path.parent.glob(path.name + "*"):
                p.unlink()
    axes = {n: dict(a) for n, a in dynamic.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=[output_name],
                          dynamic_axes=axes, dynamo=False, opset_version=opset)
    return "torchscript", reason


def _spec(args: tuple, names: list[str], dynamic: dict[str, dict[int, str]]) -> list[dict]:
    return [{"name": n, "dtype": str(a.dtype).replace("torch.", ""),
             "shape": [dynamic.get(n, {}).get(i, int(s)) for i, s in enumerate(a.shape)]} for n, a in zip(names, args)]


def _copy_preprocessing(checkpoint: Path, out: Path) -> None:
    shutil.copy2(checkpoint / "medmm_config.json", out / "medmm_config.json")
    if (out / "tokenizer").exists():
        shutil.rmtree(out / "tokenizer")
    shutil.copytree(checkpoint / "tokenizer", out / "tokenizer")


def _export_modality(model, proc, name: str, mcfg, out: Path, fmt: str, exporter: str, opset: int, atol: float,
                     rtol: float, ort) -> tuple[dict, dict]:
    """Export one modality's graph and compare it with PyTorch. Returns (validation entry, manifest entry)."""
    loader = proc.loaders[name]
    module = EncoderProjector(model.encoders[name], model.projectors[name]).eval()
    trace = example_batch(mcfg.loader, loader, 2, seed=0)
    # A mask means variable-length inputs (DNA). Their graphs take a fixed length, the loader's bound
    # (``preprocess.max_length``), padded with masked zeros: torch.export specialises the sequence axis
    # of strided ceil-mode pooling, and the TorchScript-based ONNX exporter bakes it into reshapes.
    fixed_len = mcfg.preprocess.max_length if trace.get("mask") is not None else None
    if fixed_len:
        trace = pad_to(trace, fixed_len)
    args = _args(trace)
    names = ["x", "mask"][: len(args)]
    dynamic = {n: {0: "batch"} for n in [*names, "tokens"]}
    t0 = time.perf_counter()
    if fmt == "onnx":
        path = out / f"{name}.onnx"
        used, reason = _export_onnx_module(module, args, path, names, "tokens", dynamic, exporter, opset)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run(a):
            return sess.run(None, {n: t.numpy() for n, t in zip(names, a)})[0]
    else:
        path = out / f"{name}.pt"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.jit.trace(module, args, check_trace=False).save(str(path))
        used, reason = "torch.jit.trace", None
        loaded = torch.jit.load(str(path))

        def run(a):
            with torch.no_grad():
                return loaded(*a).numpy()
    export_s = time.perf_counter() - t0
    checks = []
    for i, bs in enumerate(BATCH_SIZES):
        b = example_batch(mcfg.loader, loader, bs, seed=100 + i)
        with torch.no_grad():
            ref = module(*_args(b))  # (B, K, H), PyTorch on the inputs as the loader made them
        a = _args(pad_to(b, fixed_len) if fixed_len else b)
        got = run(a)
        diff, scale = _diff(ref, got)
        checks.append({"batch": bs, "input_shape": list(b["x"].shape), "graph_input_shape": list(a[0].shape),
                       "output_shape": list(got.shape), "max_abs_diff": diff, "max_abs_ref": scale})
    ok = all(c["max_abs_diff"] <= atol + rtol * c["max_abs_ref"] for c in checks)
    entry = {"file": path.name, "exporter": used, "fallback_reason": reason,
             "max_abs_diff": max(c["max_abs_diff"] for c in checks), "ok": ok, "checks": checks,
             "export_s": round(export_s, 3)}
    spec = {"file": path.name, "loader": mcfg.loader, "inputs": _spec(args, names, dynamic), "pad_to": fixed_len,
            "output": {"name": "tokens", "shape": ["batch", model.modality_tokens[name].slots, model.llm_hidden_size]},
            "placeholder": model.modality_tokens[name].text}
    return entry, spec


def export_graphs(checkpoint: str | Path, out: str | Path, fmt: str = "onnx", with_llm: bool = False,
                  exporter: str = "auto", opset: int = 18, atol: float = 1e-4, rtol: float = 1e-3) -> dict:
    """Export every modality's encoder + projector (and, for ONNX, optionally the LLM) and validate them.

    Args:
        checkpoint: a medmm model folder.
        out: output folder (created; files in it are overwritten).
        fmt: ``onnx`` or ``torchscript``.
        with_llm: also export the language model (ONNX only); a failure is reported, not raised.
        exporter: ``auto`` (dynamo, falling back to the TorchScript-based exporter), ``dynamo`` or ``torchscript``.
        opset: ONNX opset.
        atol, rtol: a graph passes when max |graph - PyTorch| <= atol + rtol * max |PyTorch|.

    Returns the validation report (also written to ``out/validation.json``). Raises ``RuntimeError`` when a
    modality graph fails validation.
    """
    if fmt not in ("onnx", "torchscript"):
        raise ValueError(f"unknown graph format '{fmt}'; use onnx or torchscript")
    if with_llm and fmt != "onnx":
        raise ValueError("--with-llm is supported for ONNX only")
    checkpoint, out = Path(checkpoint), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_for_export(checkpoint)
    proc = model.processor(512)
    report: dict = {"format": fmt, "checkpoint": str(checkpoint), "torch": torch.__version__, "atol": atol,
                    "rtol": rtol, "modalities": {}}
    manifest: dict = {"format": fmt, "modalities": {}}
    if fmt == "onnx":
        ort = optional_import("onnxruntime")
        report["onnxruntime"] = ort.__version__
    failed = []
    for name, mcfg in model.config.modalities.items():
        try:
            report["modalities"][name], manifest["modalities"][name] = _export_modality(
                model, proc, name, mcfg, out, fmt, exporter, opset, atol, rtol, ort if fmt == "onnx" else None)
        except Exception as e:  # one modality's failure is reported with the others, then raised below
            report["modalities"][name] = {"ok": False, "error": f"{type(e).__name__}: {str(e).strip()[:500]}"}
        if not report["modalities"][name]["ok"]:
            failed.append(name)
    if with_llm:
        report["llm"] = _export_llm(model, proc, out, exporter, opset, atol, rtol)
        if report["llm"].get("exported"):
            manifest["llm"] = {"embed_tokens": "embed_tokens.onnx", "file": "llm.onnx",
                               "inputs": ["inputs_embeds", "attention_mask"], "output": "logits", "kv_cache": False}
    _copy_preprocessing(checkpoint, out)
    for fname, data in (("export_manifest.json", manifest), ("validation.json", report)):
        atomic_write_text(out / fname, json.dumps(data, indent=2))
        (out / fname).chmod(0o644)
    if failed:
        raise RuntimeError(f"{fmt} export of {', '.join(failed)} failed or differs from PyTorch beyond tolerance; "
                           f"see {out / 'validation.json'}")
    return report


def _export_llm(model, proc, out: Path, exporter: str, opset: int, atol: float, rtol: float) -> dict:
    """Export the LLM (inputs_embeds -> logits) and its embedding table; compare with PyTorch on real prompts."""
    import onnxruntime as ort

    res: dict = {"exported": False}
    t0 = time.perf_counter()
    prompts = ["Describe the findings.", "Is this molecule likely to be an approved drug? Answer yes or no."]
    samples = [proc.process_prompt({"conversations": [{"from": "human", "value": q}]}) for q in prompts]
    batch = proc.collate(samples, padding_side="left")
    ids, am = batch["input_ids"], batch["attention_mask"]  # (B, T), left-padded
    try:
        with torch.no_grad():
            emb = model.embed(ids)  # (B, T, H)
        llm = LLMLogits(model.llm).eval()
        dyn = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
               "logits": {0: "batch", 1: "seq"}}
        used, reason = _export_onnx_module(llm, (emb, am), out / "llm.onnx", ["inputs_embeds", "attention_mask"],
                                           "logits", dyn, exporter, opset)
        emb_mod = EmbedTokens(model.llm.get_input_embeddings()).eval()
        _export_onnx_module(emb_mod, (ids,), out / "embed_tokens.onnx", ["input_ids"], "embeds",
                            {"input_ids": {0: "batch", 1: "seq"}, "embeds": {0: "batch", 1: "seq"}}, exporter, opset)
        s_llm = ort.InferenceSession(str(out / "llm.onnx"), providers=["CPUExecutionProvider"])
        s_emb = ort.InferenceSession(str(out / "embed_tokens.onnx"), providers=["CPUExecutionProvider"])
        # A different batch than the traced one: a single prompt, then both prompts with the order swapped.
        checks = []
        for order in ([0], [1, 0]):
            b = proc.collate([samples[i] for i in order], padding_side="left")
            e = s_emb.run(None, {"input_ids": b["input_ids"].numpy()})[0]
            logits = s_llm.run(None, {"inputs_embeds": e, "attention_mask": b["attention_mask"].numpy()})[0]
            with torch.no_grad():
                ref = llm(model.embed(b["input_ids"]), b["attention_mask"])  # (B, T, V)
            valid = b["attention_mask"].bool()
            diff, scale = _diff(ref, logits, valid)  # padded positions carry no meaning
            same_next = bool((torch.from_numpy(logits[:, -1]).argmax(-1) == ref[:, -1].argmax(-1)).all())
            checks.append({"batch": len(order), "seq": int(b["input_ids"].shape[1]), "max_abs_diff": diff,
                           "max_abs_ref": scale, "same_next_token": same_next})
        res = {"exported": True, "exporter": used, "fallback_reason": reason, "checks": checks,
               "max_abs_diff": max(c["max_abs_diff"] for c in checks),
               "ok": all(c["max_abs_diff"] <= atol + rtol * c["max_abs_ref"] and c["same_next_token"] for c in checks),
               "kv_cache": False, "export_s": round(time.perf_counter() - t0, 3)}
    except Exception as e:  # report honestly: LLM export support varies by architecture and torch version
        res = {"exported": False, "error": f"{type(e).__name__}: {str(e).strip()[:500]}",
               "export_s": round(time.perf_counter() - t0, 3)}
    return res
