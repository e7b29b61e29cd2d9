"""Preference tuning: the losses against TRL's own code on fixed log-probs; answer log-probs; the dpo/simpo/orpo
stages through train.py (three references, one loss); 2-rank ZeRO-3 + LoRA DPO on real VQA-RAD and ClinTox pairs;
the medical_llm recipe chain pretrain -> sft -> dpo at tiny size.

TRL is a test-only dependency (``pip install trl==1.16.0``). Its ``DPOTrainer`` computes the loss inside
``_compute_loss`` from the per-token log-probs a model returns; these tests run that code on a stub model that returns
fixed log-probs (with precomputed reference log-probs), so the comparison is with TRL's loss code itself.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import SAMPLE, model_dict

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


# ----------------------------------------------------------------------------------------------- TRL parity
class _StubLM(torch.nn.Module):
    """Returns fixed per-token log-probs, as TRL's patched forward does (``log_probs`` over completion tokens)."""

    def __init__(self, per_token):
        super().__init__()
        self.per_token = per_token

    def forward(self, **_):
        z = torch.zeros_like(self.per_token)
        return SimpleNamespace(log_probs=self.per_token, entropy=z, mean_logits=z, is_top1=z.bool())


class _Acc:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x


def trl_dpo(per_token, mask, ref_c, ref_r, loss_types, beta, label_smoothing=0.0, weights=None):
    """TRL ``DPOTrainer._compute_loss`` on fixed log-probs: (loss, its logged metrics)."""
    trl = pytest.importorskip("trl", reason="TRL is the reference implementation: pip install trl==1.16.0")
    trainer = trl.DPOTrainer.__new__(trl.DPOTrainer)
    stub = _StubLM(per_token)
    trainer.__dict__.update(
        model=stub, ref_model=None, accelerator=_Acc(), aux_loss_enabled=False, precompute_ref_logps=True,
        ld_alpha=None, f_divergence_type="reverse_kl", loss_types=list(loss_types),
        loss_weights=weights or [1.0] * len(loss_types), beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    R, T = per_token.shape
    inputs = {"input_ids": torch.zeros(R, T + 1, dtype=torch.long), "attention_mask": torch.ones(R, T + 1, dtype=torch.long),
              "completion_mask": torch.cat([torch.zeros(R, 1, dtype=torch.long), mask.long()], 1),
              "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = trainer._compute_loss(stub, inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.fixture
def fixed_logps():
    """Per-token log-probs of 4 pairs (chosen rows, then rejected rows) with answers of different lengths."""
    g = torch.Generator().manual_seed(0)
    B, T = 4, 7
    mask = torch.ones(2 * B, T)
    for r, n in enumerate([7, 3, 5, 1, 6, 7, 2, 4]):
        mask[r, n:] = 0
    per_token = -torch.rand(2 * B, T, generator=g, dtype=torch.float64) * 2.5 * mask
    ref = -torch.rand(2 * B, generator=g, dtype=torch.float64) * 8
    return per_token, mask, ref


# (TRL 1.x dropped label smoothing from sigmoid, conservative DPO: test_conservative_dpo checks that formula)
@pytest.mark.parametrize("loss_type,beta,label_smoothing",
                         [(t, 0.1, 0.0) for t in LOSS_TYPES] + [(t, 0.5, 0.2) for t in LOSS_TYPES if t != "sigmoid"])
def test_dpo_loss_equals_trl(fixed_logps, loss_type, beta, label_smoothing):
    from medmm.training.losses import dpo_loss, reward_accuracy

    per_token, mask, ref = fixed_logps
    B = per_token.shape[0] // 2
    logps, lengths = per_token.sum(1), mask.sum(1)
    losses, rc, rr = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], loss_type, beta, label_smoothing,
                              lengths[:B], lengths[B:])
    theirs, m = trl_dpo(per_token, mask, ref[:B], ref[B:], [loss_type], beta, label_smoothing)
    assert abs(float(losses.mean()) - float(theirs)) < 1e-6
    assert abs(float(rc.mean()) - m["rewards/chosen"]) < 1e-6 and abs(float(rr.mean()) - m["rewards/rejected"]) < 1e-6
    assert abs(float((rc - rr).mean()) - m["rewards/margins"]) < 1e-6
    assert float(reward_accuracy(rc, rr).mean()) == pytest.approx(m["rewards/accuracies"])  # no ties here


