"""Value-guided search: the value stage (train, save, reload) and the best_of_n / value_beam / mcts strategies."""

from __future__ import annotations

import json

import pytest
import torch

from medmm.config import DecodingConfig, TrainConfig, config_from_dict
from medmm.errors import ConfigError

SEARCH = ("best_of_n", "value_beam", "mcts")
SMALL = {"best_of_n": {"num_samples": 3}, "value_beam": {"beam_width": 2, "step_samples": 2},
         "mcts": {"num_simulations": 4, "step_samples": 2}}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_llm):
    """A text-only medmm folder over the tiny random Llama, and the same folder with a random value head."""
    from medmm.config import ModelConfig
    from medmm.model.multimodal import MedMMForCausalLM
    from medmm.model.value_head import ValueHead

    root = tmp_path_factory.mktemp("search")
    torch.manual_seed(0)
    model = MedMMForCausalLM.from_config(ModelConfig(llm=str(tiny_llm), llm_trainable="frozen"))
    plain = model.save_pretrained(root / "plain")
    model.value_head = ValueHead(model.llm_hidden_size, 16)
    with_head = model.save_pretrained(root / "with_head")
    return plain, with_head


@pytest.fixture(scope="module")
def loaded(tiny_folder):
    from medmm.model.multimodal import MedMMForCausalLM

    return MedMMForCausalLM.from_pretrained(tiny_folder[1]).eval()


def decode(model, strategy, seed=0, aux=None, max_new=8, **params):
    from medmm.inference.session import Session

    sess = Session(model, model.processor(128), {})
    d = DecodingConfig(strategy, max_new, seed, {**SMALL.get(strategy, {}), **params})
    return sess.decode("Is there an abnormality?", d, aux=aux)


def test_search_strategies_are_registered_with_their_flags():
    import argparse

    from medmm.inference.strategies import add_decoding_flags, get_strategy, list_strategies, resolve

    assert set(SEARCH) <= set(list_strategies())
    for name in SEARCH:
        s = get_strategy(name)
        assert s.start is not None and s.needs_hidden and not s.exact
        assert resolve(DecodingConfig(name))["scorer"] == "value"
    assert resolve(DecodingConfig("mcts", params={"num_simulations": 3}))["num_simulations"] == 3
    with pytest.raises(ConfigError, match="scorer"):
        resolve(DecodingConfig("best_of_n", params={"scorer": "no_such_reward"}))
    with pytest.raises(ConfigError, match="num_simulations"):
        resolve(DecodingConfig("value_beam", params={"num_simulations": 3}))  # another strategy's setting
    ap = argparse.ArgumentParser()
    add_decoding_flags(ap)
    a = ap.parse_args(["--strategy", "mcts", "--num-simulations", "5", "--c-puct", "2", "--step-delimiter", "sentence"])
    assert (a.param_num_simulations, a.param_c_puct, a.param_step_delimiter) == (5, 2.0, "sentence")


def test_steps_end_at_lines_or_sentences_but_not_decimal_points():
    from medmm.model.value_head import closes_step

    assert closes_step(" kg\n", "5", "line") and closes_step("\n", "", "sentence")
    assert not closes_step(".", "mg", "line")  # line mode: only newlines
    assert closes_step(".", "mg", "sentence") and closes_step(" mg.", "5", "sentence") and closes_step("?", "", "sentence")
    assert not closes_step(".", "6", "sentence") and not closes_step("6.", "", "sentence")  # "6.9" is not cut


def test_value_head_is_saved_in_the_folder_and_loaded_with_it(tiny_folder, loaded):
    from medmm.model.multimodal import MedMMForCausalLM
    from medmm.model.value_head import VALUE_HEAD_NAME

    plain, with_head = tiny_folder
    assert not (plain / VALUE_HEAD_NAME).exists() and (with_head / VALUE_HEAD_NAME).exists()
    assert MedMMForCausalLM.from_pretrained(plain).value_head is None
    assert loaded.value_head is not None and loaded.value_head.width == 16
    h = torch.randn(3, loaded.llm_hidden_size)
    again = MedMMForCausalLM.from_pretrained(with_head).value_head
    assert torch.equal(loaded.value_head(h), again(h))


