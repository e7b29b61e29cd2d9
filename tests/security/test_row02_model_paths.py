"""Row 2: ``/v1/ask`` made the server load a helper model (speculative ``draft``, contrastive ``amateur``) from any
folder the client named; 422 vs 500 told whether a path existed, and spellings of one folder multiplied the loads.

Now a helper model over HTTP is only a NAME from the operator's allow-list (``--helper-model NAME=PATH``), loaded
once at start-up; any other value is the same 422, and the Predictor's cache is keyed by the folder's real path.
"""

from __future__ import annotations

import shutil

import httpx
import pytest

from medmm.serve.http import create_app
from tests.security.conftest import AUTH, TOKEN, running

pytestmark = pytest.mark.integration


@pytest.fixture
def loads(monkeypatch):
    """Every folder ``AutoModelForCausalLM.from_pretrained`` is asked to load, in order."""
    from transformers import AutoModelForCausalLM

    seen: list[str] = []
    real = AutoModelForCausalLM.from_pretrained

    def counting(path, *args, **kwargs):
        seen.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counting)
    return seen


def _ask(url, strategy, params):
    body = {"question": "drug?", "max_new_tokens": 3, "strategy": strategy, "params": params}
    return httpx.post(f"{url}/v1/ask", json=body, headers=AUTH, timeout=60)


def test_a_helper_model_path_is_refused_alike_whether_it_exists_or_not(api_url, tiny_llm, sec_checkpoint, loads):
    answers = []
    for strategy, name in [("speculative", "draft"), ("contrastive", "amateur")]:
        for value in [str(tiny_llm), str(tiny_llm) + "/", str(sec_checkpoint), "/nonexistent/medmm-draft",
                      "../../etc", "tiny"]:
            r = _ask(api_url, strategy, {name: value})
            answers.append((strategy, r.status_code, r.text))
            assert r.status_code == 422, (value, r.text)
    assert loads == []  # nothing was loaded, whatever the folder
    for strategy in ("speculative", "contrastive"):  # one body per strategy: it says nothing about the value
        assert len({text for s, _, text in answers if s == strategy}) == 1
    assert str(tiny_llm) not in answers[0][2] and "/nonexistent" not in answers[0][2]


def test_an_allow_listed_name_is_loaded_once_at_start_up(sec_pipeline, tiny_llm, loads):
    app = create_app(sec_pipeline, TOKEN, batching="off", helper_models={"tiny": str(tiny_llm)})
    assert len(loads) <= 1  # loaded at start-up (none when an earlier app of this predictor already had it)
    at_start = list(loads)
    with running(app) as url:
        greedy = httpx.post(f"{url}/v1/ask", json={"question": "drug?", "max_new_tokens": 3}, headers=AUTH,
                            timeout=60).json()
        for params in ({"draft": "tiny"}, {"draft": "tiny", "backend": "medmm"}):
            r = _ask(url, "speculative", params)
            assert r.status_code == 200, r.text
            assert r.json()["answer"] == greedy["answer"]  # speculative decoding is exact
        assert _ask(url, "contrastive", {"amateur": "tiny", "cd_beta": 0.0}).status_code == 200
        refused = _ask(url, "speculative", {"draft": "other"})
        assert refused.status_code == 422 and "tiny" in refused.text  # the 422 lists the names it may use
        assert _ask(url, "speculative", {"draft": str(tiny_llm)}).text == refused.text  # its path is no name
    assert loads == at_start  # requests load nothing


def test_spellings_of_one_folder_load_it_once(sec_pipeline, tiny_llm, tmp_path, loads):
    from medmm.inference.strategies import get_strategy

    folder = tmp_path / "models" / "draft"
    shutil.copytree(tiny_llm, folder)
    (tmp_path / "link").symlink_to(folder)
    spellings = [str(folder), f"{folder}/", str(tmp_path / "models" / "." / "draft"),
                 str(tmp_path / "models" / "draft" / ".." / "draft"), str(tmp_path / "link")]
    p = sec_pipeline.predictor
    got = [p.aux_models(get_strategy("speculative"), {"draft": s})["draft"] for s in spellings]
    assert len(loads) == 1 and all(m is got[0] for m in got)
