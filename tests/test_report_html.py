"""``report.html`` of a suite run on a tiny checkpoint, opened in a real headless Chromium (Debian ``chromium``).

The page must load with no console message at all (errors included: Chromium's ``--enable-logging=stderr``
prints every console message as a ``CONSOLE`` line), run its script to the end (it sets ``data-ready``),
hold every section, and render to a screenshot. A page with a script error is the control: the check sees it.
"""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from tests.conftest import SAMPLE

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make system-deps)")]


def chromium(tmp_path, page, *flags, timeout=180) -> subprocess.CompletedProcess:
    """Headless Chromium on a local page; stderr carries its log (console messages included)."""
    profile = tmp_path / "chromium-profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", *flags, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def console_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln]


@pytest.fixture(scope="module")
def suite_page(tiny_llm, tmp_path_factory, pydicom_files):
    from medmm.config import ModelConfig, config_from_dict
    from medmm.eval.suite import run_suite
    from medmm.model.multimodal import MedMMForCausalLM
    from medmm.prepare.molecules import prepare_molecules
    from medmm.prepare.vqa import prepare_vqa
    from tests.conftest import model_dict

    tmp = tmp_path_factory.mktemp("html")
    torch.manual_seed(0)
    ckpt = MedMMForCausalLM.from_config(config_from_dict(ModelConfig, model_dict(tiny_llm))).save_pretrained(
        tmp / "ckpt")
    data = tmp / "data"
    prepare_vqa(SAMPLE / "vqa_rad/testset.json", SAMPLE / "vqa_rad/images", data, name="vqa")
    prepare_molecules(SAMPLE / "molecules/clintox_sample.csv", data, label_col="FDA_APPROVED", name="molecules")
    vqa = [json.loads(x) for x in (data / "vqa_eval.jsonl").read_text().splitlines()[:5]]
    vqa.append({"id": "ct-1", "modalities": {"image": str(pydicom_files / "CT_small.dcm")},
                "conversations": [{"from": "human", "value": "<image>\nWhat is the modality?"},
                                  {"from": "gpt", "value": "CT"}]})
    (data / "vqa_small.jsonl").write_text("".join(json.dumps(r) + "\n" for r in vqa))
    (data / "mcq.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"id": "m1", "question": "Which modality uses ionising radiation?", "options": ["MRI", "CT", "Ultrasound"],
         "answer": "CT"},
        {"id": "m2", "Question": "下列哪项是糖尿病的典型症状？", "Options": "A 多饮\nB 咳嗽\nC 头晕", "Answer": "A"}]))
    (data / "pcb.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"input": "判断下面搜索词的意图：\n感冒吃什么药？\n答：", "target": "治疗方案", "answer_choices": ["治疗方案", "病因分析"],
         "task_type": "cls", "task_dataset": "KUAKE-QIC", "sample_id": "p1"},
        {"input": "找出句子中的疾病实体：\n患者有高血压。\n答：", "target": "上述句子中的实体包含：\n疾病实体：高血压",
         "answer_choices": ["疾病"], "task_type": "ner", "task_dataset": "CMeEE-V2", "sample_id": "p2"}]))
    (tmp / "suite.yaml").write_text(
        "suite: html-test\nresamples: 50\nbenchmarks:\n"
        "  - {name: vqa, data: [data/vqa_small.jsonl], options: {max_new_tokens: 3}}\n"
        "  - {name: report, data: [data/vqa_small.jsonl], limit: 3, options: {max_new_tokens: 6, meteor: false}}\n"
        "  - {name: mcq, data: [data/mcq.jsonl]}\n"
        "  - {name: promptcblue, data: [data/pcb.jsonl], options: {max_new_tokens: 4}}\n"
        "  - {name: druggability, data: [data/molecules_eval.jsonl], limit: 8}\n")
    doc = run_suite(tmp / "suite.yaml", ckpt, tmp / "out", data_root=tmp, progress=False)
    return tmp, doc


def test_results_json(suite_page):
    tmp, doc = suite_page
    assert json.loads((tmp / "out" / "results.json").read_text()) == json.loads(json.dumps(doc))
    assert list(doc["benchmarks"]) == ["vqa", "report", "mcq", "promptcblue", "druggability"]
    assert doc["benchmarks"]["vqa"]["n"] == 6 and doc["benchmarks"]["druggability"]["n"] == 8


def test_page_loads_in_chromium_without_console_errors(suite_page, tmp_path):
    tmp, doc = suite_page
    r = chromium(tmp_path, tmp / "out" / "report.html", "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    assert console_lines(r.stderr) == []
    dom = r.stdout
    assert 'data-ready="1"' in dom  # the script ran to its last line
    assert 'id="summary"' in dom
    for label, res in doc["benchmarks"].items():
        assert f'id="bench-{label}"' in dom
        assert f"{res['n'] + res['errors']} of {res['n'] + res['errors']} rows" in dom  # the filter script counted
    assert dom.count('class="thumb"') >= 7  # 5 VQA-RAD JPEGs + the DICOM, and the report rows
    assert dom.count('class="plot"') == len(doc["benchmarks"])
    assert "CMeEE-V2" in dom and "protocol: r2gen/iu_xray" in dom


def test_screenshot(suite_page, tmp_path):
    from PIL import Image

    tmp, _ = suite_page
    shot = tmp / "out" / "report.png"
    r = chromium(tmp_path, tmp / "out" / "report.html", f"--screenshot={shot}", "--window-size=1280,2200",
                 "--hide-scrollbars")
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert img.shape == (2200, 1280) and img.std() > 20  # a rendered page, not a blank one


def test_the_check_sees_a_console_error(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><p>x</p><script>undefinedFunction();</script></body></html>")
    r = chromium(tmp_path, bad, "--dump-dom")
    assert any("undefinedFunction is not defined" in ln for ln in console_lines(r.stderr))
