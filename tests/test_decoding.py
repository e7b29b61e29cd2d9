"""Decoding strategies: pure functions, speculative and prompt-lookup equal greedy, contrastive decoding and
search, closed-set probabilities, and prefix-cached sessions that match uncached runs."""

import math

import pytest
import torch

from medmm.config import ModelConfig, config_from_dict
from medmm.inference.decoding import (
    apply_repetition_penalty,
    banned_ngram_tokens,
    contrastive_decoding_scores,
    contrastive_search_select,
    filter_top_k_top_p,
    greedy_token,
    prompt_lookup_proposal,
    sample_token,
)
from medmm.inference.session import Session
from medmm.model.multimodal import MedMMForCausalLM
from tests.conftest import model_dict

QUESTIONS = ["Is this molecule drug-like?", "Is this molecule toxic to the liver?"]


# ----------------------------------------------------------------------------- pure functions
def test_sampling_functions():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    assert greedy_token(logits) == 1
    assert sample_token(logits, temperature=0) == 1
    assert torch.isinf(filter_top_k_top_p(logits, top_k=2)).tolist() == [True, False, False, True]
    kept = ~torch.isinf(filter_top_k_top_p(logits, top_p=0.5))
    assert kept.tolist() == [False, True, False, False]
    g = torch.Generator().manual_seed(0)
    draws = {sample_token(logits, 1.0, top_k=2, generator=g) for _ in range(200)}
    assert draws == {1, 2}
    pen = apply_repetition_penalty(torch.tensor([2.0, -2.0, 1.0]), [0, 1], 2.0)
    assert pen.tolist() == [1.0, -4.0, 1.0]


def test_contrastive_decoding_scores():
    expert = torch.tensor([2.0, 1.9, -5.0, 0.0])
    amateur = torch.tensor([5.0, 0.0, -9.0, 0.0])  # the amateur prefers the greedy token 0
    assert greedy_token(contrastive_decoding_scores(expert, amateur, alpha=0.1, beta=0.0)) == greedy_token(expert)
    assert greedy_token(contrastive_decoding_scores(expert, amateur, alpha=0.1, beta=0.5)) == 1
    s = contrastive_decoding_scores(expert, amateur, alpha=0.1, beta=10.0)
    assert math.isinf(s[2]) and s[2] < 0  # implausible for the expert: cut, however the amateur scores it


def test_contrastive_search_select():
    probs = torch.tensor([0.6, 0.4])
    ctx = torch.tensor([[1.0, 0.0]])
    cand = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # candidate 0 repeats the context
    assert contrastive_search_select(probs, cand, ctx, alpha=0.0) == 0
    assert contrastive_search_select(probs, cand, ctx, alpha=0.6) == 1


def test_prompt_lookup_proposal():
    assert prompt_lookup_proposal([5, 6, 7, 8, 1, 5, 6], 2) == [7, 8]
    assert prompt_lookup_proposal([1, 2, 3], 2) == []


# ----------------------------------------------------------------------------- on a saved tiny model
@pytest.fixture(scope="module")
def model(tiny_llm, tmp_path_factory):
    torch.manual_seed(3)
    m = MedMMForCausalLM.from_config(config_from_dict(ModelConfig, model_dict(tiny_llm, llm_trainable="full")))
    path = m.save_pretrained(tmp_path_factory.mktemp("dec") / "model")
    return MedMMForCausalLM.from_pretrained(path).eval()


@pytest.fixture
def session(model):
    return Session(model, model.processor(512), {"mol": "CC(=O)Oc1ccccc1C(=O)O"})


def hf_greedy(model, session, question, n):
    proc = session.processor
    s = proc.process_prompt({"modalities": session.record_modalities, "conversations": [
        {"from": "human", "value": question}]})
    b = proc.collate([s], padding_side="left")
    out = model.generate(b["input_ids"], b["attention_mask"], b["modality_inputs"], max_new_tokens=n, do_sample=False)
    ids = out[0].tolist()
    eos = model.tokenizer.eos_token_id
    return ids[: ids.index(eos)] if eos in ids else ids


