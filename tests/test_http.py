"""The HTTP API: a token on every call but health, a body size limit, an OpenAPI spec, reports as JSON or SR."""

import io

import pydicom
import pytest
import torch
from fastapi.testclient import TestClient

from medmm.config import DecodingConfig, ModelConfig, config_from_dict
from medmm.export.dicom_sr import read_report
from medmm.export.http import create_app, resolve_token
from medmm.export.study import ReportConfig, ReportPipeline
from medmm.model.multimodal import MedMMForCausalLM
from tests.conftest import model_dict

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def client(tiny_llm, tmp_path_factory):
    torch.manual_seed(0)
    m = MedMMForCausalLM.from_config(config_from_dict(ModelConfig, model_dict(tiny_llm)))
    ckpt = m.save_pretrained(tmp_path_factory.mktemp("ckpt") / "model")
    pipeline = ReportPipeline(ckpt, ReportConfig(decoding=DecodingConfig(max_new_tokens=6)))
    return TestClient(create_app(pipeline, TOKEN, max_request_bytes=100_000))


def _upload(path, name="a.dcm"):
    return [("files", (name, path.read_bytes(), "application/dicom"))]


def test_token_is_required(client, pydicom_files):
    assert client.get("/v1/health").json()["status"] == "ok"  # liveness only
    files = _upload(pydicom_files / "CT_small.dcm")
    assert client.post("/v1/studies/report", files=files).status_code == 401
    r = client.post("/v1/studies/report", files=files, headers={"Authorization": "Bearer wrong-token-0123456789"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.post("/v1/ask", json={"question": "q"}).status_code == 401


def test_report_as_json_and_as_sr(client, pydicom_files):
    src = pydicom.dcmread(pydicom_files / "MR_small.dcm")
    r = client.post("/v1/studies/report", files=_upload(pydicom_files / "MR_small.dcm"),
                    data={"question": "Which sequence?"}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["study_instance_uid"] == src.StudyInstanceUID and body["verification_flag"] == "UNVERIFIED"
    assert [s["op"] for s in body["steps"]] == ["load_study", "select_series", "infer", "write_sr"]
    r = client.post("/v1/studies/report?format=sr", files=_upload(pydicom_files / "MR_small.dcm"),
                    data={"question": "Which sequence?"}, headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
    rep = read_report(pydicom.dcmread(io.BytesIO(r.content)))
    assert rep["text"] == body["report"]  # greedy: the same study and question give the same report
    assert rep["question"] == "Which sequence?"
    assert rep["referenced_sop_instance_uids"] == [src.SOPInstanceUID]


def test_limits_and_typed_errors(client, pydicom_files):
    big = [("files", ("big.dcm", b"\0" * 150_000, "application/dicom"))]
    r = client.post("/v1/studies/report", files=big, headers=AUTH)
    assert r.status_code == 413
    r = client.post("/v1/studies/report", files=[("files", ("x.txt", b"hello", "text/plain"))], headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"]["error"] == "DicomError"
    assert "/tmp" not in r.text  # no server paths in answers
    # file inputs never come as server-side paths
    r = client.post("/v1/ask", json={"question": "q", "modalities": {"image": "/etc/passwd"}}, headers=AUTH)
    assert r.status_code == 422
    r = client.post("/v1/ask", json={"question": "q", "modalities": {"dna": "../x.fasta"}}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"]["error"] == "SequenceError"
    r = client.post("/v1/ask", json={"question": "q", "modalities": {"mol": "C(C)(C)(C)(C)C"}}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"]["error"] == "SmilesError"


def test_ask_and_closed_set(client):
    r = client.post("/v1/ask", json={"question": "drug?", "modalities": {"mol": "CCO"}, "max_new_tokens": 4},
                    headers=AUTH)
    assert r.status_code == 200 and r.json()["new_tokens"] <= 4
    r = client.post("/v1/ask", json={"question": "drug?", "modalities": {"mol": "CCO"}, "options": ["yes", "no"]},
                    headers=AUTH)
    probs = r.json()["probs"]
    assert set(probs) == {"yes", "no"} and abs(sum(probs.values()) - 1) < 1e-6


def test_openapi_spec(client):
    spec = client.get("/openapi.json").json()
    assert {"/v1/health", "/v1/studies/report", "/v1/ask"} <= set(spec["paths"])
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "security" in spec["paths"]["/v1/ask"]["post"] and "security" not in spec["paths"]["/v1/health"]["get"]


def test_token_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDMM_API_TOKEN", raising=False)
    with pytest.raises(ValueError, match="at least 16"):
        resolve_token()
    monkeypatch.setenv("MEDMM_API_TOKEN", "short")
    with pytest.raises(ValueError, match="at least 16"):
        resolve_token()
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    assert resolve_token(f) == TOKEN


def test_ask_with_strategies(client):
    body = {"question": "drug? drug?", "modalities": {"mol": "CCO"}, "max_new_tokens": 5}
    greedy = client.post("/v1/ask", json=body, headers=AUTH).json()
    for strategy, params in [("prompt_lookup", {"num_draft_tokens": 2}), ("contrastive_search", {"penalty_alpha": 0.0})]:
        r = client.post("/v1/ask", json={**body, "strategy": strategy, "params": params}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["answer"] == greedy["answer"] and r.json()["decoding"]["strategy"] == strategy
    r = client.post("/v1/ask", json={**body, "strategy": "beam", "params": {"num_beams": 2}}, headers=AUTH)
    assert r.status_code == 200 and r.json()["decoding"]["params"]["num_beams"] == 2
    for bad in [{"strategy": "greedy", "params": {"num_beams": 2}}, {"strategy": "nucleus"},
                {"strategy": "sample", "options": ["yes", "no"]}]:
        r = client.post("/v1/ask", json={**body, **bad}, headers=AUTH)
        assert r.status_code == 422 and r.json()["detail"]["error"] == "ConfigError", r.text


def test_concurrent_asks_are_batched_with_the_same_answers(client):
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{"question": q, "modalities": {"mol": m}, "max_new_tokens": 4}
              for q, m in [("drug?", "CCO"), ("toxic?", "c1ccccc1"), ("is it soluble in water?", "CCN"), ("q", "C")]]
    alone = [client.post("/v1/ask", json=b, headers=AUTH).json()["answer"] for b in bodies]
    batcher = client.app.state.batcher
    batcher.window_s = 0.5  # a wide window so the four concurrent requests meet
    before = len(batcher.batches)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda b: client.post("/v1/ask", json=b, headers=AUTH).json()["answer"], bodies))
    assert together == alone  # batched generate (left padding) answers as one request at a time does
    assert max(batcher.batches[before:]) > 1  # at least two requests shared one generate call
