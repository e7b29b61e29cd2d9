"""``head.mol_features``: molecule-level features (Morgan fingerprint, RDKit 2D descriptors) read by the head beside
the GIN's readout: the features themselves on RDKit's edge cases, the worker path, the model (the fitted scaler on the
descriptor columns only, one-molecule batches, save/load, another RDKit's descriptor list), the config checks, a
training run and its reloaded predictions, and the MoleculeNet benchmark's cache warm-up and protocol check."""

import csv
import json

import numpy as np
import pytest
import torch

from medmm.config import HeadStageConfig, config_from_dict
from medmm.errors import ConfigError
from tests.conftest import MOLECULENET, first_rows

EDGE_CASES = ["C", "[Na+].[Cl-]", "ClC(Cl)(Cl)Cl", "O=C(O)c1ccccc1", "C[C@H](N)C(=O)O", "c1ccc2c(c1)ccc1ccccc12",
              "[2H]C([2H])([2H])O", "CC(C)(C)[Si](C)(C)OC", "[Fe+2]", "C1CC1" * 30]


def _cfg(**kw) -> HeadStageConfig:
    return config_from_dict(HeadStageConfig, {"encoder": {"name": "mol_gin_tiny", "kwargs": {"readout": "nodes"}},
                                              "hidden": 16, "dropout": 0.0, **kw}, "<test>")


def test_rdkit2d_on_edge_cases_is_finite_and_fixed_width():
    from medmm.io.molecules import parse_smiles, rdkit2d, rdkit2d_names

    names = rdkit2d_names()
    assert len(names) > 150 and len(set(names)) == len(names) and "MolLogP" in names and "TPSA" in names
    rows = [rdkit2d(parse_smiles(s, source=s, max_heavy_atoms=10**6)) for s in EDGE_CASES]
    for s, r in zip(EDGE_CASES, rows):
        assert r.dtype == np.float32 and r.shape == (len(names),) and np.isfinite(r).all(), s
    # squashed: |x| = log(1 + |raw|) keeps the sign and the order (logP of benzoic acid > 0, of glycine-like < it)
    logp = names.index("MolLogP")
    assert rows[3][logp] == pytest.approx(np.log1p(1.3848), abs=1e-3)
    assert len({r.tobytes() for r in rows}) == len(rows)  # the molecules differ, so do their rows


def test_rdkit2d_through_worker_processes_equals_in_process():
    from medmm.io.molecules import process_molecules

    smiles = EDGE_CASES + ["not a smiles", "CCO"]
    one = process_molecules(smiles, features=("graph", "fingerprint", "rdkit2d"), workers=0)
    two = process_molecules(smiles, features=("graph", "fingerprint", "rdkit2d"), workers=2, chunksize=3)
    assert [r.ok for r in one] == [r.ok for r in two] and not one[-2].ok
    for a, b in zip(one, two):
        if a.ok:
            assert np.array_equal(a.rdkit2d, b.rdkit2d) and np.array_equal(a.fingerprint, b.fingerprint)
        else:
            assert a.rdkit2d is None and b.rdkit2d is None


def test_config_refuses_mol_features_without_a_graph_head():
    with pytest.raises(ConfigError, match="mol_features=morgan.*mol_graph"):
        _cfg(mol_features="morgan", loader="smiles_fingerprint",
             encoder={"name": "mol_fingerprint_tiny"})
    with pytest.raises(ConfigError, match="mol_features=rdkit2d"):
        _cfg(mol_features="rdkit2d", featuriser="dna", loader="dna_tokens", encoder={"name": "dna_cnn_tiny"},
             data={"split": "random"})
    with pytest.raises(ConfigError, match="mol_features"):
        _cfg(mol_features="maccs")
    with pytest.raises(ConfigError, match="linear reads the tokens only"):
        from medmm.model.heads import build_head

        build_head("linear", in_dim=8, num_tokens=2, out_dim=1, extra_dim=4)


def _featurised(cfg, smiles):
    from medmm.data.featurisers import build_featuriser

    fz = build_featuriser(cfg)
    return fz, fz.featurise(smiles, [f"row {i}" for i in range(len(smiles))])


