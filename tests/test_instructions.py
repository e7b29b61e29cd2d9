"""``medmm prepare instructions``: Alpaca, ShareGPT and PromptCBLUE files -> text-only conversation JSONL.

No instruction set with a licence that allows redistribution is in ../shared/data, so these tests write
small files in each format with known content (the field names and shapes are the formats' own).
"""

import json

import pytest

from medmm.prepare.instructions import prepare_instructions
from medmm.prepare.parts import split_of


def write(path, rows, as_array=False):
    path.write_text(json.dumps(rows, ensure_ascii=False) if as_array else
                    "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def read(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_alpaca_array_with_input_history_and_system(tmp_path):
    rows = [{"instruction": "Name the bone.", "input": "It is in the thigh.", "output": "femur"},
            {"instruction": "Spell CT.", "input": "", "output": "computed tomography", "system": "Be brief.",
             "history": [["Hi", "Hello"]]},
            {"instruction": "No answer here."},  # rejected: no output
            {"instruction": "x", "output": "y", "history": [["only one"]]}]  # rejected: bad history
    m = prepare_instructions(write(tmp_path / "a.json", rows, as_array=True), "alpaca", tmp_path / "out",
                             eval_fraction=0.0)
    assert (m["train"], m["eval"], m["rejected"]) == (2, 0, 2)
    recs = read(tmp_path / "out" / "train.jsonl")
    assert recs[0]["conversations"] == [{"from": "human", "value": "Name the bone.\n\nIt is in the thigh."},
                                        {"from": "gpt", "value": "femur"}]
    assert [t["from"] for t in recs[1]["conversations"]] == ["system", "human", "gpt", "human", "gpt"]
    assert "modalities" not in recs[0] and recs[0]["id"] == "a-0"
    errs = read(tmp_path / "out" / "errors.jsonl")
    assert [e["path"] for e in errs] == [f"{tmp_path / 'a.json'}:[2]", f"{tmp_path / 'a.json'}:[3]"]
    assert "'output' is missing" in errs[0]["message"] and errs[0]["error"] == "ConversationError"


def test_sharegpt_both_spellings_and_role_checks(tmp_path):
    rows = [{"id": "c1", "conversations": [{"from": "system", "value": "You are a radiologist."},
                                           {"from": "human", "value": "Is this normal?"},
                                           {"from": "gpt", "value": "Yes."},
                                           {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
            {"messages": [{"role": "user", "content": "Dose?"}, {"role": "assistant", "content": "5 mg"}]},
            {"conversations": [{"from": "gpt", "value": "I start"}, {"from": "human", "value": "no"}]},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "tool", "value": "x"}]},
            {"conversations": [{"from": "human", "value": "q"}]},
            "not an object"]
    src = write(tmp_path / "s.jsonl", rows)
    with open(src, "a") as f:
        f.write("{broken json\n")
    m = prepare_instructions(src, "sharegpt", tmp_path / "out", eval_fraction=0.5, seed=1)
    assert (m["train"] + m["eval"], m["rejected"]) == (2, 5)
    recs = read(tmp_path / "out" / "train.jsonl") + read(tmp_path / "out" / "eval.jsonl")
    # the split is a keyed hash of each id (the same in every part of a --num-shards run)
    assert {r["id"] for r in read(tmp_path / "out" / "eval.jsonl")} == {
        r["id"] for r in recs if split_of(r["id"], 0.5, 1) == "eval"}
    by = {r["id"]: r for r in recs}
    assert by["c1"]["conversations"][0] == {"from": "system", "value": "You are a radiologist."}
    assert by["s-1"]["conversations"] == [{"from": "human", "value": "Dose?"}, {"from": "gpt", "value": "5 mg"}]
    msgs = " | ".join(e["message"] for e in read(tmp_path / "out" / "errors.jsonl"))
    for part in ("expected a human turn", "unsupported role 'tool'", "must end with an answer",
                 "must be an object", "not valid JSON"):
        assert part in msgs


def test_promptcblue_keeps_its_fields_and_splits_deterministically(tmp_path):
    rows = [{"input": f"病例{i}：患者主诉头痛。问题：应就诊哪个科室？选项：神经内科，骨科", "target": "神经内科",
             "answer_choices": ["神经内科", "骨科"], "task_type": "cls", "task_dataset": ["CMID", "KUAKE-QIC"][i % 2],
             "sample_id": f"train-{i}"} for i in range(20)]
    rows.append({"input": "缺字段", "target": "x"})
    src = write(tmp_path / "p.json", rows)
    m1 = prepare_instructions(src, "promptcblue", tmp_path / "o1", eval_fraction=0.25, seed=3)
    prepare_instructions(src, "promptcblue", tmp_path / "o2", eval_fraction=0.25, seed=3)
    assert (m1["train"] + m1["eval"], m1["rejected"]) == (20, 1) and 2 <= m1["eval"] <= 9
    assert {r["id"] for r in read(tmp_path / "o1" / "eval.jsonl")} == {
        f"train-{i}" for i in range(20) if split_of(f"train-{i}", 0.25, 3) == "eval"}
    assert m1["task_datasets"] == {"CMID": 10, "KUAKE-QIC": 10}
    assert (tmp_path / "o1" / "eval.jsonl").read_text() == (tmp_path / "o2" / "eval.jsonl").read_text()
    rec = read(tmp_path / "o1" / "train.jsonl")[0]
    for k in ("input", "target", "answer_choices", "task_type", "task_dataset", "sample_id"):
        assert k in rec
    assert rec["id"] == rec["sample_id"] and rec["conversations"][1]["value"] == rec["target"]
    assert rec["conversations"][0]["value"] == rec["input"] and "病例" in (tmp_path / "o1" / "train.jsonl").read_text()


def test_cli_and_the_records_encode_with_a_tokenizer(tmp_path, tiny_llm, capsys):
    """The CLI writes DIR/train.jsonl + DIR/eval.jsonl, and a text-only record becomes token ids and labels."""
    from transformers import AutoTokenizer

    from medmm.cli import main as cli
    from medmm.data.conversation import IGNORE_INDEX, ConversationEncoder

    src = write(tmp_path / "a.jsonl", [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(10)])
    cli(["prepare", "instructions", str(src), "--format", "alpaca", "--out", str(tmp_path / "d")])
    assert json.loads(capsys.readouterr().out)["train"] == 9
    rec = read(tmp_path / "d" / "train.jsonl")[0]
    enc = ConversationEncoder(AutoTokenizer.from_pretrained(tiny_llm), {}, 64)
    ids, labels = enc.encode(rec["conversations"], {})
    assert len(ids) == len(labels) and any(x != IGNORE_INDEX for x in labels)
    with pytest.raises(SystemExit):
        cli(["prepare", "instructions", str(src), "--format", "dolly", "--out", str(tmp_path / "x")])
