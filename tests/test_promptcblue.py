"""PromptCBLUE scoring: every task and parse rule of the official scorer (michael-wzhu/PromptCBLUE@b0753a6).

The fixtures are written for this test in PromptCBLUE's line format; each expected structure follows the
official ``post_generate_process.py`` rule named beside it, and each expected metric is worked out by hand
(counts in the comments). Classification metrics are also checked against scikit-learn's
``classification_report``, which the official scorer calls.
"""

import json
import math

import numpy as np
import pytest

from medmm.errors import InvalidInputError
from medmm.eval.benchmarks import get_benchmark
from medmm.eval.benchmarks.promptcblue import TASKS, metric_name, parse, score_task
from medmm.eval.benchmarks.run import run_benchmark

NER_CH = ["疾病", "药物"]
CDN_CH = ["高血压", "2型糖尿病", "肺炎"]
MDC_CH = ["已有症状疾病或者假设未来可能发生的疾病等", "未患有症状疾病", "没有回答、不知道、回答不明确或者模棱两可不好推断",
          "无实际意义的不标注或者和病人当前的状态独立不标注"]
SR_CH = ["没有患有该症状", "患有该症状", "无法根据上下文确定病人是否患有该症状"]


def rouge_f(lcs: int, hyp_len: int, ref_len: int) -> float:
    """rouge_chinese 1.0.3's ROUGE-L F: 2 P R / (P + R + 1e-8) over the whole token sequences."""
    p, r = lcs / hyp_len, lcs / ref_len
    return 2.0 * (p * r) / (p + r + 1e-8)