def test_rpo_term_equals_trl_sft_loss(fixed_logps):
    """rpo_alpha: DPO + alpha * the chosen answers' NLL per token = TRL's loss_type [sigmoid, sft] with weights."""
    from medmm.training.losses import chosen_nll, dpo_loss

    per_token, mask, ref = fixed_logps
    B, alpha = per_token.shape[0] // 2, 0.7
    logps, lengths = per_token.sum(1), mask.sum(1)
    ours = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], "sigmoid", 0.1)[0].mean() + alpha * chosen_nll(
        logps[:B], lengths[:B])
    theirs, _ = trl_dpo(per_token, mask, ref[:B], ref[B:], ["sigmoid", "sft"], 0.1, weights=[1.0, alpha])
    assert abs(float(ours) - float(theirs)) < 1e-6


def test_conservative_dpo():
    """sigmoid with label smoothing e: the cDPO loss (TRL <= 0.28, LLaMA-Factory), symmetric in the labels."""
    from medmm.training.losses import dpo_loss

    c, r = torch.tensor([-3.0, -7.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -6.0]), torch.tensor([-3.5, -2.5])
    h = (c - rc) - (r - rr)
    want = -0.8 * torch.nn.functional.logsigmoid(0.3 * h) - 0.2 * torch.nn.functional.logsigmoid(-0.3 * h)
    got = dpo_loss(c, r, rc, rr, "sigmoid", 0.3, 0.2)[0]
    assert torch.allclose(got, want, atol=1e-7)
    # swapping the answers is flipping every label: the loss with e equals the swapped pairs' loss with 1 - e
    assert torch.allclose(dpo_loss(r, c, rr, rc, "sigmoid", 0.3, 0.8)[0], got, atol=1e-7)


@pytest.mark.parametrize("beta,gamma,label_smoothing", [(2.0, 0.5, 0.0), (2.5, 1.2, 0.1)])
def test_simpo_loss_equals_trl_cpo(fixed_logps, beta, gamma, label_smoothing):
    pytest.importorskip("trl", reason="TRL is the reference implementation: pip install trl==1.16.0")
    from trl.experimental.cpo import CPOTrainer

    from medmm.training.losses import simpo_loss

    per_token, mask, _ = fixed_logps
    B = per_token.shape[0] // 2
    logps, lengths = per_token.sum(1), mask.sum(1)
    ours, rc, rr = simpo_loss(logps[:B], logps[B:], lengths[:B], lengths[B:], beta, gamma, label_smoothing)
    cpo = CPOTrainer.__new__(CPOTrainer)
    cpo.__dict__.update(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=label_smoothing,
                        accelerator=_Acc())
    avg = logps / lengths  # CPOTrainer averages log-probs over the completion for simpo (average_log_prob=True)
    theirs, trc, trr = cpo.cpo_loss(avg[:B], avg[B:])
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
    assert torch.allclose(rc, trc, atol=1e-6, rtol=0) and torch.allclose(rr, trr, atol=1e-6, rtol=0)


def test_orpo_loss_equals_trl(fixed_logps):
    pytest.importorskip("trl", reason="TRL is the reference implementation: pip install trl==1.16.0")
    from trl.experimental.orpo import ORPOTrainer

    from medmm.training.losses import chosen_nll, orpo_loss

    per_token, mask, _ = fixed_logps
    B, beta = per_token.shape[0] // 2, 0.25
    logps, lengths = per_token.sum(1), mask.sum(1)
    ours, rc, rr = orpo_loss(logps[:B], logps[B:], lengths[:B], lengths[B:], beta)
    orpo = ORPOTrainer.__new__(ORPOTrainer)
    orpo.__dict__.update(beta=beta, accelerator=_Acc())
    avg = logps / lengths
    theirs, trc, trr, _, _ = orpo.odds_ratio_loss(avg[:B], avg[B:])
    nll = chosen_nll(logps[:B], lengths[:B])
    # ORPOTrainer's loss = policy_nll_loss - losses.mean(); ours = nll + losses.mean()
    assert abs(float(nll + ours.mean()) - float(nll - theirs.mean())) < 1e-6
    assert torch.allclose(rc.double(), trc.double(), atol=1e-6, rtol=0)


def test_reward_accuracy_counts_ties_as_half():
    from medmm.training.losses import reward_accuracy

    assert reward_accuracy(torch.tensor([1.0, 0.0, -1.0, 0.0]), torch.tensor([0.0, 0.0, 0.0, 1.0])).tolist() == [
        1.0, 0.5, 0.0, 0.0]


