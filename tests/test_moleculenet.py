"""MoleculeNet protocol: the deterministic scaffold split against a literal oracle, multi-task masked labels,
the ``moleculenet`` benchmark's table.

The oracle below re-implements Hu et al. 2020 (``chem/splitters.py::scaffold_split``) literally and
independently of medmm: RDKit parses each SMILES as written, scaffolds with chirality, groups sorted by
``(len, first index)`` with ``reverse=True``, cut-offs ``frac * n`` with ``>`` comparisons.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import MOLECULENET, first_rows

FILES = {"bbbp.csv": "smiles", "bace.csv": "mol", "clintox.csv": "smiles", "tox21.csv": "smiles",
         "delaney.csv": "smiles", "hiv.csv.gz": "smiles"}
SLOW_SPLITS = {"tox21.csv", "bbbp.csv", "clintox.csv", "bace.csv"}  # > 5 s each: the full tier checks them

pytestmark = pytest.mark.skipif(not MOLECULENET.exists(), reason="shared MoleculeNet files absent")


def _smiles_column(path: Path, col: str) -> list[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        return [row[col] for row in csv.DictReader(f)]


def reference_scaffold_split(smiles_list, frac_train=0.8, frac_valid=0.1, frac_test=0.1):
    """Hu et al.'s procedure, literally: returns (train, valid, test) row numbers of the parseable rows."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem.Scaffolds import MurckoScaffold

    RDLogger.DisableLog("rdApp.*")
    kept = [(i, s) for i, s in enumerate(smiles_list) if Chem.MolFromSmiles(s) is not None]
    RDLogger.EnableLog("rdApp.*")
    all_scaffolds = {}
    for i, smiles in kept:
        scaffold = MurckoScaffold.MurckoScaffoldSmiles(smiles=smiles, includeChirality=True)
        if scaffold not in all_scaffolds:
            all_scaffolds[scaffold] = [i]
        else:
            all_scaffolds[scaffold].append(i)
    all_scaffolds = {key: sorted(value) for key, value in all_scaffolds.items()}
    all_scaffold_sets = [scaffold_set for (scaffold, scaffold_set) in
                         sorted(all_scaffolds.items(), key=lambda x: (len(x[1]), x[1][0]), reverse=True)]
    train_cutoff = frac_train * len(kept)
    valid_cutoff = (frac_train + frac_valid) * len(kept)
    train_idx, valid_idx, test_idx = [], [], []
    for scaffold_set in all_scaffold_sets:
        if len(train_idx) + len(scaffold_set) > train_cutoff:
            if len(train_idx) + len(valid_idx) + len(scaffold_set) > valid_cutoff:
                test_idx.extend(scaffold_set)
            else:
                valid_idx.extend(scaffold_set)
        else:
            train_idx.extend(scaffold_set)
    return sorted(train_idx), sorted(valid_idx), sorted(test_idx)


def test_deterministic_split_ties_go_to_larger_first_index():
    from medmm.data.splits import scaffold_deterministic_split

    # groups a:[0,1] b:[2,3] c:[4] d:[5] ... ties of size 2: b (first index 2) before a (first index 0)
    scaf = ["a", "a", "b", "b", "c", "d", "e", "f", "g", "h"]
    train, val, test = scaffold_deterministic_split(scaf, (0.5, 0.2, 0.3))
    # order: b, a, h(9), g(8), f(7), e(6), d(5), c(4); train cut 5: b, a (4) then h (5); g -> val (7 > 5? yes
    # train+g=6>5, train+val+g=6<=7 -> val), f -> val (7<=7), e -> test, d -> test, c -> test
    assert train == [0, 1, 2, 3, 9] and val == [7, 8] and test == [4, 5, 6]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_SPLITS else n
                                  for n in FILES if n != "hiv.csv.gz"])
def test_scaffold_deterministic_matches_reference(name):
    from medmm.data.splits import scaffold_deterministic_rows

    smiles = _smiles_column(MOLECULENET / name, FILES[name])
    ours = scaffold_deterministic_rows(smiles)
    ref = reference_scaffold_split(smiles)
    assert (ours["train"], ours["val"], ours["test"]) == ref
    assert set(ours["rejected"]).isdisjoint(ours["train"] + ours["val"] + ours["test"])
    assert len(ours["rejected"]) + sum(map(len, ref)) == len(smiles)


