"""infer.py on every input kind (DICOM file and series, JPEG, SMILES, FASTA), decoding options, manifests."""

import json

import pytest
import torch

from infer import main as infer_main
from medmm.config import DecodingConfig, ModelConfig, config_from_dict
from medmm.inference.predictor import Predictor, generation_kwargs
from medmm.model.multimodal import MedMMForCausalLM
from tests.conftest import SAMPLE, model_dict


@pytest.fixture(scope="module")
def checkpoint(tiny_llm, tmp_path_factory):
    torch.manual_seed(0)
    m = MedMMForCausalLM.from_config(config_from_dict(ModelConfig, model_dict(tiny_llm)))
    return m.save_pretrained(tmp_path_factory.mktemp("ckpt") / "model")


def test_every_input_kind(checkpoint, pydicom_files, shared_data, capsys):
    img = next((SAMPLE / "vqa_rad" / "images").glob("*.jpg"))
    cases = [
        ["--input", str(pydicom_files / "CT_small.dcm")],
        ["--input", str(img)],
        ["--input", "CC(=O)Oc1ccccc1C(=O)O"],
        ["--input", str(SAMPLE / "dna" / "FGFR2_AHCYL1_sample.fasta")],
        ["--input", str(shared_data / "dicom" / "ct_series_head_GE_tilt")],  # a series folder -> volume
        ["--dna", "ACGTACGTNNACGT"],
    ]
    for args in cases:
        out = infer_main(["--checkpoint", str(checkpoint), *args, "--question", "What is it?", "--max-new-tokens", "4"])
        assert len(out) == 1 and "error" not in out[0], out
        assert isinstance(out[0]["answer"], str) and out[0]["new_tokens"] <= 4
        printed = json.loads(capsys.readouterr().out)
        assert printed["answer"] == out[0]["answer"]


def test_bad_input_is_a_typed_error(checkpoint, capsys):
    out = infer_main(["--checkpoint", str(checkpoint), "--smiles", "C(C)(C)(C)(C)C", "--question", "q"])
    assert out[0]["error"] == "SmilesError" and "alence" in out[0]["message"]


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_decoding_strategies(checkpoint, strategy):
    p = Predictor(checkpoint)
    params = {"greedy": {}, "beam": {"num_beams": 3}, "sample": {"temperature": 0.9, "top_k": 20, "top_p": 0.9}}
    d = DecodingConfig(strategy=strategy, max_new_tokens=6, seed=1,
                       params={**params[strategy], "repetition_penalty": 1.2, "no_repeat_ngram_size": 2})
    reqs = [{"id": "a", "modalities": {"mol": "CCO"}, "question": "drug?"}]
    a = p.predict(reqs, d)[0]
    b = p.predict(reqs, d)[0]
    assert a["answer"] == b["answer"]  # seeded sampling is reproducible too
    assert a["decoding"]["strategy"] == strategy


def test_temperature_zero_is_greedy():
    assert generation_kwargs(DecodingConfig(strategy="sample", params={"temperature": 0}))["do_sample"] is False
    kw = generation_kwargs(DecodingConfig(strategy="beam", params={"num_beams": 5, "length_penalty": 0.7}))
    assert kw["num_beams"] == 5 and kw["length_penalty"] == 0.7


def test_manifest_keeps_every_row(checkpoint, tmp_path, pydicom_files):
    rows = [
        {"id": "ok1", "modalities": {"image": str(pydicom_files / "MR_small.dcm")}, "question": "modality?"},
        {"id": "bad", "modalities": {"image": str(pydicom_files / "MR_truncated.dcm")}, "question": "modality?"},
        {"id": "ok2", "modalities": {"mol": "CCO"}, "question": "drug?"},
        {"id": "longer", "question": "a text-only question that is longer than the others, with more words"},
    ]
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o.jsonl"
    infer_main(["--checkpoint", str(checkpoint), "--manifest", str(man), "--out", str(out), "--batch-size", "2"])
    res = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in res] == ["ok1", "bad", "ok2", "longer"]
    assert res[1]["error"] == "DicomError" and "MR_truncated.dcm" in res[1]["message"]
    assert all("answer" in r for i, r in enumerate(res) if i != 1)


def test_batched_equals_single(checkpoint):
    p = Predictor(checkpoint)
    reqs = [{"id": str(i), "modalities": {"mol": s}, "question": q}
            for i, (s, q) in enumerate([("CCO", "drug?"), ("c1ccccc1", "is this aromatic and is it a drug at all?")])]
    batched = p.predict(reqs, DecodingConfig(max_new_tokens=6), batch_size=2)
    single = [p.predict([r], DecodingConfig(max_new_tokens=6))[0] for r in reqs]
    assert [b["answer"] for b in batched] == [s["answer"] for s in single]


