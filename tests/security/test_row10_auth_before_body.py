"""Row 10: the body was parsed before the token was checked (unauthenticated malformed JSON got 422, an
unauthenticated chunked upload 400), an over-limit chunked body got 400 instead of 413, and a token sent in
``?token=`` was written to the access log.

Now an ASGI middleware answers 401 before any body byte is read, the size limit answers 413 itself, and the access
log never carries a query string."""

from __future__ import annotations

import logging

import httpx
import pytest

from medmm.serve.http import create_app
from tests.security._http_api import MULTIPART, multipart_upload, raw_exchange, zeros
from tests.security.conftest import AUTH, TOKEN, running

pytestmark = pytest.mark.integration

LIMIT = 64 << 10


@pytest.fixture(scope="module")
def small_url(sec_pipeline):
    """The API with a 64 KiB body limit."""
    with running(create_app(sec_pipeline, TOKEN, max_request_bytes=LIMIT, batching="off")) as url:
        yield url


def test_unauthenticated_malformed_json_is_401(small_url):
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
        r = httpx.post(f"{small_url}/v1/ask", content=b'{"question": ', headers={**headers,
                       "Content-Type": "application/json"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text


def test_unauthenticated_chunked_upload_is_401(small_url):
    r = httpx.post(f"{small_url}/v1/studies/report", content=multipart_upload(3 << 20), headers=MULTIPART,
                   timeout=30)
    assert r.status_code == 401


def test_the_401_comes_before_any_body_byte(small_url):
    """The request head announces a chunked body that never comes: the answer must not wait for it."""
    head = (b"POST /v1/studies/report HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: " + MULTIPART["Content-Type"].encode() + b"\r\n\r\n")
    status, _ = raw_exchange(small_url, head)
    assert status == 401


def test_an_over_limit_chunked_body_is_413(small_url):
    r = httpx.post(f"{small_url}/v1/studies/report", content=multipart_upload(4 * LIMIT), headers={**AUTH,
                   **MULTIPART}, timeout=30)
    assert r.status_code == 413, r.text
    r = httpx.post(f"{small_url}/v1/ask", content=zeros(4 * LIMIT), timeout=30,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    # the server goes on answering
    assert httpx.post(f"{small_url}/v1/ask", json={"question": "q", "max_new_tokens": 1}, headers=AUTH,
                      timeout=30).status_code == 200


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


def test_query_strings_never_reach_the_access_log(small_url):
    access = logging.getLogger("uvicorn.access")
    capture, level = _Capture(), access.level
    access.addHandler(capture)
    access.setLevel(logging.INFO)  # the suite serves at warning; a deployment logs access lines at info
    try:
        httpx.get(f"{small_url}/v1/health?token={TOKEN}&patient=DOE%5EJOHN")
        httpx.post(f"{small_url}/v1/ask?token={TOKEN}", json={"question": "q", "max_new_tokens": 1})
        httpx.post(f"{small_url}/v1/ask?access_token={TOKEN}", json={"question": "q", "max_new_tokens": 1},
                   headers=AUTH, timeout=30)
    finally:
        access.removeHandler(capture)
        access.setLevel(level)
    assert len(capture.lines) == 3, capture.lines  # the access log still has its lines
    assert any("/v1/health" in line for line in capture.lines)
    text = "\n".join(capture.lines)
    assert TOKEN not in text and "DOE" not in text and "token=" not in text