@pytest.mark.parametrize("strategy", SEARCH)
def test_each_search_strategy_runs_through_the_registry(loaded, strategy):
    r = decode(loaded, strategy)
    assert len(r.tokens) <= 8
    assert r.extra["scored"] > 0  # the value head rated candidates
    eos = loaded.tokenizer.eos_token_id
    assert eos not in r.tokens


def test_mcts_is_deterministic_under_a_seed(loaded):
    a = decode(loaded, "mcts", seed=7, num_simulations=5, step_delimiter="sentence")
    b = decode(loaded, "mcts", seed=7, num_simulations=5, step_delimiter="sentence")
    assert a.tokens == b.tokens and a.extra == b.extra and a.forwards == b.forwards
    trees = {decode(loaded, "mcts", seed=s, num_simulations=5, step_delimiter="sentence").extra["root_q"]
             for s in (1, 2)}
    assert len(trees | {a.extra["root_q"]}) > 1  # the seed does steer the sampled expansions


def test_best_of_n_keeps_the_candidate_the_reward_prefers(loaded):
    """Candidate 0 is greedy, candidate 1 the first seeded sample; a reward naming either picks it."""
    tok = loaded.tokenizer
    greedy = tok.decode(decode(loaded, "greedy").tokens, skip_special_tokens=True).strip()
    sample = tok.decode(decode(loaded, "sample", seed=3, temperature=1.0, top_k=0).tokens,
                        skip_special_tokens=True).strip()
    assert sample != greedy  # a random tiny model: sampling leaves the greedy path
    for ref, chosen in ((sample, 1), (greedy, 0)):
        example = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ref}]}
        r = decode(loaded, "best_of_n", seed=3, aux={"example": example}, scorer="exact_match",
                   search_temperature=1.0, num_samples=1)
        assert r.extra["chosen"] == chosen and tok.decode(r.tokens, skip_special_tokens=True).strip() == ref


def test_search_needs_a_value_head_or_a_reference(tiny_folder):
    from medmm.model.multimodal import MedMMForCausalLM

    plain = MedMMForCausalLM.from_pretrained(tiny_folder[0]).eval()
    with pytest.raises(ConfigError, match="no value head"):
        decode(plain, "mcts")
    with pytest.raises(ConfigError, match="reference"):
        decode(plain, "best_of_n", scorer="exact_match")


def _value_cfg(tmp_path, folder, data, **value):
    return config_from_dict(TrainConfig, {
        "data": {"datasets": [{"path": str(data)}], "max_length": 128, "num_workers": 0},
        "trainer": {"stage": "value", "output_dir": str(tmp_path / "run"), "max_steps": 20, "micro_batch_size": 4,
                    "lr": 1e-2, "save_every": 1000, "seed": 0, "lr_schedule": "constant", "eval_every": 20},
        "value": {"model": str(folder), "width": 32, "eval_fraction": 0.25, **value}})


