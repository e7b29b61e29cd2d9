"""``trainer.stage: sft``: instruction tuning, the next-token loss on the answers of conversations.

Records are conversation JSONL or streamed webdataset shards (``data.datasets``, ``format: jsonl | wds``, a weighted
mixture; :mod:`medmm.data.streaming`); a record may carry any of the
model's modalities, or none at all (text-only instruction data is a first-class input, alone or
mixed with multimodal records in one run). Every batch carries an input for every modality of the
model, a zero-weighted dummy where its records have none, so every rank runs every encoder at every
step: ZeRO-3's parameter gathers are collective, and a rank that skipped an encoder would hang the
others.

Logged: the loss (mean over answer tokens). Saved: the medmm model folder (``save_pretrained``) with a
``training`` summary in ``medmm_config.json``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from ...errors import ConfigError
from . import Stage, StageData, register_stage


@register_stage("sft")
class SFTStage(Stage):
    """Conversations -> answer-token cross-entropy of the multimodal causal LM."""

    section = None  # reads cfg.model and cfg.data
    pad_missing_modalities = True
    dataset_mode = "sft"
    """How a record becomes a sample (``ConversationDataset`` mode)."""

    def build_model(self):
        from ...model.multimodal import MedMMForCausalLM
        from ..warm_start import warm_start

        t = self.cfg.trainer
        self.medmm = MedMMForCausalLM.from_config(self.cfg.model)
        if t.init_from:  # encoders, projectors and (trainer.init_llm) the LLM of a finished stage
            loaded = warm_start(self.medmm, t.init_from, t.init_llm)
            if self.ctx.is_main:
                print(f"initialised from {t.init_from} (init_llm={t.init_llm}): {loaded}", flush=True)
        return self.medmm

    def build_data(self) -> StageData:
        from ...data.dataset import ConversationDataset, MixtureDataset, ResumableBatchSampler

        d, t = self.cfg.data, self.cfg.trainer
        if not d.datasets:
            raise ConfigError("data.datasets: at least one dataset is required")
        if any(x.format == "wds" for x in d.datasets):
            return self.build_stream()
        if d.packing != "none" and (self.dataset_mode != "sft" or d.packing == "concat"):
            raise ConfigError(f"data.packing={d.packing}: stage {self.name} packs only whole conversations "
                              "(neat, stage sft); concat is for stage pretrain")
        for x in d.datasets:
            if x.format != "conversation":
                raise ConfigError(f"data.datasets[{x.path}].format={x.format}: stage {self.name} reads conversation "
                                  "JSONL; text corpora are for stage pretrain")
        proc = self.medmm.processor(d.max_length, d.system_prompt)
        self.datasets = [ConversationDataset(x.path, proc, x.name, mode=self.dataset_mode) for x in d.datasets]
        parts = self.datasets
        if d.packing == "neat":  # conversations packed whole into max_length blocks (medmm.data.packing)
            from ...data.packing import PackedConversationDataset

            parts = [PackedConversationDataset(x, d.max_length) for x in self.datasets]
        mixture = MixtureDataset(parts, [x.weight for x in d.datasets])

        def sampler(start: int) -> ResumableBatchSampler:
            return ResumableBatchSampler(mixture, t.micro_batch_size, self.ctx.rank, self.ctx.world_size, t.seed,
                                         d.epoch_size, start=start)

        return StageData(mixture, sampler, partial(proc.collate, pad_missing_modalities=self.pad_missing_modalities),
                         sampler(0).batches_per_epoch, num_workers=d.num_workers,
                         pin_memory=getattr(d, "pin_memory", False),
                         description=f"datasets={[(x.name, len(x)) for x in self.datasets]}"
                         + (f" packing=neat blocks={[(x.name, len(x), f'fill {x.fill():.0%}') for x in parts]}"
                            if parts is not self.datasets else ""))

    def build_stream(self) -> StageData:
        """``format: wds`` datasets: conversations streamed from shards (:mod:`medmm.data.streaming`)."""
        from ...data.streaming import LoadRecord

        d = self.cfg.data
        if d.packing != "none":
            raise ConfigError(f"data.packing={d.packing}: streamed (wds) conversations are not packed; use none")
        proc = self.medmm.processor(d.max_length, d.system_prompt)
        fn = proc.process if self.dataset_mode == "sft" else proc.process_pair
        return self.streamed_data(LoadRecord(fn), partial(proc.collate, pad_missing_modalities=self.pad_missing_modalities))

    def describe(self, model) -> str:
        counts = self.medmm.parameter_counts()
        return f"params={counts['total']:,} trainable={counts['trainable']:,}"

    def save(self, engine, model, out_dir: Path, zero_stage: int, summary: dict) -> Path | None:
        from ..checkpoint import save_final_model

        training = {"steps": summary["step"], "final_loss": summary["loss"], "world_size": summary["world_size"],
                    "stage": self.name, "zero_stage": zero_stage,
                    "datasets": [x.path or x.shards for x in self.cfg.data.datasets]}
        return save_final_model(engine, self.medmm, out_dir, zero_stage, extra={"training": training})

    def load_errors(self) -> list[dict]:
        return [r for d in getattr(self, "datasets", []) for r in d.failed.values()]
