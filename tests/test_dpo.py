"""Preference tuning: the losses against TRL's own code on fixed log-probs; answer log-probs; the dpo/simpo/orpo
stages through train.py (three references, one loss); 2-rank ZeRO-3 + LoRA DPO on real VQA-RAD and ClinTox pairs;
the medical_llm recipe chain pretrain -> sft -> dpo at tiny size.

TRL is a test-only dependency (``pip install trl==1.16.0``). Its ``DPOTrainer`` computes the loss inside
``_compute_loss`` from the per-token log-probs a model returns; these tests run that code on a stub model that returns
fixed log-probs (with precomputed reference log-probs), so the comparison is with TRL's loss code itself.
"""

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import REPO, SAMPLE, model_dict

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
    with pytest.raises(ConfigError, match="reference=copy is for stage dpo"):
        build("trainer.stage=simpo", "trainer.dpo.reference=copy")
    with pytest.raises(ConfigError, match="stage orpo always adds"):
        build("trainer.stage=orpo", "trainer.dpo.rpo_alpha=0.5")


# ----------------------------------------------------------------------------------------------- through train.py
def frozen_model(tiny_llm, modalities=("image", "mol"), r=8):
    """The tiny LoRA model with frozen encoders and projectors (what ``reference: adapter`` asks for)."""
    md = model_dict(tiny_llm)
    md["modalities"] = {k: v for k, v in md["modalities"].items() if k in modalities}
    for m in md["modalities"].values():
        m["encoder"]["trainable"] = m["projector"]["trainable"] = "frozen"
    md["lora"] = {"r": r, "alpha": 2 * r}
    return md


