"""Probe: a rate limit per token (``--rate-limit N/min``): beyond it 429 with ``Retry-After``, before the body is
read; each token has its own budget, and requests without a valid token spend none."""

from __future__ import annotations

import httpx
import pytest

from medmm.serve.http import create_app, parse_rate_limit
from tests.security._http_api import raw_exchange
from tests.security.conftest import running

pytestmark = pytest.mark.integration

ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-fedcba9876543210"
N = 3


@pytest.fixture(scope="module")
def url(sec_pipeline):
    app = create_app(sec_pipeline, {"alice": ALICE, "bob": BOB}, batching="off", rate_limit=f"{N}/min")
    with running(app) as url:
        yield url


def _post(url, token):
    # an authenticated request the model never sees (an empty question is a 422): cheap, and it counts
    return httpx.post(f"{url}/v1/ask", json={"question": ""}, headers={"Authorization": f"Bearer {token}"})


def test_beyond_the_limit_is_429_with_retry_after(url):
    for _ in range(2 * N):  # wrong tokens spend no one's budget
        assert _post(url, "mallory-0123456789abcdef").status_code == 401
    assert [_post(url, ALICE).status_code for _ in range(N)] == [422] * N
    r = _post(url, ALICE)
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
    assert _post(url, BOB).status_code == 422  # bob has his own budget
    assert httpx.get(f"{url}/v1/health").status_code == 200  # liveness is not limited
    # the 429 comes before the body: a chunked body announced and never sent does not hold it up
    head = (f"POST /v1/ask HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ALICE}\r\n"
            "Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n").encode()
    status, raw = raw_exchange(url, head)
    assert status == 429 and b"retry-after" in raw.lower()


def test_parse_rate_limit():
    assert parse_rate_limit("60/min") == (60, 60.0) and parse_rate_limit(" 5 / s ") == (5, 1.0)
    assert parse_rate_limit("120/hour") == (120, 3600.0)
    for bad in ["0/min", "abc", "10", "-1/min", "10/day", "1.5/min"]:
        with pytest.raises(ValueError, match="rate"):
            parse_rate_limit(bad)


def test_token_guessing_is_throttled_per_address(sec_pipeline):
    """Wrong tokens spend no token's budget, but one address may fail only ``auth_failure_limit`` times a window:
    then every further failure is a 429 until the window has passed; a right token still gets in, health stays open."""
    app = create_app(sec_pipeline, {"alice": ALICE}, batching="off", auth_failure_limit="4/min")
    with running(app) as url:
        guesses = [_post(url, f"guess-{i:02d}-0123456789abcdef").status_code for i in range(6)]
        assert guesses == [401] * 4 + [429] * 2
        r = _post(url, ALICE)
        assert r.status_code == 422  # a right token is not a failure: it still gets in
        r = httpx.post(f"{url}/v1/ask", json={"question": ""})  # no token at all counts as a failure too
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
        assert httpx.get(f"{url}/v1/health").status_code == 200
