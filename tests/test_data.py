"""Conversation rendering, the weighted mixture and the resumable sampler."""

import collections

import pytest
import torch

from medmm.data.conversation import IGNORE_INDEX, ConversationEncoder, ModalityToken
from medmm.data.dataset import MixtureDataset, ResumableBatchSampler
from medmm.errors import ConversationError


@pytest.fixture(scope="module")
def tok(tiny_llm):
    from transformers import AutoTokenizer

    from medmm.model.multimodal import add_modality_tokens

    t = AutoTokenizer.from_pretrained(tiny_llm)
    add_modality_tokens(t, ["image"])
    return t


def encoder(tok, template=True, **kw):
    if not template:
        tok = tok.__class__.from_pretrained(tok.name_or_path)
        tok.chat_template = None
        from medmm.model.multimodal import add_modality_tokens

        add_modality_tokens(tok, ["image"])
    mt = {"image": ModalityToken("<image>", tok.convert_tokens_to_ids("<image>"), 3)}
    return ConversationEncoder(tok, mt, **kw), tok


@pytest.mark.parametrize("template", [True, False])
def test_multi_turn_labels(tok, template):
    enc, t = encoder(tok, template)
    conv = [{"from": "human", "value": "<image>\nfirst?"}, {"from": "gpt", "value": "one"},
            {"from": "human", "value": "second?"}, {"from": "gpt", "value": "two"}]
    ids, labels = enc.encode(conv, {"image": 1})
    assert len(ids) == len(labels)
    learned = t.decode([x for x in labels if x != IGNORE_INDEX])
    assert "one" in learned and "two" in learned and "first" not in learned and "second" not in learned
    assert t.eos_token in learned  # the end-of-turn token is learned so generation stops
    assert ids.count(t.convert_tokens_to_ids("<image>")) == 3
    full = t.decode(ids)
    if template:
        assert full == enc.render([{"role": "user", "content": "<image>\nfirst?"}, {"role": "assistant", "content": "one"},
                                   {"role": "user", "content": "second?"}, {"role": "assistant", "content": "two"}],
                                  False).replace("<image>", "<image>" * 3)


def test_prompt_ends_with_generation_prefix(tok):
    enc, t = encoder(tok)
    ids = enc.encode_prompt([{"from": "human", "value": "q?"}], {})
    assert t.decode(ids).endswith("<|assistant|>\n")
    with pytest.raises(ConversationError, match="end with a human turn"):
        enc.encode_prompt([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], {})


def test_bad_conversations(tok):
    enc, _ = encoder(tok)
    with pytest.raises(ConversationError, match="unknown role"):
        enc.encode([{"from": "robot", "value": "x"}], {})
    with pytest.raises(ConversationError, match="no answer"):
        enc.encode([{"from": "human", "value": "x"}], {})
    with pytest.raises(ConversationError, match="answer turn"):
        enc.encode([{"from": "human", "value": "x"}, {"from": "gpt", "value": "<image>"}], {"image": 0})
    enc_short, _ = encoder(tok, max_length=8)
    with pytest.raises(ConversationError, match="max_length"):
        enc_short.encode([{"from": "human", "value": "a b c d e f g h i j <image>"}, {"from": "gpt", "value": "x"}],
                         {"image": 1})


class _DS(torch.utils.data.Dataset):
    def __init__(self, n, tag):
        self.n, self.tag = n, tag

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return (self.tag, i)


def test_mixture_ratios_follow_weights():
    mix = MixtureDataset([_DS(10, "a"), _DS(1000, "b")], [3.0, 1.0])
    order = mix.epoch_order(0, seed=1, epoch_size=4000)
    c = collections.Counter(mix[i][0] for i in order)
    assert c["a"] == 3000 and c["b"] == 1000  # small set is oversampled to its weight
    assert mix.epoch_order(0, 1, 4000) == order and mix.epoch_order(1, 1, 4000) != order


def test_sampler_resume_and_rank_disjoint():
    mix = MixtureDataset([_DS(30, "a"), _DS(20, "b")], [1.0, 1.0])
    s0 = ResumableBatchSampler(mix, 4, rank=0, world_size=2, seed=3)
    s1 = ResumableBatchSampler(mix, 4, rank=1, world_size=2, seed=3)
    it0, it1 = iter(s0), iter(s1)
    first = [next(it0) for _ in range(20)]
    b1 = [next(it1) for _ in range(6)]
    assert not set(first[0]) & set(b1[0])  # ranks see different samples
    resumed = iter(ResumableBatchSampler(mix, 4, rank=0, world_size=2, seed=3, start=13))
    assert [next(resumed) for _ in range(7)] == first[13:]
    assert s0.batch_at(13) == first[13]
