"""``trainer.stage: value``: a value head on a trained model's last hidden state, regressed on answer returns.

The head (:class:`medmm.model.value_head.ValueHead`, a small MLP or a linear layer) reads the LLM's
last hidden state after a prompt and an answer (or a prefix of one) and predicts the answer's reward.
The LLM and encoders of ``value.model`` stay frozen; their hidden states are computed once, before the
first step, exactly as the search strategies compute them at inference (a :class:`Session` prefill), and
only the head trains. Targets (``value.source``):

* ``labels``: conversation records whose final answer turn is labelled with ``value`` (or ``reward``), a number;
* ``samples``: Monte-Carlo returns: ``value.samples`` answers sampled from the model per record (seeded),
  each scored by the registered reward ``value.reward`` against the record's reference answer.

With ``value.steps`` line or sentence, every prefix of an answer that ends a step is trained on the
answer's return too (an outcome-supervised value of partial answers, what ``value_beam`` and ``mcts``
score). Whole records are held out (``value.eval_fraction``) for the validation MSE and the share of
answer pairs of one record the head orders like their returns (``val_pairwise_acc``).

Saved: ``value.model``'s folder again, with ``value_head.safetensors`` beside it (loaded with the model by
``MedMMForCausalLM.from_pretrained``) and the run's summary under ``value_training`` in ``medmm_config.json``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import ConfigError, InvalidInputError
from . import Stage, StageData, register_stage, seeded_epoch_batches


def _label(rec: dict, where: str) -> float:
    for key in ("value", "reward"):
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    raise InvalidInputError(where, "value.source=labels: a record needs a numeric 'value' (or 'reward') label")


@register_stage("value")
class ValueStage(Stage):
    """Frozen model features -> value head, mean squared error against each answer's return."""

    section = "value"
    metrics = ()

    def build_model(self):
        from ...model.multimodal import MedMMForCausalLM
        from ...model.value_head import ValueHead

        s = self.settings
        if not s.model:
            raise ConfigError("value.model: the medmm model folder the value head is trained for is required")
        if not Path(s.model).is_dir():
            raise ConfigError(f"value.model: '{s.model}' is not a folder")
        self.device = torch.device(f"cuda:{self.ctx.local_rank}" if torch.cuda.is_available() else "cpu")
        self.medmm = MedMMForCausalLM.from_pretrained(s.model).to(self.device).eval()
        self.medmm.requires_grad_(False)
        torch.manual_seed(self.cfg.trainer.seed)
        self.head = ValueHead(self.medmm.llm_hidden_size, s.width)
        return self.head

    # ------------------------------------------------------------------ data: answers, returns, features
    def _answers(self, sess, rec: dict, conv: list[dict], where: str, index: int) -> list[tuple[list[int], float]]:
        """(answer token ids, return) pairs of one record."""
        from ...config import DecodingConfig
        from ...data.conversation import reference_of
        from ...data.rewards import get_reward

        s, tok = self.settings, self.medmm.tokenizer
        if s.source == "labels":
            ref = reference_of(rec)
            if ref is None:
                raise InvalidInputError(where, "value.source=labels: the record needs a final answer turn")
            return [(tok(ref, add_special_tokens=False)["input_ids"], _label(rec, where))]
        reward = get_reward(s.reward)
        out = []
        for j in range(s.samples):
            d = DecodingConfig("sample", s.max_new_tokens, self.cfg.trainer.seed * 1_000_003 + index * 1009 + j,
                               {"temperature": s.temperature, "top_k": 0})
            r = sess.decode(conv, d)
            out.append((r.tokens, reward(tok.decode(r.tokens, skip_special_tokens=True).strip(), rec)))
        return out

    def _positions(self, answer: list[int]) -> list[int]:
        """Answer lengths whose prefixes are trained: each step end (line/sentence) and the whole answer."""
        from ...model.value_head import closes_step

        mode = self.settings.steps
        if mode == "answer" or not answer:
            return [len(answer)]
        texts = [self.medmm.tokenizer.decode([t]) for t in answer]
        ends = [j + 1 for j in range(len(answer)) if closes_step(texts[j], texts[j - 1] if j else "", mode)]
        return sorted(set(ends) | {len(answer)})

    @torch.no_grad()
    def _featurise(self, records: list[tuple[dict, str, Path]]) -> tuple[list, list[list[tuple[int, float]]]]:
        """Features ``(H,)`` and targets of every trained prefix; per record, (index of the whole answer, return)."""
        from ...inference.session import Session

        d = self.cfg.data
        proc = self.medmm.processor(d.max_length, d.system_prompt)
        rows, groups = [], []
        for i, (rec, where, base) in enumerate(records):
            conv = list(rec.get("conversations") or [])
            if conv and str(conv[-1].get("from", "")).lower() in ("gpt", "assistant"):
                conv = conv[:-1]
            if not conv:
                raise InvalidInputError(where, "the record has no question turn")
            sess = Session(self.medmm, proc, rec.get("modalities") or {}, base)
            prompt = sess.prompt_ids(conv)
            group = []
            for answer, ret in self._answers(sess, rec, conv, where, i):
                ids = prompt + list(answer)
                _, _, h = sess.runner.forward(None, embeds=sess.embed(ids), hidden=True)  # (T, H)
                for n in self._positions(list(answer)):
                    rows.append((h[len(prompt) + n - 1].float().cpu(), ret))
                group.append((len(rows) - 1, ret))
            groups.append(group)
        return rows, groups

    def _read(self) -> list[tuple[dict, str, Path]]:
        from ...data.dataset import load_records

        d, s = self.cfg.data, self.settings
        if not d.datasets:
            raise ConfigError("data.datasets: the value stage needs at least one conversation JSONL file")
        out = []
        for x in d.datasets:
            if x.format != "conversation":
                raise ConfigError(f"data.datasets[{x.path}].format={x.format}: stage value reads conversation JSONL")
            for n, rec in enumerate(load_records(x.path), 1):
                out.append((rec, f"{x.path} line {n} (id={rec.get('id')})", Path(x.path).parent))
        return out[: s.limit] if s.limit else out

    def build_data(self) -> StageData:
        s, t = self.settings, self.cfg.trainer
        records = self._read()
        order = np.random.default_rng(t.seed).permutation(len(records))
        n_val = int(round(len(records) * s.eval_fraction))
        val = [records[i] for i in sorted(order[:n_val])]
        train = [records[i] for i in sorted(order[n_val:])]
        if not train:
            raise ConfigError(f"value: {len(records)} records leave none to train on (eval_fraction={s.eval_fraction})")
        self.rows, groups = self._featurise(train)
        self.val_rows, self.val_groups = self._featurise(val) if val else ([], [])
        returns = [r for g in groups for _, r in g]
        self.summary = {"source": s.source, "reward": s.reward if s.source == "samples" else None,
                        "samples": s.samples if s.source == "samples" else 1, "steps": s.steps,
                        "train_records": len(train), "val_records": len(val), "train_prefixes": len(self.rows),
                        "mean_return": float(np.mean(returns)) if returns else None}
        n = len(self.rows)
        sampler, per_epoch = seeded_epoch_batches(n, t.micro_batch_size, self.ctx.rank, self.ctx.world_size, t.seed,
                                                  "value: training prefixes")

        def collate(samples: list[tuple[torch.Tensor, float]]) -> dict:
            return {"hidden": torch.stack([h for h, _ in samples]),
                    "target": torch.tensor([r for _, r in samples], dtype=torch.float32)}

        return StageData(self.rows, sampler, collate, per_epoch,
                         description=f"value source={s.source} records={len(train)}+{len(val)} prefixes={n} "
                                     f"mean_return={self.summary['mean_return']:.3f}")

    def loss(self, engine, batch):
        pred = engine(batch["hidden"]).float()  # (B,)
        return F.mse_loss(pred, batch["target"]), {}

    @torch.no_grad()
    def evaluate(self, model) -> dict | None:
        if not self.val_rows:
            return None
        was = model.training
        model.eval()
        dev = next(model.parameters()).device
        pred = model(torch.stack([h for h, _ in self.val_rows]).to(dev)).float().cpu()
        target = torch.tensor([r for _, r in self.val_rows])
        right = total = 0
        for g in self.val_groups:
            for a in range(len(g)):
                for b in range(a + 1, len(g)):
                    if g[a][1] != g[b][1]:
                        total += 1
                        right += (pred[g[a][0]] - pred[g[b][0]]) * (g[a][1] - g[b][1]) > 0
        model.train(was)
        return {"val_mse": float(F.mse_loss(pred, target)), "val_pairwise_acc": float(right / total) if total else None}

    def save(self, engine, model, out_dir: Path, zero_stage: int, summary: dict) -> Path | None:
        from ...model.multimodal import CONFIG_NAME, FORMAT_VERSION
        from ...model.value_head import ValueHead
        from ...utils import read_folder_config

        if zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
        else:
            state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
        if not self.ctx.is_main:
            return None
        head = ValueHead(model.hidden_size, model.width)
        head.load_state_dict(state)
        head.info = {**self.summary, "stage": self.name, "steps_trained": summary.get("step"),
                     "final_loss": summary.get("loss"), "base_model": str(self.settings.model)}
        self.medmm.value_head = head.to(self.device)
        base = read_folder_config(self.settings.model, CONFIG_NAME, FORMAT_VERSION, "medmm model folder")
        extra = {k: base[k] for k in ("training",) if k in base}
        return self.medmm.save_pretrained(out_dir, extra={**extra, "value_training": head.info})

    def describe(self, model) -> str:
        return f"value head width={model.width} on a frozen LLM of hidden size {model.hidden_size}; " + \
            super().describe(model)
