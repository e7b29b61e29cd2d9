"""Probe: ``/docs``, ``/redoc`` and ``/openapi.json`` are off by default (404) and, with ``docs=True``
(``--docs``), served behind the token; ``medmm pacs http --openapi spec.json`` still writes the spec."""

from __future__ import annotations

import json

import httpx
import pytest

from medmm.serve.http import create_app
from tests.security.conftest import AUTH, TOKEN, running

pytestmark = pytest.mark.integration

DOCS = ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")


def test_docs_are_off_by_default(api_url):
    for path in DOCS:
        assert httpx.get(api_url + path).status_code == 404, path
        assert httpx.get(api_url + path, headers=AUTH).status_code == 404, path


def test_docs_behind_the_token(sec_pipeline):
    with running(create_app(sec_pipeline, TOKEN, batching="off", docs=True)) as url:
        for path in DOCS:
            assert httpx.get(url + path).status_code == 401, path
            assert httpx.get(url + path, headers=AUTH).status_code == 200, path
        spec = httpx.get(f"{url}/openapi.json", headers=AUTH).json()
        assert {"/v1/health", "/v1/studies/report", "/v1/ask"} <= set(spec["paths"])


def test_the_openapi_command_writes_the_spec(sec_checkpoint, tmp_path, monkeypatch):
    from medmm.cli import main as cli_main

    monkeypatch.setenv("MEDMM_API_TOKEN", TOKEN)
    out = tmp_path / "spec.json"
    cli_main(["pacs", "http", "--checkpoint", str(sec_checkpoint), "--openapi", str(out)])
    spec = json.loads(out.read_text())
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "security" in spec["paths"]["/v1/ask"]["post"] and "security" not in spec["paths"]["/v1/health"]["get"]
