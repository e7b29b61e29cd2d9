"""Molecule pipeline benchmark: molecules/s through parse -> standardise -> featurise, one run, the same molecules.

The molecules are the first ``--n`` SMILES of MoleculeNet HIV (``../shared/data/molecules/moleculenet/hiv.csv.gz``;
metal complexes, salts and charged species included). Three ways through the same work:

* ``plain_rdkit_loop``: the obvious alternative, a single-process loop written directly against RDKit:
  ``MolFromSmiles`` -> ``FragmentParent`` -> ``Uncharger`` -> ``TautomerEnumerator.Canonicalize`` (same
  parameters as medmm: stereo kept, 64 tautomers at most) -> canonical SMILES, atom/bond graph arrays and
  a 2048-bit Morgan fingerprint; failures are counted and skipped;
* ``medmm_in_process``: :func:`medmm.io.molecules.process_molecules` with ``workers=0`` (the same steps plus
  typed errors with RDKit's reason, captured RDKit logs and the size limit), to show the wrapper's cost;
* ``medmm_workers``: the same with ``--workers`` processes (default: every core; chunks of 64 rows).

Each is timed once, from the list of SMILES to the list of featurised records (pool start-up included).
The canonical SMILES of the three runs are compared: medmm repeats the tautomer canonicalisation until
the SMILES is stable (one RDKit pass is not a fixed point for ~1% of molecules), the plain loop stops after
one pass, so those molecules differ and medmm spends a second pass on every molecule the first one changed. Writes ``bench/results/molecules.json``; the last
printed line is the headline.

Run::

    python bench/molecules.py                  # --n 2000 --workers <cores>
    python bench/molecules.py --n 5000 --workers 4
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HIV = ROOT.parent / "shared" / "data" / "molecules" / "moleculenet" / "hiv.csv.gz"


def plain_rdkit_loop(smiles: list[str]) -> list[str | None]:
    """Parse -> standardise -> featurise with RDKit directly, one process, no medmm."""
    import numpy as np
    from rdkit import Chem, RDLogger
    from rdkit.Chem import rdFingerprintGenerator
    from rdkit.Chem.MolStandardize import rdMolStandardize

    RDLogger.DisableLog("rdApp.*")
    p = rdMolStandardize.CleanupParameters()
    p.tautomerRemoveSp3Stereo = False
    p.tautomerRemoveBondStereo = False
    p.maxTautomers = p.maxTransforms = 64
    enumerator = rdMolStandardize.TautomerEnumerator(p)
    uncharger = rdMolStandardize.Uncharger(canonicalOrder=True)
    fpgen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    out: list[str | None] = []
    for s in smiles:
        try:
            mol = Chem.MolFromSmiles(s)
            if mol is None:
                out.append(None)
                continue
            mol = enumerator.Canonicalize(uncharger.uncharge(rdMolStandardize.FragmentParent(mol)))
            Chem.SanitizeMol(mol)
            feats = np.zeros((mol.GetNumAtoms(), 6), dtype=np.float32)
            for a in mol.GetAtoms():
                feats[a.GetIdx()] = (a.GetAtomicNum(), a.GetDegree(), a.GetFormalCharge(), a.GetTotalNumHs(),
                                     int(a.GetHybridization()), a.GetIsAromatic())
            edges = np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx(), int(b.GetBondType())) for b in mol.GetBonds()])
            fp = fpgen.GetFingerprintAsNumPy(mol)
            del feats, edges, fp
            out.append(Chem.MolToSmiles(mol))
        except Exception:  # noqa: BLE001 - the plain loop just skips what RDKit rejects
            out.append(None)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="molecules (the first N of HIV)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "molecules.json"))
    a = ap.parse_args(argv)

    from medmm.io.molecules import process_molecules

    with gzip.open(HIV, "rt", newline="") as f:
        smiles = [r["smiles"] for _, r in zip(range(a.n), csv.DictReader(f))]
    feats = ("graph", "fingerprint")
    runs = {}
    t = time.perf_counter()
    plain = plain_rdkit_loop(smiles)
    runs["plain_rdkit_loop"] = {"seconds": time.perf_counter() - t, "ok": sum(s is not None for s in plain)}
    t = time.perf_counter()
    med0 = process_molecules(smiles, features=feats, workers=0)
    runs["medmm_in_process"] = {"seconds": time.perf_counter() - t, "ok": sum(r.ok for r in med0)}
    t = time.perf_counter()
    medw = process_molecules(smiles, features=feats, workers=a.workers)
    runs[f"medmm_workers{a.workers}"] = {"seconds": time.perf_counter() - t, "ok": sum(r.ok for r in medw)}
    base = runs["plain_rdkit_loop"]["seconds"]
    for r in runs.values():
        r["molecules_per_s"] = round(len(smiles) / r["seconds"], 1)
        r["speedup_vs_plain"] = round(base / r["seconds"], 3)
        r["seconds"] = round(r["seconds"], 3)
    both = [(p, m.smiles) for p, m in zip(plain, med0) if p is not None and m.ok]
    same_workers = all(x.smiles == y.smiles for x, y in zip(med0, medw))
    kinds: dict[str, int] = {}
    for r in med0:
        if not r.ok:
            kinds[r.error["kind"]] = kinds.get(r.error["kind"], 0) + 1
    result = {
        "benchmark": "molecules", "molecules": len(smiles), "source": str(HIV.relative_to(ROOT.parent)),
        "features": list(feats), "workers": a.workers, "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "runs": runs,
        "canonical_smiles_agree_plain_vs_medmm": f"{sum(p == m for p, m in both)}/{len(both)}",
        "workers_output_identical": same_workers, "medmm_rejected_by_kind": kinds,
        "note": "medmm re-runs tautomer canonicalisation until the SMILES is stable; the plain loop runs it once",
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(smiles)} HIV molecules, {os.cpu_count()} cores; canonical SMILES plain vs medmm agree "
          f"{result['canonical_smiles_agree_plain_vs_medmm']}; medmm rejected {kinds}")
    for name, r in runs.items():
        print(f"  {name:20s} {r['seconds']:8.2f} s  {r['molecules_per_s']:8.1f} mol/s  {r['speedup_vs_plain']:5.2f}x "
              f"vs plain ({r['ok']} ok)")
    print(f"  wrote {out}")
    w = runs[f"medmm_workers{a.workers}"]
    print(f"molecules: medmm with {a.workers} workers {w['molecules_per_s']:.0f} mol/s = {w['speedup_vs_plain']:.2f}x "
          f"the plain single-process RDKit loop ({runs['plain_rdkit_loop']['molecules_per_s']:.0f} mol/s)")
    return result


if __name__ == "__main__":
    main()
