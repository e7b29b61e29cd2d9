"""Train/validation/test splits: Bemis-Murcko scaffold splits for molecules, stratified and random splits.

A scaffold split puts every molecule sharing a Bemis-Murcko scaffold in the same part, so the test set
holds chemotypes the model never saw. Two procedures:

* ``scaffold`` (:func:`scaffold_split`): chemprop's "balanced scaffold" split: scaffold groups larger than
  half the test size go to train first, the rest are shuffled with the seed.
* ``scaffold_deterministic`` (:func:`scaffold_deterministic_split`): the split of the MoleculeNet GNN
  literature (Hu et al. 2020 ``chem/splitters.py::scaffold_split``, DeepChem's ``ScaffoldSplitter``, OGB):
  no seed; groups largest first, so published tables are comparable with ours.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence


def _sizes(n: int, fractions: Sequence[float]) -> list[int]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    n_val, n_test = int(round(fractions[1] * n)), int(round(fractions[2] * n))
    return [n - n_val - n_test, n_val, n_test]


def scaffold_split(scaffolds: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                   seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    """Indices of (train, validation, test) with no scaffold in two parts.

    Args:
        scaffolds: one scaffold SMILES per molecule (``medmm.io.molecules.murcko_scaffold``; "" = acyclic).
        fractions: target sizes of the three parts.
        seed: order of the small scaffold groups.
    """
    _, n_val, n_test = _sizes(len(scaffolds), fractions)
    n_train = len(scaffolds) - n_val - n_test
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(scaffolds):
        groups[s].append(i)
    sets = sorted(groups.values(), key=lambda g: (-len(g), g[0]))
    big = [g for g in sets if len(g) > max(n_val, n_test) / 2]
    small = [g for g in sets if len(g) <= max(n_val, n_test) / 2]
    random.Random(seed).shuffle(small)
    train: list[int] = []
    val: list[int] = []
    test: list[int] = []
    for g in big + small:
        if len(train) + len(g) <= n_train:
            train += g
        elif len(val) + len(g) <= n_val:
            val += g
        else:
            test += g
    return sorted(train), sorted(val), sorted(test)


def scaffold_deterministic_split(scaffolds: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1)
                                 ) -> tuple[list[int], list[int], list[int]]:
    """Indices of (train, validation, test) by the deterministic scaffold procedure of Hu et al. 2020.

    Molecules are grouped by scaffold; groups are ordered by (size, first index) descending (``sorted(...,
    reverse=True)``, so ties go to the larger first index). In that order a group goes to train unless train
    would then exceed ``fractions[0] * n``; else to validation unless train + validation would exceed
    ``(fractions[0] + fractions[1]) * n``; else to test. A later, smaller group can still enter train.

    Args:
        scaffolds: one scaffold per molecule, in input order, over the molecules RDKit parses (n = their number):
            ``medmm.io.molecules.scaffold_as_written`` of the SMILES as written in the file (with chirality).
        fractions: train / validation / test shares.

    Returns:
        Sorted positions in ``scaffolds`` of the three parts.
    """
    _sizes(len(scaffolds), fractions)  # checks the fractions
    n = len(scaffolds)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(scaffolds):
        groups[s].append(i)
    ordered = sorted(groups.values(), key=lambda g: (len(g), g[0]), reverse=True)
    train_cutoff = fractions[0] * n
    valid_cutoff = (fractions[0] + fractions[1]) * n
    train: list[int] = []
    val: list[int] = []
    test: list[int] = []
    for g in ordered:
        if len(train) + len(g) > train_cutoff:
            if len(train) + len(val) + len(g) > valid_cutoff:
                test += g
            else:
                val += g
        else:
            train += g
    return sorted(train), sorted(val), sorted(test)


def scaffold_deterministic_rows(smiles: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1)
                                ) -> dict[str, list[int]]:
    """:func:`scaffold_deterministic_split` of a file's SMILES column as written: ``{"train", "val", "test",
    "rejected"}`` -> row numbers (positions in ``smiles``); ``rejected`` = the rows RDKit cannot parse."""
    from ..io.molecules import scaffolds_as_written

    scaf = scaffolds_as_written(smiles)
    parsed = [k for k, sc in enumerate(scaf) if sc is not None]
    parts = scaffold_deterministic_split([scaf[k] for k in parsed], fractions)
    out = {name: [parsed[j] for j in idx] for name, idx in zip(("train", "val", "test"), parts)}
    return out | {"rejected": [k for k, sc in enumerate(scaf) if sc is None]}


def stratified_split(labels: Sequence[int], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                     seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    """Random split keeping each label's share in every part."""
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    rng = random.Random(seed)
    for lab in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == lab]
        rng.shuffle(idx)
        n_tr, n_va, _ = _sizes(len(idx), fractions)
        parts[0].extend(idx[:n_tr])
        parts[1].extend(idx[n_tr:n_tr + n_va])
        parts[2].extend(idx[n_tr + n_va:])
    return sorted(parts[0]), sorted(parts[1]), sorted(parts[2])


def random_split(n: int, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                 seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    """Plain random split of ``range(n)``."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    n_tr, n_va, _ = _sizes(n, fractions)
    return sorted(idx[:n_tr]), sorted(idx[n_tr:n_tr + n_va]), sorted(idx[n_tr + n_va:])
