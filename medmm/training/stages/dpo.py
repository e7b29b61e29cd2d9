"""``trainer.stage: dpo | simpo | orpo``: preference tuning on chosen/rejected answers (DPO in place of RLHF).

Data: ``data.datasets`` are preference JSONL files (:mod:`medmm.data.preferences`; ``medmm prepare preferences``
makes them from closed-set labels or from sampled answers ranked by a reward). Settings: ``trainer.dpo``
(:class:`medmm.config.DPOConfig`), e.g. ``trainer.dpo.beta=0.2`` on the command line.

Each micro-batch is one forward pass over ``2B`` rows, the B chosen sequences then the B rejected ones; the
log-probability of an answer is the sum over its tokens (logits are computed only from the first answer position
on). The losses are the pure functions of :mod:`medmm.training.losses`:

    dpo     loss_type sigmoid | ipo | hinge | robust, against a reference:
              adapter      the policy with its LoRA adapter disabled (peft ``disable_adapter()``): no second model
              copy         a frozen copy of the starting model (sharded by ZeRO-3 like the policy, else on the device)
              precomputed  log-probs of the starting model, written once by ``medmm prepare dpo-reference``
            all three give the same loss; ``rpo_alpha`` adds the chosen answer's NLL (RPO)
    simpo   no reference: length-normalised log-probs with a target margin ``simpo_gamma`` (+ ``rpo_alpha`` NLL)
    orpo    no reference: the chosen answer's NLL + ``beta`` times the odds-ratio term

Logged every step (``metrics.jsonl``, TensorBoard), averaged over all ranks: ``loss``, ``rewards_chosen``,
``rewards_rejected``, ``reward_margin``, ``reward_accuracy`` (ties count 1/2: at step 1 the policy is its reference
and reads 0.5), ``logps_chosen``, ``logps_rejected``. ``trainer.dpo.eval_path`` adds held-out scores every
``trainer.eval_every`` steps: ``eval_loss``, ``eval_reward_accuracy``, ``eval_reward_margin`` and
``eval_chosen_prob`` (the probability of the chosen answer against the rejected one, ``sigmoid(logp_c - logp_r)``).

ZeRO-3: every batch carries an input for every modality of the model (zero-weighted dummies where its pairs have
none) and every rank runs the same forwards (policy, reference, evaluation), so mixed text-only and multimodal
pairs never leave a rank waiting on a parameter gather. Saved: the medmm model folder, as ``sft`` saves it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch

from ...data.conversation import IGNORE_INDEX
from ...errors import ConfigError
from .. import losses as L
from . import StageData, register_stage
from .sft import SFTStage

log = logging.getLogger(__name__)


def answer_logps(model, batch: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's answer tokens, and their count.

    Only positions from the earliest answer token on go through the output head (``logits_to_keep``), and the
    log-softmax is taken only at answer positions, so a long prompt (image tokens) costs no vocabulary-sized
    activations.

    Args:
        model: a :class:`~medmm.model.multimodal.MedMMForCausalLM`, or a DeepSpeed engine wrapping one.
        batch: the model inputs (``input_ids``, ``attention_mask``, ``modality_inputs``), without labels.
        labels: ``(R, T)`` token ids on answer positions, ``-100`` elsewhere.

    Returns:
        ``(logps, lengths)``, each ``(R,)`` float32.
    """
    R, T = labels.shape
    scored = labels[:, 1:] != IGNORE_INDEX  # (R, T-1): position p predicts token p+1
    cols = scored.any(0).nonzero()
    if len(cols) == 0:
        raise ValueError("a preference batch without answer tokens")
    first = int(cols[0])
    logits = model(**batch, logits_to_keep=T - first).logits[:, :-1]  # (R, T-1-first, V): positions first..T-2
    target = labels[:, first + 1:]  # (R, T-1-first)
    mask = target != IGNORE_INDEX
    sel = logits[mask].float()  # (N, V): answer positions only
    tok = sel.gather(-1, target[mask].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(sel, -1)  # (N,)
    rows = mask.nonzero()[:, 0]
    logps = torch.zeros(R, dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)
    return logps, mask.sum(1).to(tok.dtype)


class PreferenceStage(SFTStage):
    """What dpo, simpo and orpo share: pairs, one forward over chosen + rejected, metrics, evaluation, saving.

    A subclass sets :attr:`uses_reference` and defines :meth:`pair_losses`.
    """

    section = None  # settings live under trainer.dpo (see the settings property)
    pad_missing_modalities = True
    metrics = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "logps_chosen",
               "logps_rejected")
    monitor = "eval_reward_accuracy"
    uses_reference: ClassVar[bool] = False

    @property
    def settings(self):
        """``cfg.trainer.dpo`` (:class:`medmm.config.DPOConfig`)."""
        return self.cfg.trainer.dpo

    # ------------------------------------------------------------------ model
    def check_settings(self) -> None:
        """Reject settings this stage would silently ignore."""
        s = self.settings
        if not self.uses_reference and s.loss_type != "sigmoid":
            raise ConfigError(f"trainer.dpo.loss_type={s.loss_type} is for stage dpo; stage {self.name} has its own loss")
        if not self.uses_reference and s.reference != "adapter":
            raise ConfigError(f"trainer.dpo.reference={s.reference} is for stage dpo; stage {self.name} has no reference")

    def build_model(self):
        self.check_settings()
        model = super().build_model()
        self.reference_model = None
        self._reference = None  # the copy on its device (or its ZeRO-3 engine), made at first use
        if self.uses_reference and self.settings.reference == "adapter":
            self._check_adapter_reference(model)
        elif self.uses_reference and self.settings.reference == "copy":
            # Before DeepSpeed sees the policy: an exact copy of the starting weights (LoRA included).
            self.reference_model = copy.deepcopy(model).requires_grad_(False).eval()
        return model

    def _check_adapter_reference(self, model) -> None:
        t = self.cfg.trainer
        if not model.has_llm_adapter:
            raise ConfigError("trainer.dpo.reference=adapter disables the LLM's LoRA adapter: set model.llm_trainable: "
                              "lora (or use reference copy / precomputed)")
        if t.init_from and t.init_llm == "adapter":
            raise ConfigError("trainer.dpo.reference=adapter with trainer.init_llm=adapter: disabling the adapter would "
                              "give the model before that adapter, not this run's start; use init_llm: merged or "
                              "reference copy / precomputed")
        for n, p in model.named_parameters():
            if p.requires_grad and not (n.startswith("llm.") and ("lora_" in n or ".modules_to_save." in n)):
                raise ConfigError(f"trainer.dpo.reference=adapter: '{n}' is trained, and disabling the LLM adapter "
                                  "does not restore it; freeze it (trainable: frozen) or use reference copy")

    def _reference_runner(self, device):
        """The frozen copy, ready to run: a ZeRO-3 engine when the policy is sharded, else the module on ``device``."""
        if self._reference is None:
            from ..loop import build_ds_config

            ds = build_ds_config(self.cfg.trainer, self.ctx.world_size)
            zero = ds.get("zero_optimization", {})
            if int(zero.get("stage", 0)) == 3:
                import deepspeed

                cfg = {k: v for k, v in ds.items() if k not in ("optimizer", "scheduler")}
                cfg["zero_optimization"] = {k: v for k, v in zero.items() if k != "offload_optimizer"}
                engine, *_ = deepspeed.initialize(model=self.reference_model, config=cfg)
                engine.eval()
                self._reference = engine
            else:
                dtype = torch.bfloat16 if "bf16" in ds else torch.float16 if "fp16" in ds else torch.float32
                self._reference = self.reference_model.to(device=device, dtype=dtype)
        return self._reference

    def reference_logps(self, model, batch: dict, labels: torch.Tensor, precomputed: torch.Tensor | None):
        """The reference's answer log-probs ``(2B,)``, or None for stages without a reference."""
        if not self.uses_reference:
            return None
        mode = self.settings.reference
        if mode == "precomputed":
            if precomputed is None:
                raise ConfigError("trainer.dpo.reference=precomputed, but the batch carries no reference log-probs")
            return precomputed.float()
        with torch.no_grad():
            if mode == "adapter":
                with self.medmm.llm.disable_adapter():
                    return answer_logps(model, batch, labels)[0]
            device = next(self.medmm.parameters()).device
            return answer_logps(self._reference_runner(device), batch, labels)[0]

    # ------------------------------------------------------------------ data
    def build_data(self) -> StageData:
        from ...data.dataset import MixtureDataset, ResumableBatchSampler
        from ...data.preferences import PreferenceDataset, collate_pairs, read_reference

        d, t, s = self.cfg.data, self.cfg.trainer, self.settings
        if not d.datasets:
            raise ConfigError("data.datasets: at least one preference file is required")
        if d.packing != "none":
            raise ConfigError(f"data.packing={d.packing}: stage {self.name} scores whole pairs; use packing none")
        if any(x.format == "wds" for x in d.datasets):
            return self.build_stream()
        for x in d.datasets:
            if x.format != "conversation":
                raise ConfigError(f"data.datasets[{x.path}].format={x.format}: stage {self.name} reads preference "
                                  "JSONL (format conversation)")
        proc = self.medmm.processor(d.max_length, d.system_prompt)
        self.datasets = [PreferenceDataset(x.path, proc, x.name) for x in d.datasets]
        self.eval_set = PreferenceDataset(s.eval_path, proc, "eval") if s.eval_path else None
        if self.uses_reference and s.reference == "precomputed":
            _, table = read_reference(s.reference_file)
            for ds in self.datasets + ([self.eval_set] if self.eval_set else []):
                ds.attach_reference(table, s.reference_file)
        mixture = MixtureDataset(self.datasets, [x.weight for x in d.datasets])
        self.collate = partial(collate_pairs, proc, pad_missing_modalities=self.pad_missing_modalities)
        self.history: list[dict] = []

        def sampler(start: int) -> ResumableBatchSampler:
            return ResumableBatchSampler(mixture, t.micro_batch_size, self.ctx.rank, self.ctx.world_size, t.seed,
                                         d.epoch_size, start=start)

        desc = [(x.name, len(x), f"dropped {len(x.failed)}") for x in self.datasets]
        if self.eval_set is not None:
            desc.append(("eval", len(self.eval_set), f"dropped {len(self.eval_set.failed)}"))
        ref = f" reference={s.reference}" if self.uses_reference else ""
        return StageData(mixture, sampler, self.collate, sampler(0).batches_per_epoch, num_workers=d.num_workers,
                         pin_memory=d.pin_memory, description=f"pairs={desc}{ref}")

    def build_stream(self) -> StageData:
        """``format: wds``: preference pairs streamed from shards (each sample's JSON a preference record,
        :func:`medmm.data.preferences.preference_records`). ``trainer.dpo.eval_path`` stays a JSONL file."""
        from ...data.preferences import PreferenceDataset, StreamPairLoader, collate_pairs, preference_records

        d, s = self.cfg.data, self.settings
        if self.uses_reference and s.reference == "precomputed":
            raise ConfigError("trainer.dpo.reference=precomputed reads log-probs keyed by JSONL file and line; with "
                              "streamed (wds) pairs use reference adapter or copy")
        proc = self.medmm.processor(d.max_length, d.system_prompt)
        self.datasets = []
        self.eval_set = PreferenceDataset(s.eval_path, proc, "eval") if s.eval_path else None
        self.collate = partial(collate_pairs, proc, pad_missing_modalities=self.pad_missing_modalities)
        self.history = []
        ref = f"reference={s.reference} " if self.uses_reference else ""
        return self.streamed_data(StreamPairLoader(proc), self.collate, preference_records, label=f"pairs {ref}")

    # ------------------------------------------------------------------ loss
    def pair_losses(self, logps: torch.Tensor, lengths: torch.Tensor, ref: torch.Tensor | None):
        """Per pair: ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``, from ``(2B,)`` log-probs."""
        raise NotImplementedError  # pragma: no cover - interface

    def sft_weight(self) -> float:
        """Weight of the chosen answer's NLL added to the loss."""
        return self.settings.rpo_alpha

    def _forward(self, model, batch: dict):
        labels = batch.pop("labels")
        pre = batch.pop("ref_logps", None)
        ref = self.reference_logps(model, batch, labels, pre)  # first: no policy activations held meanwhile
        logps, lengths = answer_logps(model, batch, labels)
        return logps, lengths, ref

    def loss(self, engine, batch):
        logps, lengths, ref = self._forward(engine, batch)
        losses, rc, rr = self.pair_losses(logps, lengths, ref)
        loss = losses.mean()
        B = losses.shape[0]
        if self.sft_weight():
            loss = loss + self.sft_weight() * L.chosen_nll(logps[:B], lengths[:B])
        with torch.no_grad():
            sums = torch.stack([rc.sum(), rr.sum(), (rc - rr).sum(), L.reward_accuracy(rc, rr).sum(),
                                logps[:B].sum(), logps[B:].sum(), torch.tensor(float(B), device=rc.device)]).float()
            if self.ctx.world_size > 1:  # the logged values describe every rank's pairs, not rank 0's alone
                import torch.distributed as dist

                dist.all_reduce(sums)
            n = sums[-1]
            names = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "logps_chosen",
                     "logps_rejected")
        return loss, {k: float(sums[i] / n) for i, k in enumerate(names)}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model) -> dict | None:
        """Held-out pairs (``trainer.dpo.eval_path``): every rank scores its share, the same number of forwards."""
        if self.eval_set is None:
            return None
        import torch.distributed as dist

        from ..loop import to_device

        rank, world = self.ctx.rank, self.ctx.world_size
        n, mbs = len(self.eval_set), self.cfg.trainer.micro_batch_size
        per_rank = math.ceil(n / world)
        device = next(model.parameters()).device
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, accuracy, margin, chosen prob, pairs
        with torch.no_grad():
            for k in range(0, per_rank, mbs):
                idx = [rank + j * world for j in range(k, min(k + mbs, per_rank))]
                batch = self.collate([self.eval_set[i if i < n else 0] for i in idx])
                batch.pop("load_errors", None)
                logps, lengths, ref = self._forward(model, to_device(batch, device))
                losses, rc, rr = self.pair_losses(logps, lengths, ref)
                B = losses.shape[0]
                w = torch.tensor([float(i < n) for i in idx], dtype=torch.float64, device=device)  # padding rows: 0
                prob = torch.sigmoid(logps[:B] - logps[B:])
                part = torch.stack([losses.double(), L.reward_accuracy(rc, rr).double(), (rc - rr).double(),
                                    prob.double()])  # (4, B)
                sums[:4] += (part * w).sum(1)
                sums[4] += w.sum()
        if world > 1:
            dist.all_reduce(sums)
        c = float(sums[4])
        scores = {"eval_loss": float(sums[0]) / c, "eval_reward_accuracy": float(sums[1]) / c,
                  "eval_reward_margin": float(sums[2]) / c, "eval_chosen_prob": float(sums[3]) / c}
        self.history.append(scores)
        return scores

    def finish(self, model, summary: dict) -> dict:
        if not getattr(self, "history", None):
            return {}
        return {"eval_reward_accuracy": self.history[-1]["eval_reward_accuracy"],
                "eval_chosen_prob_first": self.history[0]["eval_chosen_prob"],
                "eval_chosen_prob": self.history[-1]["eval_chosen_prob"]}

    # ------------------------------------------------------------------ saving
    def save(self, engine, model, out_dir: Path, zero_stage: int, summary: dict) -> Path | None:
        from ..checkpoint import save_final_model

        training = {"steps": summary["step"], "final_loss": summary["loss"], "world_size": summary["world_size"],
                    "stage": self.name, "zero_stage": zero_stage, "dpo": dataclasses.asdict(self.settings),
                    "init_from": self.cfg.trainer.init_from, "datasets": [x.path for x in self.cfg.data.datasets]}
        return save_final_model(engine, self.medmm, out_dir, zero_stage, extra={"training": training})

    def load_errors(self) -> list[dict]:
        parts = list(getattr(self, "datasets", [])) + ([self.eval_set] if getattr(self, "eval_set", None) else [])
        return [r for d in parts for r in d.failed.values()]


