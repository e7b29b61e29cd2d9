"""Probe: named tokens (``--tokens-file``, one ``name token`` per line) beside the single ``--token-file``.

Each token is at least 16 characters, names are unique, ``#`` starts a comment line; a presented token is compared
(constant time) with every entry, never stopping at the first match; errors never repeat a token."""

from __future__ import annotations

import httpx
import pytest

from medmm.serve import http as api
from medmm.serve.http import TokenSet, create_app, load_tokens, resolve_tokens
from tests.security.conftest import TOKEN, running

pytestmark = pytest.mark.integration

ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-fedcba9876543210"


@pytest.fixture(scope="module")
def url(sec_pipeline):
    with running(create_app(sec_pipeline, {"alice": ALICE, "bob": BOB}, batching="off")) as url:
        yield url


def _status(url, token):
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return httpx.post(f"{url}/v1/ask", json={"question": "q", "max_new_tokens": 1}, headers=headers,
                      timeout=30).status_code


def test_each_named_token_opens_the_api(url):
    assert _status(url, ALICE) == 200 and _status(url, BOB) == 200
    for wrong in [None, TOKEN, ALICE[:-1], ALICE + "x", ALICE.upper(), f"{ALICE} {BOB}", "alice"]:
        assert _status(url, wrong) == 401, wrong


def test_the_tokens_file(tmp_path, monkeypatch):
    f = tmp_path / "tokens"
    f.write_text(f"# who  token\n\nalice {ALICE}\n  bob\t{BOB}  \n")
    assert load_tokens(f) == {"alice": ALICE, "bob": BOB}
    assert resolve_tokens(tokens_file=f) == {"alice": ALICE, "bob": BOB}
    monkeypatch.setenv("MEDMM_API_TOKEN", TOKEN)
    assert resolve_tokens() == {"default": TOKEN}  # the single token keeps working, named "default"
    for text, why in [(f"alice {ALICE}\nalice {BOB}\n", "twice"), ("alice short-token\n", "16"),
                      (f"alice {ALICE} extra\n", "name token"), (f"{ALICE}\n", "name token"), ("# none\n", "no token"),
                      (f"alice {ALICE}\nbob {ALICE}\n", "twice"), (f"al/ice {ALICE}\n", "name")]:
        f.write_text(text)
        with pytest.raises(ValueError, match=why) as e:
            load_tokens(f)
        assert ALICE not in str(e.value) and BOB not in str(e.value) and "short-token" not in str(e.value)
    with pytest.raises(ValueError):
        resolve_tokens(token_file=f, tokens_file=f)


def test_every_entry_is_compared(monkeypatch):
    tokens = TokenSet({"alice": ALICE, "bob": BOB, "carol": "carol-token-0123456789"})
    calls = []
    real = api.hmac.compare_digest
    monkeypatch.setattr(api.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    for presented, name in [(ALICE, "alice"), (BOB, "bob"), ("nobody-0123456789abcdef", None), (None, None)]:
        calls.clear()
        assert tokens.identify(presented) == name
        assert len(calls) == 3  # the first entry matching does not end the loop
    assert tokens.names == ["alice", "bob", "carol"]
    assert TokenSet(TOKEN).names == ["default"]
    with pytest.raises(ValueError, match="16"):
        TokenSet({"alice": "short"})
