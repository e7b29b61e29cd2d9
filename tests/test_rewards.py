"""The reward registry: pure scores of one answer against one example, looked up by name."""

import pytest

from medmm.data.rewards import get_reward, list_rewards, match_choice, register_reward
from medmm.errors import ConfigError


def conv(answer: str, **extra) -> dict:
    return {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": answer}], **extra}


def test_builtins_are_registered():
    assert {"exact_match", "token_f1", "recall", "closed_set"} <= set(list_rewards())
    with pytest.raises(ConfigError, match="unknown reward 'bleurt'.*exact_match"):
        get_reward("bleurt")


def test_exact_match_and_metrics_against_the_last_answer():
    ex = conv("The left lung.")
    assert get_reward("exact_match")("left lung", ex) == 1.0
    assert get_reward("exact_match")("right lung", ex) == 0.0
    assert get_reward("token_f1")("right lung", ex) == pytest.approx(0.5)
    assert get_reward("recall")("a mass in the left lung", ex) == 1.0
    assert get_reward("exact_match")("femur", {"reference": "Femur"}) == 1.0  # an explicit reference wins
    with pytest.raises(ValueError, match="no reference"):
        get_reward("exact_match")("x", {"conversations": [{"from": "human", "value": "q"}]})


@pytest.mark.parametrize("answer,score", [("神经内科", 1.0), ("答案：神经内科", 1.0), ("骨科", 0.0),
                                          ("神经内科或骨科", 0.0), ("不知道", 0.0)])
def test_closed_set_on_a_promptcblue_record(answer, score):
    ex = {"target": "神经内科", "answer_choices": ["神经内科", "骨科"], "task_type": "cls"}
    assert get_reward("closed_set")(answer, ex) == score


def test_closed_set_needs_choices_and_matches_yes_no():
    assert match_choice("Yes.", ["yes", "no"]) == "yes" and match_choice("maybe", ["yes", "no"]) is None
    assert match_choice("I don't know", ["yes", "no"]) is None  # whole words: "no" is not in "know"
    assert match_choice("The answer is no, it is not.", ["yes", "no"]) == "no"
    assert get_reward("closed_set")("No", conv("no", options=["yes", "no"])) == 1.0
    with pytest.raises(ValueError, match="answer_choices"):
        get_reward("closed_set")("yes", conv("yes"))


def test_a_new_reward_is_one_decorated_function():
    @register_reward("test_length", "shorter is better")
    def length(prediction: str, example: dict) -> float:
        return -len(prediction)

    assert get_reward("test_length")("abc", {}) == -3.0 and get_reward("test_length").description == "shorter is better"
    with pytest.raises(ValueError, match="twice"):
        register_reward("test_length")(length)
