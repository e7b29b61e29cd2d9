"""SMILES -> RDKit molecule -> standardised canonical SMILES, graph tensors, fingerprints, descriptors, rules.

The standardisation pipeline (:func:`parse_smiles`), in order, each step switchable in
:class:`StandardiseOptions`:

1. parse without sanitising, then ask RDKit for its chemistry problems: a bad valence or an aromatic
   ring that cannot be kekulised is a :class:`~medmm.errors.SmilesError` carrying RDKit's own reason
   (``err.kind`` is ``empty | syntax | valence | kekulize | too_large | no_heavy_atoms | standardise``);
2. size limit on the largest fragment (checked before the expensive steps);
3. ``rdMolStandardize.FragmentParent``: RDKit's cleanup (metal disconnection, functional-group
   normalisation, reionisation), then the largest organic fragment (salts, solvents, mixtures dropped);
4. ``Uncharger``: neutralised where a neutral form exists (a quaternary N stays +1);
5. ``TautomerEnumerator.Canonicalize``: the canonical tautomer. Stereo on sp3 centres and double
   bonds is *kept* (RDKit's default would drop it from e.g. every amino acid's alpha carbon), and
   enumeration stops at ``max_tautomers`` (RDKit's default of 1000 costs ~25 ms a molecule; 64
   changes the pick for ~1% of ClinTox at a fifth of the cost). A changed molecule is canonicalised
   again until its SMILES is stable, so standardising a canonical SMILES returns it unchanged. Each pass
   starts from the molecule read back from its canonical SMILES and is cached by that SMILES (per process;
   workers send their entries back), so a molecule met again -- a duplicate row, another salt or another
   way of writing it, the same compound in another MoleculeNet file -- is not canonicalised again, with
   the same result as a fresh run. The molecule kept is the one read back from the SMILES the passes
   converged on: that read sanitised it and that SMILES is its canonical SMILES, so neither is done again
   (the records are identical to doing both on all 54,251 MoleculeNet SMILES). (The key is the canonical
   SMILES, not the InChIKey: computing an InChIKey
   costs ~5x a canonical SMILES, and a standard InChIKey is shared by mobile-H tautomers whose capped
   enumerations can pick different canonical tautomers, so sharing a result by it would not equal the
   uncached output.) This step is the costliest of the pipeline (~60% of the time); switch it
   off (``canonical_tautomer=False``; head configs: ``preprocess.mol_canonical_tautomer: false``) where a
   benchmark's protocol featurises the SMILES as written: MoleculeNet and OGB (Hu et al. 2020, chemprop)
   run no tautomer pass, and ``medmm eval moleculenet`` / ``mol_pretrain`` switch it off. medmm's own
   druggability configs keep it on;
6. optionally, every stereo tag removed.

RDKit's log output is captured while it works (never printed) and turned into the error message or
the record's ``warnings``. :func:`process_molecules` runs the pipeline plus featurisation over a list
of SMILES in worker processes, keeping one record per input, failures included; a SMILES repeated in the
list is processed once, and each worker ships a chunk's records back as one compact payload (graphs
concatenated, fingerprints as packed bits).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import SmilesError, excerpt

MAX_HEAVY_ATOMS = 200
CHARS_PER_ATOM_LIMIT = 20  # a SMILES longer than this many characters per allowed atom is rejected unparsed
MAX_SMILES_CHARS = 10_000  # a SMILES longer than this is rejected unparsed, whatever the heavy-atom limit
SOURCE_CHARS = 256  # a longer ``source`` (e.g. one that quotes the input) is cut to an excerpt in errors
REASON_CHARS = 240  # RDKit's own reasons are cut too: its log lines can quote the input
ERROR_KINDS = {
    "empty": "empty SMILES",
    "syntax": "SMILES syntax error",
    "valence": "bad valence",
    "kekulize": "cannot kekulize the aromatic system",
    "too_large": "over the size limit",
    "no_heavy_atoms": "no heavy atoms",
    "standardise": "standardisation failed",
}


@dataclass(frozen=True)
class StandardiseOptions:
    """What :func:`parse_smiles` does after parsing (see the module docstring for the order)."""

    largest_fragment: bool = True
    """Keep the largest organic fragment (after RDKit's cleanup)."""
    neutralise: bool = True
    """Neutralise charges where a neutral form exists."""
    canonical_tautomer: bool = True
    """Replace the molecule by RDKit's canonical tautomer (stereo kept), cached by canonical SMILES. The costliest
    step: off for protocols that featurise the SMILES as written (MoleculeNet/OGB: ``medmm eval moleculenet`` and
    ``mol_pretrain`` turn it off); on for medmm's druggability pipeline."""
    remove_stereo: bool = False
    """Drop every stereo tag (chiral centres, E/Z)."""
    max_heavy_atoms: int = MAX_HEAVY_ATOMS
    """Reject larger molecules (largest fragment when ``largest_fragment``)."""
    max_tautomers: int = 64
    """Cap on tautomers enumerated when canonicalising."""


RAW = StandardiseOptions(largest_fragment=False, neutralise=False, canonical_tautomer=False)


# ----------------------------------------------------------------------------- RDKit log capture
class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = re.sub(r"^\[\d\d:\d\d:\d\d\]\s*", "", record.getMessage()).strip()
        if msg:
            self.records.append((record.levelno, msg))

    def lines(self, min_level: int = logging.WARNING) -> list[str]:
        return [m for lvl, m in self.records if lvl >= min_level]


@contextlib.contextmanager
def captured_rdkit_log():
    """Route RDKit's C++ log into a buffer for the block (yields the handler; ``.lines()`` gives the text).

    Only RDKit's warning and error channels are on inside: ``LogToPythonLogger`` switches every channel on, and
    info and debug (which the buffer never keeps) would then stay on for the rest of the process, routed to Python's
    ``rdkit`` logger. They are switched back off, as RDKit starts.
    """
    from rdkit import rdBase

    rdBase.LogToPythonLogger()
    rdBase.DisableLog("rdApp.info")
    rdBase.DisableLog("rdApp.debug")
    logger = logging.getLogger("rdkit")
    saved, saved_prop = logger.handlers[:], logger.propagate
    cap = _Capture()
    logger.handlers = [cap]
    logger.propagate = False
    try:
        yield cap
    finally:
        logger.handlers, logger.propagate = saved, saved_prop


# ----------------------------------------------------------------------------- parsing and standardising
def smiles_error(source: str, kind: str, detail: str) -> SmilesError:
    """A SmilesError whose message starts with the kind's label; ``err.kind`` holds the kind.

    A ``source`` over :data:`SOURCE_CHARS` is cut to an excerpt: callers that name an inline input by the input
    itself would otherwise echo all of it (a megabyte SMILES sent to the HTTP API would come back whole).
    """
    source = str(source)
    if len(source) > SOURCE_CHARS:
        source = excerpt(source, SOURCE_CHARS)
    err = SmilesError(source, f"{ERROR_KINDS[kind]}: {detail}")
    err.kind = kind  # type: ignore[attr-defined]
    return err


def _parse_reason(lines: list[str]) -> str:
    """RDKit's parse-error lines -> one reason (drops the echo of the input and the caret line)."""
    parts = []
    for line in lines:
        if "Parse Error" not in line or "Failed parsing SMILES" in line:
            continue
        line = line.split("Parse Error:", 1)[1].strip()
        m = re.match(r"check for mistakes around position (\d+)", line)
        parts.append(f"at position {m.group(1)}" if m else line)
    return excerpt(" ".join(parts) or "; ".join(lines) or "unknown reason", REASON_CHARS)


@functools.lru_cache(maxsize=8)
def _tautomer_enumerator(max_tautomers: int):
    from rdkit.Chem.MolStandardize import rdMolStandardize

    p = rdMolStandardize.CleanupParameters()
    p.tautomerRemoveSp3Stereo = False
    p.tautomerRemoveBondStereo = False
    p.maxTautomers = max_tautomers
    p.maxTransforms = max_tautomers
    return rdMolStandardize.TautomerEnumerator(p)


@functools.lru_cache(maxsize=1)
def _uncharger():
    from rdkit.Chem.MolStandardize import rdMolStandardize

    return rdMolStandardize.Uncharger(canonicalOrder=True)


def _problem_error(mol, source: str, smiles: str) -> SmilesError | None:
    """RDKit's first chemistry problem (valence, kekulisation) as a typed error, or None."""
    from rdkit import Chem

    with captured_rdkit_log():  # RDKit also logs each problem it finds
        problems = Chem.DetectChemistryProblems(mol)
    if not problems:
        return None
    p = problems[0]
    kind = "kekulize" if "Kekulize" in p.GetType() else "valence" if "Valence" in p.GetType() else "standardise"
    detail = f"RDKit: {excerpt(p.Message(), REASON_CHARS)} (SMILES '{excerpt(smiles)}')"
    if kind == "kekulize":
        atoms = [mol.GetAtomWithIdx(i) for i in p.GetAtomIndices()]
        if any(a.GetSymbol() == "N" and a.GetIsAromatic() and a.GetTotalNumHs() == 0 and a.GetDegree() == 2
               for a in atoms):
            detail += "; an aromatic nitrogen probably needs its hydrogen written, e.g. [nH]"
    return smiles_error(source, kind, detail)


def parse_smiles(smiles: str, source: str = "<smiles>", standardise: bool = True,
                 max_heavy_atoms: int = MAX_HEAVY_ATOMS, options: StandardiseOptions | None = None,
                 warnings: list[str] | None = None):
    """Parse and (optionally) standardise a SMILES.

    Args:
        smiles: the SMILES text.
        source: names the input in errors (file and row, e.g. ``assay.csv:17``).
        standardise: False parses and sanitises only (the size limit still applies).
        max_heavy_atoms: size limit, used when ``options`` is not given.
        options: the full standardisation settings (overrides ``max_heavy_atoms``).
        warnings: if given, RDKit's warnings while standardising are appended to it.

    Returns:
        An RDKit ``Mol``.

    Raises:
        SmilesError: naming ``source`` and RDKit's reason; ``err.kind`` says which check failed.
    """
    return _parse_smiles(smiles, source, standardise, max_heavy_atoms, options, warnings)[0]


def _parse_smiles(smiles: str, source: str = "<smiles>", standardise: bool = True,
                  max_heavy_atoms: int = MAX_HEAVY_ATOMS, options: StandardiseOptions | None = None,
                  warnings: list[str] | None = None):
    """:func:`parse_smiles` -> ``(Mol, its canonical SMILES or None)``: the SMILES when the tautomer passes
    converged on it (the Mol was read from it; ``canonical_smiles`` of the Mol would write it again), else None."""
    from rdkit import Chem

    opts = options or StandardiseOptions(max_heavy_atoms=max_heavy_atoms)
    if not standardise:
        opts = dataclasses.replace(RAW, max_heavy_atoms=opts.max_heavy_atoms)
    if not isinstance(smiles, str) or not smiles.strip():
        raise smiles_error(source, "empty", "no SMILES given")
    smiles = smiles.strip()
    if len(smiles) > MAX_SMILES_CHARS:  # before RDKit reads it: parsing costs grow with the text
        raise smiles_error(source, "too_large", f"a SMILES of {len(smiles)} characters is over the limit of "
                           f"{MAX_SMILES_CHARS}")
    if len(smiles) > CHARS_PER_ATOM_LIMIT * opts.max_heavy_atoms:
        raise smiles_error(source, "too_large", f"a SMILES of {len(smiles)} characters is over the limit of "
                           f"{CHARS_PER_ATOM_LIMIT * opts.max_heavy_atoms} for {opts.max_heavy_atoms} heavy atoms")
    with captured_rdkit_log() as log:
        mol = Chem.MolFromSmiles(smiles, sanitize=False)
    if mol is None:
        reason = _parse_reason(log.lines())
        raise smiles_error(source, "syntax", f"RDKit cannot parse '{excerpt(smiles)}': {reason}")
    with captured_rdkit_log() as log:
        mol.UpdatePropertyCache(strict=False)
        try:
            Chem.SanitizeMol(mol)
            failed = None
        except Exception as e:  # RDKit raises its own types (MolSanitizeException subclasses)
            failed = e
    if failed is not None:  # RDKit's chemistry problems (checked on a fresh parse) name the reason, when it has one
        with captured_rdkit_log():
            fresh = Chem.MolFromSmiles(smiles, sanitize=False)
            fresh.UpdatePropertyCache(strict=False)
        err = _problem_error(fresh, source, smiles)
        if err is not None:
            raise err from failed
        raise smiles_error(source, "standardise", f"RDKit cannot sanitise '{excerpt(smiles)}': "
                           f"{excerpt(failed, REASON_CHARS)}") from failed
    frags = Chem.GetMolFrags(mol, asMols=False, sanitizeFrags=False)
    heavy = ([mol.GetNumHeavyAtoms()] if len(frags) == 1 else  # atomic number > 1, as below
             [sum(mol.GetAtomWithIdx(i).GetAtomicNum() > 1 for i in f) for f in frags])
    n = max(heavy) if opts.largest_fragment else sum(heavy)
    if n > opts.max_heavy_atoms:
        raise smiles_error(source, "too_large", f"{n} heavy atoms is over the limit of {opts.max_heavy_atoms}")
    mol, canonical = _standardise(mol, opts, source, smiles, warnings)
    n = mol.GetNumHeavyAtoms()
    if n == 0:
        raise smiles_error(source, "no_heavy_atoms", f"nothing but hydrogen left of '{excerpt(smiles)}'")
    if n > opts.max_heavy_atoms:
        raise smiles_error(source, "too_large", f"{n} heavy atoms is over the limit of {opts.max_heavy_atoms}")
    return mol, canonical


# The tautomer step is cached: one pass is a function of the canonical SMILES it starts from (the molecule is read
# back from that SMILES, so the atom order of the input cannot change the pick), keyed with ``max_tautomers``; the
# value is the canonical tautomer's SMILES and RDKit's log lines while computing it. Worker processes send their
# new entries back with their results, so a later call in the parent (another file, another seed) reuses them.
TAUTOMER_CACHE_SIZE = 500_000
"""Entries kept before the cache is emptied (~200 bytes each)."""
_TAUTOMERS: dict[tuple[int, str], tuple[str, tuple]] = {}
_NEW_TAUTOMERS: dict[tuple[int, str], tuple[str, tuple]] = {}  # this process's entries not yet sent to the parent
_CACHE_STATS = {"hits": 0, "misses": 0}
_IN_WORKER = [False]  # set by the pool initializer: new entries are then also kept for the parent


def clear_standardise_cache() -> None:
    """Empty this process's tautomer cache (and its hit/miss counts)."""
    _TAUTOMERS.clear()
    _NEW_TAUTOMERS.clear()
    _CACHE_STATS.update(hits=0, misses=0)


def standardise_cache_info() -> dict:
    """``{"entries", "hits", "misses"}`` of this process's tautomer cache (misses = tautomer passes computed)."""
    return {"entries": len(_TAUTOMERS), **_CACHE_STATS}


def _remember_tautomers(entries: dict) -> None:
    if len(_TAUTOMERS) + len(entries) > TAUTOMER_CACHE_SIZE:
        _TAUTOMERS.clear()
    _TAUTOMERS.update(entries)


def _tautomer_step(smi: str, max_tautomers: int):
    """One canonical-tautomer pass from a canonical SMILES: ``(SMILES out, log records, the Mol read from smi, the
    log records of reading it)``.

    The Mol (and its records) are None on a cache hit, and the whole result is None when RDKit cannot read ``smi``
    back.
    """
    from rdkit import Chem

    key = (max_tautomers, smi)
    hit = _TAUTOMERS.get(key)
    if hit is not None:
        _CACHE_STATS["hits"] += 1
        return hit[0], hit[1], None, None
    with captured_rdkit_log() as read:  # re-reading repeats what the earlier steps logged: not kept in the pass's
        mol = Chem.MolFromSmiles(smi)
    if mol is None:
        return None
    with captured_rdkit_log() as log:
        out = Chem.MolToSmiles(_tautomer_enumerator(max_tautomers).Canonicalize(mol))
    _CACHE_STATS["misses"] += 1
    value = (out, tuple(log.records))
    _remember_tautomers({key: value})
    if _IN_WORKER[0]:
        _NEW_TAUTOMERS[key] = value
    return out, value[1], mol, tuple(read.records)


def _canonical_tautomer(mol, max_tautomers: int, passes: int = 3, log: _Capture | None = None):
    """RDKit's canonical tautomer, repeated until the SMILES stops changing (at most ``passes`` times), as
    ``(Mol, read, SMILES)``: ``read`` = the log records of reading the Mol back from its canonical SMILES (which
    sanitised it: they are what sanitising it again would log), ``SMILES`` = that SMILES when the passes converged
    on it; both None when the Mol comes from the uncached fallback (and the SMILES when the passes ran out).

    One pass is not always a fixed point (e.g. a tetracycline's imidic acid ``C(=N)O`` becomes the amide
    only on a second pass, as enumeration stops at ``max_tautomers`` transforms), and canonical SMILES
    must be stable for de-duplication and joins. Molecules the first pass leaves unchanged cost one pass.

    Each pass starts from the molecule read back from its canonical SMILES, so the result depends on the
    molecule only (not on how its SMILES was written) and each pass is cached by that SMILES (see
    :func:`standardise_cache_info`). RDKit's log lines of each pass go to ``log`` (cached ones too), in order;
    those of re-reading a SMILES (repeats of what the earlier steps logged) are dropped.
    """
    from rdkit import Chem

    smi = Chem.MolToSmiles(mol)
    last = None  # the Mol read from ``smi`` by the last pass computed (and its read's records), when still current
    converged = False
    for _ in range(passes):
        step = _tautomer_step(smi, max_tautomers)
        if step is None:  # RDKit cannot read its own SMILES back: canonicalise the Mol itself, uncached
            return _canonical_tautomer_uncached(mol, max_tautomers, passes), None, None
        new, records, parsed, read = step
        if log is not None:
            log.records.extend(records)
        if new == smi:
            last = (parsed, read, smi) if parsed is not None else None
            converged = True
            break
        smi = new
    if last is None:
        with captured_rdkit_log() as reread:  # as in _tautomer_step, the re-read's log is not kept in the passes'
            last = (Chem.MolFromSmiles(smi), tuple(reread.records), smi if converged else None)
    if last[0] is None:
        return _canonical_tautomer_uncached(mol, max_tautomers, passes), None, None
    return last


def _canonical_tautomer_uncached(mol, max_tautomers: int, passes: int = 3):
    from rdkit import Chem

    te = _tautomer_enumerator(max_tautomers)
    smi = Chem.MolToSmiles(mol)
    for _ in range(passes):
        mol = te.Canonicalize(mol)
        new = Chem.MolToSmiles(mol)
        if new == smi:
            break
        smi = new
    return mol


def _standardise(mol, opts: StandardiseOptions, source: str, smiles: str, warnings: list[str] | None):
    from rdkit import Chem
    from rdkit.Chem.MolStandardize import rdMolStandardize

    with captured_rdkit_log() as log:
        try:
            if opts.largest_fragment:
                mol = rdMolStandardize.FragmentParent(mol)  # includes RDKit's Cleanup
            elif opts.neutralise or opts.canonical_tautomer:
                mol = rdMolStandardize.Cleanup(mol)
            if opts.neutralise:
                mol = _uncharger().uncharge(mol)
            read = canonical = None
            if opts.canonical_tautomer:
                mol, read, canonical = _canonical_tautomer(mol, opts.max_tautomers, log=log)
            if opts.remove_stereo:
                Chem.RemoveStereochemistry(mol)
                read = canonical = None
            if read is None:
                Chem.SanitizeMol(mol)
            else:  # read back from its canonical SMILES, which sanitised it: that read's log stands for sanitising
                log.records.extend(read)
        except Exception as e:  # RDKit raises its own types (e.g. AtomValenceException)
            reason = excerpt("; ".join(dict.fromkeys(log.lines())) or str(e), REASON_CHARS)
            kind = ("valence" if isinstance(e, Chem.AtomValenceException) else
                    "kekulize" if isinstance(e, (Chem.KekulizeException, Chem.AtomKekulizeException)) else
                    "standardise")
            raise smiles_error(source, kind, f"RDKit cannot standardise '{excerpt(smiles)}': {reason}") from e
    if warnings is not None:
        warnings.extend(log.lines())
    return mol, canonical


def canonical_smiles(mol) -> str:
    """RDKit's canonical isomeric SMILES."""
    from rdkit import Chem

    return Chem.MolToSmiles(mol)


def murcko_scaffold(mol) -> str:
    """Bemis-Murcko scaffold SMILES (ring systems + linkers, no stereo); "" for an acyclic molecule."""
    from rdkit.Chem.Scaffolds import MurckoScaffold

    return MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False)


