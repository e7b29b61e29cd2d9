"""Molecules: the RDKit pipeline on edge cases and on real MoleculeNet sets, graph tensors and the GIN, rules,
scaffold split, the druggability head on ClinTox, and the LLM path (closed-set scores, eval, batch CSV)."""

import csv
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from medmm.errors import InvalidInputError, SmilesError
from medmm.io.molecules import (
    ATOM_FEATURE_DIM,
    ERROR_KINDS,
    NUM_BOND_CODES,
    StandardiseOptions,
    canonical_smiles,
    descriptors,
    druglikeness,
    mol_graph,
    murcko_scaffold,
    parse_smiles,
    process_molecules,
)
from tests.conftest import REPO

MOLNET = ("molecules", "moleculenet")


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("smiles,expected", [
    ("CC(=O)[O-].[Na+]", "CC(=O)O"),  # salt: counter-ion dropped, acid neutralised
    ("[Cl-].C[NH+](C)CCc1ccccc1", "CN(C)CCc1ccccc1"),  # hydrochloride salt
    ("c1ccccc1.CCO", "c1ccccc1"),  # mixture: largest fragment
    ("CCO.CCN", "CCN"),  # tie on heavy atoms: RDKit's chooser counts hydrogens too
    ("[NH3+]CC(=O)[O-]", "NCC(=O)O"),  # zwitterion neutralised
    ("C[N+](C)(C)C.[Cl-]", "C[N+](C)(C)C"),  # quaternary N has no neutral form: the charge stays
    ("[Na+].[Cl-]", "Cl"),  # nothing organic: the largest fragment, neutralised
    ("C[C@H](N)C(=O)O", "C[C@H](N)C(=O)O"),  # stereo kept through tautomer canonicalisation
    ("F/C=C/F", "F/C=C/F"),  # E/Z kept
    ("Oc1ccccn1", "O=c1cccc[nH]1"),  # canonical tautomer (2-pyridone)
    ("CC(O)=CC", "CCC(C)=O"),  # enol -> ketone
    ("c1cc[nH]c1", "c1cc[nH]c1"),  # aromatic N with its H
    ("C1=CC=CC=C1", "c1ccccc1"),  # Kekulé input, aromatic output
])
def test_standardised_as_documented(smiles, expected):
    assert canonical_smiles(parse_smiles(smiles, source="assay.csv:7")) == expected


def test_stereo_removal_is_optional():
    opts = StandardiseOptions(remove_stereo=True)
    assert canonical_smiles(parse_smiles("C[C@H](N)C(=O)O", options=opts)) == "CC(N)C(=O)O"
    assert canonical_smiles(parse_smiles("F/C=C/F", options=opts)) == "FC=CF"
    raw = StandardiseOptions(largest_fragment=False, neutralise=False, canonical_tautomer=False)
    assert canonical_smiles(parse_smiles("Oc1ccccn1.[Na+]", options=raw)) == "Oc1ccccn1.[Na+]"


@pytest.mark.parametrize("smiles,kind,reason", [
    ("", "empty", "no SMILES"),
    ("   ", "empty", "no SMILES"),
    (None, "empty", "no SMILES"),
    ("C(C)(C)(C)(C)C", "valence", "Explicit valence for atom # 0 C, 5"),  # pentavalent carbon
    ("CN(C)(C)C", "valence", "Explicit valence for atom # 1 N, 4"),  # neutral tetravalent N
    ("c1cccn1", "kekulize", r"Can't kekulize mol.*\[nH\]"),  # aromatic N without its H: hint names [nH]
    ("c1cccc1", "kekulize", r"Can't kekulize mol.  Unkekulized atoms: 0 1 2 3 4 \(SMILES 'c1cccc1'\)$"),  # odd ring
    ("C1CC", "syntax", "unclosed ring"),
    ("CC(C", "syntax", "extra open parentheses"),
    ("CC%", "syntax", "syntax error"),
    ("C" * 500, "too_large", "500 heavy atoms is over the limit of 200"),  # 500-atom input
    ("[H][H]", "no_heavy_atoms", "nothing but hydrogen"),
])
def test_rejected_with_row_and_rdkit_reason(smiles, kind, reason):
    with pytest.raises(SmilesError, match=reason) as e:
        parse_smiles(smiles, source="assay.csv:7")
    assert e.value.kind == kind and e.value.source == "assay.csv:7"
    rec = e.value.to_record()
    assert rec["path"] == "assay.csv:7" and rec["error"] == "SmilesError" and rec["message"].startswith(ERROR_KINDS[kind])


def test_size_limit_is_a_setting_and_checked_before_standardising():
    mol = parse_smiles("C" * 500, options=StandardiseOptions(max_heavy_atoms=600))
    assert mol.GetNumHeavyAtoms() == 500
    # The limit applies to the fragment that is kept: 16 heavy atoms in all, 9 in the largest fragment.
    assert canonical_smiles(parse_smiles("CCCCCCC.CCCCCCCCC", max_heavy_atoms=10)) == "CCCCCCCCC"
    with pytest.raises(SmilesError, match="50 heavy atoms is over the limit of 10"):
        parse_smiles("CCO." + "C" * 50, max_heavy_atoms=10)
    with pytest.raises(SmilesError, match="characters is over the limit"):
        parse_smiles("C" * 5000)  # rejected before RDKit parses it


def test_rdkit_log_channels_left_as_found():
    """Capturing leaves RDKit's info and debug channels off (``LogToPythonLogger`` alone would switch them on for the
    rest of the process) and still captures warnings; the scaffold helper silences RDKit and then restores each
    channel as it was, instead of switching every channel on."""
    from rdkit import rdBase

    from medmm.io.molecules import scaffolds_as_written

    def _rdkit_log_status() -> dict[str, bool]:
        return {name: state == "enabled" for name, state in (x.split(":") for x in rdBase.LogStatus().split())}

    rdBase.EnableLog("rdApp.warning")
    warnings: list[str] = []
    parse_smiles("[Tc](=O)(=O)(=O)[O-]", warnings=warnings)  # pertechnetate: RDKit warns about the charge
    assert warnings and _rdkit_log_status() == {"rdApp.debug": False, "rdApp.info": False, "rdApp.warning": True,
                                                "rdApp.error": True}
    rdBase.DisableLog("rdApp.warning")
    try:
        assert scaffolds_as_written(["c1ccccc1CC", "not a smiles"]) == ["c1ccccc1", None]
        assert _rdkit_log_status() == {"rdApp.debug": False, "rdApp.info": False, "rdApp.warning": False,
                                       "rdApp.error": True}
    finally:
        rdBase.EnableLog("rdApp.warning")


