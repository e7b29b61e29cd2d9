"""Probe: the audit log (``--audit-log FILE``): one JSON line per request, 401/413/429 included, with ``time``,
``token_name``, ``endpoint``, ``status``, ``bytes`` and ``duration_s``; never a token, a query string, a body or
anything else a client sent; the file is created 0600."""

from __future__ import annotations

import json
import stat

import httpx
import pytest

from medmm.serve.http import create_app
from tests.security._http_api import zeros
from tests.security.conftest import running

pytestmark = pytest.mark.integration

ALICE = "alice-token-0123456789abcdef"
SECRET = "DOE^JOHN-1980-02-31"  # stands for PHI a client sends: in a query, a body, a header, a path


def test_one_line_per_request_and_nothing_sent(sec_pipeline, tmp_path):
    log = tmp_path / "audit" / "audit.jsonl"
    app = create_app(sec_pipeline, {"alice": ALICE}, batching="off", rate_limit="4/min", audit_log=log,
                     max_request_bytes=32 << 10)
    assert stat.S_IMODE(log.stat().st_mode) == 0o600  # created before the first request
    auth = {"Authorization": f"Bearer {ALICE}"}
    body = {"question": f"Is {SECRET} ill?", "max_new_tokens": 1}
    raw = json.dumps(body).encode()
    with running(app) as url:
        sent = [
            httpx.get(f"{url}/v1/health?patient={SECRET}"),  # 200, no token
            httpx.post(f"{url}/v1/ask?token={ALICE}", json=body),  # 401: a token in the query is no token
            httpx.post(f"{url}/v1/ask", json=body, headers={"Authorization": f"Bearer {SECRET}-0123456789"}),
            httpx.post(f"{url}/v1/ask?mrn={SECRET}", content=raw, timeout=30,
                       headers={**auth, "Content-Type": "application/json"}),  # 200
            httpx.post(f"{url}/v1/ask", content=zeros(64 << 10), timeout=30,
                       headers={**auth, "Content-Type": "application/json"}),  # 413 (chunked)
            httpx.post(f"{url}/v1/ask", json={"question": ""}, headers={**auth, "X-Patient": SECRET}),  # 422
            httpx.get(f"{url}/v1/{SECRET}", headers=auth),  # 404
            httpx.post(f"{url}/v1/ask", json=body, headers=auth),  # 429
        ]
    assert [r.status_code for r in sent] == [200, 401, 401, 200, 413, 422, 404, 429]
    text = log.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert [x["status"] for x in lines] == [r.status_code for r in sent]
    for x in lines:
        assert {"time", "token_name", "endpoint", "status", "bytes", "duration_s"} <= set(x)
        assert x["duration_s"] >= 0
    assert [x["token_name"] for x in lines] == [None, None, None, "alice", "alice", "alice", "alice", "alice"]
    assert [x["endpoint"] for x in lines[:6]] == ["/v1/health"] + ["/v1/ask"] * 5
    assert lines[0]["bytes"] == 0 and lines[3]["bytes"] == len(raw)
    assert lines[1]["bytes"] == 0 and lines[7]["bytes"] == 0  # refused before the body was read
    assert 32 << 10 < lines[4]["bytes"] <= 64 << 10  # read up to the limit, then refused
    for secret in (SECRET, "DOE", ALICE, "token=", "mrn", "?"):
        assert secret not in text
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