@pytest.mark.slow
def test_scaffold_deterministic_matches_reference_hiv():
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from medmm.data.splits import scaffold_deterministic_rows

    smiles = _smiles_column(MOLECULENET / "hiv.csv.gz", "smiles")
    # 41k molecules: the reference runs in a second process while medmm's split runs here (the suite's second core)
    with ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as pool:
        ref = pool.submit(reference_scaffold_split, smiles)
        ours = scaffold_deterministic_rows(smiles)
        assert (ours["train"], ours["val"], ours["test"]) == ref.result()


def _tiny_overrides(tmp_path, data, extra=()):
    return ["--config", "configs/tasks/druggability_head.yaml", f"head.data.path={data}",
            f"trainer.output_dir={tmp_path}", "trainer.epochs=1", "trainer.micro_batch_size=32",
            "trainer.save_every=100000", "head.data.workers=0", "head.data.fractions=[0.8,0.1,0.1]",
            "head.encoder.kwargs={hidden: 32, layers: 2, dropout: 0.0}", "head.hidden=32",
            "head.preprocess.mol_canonical_tautomer=false", *extra]


@pytest.mark.slow
def test_split_json_equals_reference_after_training(tmp_path):
    """A run with split scaffold_deterministic writes OUT/split.json = the oracle's row numbers."""
    from train import main

    data = first_rows(MOLECULENET / "bbbp.csv", tmp_path / "bbbp300.csv", 300)
    main(_tiny_overrides(tmp_path / "run", data, ["head.data.split=scaffold_deterministic",
                                                  "head.data.label_col=p_np"]))
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    smiles = _smiles_column(data, "smiles")
    train, val, test = reference_scaffold_split(smiles)
    assert (split["train"], split["val"], split["test"]) == (train, val, test)
    assert sorted(split["train"] + split["val"] + split["test"] + split["rejected"]) == list(range(300))
    assert not (tmp_path / "run" / "checkpoint" / "split.json").exists()


# ----------------------------------------------------------------------------- multi-task, masked labels
def test_masked_label_changes_neither_loss_nor_metric():
    """Tox21-style labels: flipping a label that is marked missing (nan) moves neither the loss nor the metric."""
    from types import SimpleNamespace

    from medmm.training.stages.head import HeadStage, multitask_metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(40, 12)).astype(np.float64)
    y[rng.random(y.shape) < 0.2] = np.nan
    y[0, 3] = np.nan
    logits = torch.tensor(rng.normal(size=(40, 12)), dtype=torch.float32)
    stage = HeadStage.__new__(HeadStage)
    stage.multitask, stage.class_weight, stage.model = True, None, SimpleNamespace(binary=True)
    class Engine(torch.nn.Module):  # the DeepSpeed engine's surface the loss uses: __call__ and .module
        def __init__(self, out):
            super().__init__()
            self.module, self.out = torch.nn.Linear(1, 1), out

        def forward(self, x, mask):
            return self.out

    engine = Engine(logits)
    base_loss, _ = stage.loss(engine, {"x": torch.zeros(40, 1), "labels": torch.tensor(y, dtype=torch.float32)})
    probs = 1 / (1 + np.exp(-logits.numpy()))
    base = multitask_metrics(y, probs)
    for fill in (0.0, 1.0):
        y2 = y.copy()
        y2[0, 3] = fill  # the masked cell now holds a label: both must move (the check can fail)...
        loss2, _ = stage.loss(engine, {"x": torch.zeros(40, 1), "labels": torch.tensor(y2, dtype=torch.float32)})
        assert not math.isclose(float(loss2), float(base_loss), rel_tol=1e-7)
        # ...while changing the *probability* at a masked cell changes neither
        p3 = probs.copy()
        p3[0, 3] = 1 - p3[0, 3]
        l3 = logits.clone()
        l3[0, 3] = -l3[0, 3] + 5
        loss3, _ = stage.loss(Engine(l3), {"x": torch.zeros(40, 1),
                                                  "labels": torch.tensor(y, dtype=torch.float32)})
        assert float(loss3) == pytest.approx(float(base_loss), abs=0)
        assert multitask_metrics(y, p3) == base
    # the mean AUROC is over tasks with both classes only
    y_one = y.copy()
    y_one[:, 0] = np.where(np.isnan(y_one[:, 0]), np.nan, 1.0)
    m = multitask_metrics(y_one, probs)
    assert m["auroc_per_task"][0] is None and m["tasks_scored"] == 11
    assert m["auroc"] == pytest.approx(np.mean([a for a in m["auroc_per_task"] if a is not None]))


