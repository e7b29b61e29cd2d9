"""Preference pairs: production from closed-set labels (real VQA-RAD questions, real ClinTox labels) and from sampled
answers ranked by a reward; records -> chosen/rejected sequences (labels on the final answer only, placeholders never
cut) -> batches of 2B rows; the precomputed-reference file and its digest check."""

import csv
import json
import random

import pytest
import torch

from tests.conftest import SAMPLE, model_dict


@pytest.fixture(scope="module")
def vqa_rad(shared_data, tmp_path_factory):
    """The shared VQA-RAD test split through `prepare_vqa` (real images checked), as conversation JSONL."""
    from medmm.prepare.vqa import prepare_vqa

    root = shared_data / "vqa" / "vqa_rad"
    out = tmp_path_factory.mktemp("vqa")
    prepare_vqa(root / "testset.json", root / "images", out, eval_fraction=0.2, seed=0)
    return out, json.loads((root / "testset.json").read_text())


def clintox_rows(shared_data, n, seed=0):
    with open(shared_data / "molecules" / "moleculenet" / "clintox.csv") as f:
        rows = list(csv.DictReader(f))
    return random.Random(seed).sample(rows, n)


def test_pairs_from_vqa_rad_closed_questions(vqa_rad):
    from medmm.prepare.preferences import pairs_from_labels
    from medmm.utils import read_jsonl

    out, raw = vqa_rad
    recs = read_jsonl(out / "vqa_train.jsonl") + read_jsonl(out / "vqa_eval.jsonl")
    pairs, errors, counts = pairs_from_labels(recs, "vqa")
    assert not errors
    closed_yes_no = sum(q["answer_type"] == "CLOSED" and str(q["answer"]).strip().lower() in ("yes", "no") for q in raw)
    open_n = sum(q["answer_type"] == "OPEN" for q in raw)
    assert counts["read"] == len(raw) == len(recs)
    assert counts["skipped_open"] >= open_n
    assert closed_yes_no <= counts["pairs"] == len(pairs) <= len(raw) - open_n
    by_id = {r["id"]: r for r in recs}
    for p in pairs:
        src = by_id[p["id"]]
        assert p["chosen"] == src["conversations"][-1]["value"]  # the right answer is chosen
        assert p["rejected"].lower() != p["chosen"].lower() and p["rejected"] in p["answer_choices"]
        assert p["conversations"] == src["conversations"][:-1] and p["conversations"][-1]["from"] == "human"
        assert p["modalities"] == src["modalities"]
        if p["chosen"].lower() in ("yes", "no"):
            assert {p["chosen"].lower(), p["rejected"]} == {"yes", "no"}
    # closed questions answered by one of "X or Y" get the other word: e.g. "Is this an MRI or a CT scan?"
    or_pairs = [p for p in pairs if p["chosen"].lower() not in ("yes", "no")]
    assert or_pairs, "VQA-RAD has closed 'X or Y' questions"
    for p in or_pairs:
        q = p["conversations"][-1]["value"].lower()
        assert f"{p['chosen'].lower()} or {p['rejected'].lower()}" in q or \
            f"{p['rejected'].lower()} or {p['chosen'].lower()}" in q


