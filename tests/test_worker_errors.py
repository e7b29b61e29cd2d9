"""Records that fail to load inside DataLoader worker processes still reach ``errors.jsonl`` (2 ranks x 2 workers)."""

import json

import pytest
import yaml

from tests.conftest import REPO, SAMPLE, model_dict
from tests.test_training import torchrun

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]


def test_worker_load_failures_reach_errors_jsonl(tmp_path, tiny_llm):
    imgs = sorted((SAMPLE / "vqa_rad" / "images").glob("*.jpg"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(imgs[0].read_bytes()[:300])  # a JPEG cut short
    recs = []
    for i in range(12):
        recs.append({"id": f"ok{i}", "modalities": {"image": str(imgs[i])},
                     "conversations": [{"from": "human", "value": "<image>\nIs there an abnormality?"},
                                       {"from": "gpt", "value": "yes" if i % 2 else "no"}]})
    bad = [
        {"id": "bad_img", "modalities": {"image": str(broken)},
         "conversations": [{"from": "human", "value": "<image>\nAbnormal?"}, {"from": "gpt", "value": "no"}]},
        {"id": "missing_img", "modalities": {"image": str(tmp_path / "nowhere.png")},
         "conversations": [{"from": "human", "value": "<image>\nAbnormal?"}, {"from": "gpt", "value": "no"}]},
        {"id": "bad_smiles", "modalities": {"mol": "C1CC(("},
         "conversations": [{"from": "human", "value": "<mol>\nDrug-like?"}, {"from": "gpt", "value": "no"}]},
    ]
    for j, b in enumerate(bad):  # spread the bad records so each rank meets some
        recs.insert(3 + 4 * j, b)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    md = model_dict(tiny_llm)
    md["modalities"] = {k: v for k, v in md["modalities"].items() if k in ("image", "mol")}
    cfg = {"model": md,
           "data": {"datasets": [{"path": str(data)}], "max_length": 128, "num_workers": 2},
           "trainer": {"output_dir": str(tmp_path / "run"), "deepspeed": str(REPO / "configs/deepspeed/zero2.json"),
                       "max_steps": 8, "micro_batch_size": 2, "save_every": 100, "seed": 0}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = torchrun(path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "errors.jsonl").read_text().splitlines()]
    named = " ".join(line["path"] for line in lines)
    for what in ("broken.jpg", "nowhere.png", "C1CC(("):  # each error names the input that failed
        assert what in named, lines
    assert all(line["error"] and line["message"] for line in lines)
    assert len(lines) == 3  # each failure once, whatever the number of workers and ranks that met it