# (task_dataset, answer_choices, reference target, generated target) per item
ITEMS = {
    "CMeEE-V2": [
        # gold {高血压/疾病, 糖尿病/疾病, 二甲双胍/药物}; pred: stripped, empty mentions dropped, a non-choice type
        # ignored -> {高血压, 糖尿病, 阿司匹林}: tp 2 fp 1 fn 1
        ("上述句子中的实体包含：\n疾病实体：高血压，糖尿病\n药物实体：二甲双胍",
         "上述句子中的实体包含：\n疾病实体：高血压， 糖尿病 ，，\n药物实体：阿司匹林\n其他实体：头痛"),
        # gold {布洛芬/药物}; pred: '疾病实体肺炎' starts with the type but has no '：' -> the whole line is a
        # mention; a line with a leading space is not read; a repeat counts once -> tp 1 fp 1
        ("上述句子中的实体包含：\n疾病实体：\n药物实体：布洛芬",
         "上述句子中的实体包含：\n疾病实体肺炎\n 药物实体：布洛芬\n药物实体：布洛芬"),
    ],  # tp 3 fp 2 fn 1: P 3/5 R 3/4
    "CMeIE": [
        # pred line 2 has no header: predicate = the line before '关系的头尾实体对' minus 2 chars -> fp;
        # a piece with two '，尾实体为' keeps the first two parts -> tp 2 fp 1
        ("具有药物治疗关系的头尾实体对如下：头实体为高血压，尾实体为氨氯地平。头实体为糖尿病，尾实体为二甲双胍。\n"
         "具有病因关系的头尾实体对如下：",
         "具有药物治疗关系的头尾实体对如下：头实体为高血压，尾实体为氨氯地平。头实体为糖尿病，尾实体为二甲双胍，"
         "尾实体为胰岛素\n头实体为肥胖，尾实体为糖尿病"),
        ("具有病因关系的头尾实体对如下：头实体为肺炎，尾实体为肺炎链球菌。", "没有找到关系"),  # fn 1
    ],  # tp 2 fp 1 fn 1
    "CHIP-CDN": [
        ("高血压，2型糖尿病", "归一化后的标准词：\n高血压，肺炎，心衰，高血压"),  # last line; non-choice dropped: tp1 fp1 fn1
        ("没有对应的标准化实体", "肺炎\n"),  # gold {}; pred's last line is empty -> {}
        ("肺炎", "肺 炎"),  # not a choice -> fn 1
    ],  # tp 1 fp 1 fn 2: P 1/2 R 1/3
    "CHIP-CDEE": [
        # pred event 1: 描述词 in another order (a list: order counts) -> fp; event 2: '主体词：发生状态：否定' sets
        # 主体词 to '发生状态：否定' and 发生状态 to '否定' (keys tested after earlier ones stripped) -> fp; the
        # trailing newline is an empty event -> fp. gold: 2 events, none matched.
        ("上述句子中的临床发现事件如下：\n主体词：咳嗽；发生状态：；描述词：阵发性，持续性；解剖部位：\n"
         "主体词：发热；发生状态：否定；描述词：；解剖部位：",
         "上述句子中的临床发现事件如下：\n主体词：咳嗽；发生状态：；描述词：持续性，阵发性；解剖部位：\n"
         "主体词：发生状态：否定；描述词：；解剖部位：\n"),
        # fields in any order, missing ones default -> the same event: tp 1
        ("上述句子中的临床发现事件如下：\n主体词：腹痛；发生状态：；描述词：；解剖部位：腹", "事件：\n解剖部位：腹；主体词：腹痛"),
    ],  # tp 1 fp 3 fn 2: P 1/4 R 1/3
    "IMCS-V2-NER": [
        ("上述句子中的实体包含：\n症状实体：发热，咳嗽\n药物类别实体：",
         "上述句子中的实体包含：\n症状实体：发热，咳嗽，发热\n药物类别实体：抗生素"),  # tp 2 fp 1
    ],
    "CHIP-MDCFNPC": [
        # '腹泻 ' stripped -> tp; '不知道' is no choice -> 不标注 -> fp (and gold 发热 fn); two colons -> skipped
        ("上述对话中临床发现实体以及其阴阳性判别如下：\n腹泻：已有症状疾病或者假设未来可能发生的疾病等\n发热：未患有症状疾病",
         "上述对话中临床发现实体以及其阴阳性判别如下：\n腹泻 ：已有症状疾病或者假设未来可能发生的疾病等\n发热：不知道\n咳嗽：a：b"),
        # no header line: the first line is skipped -> {} -> fn 1
        ("上述对话中临床发现实体以及其阴阳性判别如下：\n呕吐：无实际意义的不标注或者和病人当前的状态独立不标注",
         "呕吐：无实际意义的不标注或者和病人当前的状态独立不标注"),
    ],  # tp 1 fp 1 fn 2
    "IMCS-V2-SR": [
        # '没有患有该症状 ' keeps its space -> not a choice -> the default -> fp + fn; '可能' -> default -> fp
        ("当前对话中的症状及其阴阳性判断为：\n手脚凉：患有该症状\n出汗：没有患有该症状",
         "当前对话中的症状及其阴阳性判断为：\n手脚凉：患有该症状\n出汗：没有患有该症状 \n咳嗽：可能"),
        # '不确定' -> the default, which is the gold conclusion -> tp
        ("当前对话中的症状及其阴阳性判断为：\n头痛：无法根据上下文确定病人是否患有该症状", "判断为：\n头痛：不确定"),
    ],  # tp 2 fp 2 fn 1
    "CHIP-STS": [("是的", "相同"), ("不是", " 不同 "), ("是的", ""), ("不是", "是的")],
    "KUAKE-IR": [("相关", "相关"), ("不相关", "有关"), ("不相关", "不相关")],
    "KUAKE-QQR": [("完全一致", "完全一致"), ("语义无直接关联", "完全一致")],
    "KUAKE-QTR": [("部分匹配", "部分匹配"), ("完全匹配", "完全匹配"), ("部分匹配", "完全匹配 ")],
    "CHIP-CTC": [("疾病", "疾病"), ("年龄", ""), ("疾病", "其他")],
    "KUAKE-QIC": [("病因分析", "病因分析"), ("治疗方案", "治疗方案")],
    "IMCS-V2-DAC": [("关于症状的询问", "关于症状的询问"), ("给出诊断", "给出诊断"), ("关于症状的询问", "")],
    "MedDG": [("建议多喝水，注意休息。", "多喝水，注意休息"), ("可以做CT检查。", "")],
    "IMCS-V2-MRG": [
        # 诊断 appears twice: the later line wins, and its text after the last '诊断：' is '主诉：肺炎。'
        ("上述问诊对话的诊疗报告如下：\n主诉：咳嗽三天。\n现病史：患儿咳嗽。\n诊断：上呼吸道感染。",
         "上述问诊对话的诊疗报告如下：\n主诉：咳嗽三天。\n诊断：上呼吸道感染。\n诊断：主诉：肺炎。"),
        ("报告：\n主诉：发热一天。", "主诉：发热一天。"),  # no header: the section on line 1 is not read
    ],
}
CHOICES = {"CMeEE-V2": NER_CH, "CMeIE": ["药物治疗", "病因"], "CHIP-CDN": CDN_CH, "IMCS-V2-NER": ["症状", "药物类别"],
           "CHIP-MDCFNPC": MDC_CH, "IMCS-V2-SR": SR_CH, "CHIP-STS": ["是的", "不是"], "KUAKE-IR": ["相关", "不相关"]}