@register_stage("dpo")
class DPOStage(PreferenceStage):
    """DPO against a reference (``trainer.dpo.reference``): sigmoid, ipo, hinge or robust."""

    uses_reference = True

    def pair_losses(self, logps, lengths, ref):
        s, B = self.settings, logps.shape[0] // 2
        return L.dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], s.loss_type, s.beta, s.label_smoothing,
                          lengths[:B], lengths[B:])


@register_stage("simpo")
class SimPOStage(PreferenceStage):
    """SimPO: no reference; mean per-token log-probs with a target margin ``trainer.dpo.simpo_gamma``."""

    def pair_losses(self, logps, lengths, ref):
        s, B = self.settings, logps.shape[0] // 2
        return L.simpo_loss(logps[:B], logps[B:], lengths[:B], lengths[B:], s.beta, s.simpo_gamma, s.label_smoothing)


@register_stage("orpo")
class ORPOStage(PreferenceStage):
    """ORPO: no reference; the chosen answer's NLL + ``beta`` times the odds-ratio term."""

    def check_settings(self) -> None:
        super().check_settings()
        if self.settings.rpo_alpha:
            raise ConfigError("trainer.dpo.rpo_alpha: stage orpo always adds the chosen answer's NLL (weight 1)")

    def sft_weight(self) -> float:
        return 1.0

    def pair_losses(self, logps, lengths, ref):
        s, B = self.settings, logps.shape[0] // 2
        return L.orpo_loss(logps[:B], logps[B:], lengths[:B], lengths[B:], s.beta)


