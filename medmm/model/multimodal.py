"""The multimodal causal LM: ``encoders: dict[str, nn.Module]`` + projectors around any HF causal LM.

Each modality ``name`` has one placeholder token ``<name>`` in the tokenizer. The processor expands
it to ``slots`` copies; :meth:`MedMMForCausalLM.embed` replaces those embeddings, in row-major order,
with the projected encoder tokens. Adding a modality touches no other modality's code.

A saved folder holds everything needed to rebuild the model::

    medmm_config.json      model config (incl. preprocessing), modality tokens, format version
    tokenizer/             the tokenizer with the placeholder tokens
    llm/                   the (base) language model, safetensors
    llm_adapter/           the peft LoRA adapter, when the LLM was trained with LoRA
    modules.safetensors    encoders + projectors (LoRA weights included where used)
    value_head.safetensors the value head (``trainer.stage: value``), when one was trained
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..config import LoraSettings, ModelConfig, Trainable, config_from_dict, to_dict
from ..data.conversation import ConversationEncoder, ModalityToken
from ..data.dataset import Processor
from ..data.loaders import build_loader
from ..data.packing import packed_llm_inputs
from ..errors import ConfigError, ModalityMismatchError
from .projectors import build_projector

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
CONFIG_NAME = "medmm_config.json"
MODULES_NAME = "modules.safetensors"


def _linear_leaf_names(module: nn.Module) -> list[str]:
    """Names of nn.Linear leaves LoRA can wrap (skipping MultiheadAttention internals, which bypass forward)."""
    skip = {id(m.out_proj) for m in module.modules() if isinstance(m, nn.MultiheadAttention)}
    return sorted({n.split(".")[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear) and id(m) not in skip})


def apply_trainable(module: nn.Module, mode: Trainable, lora: LoraSettings, what: str) -> nn.Module:
    """Freeze, fully train, or LoRA-adapt a non-LLM module (encoder, projector)."""
    if mode == "frozen":
        module.requires_grad_(False)
    elif mode == "full":
        module.requires_grad_(True)
    elif mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        targets = lora.target_modules or _linear_leaf_names(module)
        if not targets:
            raise ConfigError(f"{what}: no nn.Linear layers to adapt with LoRA")
        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
        module = inject_adapter_in_model(cfg, module)
        for n, p in module.named_parameters():
            p.requires_grad_("lora_" in n)
    else:  # pragma: no cover - guarded by the config Literal
        raise ConfigError(f"{what}: unknown trainable mode {mode}")
    return module


def _llm_lora(llm, lora: LoraSettings):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                     target_modules=lora.target_modules or "all-linear", modules_to_save=lora.modules_to_save)
    return get_peft_model(llm, cfg)


class MedMMForCausalLM(nn.Module):
    """Encoders + projectors + a Hugging Face causal LM, spliced at modality placeholder tokens."""

    def __init__(self, config: ModelConfig, llm: nn.Module, tokenizer, encoders: dict[str, nn.Module],
                 projectors: dict[str, nn.Module]):
        super().__init__()
        self.config = config
        self.llm = llm
        self.tokenizer = tokenizer
        self.encoders = nn.ModuleDict(encoders)
        self.projectors = nn.ModuleDict(projectors)
        self.value_head: nn.Module | None = None  # trainer.stage: value (medmm.model.value_head), read by search
        self.modality_tokens: dict[str, ModalityToken] = {}
        for name in config.modalities:
            text = f"<{name}>"
            tid = tokenizer.convert_tokens_to_ids(text)
            enc_n = getattr(self.encoders[name], "num_tokens", None)
            slots = self.projectors[name].num_tokens(enc_n)
            if slots is None:
                raise ConfigError(f"model.modalities.{name}: encoder '{config.modalities[name].encoder.name}' emits "
                                  "a variable number of tokens; use projector type 'resampler' to bound it")
            if slots > config.modalities[name].max_tokens:
                raise ConfigError(f"model.modalities.{name}: {slots} LLM tokens per input is over max_tokens="
                                  f"{config.modalities[name].max_tokens}; use projector type 'resampler' "
                                  "(num_queries) or a coarser patch size")
            self.modality_tokens[name] = ModalityToken(text, int(tid), int(slots))

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, config: ModelConfig, llm_dtype: torch.dtype | None = None) -> MedMMForCausalLM:
        """Build from a config: LLM and tokenizer from local folders, encoders from the registry."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not config.llm:
            raise ConfigError("model.llm: the path of a local Hugging Face causal LM folder is required")
        if not Path(config.llm).exists():
            raise ConfigError(f"model.llm: '{config.llm}' does not exist (medmm loads local checkpoints only)")
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.llm)
        add_modality_tokens(tokenizer, list(config.modalities))
        kw = {"dtype": llm_dtype or torch.float32}
        if config.attn_implementation:
            kw["attn_implementation"] = config.attn_implementation
        llm = AutoModelForCausalLM.from_pretrained(config.llm, **kw)
        if llm.get_input_embeddings().num_embeddings < len(tokenizer):
            llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        return cls._assemble(config, llm, tokenizer, load_encoder_weights=True)

    @classmethod
    def _assemble(cls, config: ModelConfig, llm, tokenizer, load_encoder_weights: bool, adapter_dir: Path | None = None,
                  trainable: bool = True) -> MedMMForCausalLM:
        from encoders import build_encoder

        hidden = llm.get_input_embeddings().embedding_dim
        encoders, projectors = {}, {}
        for name, m in config.modalities.items():
            try:
                enc = build_encoder(m.encoder.name, checkpoint=m.encoder.checkpoint if load_encoder_weights else None,
                                    **m.encoder.kwargs)
            except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
                raise ConfigError(f"model.modalities.{name}.encoder: {e}") from e
            proj = build_projector(m.projector.type, enc.out_dim, hidden, num_queries=m.projector.num_queries,
                                   depth=m.projector.depth, heads=m.projector.heads)
            encoders[name] = apply_trainable(enc, m.encoder.trainable, config.lora, f"modalities.{name}.encoder")
            projectors[name] = apply_trainable(proj, m.projector.trainable, config.lora, f"modalities.{name}.projector")
        if adapter_dir is not None:
            from peft import PeftModel

            llm = PeftModel.from_pretrained(llm, str(adapter_dir), is_trainable=trainable)
        elif config.llm_trainable == "lora":
            llm = _llm_lora(llm, config.lora)
        else:
            llm.requires_grad_(config.llm_trainable == "full")
        if config.gradient_checkpointing:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(llm, "enable_input_require_grads"):
                llm.enable_input_require_grads()
        model = cls(config, llm, tokenizer, encoders, projectors)
        if not trainable:
            model.requires_grad_(False)
        return model

    def processor(self, max_length: int = 2048, system_prompt: str | None = None) -> Processor:
        """The record -> sample -> batch processor matching this model's tokenizer and preprocessing."""
        enc = ConversationEncoder(self.tokenizer, self.modality_tokens, max_length, system_prompt)
        loaders = {name: build_loader(m.loader, m.preprocess) for name, m in self.config.modalities.items()}
        return Processor(enc, loaders, self.tokenizer.pad_token_id)

    # ------------------------------------------------------------------ forward
    @property
    def llm_hidden_size(self) -> int:
        return self.llm.get_input_embeddings().embedding_dim

    def encode_modality(self, name: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder + projector: inputs -> (M, K, H) LLM tokens."""
        feats, fmask = self.encoders[name](x, mask)  # (M, N, D), (M, N)
        return self.projectors[name](feats, fmask)  # (M, K, H)

    def embed(self, input_ids: torch.Tensor, modality_inputs: dict[str, dict] | None = None,
              features: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Token embeddings with projected modality tokens spliced in at the placeholder positions.

        ``features`` holds already projected ``(M, K, H)`` tokens per modality (a session's cache); the
        encoder then does not run again.
        """
        emb = self.llm.get_input_embeddings()(input_ids)  # (B, T, H)
        modality_inputs = modality_inputs or {}
        features = features or {}
        for name, mt in self.modality_tokens.items():
            slots = input_ids == mt.token_id  # (B, T)
            n_slots = int(slots.sum())
            batch = modality_inputs.get(name)
            if batch is None and name not in features:
                if n_slots:
                    raise ModalityMismatchError(f"{n_slots // mt.slots} {mt.text} placeholder(s) but no '{name}' input")
                continue
            if name in features:
                proj = features[name]
            else:
                x = batch["x"].to(emb.device)
                mask = batch.get("mask")
                proj = self.encode_modality(name, x.to(emb.dtype) if x.is_floating_point() else x,
                                            None if mask is None else mask.to(emb.device))  # (M, K, H)
            if batch is not None and batch.get("dummy"):
                # Keep every rank running every encoder (ZeRO-3 gathers are collective); contributes 0.
                if n_slots:
                    raise ModalityMismatchError(f"{mt.text} placeholders in a batch whose '{name}' input is a dummy")
                emb = emb + 0.0 * proj.sum()
                continue
            if proj.shape[0] * proj.shape[1] != n_slots:
                raise ModalityMismatchError(
                    f"'{name}': {proj.shape[0]} input(s) x {proj.shape[1]} tokens = {proj.shape[0] * proj.shape[1]} "
                    f"positions, but the text holds {n_slots} {mt.text} positions ({n_slots / mt.slots:g} placeholders)")
            emb = emb.masked_scatter(slots.unsqueeze(-1), proj.to(emb.dtype).reshape(-1, emb.shape[-1]))
        return emb

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, modality_inputs: dict[str, dict] | None = None,
                position_ids: torch.Tensor | None = None, **kwargs):
        """Next-token loss/logits. ``position_ids`` without ``attention_mask`` is a neat-packed batch
        (``medmm.data.packing``): documents restart at position 0 and attend only to themselves."""
        emb = self.embed(input_ids, modality_inputs)  # (B, T, H)
        if position_ids is None or attention_mask is not None:
            return self.llm(inputs_embeds=emb, attention_mask=attention_mask, position_ids=position_ids,
                            labels=labels, **kwargs)
        B, T = input_ids.shape
        emb, position_ids, labels, attention_mask = packed_llm_inputs(
            emb, position_ids, labels, getattr(self._base_llm().config, "_attn_implementation", None))
        out = self.llm(inputs_embeds=emb, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
                       **kwargs)
        if out.logits is not None and out.logits.shape[0] != B:  # FlashAttention ran on the flattened batch
            out.logits = out.logits.reshape(B, T, -1)
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 modality_inputs: dict[str, dict] | None = None, **gen_kwargs) -> torch.Tensor:
        """HF ``generate`` on spliced embeddings; returns only the new tokens ``(B, new)``."""
        emb = self.embed(input_ids, modality_inputs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        gen_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        gen_kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
        gen_kwargs.setdefault("suppress_tokens", [mt.token_id for mt in self.modality_tokens.values()])
        # Passing the ids beside the embeddings lets repetition penalties see the prompt; HF then returns
        # prompt + new tokens, and we keep the new ones.
        out = self.llm.generate(input_ids=input_ids, inputs_embeds=emb, attention_mask=attention_mask, **gen_kwargs)
        return out[:, input_ids.shape[1]:]

    # ------------------------------------------------------------------ save / load
    def _base_llm(self):
        from peft import PeftModel

        return self.llm.get_base_model() if isinstance(self.llm, PeftModel) else self.llm

    @property
    def has_llm_adapter(self) -> bool:
        from peft import PeftModel

        return isinstance(self.llm, PeftModel)

    def modules_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {f"encoders.{k}": v for k, v in self.encoders.state_dict().items()}
        sd.update({f"projectors.{k}": v for k, v in self.projectors.state_dict().items()})
        return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}

    def llm_base_state_dict(self) -> dict[str, torch.Tensor]:
        """LLM weights without LoRA layers (base weights under their original names)."""
        sd = self._base_llm().state_dict()
        if not self.has_llm_adapter:
            return sd
        # LoRA layers keep the base weight under ".base_layer."; modules_to_save keep it under
        # ".original_module." beside the trained copy (which lives in the adapter).
        return {k.replace(".base_layer.", ".").replace(".original_module.", "."): v for k, v in sd.items()
                if "lora_" not in k and ".modules_to_save." not in k}

    def save_pretrained(self, path: str | Path, include_base_llm: bool = True, extra: dict | None = None) -> Path:
        """Write the folder atomically (a temp folder renamed into place)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        try:
            cfg = to_dict(self.config)
            for m in cfg["modalities"].values():
                m["encoder"]["checkpoint"] = None  # weights live in modules.safetensors
            if include_base_llm:
                cfg["llm"] = "llm"
                cfg["tokenizer"] = None
                base = self._base_llm()
                base.save_pretrained(tmp / "llm", state_dict=self.llm_base_state_dict(), safe_serialization=True)
            if self.has_llm_adapter:
                # The resized embeddings live in llm/ when the base is included; no need to copy them into the adapter.
                self.llm.save_pretrained(str(tmp / "llm_adapter"), save_embedding_layers=not include_base_llm)
            self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            save_file(self.modules_state_dict(), str(tmp / MODULES_NAME), metadata={"format": "pt"})
            if self.value_head is not None:
                from .value_head import save_value_head

                save_value_head(self.value_head, tmp, self.value_head.info)
            meta = {
                "format_version": FORMAT_VERSION,
                "medmm_version": __version__,
                "model": cfg,
                "llm_adapter": self.has_llm_adapter,
                "base_llm_included": include_base_llm,
                "modality_tokens": {k: {"text": v.text, "token_id": v.token_id, "slots": v.slots}
                                    for k, v in self.modality_tokens.items()},
                **(extra or {}),
            }
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
            os.chmod(tmp, 0o755)
            from ..utils import atomic_replace_dir

            atomic_replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, trainable: bool = False, dtype: torch.dtype | None = None,
                        merge_lora: bool = False) -> MedMMForCausalLM:
        """Rebuild from a folder written by :meth:`save_pretrained` (safetensors only)."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..utils import read_folder_config

        path = Path(path)
        meta = read_folder_config(path, CONFIG_NAME, FORMAT_VERSION, "medmm model folder")
        config = config_from_dict(ModelConfig, meta["model"], str(path / CONFIG_NAME))
        llm_dir = path / "llm" if meta.get("base_llm_included") else Path(config.llm)
        tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
        llm = AutoModelForCausalLM.from_pretrained(str(llm_dir), dtype=dtype or torch.float32,
                                                   **({"attn_implementation": config.attn_implementation}
                                                      if config.attn_implementation else {}))
        adapter = path / "llm_adapter" if meta.get("llm_adapter") else None
        model = cls._assemble(config, llm, tokenizer, load_encoder_weights=False, adapter_dir=adapter,
                              trainable=trainable)
        state = load_file(str(path / MODULES_NAME))
        enc = {k[len("encoders."):]: v for k, v in state.items() if k.startswith("encoders.")}
        proj = {k[len("projectors."):]: v for k, v in state.items() if k.startswith("projectors.")}
        model.encoders.load_state_dict(enc, strict=True)
        model.projectors.load_state_dict(proj, strict=True)
        for name, mt in model.modality_tokens.items():
            saved = meta["modality_tokens"].get(name, {})
            if saved.get("token_id") != mt.token_id or saved.get("slots") != mt.slots:
                raise ValueError(f"{path}: modality token '{name}' does not match the saved tokenizer")
        from .value_head import load_value_head

        model.value_head = load_value_head(path)  # None when the folder has no value_head.safetensors
        if model.value_head is not None:
            model.value_head.requires_grad_(trainable)
        if merge_lora:
            model.merge_llm_lora()
        if dtype is not None:
            model.to(dtype)
        return model

    def merge_llm_lora(self) -> None:
        """Fold the LLM's LoRA adapter into its weights (for export and faster inference)."""
        if self.has_llm_adapter:
            self.llm = self.llm.merge_and_unload()
            self.config.llm_trainable = "frozen"

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        def count(m, trainable=False):
            return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)

        return {"total": count(self), "trainable": count(self, True), "llm": count(self.llm),
                "encoders": count(self.encoders), "projectors": count(self.projectors)}


def add_modality_tokens(tokenizer, names: list[str]) -> None:
    """Add ``<name>`` special tokens (idempotent) and make sure a pad token exists."""
    new = [f"<{n}>" for n in names if tokenizer.convert_tokens_to_ids(f"<{n}>") in (None, tokenizer.unk_token_id)]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def build_model(config: ModelConfig) -> MedMMForCausalLM:
    """Factory used by the trainer and tests."""
    return MedMMForCausalLM.from_config(config)