def test_multitask_tox21_trains_with_missing_labels(tmp_path):
    from train import main

    cols = ["NR-AR", "NR-AR-LBD", "NR-AhR", "NR-Aromatase", "NR-ER", "NR-ER-LBD", "NR-PPAR-gamma", "SR-ARE",
            "SR-ATAD5", "SR-HSE", "SR-MMP", "SR-p53"]
    data = first_rows(MOLECULENET / "tox21.csv", tmp_path / "tox21_300.csv", 300)
    res = main(_tiny_overrides(tmp_path / "run", data, ["head.data.split=scaffold_deterministic",
                                                        f"head.data.label_cols=[{','.join(cols)}]"]))
    metrics = json.loads((tmp_path / "run" / "checkpoint" / "metrics.json").read_text())
    t = metrics["test"]["raw"]
    assert len(t["auroc_per_task"]) == 12 and 0 < t["tasks_scored"] <= 12 and 0.0 <= t["auroc"] <= 1.0
    with open(data, newline="") as f:
        cells = [r[c] for r in csv.DictReader(f) for c in cols]
    assert "" in cells  # the file really has missing labels
    header = next(csv.reader(open(tmp_path / "run" / "checkpoint" / "predictions_test.csv")))
    assert header[3:15] == [f"label_{c}" for c in cols]
    assert res is not None


# ----------------------------------------------------------------------------- the benchmark's table
def test_moleculenet_benchmark_registered_and_table_layout(tmp_path):
    from medmm.eval.benchmarks import get_benchmark, list_benchmarks
    from medmm.eval.benchmarks.moleculenet import DATASETS, PUBLISHED, summarise, write_results

    assert "moleculenet" in list_benchmarks() and get_benchmark("moleculenet").trains
    for d in DATASETS.values():  # the shared layout is the default --data-dir
        with (gzip.open if d["file"].endswith(".gz") else open)(MOLECULENET / d["file"], "rt") as f:
            header = next(csv.reader(f))
        assert d["smiles"] in header and set(d["labels"]) <= set(header)
    s = summarise([60.0, 70.0])
    assert s == {"mean": 65.0, "std": 5.0, "seeds": [60.0, 70.0], "n_seeds": 2}
    out = tmp_path / "moleculenet.json"
    write_results(out, "no_pretrain", {"bbbp": s}, {"layers": 3})
    doc = write_results(out, "pretrained", {"bbbp": summarise([70.0])}, {"layers": 3, "init": "x"})
    assert doc["no_pretrain"]["bbbp"]["mean"] == 65.0 and doc["pretrained"]["bbbp"]["mean"] == 70.0
    assert doc["published"] == PUBLISHED and PUBLISHED["gin_no_pretrain"]["bbbp"][0] == 65.8
    assert set(doc["protocol"]) == {"no_pretrain", "pretrained"}
    assert json.loads(out.read_text()) == doc


