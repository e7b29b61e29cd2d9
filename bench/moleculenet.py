"""MoleculeNet benchmark: test ROC-AUC of medmm's molecule head (a GIN with a virtual node + Morgan fingerprint + RDKit
2D descriptors; ``--mol-features none`` = the GIN alone, ``--virtual-node false`` = without the virtual node) on BBBP, BACE, ClinTox, Tox21 and HIV over seeds, on the deterministic
scaffold split, beside the published GIN figures (Hu et al. 2020; OGB ogbg-molhiv).

A thin wrapper of ``medmm eval moleculenet`` (:mod:`medmm.eval.benchmarks.moleculenet`), which trains one
``trainer.stage: head`` run per dataset and seed and writes ``bench/results/moleculenet.json``::

    {"no_pretrain": {"bbbp": {"mean": .., "std": .., "seeds": [..], "n_seeds": 5}, ...},
     "pretrained": {...}, "published": {...}, "protocol": {"no_pretrain": {...}, "pretrained": {...}}}

(ROC-AUC 0-100) and ``bench/results/moleculenet.png``. HIV (41k molecules) runs here, never in the tests.

Run::

    python bench/moleculenet.py                                    # 5 seeds, no pre-training
    python bench/moleculenet.py --datasets bbbp,bace --seeds 5 --epochs 4 --jobs 2
    python bench/moleculenet.py --mol-features none                # the GIN alone
    python train.py --config configs/tasks/mol_pretrain.yaml        # the encoder (test molecules excluded)
    python bench/moleculenet.py --seeds-per-dataset '{"hiv": 3}' --pretrained runs/mol_pretrain/checkpoint
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medmm.eval.benchmarks.moleculenet import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a.startswith("--seeds-per-dataset") for a in argv):
        argv += ["--seeds-per-dataset", '{"hiv": 3}']
    main(argv)
