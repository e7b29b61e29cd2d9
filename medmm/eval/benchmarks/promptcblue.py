"""``promptcblue``: the 16 Chinese medical tasks of PromptCBLUE (Zhu et al. 2023), scored as the official scorer does.

Data: PromptCBLUE's JSON lines ``{"input", "target", "answer_choices", "task_type", "task_dataset",
"sample_id"}``. Predictions: the same format with the generated text in ``target`` (``prediction`` is read
when present), matched by ``sample_id``; ``--data`` is required (it holds the references).

The reference is the official scorer at commit b0753a6 of github:michael-wzhu/PromptCBLUE
(``src/evaluation/``): ``post_generate_process.py`` turns generated text into structures, and the same
function turns the reference ``target`` into the gold structures (its ``dev_structured.json`` is exactly that);
``evaluators.py`` and ``evaluate.py`` score them. This module reimplements both, quirks included:

* parsing (:func:`parse`), per task:
    - CMeEE-V2, IMCS-V2-NER: for each answer choice ``c``, every line starting with ``c实体`` gives mentions
      (the line with every ``c实体：`` removed, split on '，', stripped, empty dropped) of type ``c``;
    - CMeIE-V2 (``CMeIE`` accepted): per line, the predicate is the text before ``关系的头尾实体对`` minus
      its first two characters (``具有``), stripped; ``具有{predicate}关系的头尾实体对如下：`` is removed and the
      rest split on '。'; each piece holding ``，尾实体为`` gives (head without ``头实体为``, tail without
      ``尾实体为``), stripped - a line without the header still parses, with a garbled predicate;
    - CHIP-CDN: only the last line, split on '，', stripped, kept when in the answer choices, deduplicated;
    - CHIP-CDEE: every line after the first is one event (an empty line too), its ``；``-separated fields
      read by prefix ``主体词：``/``发生状态：``/``描述词：``/``解剖部位：``; the last two split on '，'. A field
      is tested against the keys in that order *after* earlier keys stripped it (``主体词：发生状态：否定`` sets
      both); missing fields are '' or [];
    - CHIP-MDCFNPC, IMCS-V2-SR: every line after the first with exactly one '：' is ``finding：conclusion``;
      a conclusion that is not an answer choice (not stripped first) becomes ``不标注`` or
      ``无法根据上下文确定病人是否患有该症状``;
    - IMCS-V2-MRG: lines after the first of the stripped text starting with ``主诉：``, ``现病史：``,
      ``辅助检查：``, ``既往史：``, ``诊断：``, ``建议：`` give that section (text after the *last*
      occurrence of the key, stripped; a later line wins);
    - classification tasks and MedDG: the stripped text; CHIP-STS maps ``相同`` to ``是的`` and ``不同`` to ``不是``.
* scoring, per task (x100, the official 0-100 scale):
    - extraction (CMeEE-V2, CMeIE-V2, CHIP-CDN, CHIP-CDEE, IMCS-V2-NER, CHIP-MDCFNPC, IMCS-V2-SR): micro F1
      over strict matches; an item is the *values* (``json.dumps``, sorted by key) of each structure, as a
      set per sample; TP/FP/FN summed over samples; 0 when there is no TP;
    - classification: scikit-learn's ``classification_report(gold, pred, zero_division=0)`` over the union
      of gold and predicted labels (the official label lists do not restrict it: only their first label is
      used, for an empty prediction). CHIP-CTC, KUAKE-QIC and IMCS-V2-DAC report the macro F1; CHIP-STS,
      KUAKE-IR, KUAKE-QQR and KUAKE-QTR the support-weighted F1 (named ``Micro-F1`` in the official map);
    - MedDG: ROUGE-L F of rouge_chinese 1.0.3 averaged over samples, after transformers' ``BasicTokenizer``
      (Chinese characters split, English lower-cased) and ``无 。`` for an empty text;
    - IMCS-V2-MRG: the same, per (sample, gold section) pair, a missing predicted section being empty.
* ``score``: the mean of the task metrics over the tasks present (the official ``Overall`` divides by all
  18 of its tasks, Text2DT and CMedCausal included; those two are not scored here and their records are
  skipped with a note).

Where the official code would crash (``answer_choices`` null for a task that tests membership), a null list
is taken as empty. Intervals resample samples within each task (stratified) and recompute every metric.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import InvalidInputError
from ...utils import read_jsonl
from .registry import Benchmark, RunContext, Scored, register_benchmark

__all__ = ["CLASSIFICATION", "EXTRACTION", "GENERATION", "TASKS", "PromptCBLUEBenchmark", "canonical_task",
           "metric_name", "parse", "score_task"]

OFFICIAL_COMMIT = "b0753a6"

EXTRACTION = ["CMeEE-V2", "CMeIE-V2", "CHIP-CDN", "CHIP-CDEE", "IMCS-V2-NER", "CHIP-MDCFNPC", "IMCS-V2-SR"]

# task -> (the official label list, macro average?). Only the first label matters to the score: it replaces an
# empty prediction. The lists are the official ones verbatim (CHIP-CTC's '体征(医生检测）' mixes brackets).
CLASSIFICATION: dict[str, tuple[list[str], bool]] = {
    "CHIP-STS": (["是的", "不是"], False),
    "CHIP-CTC": (['非上述类型', '疾病', '症状(患者感受)', '体征(医生检测）', '怀孕相关', '肿瘤进展', '疾病分期', '过敏耐受',
                  '器官组织状态', '预期寿命', '口腔相关', '药物', '治疗或手术', '设备', '护理', '诊断', '实验室检查',
                  '风险评估', '受体状态', '年龄', '特殊病人特征', '读写能力', '性别', '教育情况', '居住情况', '种族',
                  '知情同意', '参与其它试验', '研究者决定', '能力', '伦理审查', '依存性', '成瘾行为', '睡眠', '锻炼',
                  '饮食', '酒精使用', '性取向', '吸烟状况', '献血', '病例来源', '残疾群体', '健康群体', '数据可及性',
                  "含有多个类别"], True),
    "IMCS-V2-DAC": (['非上述类型', '关于症状的询问', '关于症状的回答', '关于病因的询问', '关于病因的回答',
                     '关于个人基本信息的询问', '关于个人基本信息的回答', '关于已有检查和治疗的提问',
                     '关于已有检查和治疗的回答', '关于用药建议的提问', '关于用药建议的解答', '关于就医建议的提问',
                     '关于就医建议的解答', '关于注意事项的提问', '关于注意事项的解答', '给出诊断'], True),
    "KUAKE-IR": (["相关", "不相关"], False),
    "KUAKE-QIC": (['非上述类型', "病情诊断", "病因分析", "治疗方案", "就医建议", "指标解读", "疾病描述", "后果表述",
                   "注意事项", "功效作用", "医疗费用"], True),
    "KUAKE-QTR": (["完全不匹配或者没有参考价值", "很少匹配有一些参考价值", "部分匹配", "完全匹配"], False),
    "KUAKE-QQR": (["完全一致", "后者是前者的语义子集", "后者是前者的语义父集", "语义无直接关联"], False),
}
GENERATION = ["MedDG", "IMCS-V2-MRG"]
# the official score map's order
TASKS = ["CMeEE-V2", "CMeIE-V2", "CHIP-CDN", "CHIP-CDEE", "IMCS-V2-NER", "CHIP-MDCFNPC", "IMCS-V2-SR", "IMCS-V2-DAC",
         "IMCS-V2-MRG", "CHIP-CTC", "CHIP-STS", "KUAKE-IR", "KUAKE-QIC", "KUAKE-QQR", "KUAKE-QTR", "MedDG"]
ALIASES = {"CMeIE": "CMeIE-V2"}
OFFICIAL_UNSCORED = {"Text2DT", "CMedCausal"}

_CDEE_KEYS = ["主体词", "发生状态", "描述词", "解剖部位"]
_MRG_KEYS = ["主诉：", "现病史：", "辅助检查：", "既往史：", "诊断：", "建议："]
_ATTR_DEFAULT = {"CHIP-MDCFNPC": "不标注", "IMCS-V2-SR": "无法根据上下文确定病人是否患有该症状"}


def canonical_task(name: str) -> str:
    """The official task key of a ``task_dataset`` value (``CMeIE`` -> ``CMeIE-V2``)."""
    return ALIASES.get(name, name)


def metric_name(task: str) -> str:
    """The official score-map key: ``<task>-Macro-F1``, ``<task>-RougeL`` or ``<task>-Micro-F1``."""
    if task in GENERATION:
        return f"{task}-RougeL"
    if task in CLASSIFICATION and CLASSIFICATION[task][1]:
        return f"{task}-Macro-F1"
    return f"{task}-Micro-F1"


# ----------------------------------------------------------------------------- parsing (post_generate_process)
def _choices(answer_choices) -> list | str:
    return [] if answer_choices is None else answer_choices


def _parse_ner(text: str, choices) -> list[dict]:
    if not isinstance(choices, list):
        raise ValueError("NER needs answer_choices as a list of entity types")
    out = []
    for choice in choices:
        for piece in text.split("\n"):
            if piece.startswith(f"{choice}实体"):
                mentions = piece.replace(f"{choice}实体：", "").split("，")
                out.extend({"entity": m, "type": choice} for m in (w.strip() for w in mentions) if m)
    return out


def _parse_cmeie(text: str) -> list[dict]:
    out = []
    for line in text.split("\n"):
        predicate = line.split("关系的头尾实体对")[0][2:].strip()
        line = line.replace(f"具有{predicate}关系的头尾实体对如下：", "")
        for spo in line.split("。"):
            parts = spo.split("，尾实体为")
            if len(parts) < 2:
                continue
            head, tail = parts[:2]
            out.append({"predicate": predicate, "subject": head.replace("头实体为", "").strip(),
                        "object": tail.replace("尾实体为", "").strip()})
    return out


def _parse_cdn(text: str, choices) -> list[dict]:
    last = text.split("\n")[-1]
    names = [w.strip() for w in last.split("，") if len(w.strip()) > 0]
    names = [w for w in names if w in _choices(choices)]
    return [{"entity": w, "type": "normalization"} for w in dict.fromkeys(names)]


def _parse_cdee(text: str) -> list[dict]:
    events = []
    for line in text.split("\n")[1:]:
        info: dict = {}
        for attr in line.split("；"):
            for key in _CDEE_KEYS:  # `attr` is rebound as keys match: later keys test the stripped text
                if attr.startswith(f"{key}："):
                    attr = attr.replace(f"{key}：", "").strip()
                    if key in ("描述词", "解剖部位"):
                        info[key] = [w.strip() for w in attr.split("，") if len(w.strip()) > 0]
                    else:
                        info[key] = attr
        for key in _CDEE_KEYS:
            info.setdefault(key, [] if key in ("描述词", "解剖部位") else "")
        events.append(info)
    return events


def _parse_attr(text: str, choices, default: str) -> list[dict]:
    out = []
    for line in text.split("\n")[1:]:
        parts = line.split("：")
        if len(parts) != 2:
            continue
        finding, conclusion = parts
        if conclusion not in _choices(choices):
            conclusion = default
        out.append({"entity": finding.strip(), "attr": conclusion})
    return out


def _parse_mrg(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    lines = text.strip().split("\n")[1:]
    for key in _MRG_KEYS:
        for line in lines:
            if line.startswith(key):
                out[key[:-1]] = line.strip().split(key)[-1].strip()
    return out


def parse(task: str, text: str, answer_choices=None):
    """Generated (or reference) text -> the official structure for ``task`` (see the module docstring)."""
    task = canonical_task(task)
    if task in ("CMeEE-V2", "IMCS-V2-NER"):
        return _parse_ner(text, answer_choices)
    if task == "CMeIE-V2":
        return _parse_cmeie(text)
    if task == "CHIP-CDN":
        return _parse_cdn(text, answer_choices)
    if task == "CHIP-CDEE":
        return _parse_cdee(text)
    if task in _ATTR_DEFAULT:
        return _parse_attr(text, answer_choices, _ATTR_DEFAULT[task])
    if task == "IMCS-V2-MRG":
        return _parse_mrg(text)
    if task == "CHIP-STS":
        s = text.strip()
        return {"相同": "是的", "不同": "不是"}.get(s, s)
    if task in CLASSIFICATION or task == "MedDG":
        return text.strip()
    raise ValueError(f"unknown PromptCBLUE task '{task}'")


# ----------------------------------------------------------------------------- per-item statistics
def _as_set(structs: list[dict]) -> set[tuple]:
    return {tuple(json.dumps(s[k], ensure_ascii=False) for k in sorted(s)) for s in structs}


_TOKENIZER = None


def _tokenize(text: str) -> str:
    """transformers' BasicTokenizer (Chinese characters split, lower-cased), joined by spaces; '无 。' if empty."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import BasicTokenizer

        _TOKENIZER = BasicTokenizer(tokenize_chinese_chars=True)
    s = " ".join(_TOKENIZER.tokenize(text)).strip()
    return s if s.strip() else "无 。"