@pytest.mark.parametrize("kind,width", [("morgan", 2048), ("rdkit2d", None), ("morgan+rdkit2d", None)])
def test_featuriser_items_carry_the_features_and_the_model_reads_them(kind, width):
    from medmm.io.molecules import rdkit2d_names
    from medmm.model.heads import build_head_model, feature_dims, predict_logits

    cfg = _cfg(mol_features=kind)
    n_desc = len(rdkit2d_names()) if "rdkit2d" in kind else 0
    want = (width or 0) + n_desc + (2048 if kind == "morgan+rdkit2d" else 0)
    assert feature_dims(cfg) == (want, n_desc)
    fz, feats = _featurised(cfg, EDGE_CASES[:6])
    assert all(it["features"].shape == (want,) for it in feats.items)
    batch = fz.collate(feats.items)
    assert batch["features"].shape == (6, want) and batch["features"].dtype == torch.float32
    torch.manual_seed(0)
    model = build_head_model(cfg)
    assert (model.feature_norm is not None) == bool(n_desc)
    model.train()
    out = model(batch["x"], batch["mask"], batch["features"])
    assert out.shape == (6,) and torch.isfinite(out).all()
    out.sum().backward()
    assert model.head.extra[1].weight.grad.abs().sum() > 0  # the features reach the loss
    with pytest.raises(ValueError, match=f"reads {want} features"):
        model(batch["x"], batch["mask"])
    # a one-molecule training batch works (the scaler uses no batch statistics)
    one = fz.collate(feats.items[:1])
    assert torch.isfinite(model(one["x"], one["mask"], one["features"])).all()
    # changing a molecule's features changes its logit (and nobody else's, in eval mode)
    model.eval()
    base = predict_logits(model, fz, feats.items)
    items = [dict(it) for it in feats.items]
    items[2]["features"] = items[2]["features"].clone()
    items[2]["features"][-1] += 3.0 if n_desc else 0.0
    if not n_desc:
        items[2]["features"][:50] = 1 - items[2]["features"][:50]
    moved = predict_logits(model, fz, items)
    assert moved[2] != base[2] and np.array_equal(np.delete(moved, 2), np.delete(base, 2))


def test_descriptor_columns_are_standardised_and_fingerprint_bits_are_not():
    from medmm.model.heads import build_head_model

    cfg = _cfg(mol_features="morgan+rdkit2d")
    model = build_head_model(cfg).eval()
    sc = model.feature_norm
    k = sc.num_features
    fz, feats = _featurised(cfg, EDGE_CASES)
    train = torch.stack([it["features"][-k:] for it in feats.items])
    sc.fit(train)
    x = train.double()
    std = x.std(0, unbiased=False)
    assert torch.allclose(sc.mean.double(), x.mean(0), atol=1e-5)
    assert torch.allclose(sc.scale.double(), torch.where(std > 1e-6, std, torch.ones_like(std)), rtol=1e-5)
    assert (sc.scale[std <= 1e-6] == 1).all() and (std <= 1e-6).any()  # a constant column keeps scale 1
    seen = {}
    model.head.register_forward_pre_hook(lambda mod, args: seen.update(f=args[2].clone()))
    b = fz.collate(feats.items)
    out_eval = model(b["x"], b["mask"], b["features"])
    assert torch.equal(seen["f"][:, :-k], b["features"][:, :-k])  # bits as they are
    want = ((b["features"][:, -k:] - sc.mean) / sc.scale).clamp(-sc.CLIP, sc.CLIP)
    assert torch.allclose(seen["f"][:, -k:], want, atol=1e-5)
    assert torch.allclose(seen["f"][:, -k:].mean(0)[std > 1e-6], torch.zeros(1), atol=1e-4)  # standardised
    # training mode and batch composition change nothing: a molecule's columns do not depend on its batch mates
    model.train()
    model.head.eval()  # (dropout off: the scaler alone is under test)
    model(b["x"][:2], b["mask"][:2], b["features"][:2])
    assert torch.allclose(seen["f"][:, -k:], want[:2], atol=1e-5)
    assert torch.isfinite(out_eval).all()
    # a value far outside the training molecules' range (a rare fragment count) reaches the head clipped to ±CLIP
    j = int(torch.nonzero(std > 1e-6)[0])
    odd = b["features"][:2].clone()
    odd[0, -k + j] = sc.mean[j] + 1000 * sc.scale[j]
    odd[1, -k + j] = sc.mean[j] - 1000 * sc.scale[j]
    model(b["x"][:2], b["mask"][:2], odd)
    assert seen["f"][0, -k + j] == sc.CLIP and seen["f"][1, -k + j] == -sc.CLIP
    assert torch.allclose(seen["f"][:, -k:][:, torch.arange(k) != j], want[:2][:, torch.arange(k) != j], atol=1e-5)
    with pytest.raises(ValueError, match="columns"):
        sc.fit(train[:, :3])


