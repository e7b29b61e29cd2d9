"""Export: the merged Hugging Face folder (the LLM loads with AutoModelForCausalLM, the model gives the same greedy
output, the card lists training data and metrics); ONNX and TorchScript graphs agree with PyTorch."""

import json

import numpy as np
import pytest
import torch

from medmm.config import ModelConfig, config_from_dict
from medmm.export.hf import export_hf
from medmm.model.multimodal import MedMMForCausalLM
from tests.conftest import model_dict


def test_export_hf_round_trip(tiny_llm, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = MedMMForCausalLM.from_config(config_from_dict(ModelConfig, model_dict(tiny_llm, llm_trainable="lora")))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # make LoRA matter
    ckpt = m.save_pretrained(tmp_path / "ckpt")
    out = export_hf(ckpt, tmp_path / "export")
    assert not (out / "llm_adapter").exists() and (out / "README.md").exists()
    hf = AutoModelForCausalLM.from_pretrained(out / "llm")
    assert not any("lora" in n for n, _ in hf.named_parameters())

    before, after = MedMMForCausalLM.from_pretrained(ckpt).eval(), MedMMForCausalLM.from_pretrained(out).eval()
    proc = before.processor(256)
    req = proc.process_prompt({"modalities": {"mol": "CCO"}, "conversations": [{"from": "human", "value": "drug?"}]})
    batch = proc.collate([req], padding_side="left")
    a = before.generate(batch["input_ids"], batch["attention_mask"], batch["modality_inputs"], max_new_tokens=8,
                        do_sample=False)
    b = after.generate(batch["input_ids"], batch["attention_mask"], batch["modality_inputs"], max_new_tokens=8,
                       do_sample=False)
    assert torch.equal(a, b)
    with torch.no_grad():
        la = before(**proc.collate([req])).logits
        lb = after(**proc.collate([req])).logits
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)
    # a LoRA that changes the output was really merged: the base LLM alone differs
    base = AutoModelForCausalLM.from_pretrained(ckpt / "llm")
    assert not torch.allclose(base.lm_head.weight, hf.lm_head.weight) or not torch.allclose(
        base.model.layers[0].self_attn.q_proj.weight, hf.model.layers[0].self_attn.q_proj.weight)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a medmm model folder"):
        MedMMForCausalLM.from_pretrained(tmp_path)


def test_model_card_lists_training_data_and_metrics(tiny_llm, tmp_path):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "data" / "vqa_train.jsonl").write_text("")
    (run / "data" / "manifest.json").write_text(json.dumps(
        {"vqa": {"name": "vqa", "train": 64, "eval": 17, "rejected": 2, "source": "data/sample/vqa_rad/testset.json"}}))
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps(
        {"checkpoint": str(run / "checkpoint"), "overall": {"count": 17, "exact_match": 0.4118, "errors": 0},
         "per_file": {"vqa_eval.jsonl": {"count": 17, "exact_match": 0.4118, "closed_accuracy": 0.625}}}))
    m = MedMMForCausalLM.from_config(config_from_dict(ModelConfig, model_dict(tiny_llm, llm_trainable="frozen")))
    ckpt = m.save_pretrained(run / "checkpoint", extra={"training": {
        "steps": 20, "final_loss": 3.5, "world_size": 2, "zero_stage": 2,
        "datasets": [str(run / "data" / "vqa_train.jsonl")]}})
    card = (export_hf(ckpt, tmp_path / "export") / "README.md").read_text()
    assert "Steps: 20; final loss: 3.5; ranks: 2; ZeRO stage: 2" in card
    assert "`vqa_train.jsonl`" in card and "64 train / 17 eval rows, 2 rejected" in card
    assert "| vqa_eval.jsonl | 17 | 0.412 | 0.625 |" in card and "| overall | 17 | 0.412 |" in card
    meta = json.loads((tmp_path / "export" / "medmm_config.json").read_text())
    assert meta["evaluation"]["overall"]["count"] == 17
    # no metrics anywhere: the card says so instead of inventing any
    bare = m.save_pretrained(tmp_path / "bare" / "ckpt")
    assert "No evaluation metrics were found" in (export_hf(bare, tmp_path / "bare_export") / "README.md").read_text()