def test_pairs_from_clintox_labels_through_the_cli(shared_data, tmp_path):
    """Real ClinTox rows -> `prepare molecules` (FDA_APPROVED label) -> `medmm prepare preferences --from-labels`."""
    from medmm.cli import main as cli
    from medmm.prepare.molecules import prepare_molecules
    from medmm.utils import read_jsonl

    rows = clintox_rows(shared_data, 40)
    src = tmp_path / "clintox.csv"
    with open(src, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    prepare_molecules(src, tmp_path / "mol", "smiles", "FDA_APPROVED", eval_fraction=0.0)
    recs = read_jsonl(tmp_path / "mol" / "molecules_train.jsonl")
    # one broken record: its answer is outside its own options (an error, not a skip)
    bad = dict(recs[0], id="bad", answer_choices=["approved", "withdrawn"])
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs + [bad]))
    cli(["prepare", "preferences", "--from-labels", str(data), "--out", str(tmp_path / "out" / "pairs.jsonl")])
    pairs = read_jsonl(tmp_path / "out" / "pairs.jsonl")
    assert len(pairs) == len(recs) >= 35
    label = {r["input"]["row"]: r["conversations"][-1]["value"] for r in recs}
    approved = {int(i): row["FDA_APPROVED"] == "1" for i, row in enumerate(rows, start=2)}
    for p, r in zip(pairs, recs):
        assert p["chosen"] == label[r["input"]["row"]] == ("yes" if approved[r["input"]["row"]] else "no")
        assert p["rejected"] == ("no" if p["chosen"] == "yes" else "yes")
        assert p["modalities"]["mol"] == r["modalities"]["mol"]
    errs = [json.loads(x) for x in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert len(errs) == 1 and "(id=bad)" in errs[0]["path"] and "not one of the options" in errs[0]["message"]


def test_pairs_from_samples_keep_the_margin():
    from medmm.data.rewards import get_reward
    from medmm.prepare.preferences import pairs_from_samples

    recs = [
        {"id": "a", "conversations": [{"from": "human", "value": "Is the heart enlarged?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Which side?"}, {"from": "gpt", "value": "left lung"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "Is it normal?"}, {"from": "gpt", "value": "no"}]},
        {"id": "d", "conversations": [{"from": "human", "value": "Any effusion?"}]},  # no reference: the reward fails
    ]
    samples = [["No.", "Yes.", "yes", "maybe"], ["left", "right", "left"], ["no", "No"], ["yes", "no"]]
    pairs, errors, counts = pairs_from_samples(recs, samples, get_reward("token_f1"), min_margin=0.5)
    assert [p["id"] for p in pairs] == ["a", "b"]
    a, b = pairs
    assert a["chosen"] == "Yes." and a["rejected"] == "No."  # best and worst; ties keep the first sampled
    assert a["scores"] == {"reward": "token_f1", "chosen": 1.0, "rejected": 0.0, "n": 4}
    assert b["chosen"] == "left" and b["rejected"] == "right"  # F1 2/3 against "left lung", and 0
    assert a["conversations"] == recs[0]["conversations"][:1]
    assert counts == {"read": 4, "pairs": 2, "skipped_margin": 1} and len(errors) == 1
    assert "(id=d)" in errors[0]["path"] and "token_f1" in errors[0]["message"]
    strict, _, _ = pairs_from_samples(recs[:2], samples[:2], get_reward("token_f1"), min_margin=0.9)
    assert [p["id"] for p in strict] == ["a"]  # b's margin is 0.67


@pytest.fixture
def proc(tiny_llm):
    from medmm.config import ModelConfig, config_from_dict
    from medmm.model.multimodal import MedMMForCausalLM

    md = model_dict(tiny_llm)
    md["modalities"] = {k: v for k, v in md["modalities"].items() if k in ("image", "mol")}
    model = MedMMForCausalLM.from_config(config_from_dict(ModelConfig, md))
    return model, model.processor(96)


def test_dataset_drops_cut_placeholders_and_scores_the_final_answer_only(proc, tmp_path):
    from medmm.data.conversation import IGNORE_INDEX
    from medmm.data.preferences import PreferenceDataset, collate_pairs

    model, p = proc
    img = sorted((SAMPLE / "vqa_rad" / "images").glob("*.jpg"))[0]
    long_q = " ".join(["Describe the left lower lobe opacity and its margins in detail"] * 6)
    recs = [
        {"id": "ok", "modalities": {"image": str(img)},
         "conversations": [{"from": "human", "value": "<image>\nIs there a fracture?"}, {"from": "gpt", "value": "no"},
                           {"from": "human", "value": "Is the lung clear?"}], "chosen": "yes", "rejected": "no"},
        {"id": "cut", "modalities": {"image": str(img)},  # the placeholder sits past max_length
         "conversations": [{"from": "human", "value": long_q + "\n<image>"}], "chosen": "yes", "rejected": "no"},
        {"id": "text", "conversations": [{"from": "human", "value": "Is aspirin an NSAID?"}],
         "chosen": "yes, aspirin is a nonsteroidal anti-inflammatory drug " * 8, "rejected": "no"},
        {"id": "longq", "conversations": [{"from": "human", "value": long_q * 3}], "chosen": "yes", "rejected": "no"},
        {"id": "same", "conversations": [{"from": "human", "value": "Is it?"}], "chosen": "yes", "rejected": " yes"},
        {"id": "ends", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
         "chosen": "yes", "rejected": "no"},
        {"id": "mol", "modalities": {"mol": "CCO"}, "rejected_modalities": {"mol": "c1ccccc1O"},
         "conversations": [{"from": "human", "value": "<mol>\nIs this drug-like?"}], "chosen": "yes", "rejected": "no"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ds = PreferenceDataset(path, p)
    assert [x["record"]["id"] for x in ds.pairs] == ["ok", "text", "mol"]
    reasons = {k.split("id=")[1].rstrip(")"): v["message"] for k, v in ds.failed.items()}
    assert set(reasons) == {"cut", "longq", "same", "ends"}
    assert "modality tokens beyond max_length=96" in reasons["cut"]
    assert "longer than max_length=96" in reasons["longq"]  # no room left for any answer token
    assert "same answer" in reasons["same"] and "end with a human turn" in reasons["ends"]
    assert all(v["error"] == "ConversationError" for v in ds.failed.values())

    tok = model.tokenizer
    ok = ds[0]
    for side, answer in (("chosen", "yes"), ("rejected", "no")):
        ids, labels = ok[side]["input_ids"], ok[side]["labels"]
        scored = labels[labels != IGNORE_INDEX]
        assert tok.decode(scored).startswith(answer)  # the final answer (+ end of turn), not the earlier "no"
        assert (ids == model.modality_tokens["image"].token_id).sum() == model.modality_tokens["image"].slots
    long_answer = ds[1]["chosen"]
    assert long_answer["input_ids"].shape[0] == 96 and (long_answer["labels"] != IGNORE_INDEX).any()  # truncated

    batch = collate_pairs(p, [ds[1], ds[2]])  # text-only + molecule pairs: no image in them
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].shape == batch["input_ids"].shape
    assert batch["modality_inputs"]["image"]["dummy"] is True  # every rank still runs the image encoder
    assert batch["modality_inputs"]["mol"]["x"].shape[0] == 2  # chosen and rejected molecules, in row order
    assert not torch.equal(batch["modality_inputs"]["mol"]["x"][0], batch["modality_inputs"]["mol"]["x"][1])
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    assert out.logits.shape[0] == 4


def test_reference_file_is_tied_to_the_tokens(proc, tmp_path):
    from medmm.data.preferences import PreferenceDataset, read_reference, write_reference
    from medmm.errors import ConfigError, InvalidInputError

    _, p = proc
    recs = [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"Is {i} even?"}],
             "chosen": ["yes", "no"][i % 2], "rejected": ["no", "yes"][i % 2]} for i in range(3)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ds = PreferenceDataset(path, p)
    rows = [{"dataset": x["key"][0], "line": x["key"][1], "digest": x["digest"], "chosen": -1.5 - k, "rejected": -2.0}
            for k, x in enumerate(ds.pairs)]
    write_reference(tmp_path / "ref.jsonl", {"pairs": 3}, rows)
    header, table = read_reference(tmp_path / "ref.jsonl")
    assert header["format"] == "medmm-dpo-reference" and header["pairs"] == 3
    ds.attach_reference(table, "ref.jsonl")
    assert ds[2]["ref"] == (-3.5, -2.0)
    rows[1]["digest"] = "0" * 16  # computed for other tokens
    write_reference(tmp_path / "ref2.jsonl", {}, rows)
    with pytest.raises(ConfigError, match="other tokens of .*pairs.jsonl:2"):
        ds.attach_reference(read_reference(tmp_path / "ref2.jsonl")[1], "ref2.jsonl")
    write_reference(tmp_path / "ref3.jsonl", {}, rows[:1])
    with pytest.raises(ConfigError, match="no reference log-probs for .*pairs.jsonl:2"):
        ds.attach_reference(read_reference(tmp_path / "ref3.jsonl")[1], "ref3.jsonl")
    (tmp_path / "other.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(InvalidInputError, match="not a medmm-dpo-reference file"):
        read_reference(tmp_path / "other.jsonl")


def test_prepare_preferences_by_sampling_a_checkpoint(proc, tmp_path):
    """`medmm prepare preferences --sample`: a saved model samples N answers per prompt, a registered reward ranks
    them, pairs whose margin passes are written; an unreadable prompt image goes to errors.jsonl."""
    from medmm.cli import main as cli
    from medmm.data.rewards import list_rewards, register_reward
    from medmm.utils import read_jsonl

    if "test_answer_length" not in list_rewards():
        @register_reward("test_answer_length", "characters in the answer (a test reward)")
        def _length(prediction: str, example: dict) -> float:
            return float(len(prediction))

    model, _ = proc
    model.save_pretrained(tmp_path / "ckpt")
    img = sorted((SAMPLE / "vqa_rad" / "images").glob("*.jpg"))[0]
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    recs = [{"id": "q1", "modalities": {"image": str(img)},
             "conversations": [{"from": "human", "value": "<image>\nIs there a fracture?"}, {"from": "gpt", "value": "no"}]},
            {"id": "q2", "conversations": [{"from": "human", "value": "Is aspirin an NSAID?"}]},
            {"id": "q3", "modalities": {"image": "broken.jpg"},
             "conversations": [{"from": "human", "value": "<image>\nIs the lung clear?"}]}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "prefs" / "sampled.jsonl"
    cli(["prepare", "preferences", "--sample", str(tmp_path / "ckpt"), "--prompts", str(tmp_path / "prompts.jsonl"),
         "--n", "4", "--reward", "test_answer_length", "--min-margin", "1", "--max-new-tokens", "8",
         "--device", "cpu", "--out", str(out)])
    pairs = read_jsonl(out)
    assert {p["id"] for p in pairs} <= {"q1", "q2"} and pairs  # random tiny model: answers of different lengths
    for p in pairs:
        s = p["scores"]
        assert s["reward"] == "test_answer_length" and s["n"] == 4
        assert s["chosen"] == len(p["chosen"]) and s["rejected"] == len(p["rejected"])
        assert s["chosen"] - s["rejected"] >= 1
        assert p["conversations"][-1]["from"] == "human"
    errs = [json.loads(x) for x in (out.parent / "errors.jsonl").read_text().splitlines()]
    assert len(errs) == 1 and errs[0]["path"].endswith("prompts.jsonl:3") and errs[0]["error"] == "ImageError"