def write_config(path, md, data, zero="zero0", dpo=None, **trainer):
    import yaml

    cfg = {"model": md, "data": {"datasets": [{"path": str(data)}], "max_length": 128, "num_workers": 0},
           "trainer": {"stage": "dpo", "output_dir": str(path.parent / "run"),
                       "deepspeed": str(REPO / f"configs/deepspeed/{zero}.json"), "max_steps": 3, "micro_batch_size": 2,
                       "lr": 1e-2, "save_every": 100, "seed": 0, "lr_schedule": "constant", "dpo": dpo or {},
                       **trainer}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def mixed_pairs(path):
    """Image, molecule and text-only pairs: most micro-batches lack one modality or another."""
    imgs = sorted((SAMPLE / "vqa_rad" / "images").glob("*.jpg"))
    recs = []
    for i in range(6):
        yes = i % 2 == 0
        if i % 3 == 0:
            recs.append({"id": f"i{i}", "modalities": {"image": str(imgs[i])},
                         "conversations": [{"from": "human", "value": "<image>\nIs there an abnormality?"}],
                         "chosen": "yes" if yes else "no", "rejected": "no" if yes else "yes"})
        elif i % 3 == 1:
            recs.append({"id": f"m{i}", "modalities": {"mol": ["CCO", "c1ccccc1O"][i % 2]},
                         "conversations": [{"from": "human", "value": "<mol>\nIs this drug-like?"}],
                         "chosen": "yes", "rejected": "no"})
        else:
            recs.append({"id": f"t{i}", "conversations": [{"from": "human", "value": "Is aspirin an NSAID?"}],
                         "chosen": "yes, it is", "rejected": "no"})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def metric_rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.deepspeed
def test_adapter_copy_and_precomputed_references_give_the_same_loss(tmp_path, tiny_llm):
    """Under ZeRO-3 (one process): the disabled adapter, a frozen copy (its own ZeRO-3 engine) and log-probs written
    by `medmm prepare dpo-reference` give the same losses and rewards, step by step, and the same evaluation."""
    import train
    from medmm.cli import main as cli

    data = mixed_pairs(tmp_path / "pairs.jsonl")
    md = frozen_model(tiny_llm)
    ref_file = tmp_path / "reference.jsonl"
    rows = {}
    for ref in ("adapter", "copy", "precomputed"):
        cfg = write_config(tmp_path / ref / "cfg.yaml", md, data, zero="zero3", eval_every=3,
                           dpo={"reference": ref, "reference_file": str(ref_file), "eval_path": str(data)})
        if ref == "precomputed":
            cli(["prepare", "dpo-reference", "--config", str(cfg), "--out", str(ref_file), "--device", "cpu"])
            head = json.loads(ref_file.read_text().splitlines()[0])
            assert head["format"] == "medmm-dpo-reference" and head["pairs"] == 12  # 6 training + 6 eval pairs
        res = train.main(["--config", str(cfg)])
        assert res["zero_stage"] == 3 and res["step"] == 3
        # ZeRO-3's process-wide F.linear swap is undone when the run ends (a later trace-based export needs plain torch)
        assert "zero" not in torch.nn.functional.linear.__module__
        rows[ref] = metric_rows(tmp_path / ref / "run")
    keys = ("loss", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "eval_loss",
            "eval_reward_margin")
    for a, b, c in zip(rows["adapter"], rows["copy"], rows["precomputed"]):
        for k in keys:
            if k in a:
                assert a[k] == pytest.approx(b[k], abs=1e-5) == pytest.approx(c[k], abs=1e-5), (a["step"], k)
    first, last = rows["adapter"][1], rows["adapter"][-1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["reward_accuracy"] == 0.5
    assert last["loss"] < math.log(2) and last["eval_reward_margin"] > 0  # it trained: the three agree on a real loss


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", ["simpo", "orpo"])
def test_reference_free_stages_learn_a_fixed_batch(tmp_path, tiny_llm, stage):
    import train

    recs = [json.loads(x) for x in mixed_pairs(tmp_path / "all.jsonl").read_text().splitlines()]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs[:2]))  # one micro-batch: the same pairs every step
    dpo = {"beta": 2.0, "simpo_gamma": 0.5} if stage == "simpo" else {"beta": 0.1}
    cfg = write_config(tmp_path / "cfg.yaml", frozen_model(tiny_llm), data, stage=stage, max_steps=6, dpo=dpo)
    res = train.main(["--config", str(cfg)])
    rows = metric_rows(tmp_path / "run")
    assert res["step"] == 6 and all({"rewards_chosen", "reward_margin", "reward_accuracy"} <= r.keys() for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["reward_margin"] > rows[0]["reward_margin"]
    meta = json.loads((tmp_path / "run" / "checkpoint" / "medmm_config.json").read_text())
    assert meta["training"]["stage"] == stage and meta["training"]["dpo"]["beta"] == dpo["beta"]


# ----------------------------------------------------------------------------------------------- real pairs, 2 ranks
FACTS = [("Is aspirin an NSAID?", "yes", "no"), ("Is insulin produced by the liver?", "no", "yes"),
         ("Is the femur a bone of the arm?", "no", "yes"), ("Is metoprolol a beta blocker?", "yes", "no")]


@pytest.fixture(scope="module")
def real_pairs(shared_data, tmp_path_factory):
    """Pairs from real labels: VQA-RAD closed questions (split by image) and ClinTox FDA_APPROVED, plus text-only
    pairs; 20 training pairs (and one whose <image> sits past max_length), 16 held-out pairs."""
    import csv
    import random

    from medmm.prepare.molecules import prepare_molecules
    from medmm.prepare.preferences import pairs_from_labels
    from medmm.prepare.vqa import prepare_vqa
    from medmm.utils import read_jsonl, write_jsonl

    root = tmp_path_factory.mktemp("real_pairs")
    v = shared_data / "vqa" / "vqa_rad"
    prepare_vqa(v / "testset.json", v / "images", root / "vqa", eval_fraction=0.2, seed=0)
    vqa_train = pairs_from_labels(read_jsonl(root / "vqa" / "vqa_train.jsonl"))[0]
    vqa_held = pairs_from_labels(read_jsonl(root / "vqa" / "vqa_eval.jsonl"))[0]
    with open(shared_data / "molecules" / "moleculenet" / "clintox.csv") as f:
        rows = random.Random(0).sample(list(csv.DictReader(f)), 30)
    with open(root / "clintox.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    prepare_molecules(root / "clintox.csv", root / "mol", "smiles", "FDA_APPROVED", eval_fraction=0.0)
    mol = pairs_from_labels(read_jsonl(root / "mol" / "molecules_train.jsonl"))[0]
    text = [{"id": f"t{i}", "conversations": [{"from": "human", "value": q}], "chosen": c, "rejected": r}
            for i, (q, c, r) in enumerate(FACTS)]
    train = vqa_train[:8] + mol[:8] + text
    random.Random(1).shuffle(train)
    cut = dict(vqa_train[8], id="cut")  # the placeholder moved behind a long question: max_length would cut it
    q = cut["conversations"][-1]["value"].replace("<image>\n", "")
    cut["conversations"] = [{"from": "human", "value": " ".join([q] * 40) + "\n<image>"}]
    write_jsonl(root / "train.jsonl", train + [cut])
    write_jsonl(root / "held_out.jsonl", vqa_held[:8] + mol[8:16])
    return root


def closed_set_probs(checkpoint, pairs):
    """P(chosen) among {chosen, rejected} by the inference path (Predictor sessions, closed-set answering)."""
    from medmm.inference.predictor import Predictor

    pred = Predictor(checkpoint, device="cpu", max_length=128)
    reqs = [{"id": p["id"], "modalities": p["modalities"], "question": p["conversations"][-1]["value"],
             "options": [p["chosen"], p["rejected"]]} for p in pairs]
    outs = pred.predict(reqs)
    assert all("error" not in o for o in outs), outs
    return [o["probs"][p["chosen"]] for o, p in zip(outs, pairs)]


@pytest.mark.slow
@pytest.mark.deepspeed
def test_two_ranks_zero3_lora_dpo_on_vqa_rad_and_clintox_pairs(tmp_path, tiny_llm, real_pairs):
    """torchrun, 2 ranks, ZeRO-3, LoRA, reference = the disabled adapter; image, molecule and text-only pairs mixed
    in one run (no hang). Reward accuracy on the training pairs goes from 0.5 (every pair ties at the start) to at
    least 0.9; the pair with a cut <image> is dropped with its reason in errors.jsonl; the saved model reloads and
    its closed-set probability of the chosen answers rises on held-out pairs."""
    from medmm.config import TrainConfig, load_config
    from medmm.model.multimodal import MedMMForCausalLM
    from medmm.utils import read_jsonl, seed_everything
    from tests.test_training import torchrun

    train = real_pairs / "train.jsonl"
    cfg = write_config(tmp_path / "cfg.yaml", frozen_model(tiny_llm), train, zero="zero3", max_steps=30, lr=5e-3,
                       micro_batch_size=2, eval_every=30, dpo={"beta": 0.1, "eval_path": str(train)})
    r = torchrun(cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world=2" in r.stdout and "zero=3" in r.stdout
    run = tmp_path / "run"
    rows = metric_rows(run)
    evals = [x for x in rows if "eval_reward_accuracy" in x]
    assert [x["step"] for x in evals] == [0, 30]
    assert evals[0]["eval_reward_accuracy"] == 0.5  # the policy is its reference: every training pair ties
    assert evals[-1]["eval_reward_accuracy"] >= 0.9, evals
    steps = [x for x in rows if "loss" in x]
    assert steps[0]["reward_accuracy"] == 0.5 and steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert all({"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"} <= x.keys() for x in steps)
    errors = [json.loads(x) for x in (run / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and "(id=cut)" in errors[0]["path"]
    assert "modality tokens beyond max_length=128" in errors[0]["message"]

    # the saved model reloads with that behaviour: held-out pairs, closed-set answering, against the start
    seed_everything(0)  # the loop seeds before building: the starting weights (a fresh adapter = the reference)
    MedMMForCausalLM.from_config(load_config(TrainConfig, cfg).model).save_pretrained(tmp_path / "start")
    held = read_jsonl(real_pairs / "held_out.jsonl")
    before = closed_set_probs(tmp_path / "start", held)
    after = closed_set_probs(run / "checkpoint", held)
    assert sum(after) / len(after) > sum(before) / len(before) + 0.02, (before, after)


# ----------------------------------------------------------------------------------------------- the recipe chain
@pytest.mark.slow
@pytest.mark.deepspeed
def test_medical_llm_recipe_chain_pretrain_sft_dpo(tmp_path, tiny_llm, shared_data):
    """configs/recipes/medical_llm/{pretrain,sft,dpo}.yaml as written, on real data at tiny size (the tiny LLM and
    encoder, two steps each, ZeRO-0): ICD-10-CM text -> VQA-RAD conversations -> VQA-RAD closed-question pairs made
    by `medmm prepare preferences --from-labels`. Each stage starts from the last (trainer.init_from); DPO's first
    evaluation is the SFT model's own preference for the chosen answers."""
    import random

    import train
    from medmm.cli import main as cli
    from medmm.data.preferences import PreferenceDataset, collate_pairs
    from medmm.model.multimodal import MedMMForCausalLM
    from medmm.prepare.text import TextPrepareOptions, prepare_text
    from medmm.prepare.vqa import prepare_vqa
    from medmm.training.stages.dpo import answer_logps
    from tests.test_text import icd10cm_descriptions

    recipes = REPO / "configs" / "recipes" / "medical_llm"
    desc = icd10cm_descriptions()
    (tmp_path / "icd.txt").write_text("\n".join(desc[i] for i in sorted(random.Random(0).sample(range(len(desc)), 400))))
    prepare_text([tmp_path / "icd.txt"], tmp_path / "text", TextPrepareOptions(min_chars=5, min_words=1,
                                                                              eval_fraction=0.0, progress=False))
    v = shared_data / "vqa" / "vqa_rad"
    prepare_vqa(v / "testset.json", v / "images", tmp_path / "vqa", eval_fraction=0.2, seed=0)
    for part in ("train", "eval"):
        cli(["prepare", "preferences", "--from-labels", str(tmp_path / "vqa" / f"vqa_{part}.jsonl"),
             "--out", str(tmp_path / "prefs" / f"vqa_closed_{part}.jsonl")])
    tiny = [f"model.llm={tiny_llm}", "model.gradient_checkpointing=false", "model.lora.r=4", "model.lora.alpha=8",
            f"trainer.deepspeed={REPO / 'configs/deepspeed/zero0.json'}", "trainer.max_steps=2",
            "trainer.micro_batch_size=2", "trainer.grad_accum=1", "trainer.warmup_steps=0", "trainer.save_every=2",
            "data.num_workers=0"]
    image = ["model.modalities.image.encoder.name=vit2d_tiny", "model.modalities.image.encoder.kwargs={}",
             "model.modalities.image.preprocess.image_size=64"]
    runs = {s: tmp_path / s for s in ("pretrain", "sft", "dpo")}
    res = train.main(["--config", str(recipes / "pretrain.yaml"), *tiny, "data.max_length=64", "trainer.eval_every=2",
                      f"data.datasets.0.path={tmp_path / 'text' / 'train.jsonl'}",
                      f"trainer.output_dir={runs['pretrain']}"])
    assert res["eval_ppl"] < res["eval_ppl_first"]
    res = train.main(["--config", str(recipes / "sft.yaml"), *tiny, *image, "data.max_length=256",
                      f"data.datasets.0.path={tmp_path / 'vqa' / 'vqa_train.jsonl'}",
                      f"trainer.init_from={runs['pretrain'] / 'checkpoint'}", f"trainer.output_dir={runs['sft']}"])
    assert res["step"] == 2
    res = train.main(["--config", str(recipes / "dpo.yaml"), *tiny, *image, "data.max_length=128",
                      "trainer.eval_every=2", "trainer.lr=1e-3",
                      f"data.datasets.0.path={tmp_path / 'prefs' / 'vqa_closed_train.jsonl'}",
                      f"trainer.dpo.eval_path={tmp_path / 'prefs' / 'vqa_closed_eval.jsonl'}",
                      f"trainer.init_from={runs['sft'] / 'checkpoint'}", f"trainer.output_dir={runs['dpo']}"])
    assert res["stage"] == "dpo" and res["step"] == 2
    rows = metric_rows(runs["dpo"])
    assert rows[0]["step"] == 0 and rows[0]["eval_reward_accuracy"] == 0.5
    assert all({"loss", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"} <= r.keys()
               for r in rows[1:])
    meta = json.loads((runs["dpo"] / "checkpoint" / "medmm_config.json").read_text())
    assert meta["training"]["init_from"] == str(runs["sft"] / "checkpoint") and meta["llm_adapter"]

    # DPO started from the SFT model: its step-0 evaluation is the SFT checkpoint's own chosen-vs-rejected preference
    sft = MedMMForCausalLM.from_pretrained(runs["sft"] / "checkpoint", merge_lora=True).eval()
    proc = sft.processor(128)
    held = PreferenceDataset(tmp_path / "prefs" / "vqa_closed_eval.jsonl", proc)
    probs = []
    for k in range(0, len(held), 8):
        batch = collate_pairs(proc, [held[i] for i in range(k, min(k + 8, len(held)))])
        batch.pop("load_errors", None)
        labels = batch.pop("labels")
        with torch.no_grad():
            lp, _ = answer_logps(sft, batch, labels)
        B = labels.shape[0] // 2
        probs += torch.sigmoid(lp[:B] - lp[B:]).tolist()
    assert rows[0]["eval_chosen_prob"] == pytest.approx(sum(probs) / len(probs), abs=1e-4)