def test_session_greedy_matches_hf_generate(model, session):
    for q in QUESTIONS:
        assert session.generate(q, max_new_tokens=12).tokens == hf_greedy(model, session, q, 12)


def test_prefix_cache_gives_same_logits_and_encodes_once(model, session, monkeypatch):
    calls = []
    monkeypatch.setattr(model, "encode_modality", lambda *a, **k: calls.append(1))  # must not run again
    ids0 = session.prompt_ids(QUESTIONS[0])
    session.prefill(ids0)
    ids1 = session.prompt_ids(QUESTIONS[1])
    cached, _, reused = session.prefill(ids1)
    uncached, _, none = session.prefill(ids1, use_cache=False)
    assert reused > model.modality_tokens["mol"].slots and none == 0
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)
    assert not calls


@pytest.mark.slow
def test_speculative_and_prompt_lookup_equal_greedy(model, session, tiny_llm):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_llm)
    cfg.num_hidden_layers = 1
    torch.manual_seed(7)
    draft = AutoModelForCausalLM.from_config(cfg).eval()  # a different (random) text-only draft
    for q in QUESTIONS:
        greedy = session.generate(q, max_new_tokens=16).tokens
        spec = session.speculative(q, draft_llm=draft, k=3, max_new_tokens=16)
        assert spec.tokens == greedy and spec.proposed > 0
        same = session.speculative(q, draft_llm=model.llm, k=3, max_new_tokens=16)  # draft == target
        assert same.tokens == greedy
        lookup = session.speculative(q, prompt_lookup=True, k=3, max_new_tokens=16)
        assert lookup.tokens == greedy
        # a self-speculative draft (the target's first layer) sees the modality features and agrees more often
        from medmm.inference.decoding import layer_skip_draft

        skip = session.speculative(q, draft_llm=layer_skip_draft(model.llm, 1), k=3, max_new_tokens=16)
        assert skip.tokens == greedy
        full = session.speculative(q, draft_llm=layer_skip_draft(model.llm, 2), k=3, max_new_tokens=16)
        assert full.tokens == greedy and full.acceptance_rate == 1.0  # all layers: the draft is the target


@pytest.mark.slow  # ~50 s on a loaded 2-core machine (HF assistant path + 2 schedules x 2 input kinds)
def test_speculative_with_a_partly_agreeing_draft_equals_greedy(model, session):
    """A draft that agrees with the target on some tokens and not others (the target with a perturbed lm_head)
    exercises accepted runs cut by a correction: medmm's loop (with modality inputs and text-only) and HF's
    assistant path still give greedy's tokens."""
    import copy

    from medmm.config import DecodingConfig

    draft = copy.deepcopy(model.llm).eval()
    g = torch.Generator().manual_seed(0)
    head = draft.get_output_embeddings().weight
    with torch.no_grad():
        head.add_(torch.randn(head.shape, generator=g) * head.std() * 0.5)
    spec = DecodingConfig("speculative", 12, params={"draft": "x", "backend": "medmm", "num_draft_tokens": 3})
    text_only = Session(model, session.processor, {})
    proposed = accepted = 0
    greedy = {}
    for name, sess in (("mol", session), ("text", text_only)):
        for q in QUESTIONS:
            greedy[name, q] = sess.decode(q, DecodingConfig("greedy", 12)).tokens
            got = sess.decode(q, spec, aux={"draft": draft})
            assert got.tokens == greedy[name, q]
            proposed, accepted = proposed + got.proposed, accepted + got.accepted
            adaptive = DecodingConfig("speculative", 12, params={**spec.params, "draft_schedule": "heuristic"})
            full = sess.decode(q, adaptive, aux={"draft": draft})
            assert full.tokens == greedy[name, q]
            unsure = DecodingConfig("speculative", 12, params={**adaptive.params, "draft_confidence": 0.5})
            cut = sess.decode(q, unsure, aux={"draft": draft})  # guesses stop where the draft is unsure
            assert cut.tokens == greedy[name, q] and cut.proposed <= full.proposed
    assert 0 < accepted < proposed  # some guesses kept, some corrected
    eos = model.tokenizer.eos_token_id
    q = QUESTIONS[0]
    ids = torch.tensor([text_only.prompt_ids(q)])
    kw = {"max_new_tokens": 12, "do_sample": False, "eos_token_id": eos, "pad_token_id": eos,
          "suppress_tokens": [mt.token_id for mt in model.modality_tokens.values()]}
    ref = model.llm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    hf = model.llm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), assistant_model=draft,
                            num_assistant_tokens=3, num_assistant_tokens_schedule="constant", **kw)
    assert hf.tolist() == ref.tolist()
    new = ref[0, ids.shape[1]:].tolist()
    assert (new[: new.index(eos)] if eos in new else new) == greedy["text", q]

