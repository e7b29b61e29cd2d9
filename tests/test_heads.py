"""The head stage's parts without the loop: every registered head, the featuriser registry, slide bags read lazily
with typed errors, and the bucketed batch order that ``--resume`` replays."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medmm.config import HeadStageConfig, config_from_dict
from medmm.model.heads import build_head, build_head_model, list_heads


@pytest.mark.parametrize("name", list_heads())
def test_every_head_maps_tokens_to_logits(name):
    head = build_head(name, in_dim=8, num_tokens=2, out_dim=3, hidden=16, dropout=0.0)
    tokens, mask = torch.randn(4, 2, 8), torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0]], dtype=torch.bool)
    out = head(tokens, mask)
    assert out.shape == (4, 3) and torch.isfinite(out).all()
    out.sum().backward()


def test_unknown_head_and_linear_needs_fixed_tokens():
    from medmm.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown head 'attn'.*linear.*mlp"):
        build_head("attn", in_dim=8, num_tokens=None, out_dim=1)
    with pytest.raises(ConfigError, match="fixed number of tokens"):
        build_head("linear", in_dim=8, num_tokens=None, out_dim=1)


def test_featuriser_registry_and_unknown_name():
    from medmm.data.featurisers import build_featuriser, list_featurisers
    from medmm.errors import ConfigError

    assert {"molecules", "dna", "slides"} <= set(list_featurisers())
    with pytest.raises(ConfigError, match="unknown featuriser 'proteins'.*dna"):
        build_featuriser(config_from_dict(HeadStageConfig, {"featuriser": "proteins", "data": {"split": "random"}}))


def slide_cfg(**extra):
    return config_from_dict(HeadStageConfig, {
        "featuriser": "slides", "loader": "slide_features", "type": "linear", "objective": "multiclass",
        "calibration": "none", "encoder": {"name": "abmil", "kwargs": {"in_dim": 8, "hidden": 16, "attn_dim": 8}},
        "preprocess": {"slide_feature_dim": 8, "slide_max_tiles": 50}, "data": {"split": "none"}, **extra})


def test_slide_bags_are_read_lazily_and_checked(tmp_path):
    from medmm.data.featurisers import build_featuriser, featurise_rows, label_parser
    from medmm.io.slide_features import save_slide_features
    from medmm.utils import write_jsonl

    rng = np.random.default_rng(0)
    save_slide_features(tmp_path / "a.safetensors", rng.normal(size=(120, 8)).astype(np.float32), None, {})
    save_slide_features(tmp_path / "wide.safetensors", rng.normal(size=(10, 4)).astype(np.float32), None, {})
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    write_jsonl(tmp_path / "s.jsonl", [
        {"id": "a", "modalities": {"slide": "a.safetensors"}, "label": "tumor"},
        {"id": "a-report", "modalities": {"slide": "a.safetensors"}, "report": "text"},  # no label: merged away
        {"id": "w", "modalities": {"slide": "wide.safetensors"}, "label": "normal"},
        {"id": "b", "modalities": {"slide": "broken.safetensors"}, "label": "normal"},
        {"id": "m", "modalities": {"slide": "missing.safetensors"}, "label": "normal"}])
    f = build_featuriser(slide_cfg(train_max_tokens=30))
    rows = f.read_rows(tmp_path / "s.jsonl")
    assert [r.label for r in rows] == ["tumor", "normal", "normal", "normal"]
    feats = featurise_rows(f, rows, label_parser(["normal", "tumor"], "label"))
    assert feats.labels == [1] and feats.items == [{"path": str(tmp_path / "a.safetensors")}]
    msgs = {e["path"].rsplit("/", 1)[-1]: e["message"] for e in feats.errors}
    assert "width 4" in msgs["wide.safetensors"] and "unreadable" in msgs["broken.safetensors"]
    assert "not found" in msgs["missing.safetensors"] and all(e["error"] == "SlideError" for e in feats.errors)
    train = f.load(feats.items[0], train=True, rng=np.random.default_rng(1))
    assert train["x"].shape == (30, 8)  # a random subset of train_max_tokens tiles
    again = f.load(feats.items[0], train=True, rng=np.random.default_rng(1))
    assert torch.equal(train["x"], again["x"])
    assert f.load(feats.items[0])["x"].shape == (50, 8)  # evaluation: slide_max_tiles, evenly spaced
    model = build_head_model(slide_cfg(classes=["normal", "tumor"]))
    assert model(f.collate([train])["x"]).shape == (1, 2)


def test_slide_jsonl_with_conflicting_labels_names_both_lines(tmp_path):
    from medmm.data.featurisers import build_featuriser
    from medmm.errors import InvalidInputError

    (tmp_path / "s.jsonl").write_text(json.dumps({"features": "x.safetensors", "label": "a"}) + "\n" +
                                      json.dumps({"features": "x.safetensors", "label": "b"}) + "\n")
    with pytest.raises(InvalidInputError, match=r"s.jsonl:2.*'b' here and 'a' at line 1"):
        build_featuriser(slide_cfg()).read_rows(tmp_path / "s.jsonl")


def test_bucketed_batches_resume_at_any_micro_step():
    from medmm.training.stages.head import BucketBatchSampler

    sizes = [int(s) for s in np.random.default_rng(0).integers(3, 40, 150)]
    full = BucketBatchSampler(sizes, 8, seed=5)
    it = iter(full)
    first = [next(it) for _ in range(3 * full.batches_per_epoch)]
    n = len(sizes)
    epoch0 = sorted(i for b in first[: full.batches_per_epoch] for i in b)
    assert epoch0 == list(range(n)) and full.batches_per_epoch == 19  # every item once per epoch
    assert max(i for b in first for i in b) >= 2 * n  # epoch e's keys are e * n + i (per-epoch tile sampling)
    for start in (0, 7, full.batches_per_epoch, 2 * full.batches_per_epoch + 3):
        resumed = iter(BucketBatchSampler(sizes, 8, seed=5, start=start))
        assert [next(resumed) for _ in range(5)] == first[start:start + 5]
    ranks = [BucketBatchSampler(sizes, 8, seed=5, rank=r, world=2) for r in (0, 1)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == 9
    b0, b1 = next(iter(ranks[0])), next(iter(ranks[1]))
    assert not set(b0) & set(b1)


@pytest.mark.slow
@pytest.mark.deepspeed
def test_head_stage_is_reproducible_from_its_seed(tmp_path, shared_data):
    """The same recipe and trainer.seed give the same weights and metrics (initialisation included); another seed
    gives other ones. (Before the stage registry, a head recipe's initialisation ignored trainer.seed.)"""
    import train

    data = shared_data / "genomics/dna_classification_dnabert/dev.tsv"

    def run(name, seed):
        recipe = Path(__file__).resolve().parents[1] / "configs/tasks/dna_classification_head.yaml"
        res = train.main(["--config", str(recipe), f"head.data.path={data}",
                          "head.data.limit=200", "trainer.epochs=2", "trainer.cpu_threads=1",
                          f"trainer.seed={seed}", f"trainer.output_dir={tmp_path / name}"])
        return res["metrics"]["test"]["raw"], (tmp_path / name / "checkpoint" / "model.safetensors").read_bytes()

    a, wa = run("a", 0)
    b, wb = run("b", 0)
    c, wc = run("c", 1)
    assert a == b and wa == wb
    assert wc != wa
