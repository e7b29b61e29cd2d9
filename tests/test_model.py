"""The multimodal LM: splicing, label masking, mismatches, freezing, LoRA, save/load round trips."""

import json

import pytest
import torch

from medmm.config import ModelConfig, config_from_dict
from medmm.data.conversation import IGNORE_INDEX
from medmm.errors import ConversationError, ModalityMismatchError
from medmm.model.multimodal import MedMMForCausalLM
from tests.conftest import SAMPLE, model_dict

IMG = sorted((SAMPLE / "vqa_rad" / "images").glob("*.jpg"))


def recs():
    return [
        {"id": "img", "modalities": {"image": str(IMG[0])},
         "conversations": [{"from": "human", "value": "<image>\nIs there a fracture?"}, {"from": "gpt", "value": "no"}]},
        {"id": "two", "modalities": {"mol": "CC(=O)Oc1ccccc1C(=O)O", "dna": "ACGTNNACGTRYACGT" * 4},
         "conversations": [{"from": "human", "value": "Compare <mol> with <dna>."}, {"from": "gpt", "value": "unrelated"},
                           {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "text", "conversations": [{"from": "human", "value": "Define CT."}, {"from": "gpt", "value": "computed"}]},
    ]


@pytest.fixture
def model(tiny_model_config):
    torch.manual_seed(0)
    return MedMMForCausalLM.from_config(tiny_model_config)


def test_splice_positions_and_labels(model):
    proc = model.processor(512)
    samples = [proc.process(r) for r in recs()]
    batch = proc.collate(samples)
    ids, labels = batch["input_ids"], batch["labels"]
    for name, mt in model.modality_tokens.items():
        pos = ids == mt.token_id
        assert (labels[pos] == IGNORE_INDEX).all(), f"{name} placeholders must not be learned"
    # image: sample 0 holds exactly `slots` image positions; text-only sample holds none
    mt = model.modality_tokens["image"]
    assert int((ids[0] == mt.token_id).sum()) == mt.slots and int((ids[2] == mt.token_id).sum()) == 0
    # labels are only on answers: decode them
    ans = model.tokenizer.decode([t for t in labels[1].tolist() if t != IGNORE_INDEX], skip_special_tokens=True)
    assert "unrelated" in ans and "yes" in ans and "Compare" not in ans
    # projector outputs land exactly at the placeholder positions
    emb = model.embed(ids, batch["modality_inputs"])
    proj = model.encode_modality("image", batch["modality_inputs"]["image"]["x"])
    torch.testing.assert_close(emb[0][ids[0] == mt.token_id], proj[0])
    text_emb = model.llm.get_input_embeddings()(ids)
    other = ~torch.isin(ids, torch.tensor([m.token_id for m in model.modality_tokens.values()]))
    torch.testing.assert_close(emb[other], text_emb[other])
    out = model(**batch)
    assert torch.isfinite(out.loss)


def test_mismatch_errors(model):
    proc = model.processor(512)
    bad = {"id": "bad", "modalities": {"image": str(IMG[0])},
           "conversations": [{"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "x"}]}
    with pytest.raises(ConversationError, match="2 <image> placeholder"):
        proc.process(bad)
    unknown = {"modalities": {"slide": "x.svs"}, "conversations": [{"from": "human", "value": "q"},
                                                                  {"from": "gpt", "value": "a"}]}
    with pytest.raises(ConversationError, match="not configured"):
        proc.process(unknown)
    batch = proc.collate([proc.process(recs()[0])])
    batch["modality_inputs"]["image"]["x"] = batch["modality_inputs"]["image"]["x"].repeat(2, 1, 1, 1)
    with pytest.raises(ModalityMismatchError, match="positions"):
        model(**batch)
    batch["modality_inputs"] = {}
    with pytest.raises(ModalityMismatchError, match="no 'image' input"):
        model(**batch)


def test_placeholder_prepended_when_missing(model):
    proc = model.processor(512)
    r = {"modalities": {"image": str(IMG[0])}, "conversations": [{"from": "human", "value": "What?"},
                                                                  {"from": "gpt", "value": "x"}]}
    s = proc.process(r)
    assert int((s["input_ids"] == model.modality_tokens["image"].token_id).sum()) == model.modality_tokens["image"].slots


@pytest.mark.parametrize("llm_mode,image_mode,save", [("lora", "lora", None), ("full", "frozen", None),
                                                      ("frozen", "full", None), ("lora", "full", ["lm_head"])])
def test_save_load_round_trip_identical_logits(tiny_llm, tmp_path, llm_mode, image_mode, save):
    d = model_dict(tiny_llm, llm_trainable=llm_mode, image_trainable=image_mode)
    d["lora"]["modules_to_save"] = save
    cfg = config_from_dict(ModelConfig, d)
    torch.manual_seed(0)
    m = MedMMForCausalLM.from_config(cfg)
    # perturb trainable weights so the round trip is not of the initialisation
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    proc = m.processor(512)
    batch = proc.collate([proc.process(r) for r in recs()])
    m.eval()
    with torch.no_grad():
        ref = m(**batch).logits
    m.save_pretrained(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"medmm_config.json", "modules.safetensors", "llm", "tokenizer"} <= files
    assert ("llm_adapter" in files) == (llm_mode == "lora")
    m2 = MedMMForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(m2(**batch).logits, ref, atol=0, rtol=0)
    # merged LoRA gives the same logits within float tolerance
    m3 = MedMMForCausalLM.from_pretrained(tmp_path / "ckpt", merge_lora=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(m3(**batch).logits, ref, atol=1e-4, rtol=1e-4)
    meta = json.loads((tmp_path / "ckpt" / "medmm_config.json").read_text())
    assert meta["model"]["modalities"]["image"]["preprocess"]["image_size"] == 64  # preprocessing travels


def test_freezing_modes(tiny_llm):
    cfg = config_from_dict(ModelConfig, model_dict(tiny_llm, llm_trainable="lora", image_trainable="frozen"))
    m = MedMMForCausalLM.from_config(cfg)
    assert not any(p.requires_grad for p in m.encoders["image"].parameters())
    assert all(p.requires_grad for p in m.projectors["image"].parameters())
    llm_trainable = [n for n, p in m.llm.named_parameters() if p.requires_grad]
    assert llm_trainable and all("lora_" in n for n in llm_trainable)
    cfg.modalities["image"].encoder.trainable = "lora"
    m = MedMMForCausalLM.from_config(cfg)
    enc = [n for n, p in m.encoders["image"].named_parameters() if p.requires_grad]
    assert enc and all("lora_" in n for n in enc)


def test_variable_length_encoder_needs_resampler(tiny_llm):
    from medmm.errors import ConfigError

    d = model_dict(tiny_llm)
    d["modalities"]["dna"]["projector"] = {"type": "mlp2x_gelu"}
    with pytest.raises(ConfigError, match="resampler"):
        MedMMForCausalLM.from_config(config_from_dict(ModelConfig, d))


@pytest.mark.parametrize("family", ["qwen2", "mistral", "phi3"])
def test_other_llm_families(tmp_path, family):
    from medmm.model.tiny import build_tiny_llm, sample_texts

    llm = build_tiny_llm(tmp_path / family, sample_texts(SAMPLE)[:50], family=family, vocab_size=400)
    m = MedMMForCausalLM.from_config(config_from_dict(ModelConfig, model_dict(llm)))
    proc = m.processor(512)
    out = m(**proc.collate([proc.process(r) for r in recs()]))
    assert torch.isfinite(out.loss)


def test_generate_returns_new_tokens(model):
    proc = model.processor(512)
    req = proc.process_prompt({"modalities": {"image": str(IMG[0])},
                               "conversations": [{"from": "human", "value": "What?"}]})
    batch = proc.collate([req, req], padding_side="left")
    out = model.generate(batch["input_ids"], batch["attention_mask"], batch["modality_inputs"], max_new_tokens=5,
                         do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] <= 5
    assert torch.equal(out[0], out[1])
    placeholders = {mt.token_id for mt in model.modality_tokens.values()}
    assert not placeholders & set(out.flatten().tolist())


def test_gradient_checkpointing_matches(tiny_llm):
    grads = []
    for gc in (False, True):
        torch.manual_seed(0)
        cfg = config_from_dict(ModelConfig, model_dict(tiny_llm, llm_trainable="full", gradient_checkpointing=gc))
        m = MedMMForCausalLM.from_config(cfg)
        m.train()
        proc = m.processor(512)
        loss = m(**proc.collate([proc.process(r) for r in recs()])).loss
        loss.backward()
        grads.append(m.projectors["image"].net[0].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