def test_contrastive_decoding_beta_zero_is_greedy(model, session, tiny_llm):
    from transformers import AutoModelForCausalLM

    amateur = AutoModelForCausalLM.from_pretrained(tiny_llm).eval()
    q = QUESTIONS[0]
    greedy = session.generate(q, max_new_tokens=10).tokens
    assert session.contrastive_decoding(q, amateur, alpha=0.1, beta=0.0, max_new_tokens=10).tokens == greedy
    cd = session.contrastive_decoding(q, amateur, alpha=0.5, beta=1.0, max_new_tokens=10)
    assert cd.extra == {"alpha": 0.5, "beta": 1.0}


def test_contrastive_search_alpha_zero_is_greedy(session):
    q = QUESTIONS[1]
    assert session.contrastive_search(q, penalty_alpha=0.0, top_k=3, max_new_tokens=8).tokens == \
        session.generate(q, max_new_tokens=8).tokens
    assert len(session.contrastive_search(q, penalty_alpha=0.6, top_k=3, max_new_tokens=8).tokens) <= 8


def test_closed_set_probabilities(model, session):
    res = session.closed_set(QUESTIONS[0], ["yes", "no", "uncertain"])
    assert sum(res["probs"].values()) == pytest.approx(1.0)
    assert res["answer"] == max(res["probs"], key=res["probs"].get)
    # brute force: log p(option + eos | prompt) from one uncached forward each
    ids = session.prompt_ids(QUESTIONS[0])
    eos = model.tokenizer.eos_token_id
    for opt in ("yes", "no"):
        toks = model.tokenizer(opt, add_special_tokens=False)["input_ids"] + [eos]
        full = torch.tensor([ids + toks])
        with torch.no_grad():
            logits = model.llm(inputs_embeds=model.embed(full, features=session.features)).logits[0]
        logits[:, [mt.token_id for mt in model.modality_tokens.values()]] = -math.inf  # never generated
        lp = torch.log_softmax(logits, -1)
        ref = sum(float(lp[len(ids) - 1 + i, t]) for i, t in enumerate(toks))
        assert res["logprobs"][opt] == pytest.approx(ref, abs=1e-3)
    with pytest.raises(ValueError):
        session.closed_set("q", ["yes", "yes"])


# ----------------------------------------------------------------------------- the strategy registry
def test_banned_ngram_tokens():
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]  # "1 2 3" exists: after "1 2" the 3 is banned
    assert banned_ngram_tokens([1, 2, 3], 1) == [1, 2, 3]
    assert banned_ngram_tokens([1, 2], 3) == []


def test_registry_checks_settings():
    from medmm.config import DecodingConfig
    from medmm.errors import ConfigError
    from medmm.inference.strategies import get_strategy, list_strategies, resolve

    names = list_strategies()
    assert {"greedy", "sample", "beam", "prompt_lookup", "speculative", "speculative_sampling", "contrastive",
            "contrastive_search"} <= set(names)
    for n in names:
        s = get_strategy(n)
        assert s.hf is not None or s.start is not None
        required = {p.name: "x" for p in s.params if p.required}
        assert set(resolve(DecodingConfig(n, params=required))) == {p.name for p in s.params}
    assert resolve(DecodingConfig("beam", params={"num_beams": 2}))["num_beams"] == 2
    with pytest.raises(ConfigError, match="num_beams do not apply"):
        resolve(DecodingConfig("greedy", params={"num_beams": 2}))
    with pytest.raises(ConfigError, match="must be int"):
        resolve(DecodingConfig("beam", params={"num_beams": "two"}))
    with pytest.raises(ConfigError, match="needs 'draft'"):
        resolve(DecodingConfig("speculative"))
    with pytest.raises(ConfigError, match="must be auto, hf or medmm"):
        resolve(DecodingConfig("prompt_lookup", params={"backend": "gpu"}))
    with pytest.raises(ConfigError, match="unknown strategy"):
        resolve(DecodingConfig("nucleus"))