def test_rdkit_log_is_captured_not_printed(capfd):
    for bad in ("C1CC", "c1cccn1", "C(C)(C)(C)(C)C", "CC(C"):
        with pytest.raises(SmilesError):
            parse_smiles(bad)
    warnings: list[str] = []
    parse_smiles("CC(C)(C)c1ccc(O)cc1CCCCCCCCCCC(=O)O", warnings=warnings)
    recs = process_molecules(["C1CC", "CCO", "[Cu+2].[O-]C(=O)C"], workers=0)
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)
    assert [r.ok for r in recs] == [False, True, True] and recs[0].error["kind"] == "syntax"


# ----------------------------------------------------------------------------- real molecules
def _table(path, col):
    with open(path, newline="") as f:
        return [(i, r) for i, r in enumerate(csv.DictReader(f), start=2)], col


@pytest.mark.slow
@pytest.mark.parametrize("name,col,every", [("bbbp.csv", "smiles", 4), ("clintox.csv", "smiles", 3),
                                            ("tox21.csv", "smiles", 16)])
def test_real_moleculenet_sets(shared_data, name, col, every):
    """Every row is standardised (one fragment, idempotent, stereo never invented) or rejected with its row."""
    path = shared_data.joinpath(*MOLNET, name)
    rows, _ = _table(path, col)
    rows = rows[::every]
    recs = process_molecules([r[col] for _, r in rows], [f"{path}:{i}" for i, _ in rows],
                             features=("graph", "scaffold"), workers=2)
    assert len(recs) == len(rows) and [r.index for r in recs] == list(range(len(rows)))
    ok = [r for r in recs if r.ok]
    assert len(ok) >= 0.97 * len(rows)
    for r in recs:
        if not r.ok:
            assert r.error["path"] == r.source and r.error["kind"] in ERROR_KINDS, r.error
            assert "RDKit" in r.error["message"] or r.error["kind"] in ("empty", "too_large"), r.error
            continue
        assert "." not in r.smiles, r.smiles  # one fragment
        assert len(re.findall("@@?", r.smiles)) <= len(re.findall("@@?", r.input))  # stereo never invented
        assert r.graph.node_features.shape == (r.graph.num_nodes, ATOM_FEATURE_DIM)
        assert r.scaffold is not None
    again = process_molecules([r.smiles for r in ok], workers=0)
    same = sum(a.smiles == r.smiles for a, r in zip(again, ok))
    assert same >= 0.995 * len(ok), f"standardising twice changed {len(ok) - same} of {len(ok)}"


@pytest.mark.slow
def test_known_rejections_in_real_sets_name_row_and_reason(shared_data):
    """The real sets' rows RDKit rejects, each named by file:line with RDKit's own reason: Tox21's
    hexavalent aluminium salts fail at parsing; three more fail while standardising."""
    tox = shared_data.joinpath(*MOLNET, "tox21.csv")
    rows, _ = _table(tox, "smiles")
    raw = StandardiseOptions(largest_fragment=False, neutralise=False, canonical_tautomer=False)
    recs = process_molecules([r["smiles"] for _, r in rows], [f"{tox}:{i}" for i, _ in rows], raw, features=(),
                             workers=2)
    bad = [r for r in recs if not r.ok]
    assert [r.source for r in bad] == [f"{tox}:{i}" for i in (1324, 2292, 2299, 3560, 4567, 4651, 5540, 6725)]
    assert all(r.error["kind"] == "valence" and re.search(r"RDKit: Explicit valence for atom # \d+ Al, 6", r.error[
        "message"]) for r in bad)
    bbbp = shared_data.joinpath(*MOLNET, "bbbp.csv")
    picks = [(tox, 5734, "kekulize", "Can't kekulize"), (tox, 6549, "valence", "Explicit valence for atom # 0 Sb"),
             (bbbp, 2038, "kekulize", "Can't kekulize")]
    for path, line, kind, reason in picks:
        smi = dict(_table(path, "smiles")[0])[line]["smiles"]
        with pytest.raises(SmilesError, match=reason) as e:
            parse_smiles(smi, source=f"{path}:{line}")
        assert e.value.kind == kind and e.value.source == f"{path}:{line}" and "RDKit cannot standardise" in str(e.value)


# ----------------------------------------------------------------------------- graphs, fingerprints, rules
def test_graph_tensors_and_loader_packing():
    from encoders.molecule import DEFAULT_ATOM_DIM, DEFAULT_BOND_CODES
    from medmm.config import PreprocessConfig
    from medmm.data.loaders import build_loader

    assert (DEFAULT_ATOM_DIM, DEFAULT_BOND_CODES) == (ATOM_FEATURE_DIM, NUM_BOND_CODES)
    g = mol_graph(parse_smiles("c1ccccc1C(=O)O"))  # benzoic acid: 9 heavy atoms, 9 bonds
    assert g.node_features.shape == (9, ATOM_FEATURE_DIM) and g.edge_index.shape == (2, 18)
    adj = g.adjacency()
    assert (adj == adj.T).all() and set(np.unique(adj)) == {0, 1, 2, 8}  # none, single, double, aromatic in ring
    # element one-hot (carbon column), atoms in the order of the canonical SMILES O=C(O)c1ccccc1 (standardised
    # molecules are read back from their canonical SMILES, so the graph does not depend on how the input was written)
    assert (g.node_features[:, 0] == [0, 1, 0] + [1] * 6).all()
    loader = build_loader("mol_graph", PreprocessConfig())
    items = [loader.load(s) for s in ("CCO", "c1ccccc1C(=O)O", "[Na+].CC(=O)[O-]")]
    b = loader.collate(items)
    assert b["x"].shape == (3, 9, ATOM_FEATURE_DIM + 9) and b["mask"].sum(1).tolist() == [3, 9, 4]
    assert b["edge_index"].shape == (2, 4 + 18 + 6) and int(b["edge_index"].max()) < 27
    with pytest.raises(SmilesError, match="kekulize"):
        loader.load("c1cccn1")
    d = loader.collate([loader.dummy()])
    assert d["mask"].tolist() == [[True]]


