"""The HTTP API: a token on every call but health, a body size limit, an OpenAPI spec, reports as JSON or SR."""

import io
import threading

import pydicom
import pytest
import torch
from fastapi.testclient import TestClient

from medmm.config import DecodingConfig, ModelConfig, config_from_dict
from medmm.model.multimodal import MedMMForCausalLM
from medmm.serve.dicom_sr import read_report
from medmm.serve.http import create_app, resolve_token
from medmm.serve.study import ReportConfig, ReportPipeline
from tests.conftest import model_dict

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def client(tiny_llm, tmp_path_factory):
    torch.manual_seed(0)
    m = MedMMForCausalLM.from_config(config_from_dict(ModelConfig, model_dict(tiny_llm)))
    ckpt = m.save_pretrained(tmp_path_factory.mktemp("ckpt") / "model")
    pipeline = ReportPipeline(ckpt, ReportConfig(decoding=DecodingConfig(max_new_tokens=6)))
    with TestClient(create_app(pipeline, TOKEN, max_request_bytes=100_000)) as client:  # shutdown stops the batcher
        yield client


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
    assert client.get("/openapi.json").status_code == 404  # not served by default (create_app(docs=True) serves it)
    spec = client.app.openapi()
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


# ----------------------------------------------------------------------------- continuous batching of /v1/ask
QUESTIONS = ["What is the imaging modality?", "Is there an abnormality in the left lung field near the heart?", "q",
             "Describe the findings.", "Is the lesion enhancing after contrast?", "Which organ is shown here?"]


@pytest.fixture(scope="module")
def cb_pipeline(tiny_llm, tmp_path_factory):
    """A pipeline whose LLM ends its answers at varied lengths: the end-of-turn row of the output layer copies the
    row of a token greedy decoding often picks (slightly scaled up), so EOS wins wherever that token would."""
    import collections

    torch.manual_seed(0)
    m = MedMMForCausalLM.from_config(config_from_dict(ModelConfig, model_dict(tiny_llm)))
    ckpt = m.save_pretrained(tmp_path_factory.mktemp("cb") / "model")
    pipeline = ReportPipeline(ckpt, ReportConfig(decoding=DecodingConfig(max_new_tokens=6)))
    p = pipeline.predictor
    counts = collections.Counter()
    for q in QUESTIONS:
        ids = p.processor.process_prompt(p.to_conversation({"question": q}))["input_ids"][None]
        new = p.model.llm.generate(input_ids=ids, max_new_tokens=24, do_sample=False, eos_token_id=None,
                                   pad_token_id=p.tokenizer.pad_token_id)[0, ids.shape[1]:]
        counts.update(new[2:].tolist())  # not the first tokens: answers of at least a few tokens
    head = p.model.llm.get_output_embeddings().weight
    with torch.no_grad():
        head[p.tokenizer.eos_token_id] = head[counts.most_common(1)[0][0]] * 1.05
    return pipeline


def _reference(pipeline, bodies):
    """Predictor.predict greedy answers, one request at a time."""
    p = pipeline.predictor
    return [p.predict([{"id": "ask", "question": b["question"]}], DecodingConfig(max_new_tokens=b["max_new_tokens"]))[0]
            for b in bodies]


def _together(client, bodies, n_running):
    """POST ``bodies`` concurrently with the continuous loop paused until all of them are in it, so they are decoded
    in one running batch (no timing involved)."""
    from concurrent.futures import ThreadPoolExecutor

    batcher = client.app.state.batcher
    with ThreadPoolExecutor(len(bodies)) as pool:
        with batcher.exclusive():
            futures = [pool.submit(client.post, "/v1/ask", json=b, headers=AUTH) for b in bodies]
            while batcher.continuous.running < n_running and not any(f.done() for f in futures):
                threading.Event().wait(0.01)
        return [f.result() for f in futures]


def test_continuous_batching_equals_predictor_greedy(cb_pipeline):
    bodies = [{"question": q, "max_new_tokens": n} for q, n in zip(QUESTIONS, [24, 5, 24, 12, 24, 3])]
    ref = _reference(cb_pipeline, bodies)
    assert any(r["new_tokens"] < b["max_new_tokens"] for r, b in zip(ref, bodies))  # some end at EOS
    assert any(r["new_tokens"] == b["max_new_tokens"] for r, b in zip(ref, bodies))  # some are cut
    assert len({r["new_tokens"] for r in ref}) >= 3  # of different lengths
    with TestClient(create_app(cb_pipeline, TOKEN)) as client:  # the context runs the app's shutdown
        batcher = client.app.state.batcher
        assert batcher.mode == "continuous"
        rs = _together(client, bodies, len(bodies))
        assert [r.status_code for r in rs] == [200] * len(bodies), [r.text for r in rs]
        got = [r.json() for r in rs]
        assert [g["answer"] for g in got] == [r["answer"] for r in ref]
        assert [g["new_tokens"] for g in got] == [r["new_tokens"] for r in ref]
        assert {g["batching"] for g in got} == {"continuous"}
        assert max(batcher.continuous.running_together) == len(bodies) and batcher.continuous.retried == 0
        again = client.post("/v1/ask", json=bodies[0], headers=AUTH).json()  # alone, later: the same answer
        assert again["answer"] == ref[0]["answer"]
        mgr = batcher.continuous.manager
    assert not mgr.is_running() and batcher.continuous.eligible({"question": "q"}, DecodingConfig()) is not None