def _loop_params(name, tiny_llm):
    """Settings and loaded helper models that make a strategy runnable in the loop, and whether it must equal greedy."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_llm)
    cfg.num_hidden_layers = 1
    torch.manual_seed(7)
    helper = AutoModelForCausalLM.from_config(cfg).eval()  # a random, narrower-than-nothing text-only LM
    return {
        "prompt_lookup": ({"backend": "medmm", "num_draft_tokens": 3}, {}),
        "speculative": ({"draft": "x", "backend": "medmm", "num_draft_tokens": 3}, {"draft": helper}),
        "contrastive": ({"amateur": "x", "cd_beta": 0.0}, {"amateur": helper}),  # beta 0 = greedy
        "contrastive_search": ({"penalty_alpha": 0.0, "search_top_k": 3}, {}),  # alpha 0 = greedy
        "sample": ({"temperature": 0.0}, {}),  # temperature 0 = greedy
        "greedy": ({}, {}),
    }.get(name)


@pytest.mark.parametrize("name", ["greedy", "sample", "prompt_lookup", "speculative", "contrastive",
                                  "contrastive_search"])
def test_every_loop_strategy_equals_greedy_at_its_greedy_setting(model, session, tiny_llm, name):
    """Every strategy with a loop step runs in the one loop; the exact ones (and the others at their greedy
    limit) give the greedy answer token for token, and the registry lists each exact one."""
    from medmm.config import DecodingConfig
    from medmm.inference.strategies import get_strategy, list_strategies

    exact_loop = {n for n in list_strategies() if get_strategy(n).exact and get_strategy(n).start}
    assert exact_loop <= {"greedy", "prompt_lookup", "speculative"}  # a new exact strategy needs a case here
    params, aux = _loop_params(name, tiny_llm)
    for q in QUESTIONS:
        ref = hf_greedy(model, session, q, 14)
        got = session.decode(q, DecodingConfig(name, 14, params=params), aux=aux)
        assert got.tokens == ref, name


def test_sampling_in_the_loop_is_seeded(session):
    from medmm.config import DecodingConfig

    d = DecodingConfig("sample", 10, seed=5, params={"temperature": 1.5, "top_k": 0})
    a = session.decode(QUESTIONS[0], d).tokens
    assert session.decode(QUESTIONS[0], d).tokens == a
    others = {tuple(session.decode(QUESTIONS[0], DecodingConfig("sample", 10, seed=s, params=d.params)).tokens)
              for s in range(6, 10)}
    assert len(others | {tuple(a)}) > 1  # the seed matters


def test_conversation_prompt_equals_question(session):
    conv = [{"from": "human", "value": QUESTIONS[0]}]
    assert session.prompt_ids(conv) == session.prompt_ids(QUESTIONS[0])


def test_repetition_settings_match_hf_in_the_loop(model, session):
    from medmm.config import DecodingConfig

    q = QUESTIONS[1]
    proc = session.processor
    s = proc.process_prompt({"modalities": session.record_modalities, "conversations": [
        {"from": "human", "value": q}]})
    b = proc.collate([s], padding_side="left")
    out = model.generate(b["input_ids"], b["attention_mask"], b["modality_inputs"], max_new_tokens=12,
                         do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=2)[0].tolist()
    eos = model.tokenizer.eos_token_id
    ref = out[: out.index(eos)] if eos in out else out
    got = session.decode(q, DecodingConfig("greedy", 12, params={"repetition_penalty": 1.3,
                                                                 "no_repeat_ngram_size": 2})).tokens
    assert got == ref