# ----------------------------------------------------------------------------- pre-training (stage mol_pretrain)
def test_pretraining_views_and_nt_xent():
    """Masked view hides exactly the chosen atoms' elements; the dropped view is a symmetric subgraph; NT-Xent
    prefers matching partners."""
    from medmm.io.molecules import mol_graph, parse_smiles
    from medmm.training.stages.mol_pretrain import ELEMENT_CLASSES, dropped_view, masked_view, nt_xent

    g = mol_graph(parse_smiles("CC(=O)Oc1ccccc1C(=O)O"))  # aspirin, 13 heavy atoms
    x, adj = torch.from_numpy(g.node_features), torch.from_numpy(g.adjacency())
    xm, atoms, targets = masked_view(x, 0.15, np.random.default_rng(0))
    assert len(atoms) == 2 and (xm[atoms, :ELEMENT_CLASSES] == 0).all() and (xm[atoms, ELEMENT_CLASSES:] ==
                                                                            x[atoms, ELEMENT_CLASSES:]).all()
    others = torch.ones(len(x), dtype=torch.bool)
    others[atoms] = False
    assert torch.equal(xm[others], x[others]) and set(targets.tolist()) <= {0, 1, 2}  # C, N or O
    assert torch.equal(targets, x[atoms, :ELEMENT_CLASSES].argmax(-1))
    xd, ad = dropped_view(x, adj, 0.2, 0.5, np.random.default_rng(1))
    assert xd.shape[0] == 10 and ad.shape == (10, 10) and torch.equal(ad, ad.T)
    assert 0 < int((ad > 0).sum()) < int((adj > 0).sum())
    za = torch.randn(8, 16)
    assert float(nt_xent(za, za + 0.01 * torch.randn(8, 16), 0.1)) < float(nt_xent(za, torch.randn(8, 16), 0.1))


@pytest.mark.slow
def test_pretraining_corpus_excludes_every_benchmark_test_molecule():
    """No corpus molecule is (by canonical SMILES) a scaffold_deterministic test molecule of the benchmarks."""
    from medmm.config import MolPretrainConfig
    from medmm.data.featurisers.molecules import standardise_options
    from medmm.io.molecules import process_molecules
    from medmm.training.stages.mol_pretrain import benchmark_split_smiles, build_corpus

    s = MolPretrainConfig(data_dir=str(MOLECULENET), datasets=["bace", "clintox"], exclude_test_of=["bace", "bbbp"],
                          limit=400, workers=0)
    graphs, canonical, report, labels = build_corpus(s)
    assert labels is None and "supervised" not in report  # no labels read unless the supervised objective is on
    tests = benchmark_split_smiles(MOLECULENET, ["bace", "bbbp"])["test"]
    test_canon = {r.smiles for r in process_molecules(tests["bace"] + tests["bbbp"], options=standardise_options(
        s.preprocess)) if r.ok}
    assert len(graphs) == len(canonical) == report["kept"] > 100 and len(set(canonical)) == len(canonical)
    assert not set(canonical) & test_canon
    assert report["datasets"]["bace"]["test_removed"] > 0  # BACE's first rows hold test molecules: the check bites
    assert report["test_rows"] == {"bace": len(tests["bace"]), "bbbp": len(tests["bbbp"])}


def test_supervised_pretraining_loss_skips_missing_labels():
    """The supervised objective's BCE covers the labels present only: a missing label (NaN) adds neither loss nor
    gradient, and a batch without labels gives 0; the model's task head reads the molecule itself (not a view)."""
    import dataclasses

    from medmm.config import MolPretrainConfig
    from medmm.io.molecules import mol_graph, parse_smiles
    from medmm.training.stages.mol_pretrain import MolPretrainModel, PretrainDataset, collate_views, masked_bce

    torch.manual_seed(0)
    logits = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([[1.0, float("nan"), 0.0], [0.0, 1.0, float("nan")], [float("nan")] * 3, [1.0, 1.0, 0.0]])
    loss = masked_bce(logits, y)
    present = ~torch.isnan(y)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[present], y[present])
    assert torch.allclose(loss, ref)
    loss.backward()
    assert (logits.grad[~present] == 0).all() and (logits.grad[present] != 0).all()
    empty = masked_bce(logits, torch.full((4, 3), float("nan")))
    assert float(empty.detach()) == 0.0 and empty.requires_grad

    s = MolPretrainConfig(objectives=["attr_mask", "supervised"], encoder=dataclasses.replace(
        MolPretrainConfig().encoder, kwargs={"hidden": 16, "layers": 2, "dropout": 0.0, "virtual_node": True}))
    from encoders import build_encoder

    model = MolPretrainModel(build_encoder("mol_gin", **s.encoder.kwargs), s, "mol_gin", s.encoder.kwargs, tasks=3)
    graphs = [mol_graph(parse_smiles(x)) for x in ("CCO", "c1ccccc1O", "CC(=O)Oc1ccccc1C(=O)O")]
    labels = np.array([[1, np.nan, 0], [np.nan, np.nan, np.nan], [0, 1, np.nan]], dtype=np.float32)
    batch = collate_views([PretrainDataset(graphs, s, 0, labels)[i] for i in range(3)])
    assert torch.equal(batch["x_c"][:, :3, :graphs[0].node_features.shape[1]][0],
                       torch.from_numpy(graphs[0].node_features))  # the unmasked molecule
    out = model(**batch)
    assert torch.isfinite(out["task_loss"]) and "nce_loss" not in out
    changed = dict(batch, y=batch["y"].clone())
    changed["y"][1] = 1.0  # give the unlabelled molecule labels: the loss moves, so it was read as missing before
    assert not torch.allclose(model(**changed)["task_loss"], out["task_loss"])