def scaffolds_as_written(smiles: Sequence[str]) -> list[str | None]:
    """Bemis-Murcko scaffolds with chirality of SMILES as written (not standardised); None where RDKit cannot parse.

    The scaffold of the ``scaffold_deterministic`` split (Hu et al. 2020, DeepChem, OGB):
    ``MurckoScaffoldSmiles(smiles=s, includeChirality=True)``, over the SMILES ``Chem.MolFromSmiles`` accepts.
    """
    from rdkit import Chem, rdBase
    from rdkit.Chem.Scaffolds import MurckoScaffold

    with rdBase.BlockLogs():  # unparseable rows are reported by the caller, not on stderr; each channel restored
        out: list[str | None] = []
        for s in smiles:
            mol = Chem.MolFromSmiles(s) if s else None
            out.append(None if mol is None else MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=True))
        return out


# ----------------------------------------------------------------------------- fingerprints and graphs
def morgan_fingerprint(mol, bits: int = 2048, radius: int = 2) -> np.ndarray:
    """Morgan (ECFP-like) bit vector as float32 (bits,)."""

    gen = _morgan_generator(radius, bits)
    return gen.GetFingerprintAsNumPy(mol).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _morgan_generator(radius: int, bits: int):
    from rdkit.Chem import rdFingerprintGenerator

    return rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=bits)