# ---------------------------------------------------------------------------------------- precomputed reference
def precompute_reference(cfg, out: str | Path, device: str = "auto", batch_size: int | None = None) -> dict:
    """Write the starting model's answer log-probs for every pair of the run (``medmm prepare dpo-reference``).

    The model is built exactly as ``train.py`` builds it (same seed, ``trainer.init_from``), so the file holds what
    ``reference: adapter`` or ``copy`` would compute during training. Pairs of ``data.datasets`` and of
    ``trainer.dpo.eval_path`` are scored; pairs the training would drop are left out (and listed in ``errors``).

    Returns:
        A summary: the file, pairs written, per dataset counts, errors.
    """
    from ...data.preferences import PreferenceDataset, collate_pairs, write_reference
    from ...errors import InvalidInputError
    from ...utils import seed_everything
    from ..loop import to_device
    from . import StageContext, get_stage

    t, d = cfg.trainer, cfg.data
    stage_cls = get_stage(t.stage)
    if not issubclass(stage_cls, PreferenceStage) or not stage_cls.uses_reference:
        raise ConfigError(f"trainer.stage={t.stage}: only stage dpo uses reference log-probs")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    dtype = torch.float32
    if dev.type == "cuda" and t.precision in ("auto", "bf16") and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16  # what the run's policy computes in (trainer.precision)
    elif dev.type == "cuda" and t.precision == "fp16":
        dtype = torch.float16
    seed_everything(t.seed)  # the loop seeds the same way before building: identical starting weights
    stage = stage_cls(cfg, StageContext(output_dir=Path(t.output_dir)))
    stage.check_settings()
    model = SFTStage.build_model(stage).to(device=dev, dtype=dtype).eval()
    proc = model.processor(d.max_length, d.system_prompt)
    bs = batch_size or t.micro_batch_size
    paths = [x.path for x in d.datasets] + ([stage.settings.eval_path] if stage.settings.eval_path else [])
    rows, errors, counts = [], [], {}
    with torch.no_grad():
        for path in paths:
            ds = PreferenceDataset(path, proc)
            errors.extend(ds.failed.values())
            loaded = []
            for p in ds.pairs:
                try:
                    loaded.append((p, ds.load(p)))
                except InvalidInputError as e:
                    errors.append(e.to_record())
            for k in range(0, len(loaded), bs):
                chunk = loaded[k: k + bs]
                batch = to_device(collate_pairs(proc, [s for _, s in chunk]), dev)
                batch.pop("load_errors", None)
                labels = batch.pop("labels")
                logps, _ = answer_logps(model, batch, labels)
                B = len(chunk)
                for i, (p, s) in enumerate(chunk):
                    rows.append({"dataset": p["key"][0], "line": p["key"][1], "id": s.get("id"), "digest": p["digest"],
                                 "chosen": float(logps[i]), "rejected": float(logps[B + i])})
            counts[str(path)] = len(loaded)
    header = {"stage": t.stage, "llm": cfg.model.llm, "init_from": t.init_from, "init_llm": t.init_llm,
              "seed": t.seed, "max_length": d.max_length, "dtype": str(dtype).replace("torch.", ""),
              "device": dev.type, "pairs": len(rows)}
    write_reference(out, header, rows)
    return {"out": str(out), "pairs": len(rows), "datasets": counts, "errors": len(errors), "dtype": header["dtype"]}
