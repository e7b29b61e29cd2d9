"""Molecule pipeline benchmark: molecules/s through parse -> standardise -> featurise, one run, the same molecules.

The molecules are the first ``--n`` SMILES of MoleculeNet HIV (``../shared/data/molecules/moleculenet/hiv.csv.gz``;
metal complexes, salts and charged species included). The ways through the same work:

* ``plain_rdkit_loop`` (the baseline of every ``speedup_vs_plain``): the obvious alternative, a single-process
  loop written directly against RDKit: ``MolFromSmiles`` -> ``FragmentParent`` -> ``Uncharger`` ->
  ``TautomerEnumerator.Canonicalize`` (same parameters as medmm: stereo kept, 64 tautomers at most), repeated
  until the SMILES stops changing (at most 3 passes, as medmm: one pass is not a fixed point for ~1% of
  molecules) -> canonical SMILES, atom/bond graph arrays and a 2048-bit Morgan fingerprint; failures are
  counted and skipped. No cache;
* ``plain_rdkit_loop_one_pass``: the same with a single tautomer pass (less work than medmm does: the
  molecules the first pass changes get no second pass), for reference (``speedup_vs_plain_one_pass``);
* ``plain_rdkit_pool<N>``: the plain loop run in a pool of ``--workers`` processes (fork; the block cut into
  chunks as medmm cuts it): the obvious parallel alternative, and the ceiling of what the cores give the same
  work on this machine (``speedup_vs_plain`` of it: 1.8 needs this to be near 2). ``medmm_vs_plain_pool`` compares
  medmm's pool with it;
* ``medmm_in_process``: :func:`medmm.io.molecules.process_molecules` with ``workers=0`` and an empty
  tautomer cache (the same steps plus typed errors with RDKit's reason, captured RDKit logs, the size
  limit, each tautomer pass read back from its canonical SMILES and cached by it, the full one-hot atom
  features), to show the wrapper's cost;
* ``medmm_workers<N>``: the same with ``--workers`` processes (default: every core) and an empty cache:
  one pool, chunks of n / (16 x workers) rows (8 to 256), each chunk's records shipped back as one compact payload;
* ``medmm_workers<N>_warm_cache``: the same call again in the same process: every tautomer pass is now a
  cache hit (as for the seeds of a benchmark, or molecules shared between MoleculeNet files).

The molecules are split into ``--blocks`` consecutive blocks (default 4), and each block goes every way in
turn (the order rotated from block to block, the tautomer cache emptied before each cold run), so a change in
the load of a shared machine falls on every way alike. Each way is timed from a block's list of SMILES to its
list of featurised records (pool start-up included, once per block), summed over the blocks and over
``--repeats`` runs of the whole schedule (default 3), by wall clock (``seconds``, ``speedup_vs_plain``; each
repeat's in ``speedup_vs_plain_per_repeat``: on a shared 2-core machine they spread by about ±0.1) and by CPU
time of the process and its workers (``cpu_seconds``, ``cpu_work_vs_plain``: the work done, which other jobs on
a shared machine change less). The canonical SMILES of the first repeat's runs are compared. Writes
``bench/results/molecules.json``; the last printed line is the headline.

Run::

    python bench/molecules.py                  # --n 2000 --workers <cores>
    python bench/molecules.py --n 5000 --workers 4
"""

from __future__ import annotations

import argparse
import csv
import functools
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


@functools.lru_cache(maxsize=1)
def _plain_tools():
    """The plain loop's RDKit enumerator, uncharger and fingerprint generator, built once per process."""
    from rdkit.Chem import rdFingerprintGenerator
    from rdkit.Chem.MolStandardize import rdMolStandardize

    p = rdMolStandardize.CleanupParameters()
    p.tautomerRemoveSp3Stereo = False
    p.tautomerRemoveBondStereo = False
    p.maxTautomers = p.maxTransforms = 64
    return (rdMolStandardize.TautomerEnumerator(p), rdMolStandardize.Uncharger(canonicalOrder=True),
            rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048))


def plain_rdkit_loop(smiles: list[str], passes: int = 3) -> list[str | None]:
    """Parse -> standardise -> featurise with RDKit directly, one process, no medmm, no cache.

    ``passes``: tautomer canonicalisation repeated until the SMILES is stable, at most this many times (medmm: 3).
    """
    import numpy as np
    from rdkit import Chem, RDLogger
    from rdkit.Chem.MolStandardize import rdMolStandardize

    RDLogger.DisableLog("rdApp.*")
    enumerator, uncharger, fpgen = _plain_tools()
    out: list[str | None] = []
    for s in smiles:
        try:
            mol = Chem.MolFromSmiles(s)
            if mol is None:
                out.append(None)
                continue
            mol = uncharger.uncharge(rdMolStandardize.FragmentParent(mol))
            smi = Chem.MolToSmiles(mol)
            for _ in range(passes):
                mol = enumerator.Canonicalize(mol)
                new = Chem.MolToSmiles(mol)
                if new == smi:
                    break
                smi = new
            Chem.SanitizeMol(mol)
            feats = np.zeros((mol.GetNumAtoms(), 6), dtype=np.float32)
            for a in mol.GetAtoms():
                feats[a.GetIdx()] = (a.GetAtomicNum(), a.GetDegree(), a.GetFormalCharge(), a.GetTotalNumHs(),
                                     int(a.GetHybridization()), a.GetIsAromatic())
            edges = np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx(), int(b.GetBondType())) for b in mol.GetBonds()])
            fp = fpgen.GetFingerprintAsNumPy(mol)
            del feats, edges, fp
            out.append(smi)
        except Exception:  # noqa: BLE001 - the plain loop just skips what RDKit rejects
            out.append(None)
    return out