@pytest.fixture(scope="module")
def graph_checkpoint(tiny_llm, tmp_path_factory):
    """Every foundation modality (ViT 2D/3D, fingerprint MLP, masked DNA + resampler), LoRA on the LLM."""
    torch.manual_seed(0)
    m = MedMMForCausalLM.from_config(config_from_dict(ModelConfig, model_dict(tiny_llm, llm_trainable="lora")))
    return m.save_pretrained(tmp_path_factory.mktemp("graphs") / "ckpt")


@pytest.mark.slow
def test_onnx_parity_with_pytorch(graph_checkpoint, pydicom_files, tmp_path):
    import onnxruntime as ort

    from medmm.export.onnx import export_graphs

    out = tmp_path / "onnx"
    rep = export_graphs(graph_checkpoint, out, "onnx", with_llm=True)
    assert set(rep["modalities"]) == {"image", "volume", "mol", "dna"}
    for name, r in rep["modalities"].items():
        assert r["ok"] and r["max_abs_diff"] < 1e-4, (name, r)
        assert [c["batch"] for c in r["checks"]] == [1, 3]  # traced at batch 2: the batch axis is dynamic
    assert json.loads((out / "validation.json").read_text())["modalities"]["dna"]["max_abs_diff"] == \
        rep["modalities"]["dna"]["max_abs_diff"]
    llm = rep["llm"]
    assert llm["exported"] and llm["ok"] and all(c["same_next_token"] for c in llm["checks"]), llm

    # independently of the report: a real DICOM through the loader, ORT against the model's own encode path
    model = MedMMForCausalLM.from_pretrained(graph_checkpoint, merge_lora=True).eval()
    proc = model.processor(256)
    item = proc.loaders["image"].load(str(pydicom_files / "CT_small.dcm"))
    x = torch.stack([item["x"], -item["x"]])  # (2, C, S, S)
    sess = ort.InferenceSession(str(out / "image.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = model.encode_modality("image", x).numpy()  # (2, K, H)
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-4
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["modalities"]["image"]["inputs"][0]["shape"][0] == "batch"
    assert manifest["modalities"]["dna"]["pad_to"] == model.config.modalities["dna"].preprocess.max_length
    assert (out / "tokenizer").is_dir() and (out / "medmm_config.json").is_file()


def test_torchscript_export_through_the_cli(graph_checkpoint, tmp_path, capsys):
    from medmm.cli import main as cli_main

    out = tmp_path / "ts"
    cli_main(["export", "--checkpoint", str(graph_checkpoint), "--format", "torchscript", "--out", str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["graphs"]) == {"image", "volume", "mol", "dna"}
    model = MedMMForCausalLM.from_pretrained(graph_checkpoint, merge_lora=True).eval()
    proc = model.processor(256)
    mol = proc.loaders["mol"]
    x = torch.stack([mol.load(s)["x"] for s in ("CCO", "c1ccccc1O", "CC(=O)N")])  # batch 3, traced at 2
    scripted = torch.jit.load(str(out / "mol.pt"))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model.encode_modality("mol", x), atol=1e-5, rtol=1e-5)
    assert printed["graphs"]["dna"]["max_abs_diff"] < 1e-4


@pytest.mark.slow
def test_graph_export_fails_loudly_beyond_tolerance(graph_checkpoint, tmp_path):
    from medmm.export.onnx import export_graphs

    with pytest.raises(RuntimeError, match="beyond tolerance"):
        export_graphs(graph_checkpoint, tmp_path / "ts", "torchscript", atol=-1.0, rtol=0.0)
    rep = json.loads((tmp_path / "ts" / "validation.json").read_text())
    assert not any(r["ok"] for r in rep["modalities"].values())  # the report is written all the same


def test_folder_config_checks(tmp_path):
    import json

    from medmm.utils import read_folder_config

    (tmp_path / "cfg.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        read_folder_config(tmp_path, "cfg.json", 1, "medmm model folder")
    with pytest.raises(FileNotFoundError, match="not a slide classifier folder"):
        read_folder_config(tmp_path, "missing.json", 1, "slide classifier folder")