ATOM_SYMBOLS = ["C", "N", "O", "S", "F", "Cl", "Br", "I", "P", "B", "Si", "Se", "Na", "K", "Li", "Mg", "Ca", "Fe", "Zn",
                "Cu", "Co", "Pt", "Hg", "As", "Al", "Sn", "Gd"]  # + "other" (dummy atoms '*' included)
_DEGREES = 7  # 0..5, 6+
_CHARGES = [-2, -1, 0, 1, 2]  # clipped
_HS = 5  # 0..3, 4+
_HYBRID = ["S", "SP", "SP2", "SP3", "SP3D", "SP3D2"]  # + other
_CHIRAL = ["CHI_UNSPECIFIED", "CHI_TETRAHEDRAL_CW", "CHI_TETRAHEDRAL_CCW"]  # + other
ATOM_FEATURE_DIM = (len(ATOM_SYMBOLS) + 1) + _DEGREES + len(_CHARGES) + _HS + (len(_HYBRID) + 1) + 2 + (len(_CHIRAL) + 1)
BOND_TYPES = ["SINGLE", "DOUBLE", "TRIPLE", "AROMATIC"]  # anything else (dative, ...) is read as SINGLE
NUM_BOND_CODES = 2 * len(BOND_TYPES)
"""Bond codes 1..8 = 1 + type index + 4 * (bond in a ring); 0 = no bond."""


