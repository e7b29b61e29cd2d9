"""SMILES -> RDKit molecule -> standardised canonical SMILES and Morgan fingerprints.

RDKit's own log output is captured and turned into the error message instead of being printed.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

from ..errors import SmilesError

MAX_HEAVY_ATOMS = 200


@contextlib.contextmanager
def _captured_rdkit_log():
    """Redirect RDKit's C++ log into a buffer for the duration of the block."""
    from rdkit import rdBase

    buf = io.StringIO()
    rdBase.LogToPythonStderr()
    with contextlib.redirect_stderr(buf):
        yield buf


def parse_smiles(smiles: str, source: str = "<smiles>", standardise: bool = True,
                 max_heavy_atoms: int = MAX_HEAVY_ATOMS):
    """Parse and (optionally) standardise a SMILES. Raises SmilesError naming ``source`` and RDKit's reason."""
    from rdkit import Chem
    from rdkit.Chem.MolStandardize import rdMolStandardize

    if not isinstance(smiles, str) or not smiles.strip():
        raise SmilesError(source, "empty SMILES")
    with _captured_rdkit_log() as log:
        mol = Chem.MolFromSmiles(smiles.strip())
    if mol is None:
        reason = " ".join(line.split("] ", 1)[-1].strip() for line in log.getvalue().splitlines() if line.strip())
        raise SmilesError(source, f"RDKit cannot parse '{smiles}': {reason or 'unknown reason'}")
    if standardise:
        with _captured_rdkit_log() as log:
            try:
                mol = rdMolStandardize.FragmentParent(mol)  # largest organic fragment (salts stripped)
                mol = rdMolStandardize.Uncharger().uncharge(mol)
                Chem.SanitizeMol(mol)
            except Exception as e:  # RDKit raises its own types (e.g. AtomValenceException)
                raise SmilesError(source, f"RDKit cannot standardise '{smiles}': {e}") from e
    n = mol.GetNumHeavyAtoms()
    if n == 0:
        raise SmilesError(source, "no heavy atoms")
    if n > max_heavy_atoms:
        raise SmilesError(source, f"{n} heavy atoms is over the limit of {max_heavy_atoms}")
    return mol


def canonical_smiles(mol) -> str:
    from rdkit import Chem

    return Chem.MolToSmiles(mol)


def morgan_fingerprint(mol, bits: int = 2048, radius: int = 2) -> np.ndarray:
    """Morgan (ECFP-like) bit vector as float32 (bits,)."""
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=bits)
    return gen.GetFingerprintAsNumPy(mol).astype(np.float32)