def _labelled(path, n=8):
    recs = [{"id": f"r{i}", "value": float(i % 2),
             "conversations": [{"from": "human", "value": f"Is finding {i} abnormal?"},
                               {"from": "gpt", "value": ("yes.\nIt is abnormal." if i % 2 else "no.\nIt is normal.")}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_value_features_match_what_search_sees(tmp_path, tiny_folder):
    """The stage's training features (one prefill of prompt + answer) equal the hidden state the search reads after
    feeding the answer token by token through the KV cache, at every trained step end."""
    from medmm.inference.session import Session
    from medmm.training.stages import StageContext, get_stage

    cfg = _value_cfg(tmp_path, tiny_folder[0], _labelled(tmp_path / "v.jsonl", 4), source="labels", steps="line",
                     eval_fraction=0.0)
    stage = get_stage("value")(cfg, StageContext(output_dir=tmp_path / "run"))
    stage.build_model()
    stage.build_data()
    rec = [json.loads(x) for x in (tmp_path / "v.jsonl").read_text().splitlines()][0]
    model = stage.medmm
    sess = Session(model, model.processor(128), {})
    _, cache, _, h = sess.prefill(sess.prompt_ids(rec["conversations"][:1]), hidden=True)
    answer = model.tokenizer(rec["conversations"][1]["value"], add_special_tokens=False)["input_ids"]
    seen = []
    for t in answer:
        _, cache, h = sess.runner.forward(cache, ids=[t], hidden=True)
        seen.append(h[-1])
    ends = stage._positions(answer)
    assert len(ends) == 2 and ends[-1] == len(answer)  # "no.\n" ends a line, then the whole answer
    rows = stage.rows[: len(ends)]  # the first record's prefixes come first
    for n, (feat, target) in zip(ends, rows):
        assert target == rec["value"]
        assert torch.allclose(feat, seen[n - 1].float(), atol=1e-4)


def test_labels_source_rejects_records_without_a_number(tmp_path, tiny_folder):
    from medmm.errors import InvalidInputError
    from medmm.training.stages import StageContext, get_stage

    data = tmp_path / "v.jsonl"
    data.write_text(json.dumps({"id": "a", "conversations": [{"from": "human", "value": "q"},
                                                             {"from": "gpt", "value": "yes"}]}) + "\n")
    stage = get_stage("value")(_value_cfg(tmp_path, tiny_folder[0], data, source="labels", eval_fraction=0.0),
                               StageContext(output_dir=tmp_path / "run"))
    stage.build_model()
    with pytest.raises(InvalidInputError, match="v.jsonl line 1"):
        stage.build_data()


@pytest.mark.slow
@pytest.mark.deepspeed
def test_value_stage_trains_saves_and_reloads(tmp_path, tiny_folder):
    """train.py with trainer.stage: value (labels): the head learns the labels; the folder loads with it and the
    search strategies then use it."""
    import yaml

    import train
    from medmm.model.multimodal import MedMMForCausalLM
    from medmm.model.value_head import VALUE_HEAD_NAME

    from .conftest import REPO

    data = _labelled(tmp_path / "v.jsonl", 12)
    cfg = {"data": {"datasets": [{"path": str(data)}], "max_length": 128, "num_workers": 0},
           "trainer": {"stage": "value", "output_dir": str(tmp_path / "run"),
                       "deepspeed": str(REPO / "configs/deepspeed/zero0.json"), "max_steps": 30,
                       "micro_batch_size": 4, "lr": 1e-2, "save_every": 1000, "seed": 0, "lr_schedule": "constant"},
           "value": {"model": str(tiny_folder[0]), "source": "labels", "width": 32, "eval_fraction": 0.0,
                     "steps": "answer"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    res = train.main(["--config", str(tmp_path / "cfg.yaml")])
    out = tmp_path / "run" / "checkpoint"
    assert res["step"] == 30 and (out / VALUE_HEAD_NAME).exists()
    meta = json.loads((out / "medmm_config.json").read_text())
    assert meta["value_training"]["source"] == "labels" and meta["value_training"]["train_records"] == 12
    model = MedMMForCausalLM.from_pretrained(out).eval()
    assert model.value_head is not None and model.value_head.info["steps_trained"] == 30
    from medmm.inference.session import Session

    sess = Session(model, model.processor(128), {})
    recs = [json.loads(x) for x in data.read_text().splitlines()]
    preds = []
    for r in recs:  # the reloaded head separates the two labels on its training answers
        ids = sess.prompt_ids(r["conversations"][:1])
        ids += model.tokenizer(r["conversations"][1]["value"], add_special_tokens=False)["input_ids"]
        _, _, h = sess.runner.forward(None, embeds=sess.embed(ids), hidden=True)
        preds.append(float(model.value_head(h[-1])))
    pos = [p for p, r in zip(preds, recs) if r["value"] == 1]
    neg = [p for p, r in zip(preds, recs) if r["value"] == 0]
    assert min(pos) > max(neg)
    assert len(decode(model, "mcts").tokens) <= 8