def atom_features(mol) -> np.ndarray:
    """One-hot atom features ``(N, ATOM_FEATURE_DIM)`` float32 over heavy atoms (hydrogens implicit).

    Blocks: element (27 + other), degree (0-5, 6+), formal charge (-2..+2, clipped), total H (0-3, 4+),
    hybridisation (S..SP3D2 + other), aromatic, in ring, chirality tag (none, CW, CCW, other).
    """
    n = mol.GetNumAtoms()
    out = np.zeros((n, ATOM_FEATURE_DIM), dtype=np.float32)
    if n == 0:
        return out
    sym, hyb, chi = _atom_codes()
    # one row of column codes per atom, then every one-hot block set at once
    codes = np.array([(sym.get(a.GetAtomicNum(), len(ATOM_SYMBOLS)), min(a.GetDegree(), _DEGREES - 1),
                       max(-2, min(2, a.GetFormalCharge())) + 2, min(a.GetTotalNumHs(), _HS - 1),
                       hyb.get(int(a.GetHybridization()), len(_HYBRID)), a.GetIsAromatic(), a.IsInRing(),
                       chi.get(int(a.GetChiralTag()), len(_CHIRAL))) for a in map(mol.GetAtomWithIdx, range(n))],
                     dtype=np.int64)  # GetAtomWithIdx: GetAtoms()'s Python sequence wrapper costs more than the lookups
    rows = np.arange(n)
    for col, start in enumerate(_ONE_HOT_STARTS):
        if start is None:
            continue
        out[rows, start + codes[:, col]] = 1
    out[:, _AROMATIC_COL] = codes[:, 5]
    out[:, _AROMATIC_COL + 1] = codes[:, 6]
    return out