def plain_rdkit_pool(smiles: list[str], workers: int) -> list[str | None]:
    """:func:`plain_rdkit_loop` over chunks of ``smiles`` in ``workers`` forked processes, results in input order."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from medmm.io.molecules import default_chunksize

    size = default_chunksize(len(smiles), workers)  # the chunks medmm's pool is given
    chunks = [smiles[k: k + size] for k in range(0, len(smiles), size)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
        return [s for part in pool.map(plain_rdkit_loop, chunks) for s in part]


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the pool's workers, once it has shut down)."""
    import resource

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="molecules (the first N of HIV)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--blocks", type=int, default=4,
                    help="the molecules are run in this many blocks, every way through each block in turn")
    ap.add_argument("--repeats", type=int, default=3,
                    help="the whole schedule is run this many times: the figures pool every repeat, and each "
                         "repeat's speedups are listed (how much a shared machine moves them)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "molecules.json"))
    a = ap.parse_args(argv)

    from medmm.io.molecules import clear_standardise_cache, process_molecules, standardise_cache_info

    with gzip.open(HIV, "rt", newline="") as f:
        smiles = [r["smiles"] for _, r in zip(range(a.n), csv.DictReader(f))]
    feats = ("graph", "fingerprint")
    wname = f"medmm_workers{a.workers}"
    pname = f"plain_rdkit_pool{a.workers}"
    runs: dict = {}
    cache = {"medmm_in_process": {"hits": 0, "misses": 0}, wname: {"entries_sent_back_by_workers": 0}}
    outs: dict[str, list] = {}
    per_repeat: dict[str, list[float]] = {}  # way -> seconds in each repeat
    rep = [0]

    def timed(name, fn):
        t, cpu = time.perf_counter(), _cpu()
        out = fn()
        r = runs.setdefault(name, {"seconds": 0.0, "cpu_seconds": 0.0, "ok": 0})
        r["seconds"] += time.perf_counter() - t
        r["cpu_seconds"] += _cpu() - cpu
        per_repeat.setdefault(name, [0.0] * a.repeats)[rep[0]] += time.perf_counter() - t
        if rep[0] == 0:  # outputs, counts: the first repeat's (the others compute the same)
            r["ok"] += sum((s is not None) if isinstance(s, str | None) else s.ok for s in out)
            outs.setdefault(name, []).extend(out)

    def in_process(block):
        clear_standardise_cache()
        timed("medmm_in_process", lambda: process_molecules(block, features=feats, workers=0))
        info = standardise_cache_info()
        if rep[0] == 0:  # counts: the first repeat's, as the outputs
            for k in ("hits", "misses"):
                cache["medmm_in_process"][k] += info[k]

    def pooled(block):
        clear_standardise_cache()
        timed(wname, lambda: process_molecules(block, features=feats, workers=a.workers))
        if rep[0] == 0:
            cache[wname]["entries_sent_back_by_workers"] += standardise_cache_info()["entries"]
        timed(f"{wname}_warm_cache", lambda: process_molecules(block, features=feats, workers=a.workers))

    units = [lambda b: timed("plain_rdkit_loop", lambda: plain_rdkit_loop(b)),
             lambda b: timed("plain_rdkit_loop_one_pass", lambda: plain_rdkit_loop(b, passes=1)),
             lambda b: timed(pname, lambda: plain_rdkit_pool(b, a.workers)), in_process, pooled]
    size = -(-len(smiles) // a.blocks)
    for rep[0] in range(a.repeats):
        for k, start in enumerate(range(0, len(smiles), size)):  # interleaved, order rotated: drift hits all alike
            turn = (k + rep[0] * a.blocks) % len(units)
            for unit in units[turn:] + units[:turn]:
                unit(smiles[start: start + size])
        print(f"  repeat {rep[0] + 1}/{a.repeats}: medmm with {a.workers} workers "
              f"{per_repeat['plain_rdkit_loop'][rep[0]] / per_repeat[wname][rep[0]]:.2f}x the plain loop", flush=True)
    runs = {name: runs[name] for name in ("plain_rdkit_loop", "plain_rdkit_loop_one_pass", pname, "medmm_in_process",
                                          wname, f"{wname}_warm_cache")}
    plain, plain1, plainw, med0, medw, medw2 = (outs[name] for name in runs)
    base, base1 = runs["plain_rdkit_loop"]["seconds"], runs["plain_rdkit_loop_one_pass"]["seconds"]
    base_cpu = runs["plain_rdkit_loop"]["cpu_seconds"]
    for name, r in runs.items():
        r["speedup_vs_plain_per_repeat"] = [round(p / m, 3) for p, m in zip(per_repeat["plain_rdkit_loop"],
                                                                             per_repeat[name])]
        r["molecules_per_s"] = round(len(smiles) * a.repeats / r["seconds"], 1)
        r["speedup_vs_plain"] = round(base / r["seconds"], 3)
        r["speedup_vs_plain_one_pass"] = round(base1 / r["seconds"], 3)
        r["cpu_work_vs_plain"] = round(r["cpu_seconds"] / base_cpu, 3)
        r["seconds"], r["cpu_seconds"] = round(r["seconds"], 3), round(r["cpu_seconds"], 3)
    both = [(p, m.smiles) for p, m in zip(plain, med0) if p is not None and m.ok]
    both1 = [(p, m.smiles) for p, m in zip(plain1, med0) if p is not None and m.ok]
    same_workers = all(x.smiles == y.smiles for x, y in zip(med0, medw))
    same_warm = all(x.smiles == y.smiles and x.warnings == y.warnings and
                    (not x.ok or (x.graph.node_features == y.graph.node_features).all()) for x, y in zip(medw, medw2))
    kinds: dict[str, int] = {}
    for r in med0:
        if not r.ok:
            kinds[r.error["kind"]] = kinds.get(r.error["kind"], 0) + 1
    result = {
        "benchmark": "molecules", "molecules": len(smiles), "source": str(HIV.relative_to(ROOT.parent)),
        "features": list(feats), "workers": a.workers, "blocks": a.blocks, "repeats": a.repeats,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "runs": runs,
        "canonical_smiles_agree_plain_vs_medmm": f"{sum(p == m for p, m in both)}/{len(both)}",
        "canonical_smiles_agree_plain_one_pass_vs_medmm": f"{sum(p == m for p, m in both1)}/{len(both1)}",
        "medmm_vs_plain_pool": round(runs[pname]["seconds"] / runs[wname]["seconds"], 3),
        "plain_pool_output_identical": plainw == plain,
        "workers_output_identical": same_workers, "warm_cache_output_identical": same_warm,
        "tautomer_cache": cache, "medmm_rejected_by_kind": kinds,
        "note": ("plain_rdkit_loop (the baseline of speedup_vs_plain) does the same RDKit steps as medmm, tautomer "
                 "pass repeated until the SMILES is stable (<= 3 passes), without a cache; plain_rdkit_loop_one_pass "
                 "stops after one pass (less work; speedup_vs_plain_one_pass); plain_rdkit_pool<N> runs the plain loop in N "
                 "forked processes (medmm_vs_plain_pool = its seconds / medmm's pool's). medmm adds typed errors "
                 "(DetectChemistryProblems), captured RDKit logs, the size limit, re-reads each tautomer pass's input "
                 "from its canonical SMILES (so passes are cached by it; differs from the plain loop's pick for a few "
                 "metal complexes whose enumeration is truncated), 58 one-hot atom features against the plain loop's "
                 "6 columns. Cold runs start from an empty tautomer cache; repeats within the input and passes that "
                 "meet an earlier result are still skipped (see tautomer_cache). _warm_cache repeats the call in the "
                 "same process. The runs interleave block by block (--blocks), the whole schedule --repeats "
                 "times (figures pooled, speedup_vs_plain_per_repeat per repeat). seconds = wall clock; "
                 "cpu_seconds = CPU of the process and its workers (cpu_work_vs_plain: the work done, less "
                 "sensitive to other jobs on the machine). Timings on a shared 2-core machine where "
                 "other jobs keep cores busy: wall-clock speedups are noisy."),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(smiles)} HIV molecules, {os.cpu_count()} cores; canonical SMILES plain vs medmm agree "
          f"{result['canonical_smiles_agree_plain_vs_medmm']}; medmm rejected {kinds}")
    for name, r in runs.items():
        print(f"  {name:28s} {r['seconds']:8.2f} s  {r['molecules_per_s']:8.1f} mol/s  {r['speedup_vs_plain']:5.2f}x "
              f"vs plain  cpu {r['cpu_seconds']:7.2f} s ({r['cpu_work_vs_plain']:.2f}x plain's) ({r['ok']} ok)")
    print(f"  wrote {out}")
    w = runs[wname]
    print(f"molecules: medmm with {a.workers} workers {w['molecules_per_s']:.0f} mol/s = {w['speedup_vs_plain']:.2f}x "
          f"the plain single-process RDKit loop ({runs['plain_rdkit_loop']['molecules_per_s']:.0f} mol/s); the plain "
          f"loop in {a.workers} processes: {runs[pname]['speedup_vs_plain']:.2f}x (medmm = "
          f"{result['medmm_vs_plain_pool']:.2f}x it)")
    return result


if __name__ == "__main__":
    main()
