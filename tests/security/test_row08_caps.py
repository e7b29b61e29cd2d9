"""Row 8: ``/v1/ask`` with 3000 options of 100 characters held the model for 22 s; nothing capped the options,
the modality values or the params. Each cap is now a 422 naming the field, answered before the model is touched,
and the answer does not echo the input back."""

from __future__ import annotations

import httpx
import pytest

from tests.security.conftest import AUTH

pytestmark = pytest.mark.integration


class LIMITS:  # the documented defaults (medmm.serve.http.AskLimits) api_url serves with
    max_options, max_option_chars = 64, 256
    max_modalities, max_modality_chars = 8, 8192
    max_params, max_param_chars, max_param_number = 16, 64, 64
    max_new_tokens = 1024


def _ask(url, **body):
    return httpx.post(f"{url}/v1/ask", json={"question": "drug?", "max_new_tokens": 2, **body}, headers=AUTH,
                      timeout=60)


def _refused(r, field, says="at most"):
    assert r.status_code == 422, r.text[:300]
    detail = r.json()["detail"]
    assert detail["path"] == field and says in detail["message"], detail
    assert len(r.content) < 1024  # the input is not echoed back


@pytest.mark.parametrize("body, field", [
    ({"options": [f"answer {i}" * 10 for i in range(3000)]}, "options"),  # the attack of the issue
    ({"options": ["yes"] * (LIMITS.max_options + 1)}, "options"),
    ({"options": ["yes", "n" * (LIMITS.max_option_chars + 1)]}, "options[1]"),
    ({"modalities": {f"m{i}": "CCO" for i in range(LIMITS.max_modalities + 1)}}, "modalities"),
    ({"modalities": {"mol": "C" * (LIMITS.max_modality_chars + 1)}}, "modalities.mol"),
    ({"modalities": {"dna": "ACGT" * (LIMITS.max_modality_chars // 4 + 1)}}, "modalities.dna"),
    ({"strategy": "beam", "params": {f"p{i}": 1 for i in range(LIMITS.max_params + 1)}}, "params"),
    ({"strategy": "beam", "params": {"num_beams": LIMITS.max_param_number + 1}}, "params.num_beams"),
    ({"strategy": "speculative", "params": {"draft": "d" * (LIMITS.max_param_chars + 1)}}, "params.draft"),
    ({"strategy": "beam", "params": {"x" * (LIMITS.max_param_chars + 1): 2}}, "params"),
])
def test_caps_are_a_422_naming_the_field(api_url, body, field):
    _refused(_ask(api_url, **body), field)


def test_repeated_or_empty_options_are_a_422_not_a_500(api_url):
    for options in (["yes", "no", "yes"], ["yes", ""]):
        _refused(_ask(api_url, options=options), "options", says="distinct")


def test_the_documented_defaults():
    from medmm.serve.http import AskLimits

    assert AskLimits() == AskLimits(**{k: v for k, v in vars(LIMITS).items() if not k.startswith("_")})


def test_within_the_caps_it_answers(api_url):
    r = _ask(api_url, options=[f"answer {i}" for i in range(LIMITS.max_options)], modalities={"mol": "CCO"})
    assert r.status_code == 200 and len(r.json()["probs"]) == LIMITS.max_options
    assert _ask(api_url, strategy="beam", params={"num_beams": 2}).status_code == 200
    for field, value in [("max_new_tokens", LIMITS.max_new_tokens + 1), ("seed", 10**30)]:  # a seed torch refuses
        r = _ask(api_url, **{field: value})
        assert r.status_code == 422 and field in r.text and len(r.content) < 1024, r.text[:300]