_ONE_HOT_STARTS = (0, len(ATOM_SYMBOLS) + 1, len(ATOM_SYMBOLS) + 1 + _DEGREES,
                   len(ATOM_SYMBOLS) + 1 + _DEGREES + len(_CHARGES),
                   len(ATOM_SYMBOLS) + 1 + _DEGREES + len(_CHARGES) + _HS, None, None,
                   ATOM_FEATURE_DIM - (len(_CHIRAL) + 1))
_AROMATIC_COL = len(ATOM_SYMBOLS) + 1 + _DEGREES + len(_CHARGES) + _HS + len(_HYBRID) + 1


@functools.lru_cache(maxsize=1)
def _atom_codes():
    """Atomic number -> index of its element in ATOM_SYMBOLS, and RDKit's hybridisation and chiral-tag enum values
    (as int) -> index (ints: reading them off an atom costs less than its symbol's or the enum's string)."""
    from rdkit import Chem

    table = Chem.GetPeriodicTable()
    hyb = {int(v): _HYBRID.index(str(v)) for v in Chem.HybridizationType.values.values() if str(v) in _HYBRID}
    chi = {int(v): _CHIRAL.index(str(v)) for v in Chem.ChiralType.values.values() if str(v) in _CHIRAL}
    return {table.GetAtomicNumber(s): i for i, s in enumerate(ATOM_SYMBOLS)}, hyb, chi


@functools.lru_cache(maxsize=1)
def _bond_type_index() -> dict[int, int]:
    """RDKit's bond-type enum values (as int) -> index in BOND_TYPES."""
    from rdkit import Chem

    return {int(v): BOND_TYPES.index(str(v)) for v in Chem.BondType.values.values() if str(v) in BOND_TYPES}


@dataclass
class MolGraph:
    """A molecule as a graph: node features ``(N, F)``, directed edges ``(2, E)`` (both directions) and codes ``(E,)``."""

    node_features: np.ndarray
    edge_index: np.ndarray
    edge_code: np.ndarray

    @property
    def num_nodes(self) -> int:
        return int(self.node_features.shape[0])

    def adjacency(self) -> np.ndarray:
        """Dense bond-code matrix ``(N, N)`` int64: 0 = no bond, else the bond code (1..NUM_BOND_CODES)."""
        adj = np.zeros((self.num_nodes, self.num_nodes), dtype=np.int64)
        adj[self.edge_index[0], self.edge_index[1]] = self.edge_code
        return adj


def mol_graph(mol) -> MolGraph:
    """Atom and bond graph tensors of ``mol`` (heavy atoms only)."""
    bt = _bond_type_index()
    src, dst, code = [], [], []
    for b in map(mol.GetBondWithIdx, range(mol.GetNumBonds())):  # as atom_features: no sequence wrapper
        c = 1 + bt.get(int(b.GetBondType()), 0) + len(BOND_TYPES) * int(b.IsInRing())
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        src += [i, j]
        dst += [j, i]
        code += [c, c]
    return MolGraph(atom_features(mol), np.array([src, dst], dtype=np.int64).reshape(2, -1),
                    np.array(code, dtype=np.int64))


