"""Probe: TLS for the HTTP API (``--tls-cert``, ``--tls-key``, and ``--tls-ca`` for client certificates).

One server with client certificates required: HTTPS with a certificate the CA signed works, plain HTTP to the TLS
port and HTTPS without a client certificate are refused. The server warns when it binds a non-loopback address
without TLS, and the command's flags (TLS, named tokens, rate limit, audit log, docs, helper models) reach the app
and uvicorn."""

from __future__ import annotations

import logging
import ssl
import stat

import httpx
import pytest

from medmm.serve.http import create_app, server_options, tls_options
from tests.security._http_api import make_pki
from tests.security.conftest import AUTH, TOKEN, running

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _client(pki, with_cert: bool) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(pki["ca.pem"]))
    if with_cert:
        ctx.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
    return httpx.Client(verify=ctx, timeout=30)


def test_https_with_client_certificates(sec_pipeline, pki):
    tls = tls_options(pki["server.pem"], pki["server.key"], pki["ca.pem"])
    assert tls["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    with running(create_app(sec_pipeline, TOKEN, batching="off"), **tls) as url:
        assert url.startswith("https://")
        with _client(pki, with_cert=True) as c:
            assert c.get(f"{url}/v1/health").status_code == 200
            r = c.post(f"{url}/v1/ask", json={"question": "q", "max_new_tokens": 1}, headers=AUTH)
            assert r.status_code == 200
        with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS port
            httpx.get(url.replace("https://", "http://") + "/v1/health", timeout=10)
        with _client(pki, with_cert=False) as c, pytest.raises(httpx.TransportError):  # no client certificate
            c.get(f"{url}/v1/health")


def test_tls_options_are_checked(pki):
    assert "ssl_cert_reqs" not in tls_options(pki["server.pem"], pki["server.key"])  # no CA: no client certs
    assert tls_options(None, None) == {}
    for bad in [(pki["server.pem"], None), (None, pki["server.key"]), (None, None, pki["ca.pem"]),
                (pki["server.pem"], pki["server.key"].with_name("missing.key"))]:
        with pytest.raises(ValueError, match="tls"):
            tls_options(*bad)


def test_a_network_bind_without_tls_warns(pki, caplog):
    with caplog.at_level(logging.WARNING, logger="medmm.http"):
        opts = server_options("0.0.0.0", 8443)
    assert opts["host"] == "0.0.0.0" and "ssl_certfile" not in opts
    assert any("without TLS" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medmm.http"):
        server_options("0.0.0.0", 8443, pki["server.pem"], pki["server.key"])
        server_options("127.0.0.1", 8080)
    assert not caplog.records


def test_the_command_flags_reach_the_app_and_uvicorn(sec_checkpoint, tiny_llm, pki, tmp_path, monkeypatch):
    import uvicorn

    from medmm.cli import main as cli_main

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    monkeypatch.delenv("MEDMM_API_TOKEN", raising=False)
    alice = "alice-token-0123456789abcdef"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# name token\nalice {alice}\n")
    tokens.chmod(0o600)
    audit = tmp_path / "logs" / "audit.jsonl"
    cli_main(["pacs", "http", "--checkpoint", str(sec_checkpoint), "--batching", "off", "--port", "9443",
              "--tokens-file", str(tokens), "--rate-limit", "2/min", "--audit-log", str(audit), "--docs",
              "--tls-cert", str(pki["server.pem"]), "--tls-key", str(pki["server.key"]), "--tls-ca", str(pki["ca.pem"]),
              "--helper-model", f"tiny={tiny_llm}"])
    assert served["ssl_certfile"] == str(pki["server.pem"]) and served["ssl_keyfile"] == str(pki["server.key"])
    assert served["ssl_ca_certs"] == str(pki["ca.pem"]) and served["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert served["host"] == "127.0.0.1" and served["port"] == 9443
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600
    with running(served["app"]) as url:  # the app the command built, served here without TLS
        auth = {"Authorization": f"Bearer {alice}"}
        assert httpx.get(f"{url}/openapi.json", headers=auth).status_code == 200  # --docs
        ask = {"question": "q", "max_new_tokens": 1, "strategy": "speculative", "params": {"draft": "tiny"}}
        assert httpx.post(f"{url}/v1/ask", json=ask, headers=auth, timeout=30).status_code == 200  # --helper-model
        assert httpx.get(f"{url}/openapi.json", headers=auth).status_code == 429  # --rate-limit 2/min
        assert httpx.get(f"{url}/openapi.json", headers=AUTH).status_code == 401  # --tokens-file replaced the token
    assert [line.count('"token_name": "alice"') for line in audit.read_text().splitlines()] == [1, 1, 1, 0]
    with pytest.raises(SystemExit, match="tokens-file"):
        cli_main(["pacs", "http", "--checkpoint", str(sec_checkpoint), "--tokens-file", str(tokens),
                  "--token-file", str(tokens)])