def test_feature_dropout_is_its_own_setting_and_defaults_to_the_head_dropout():
    from medmm.model.heads import build_head_model

    for kw, want in (({}, 0.4), ({"feature_dropout": 0.0}, 0.0), ({"feature_dropout": 0.1}, 0.1)):
        model = build_head_model(_cfg(mol_features="morgan", **{"dropout": 0.4, **kw}))
        assert model.head.extra[0].p == want and model.head.net[3].p == 0.4, kw
    # with feature_dropout 0 the features reach the head whole in training mode: two passes agree on them
    model = build_head_model(_cfg(mol_features="morgan", dropout=0.5, feature_dropout=0.0)).train()
    fz, feats = _featurised(_cfg(mol_features="morgan"), EDGE_CASES[:4])
    b = fz.collate(feats.items)
    seen = []
    model.head.extra.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    model(b["x"], b["mask"], b["features"])
    model(b["x"], b["mask"], b["features"])
    assert torch.equal(seen[0], seen[1])


def test_save_load_keeps_predictions_and_refuses_another_rdkit_list(tmp_path):
    from medmm.inference.head import HeadPredictor
    from medmm.model.heads import CONFIG_NAME, build_head_model, predict_logits

    cfg = _cfg(mol_features="morgan+rdkit2d")
    torch.manual_seed(1)
    model = build_head_model(cfg)
    fz, feats = _featurised(cfg, EDGE_CASES)
    k = model.feature_norm.num_features
    model.feature_norm.fit(torch.stack([it["features"][-k:] for it in feats.items]))  # off its defaults
    assert not torch.equal(model.feature_norm.mean, torch.zeros(k))
    model.eval()
    want = predict_logits(model, fz, feats.items)
    model.save_pretrained(tmp_path / "m")
    hp = HeadPredictor(tmp_path / "m")
    _, got = hp.predict(EDGE_CASES, reports=False)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    meta = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    meta["rdkit2d_names"] = meta["rdkit2d_names"][:-1]
    (tmp_path / "m" / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="RDKit.*lists others"):
        HeadPredictor(tmp_path / "m")
    # a model saved with the older BatchNorm on the descriptors is refused by name, not half-loaded
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path / "old")
    w = load_file(str(tmp_path / "old" / "model.safetensors"))
    k = w.pop("feature_norm.mean").numel()
    del w["feature_norm.scale"]
    w |= {"feature_norm.running_mean": torch.zeros(k), "feature_norm.running_var": torch.ones(k),
          "feature_norm.weight": torch.ones(k), "feature_norm.bias": torch.zeros(k)}
    save_file(w, str(tmp_path / "old" / "model.safetensors"))
    with pytest.raises(ConfigError, match="model.safetensors.*BatchNorm.*retrain"):
        HeadPredictor(tmp_path / "old")


pytestmark_data = pytest.mark.skipif(not MOLECULENET.exists(), reason="shared MoleculeNet files absent")