def _rouge_l(hyps: list[str], refs: list[str]) -> list[float]:
    """rouge_chinese ROUGE-L F per pair (the official scorer averages these)."""
    if not hyps:
        return []
    from rouge_chinese import Rouge

    return [float(s["rouge-l"]["f"]) for s in Rouge(metrics=["rouge-l"]).get_scores(list(hyps), list(refs))]


class _TaskScorer:
    """One task's per-item statistics and its metric on any resample of its items (local indices)."""

    def __init__(self, task: str, gold: list, pred: list):
        self.task, self.n = task, len(gold)
        if task in EXTRACTION:
            st = []
            for g, p in zip(gold, pred):
                gs, ps = _as_set(g), _as_set(p)
                st.append((len(gs & ps), len(ps - gs), len(gs - ps)))
            self.counts = np.asarray(st, dtype=np.float64).reshape(-1, 3)  # (n, 3) tp, fp, fn
            self.correct = [g_ == p_ for g_, p_ in ((_as_set(g), _as_set(p)) for g, p in zip(gold, pred))]
        elif task in CLASSIFICATION:
            labels, self.macro = CLASSIFICATION[task]
            for i, g in enumerate(gold):
                if g == "":
                    raise ValueError(f"item {i}: an empty reference label")
            pred = [p if p != "" else labels[0] for p in pred]  # the official default for an empty answer
            names = sorted(set(gold) | set(pred))
            code = {s: i for i, s in enumerate(names)}
            self.y = np.asarray([code[g] for g in gold], dtype=np.int64)
            self.p = np.asarray([code[q] for q in pred], dtype=np.int64)
            self.k = len(names)
            self.correct = [g == q for g, q in zip(gold, pred)]
        elif task == "MedDG":
            self.pair_item = np.arange(self.n)
            self.pair_f = np.asarray(_rouge_l([_tokenize(p) for p in pred], [_tokenize(g) for g in gold]))
            self.correct = [None] * self.n
        elif task == "IMCS-V2-MRG":
            items, hyps, refs = [], [], []
            for i, (g, p) in enumerate(zip(gold, pred)):
                for key in g:
                    items.append(i)
                    hyps.append(_tokenize(p.get(key, "").strip()))
                    refs.append(_tokenize(g[key].strip()))
            self.pair_item = np.asarray(items, dtype=np.int64)
            self.pair_f = np.asarray(_rouge_l(hyps, refs), dtype=np.float64)
            self.correct = [None] * self.n
        else:
            raise ValueError(f"unknown PromptCBLUE task '{task}'")

    def item_scores(self) -> list[float | None]:
        """Per-item ROUGE-L (generation tasks; mean over sections for IMCS-V2-MRG), x100."""
        if self.task not in GENERATION:
            return [None] * self.n
        tot = np.bincount(self.pair_item, weights=self.pair_f, minlength=self.n)
        cnt = np.bincount(self.pair_item, minlength=self.n)
        return [round(100 * t / c, 2) if c else None for t, c in zip(tot, cnt)]

    def metric(self, idx: np.ndarray) -> float | None:
        """The task's official metric (x100) over the items ``idx`` (repeats allowed)."""
        if idx.size == 0:
            return None
        if self.task in EXTRACTION:
            tp, fp, fn = self.counts[idx].sum(axis=0)
            if not tp:
                return 0.0
            p, r = tp / (tp + fp), tp / (tp + fn)
            return 100 * 2 * p * r / (p + r)
        if self.task in CLASSIFICATION:
            y, p = self.y[idx], self.p[idx]
            support = np.bincount(y, minlength=self.k).astype(np.float64)
            predicted = np.bincount(p, minlength=self.k).astype(np.float64)
            tp = np.bincount(y[y == p], minlength=self.k).astype(np.float64)
            present = (support + predicted) > 0  # classification_report's labels: the union of both
            f1 = np.where(support + predicted > 0, 2 * tp / np.maximum(support + predicted, 1), 0.0)
            if self.macro:
                return float(100 * f1[present].mean())
            return float(100 * (support * f1).sum() / support.sum())
        counts = np.bincount(idx, minlength=self.n).astype(np.float64)
        w = counts[self.pair_item]
        if w.sum() == 0:
            return None
        return float(100 * (w * self.pair_f).sum() / w.sum())