def test_session_requests_closed_set_and_several_questions(checkpoint, capsys):
    out = infer_main(["--checkpoint", str(checkpoint), "--smiles", "CCO", "--question", "drug?", "--options", "yes,no"])
    assert set(out[0]["probs"]) == {"yes", "no"} and sum(out[0]["probs"].values()) == pytest.approx(1.0)
    out = infer_main(["--checkpoint", str(checkpoint), "--smiles", "CCO", "--question", "Is it a drug?",
                      "--question", "Is it toxic?", "--max-new-tokens", "4"])
    answers = out[0]["answers"]
    assert [a["question"] for a in answers] == ["Is it a drug?", "Is it toxic?"]
    assert answers[1]["reused_prefix_tokens"] > 0


def test_strategy_flags(checkpoint, tiny_llm, capsys):
    base = ["--checkpoint", str(checkpoint), "--smiles", "CCO", "--question", "drug?", "--max-new-tokens", "6"]
    greedy = infer_main(base)[0]["answer"]
    assert infer_main(base + ["--strategy", "speculative", "--draft", str(tiny_llm)])[0]["answer"] == greedy
    assert infer_main(base + ["--strategy", "prompt_lookup"])[0]["answer"] == greedy
    assert "answer" in infer_main(base + ["--strategy", "contrastive", "--amateur", str(tiny_llm)])[0]
    assert "answer" in infer_main(base + ["--strategy", "contrastive_search", "--penalty-alpha", "0.5"])[0]
    streamed = infer_main(base + ["--stream"])[0]
    assert streamed["answer"] == greedy
    assert capsys.readouterr().err.strip().endswith(greedy) if greedy else True
    with pytest.raises(SystemExit, match="draft"):
        infer_main(base + ["--strategy", "speculative"])


def test_pick_device():
    from medmm.inference.predictor import pick_device

    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            pick_device("cuda")