@pytest.mark.slow  # ~15 s: a head run through the DeepSpeed loop
@pytestmark_data
def test_training_with_mol_features_and_reloaded_predictions(tmp_path):
    """A head run with morgan+rdkit2d trains, and its saved model scores the test rows as the run did."""
    from medmm.inference.head import HeadPredictor
    from train import main

    data = first_rows(MOLECULENET / "bbbp.csv", tmp_path / "bbbp300.csv", 300)
    main(["--config", "configs/tasks/druggability_head.yaml", f"head.data.path={data}",
          f"trainer.output_dir={tmp_path / 'run'}", "trainer.epochs=2", "trainer.micro_batch_size=32",
          "trainer.save_every=100000", "head.data.workers=0", "head.data.fractions=[0.8,0.1,0.1]",
          "head.data.split=scaffold_deterministic", "head.data.label_col=p_np",
          "head.encoder.kwargs={hidden: 32, layers: 2, dropout: 0.0}", "head.hidden=32",
          "head.preprocess.mol_canonical_tautomer=false", "head.mol_features=morgan+rdkit2d"])
    ckpt = tmp_path / "run" / "checkpoint"
    metrics = json.loads((ckpt / "metrics.json").read_text())
    assert metrics["steps"] > 0 and 0.0 <= metrics["test"]["raw"]["auroc"] <= 1.0
    with open(ckpt / "predictions_test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    hp = HeadPredictor(ckpt)
    assert hp.cfg.mol_features == "morgan+rdkit2d" and hp.model.feature_norm is not None
    feats, logits = hp.predict([r["input"] for r in rows], reports=False)
    assert feats.sources == [f"row {i}" for i in range(len(rows))]
    np.testing.assert_allclose(hp.probabilities(logits), [float(r["prob"]) for r in rows], atol=2e-5)
    np.testing.assert_allclose(hp.probabilities(logits, calibrated=False), [float(r["prob_raw"]) for r in rows],
                               atol=2e-5)
    # the descriptor scaler was fitted on the training molecules (split.json's train rows) and saved with the model
    with open(data, newline="") as f:
        smiles = [r["smiles"] for r in csv.DictReader(f)]
    train_rows = json.loads((tmp_path / "run" / "split.json").read_text())["train"]
    tf, _ = hp.predict([smiles[i] for i in train_rows], reports=False)
    sc = hp.model.feature_norm
    cols = torch.stack([it["features"][-sc.num_features:] for it in tf.items]).double()
    assert len(tf.items) == len(train_rows)
    np.testing.assert_allclose(sc.mean.double().numpy(), cols.mean(0).numpy(), atol=1e-4)


@pytestmark_data
def test_benchmark_featurises_once_into_the_cache_its_runs_read(tmp_path, monkeypatch):
    """``featurise_once`` fills the molecule cache under exactly the key a run's featuriser looks up: with RDKit
    processing disabled afterwards, the run's featurisation still succeeds (from the cache)."""
    import medmm.io.molecules as molio
    from medmm.data.featurisers import build_featuriser, featurise_rows
    from medmm.data.featurisers.molecules import CACHE_ENV
    from medmm.eval.benchmarks.moleculenet import Protocol, featurise_once, run_overrides
    from medmm.training.stages.head import multitask_label_parser, read_multitask_rows

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    first_rows(MOLECULENET / "bace.csv", data / "bace.csv", 120)
    ov = run_overrides("bace", 0, data, tmp_path / "run", "scaffold_deterministic", Protocol())
    featurise_once(ov, workers=2, cache=str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache").glob("molecules-*.npz"))) == 1

    def refuse(*a, **k):
        raise AssertionError("featurised again instead of reading the cache")

    monkeypatch.setattr(molio, "process_molecules", refuse)
    from medmm.config import TrainConfig, load_config

    h = load_config(TrainConfig, "configs/tasks/druggability_head.yaml", ov).head  # workers=0, as the run
    feats = featurise_rows(build_featuriser(h), read_multitask_rows(h.data, h.data.path),
                           multitask_label_parser(h.data.label_cols))
    assert len(feats) > 100 and feats.items[0]["features"].shape[0] > 2048


def test_a_finished_run_counts_only_for_its_own_protocol(tmp_path):
    from medmm.eval.benchmarks.moleculenet import REVISION, RUN_FILE, finished_auroc, run_record

    run = tmp_path / "seed0"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "metrics.json").write_text(json.dumps({"test": {"raw": {"auroc": 0.8}}}))
    ov = ["head.mol_features=morgan+rdkit2d", "trainer.seed=0"]
    assert finished_auroc(run, ov) is None  # no record of how it was trained
    (run / RUN_FILE).write_text(json.dumps(run_record(ov)))
    assert finished_auroc(run, ov) == pytest.approx(80.0)
    assert finished_auroc(run, ["head.mol_features=none", "trainer.seed=0"]) is None
    # a run of the same overrides trained by older code (another revision, or the bare list it once wrote) is not
    (run / RUN_FILE).write_text(json.dumps({"revision": REVISION - 1, "overrides": ov}))
    assert finished_auroc(run, ov) is None
    (run / RUN_FILE).write_text(json.dumps(ov))
    assert finished_auroc(run, ov) is None