@pytest.mark.parametrize("readout", ["nodes", "graph"])
def test_gin_padding_and_atom_order_invariance(readout):
    from rdkit import Chem

    from encoders import build_encoder
    from medmm.config import PreprocessConfig
    from medmm.data.loaders import MolGraphLoader, build_loader

    torch.manual_seed(0)
    enc = build_encoder("mol_gin_tiny", readout=readout, num_tokens=2).eval()
    loader = build_loader("mol_graph", PreprocessConfig())
    mol = parse_smiles("CC(=O)Oc1ccccc1C(=O)O")
    alone = loader.collate([MolGraphLoader.from_graph(mol_graph(mol))])
    padded = loader.collate([MolGraphLoader.from_graph(mol_graph(mol)), loader.load("C" * 30)])
    renum = Chem.RenumberAtoms(mol, list(reversed(range(mol.GetNumAtoms()))))
    perm = loader.collate([MolGraphLoader.from_graph(mol_graph(renum))])
    with torch.no_grad():
        a, _ = enc(alone["x"], alone["mask"])
        p, _ = enc(padded["x"], padded["mask"])
        r, _ = enc(perm["x"], perm["mask"])
    n = mol.GetNumAtoms()
    torch.testing.assert_close(p[0, :n] if readout == "nodes" else p[0], a[0], atol=1e-5, rtol=1e-4)
    if readout == "nodes":
        torch.testing.assert_close(r[0].flip(0), a[0], atol=1e-5, rtol=1e-4)
    else:
        torch.testing.assert_close(r, a, atol=1e-5, rtol=1e-4)