# ----------------------------------------------------------------------------- descriptors and rules
def descriptors(mol) -> dict[str, float]:
    """RDKit descriptors: QED, molecular weight, Crippen logP, TPSA, Lipinski counts, rotatable bonds, rings."""
    from rdkit.Chem import QED, Crippen, Descriptors, Lipinski, rdMolDescriptors

    return {
        "qed": round(float(QED.qed(mol)), 4),
        "mol_weight": round(float(Descriptors.MolWt(mol)), 3),
        "logp": round(float(Crippen.MolLogP(mol)), 3),
        "tpsa": round(float(rdMolDescriptors.CalcTPSA(mol)), 2),
        "hbd": int(Lipinski.NumHDonors(mol)),
        "hba": int(Lipinski.NumHAcceptors(mol)),
        "nhoh_count": int(Lipinski.NHOHCount(mol)),  # Lipinski's original donor count
        "no_count": int(Lipinski.NOCount(mol)),  # Lipinski's original acceptor count
        "rotatable_bonds": int(rdMolDescriptors.CalcNumRotatableBonds(mol)),
        "heavy_atoms": int(mol.GetNumHeavyAtoms()),
        "rings": int(rdMolDescriptors.CalcNumRings(mol)),
        "aromatic_rings": int(rdMolDescriptors.CalcNumAromaticRings(mol)),
        "fraction_csp3": round(float(rdMolDescriptors.CalcFractionCSP3(mol)), 4),
        "formal_charge": int(sum(a.GetFormalCharge() for a in mol.GetAtoms())),
    }


@functools.lru_cache(maxsize=1)
def _pains_catalog():
    from rdkit.Chem import FilterCatalog

    params = FilterCatalog.FilterCatalogParams()
    params.AddCatalog(FilterCatalog.FilterCatalogParams.FilterCatalogs.PAINS)  # PAINS_A + B + C (480 patterns)
    return FilterCatalog.FilterCatalog(params)


def druglikeness(mol, desc: dict | None = None) -> dict:
    """Rule report: Lipinski's rule of five, Veber's rules and PAINS alerts (RDKit's FilterCatalog).

    Lipinski passes with at most one violation (MW > 500, logP > 5, HBD > 5, HBA > 10), as in the
    original paper; Veber needs rotatable bonds <= 10 and TPSA <= 140.
    """
    d = desc or descriptors(mol)
    lip = [name for name, bad in (("MW>500", d["mol_weight"] > 500), ("logP>5", d["logp"] > 5),
                                  ("HBD>5", d["hbd"] > 5), ("HBA>10", d["hba"] > 10)) if bad]
    veb = [name for name, bad in (("RotB>10", d["rotatable_bonds"] > 10), ("TPSA>140", d["tpsa"] > 140)) if bad]
    with captured_rdkit_log():
        pains = sorted({e.GetDescription() for e in _pains_catalog().GetMatches(mol)})
    return {"lipinski_violations": lip, "lipinski_pass": len(lip) <= 1, "veber_violations": veb,
            "veber_pass": not veb, "pains_alerts": pains, "pains_pass": not pains, "qed": d["qed"]}


@functools.lru_cache(maxsize=1)
def rdkit2d_names() -> tuple[str, ...]:
    """Names of the :func:`rdkit2d` columns: every 2D descriptor of this RDKit (``Descriptors._descList``)."""
    from rdkit.Chem import Descriptors

    return tuple(n for n, _ in Descriptors._descList)


def rdkit2d(mol) -> np.ndarray:
    """RDKit's 2D descriptors (:func:`rdkit2d_names`) as float32 ``(n,)``, squashed as ``sign(x) log(1 + |x|)``
    (counts, weights and indices over many orders of magnitude, e.g. ``Ipc``); a descriptor that fails or is
    not finite is 0. The head standardises them with the training molecules' mean and std (``FeatureScaler``)."""
    from rdkit.Chem import Descriptors

    out = np.zeros(len(Descriptors._descList), dtype=np.float64)
    for k, (_, fn) in enumerate(Descriptors._descList):
        try:
            out[k] = float(fn(mol))
        except Exception:  # noqa: BLE001 - RDKit descriptors raise assorted errors on odd molecules
            out[k] = np.nan
    out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
    return (np.sign(out) * np.log1p(np.abs(out))).astype(np.float32)


# ----------------------------------------------------------------------------- batches (worker processes)
FEATURES = ("graph", "fingerprint", "descriptors", "druglikeness", "scaffold", "rdkit2d")


@dataclass
class MoleculeRecord:
    """One input row after :func:`process_molecules`: the canonical SMILES and features, or the error."""

    index: int
    source: str
    input: str
    smiles: str | None = None
    error: dict | None = None
    """``SmilesError.to_record()`` plus ``kind``, when the row failed."""
    warnings: list[str] = field(default_factory=list)
    graph: MolGraph | None = None
    fingerprint: np.ndarray | None = None
    rdkit2d: np.ndarray | None = None
    """:func:`rdkit2d` (feature ``rdkit2d``)."""
    descriptors: dict | None = None
    druglikeness: dict | None = None
    scaffold: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def process_one(index: int, smiles: str, source: str, options: StandardiseOptions | None = None,
                features: Sequence[str] = ("graph",), fingerprint_bits: int = 2048,
                fingerprint_radius: int = 2) -> MoleculeRecord:
    """Parse -> standardise -> featurise one SMILES; a failure becomes ``record.error`` (never raised)."""
    rec = MoleculeRecord(index, source, smiles if isinstance(smiles, str) else str(smiles))
    try:
        mol, canonical = _parse_smiles(smiles, source, options=options, warnings=rec.warnings)
    except SmilesError as e:
        rec.error = {**e.to_record(), "kind": getattr(e, "kind", "standardise")}
        return rec
    with captured_rdkit_log() as log:  # featurising can log too (e.g. scaffolds of charged atoms)
        rec.smiles = canonical or canonical_smiles(mol)  # the tautomer passes' SMILES, when they converged on it
        if "graph" in features:
            rec.graph = mol_graph(mol)
        if "fingerprint" in features:
            rec.fingerprint = morgan_fingerprint(mol, fingerprint_bits, fingerprint_radius)
        if "rdkit2d" in features:
            rec.rdkit2d = rdkit2d(mol)
        if "descriptors" in features or "druglikeness" in features:
            rec.descriptors = descriptors(mol)
        if "druglikeness" in features:
            rec.druglikeness = druglikeness(mol, rec.descriptors)
        if "scaffold" in features:
            rec.scaffold = murcko_scaffold(mol)
    rec.warnings += log.lines()
    return rec