def test_requests_continuous_batching_cannot_honour_take_the_window(cb_pipeline):
    with TestClient(create_app(cb_pipeline, TOKEN)) as client:
        def path(**body):
            r = client.post("/v1/ask", json={"question": "Is there an abnormality?", "max_new_tokens": 4, **body},
                            headers=AUTH)
            assert r.status_code == 200, r.text
            return r.json()["batching"]

        assert path() == "continuous"
        assert path(strategy="sample", params={"temperature": 0.0}) == "continuous"  # greedy by another name
        assert path(modalities={"mol": "CCO"}) == "window"
        assert path(options=["yes", "no"]) == "window"
        assert path(strategy="greedy", params={"repetition_penalty": 1.3}) == "window"
        assert path(strategy="sample", params={"temperature": 0.7}) == "window"
        assert path(strategy="beam", params={"num_beams": 2}) == "window"
        assert client.app.state.batcher.served == {"continuous": 2, "window": 5}


def test_batching_modes_and_where_continuous_batching_is_not_available(cb_pipeline):
    for mode, expected in [("window", "window"), ("off", "off")]:
        with TestClient(create_app(cb_pipeline, TOKEN, batching=mode)) as client:
            assert client.app.state.batcher.continuous is None
            r = client.post("/v1/ask", json={"question": "q", "max_new_tokens": 3}, headers=AUTH)
            assert r.json()["batching"] == expected
    with pytest.raises(ValueError, match="batching"):
        create_app(cb_pipeline, TOKEN, batching="static")
    llm = cb_pipeline.predictor.model.llm
    llm.set_attn_implementation("eager")  # HF would switch it to a paged one under the window path's feet
    try:
        with TestClient(create_app(cb_pipeline, TOKEN)) as client:
            batcher = client.app.state.batcher
            assert batcher.mode == "window" and "attention" in batcher.continuous_refused
            r = client.post("/v1/ask", json={"question": "q", "max_new_tokens": 3}, headers=AUTH)
            assert r.json()["batching"] == "window"
    finally:
        llm.set_attn_implementation("sdpa")
    from medmm.inference.continuous import ContinuousDecoder

    dec = ContinuousDecoder(cb_pipeline.predictor, max_running=2, max_tokens=32)
    try:  # prompt + max_new_tokens over the per-request cache budget: handed back to the caller
        assert dec.submit({"question": "Is there an abnormality?"}, DecodingConfig(max_new_tokens=30)) is None
        assert dec.submit({"question": "q"}, DecodingConfig(max_new_tokens=2))["engine"] == "hf_continuous"
    finally:
        dec.close()


def test_a_failing_request_fails_only_itself(cb_pipeline):
    """A forward that fails on one request's prompt fails the whole continuous step (and stops HF's loop): the
    others are decoded again alone with the same answers, the failing one gets a 500, and the loop restarts."""
    p = cb_pipeline.predictor
    bodies = [{"question": q, "max_new_tokens": 8} for q in QUESTIONS[:3]]
    poison_q = "zebra xylophone quokka"

    def prompt(q):
        return p.processor.process_prompt(p.to_conversation({"question": q}))["input_ids"].tolist()

    others = {t for b in bodies for t in prompt(b["question"])}
    poison = next(t for t in prompt(poison_q) if t not in others)
    ref = _reference(cb_pipeline, bodies)

    def hook(module, args):
        if (args[0] == poison).any():
            raise RuntimeError("poisoned input")

    handle = p.model.llm.get_input_embeddings().register_forward_pre_hook(hook)
    try:
        with TestClient(create_app(cb_pipeline, TOKEN), raise_server_exceptions=False) as client:
            batcher = client.app.state.batcher
            rs = _together(client, [{"question": poison_q, "max_new_tokens": 8}, *bodies], 4)
            assert rs[0].status_code == 500
            assert [r.status_code for r in rs[1:]] == [200] * 3
            assert [r.json()["answer"] for r in rs[1:]] == [r["answer"] for r in ref]
            assert batcher.continuous.retried == 4
            r = client.post("/v1/ask", json=bodies[0], headers=AUTH)  # the loop is back
            assert r.json()["batching"] == "continuous" and r.json()["answer"] == ref[0]["answer"]
            assert batcher.continuous.retried == 4
        with TestClient(create_app(cb_pipeline, TOKEN, batching="window"), raise_server_exceptions=False) as client:
            from concurrent.futures import ThreadPoolExecutor

            client.app.state.batcher.window_s = 0.5  # a wide window: they may share a predict call
            with ThreadPoolExecutor(4) as pool:  # a failed window call is run again request by request
                rs = list(pool.map(lambda b: client.post("/v1/ask", json=b, headers=AUTH),
                                   [{"question": poison_q, "max_new_tokens": 8}, *bodies]))
            assert [r.status_code for r in rs] == [500, 200, 200, 200]
            assert [r.json()["answer"] for r in rs[1:]] == [r["answer"] for r in ref]
    finally:
        handle.remove()