# ----------------------------------------------------------------------------------------------- answer log-probs
def test_answer_logps_match_a_full_forward(tiny_llm):
    """Logits kept only from the first answer position on give the same sums as the full log-softmax."""
    from medmm.config import ModelConfig, config_from_dict
    from medmm.data.conversation import IGNORE_INDEX
    from medmm.data.preferences import collate_pairs, encode_pair
    from medmm.model.multimodal import MedMMForCausalLM
    from medmm.training.stages.dpo import answer_logps

    md = model_dict(tiny_llm)
    md["modalities"] = {"image": md["modalities"]["image"]}
    torch.manual_seed(0)
    model = MedMMForCausalLM.from_config(config_from_dict(ModelConfig, md)).eval()
    proc = model.processor(128)
    img = sorted((SAMPLE / "vqa_rad" / "images").glob("*.jpg"))[0]
    recs = [{"id": "a", "modalities": {"image": str(img)},
             "conversations": [{"from": "human", "value": "<image>\nIs there a fracture of the left femur?"}],
             "chosen": "no", "rejected": "yes, a displaced fracture"},
            {"id": "b", "conversations": [{"from": "human", "value": "Is aspirin an NSAID?"}],
             "chosen": "yes", "rejected": "no"}]
    samples = []
    for r in recs:
        enc = encode_pair(proc, r)
        items = proc._modality_items(r, "t", None)
        samples.append({side: {"input_ids": torch.tensor(enc[side][0]), "labels": torch.tensor(enc[side][1]),
                               "items": items} for side in ("chosen", "rejected")})
    batch = collate_pairs(proc, samples)
    labels = batch.pop("labels")
    with torch.no_grad():
        logps, lengths = answer_logps(model, batch, labels)
        full = torch.log_softmax(model(**batch).logits[:, :-1].double(), -1)
    tgt = labels[:, 1:]
    m = tgt != IGNORE_INDEX
    want = (full.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * m).sum(1)
    assert torch.allclose(logps.double(), want, atol=1e-4, rtol=1e-6)
    assert lengths.tolist() == m.sum(1).float().tolist() and lengths[2] > lengths[0]  # rows: chosen a, chosen b, rejected a (long), rejected b


# ----------------------------------------------------------------------------------------------- config
def test_trainer_dpo_section_and_overrides(tiny_llm, tmp_path):
    from medmm.config import TrainConfig, load_config
    from medmm.errors import ConfigError
    from medmm.training.stages import StageContext, get_stage

    base = [f"model.llm={tiny_llm}", "trainer.stage=dpo", "trainer.dpo.beta=0.2", "trainer.dpo.loss_type=ipo"]
    cfg = load_config(TrainConfig, None, base)
    assert cfg.trainer.dpo.beta == 0.2 and cfg.trainer.dpo.loss_type == "ipo" and cfg.trainer.dpo.reference == "adapter"
    assert get_stage("dpo")(cfg).settings is cfg.trainer.dpo
    with pytest.raises(ConfigError, match="trainer.dpo.loss_type"):
        load_config(TrainConfig, None, ["trainer.dpo.loss_type=kto"])
    with pytest.raises(ConfigError, match="unknown key 'trainer.dpo.bta'"):
        load_config(TrainConfig, None, ["trainer.dpo.bta=0.1"])
    with pytest.raises(ConfigError, match="reference_file"):
        load_config(TrainConfig, None, ["trainer.dpo.reference=precomputed"])
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_config(TrainConfig, None, ["trainer.dpo.label_smoothing=0.5"])

    def build(*overrides, modalities=None):
        from medmm.config import apply_overrides, config_from_dict

        md = model_dict(tiny_llm)
        md["modalities"] = modalities or {}
        c = config_from_dict(TrainConfig, apply_overrides({"model": md, "trainer": {}}, list(overrides)))
        return get_stage(c.trainer.stage)(c, StageContext(output_dir=tmp_path)).build_model()

    build("trainer.stage=dpo")  # LoRA LLM, no modality: the adapter reference is valid
    image = {"image": model_dict(tiny_llm)["modalities"]["image"]}  # its encoder and projector train in full
    with pytest.raises(ConfigError, match=r"'(encoders|projectors)\.image\..*' is trained.*reference copy"):
        build("trainer.stage=dpo", modalities=image)
    build("trainer.stage=dpo", "trainer.dpo.reference=copy", modalities=image)
    with pytest.raises(ConfigError, match="llm_trainable: lora"):
        build("trainer.stage=dpo", "model.llm_trainable=full")
    with pytest.raises(ConfigError, match="loss_type=ipo is for stage dpo"):
        build("trainer.stage=simpo", "trainer.dpo.loss_type=ipo")
    with pytest.raises(ConfigError, match="stage orpo always adds"):
        build("trainer.stage=orpo", "trainer.dpo.rpo_alpha=0.5")