def f1(tp, fp, fn):
    p, r = tp / (tp + fp), tp / (tp + fn)
    return 100 * 2 * p * r / (p + r)


EXPECTED = {
    "CMeEE-V2-Micro-F1": f1(3, 2, 1),
    "CMeIE-V2-Micro-F1": f1(2, 1, 1),
    "CHIP-CDN-Micro-F1": f1(1, 1, 2),
    "CHIP-CDEE-Micro-F1": f1(1, 3, 2),
    "IMCS-V2-NER-Micro-F1": f1(2, 1, 0),
    "CHIP-MDCFNPC-Micro-F1": f1(1, 1, 2),
    "IMCS-V2-SR-Micro-F1": f1(2, 2, 1),
    # weighted F1: 是的 (support 2, predicted 3, tp 2) F1 .8; 不是 (2, 1, 1) F1 2/3
    "CHIP-STS-Micro-F1": 100 * (2 * 0.8 + 2 * 2 / 3) / 4,
    # 相关 F1 1 (support 1); 不相关 (2, 1, 1) 2/3; 有关 (0 support) weight 0
    "KUAKE-IR-Micro-F1": 100 * (1 + 2 * 2 / 3) / 3,
    "KUAKE-QQR-Micro-F1": 100 * (2 / 3 + 0) / 2,
    "KUAKE-QTR-Micro-F1": 100 * (2 * 2 / 3 + 2 / 3) / 3,
    # macro over the union {疾病 2/3, 年龄 0, 非上述类型 (the empty answer) 0, 其他 0}
    "CHIP-CTC-Macro-F1": 100 * (2 / 3) / 4,
    "KUAKE-QIC-Macro-F1": 100.0,
    "IMCS-V2-DAC-Macro-F1": 100 * (2 / 3 + 1 + 0) / 3,
    # BasicTokenizer tokens: 11 vs 8 with LCS 8; 'ct 检 查' etc. 7 vs '无 。' with LCS 1
    "MedDG-RougeL": 100 * (rouge_f(8, 8, 11) + rouge_f(1, 2, 7)) / 2,
    # pairs: 主诉 identical (5); 现病史 missing -> '无 。' vs 5 tokens; 诊断 6 vs 7 tokens, LCS 1; item 2 '无 。' vs 5
    "IMCS-V2-MRG-RougeL": 100 * (rouge_f(5, 5, 5) + rouge_f(1, 2, 5) + rouge_f(1, 6, 7) + rouge_f(1, 2, 5)) / 4,
}


def lines(items=ITEMS, choices=CHOICES):
    data, preds = [], []
    for task, pairs in items.items():
        for i, (gold, pred) in enumerate(pairs):
            row = {"input": f"{task} prompt {i}", "target": gold, "answer_choices": choices.get(task),
                   "task_type": "t", "task_dataset": task, "sample_id": f"{task}-{i}"}
            data.append(row)
            preds.append({**row, "target": pred})
    return data, preds


def write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pcb")
    data, preds = lines()
    data.append({"input": "x", "target": "y", "answer_choices": None, "task_type": "t", "task_dataset": "Text2DT",
                 "sample_id": "t2dt-0"})  # not among the 16: skipped with a note
    res = run_benchmark("promptcblue", tmp / "out", predictions=write(tmp / "p.jsonl", preds),
                        data=[write(tmp / "d.jsonl", data)], resamples=100, progress=False, html=False)
    return res, tmp


