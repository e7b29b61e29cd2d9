"""Shared fixtures of the attack suite: a tiny checkpoint, its report pipeline, and real servers on loopback.

Every file here is one row of the security issue (``test_rowNN_*.py``) or one probe a hospital's security review
runs (TLS, tokens, rate limits, audit log, API docs). The servers are the real ones: uvicorn serving
:func:`medmm.serve.http.create_app` on 127.0.0.1 (in a thread of the test process, so the model loads once), and
the DIMSE listener with pynetdicom; attacks go through real sockets (httpx, dcmtk, raw TCP).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import torch

from medmm.config import DecodingConfig, ModelConfig, config_from_dict
from tests.conftest import model_dict

TOKEN = "security-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", **uvicorn_kwargs):
    """Serve ``app`` with a real uvicorn server on loopback in a thread; yields its base URL (http or https)."""
    import uvicorn

    port = free_port()
    cfg = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", **uvicorn_kwargs)
    server = uvicorn.Server(cfg)
    thread = threading.Thread(target=server.run, name="uvicorn-security", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    scheme = "https" if uvicorn_kwargs.get("ssl_certfile") else "http"
    try:
        yield f"{scheme}://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture(scope="session")
def sec_checkpoint(tiny_llm, tmp_path_factory):
    """A tiny randomly initialised model over every foundation modality (mechanics only)."""
    from medmm.model.multimodal import MedMMForCausalLM

    torch.manual_seed(0)
    m = MedMMForCausalLM.from_config(config_from_dict(ModelConfig, model_dict(tiny_llm)))
    return m.save_pretrained(tmp_path_factory.mktemp("sec_ckpt") / "model")


@pytest.fixture(scope="session")
def sec_pipeline(sec_checkpoint):
    """One loaded :class:`ReportPipeline` shared by every server the suite starts."""
    from medmm.serve.study import ReportConfig, ReportPipeline

    return ReportPipeline(sec_checkpoint, ReportConfig(decoding=DecodingConfig(max_new_tokens=4)))


@pytest.fixture(scope="session")
def api_url(sec_pipeline):
    """The HTTP API with default settings (one token, window-less batching), served by uvicorn on loopback."""
    from medmm.serve.http import create_app

    with running(create_app(sec_pipeline, TOKEN, max_request_bytes=4 << 20, batching="off")) as url:
        yield url