@pytest.mark.slow
def test_supervised_pretraining_labels_leave_out_validation_and_test_molecules():
    """With ``supervised`` on, each corpus molecule carries its files' label cells, except every benchmark's
    scaffold_deterministic validation molecules (kept in the corpus, unlabelled) and test molecules (removed)."""
    from medmm.config import MolPretrainConfig
    from medmm.data.featurisers.molecules import standardise_options
    from medmm.io.molecules import process_molecules
    from medmm.training.stages.mol_pretrain import benchmark_split_smiles, build_corpus

    s = MolPretrainConfig(data_dir=str(MOLECULENET), datasets=["bace", "clintox"],
                          exclude_test_of=["bace", "clintox"], limit=400, workers=0,
                          objectives=["attr_mask", "supervised"])
    graphs, canonical, report, y = build_corpus(s)
    assert report["supervised"]["tasks"] == ["bace/Class", "clintox/FDA_APPROVED", "clintox/CT_TOX"]
    assert y.shape == (len(canonical), 3) and y.dtype == np.float32
    opts = standardise_options(s.preprocess)
    vals = benchmark_split_smiles(MOLECULENET, ["bace", "clintox"], ("val",))["val"]
    val_canon = {r.smiles for r in process_molecules(vals["bace"] + vals["clintox"], options=opts) if r.ok}
    in_val = [k for k, c in enumerate(canonical) if c in val_canon]
    assert in_val and np.isnan(y[in_val]).all()  # BACE's first rows hold validation molecules: the check bites
    assert report["supervised"]["validation_molecules_unlabelled"] > 0
    with open(MOLECULENET / "bace.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:400]
    recs = process_molecules([r["mol"] for r in rows], options=opts)
    where = {c: k for k, c in enumerate(canonical)}
    checked = 0
    for row, rec in zip(rows, recs):
        k = where.get(rec.smiles)
        if k is not None and rec.smiles not in val_canon:
            assert y[k, 0] == float(row["Class"])
            checked += 1
    assert checked > 100 and report["supervised"]["labelled_molecules"] == int((~np.isnan(y)).any(1).sum())


@pytest.mark.slow
@pytest.mark.deepspeed
def test_pretraining_writes_encoder_and_finetuning_starts_from_it(tmp_path, capsys):
    """``trainer.stage: mol_pretrain`` runs through train.py and writes encoder.safetensors; a head run with
    ``head.encoder.checkpoint`` starts from exactly those weights."""
    from safetensors.torch import load_file

    from medmm.config import TrainConfig, load_config
    from medmm.model.heads import build_head_model
    from train import main

    run = tmp_path / "pre"
    main(["--config", "configs/tasks/mol_pretrain.yaml", f"mol_pretrain.data_dir={MOLECULENET}",
          "mol_pretrain.datasets=[bace]", "mol_pretrain.exclude_test_of=[bace]", "mol_pretrain.limit=200",
          "mol_pretrain.workers=0", "mol_pretrain.objectives=[attr_mask, contrastive, supervised]",
          "mol_pretrain.encoder.kwargs={hidden: 16, layers: 2, dropout: 0.0, virtual_node: true}",
          f"trainer.output_dir={run}", "trainer.epochs=1", "trainer.micro_batch_size=32", "trainer.save_every=100000"])
    ckpt = run / "checkpoint"
    enc = load_file(str(ckpt / "encoder.safetensors"))
    meta = json.loads((ckpt / "mol_pretrain.json").read_text())
    corpus = json.loads((ckpt / "corpus.json").read_text())
    assert meta["encoder"] == {"name": "mol_gin",
                               "kwargs": {"hidden": 16, "layers": 2, "dropout": 0.0, "virtual_node": True}}
    assert any(k.startswith("vn_mlps.") for k in enc)  # the virtual node's weights are pre-trained too
    assert corpus["datasets"]["bace"]["test_removed"] > 0 and corpus["kept"] == 200 - sum(
        corpus["datasets"]["bace"][k] for k in ("rejected", "test_removed", "duplicates"))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert any("attr_loss" in r and "nce_loss" in r and "task_loss" in r for r in lines)
    assert corpus["supervised"]["tasks"] == ["bace/Class"] and corpus["supervised"]["labelled_molecules"] > 0
    # fine-tuning: the head's encoder starts from the pre-trained weights (and a fresh one would not)
    data = first_rows(MOLECULENET / "bace.csv", tmp_path / "bace200.csv", 200)
    ov = _tiny_overrides(tmp_path / "head", data, ["head.data.split=scaffold_deterministic", "head.data.input_col=mol",
                                                   "head.data.label_col=Class",
                                                   "head.encoder.kwargs={hidden: 16, layers: 2, dropout: 0.0, "
                                                   "virtual_node: true}",
                                                   f"head.encoder.checkpoint={ckpt / 'encoder.safetensors'}"])
    cfg = load_config(TrainConfig, ov[1], ov[2:])
    state = build_head_model(cfg.head).encoder.state_dict()
    assert set(state) == set(enc) and all(torch.equal(state[k], enc[k]) for k in enc)
    main(ov)  # and the fine-tuning run itself trains from them
    metrics = json.loads((tmp_path / "head" / "checkpoint" / "metrics.json").read_text())
    assert metrics["steps"] > 0 and metrics["val"]["raw"]["n"] > 0
    # the benchmark takes the pre-trained encoder's virtual node and refuses to fine-tune it without one
    from medmm.eval.benchmarks.moleculenet import main as bench_main

    with pytest.raises(SystemExit):
        bench_main(["--pretrained", str(ckpt), "--virtual-node", "false", "--collect-only", "--datasets", "bace",
                    "--work", str(tmp_path / "w"), "--out", str(tmp_path / "w.json")])
    assert "--virtual-node False differs from the pre-trained encoder's True" in capsys.readouterr().err


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (from /proc; Linux)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                pids.append(int(d.name))
    return pids


@pytest.mark.slow  # ~20 s: a training process starts (torch + DeepSpeed imports) before the signal
def test_a_terminated_benchmark_stops_its_trainings(tmp_path):
    """SIGTERM to ``medmm eval moleculenet`` (a scheduler's or ``kill``'s) stops the training it started and the
    runs not yet begun, instead of leaving them on the CPU."""
    import os
    import signal
    import subprocess
    import sys
    import time

    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "medmm.cli", "eval", "moleculenet", "--datasets", "bbbp", "--seeds", "3",
           "--jobs", "1", "--epochs", "50", "--data-dir", str(MOLECULENET), "--work", str(work),
           "--out", str(tmp_path / "mn.json")]
    parent = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not [p for p in _processes_mentioning(str(work)) if p != parent.pid]:
            time.sleep(0.5)
        children = [p for p in _processes_mentioning(str(work)) if p != parent.pid]
        assert children, "the benchmark never started a training"
        time.sleep(2)
        parent.send_signal(signal.SIGTERM)
        out = parent.communicate(timeout=60)[0].decode(errors="replace")
        assert parent.returncode != 0, out
        deadline = time.time() + 30
        while time.time() < deadline and _processes_mentioning(str(work)):
            time.sleep(0.5)
        assert _processes_mentioning(str(work)) == [], "trainings left running after SIGTERM"
        assert not (work / "no_pretrain" / "bbbp" / "seed1").exists() and not (work / "bbbp" / "seed1").exists()
    finally:
        if parent.poll() is None:
            parent.kill()
        for p in _processes_mentioning(str(work)):
            os.kill(p, signal.SIGKILL)