def test_every_task_metric_by_hand(scored):
    res, _ = scored
    assert set(EXPECTED) == {metric_name(t) for t in TASKS}
    for k, v in EXPECTED.items():
        assert res["metrics"][k]["value"] == pytest.approx(v, abs=1e-9), k
    assert res["metrics"]["score"]["value"] == pytest.approx(sum(EXPECTED.values()) / 16, abs=1e-9)
    assert res["n"] == sum(len(v) for v in ITEMS.values())
    assert any("Text2DT (1)" in n for n in res["notes"])
    assert res["scale"] == 100.0 and "b0753a6" in res["protocol"]


def test_intervals_are_stratified_by_task(scored):
    res, tmp = scored
    assert res["bootstrap"]["stratified"] is True
    for k, m in res["metrics"].items():
        if k == "KUAKE-QIC-Macro-F1":  # every answer right: every resample gives 100
            assert m["ci95"] == [100.0, 100.0]
        assert m["ci95"][0] <= m["ci95"][1], k
    rows = [json.loads(x) for x in (tmp / "out" / "predictions.jsonl").read_text().splitlines()]
    sts = [r for r in rows if r["task"] == "CHIP-STS"]
    assert [r["parsed_prediction"] for r in sts] == ["是的", "不是", "", "是的"]
    assert [r["correct"] for r in sts] == [True, True, True, False]  # the empty answer becomes 是的


def test_parse_rules():
    assert parse("CMeEE-V2", "引导\n疾病实体：高血压， 糖尿病 ，，\n 疾病实体：X\n疾病实体甲", NER_CH) == [
        {"entity": "高血压", "type": "疾病"}, {"entity": "糖尿病", "type": "疾病"}, {"entity": "疾病实体甲", "type": "疾病"}]
    assert parse("CMeEE-V2", "疾病实体：A疾病实体：B", NER_CH) == [{"entity": "AB", "type": "疾病"}]  # every '疾病实体：' goes
    assert parse("CMeIE", "具有病因关系的头尾实体对如下：头实体为A，尾实体为B。头实体为C", None) == [
        {"predicate": "病因", "subject": "A", "object": "B"}]
    assert parse("CMeIE-V2", "头实体为A，尾实体为B", None) == [
        {"predicate": "体为A，尾实体为B", "subject": "A", "object": "B"}]  # line[2:] drops "头实"
    assert parse("CHIP-CDN", "高血压，肺炎\n肺炎，高血压，肺炎", CDN_CH) == [
        {"entity": "肺炎", "type": "normalization"}, {"entity": "高血压", "type": "normalization"}]
    assert parse("CHIP-CDN", "高血压", None) == []  # null choices: nothing is a choice
    ev = parse("CHIP-CDEE", "引导\n主体词：发生状态：否定；描述词：a，，b\n", None)
    assert ev == [{"主体词": "发生状态：否定", "发生状态": "否定", "描述词": ["a", "b"], "解剖部位": []},
                  {"主体词": "", "发生状态": "", "描述词": [], "解剖部位": []}]
    assert parse("CHIP-MDCFNPC", "引导\n咳嗽：未患有症状疾病\n发热：x\n无冒号\n a：b：c", MDC_CH) == [
        {"entity": "咳嗽", "attr": "未患有症状疾病"}, {"entity": "发热", "attr": "不标注"}]
    assert parse("IMCS-V2-SR", "引导\n咳嗽：患有该症状 ", SR_CH) == [
        {"entity": "咳嗽", "attr": "无法根据上下文确定病人是否患有该症状"}]
    assert parse("IMCS-V2-MRG", "  报告\n主诉：头痛，主诉：发热\n诊断：A\n 建议：B\n诊断：C", None) == {
        "主诉": "发热", "诊断": "C"}
    assert parse("IMCS-V2-MRG", "主诉：头痛", None) == {}
    assert parse("CHIP-STS", " 相同\n", None) == "是的" and parse("CHIP-STS", "不同", None) == "不是"
    assert parse("CHIP-STS", "相同吗", None) == "相同吗"
    assert parse("KUAKE-QIC", "  病因分析 \n", None) == "病因分析"
    assert parse("MedDG", " 你好 ", None) == "你好"
    with pytest.raises(ValueError):
        parse("Text2DT", "x", None)


