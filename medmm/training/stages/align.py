"""``trainer.stage: align``: image-report contrastive alignment (CLIP-style) of one modality's encoder + projector.

Section ``align`` (:class:`medmm.config.AlignConfig`). Records are report conversations with exactly
one input of ``align.modality``; the report is the last answer. Image side: encoder -> projector ->
mean over tokens. Text side: the report through the (frozen) language model, mean of its last hidden
states over the report tokens, then a trainable linear map. Loss: open_clip's ``ClipLoss``
(symmetric InfoNCE; features gathered across ranks), with a learned temperature. Saved: the medmm
model folder, whose encoder and projector start instruction tuning through ``trainer.init_from``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ModelOutput

from ...errors import ConfigError
from . import register_stage
from .sft import SFTStage


class AlignmentModel(nn.Module):
    """Wraps a :class:`MedMMForCausalLM` for the contrastive stage; ``.model`` is what gets saved."""

    def __init__(self, model, modality: str, rank: int = 0, world_size: int = 1):
        super().__init__()
        from open_clip.loss import ClipLoss

        if modality not in model.modality_tokens:
            raise ConfigError(f"align.modality: '{modality}' is not a modality of the model "
                              f"(have {sorted(model.modality_tokens)})")
        self.model = model
        self.modality = modality
        h = model.llm_hidden_size
        self.text_proj = nn.Linear(h, h)
        # shape (1,): DeepSpeed cannot broadcast 0-dim parameters
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / 0.07)]))
        self.loss_fn = ClipLoss(local_loss=False, gather_with_grad=world_size > 1, cache_labels=True, rank=rank,
                                world_size=world_size)

    def features(self, input_ids, attention_mask, modality_inputs) -> tuple[torch.Tensor, torch.Tensor]:
        batch = modality_inputs[self.modality]
        x = batch["x"]
        dtype = self.text_proj.weight.dtype
        img = self.model.encode_modality(self.modality, x.to(dtype) if x.is_floating_point() else x,
                                         batch.get("mask")).mean(1)  # (B, H)
        emb = self.model.llm.get_input_embeddings()(input_ids)
        hidden = self.model.llm(inputs_embeds=emb, attention_mask=attention_mask,
                                output_hidden_states=True).hidden_states[-1]  # (B, T, H)
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        txt = self.text_proj((hidden * m).sum(1) / m.sum(1).clamp(min=1))  # (B, H)
        return F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)

    def forward(self, input_ids, attention_mask, modality_inputs, **_) -> ModelOutput:
        img, txt = self.features(input_ids, attention_mask, modality_inputs)
        scale = self.logit_scale.clamp(max=math.log(100)).exp().squeeze()
        return ModelOutput(loss=self.loss_fn(img, txt, scale), logits=img @ txt.T * scale)


@register_stage("align")
class AlignStage(SFTStage):
    """Report conversations -> ClipLoss between the modality's pooled tokens and the LLM's report embedding."""

    section = "align"
    pad_missing_modalities = False
    dataset_mode = "align"
    metrics = ("retrieval_acc",)

    def build_model(self):
        medmm = super().build_model()
        return AlignmentModel(medmm, self.settings.modality, self.ctx.rank, self.ctx.world_size)

    def loss(self, engine, batch):
        out = engine(**batch)
        logits = out.logits.detach()  # (B, B) this rank's images x texts
        acc = (logits.argmax(1) == torch.arange(logits.shape[0], device=logits.device)).float().mean()
        return out.loss, {"retrieval_acc": float(acc)}  # image -> its own report ranked first
