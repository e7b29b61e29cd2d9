"""``trainer.init_from``: start a run from a saved medmm model folder, the link between chained stages.

``pretrain`` -> ``sft`` (-> ``dpo``) hand over the language model, encoders and projectors; ``align`` -> ``sft``
hands over an encoder and projector. What the folder gives this run:

- encoders and projectors of the modalities both models have (strict state dicts);
- the language model, by ``trainer.init_llm``:

  ``merged``   the folder's weights with its LoRA adapter folded in become this run's base weights; a run with
               ``model.llm_trainable: lora`` then trains a new adapter on top (the usual pretrain -> sft chain);
  ``adapter``  the folder's base weights, and its adapter trained on (this run must use the same LoRA settings);
  ``none``     only encoders and projectors.

Vocabularies may differ by modality placeholders (a text-only pretraining run has none; the SFT model adds
``<image>``): rows of the embedding and output matrices are copied by token string, and a token new to this run
keeps its fresh initialisation. Any other shape mismatch is a :class:`ConfigError` naming the parameter.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

INIT_LLM_MODES = ("merged", "adapter", "none")


def _canonical(name: str) -> str:
    """A base-model parameter name without peft's wrappers (LoRA base layers, modules_to_save copies)."""
    for wrapped in (".base_layer.", ".original_module.", ".modules_to_save.default."):
        name = name.replace(wrapped, ".")
    return name


def _vocab_param_names(llm) -> set[str]:
    """Names (canonical) of the parameters indexed by token id: input embeddings and output head."""
    ids = {id(llm.get_input_embeddings().weight)}
    out = llm.get_output_embeddings()
    if out is not None and hasattr(out, "weight"):
        ids.add(id(out.weight))
    return {_canonical(n) for n, p in llm.named_parameters() if id(p) in ids}


def _row_pairs(src_tok, dst_tok):
    """(source rows, target rows) of the tokens both vocabularies hold, matched by token string."""
    import torch

    src = src_tok.get_vocab()
    dst = dst_tok.get_vocab()
    pairs = sorted((src[t], dst[t]) for t in src.keys() & dst.keys())
    return torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs])


def _copy(dst_param, src_tensor, name: str, vocab: bool, rows) -> None:
    import torch

    with torch.no_grad():
        if dst_param.shape == src_tensor.shape and not vocab:
            dst_param.copy_(src_tensor.to(dst_param.dtype))
        elif vocab and dst_param.shape[1:] == src_tensor.shape[1:]:
            s, d = rows
            keep = (s < src_tensor.shape[0]) & (d < dst_param.shape[0])
            dst_param[d[keep]] = src_tensor[s[keep]].to(dst_param.dtype)
        else:
            raise ConfigError(f"trainer.init_from: parameter '{name}' has shape {tuple(src_tensor.shape)} in the folder "
                              f"but {tuple(dst_param.shape)} here (is it the same language model?)")


def _load_base(model, state: dict, vocab_names: set[str], rows) -> int:
    """Copy ``state`` (canonical names) into the base weights of ``model.llm``; returns tensors copied."""
    n = 0
    missing = []
    for name, p in model._base_llm().named_parameters():
        if "lora_" in name:
            continue
        key = _canonical(name)
        if key not in state:
            missing.append(key)
            continue
        _copy(p, state[key], key, key in vocab_names, rows)
        n += 1
    if missing:
        raise ConfigError(f"trainer.init_from: the folder's language model lacks {len(missing)} parameters of this "
                          f"one (e.g. '{missing[0]}'); is it the same architecture?")
    return n


def _load_adapter(model, src, vocab_names: set[str], rows) -> int:
    """Copy the folder's adapter parameters (LoRA matrices, modules_to_save copies) into this run's adapter."""
    dst = {n: p for n, p in model.llm.named_parameters() if "lora_" in n or ".modules_to_save." in n}
    srcp = {n: p for n, p in src.llm.named_parameters() if "lora_" in n or ".modules_to_save." in n}
    if dst.keys() != srcp.keys():
        extra = sorted(srcp.keys() ^ dst.keys())
        raise ConfigError(f"trainer.init_llm=adapter: the folder's adapter and this run's differ (e.g. '{extra[0]}'); "
                          "use the same model.lora settings, or init_llm: merged")
    for name, p in dst.items():
        _copy(p, srcp[name].detach(), name, _canonical(name.split("base_model.model.", 1)[-1]) in vocab_names, rows)
    return len(dst)


def warm_start(model, folder: str | Path, init_llm: str = "merged") -> dict:
    """Load what a saved medmm folder gives into a freshly built :class:`MedMMForCausalLM` (``trainer.init_from``).

    Args:
        model: this run's model, built from its own config (LoRA, if any, already applied).
        folder: a folder written by ``save_pretrained`` (a finished stage's ``checkpoint/``).
        init_llm: merged | adapter | none.

    Returns:
        What was loaded: ``{"encoders.NAME": tensors, "projectors.NAME": tensors, "llm": tensors, "llm_adapter": ...}``.
    """
    from ..model.multimodal import CONFIG_NAME, MedMMForCausalLM
    from .checkpoint import load_modules_from

    if init_llm not in INIT_LLM_MODES:
        raise ConfigError(f"trainer.init_llm: '{init_llm}' is not one of {INIT_LLM_MODES}")
    folder = Path(folder)
    if not (folder / CONFIG_NAME).exists():
        raise ConfigError(f"trainer.init_from: {folder} is not a medmm model folder ({CONFIG_NAME} missing)")
    loaded: dict = {}
    try:
        loaded.update(load_modules_from(model, folder))
    except ConfigError as e:
        if init_llm == "none" or "shares no modality" not in str(e):
            raise
    if init_llm == "none":
        return loaded
    if init_llm == "adapter" and not model.has_llm_adapter:
        raise ConfigError("trainer.init_llm=adapter trains the folder's adapter on: set model.llm_trainable: lora")
    dtype = next(model.llm.parameters()).dtype
    src = MedMMForCausalLM.from_pretrained(folder, trainable=False, dtype=dtype, merge_lora=init_llm == "merged")
    if init_llm == "adapter" and not src.has_llm_adapter:
        raise ConfigError(f"trainer.init_llm=adapter: {folder} holds no LoRA adapter (its LLM was trained in full or "
                          "frozen); use init_llm: merged")
    vocab_names = _vocab_param_names(src._base_llm())
    rows = _row_pairs(src.tokenizer, model.tokenizer)
    state = src.llm_base_state_dict() if init_llm == "adapter" else src.llm.state_dict()
    loaded["llm"] = _load_base(model, state, vocab_names, rows)
    # (this run's modules_to_save copies were among the base parameters: they start from the folder's weights too)
    if init_llm == "adapter":
        loaded["llm_adapter"] = _load_adapter(model, src, vocab_names, rows)
    del src
    return loaded