# ----------------------------------------------------------------------------- every strategy through every path
def _conversation_rows(pydicom_files):
    return [
        {"id": "llava", "modalities": {"mol": "CCO"}, "conversations": [
            {"from": "human", "value": "<mol>\nIs this drug-like? Is it toxic?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "q", "modalities": {"image": str(pydicom_files / "MR_small.dcm")}, "question": "modality?"},
        {"id": "text", "question": "a text-only question, a text-only question"},
    ]


STRATEGY_FLAGS = {
    "greedy": [], "beam": ["--num-beams", "2"], "sample": ["--temperature", "0.8"],
    "prompt_lookup": [], "contrastive_search": ["--penalty-alpha", "0.5"],
}


@pytest.mark.parametrize("strategy", sorted(STRATEGY_FLAGS) + ["speculative", "contrastive",
                                                               "speculative_sampling"])
def test_every_strategy_through_manifest_forms(checkpoint, tiny_llm, tmp_path, pydicom_files, strategy):
    from medmm.inference.strategies import get_strategy

    flags = {**STRATEGY_FLAGS, "speculative": ["--draft", str(tiny_llm)], "contrastive": ["--amateur", str(tiny_llm)],
             "speculative_sampling": ["--draft", str(tiny_llm)]}[strategy]
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in _conversation_rows(pydicom_files)))
    out = infer_main(["--checkpoint", str(checkpoint), "--manifest", str(man), "--max-new-tokens", "5",
                      "--strategy", strategy, *flags])
    by_id = {o["id"]: o for o in out}
    s = get_strategy(strategy)
    if s.hf_text_only and s.start is None:  # HF-only, text-only: modality rows are errors, never greedy in disguise
        assert by_id["llava"]["error"] == "ConfigError" and by_id["q"]["error"] == "ConfigError"
        assert by_id["text"]["engine"] == "hf"
        return
    assert all("error" not in o for o in out), out
    assert all(o["decoding"]["strategy"] == strategy for o in out)
    if s.exact:
        greedy = {o["id"]: o["answer"] for o in infer_main(["--checkpoint", str(checkpoint), "--manifest", str(man),
                                                             "--max-new-tokens", "5"])}
        assert {i: o["answer"] for i, o in by_id.items()} == greedy
    if strategy in ("prompt_lookup", "speculative"):  # HF where it can (text-only), medmm's loop with modalities
        assert by_id["text"]["engine"] == "hf" and by_id["llava"]["engine"] == "loop"


def test_options_apply_to_every_manifest_row(checkpoint, tmp_path, pydicom_files):
    man = tmp_path / "m.jsonl"
    rows = _conversation_rows(pydicom_files) + [{"id": "own", "question": "q", "options": ["a", "b"]}]
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = infer_main(["--checkpoint", str(checkpoint), "--manifest", str(man), "--options", "yes,no"])
    assert [o["id"] for o in out] == ["llava", "q", "text", "own"]
    for o in out[:3]:
        assert set(o["probs"]) == {"yes", "no"} and o["engine"] == "closed_set"
    assert out[3]["error"] == "ConfigError"  # its own options differ from --options: not silently replaced


def test_unsupported_settings_are_errors(checkpoint, tiny_llm):
    base = ["--checkpoint", str(checkpoint), "--smiles", "CCO", "--question", "drug?", "--max-new-tokens", "3"]
    with pytest.raises(SystemExit, match="num_beams do not apply"):
        infer_main(base + ["--num-beams", "3"])
    with pytest.raises(SystemExit, match="closed-set"):
        infer_main(base + ["--options", "yes,no", "--strategy", "sample"])
    with pytest.raises(SystemExit, match="--stream"):
        infer_main(base + ["--stream", "--options", "yes,no"])
    with pytest.raises(SystemExit, match="loop step"):
        infer_main(base + ["--stream", "--strategy", "beam"])
    out = infer_main(base + ["--strategy", "prompt_lookup", "--backend", "hf"])[0]  # HF cannot take the molecule
    assert out["error"] == "ConfigError" and "backend=hf" in out["message"]
    out = infer_main(base[:-4] + ["--question", "a", "--question", "b", "--strategy", "beam"])[0]
    assert out["error"] == "ConfigError" and "no session loop" in out["message"]


def test_hf_assistant_and_prompt_lookup_equal_greedy(checkpoint, tiny_llm):
    """Text-only requests take HF's prompt-lookup and assistant paths; the answers equal HF greedy. The loop-only
    ``draft_confidence`` and the int8 draft keep greedy's answers too."""
    p = Predictor(checkpoint)
    reqs = [{"id": "a", "question": "drug? drug? drug? is this a drug"}, {"id": "b", "question": "what is it?"}]
    greedy = p.predict(reqs, DecodingConfig(max_new_tokens=12))
    for d in [DecodingConfig("prompt_lookup", 12, params={"num_draft_tokens": 3}),
              DecodingConfig("speculative", 12, params={"draft": str(tiny_llm), "num_draft_tokens": 3}),
              DecodingConfig("speculative", 12, params={"draft": str(checkpoint / "llm"), "num_draft_tokens": 3})
              if (checkpoint / "llm").is_dir() else None]:
        if d is None:
            continue
        got = p.predict(reqs, d)
        assert [g["engine"] for g in got] == ["hf", "hf"]
        assert [g["answer"] for g in got] == [g["answer"] for g in greedy]
        medmm = p.predict(reqs, DecodingConfig(d.strategy, 12, params={**d.params, "backend": "medmm"}))
        assert [g["engine"] for g in medmm] == ["loop", "loop"]
        assert [g["answer"] for g in medmm] == [g["answer"] for g in greedy]

    # draft_confidence: honoured by medmm's loop only, so backend=auto routes there (still greedy's answer) and
    # backend=hf is an error naming the setting, never a silently ignored threshold
    spec = {"draft": str(tiny_llm), "num_draft_tokens": 4, "draft_confidence": 0.5}
    got = p.predict(reqs, DecodingConfig("speculative", 12, params=spec))
    assert [g["engine"] for g in got] == ["loop", "loop"]
    assert [g["answer"] for g in got] == [g["answer"] for g in greedy]
    bad = p.predict(reqs[:1], DecodingConfig("speculative", 12, params={**spec, "backend": "hf"}))[0]
    assert bad["error"] == "ConfigError" and "draft_confidence" in bad["message"]
    # draft_quantize=int8 guesses with dynamic int8 linear layers; the target checks every guess at full
    # precision, so HF's assistant path and medmm's loop both still give greedy's answers
    for backend, engine in (("auto", "hf"), ("medmm", "loop")):
        spec = {"draft": str(tiny_llm), "num_draft_tokens": 3, "draft_quantize": "int8", "backend": backend}
        got = p.predict(reqs, DecodingConfig("speculative", 12, params=spec))
        assert [g["engine"] for g in got] == [engine, engine]
        assert [g["answer"] for g in got] == [g["answer"] for g in greedy]
    # draft_runner: the lean runner and HF's forward guess alike (greedy's answers either way); loop-only
    for runner in ("lean", "hf"):
        spec = {"draft": str(tiny_llm), "num_draft_tokens": 3, "draft_runner": runner}
        got = p.predict(reqs, DecodingConfig("speculative", 12, params=spec))
        assert [g["answer"] for g in got] == [g["answer"] for g in greedy]
    bad = p.predict(reqs[:1], DecodingConfig("speculative", 12, params={**spec, "backend": "hf"}))[0]
    assert bad["error"] == "ConfigError" and "draft_runner" in bad["message"]
    from medmm.inference.strategies import get_strategy

    q = p.aux_models(get_strategy("speculative"), {"draft": str(tiny_llm), "draft_quantize": "int8"})["draft"]
    assert any("quantized" in type(m).__module__ for m in q.modules())  # the draft really is int8