def test_gin_virtual_node_reaches_beyond_the_layers_and_keeps_the_invariances():
    from rdkit import Chem

    from encoders import build_encoder
    from medmm.config import PreprocessConfig
    from medmm.data.loaders import MolGraphLoader, build_loader

    loader = build_loader("mol_graph", PreprocessConfig())
    def one(m):
        b = loader.collate([MolGraphLoader.from_graph(mol_graph(m))])
        return b["x"], b["mask"]
    # two fragments: with 2 layers no message crosses from the second to the first, except through the virtual node
    a_mol, b_mol = parse_smiles("CCO.c1ccccc1", max_heavy_atoms=100, standardise=False), \
        parse_smiles("CCO.c1ccncc1", max_heavy_atoms=100, standardise=False)
    for vn in (False, True):
        torch.manual_seed(0)
        enc = build_encoder("mol_gin", hidden=16, layers=2, virtual_node=vn).eval()
        if vn:  # the virtual node starts at zero with its MLPs random: give it a state, as training would
            torch.nn.init.normal_(enc.vn)
        with torch.no_grad():
            a, _ = enc(*one(a_mol))
            b, _ = enc(*one(b_mol))
        ethanol_moved = (a[0, :3] - b[0, :3]).abs().max().item()
        assert (ethanol_moved > 1e-3) == vn, (vn, ethanol_moved)
    # padding and atom order still change nothing, and the graph readout works with it
    mol = parse_smiles("CC(=O)Oc1ccccc1C(=O)O")
    for readout in ("nodes", "graph"):
        torch.manual_seed(0)
        enc = build_encoder("mol_gin", hidden=16, layers=3, virtual_node=True, readout=readout).eval()
        torch.nn.init.normal_(enc.vn)
        padded = loader.collate([MolGraphLoader.from_graph(mol_graph(mol)), loader.load("C" * 30)])
        renum = Chem.RenumberAtoms(mol, list(reversed(range(mol.GetNumAtoms()))))
        with torch.no_grad():
            a, _ = enc(*one(mol))
            p, _ = enc(padded["x"], padded["mask"])
            r, _ = enc(*one(renum))
        n = mol.GetNumAtoms()
        torch.testing.assert_close(p[0, :n] if readout == "nodes" else p[0], a[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(r[0].flip(0) if readout == "nodes" else r, a[0] if readout == "nodes" else a,
                                   atol=1e-5, rtol=1e-4)


def test_descriptors_and_rule_report():
    aspirin = parse_smiles("CC(=O)Oc1ccccc1C(=O)O")
    d = descriptors(aspirin)
    assert d["mol_weight"] == pytest.approx(180.159, abs=0.01) and d["tpsa"] == pytest.approx(63.6, abs=0.01)
    assert (d["hbd"], d["hba"], d["heavy_atoms"], d["aromatic_rings"]) == (1, 3, 13, 1)
    assert 0.5 < d["qed"] < 0.6
    r = druglikeness(aspirin)
    assert r["lipinski_pass"] and r["veber_pass"] and r["pains_pass"] and r["lipinski_violations"] == []
    cyclosporin = parse_smiles("CC[C@H]1C(=O)N(CC(=O)N([C@H](C(=O)N[C@H](C(=O)N([C@H](C(=O)N[C@H](C(=O)N[C@@H](C(=O)"
                               "N([C@H](C(=O)N([C@H](C(=O)N([C@H](C(=O)N([C@H](C(=O)N1)[C@@H]([C@H](C)C/C=C/C)O)C)"
                               "C(C)C)C)CC(C)C)C)CC(C)C)C)C)C)CC(C)C)C)C(C)C)CC(C)C)C)C")
    r = druglikeness(cyclosporin)
    assert not r["lipinski_pass"] and "MW>500" in r["lipinski_violations"] and not r["veber_pass"]
    assert druglikeness(parse_smiles("Oc1ccc(N=Nc2ccccc2)cc1"))["pains_alerts"] == ["azo_A(324)"]
    assert druglikeness(parse_smiles("Cc1ccc(O)c(O)c1"))["pains_alerts"] == ["catechol_A(92)"]


@pytest.mark.slow
def test_scaffold_split_keeps_scaffolds_apart(shared_data):
    from medmm.data.splits import scaffold_split

    path = shared_data.joinpath(*MOLNET, "clintox.csv")
    rows, _ = _table(path, "smiles")
    recs = process_molecules([r["smiles"] for _, r in rows], features=("scaffold",),
                             options=StandardiseOptions(canonical_tautomer=False), workers=2)
    scaf = [r.scaffold for r in recs if r.ok]
    tr, va, te = scaffold_split(scaf, (0.8, 0.1, 0.1), seed=0)
    assert sorted(tr + va + te) == list(range(len(scaf)))
    sets = [{scaf[i] for i in part} for part in (tr, va, te)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert abs(len(te) - 0.1 * len(scaf)) <= 0.02 * len(scaf) and abs(len(va) - 0.1 * len(scaf)) <= 0.02 * len(scaf)
    assert scaffold_split(scaf, (0.8, 0.1, 0.1), seed=0) == (tr, va, te)
    assert murcko_scaffold(parse_smiles("CCCC")) == ""  # acyclic molecules share the empty scaffold


# ----------------------------------------------------------------------------- prepare
def test_prepare_molecules_scaffold_split_and_qa(tmp_path):
    from medmm.prepare.molecules import prepare_molecules

    src = tmp_path / "assay.csv"
    src.write_text("smiles,active\nCC(=O)Oc1ccccc1C(=O)O,1\nc1cccn1,0\n,1\nCC(=O)[O-].[Na+],0\n"
                   "c1ccccc1CCN,1\nc1ccccc1CCO,0\nC1CCCCC1N,1\nCCO,x\nc1ccc2ccccc2c1,0\n")
    m = prepare_molecules(src, tmp_path / "out", "smiles", "active", "Active?", 0.3, 0, "mols",
                          split="scaffold", qa=True)
    assert (m["train"], m["eval"], m["rejected"]) == (4, 2, 3)
    errors = [json.loads(x) for x in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [e["path"] for e in errors] == [f"{src}:3", f"{src}:4", f"{src}:9"]
    assert "kekulize" in errors[0]["message"] and "empty" in errors[1]["message"] and "not 0/1" in errors[2]["message"]
    train = [json.loads(x) for x in (tmp_path / "out" / "mols_train.jsonl").read_text().splitlines()]
    evals = [json.loads(x) for x in (tmp_path / "out" / "mols_eval.jsonl").read_text().splitlines()]
    scaf = lambda r: murcko_scaffold(parse_smiles(r["modalities"]["mol"]))  # noqa: E731
    assert not {scaf(r) for r in train} & {scaf(r) for r in evals}
    acid = next(r for r in train + evals if r["input"]["row"] == 5)
    assert acid["modalities"]["mol"] == "CC(=O)O" and acid["conversations"][1]["value"] == "no"
    qa = [json.loads(x) for x in (tmp_path / "out" / "mols_qa_train.jsonl").read_text().splitlines()]
    aspirin = next((r for r in qa if r["modalities"]["mol"] == "CC(=O)Oc1ccccc1C(=O)O"), None)
    if aspirin is None:
        qa_eval = [json.loads(x) for x in (tmp_path / "out" / "mols_qa_eval.jsonl").read_text().splitlines()]
        aspirin = next(r for r in qa_eval if r["modalities"]["mol"] == "CC(=O)Oc1ccccc1C(=O)O")
    turns = aspirin["conversations"]
    assert turns[0]["value"].startswith("<mol>\n") and turns[1]["value"] == "1"  # one H-bond donor
    assert turns[13]["value"] == "yes"  # passes Lipinski


# ----------------------------------------------------------------------------- druggability head on ClinTox
@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.timeout(1800)  # 170 steps + RDKit on 1,478 molecules; minutes on a shared 2-core machine
def test_druggability_head_on_clintox_scaffold_split(tmp_path, shared_data):
    """The head recipe (trainer.stage: head) through train.py on ClinTox FDA_APPROVED with a scaffold split:
    held-out AUROC well above chance; the checkpoint alone reproduces the scores and the AUROC."""
    import train
    from medmm.inference.head import HeadPredictor

    threads = torch.get_num_threads()
    try:  # one intra-op thread: a GIN this small only loses to contended threads
        res = train.main(["--config", str(REPO / "configs/tasks/druggability_head.yaml"),
                          f"head.data.path={shared_data.joinpath(*MOLNET, 'clintox.csv')}",
                          f"trainer.output_dir={tmp_path / 'run'}", "head.data.fractions=[0.7,0.1,0.2]",
                          "trainer.epochs=10", "trainer.cpu_threads=1"])
    finally:
        torch.set_num_threads(threads)
    m = res["metrics"]
    assert m["rows"]["usable"] == 1478 and m["rows"]["test"] == 296
    assert m["test"]["raw"]["auroc"] > 0.75, m["test"]  # chance is 0.5
    assert m["test"]["calibrated"]["auroc"] == m["test"]["raw"]["auroc"]  # temperature never changes ranking
    assert m["val"]["calibrated"]["log_loss"] <= m["val"]["raw"]["log_loss"] + 1e-4  # T was fitted there
    assert res["best_step"] % 17 == 0  # early stopping follows the per-epoch validation AUROC (17 steps/epoch)
    ckpt = tmp_path / "run" / "checkpoint"
    assert json.loads((ckpt / "metrics.json").read_text())["test"] == m["test"]
    with open(ckpt / "predictions_test.csv") as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == 296 and {"lipinski_pass", "pains_alerts", "qed"} <= set(preds[0])
    hp = HeadPredictor(ckpt)
    feats, logits = hp.predict([p["input"] for p in preds[:20]], reports=False)
    np.testing.assert_allclose(hp.probabilities(logits), [float(p["prob"]) for p in preds[:20]], atol=1e-4)
    # `medmm eval druggability` on the held-out rows reproduces the test AUROC from the checkpoint alone.
    test_csv = tmp_path / "test.csv"
    with open(test_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["smiles", "FDA_APPROVED"])
        w.writerows([(p["input"], p["label"]) for p in preds])
        w.writerow(["C1CC", "1"])  # a bad row is reported, not dropped
    from medmm.cli import main as cli

    cli(["eval", "druggability", "--checkpoint", str(ckpt), "--data", str(test_csv), "--label-col", "FDA_APPROVED",
         "--out", str(tmp_path / "ev")])
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["kind"] == "head" and ev["raw"]["auroc"] == pytest.approx(m["test"]["raw"]["auroc"], abs=1e-3)
    assert ev["errors"] == 1 and ev["calibrated"]["brier"] == pytest.approx(m["test"]["calibrated"]["brier"], abs=1e-3)


# ----------------------------------------------------------------------------- the LLM path
@pytest.fixture
def mol_llm(tmp_path, tiny_llm):
    """A tiny medmm model with the druggability LLM recipe's mol modality (GIN -> resampler), saved and reloaded."""
    from medmm.config import TrainConfig, load_config
    from medmm.model.multimodal import MedMMForCausalLM

    cfg = load_config(TrainConfig, REPO / "configs/druggability_llm.yaml", [
        f"model.llm={tiny_llm}", "model.modalities.mol.encoder.name=mol_gin_tiny",
        "model.modalities.mol.encoder.kwargs={}", "model.modalities.mol.projector.num_queries=4"])
    torch.manual_seed(0)
    model = MedMMForCausalLM.from_config(cfg.model)
    return model, model.save_pretrained(tmp_path / "ckpt")


def test_mol_graph_modality_trains_in_the_llm(mol_llm):
    """One optimiser step through LLM + resampler + GIN on a real batch (mol_graph loader, padded graphs)."""
    model, _ = mol_llm
    model.train()
    proc = model.processor(128)
    recs = [{"modalities": {"mol": s}, "conversations": [{"from": "human", "value": "<mol>\nApproved?"},
                                                        {"from": "gpt", "value": a}]}
            for s, a in (("CC(=O)Oc1ccccc1C(=O)O", "yes"), ("[Na+].CCCCCCCCCCCCOS(=O)(=O)[O-]", "no"))]
    batch = proc.collate([proc.process(r) for r in recs])
    before = {n: p.detach().clone() for n, p in model.encoders["mol"].named_parameters()}
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert any(not torch.equal(before[n], p) for n, p in model.encoders["mol"].named_parameters())


def test_llm_batch_inference_and_eval(mol_llm, tmp_path):
    """infer.py --molecules: one row per input row (errors kept); medmm eval druggability on the same model."""
    from medmm.inference.__main__ import main as infer

    _, ckpt = mol_llm
    src = tmp_path / "in.csv"
    rows = [("aspirin", "CC(=O)Oc1ccccc1C(=O)O", 1), ("bad", "c1cccn1", 0), ("salt", "CC(=O)[O-].[Na+]", 0),
            ("empty", "", 1), ("azo", "Oc1ccc(N=Nc2ccccc2)cc1", 0), ("big", "C" * 500, 0), ("caffeine",
            "Cn1cnc2c1c(=O)n(C)c(=O)n2C", 1)]
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "SMILES", "approved"])
        w.writerows(rows)
    out = tmp_path / "out.csv"
    infer(["--checkpoint", str(ckpt), "--molecules", str(src), "--smiles-col", "SMILES", "--question",
           "Is this molecule likely to be an approved drug?", "--out", str(out)])
    with open(out) as f:
        got = list(csv.DictReader(f))
    assert [g["name"] for g in got] == [r[0] for r in rows]  # nothing dropped, order kept
    by = {g["name"]: g for g in got}
    for name in ("aspirin", "salt", "azo", "caffeine"):
        g = by[name]
        assert g["error"] == "" and 0 < float(g["score"]) < 1 and g["answer"] in ("yes", "no")
    assert by["salt"]["canonical_smiles"] == "CC(=O)O" and by["azo"]["pains_alerts"] == "azo_A(324)"
    assert by["aspirin"]["lipinski_pass"] == "1"
    assert "kekulize" in by["bad"]["error"] and by["bad"]["error_kind"] == "kekulize" and by["bad"]["score"] == ""
    assert by["empty"]["error_kind"] == "empty" and by["big"]["error_kind"] == "too_large"
    # the same score through the Python API (Session.closed_set)
    from medmm.inference.molecules import llm_scores
    from medmm.inference.predictor import Predictor

    s = llm_scores(Predictor(ckpt), ["CC(=O)Oc1ccccc1C(=O)O"], "Is this molecule likely to be an approved drug?",
                   ["yes", "no"])
    assert s[0]["score"] == pytest.approx(float(by["aspirin"]["score"]), abs=1e-4)

    from medmm.eval.druggability import evaluate_druggability

    m = evaluate_druggability(ckpt, src, tmp_path / "ev", "SMILES", "approved", calibration=src)
    assert m["kind"] == "llm" and m["scored"] == 4 and m["errors"] == 3
    assert m["raw"]["auroc"] is not None and 0 <= m["raw"]["brier"] <= 1 and m["temperature"] > 0
    with open(tmp_path / "ev" / "predictions.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_infer_molecules_needs_out_and_question(mol_llm, tmp_path):
    from medmm.inference.molecules import predict_molecules_csv

    _, ckpt = mol_llm
    src = tmp_path / "in.csv"
    src.write_text("smiles\nCCO\n")
    with pytest.raises(InvalidInputError, match="--question"):
        predict_molecules_csv(ckpt, src, tmp_path / "o.csv")
    with pytest.raises(InvalidInputError, match="no column 'SMILES'"):
        predict_molecules_csv(ckpt, src, tmp_path / "o.csv", smiles_col="SMILES", question="q")
    r = subprocess.run([sys.executable, str(REPO / "infer.py"), "--checkpoint", str(ckpt), "--molecules", str(src)],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode != 0 and "--out" in r.stderr


@pytest.mark.slow
@pytest.mark.deepspeed
def test_druggability_llm_recipe_trains_with_deepspeed(tmp_path, tiny_llm, shared_data):
    """configs/druggability_llm.yaml through train.py (DeepSpeed, one process) on scaffold-split ClinTox records,
    then `medmm eval druggability` on the eval JSONL (closed-set yes/no probabilities)."""
    import os

    from medmm.eval.druggability import evaluate_druggability
    from medmm.prepare.molecules import prepare_molecules

    rows = (shared_data.joinpath(*MOLNET, "clintox.csv")).read_text().splitlines()
    src = tmp_path / "clintox_part.csv"
    src.write_text("\n".join(rows[:1] + rows[1:60] + [r for r in rows[1:] if r.split(",")[1] == "0"][:20]) + "\n")
    prepare_molecules(src, tmp_path / "data", "smiles", "FDA_APPROVED", split="scaffold", eval_fraction=0.25)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("DS_ACCELERATOR", None)
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/druggability_llm.yaml"),
                        f"model.llm={tiny_llm}", "model.modalities.mol.encoder.name=mol_gin_tiny",
                        "model.modalities.mol.encoder.kwargs={}", f"data.datasets.0.path={tmp_path / 'data'}/"
                        "molecules_train.jsonl", f"trainer.output_dir={tmp_path / 'run'}", "trainer.max_steps=4",
                        "trainer.micro_batch_size=4", "trainer.save_every=4", "trainer.warmup_steps=0",
                        f"trainer.deepspeed={REPO / 'configs/deepspeed/zero0.json'}"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    m = evaluate_druggability(tmp_path / "run" / "checkpoint", tmp_path / "data" / "molecules_eval.jsonl",
                              tmp_path / "ev", label_col=None)
    n_eval = len((tmp_path / "data" / "molecules_eval.jsonl").read_text().splitlines())
    assert m["kind"] == "llm" and m["scored"] == m["rows"] == n_eval >= 15 and m["errors"] == 0
    assert m["raw"]["n"] == n_eval and 0 <= m["raw"]["brier"] <= 1


def test_head_recipe_is_a_train_config_of_stage_head():
    """configs/tasks/druggability_head.yaml is a TrainConfig whose stage is head; its default data is the shared set."""
    from medmm.config import TrainConfig, load_config

    cfg = load_config(TrainConfig, REPO / "configs/tasks/druggability_head.yaml")
    assert cfg.trainer.stage == "head" and cfg.head.featuriser == "molecules" and cfg.head.data.split == "scaffold"
    assert (REPO / cfg.head.data.path).resolve().exists()


def test_head_stage_config_errors():
    from medmm.config import ConfigError, HeadStageConfig, TrainConfig, config_from_dict

    with pytest.raises(ConfigError, match="scaffold needs molecules"):
        config_from_dict(HeadStageConfig, {"featuriser": "dna", "loader": "dna_tokens"})
    with pytest.raises(ConfigError, match="unknown key 'head.data.smiles'"):
        config_from_dict(TrainConfig, {"head": {"data": {"smiles": "x"}}})
    with pytest.raises(ConfigError, match="frozen"):
        config_from_dict(HeadStageConfig, {"encoder": {"name": "mol_gin", "trainable": "lora"}})
    with pytest.raises(ConfigError, match="two classes"):
        config_from_dict(HeadStageConfig, {"classes": ["a", "b", "c"]})
    for key, bad in (("dropout", 1.0), ("feature_dropout", -0.1)):
        with pytest.raises(ConfigError, match=rf"head.{key} must be in \[0, 1\), got {bad}"):
            config_from_dict(HeadStageConfig, {key: bad})


def test_molecule_featuriser_and_head_model_round_trip(tmp_path):
    """Featurise real SMILES (bad ones become error records), build mol_gin + mlp, save and reload the folder."""
    from medmm.config import HeadStageConfig, config_from_dict
    from medmm.data.featurisers import Row, build_featuriser, featurise_rows, label_parser
    from medmm.model.heads import HeadModel, build_head_model, predict_logits

    cfg = config_from_dict(HeadStageConfig, {"encoder": {"name": "mol_gin_tiny", "trainable": "full"},
                                             "data": {"workers": 0}, "hidden": 16})
    f = build_featuriser(cfg)
    rows = [Row("r1", "CC(=O)Oc1ccccc1C(=O)O", "1"), Row("r2", "c1cccn1", "0"), Row("r3", "CCO", "x"),
            Row("r4", "[Na+].CC(=O)[O-]", "0.0")]
    feats = featurise_rows(f, rows, label_parser(["0", "1"], "label"))
    assert feats.sources == ["r1", "r4"] and feats.labels == [1, 0] and feats.canonical[1] == "CC(=O)O"
    assert {e["path"] for e in feats.errors} == {"r2", "r3"} and feats.groups == ["c1ccccc1", ""]
    torch.manual_seed(0)
    model = build_head_model(cfg)
    z = predict_logits(model, f, feats.items)
    model.temperature = 2.0
    model.save_pretrained(tmp_path / "m")
    back = HeadModel.from_pretrained(tmp_path / "m")
    assert back.temperature == 2.0 and back.config.encoder.name == "mol_gin_tiny"
    np.testing.assert_allclose(predict_logits(back, f, feats.items), z, atol=1e-6)


def test_gin_bond_list_sum_equals_the_dense_per_code_sum():
    """The GIN layer's sparse neighbour sum is exactly sum_t A_t @ ReLU(h + e_t) over the dense bond codes."""
    from encoders.molecule import GINLayer, pack_graphs

    graphs = [mol_graph(parse_smiles(s)) for s in ("CC(=O)Oc1ccccc1C(=O)O", "C#CC=CN", "c1ccc2[nH]ccc2c1")]
    x, mask = pack_graphs([torch.from_numpy(g.node_features) for g in graphs],
                          [torch.from_numpy(g.adjacency()) for g in graphs])
    adj = x[..., ATOM_FEATURE_DIM:].round().long()  # (B, N, N)
    torch.manual_seed(0)
    layer = GINLayer(16, NUM_BOND_CODES).eval()
    h = torch.randn(*mask.shape, 16) * mask.unsqueeze(-1)
    msg = sum(((adj == t).float() @ torch.relu(h + layer.bond.weight[t]) for t in range(1, NUM_BOND_CODES + 1)),
              torch.zeros_like(h))
    dense = (h + layer.mlp(layer.norm((1 + layer.eps) * h + msg))) * mask.unsqueeze(-1)
    with torch.no_grad():
        torch.testing.assert_close(layer(h, adj, mask), dense, atol=1e-5, rtol=1e-5)
    assert len(set(adj[adj > 0].tolist())) > 2  # several bond codes present: the check bites


def test_smiles_as_written_keeps_fragments_and_charges():
    """mol_largest_fragment / mol_neutralise off = the reference's MolFromSmiles featurisation (ClinTox protocol)."""
    from medmm.config import PreprocessConfig
    from medmm.data.featurisers.molecules import standardise_options

    raw = standardise_options(PreprocessConfig(mol_largest_fragment=False, mol_neutralise=False,
                                               mol_canonical_tautomer=False))
    assert canonical_smiles(parse_smiles("[Cl-].C[NH+](C)CCc1ccccc1", options=raw)) == "C[NH+](C)CCc1ccccc1.[Cl-]"
    assert mol_graph(parse_smiles("CC(=O)[O-].[Na+]", options=raw)).num_nodes == 5
    assert canonical_smiles(parse_smiles("[Cl-].C[NH+](C)CCc1ccccc1", options=standardise_options(
        PreprocessConfig()))) == "CN(C)CCc1ccccc1"


def test_featurisation_cache_returns_the_same_records_without_recomputing(tmp_path, monkeypatch):
    import medmm.io.molecules as io_mol
    from medmm.data.featurisers.molecules import CACHE_ENV, cached_process_molecules

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    smiles, sources = ["CCO", "c1ccccc1O", "C1CC"], ["a:2", "a:3", "a:4"]
    first = cached_process_molecules(smiles, sources, StandardiseOptions(), features=("graph",), workers=0)
    assert len(list(tmp_path.glob("*.npz"))) == 1 and [r.ok for r in first] == [True, True, False]
    monkeypatch.setattr(io_mol, "process_molecules", lambda *a, **k: pytest.fail("recomputed"))
    again = cached_process_molecules(smiles, sources, StandardiseOptions(), features=("graph",), workers=2)
    assert [r.smiles for r in again] == [r.smiles for r in first] and again[1].graph.num_nodes == 7
    with pytest.raises(pytest.fail.Exception):  # other options are another key
        cached_process_molecules(smiles, sources, StandardiseOptions(canonical_tautomer=False), features=("graph",))


# ----------------------------------------------------------------------------- cache and bulk transfer (issue 16)
def _same_records(a, b):
    """Every field of two record lists equal, arrays by dtype, shape and value."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.index, x.source, x.input, x.smiles, x.error, x.warnings, x.descriptors, x.druglikeness,
                x.scaffold) == (y.index, y.source, y.input, y.smiles, y.error, y.warnings, y.descriptors,
                                y.druglikeness, y.scaffold), (x.input, y.input)
        for u, v in ((x.graph, y.graph), (x.fingerprint, y.fingerprint)):
            assert (u is None) == (v is None)
        if x.graph is not None:
            for f in ("node_features", "edge_index", "edge_code"):
                u, v = getattr(x.graph, f), getattr(y.graph, f)
                assert u.dtype == v.dtype and u.shape == v.shape and (u == v).all(), (x.input, f)
        if x.fingerprint is not None:
            assert x.fingerprint.dtype == y.fingerprint.dtype and (x.fingerprint == y.fingerprint).all()


def _clintox_mix(shared_data, n_each=6):
    """Real ClinTox SMILES: multi-fragment salts, charged species, stereo, plain ones, and duplicates of them."""
    rows, _ = _table(shared_data.joinpath(*MOLNET, "clintox.csv"), "smiles")
    smiles = [r["smiles"] for _, r in rows]
    kinds = [lambda s: "." in s, lambda s: "+" in s or "-]" in s, lambda s: "@" in s, lambda s: "/" in s,
             lambda s: not any(c in s for c in ".+-@/")]
    picked = []
    for k in kinds:
        picked += [s for s in smiles if k(s) and len(s) < 70 and s not in picked][:n_each]
    return picked


def test_tautomer_cache_gives_the_uncached_records(shared_data):
    """Real salts, charged species and stereo: records with a shared, warm cache = each molecule alone on an empty
    cache (warnings included); repeated rows, other writings of a molecule and its salt are cache hits."""
    from rdkit import Chem

    from medmm.io.molecules import clear_standardise_cache, process_one, standardise_cache_info

    mix = _clintox_mix(shared_data, 4)
    mix += ["[O-][99Tc](=O)(=O)=O"]  # RDKit warns while standardising it: warnings must survive the cache
    other = [Chem.MolToSmiles(Chem.MolFromSmiles(s), doRandom=True) for s in mix[:6]]
    smiles = mix + mix[:8] + other + [f"{mix[-3]}.[Na+].[Cl-]"]
    feats = ("graph", "fingerprint", "scaffold")
    alone = []
    for i, s in enumerate(smiles):
        clear_standardise_cache()
        alone.append(process_one(i, s, f"clintox:{i}", features=feats))
    clear_standardise_cache()
    srcs = [f"clintox:{i}" for i in range(len(smiles))]
    cold = process_molecules(smiles, srcs, features=feats, workers=0)
    info = standardise_cache_info()
    warm = process_molecules(smiles, srcs, features=feats, workers=0)
    _same_records(alone, cold)
    _same_records(alone, warm)
    assert sum(r.ok for r in cold) >= len(smiles) - 2 and any(r.warnings for r in cold)
    assert any("." in s for s in mix) and any("@" in s for s in mix) and any("+" in s for s in mix)
    # the other writings and the extra salt hit the cache; so does every pass of the warm call
    assert info["hits"] >= len(other) + 1, info
    after = standardise_cache_info()
    assert after["misses"] == info["misses"] and after["hits"] > info["hits"]
    assert [r.smiles for r in cold[len(mix) + 8: len(mix) + 14]] == [r.smiles for r in cold[:6]]


def test_tautomer_read_back_stands_for_sanitising_again(monkeypatch):
    """A molecule read back from its canonical SMILES after the tautomer passes is not sanitised a second time; the
    read's RDKit log takes the place of the second sanitisation's, so the records (warnings included) equal those
    of a run that sanitises again (``remove_stereo`` does, and changes nothing in these stereo-free molecules)."""
    from rdkit import Chem

    from medmm.io.molecules import StandardiseOptions, clear_standardise_cache

    smiles = ["O=[Cr](=O)([O-])O[Cr](=O)(=O)[O-]", "[O-][99Tc](=O)(=O)=O", "Oc1ccccn1", "CC(=O)CC(C)=O", "CCO"]
    calls = []
    real = Chem.SanitizeMol
    monkeypatch.setattr(Chem, "SanitizeMol", lambda *a, **k: calls.append(1) or real(*a, **k))
    clear_standardise_cache()
    for workers in (0, 0, 2):  # cold cache, warm cache, a pool
        n = len(calls)
        fast = process_molecules(smiles, workers=workers)
        fast_calls = len(calls) - n
        again = process_molecules(smiles, options=StandardiseOptions(remove_stereo=True), workers=workers)
        assert [(r.smiles, r.warnings) for r in fast] == [(r.smiles, r.warnings) for r in again]
        assert fast[0].warnings == ["Unusual charge on atom 0 number of radical electrons set to zero"]
        assert fast[2].smiles == "O=c1cccc[nH]1"
        if workers == 0:  # parsing sanitises each input once; the tautomer path adds nothing, remove_stereo one more
            assert (fast_calls, len(calls) - n - fast_calls) == (len(smiles), 2 * len(smiles))


def test_record_smiles_is_the_canonical_smiles_of_its_molecule(shared_data):
    """A record's SMILES is taken from the tautomer pass that converged on it, not written again: it must equal
    RDKit's canonical SMILES of the parsed molecule, on real salts, charged species, stereo and tautomers."""
    from medmm.io.molecules import canonical_smiles, clear_standardise_cache, parse_smiles

    rows, _ = _table(shared_data.joinpath(*MOLNET, "bbbp.csv"), "smiles")
    smiles = _clintox_mix(shared_data, 8) + [r["smiles"] for _, r in rows[:150]] + ["Oc1ccccn1", "CC(=O)CC(C)=O"]
    clear_standardise_cache()
    recs = process_molecules(smiles, features=(), workers=0)
    ok = [(r, s) for r, s in zip(recs, smiles) if r.ok]
    assert len(ok) >= len(smiles) - 5
    assert [r.smiles for r, _ in ok] == [canonical_smiles(parse_smiles(s)) for _, s in ok]


def test_repeated_smiles_are_processed_once_with_their_own_rows(monkeypatch):
    import medmm.io.molecules as io_mol

    calls = []
    real = io_mol.process_one
    monkeypatch.setattr(io_mol, "process_one", lambda i, s, *a, **k: calls.append(s) or real(i, s, *a, **k))
    smiles = ["CCO", "Oc1ccccn1", "CCO", "C1CC", "Oc1ccccn1", "C1CC", None]
    recs = process_molecules(smiles, [f"f.csv:{i}" for i in range(7)], workers=0)
    assert [r.index for r in recs] == list(range(7)) and [r.source for r in recs] == [f"f.csv:{i}" for i in range(7)]
    assert [r.smiles for r in recs] == ["CCO", "O=c1cccc[nH]1", "CCO", None, "O=c1cccc[nH]1", None, None]
    assert [r.error["path"] for r in recs if not r.ok] == ["f.csv:3", "f.csv:5", "f.csv:6"]  # errors name their row
    assert sorted(calls, key=str) == sorted(["CCO", "Oc1ccccn1", "C1CC", None, "C1CC"], key=str)  # failed repeat: rerun
    assert recs[2] is not recs[0] and (recs[2].graph.node_features == recs[0].graph.node_features).all()


def test_workers_ship_compact_payloads_rebuilt_into_the_same_records(shared_data):
    """Two workers (packed graphs and fingerprint bits, tautomer entries sent back) = the in-process records."""
    import pickle

    from medmm.io.molecules import _pack_chunk, clear_standardise_cache, standardise_cache_info

    smiles = _clintox_mix(shared_data, 4) + ["[Na+].[Cl-]", "C1CC", "", "c1ccccc1"]  # one atom, no bonds; failures
    feats = ("graph", "fingerprint", "descriptors", "druglikeness", "scaffold")
    clear_standardise_cache()
    inproc = process_molecules(smiles, features=feats, workers=0)
    n = standardise_cache_info()["entries"]
    clear_standardise_cache()
    pooled = process_molecules(smiles, features=feats, workers=2, chunksize=5)
    _same_records(inproc, pooled)
    assert standardise_cache_info()["entries"] == n > 0  # the workers' tautomer entries reached the parent
    kwargs = dict(options=None, features=("graph", "fingerprint"), fingerprint_bits=2048, fingerprint_radius=2)
    payload = _pack_chunk((0, smiles, [f"r{i}" for i in range(len(smiles))], kwargs))
    records = process_molecules(smiles, features=("graph", "fingerprint"), workers=0)
    assert len(pickle.dumps(payload)) * 4 < len(pickle.dumps(records))  # bits and bytes, not float32 arrays