def score_task(task: str, gold_texts: list[str], pred_texts: list[str], gold_choices: list | None = None,
               pred_choices: list | None = None) -> float | None:
    """One task's official metric (0-100) from reference and generated texts (parsed as the official code does)."""
    task = canonical_task(task)
    gold_choices = gold_choices or [None] * len(gold_texts)
    pred_choices = pred_choices or gold_choices
    gold = [parse(task, t, c) for t, c in zip(gold_texts, gold_choices)]
    pred = [parse(task, t, c) for t, c in zip(pred_texts, pred_choices)]
    return _TaskScorer(task, gold, pred).metric(np.arange(len(gold)))


# ----------------------------------------------------------------------------- the benchmark
def _record(row: dict, source: str, i: int) -> dict:
    for k in ("input", "target", "task_dataset", "sample_id"):
        if k not in row:
            raise InvalidInputError(f"{source}:{i + 1}", f"a PromptCBLUE line needs '{k}'")
    return row


@register_benchmark
class PromptCBLUEBenchmark(Benchmark):
    name = "promptcblue"
    summary = "PromptCBLUE: 16 Chinese medical tasks, official parsing and scoring (0-100)"
    headline = "score"
    scale = 100.0

    @dataclass
    class Options:
        max_new_tokens: int = 256
        """Tokens generated per prompt (with --checkpoint)."""

    def protocol(self, opts) -> str:
        from importlib.metadata import version

        return (f"promptcblue: official post_generate_process + evaluators at michael-wzhu/PromptCBLUE@"
                f"{OFFICIAL_COMMIT} (reimplemented): micro F1 (extraction), sklearn classification_report macro/"
                f"weighted F1 (classification), rouge_chinese {version('rouge_chinese')} ROUGE-L after BasicTokenizer "
                f"(MedDG, IMCS-V2-MRG per section); 0-100; score = mean over the tasks present")

    def load(self, paths: list[Path], opts) -> list[dict]:
        out = []
        self._skipped: dict[str, int] = {}
        for path in paths:
            for i, row in enumerate(read_jsonl(path)):
                row = _record(row, str(path), i)
                task = canonical_task(row["task_dataset"])
                if task not in TASKS:
                    self._skipped[row["task_dataset"]] = self._skipped.get(row["task_dataset"], 0) + 1
                    continue
                out.append({**row, "id": row["sample_id"], "task": task})
        return out

    def generate(self, records: list[dict], opts, ctx: RunContext) -> list[dict]:
        from ...config import DecodingConfig

        reqs = [{"id": r["id"], "question": r["input"]} for r in records]
        outs = ctx.predictor().predict(reqs, DecodingConfig(max_new_tokens=opts.max_new_tokens), ctx.batch_size)
        rows = []
        for r, o in zip(records, outs):
            row = self._row(r)
            if "error" in o:
                row.update(error=o["error"], message=o.get("message", ""))
            else:
                row["prediction"] = o["answer"]
            rows.append(row)
        return rows

    @staticmethod
    def _row(r: dict) -> dict:
        return {"id": r["id"], "task": r["task"], "task_dataset": r["task_dataset"], "task_type": r.get("task_type"),
                "answer_choices": r.get("answer_choices"), "question": r["input"], "reference": r["target"],
                "group": r["task"]}

    def from_predictions(self, predictions, records, opts, source):
        if records is None:
            raise InvalidInputError(source, "promptcblue needs --data: the references are in the data file")
        by_id = {p.get("sample_id", p.get("id")): p for p in predictions}
        missing = [r["id"] for r in records if r["id"] not in by_id]
        if missing:
            raise InvalidInputError(source, f"{len(missing)} samples have no prediction (first: {missing[0]!r}); "
                                            f"the official scorer rejects a submission with missing predictions")
        rows = []
        for r in records:
            p = by_id[r["id"]]
            row = self._row(r)
            if "task_dataset" in p and canonical_task(p["task_dataset"]) != r["task"]:
                raise InvalidInputError(f"{source} (sample_id={r['id']})",
                                        f"task {p['task_dataset']!r} but the data says {r['task_dataset']!r}")
            if "answer_choices" in p and p["answer_choices"] != r.get("answer_choices"):
                row["prediction_answer_choices"] = p["answer_choices"]  # the official code parses with these
            text = p.get("prediction", p.get("target"))
            if text is None:
                raise InvalidInputError(f"{source} (sample_id={r['id']})", "no generated text ('target')")
            row["prediction"] = str(text)
            rows.append(row)
        return rows

    def score(self, rows: list[dict], opts) -> Scored:
        by_task: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            by_task.setdefault(r["task"], []).append(i)
        scorers: dict[str, tuple[np.ndarray, _TaskScorer]] = {}
        out = [dict(r) for r in rows]
        for task in TASKS:
            if task not in by_task:
                continue
            idx = by_task[task]
            gold, pred = [], []
            for i in idx:
                r = rows[i]
                try:
                    gold.append(parse(task, r["reference"], r.get("answer_choices")))
                    pred.append(parse(task, r["prediction"], r.get("prediction_answer_choices",
                                                                     r.get("answer_choices"))))
                except ValueError as e:
                    raise InvalidInputError(f"sample_id={r['id']} ({task})", str(e)) from e
            try:
                sc = _TaskScorer(task, gold, pred)
            except ValueError as e:
                raise InvalidInputError(f"task {task}", str(e)) from e
            scorers[task] = (np.asarray(idx, dtype=np.int64), sc)
            for j, i in enumerate(idx):
                out[i].update(parsed_reference=gold[j], parsed_prediction=pred[j], correct=sc.correct[j])
            for j, s in zip(idx, sc.item_scores()):
                if s is not None:
                    out[j]["score"] = s
        position = np.full(len(rows), -1, dtype=np.int64)  # each row's index within its task
        code = np.full(len(rows), -1, dtype=np.int64)  # each row's task, as a number
        for t, (idx, _) in enumerate(scorers.values()):
            position[idx] = np.arange(len(idx))
            code[idx] = t

        def stat(sample: np.ndarray) -> dict:
            sample = np.asarray(sample, dtype=np.int64)
            codes = code[sample]
            res: dict[str, float | None] = {}
            vals = []
            for t, (task, (_, sc)) in enumerate(scorers.items()):
                v = sc.metric(position[sample[codes == t]])
                res[metric_name(task)] = v
                if v is not None:
                    vals.append(v)
            res["score"] = float(np.mean(vals)) if vals else None
            return res

        rows_task = [r["task"] for r in rows]
        notes = [f"{len(scorers)} of the 16 tasks present: score = their mean"] if len(scorers) < len(TASKS) else []
        skipped = getattr(self, "_skipped", {})
        if skipped:
            notes.append("records of tasks not scored, skipped: " + ", ".join(f"{k} ({v})" for k, v in skipped.items()))
        return Scored(stat=stat, rows=out, strata=rows_task, notes=notes)