def _build_tools(max_tautomers: int, features: tuple[str, ...], bits: int, radius: int) -> None:
    """Build (and keep, in their caches) the RDKit enumerator, uncharger, generators and catalogs a run uses."""
    _tautomer_enumerator(max_tautomers)
    _uncharger()
    if "fingerprint" in features:
        _morgan_generator(radius, bits)
    if "druglikeness" in features:
        _pains_catalog()


def _init_worker(max_tautomers: int, features: tuple[str, ...], bits: int, radius: int) -> None:
    """Pool initializer: the tools of :func:`_build_tools`, once per worker (inherited, built already, when forked)."""
    _IN_WORKER[0] = True
    _NEW_TAUTOMERS.clear()
    _build_tools(max_tautomers, features, bits, radius)


def _process_chunk(args) -> list[MoleculeRecord]:
    start, smiles, sources, kwargs = args
    return [process_one(start + i, s, src, **kwargs) for i, (s, src) in enumerate(zip(smiles, sources))]


def _pack_chunk(args) -> dict:
    """Worker side: a chunk's records as one compact payload (see :func:`_unpack_chunk`), plus the tautomer-cache
    entries this worker computed since its last chunk."""
    _NEW_TAUTOMERS.clear()
    recs = _process_chunk(args)
    ok = [r for r in recs if r.ok]
    out: dict = {"meta": [(r.smiles, r.error, r.warnings, r.descriptors, r.druglikeness, r.scaffold) for r in recs]}
    graphs = [r.graph for r in ok if r.graph is not None]
    if graphs:
        nodes = np.concatenate([g.node_features for g in graphs])
        small = nodes.astype(np.uint8)
        out["nodes"] = small if np.array_equal(small, nodes) else nodes  # one-hot features travel as bytes
        out["n_nodes"] = np.array([g.node_features.shape[0] for g in graphs], dtype=np.int64)
        out["edges"] = np.concatenate([g.edge_index for g in graphs], axis=1).astype(np.int32)
        out["codes"] = np.concatenate([g.edge_code for g in graphs]).astype(np.uint8)
        out["n_edges"] = np.array([g.edge_code.shape[0] for g in graphs], dtype=np.int64)
    fps = [r.fingerprint for r in ok if r.fingerprint is not None]
    if fps:
        fp = np.stack(fps)
        bits = fp > 0
        out["fp"] = np.packbits(bits, axis=1) if np.array_equal(bits, fp) else fp  # 0/1 vectors travel as bits
        out["fp_bits"] = fp.shape[1]
    d2 = [r.rdkit2d for r in ok if r.rdkit2d is not None]
    if d2:
        out["rdkit2d"] = np.stack(d2)
    out["tautomers"] = dict(_NEW_TAUTOMERS)
    _NEW_TAUTOMERS.clear()
    return out


def _unpack_chunk(payload: dict, start: int, inputs: Sequence[str], sources: Sequence[str]) -> list[MoleculeRecord]:
    """Parent side: the records of :func:`_pack_chunk`'s payload, equal to those :func:`process_one` makes."""
    _remember_tautomers(payload["tautomers"])
    graphs = []
    if "nodes" in payload:
        nodes = payload["nodes"].astype(np.float32)
        edges, codes = payload["edges"].astype(np.int64), payload["codes"].astype(np.int64)
        n0 = np.concatenate([[0], np.cumsum(payload["n_nodes"])])
        e0 = np.concatenate([[0], np.cumsum(payload["n_edges"])])
        graphs = [MolGraph(nodes[n0[k]: n0[k + 1]], np.ascontiguousarray(edges[:, e0[k]: e0[k + 1]]),
                           codes[e0[k]: e0[k + 1]]) for k in range(len(payload["n_nodes"]))]
    fps = []
    if "fp" in payload:
        fp = payload["fp"]
        fps = list(np.unpackbits(fp, axis=1, count=payload["fp_bits"]).astype(np.float32) if fp.dtype == np.uint8
                   else fp)
    d2 = list(payload["rdkit2d"]) if "rdkit2d" in payload else []
    out, g, f, d = [], iter(graphs), iter(fps), iter(d2)
    for i, (smi, error, warnings, desc, rules, scaffold) in enumerate(payload["meta"]):
        rec = MoleculeRecord(start + i, sources[i], inputs[i] if isinstance(inputs[i], str) else str(inputs[i]),
                             smi, error, warnings, descriptors=desc, druglikeness=rules, scaffold=scaffold)
        if rec.ok:
            rec.graph = next(g, None) if graphs else None
            rec.fingerprint = next(f, None) if fps else None
            rec.rdkit2d = next(d, None) if d2 else None
        out.append(rec)
    return out