def test_classification_agrees_with_sklearn():
    from sklearn.metrics import classification_report

    rng = np.random.default_rng(0)
    labels = ["相关", "不相关", "其他"]
    for macro, task in ((True, "KUAKE-QIC"), (False, "KUAKE-IR")):
        for _ in range(30):
            gold = list(rng.choice(labels[:2], 12))
            pred = list(rng.choice(labels + [""], 12))
            filled = [p if p else ("非上述类型" if macro else "相关") for p in pred]
            rep = classification_report(gold, filled, output_dict=True, zero_division=0)
            want = 100 * rep["macro avg" if macro else "weighted avg"]["f1-score"]
            assert score_task(task, gold, pred) == pytest.approx(want, abs=1e-9)


def test_extraction_resample_equals_rescoring_the_resampled_items():
    bench = get_benchmark("promptcblue")
    data, preds = lines({"CMeEE-V2": ITEMS["CMeEE-V2"] * 3})
    recs = [{**r, "id": r["sample_id"], "task": "CMeEE-V2"} for r in data]
    sc = bench.score(bench.from_predictions(preds, recs, bench.options(), "p"), bench.options())
    idx = np.array([0, 0, 1, 3, 3, 3])
    want = score_task("CMeEE-V2", [data[i]["target"] for i in idx], [preds[i]["target"] for i in idx],
                      [NER_CH] * len(idx))
    assert sc.stat(idx)["CMeEE-V2-Micro-F1"] == pytest.approx(want, abs=1e-12)


def test_prediction_answer_choices_parse_the_prediction(tmp_path):
    data, preds = lines({"CHIP-CDN": [("高血压", "高血压，心衰")]})
    preds[0]["answer_choices"] = ["高血压", "心衰"]  # the official code parses each file with its own choices
    res = run_benchmark("promptcblue", tmp_path / "o", predictions=write(tmp_path / "p.jsonl", preds),
                        data=[write(tmp_path / "d.jsonl", data)], resamples=0, progress=False, html=False)
    assert res["metrics"]["CHIP-CDN-Micro-F1"]["value"] == pytest.approx(f1(1, 1, 0))
    assert res["metrics"]["score"]["value"] == pytest.approx(f1(1, 1, 0))  # one task present: its metric
    assert any("1 of the 16 tasks" in n for n in res["notes"])


def test_missing_prediction_and_missing_data_are_errors(tmp_path):
    data, preds = lines({"KUAKE-IR": ITEMS["KUAKE-IR"]})
    d = write(tmp_path / "d.jsonl", data)
    with pytest.raises(InvalidInputError, match="no prediction"):
        run_benchmark("promptcblue", tmp_path / "o", predictions=write(tmp_path / "p.jsonl", preds[:-1]), data=[d],
                      resamples=0, progress=False, html=False)
    with pytest.raises(InvalidInputError, match="needs --data"):
        run_benchmark("promptcblue", tmp_path / "o", predictions=write(tmp_path / "p.jsonl", preds), resamples=0,
                      progress=False, html=False)
    bad = [dict(data[0])]
    del bad[0]["target"]
    with pytest.raises(InvalidInputError, match="target"):
        run_benchmark("promptcblue", tmp_path / "o", predictions=write(tmp_path / "p.jsonl", preds),
                      data=[write(tmp_path / "bad.jsonl", bad)], resamples=0, progress=False, html=False)


def test_perfect_predictions_score_100_except_rouge_epsilon():
    for task, pairs in ITEMS.items():
        golds = [g for g, _ in pairs]
        v = score_task(task, golds, golds, [CHOICES.get(task)] * len(golds))
        if task in ("MedDG", "IMCS-V2-MRG"):
            assert v == pytest.approx(100.0, abs=1e-5) and v < 100.0  # rouge_chinese's +1e-8 in the F denominator
        elif task == "CHIP-CDN":
            assert v == pytest.approx(100 * 1.0)  # 2 of 3 golds are non-empty; the empty one adds nothing
        else:
            assert v == pytest.approx(100.0), task
    assert not math.isnan(score_task("CHIP-CDN", ["没有对应的标准化实体"], ["无"], [CDN_CH]))
