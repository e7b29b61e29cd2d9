"""Train/validation/test splits: Bemis-Murcko scaffold split for molecules, stratified and random splits.

A scaffold split puts every molecule sharing a Bemis-Murcko scaffold in the same part, so the test set
holds chemotypes the model never saw (the MoleculeNet / chemprop "balanced scaffold" procedure:
scaffold groups larger than half the test size go to train first, the rest are shuffled with the seed).
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