def default_chunksize(n: int, workers: int) -> int:
    """Rows per chunk sent to a worker for ``n`` rows: n / (16 x workers), kept within 8..256 (see
    :func:`process_molecules`)."""
    return max(8, min(256, -(-n // (16 * workers))))


def process_molecules(smiles: Sequence[str], sources: Sequence[str] | None = None,
                      options: StandardiseOptions | None = None, features: Sequence[str] = ("graph",),
                      workers: int = 0, chunksize: int | None = None, fingerprint_bits: int = 2048,
                      fingerprint_radius: int = 2, start_method: str | None = None) -> list[MoleculeRecord]:
    """Run :func:`process_one` over many SMILES: one record per input, in input order, failures kept.

    Repeated work is skipped, with the same records as a fresh run: a SMILES string met again in the list is
    processed once (its record is copied, with its own index and source; the copies share their arrays), and
    each canonical-tautomer pass is cached by the canonical SMILES it starts from (see
    :func:`standardise_cache_info`), so different SMILES of one molecule, salts of it, and later calls in this
    process reuse it.

    Args:
        smiles: the SMILES texts.
        sources: names of the inputs for errors (default ``row <i>``).
        options: standardisation settings.
        features: any of ``graph, fingerprint, descriptors, druglikeness, scaffold, rdkit2d``.
        workers: worker processes (0 = this process). The pool starts once per call; each worker returns a
            chunk's records as one compact payload (graphs concatenated, fingerprints as packed bits, its new
            tautomer-cache entries), rebuilt into records here. The chunks go out longest SMILES first, so the
            last ones are cheap and the workers finish together (the records are the same as in file order).
        chunksize: rows per chunk sent to a worker (default: the unique SMILES / (16 x workers), kept within
            8..256: small enough that the last chunks leave no worker idle for long, large enough that sending
            them costs little; ``bench/molecules.py`` measures the pool).
        start_method: multiprocessing start method; None = the platform's default (``fork`` on Linux, as
            torch's DataLoader workers; the workers run RDKit only, never torch).
    """
    bad = sorted(set(features) - set(FEATURES))
    if bad:
        raise ValueError(f"unknown molecule features {bad}; known: {FEATURES}")
    sources = list(sources) if sources is not None else [f"row {i}" for i in range(len(smiles))]
    kwargs = dict(options=options, features=tuple(features), fingerprint_bits=fingerprint_bits,
                  fingerprint_radius=fingerprint_radius)
    first: dict = {}  # SMILES string -> position in ``unique``
    unique: list[int] = []
    for i, s in enumerate(smiles):
        if not isinstance(s, str) or s in first:
            continue
        first[s] = len(unique)
        unique.append(i)
    todo = unique + [i for i, s in enumerate(smiles) if not isinstance(s, str)]
    todo_smiles, todo_sources = [smiles[i] for i in todo], [sources[i] for i in todo]
    if workers > 0 and len(todo) > 1:
        size = chunksize or default_chunksize(len(todo), workers)
        # longest SMILES first (length goes with the work: Pearson r = 0.6 on HIV), so the last chunks sent are the
        # cheap ones and neither worker waits long for the other at the end
        order = sorted(range(len(todo)), key=lambda j: -len(todo_smiles[j]))
        parts = [order[k: k + size] for k in range(0, len(order), size)]
        part_smiles = [[todo_smiles[j] for j in p] for p in parts]
        part_sources = [[todo_sources[j] for j in p] for p in parts]
        chunks = [(0, s, src, kwargs) for s, src in zip(part_smiles, part_sources)]
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        opts = options or StandardiseOptions()
        init = (opts.max_tautomers, tuple(features), fingerprint_bits, fingerprint_radius)
        context = mp.get_context(start_method)
        if context.get_start_method() == "fork":  # built here once, the forked workers inherit them (~60 ms each)
            _build_tools(*init)
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=context,
                                 initializer=_init_worker, initargs=init) as pool:
            done = [None] * len(todo)
            for p, s, src, payload in zip(parts, part_smiles, part_sources, pool.map(_pack_chunk, chunks)):
                for j, rec in zip(p, _unpack_chunk(payload, 0, s, src)):  # indices: set below
                    done[j] = rec
    else:
        done = _process_chunk((0, todo_smiles, todo_sources, kwargs))
    by_row = dict(zip(todo, done))
    out = []
    for i, s in enumerate(smiles):
        rec = by_row.get(i)
        if rec is None:  # a repeat of an earlier SMILES
            rec = by_row[unique[first[s]]]
            if rec.ok:
                rec = dataclasses.replace(rec, source=sources[i], warnings=list(rec.warnings),
                                          descriptors=rec.descriptors and dict(rec.descriptors),
                                          druglikeness=rec.druglikeness and dict(rec.druglikeness))
            else:  # the error names its own source
                rec = process_one(i, s, sources[i], **kwargs)
        rec.index = i
        out.append(rec)
    return out


def molecule_qa(desc: dict, rules: dict) -> list[tuple[str, str]]:
    """Question/answer pairs whose answers RDKit computed: ``desc`` from :func:`descriptors`, ``rules`` from
    :func:`druglikeness` (the molecule Q&A recipe's training data)."""
    yn = {True: "yes", False: "no"}
    return [
        ("How many hydrogen bond donors does this molecule have?", str(desc["hbd"])),
        ("How many hydrogen bond acceptors does this molecule have?", str(desc["hba"])),
        ("How many rotatable bonds does this molecule have?", str(desc["rotatable_bonds"])),
        ("How many aromatic rings does this molecule have?", str(desc["aromatic_rings"])),
        ("What is the topological polar surface area of this molecule, rounded to the nearest integer?",
         str(round(desc["tpsa"]))),
        ("What is the molecular weight of this molecule, rounded to the nearest integer?",
         str(round(desc["mol_weight"]))),
        ("Does this molecule pass Lipinski's rule of five? Answer yes or no.", yn[rules["lipinski_pass"]]),
        ("Does this molecule pass Veber's rules? Answer yes or no.", yn[rules["veber_pass"]]),
        ("Does this molecule contain a PAINS substructure alert? Answer yes or no.", yn[not rules["pains_pass"]]),
    ]
