"""Molecules: SMILES -> the RDKit standardisation pipeline (in worker processes) -> graph or fingerprint items.

Each molecule also gets its Bemis-Murcko scaffold (for ``head.data.split: scaffold``) and, in
prediction files, the drug-likeness rule report (QED, Lipinski, Veber, PAINS).

Featurised records can be cached on disk: with ``MEDMM_MOLECULE_CACHE=<folder>`` in the environment (the
MoleculeNet benchmark sets it for its runs), the records of a list of SMILES are stored under a key made of
the SMILES, the standardisation options and the features, so the seeds of a benchmark featurise a file once.
A cache file is an ``.npz`` of plain arrays (graphs, fingerprints, descriptors) and the records' metadata as JSON,
read with ``allow_pickle=False``: a file planted in the cache folder can at worst be wrong data, never run code.
Older ``.pkl`` cache files are ignored (never unpickled), and an unreadable file is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from ...errors import ConfigError, InvalidInputError, excerpt
from ...io import molecules as molio
from . import Featurised, Featuriser, read_table, register_featuriser

log = logging.getLogger(__name__)

REPORT_COLUMNS = ["qed", "mol_weight", "logp", "tpsa", "hbd", "hba", "rotatable_bonds", "lipinski_pass",
                  "lipinski_violations", "veber_pass", "veber_violations", "pains_alerts"]


def standardise_options(pre):
    """The :class:`medmm.io.molecules.StandardiseOptions` of a PreprocessConfig."""
    from ...io.molecules import StandardiseOptions

    return StandardiseOptions(largest_fragment=pre.mol_largest_fragment, neutralise=pre.mol_neutralise,
                              canonical_tautomer=pre.mol_canonical_tautomer, remove_stereo=pre.mol_remove_stereo,
                              max_heavy_atoms=pre.mol_max_heavy_atoms)


MOLECULENET: dict[str, dict] = {
    "bbbp": {"file": "bbbp.csv", "smiles": "smiles", "labels": ["p_np"]},
    "bace": {"file": "bace.csv", "smiles": "mol", "labels": ["Class"]},
    "clintox": {"file": "clintox.csv", "smiles": "smiles", "labels": ["FDA_APPROVED", "CT_TOX"]},
    "tox21": {"file": "tox21.csv", "smiles": "smiles",
              "labels": ["NR-AR", "NR-AR-LBD", "NR-AhR", "NR-Aromatase", "NR-ER", "NR-ER-LBD", "NR-PPAR-gamma",
                         "SR-ARE", "SR-ATAD5", "SR-HSE", "SR-MMP", "SR-p53"]},
    "hiv": {"file": "hiv.csv.gz", "smiles": "smiles", "labels": ["HIV_active"]},
}
"""File, SMILES column and label columns of each MoleculeNet classification set (chemprop's copies in
``../shared/data/molecules/moleculenet``): the benchmark's datasets and the pre-training corpus."""

CACHE_ENV = "MEDMM_MOLECULE_CACHE"
CACHE_FORMAT = 1
"""Version of the cache file layout (:func:`save_records`); a file of another version is a miss."""


def cache_path(folder: str | Path, values: list[str], sources: list[str], options, features: tuple[str, ...],
               **kwargs) -> Path:
    """The cache file of a call of :func:`cached_process_molecules`: named by a hash of the SMILES, their sources,
    the options, the features and ``kwargs`` other than ``workers``."""
    h = hashlib.sha256()
    for part in (repr(options), repr(tuple(features)), repr(sorted((k, v) for k, v in kwargs.items() if k != "workers"))):
        h.update(part.encode() + b"\0")
    for v, src in zip(values, sources):
        h.update(f"{v}\t{src}\n".encode())
    return Path(folder) / f"molecules-{h.hexdigest()[:32]}.npz"


def cached_process_molecules(values: list[str], sources: list[str], options, features: tuple[str, ...],
                             **kwargs) -> list:
    """:func:`medmm.io.molecules.process_molecules`, through the on-disk cache named by ``$MEDMM_MOLECULE_CACHE``
    (no cache when unset). The key covers the SMILES, their sources, the options, the features and ``kwargs``
    other than ``workers`` (:func:`cache_path`); a cache file that cannot be read is recomputed, and an old
    pickle cache file (``.pkl``) is never loaded."""
    folder = os.environ.get(CACHE_ENV)
    if not folder:
        return molio.process_molecules(values, sources, options, features=features, **kwargs)
    path = cache_path(folder, values, sources, options, features, **kwargs)
    old = path.with_suffix(".pkl")
    if old.exists():  # pickle runs code on load: a file planted there must never be read
        log.warning("molecule cache: ignored the old pickle file %s (never loaded; the cache is .npz now)", old.name)
    if path.exists():
        try:
            return load_records(path, values)
        except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, EOFError, zipfile.BadZipFile) as e:
            log.warning("molecule cache: %s is unreadable (%s); recomputed", path.name, excerpt(e, 120))
    recs = molio.process_molecules(values, sources, options, features=features, **kwargs)
    try:
        save_records(path, recs)
    except (OSError, TypeError, ValueError) as e:  # a cache that cannot be written costs time, not the run
        log.warning("molecule cache: cannot write %s (%s)", path.name, excerpt(e, 120))
    return recs


_META_FIELDS = ("index", "source", "input", "smiles", "error", "warnings", "descriptors", "druglikeness", "scaffold")


def save_records(path: str | Path, recs: list) -> Path:
    """Write :class:`~medmm.io.molecules.MoleculeRecord` s as one ``.npz`` (atomically: a reader sees the old file
    or the new one). The arrays of every record are concatenated (graphs: node features ``(sum N, F)``, edges
    ``(2, sum E)``, bond codes ``(sum E,)`` with per-graph counts; fingerprints and rdkit2d stacked); the other
    fields are JSON in the ``meta`` member (bytes), so the file holds no pickled object."""
    path = Path(path)
    meta = []
    graphs, fps, d2 = [], [], []
    for r in recs:
        meta.append([getattr(r, f) for f in _META_FIELDS] + [r.graph is not None, r.fingerprint is not None,
                                                             r.rdkit2d is not None])
        if r.graph is not None:
            graphs.append(r.graph)
        if r.fingerprint is not None:
            fps.append(r.fingerprint)
        if r.rdkit2d is not None:
            d2.append(r.rdkit2d)
    text = json.dumps({"format": CACHE_FORMAT, "fields": list(_META_FIELDS), "records": meta})
    arrays = {"meta": np.frombuffer(text.encode(), dtype=np.uint8)}
    if graphs:
        arrays.update(nodes=np.concatenate([g.node_features for g in graphs]),
                      n_nodes=np.array([g.node_features.shape[0] for g in graphs], dtype=np.int64),
                      edges=np.concatenate([g.edge_index for g in graphs], axis=1),
                      codes=np.concatenate([g.edge_code for g in graphs]),
                      n_edges=np.array([g.edge_code.shape[0] for g in graphs], dtype=np.int64))
    if fps:
        arrays["fingerprints"] = np.stack(fps)
    if d2:
        arrays["rdkit2d"] = np.stack(d2)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


def load_records(path: str | Path, values: list[str] | None = None) -> list:
    """The records :func:`save_records` wrote, read with ``allow_pickle=False``.

    Args:
        path: the ``.npz`` file.
        values: when given, the SMILES the records must be of (one per record, in order).

    Raises:
        ValueError: (or OSError, KeyError, IndexError, TypeError, ``zipfile.BadZipFile``) the file is not a cache
            file of this format, is torn, or does not match ``values``.
    """
    with np.load(path, allow_pickle=False) as z:
        head = json.loads(z["meta"].tobytes())
        if head.get("format") != CACHE_FORMAT or head.get("fields") != list(_META_FIELDS):
            raise ValueError(f"cache format {excerpt(head.get('format'))}, not {CACHE_FORMAT}")
        meta = head["records"]
        if values is not None and (len(meta) != len(values) or
                                   any(m[2] != (v if isinstance(v, str) else str(v)) for m, v in zip(meta, values))):
            raise ValueError("the records are of other SMILES")
        arrays = {k: z[k] for k in ("nodes", "n_nodes", "edges", "codes", "n_edges", "fingerprints", "rdkit2d")
                  if k in z.files}
    graphs = []
    if "nodes" in arrays:
        nodes, edges, codes = arrays["nodes"], arrays["edges"], arrays["codes"]
        n0 = np.concatenate([[0], np.cumsum(arrays["n_nodes"])])
        e0 = np.concatenate([[0], np.cumsum(arrays["n_edges"])])
        if n0[-1] != len(nodes) or e0[-1] != len(codes) or edges.shape != (2, len(codes)):
            raise ValueError("graph arrays of mismatched sizes")
        graphs = [molio.MolGraph(nodes[n0[k]: n0[k + 1]], np.ascontiguousarray(edges[:, e0[k]: e0[k + 1]]),
                                 codes[e0[k]: e0[k + 1]]) for k in range(len(n0) - 1)]
    fps = list(arrays.get("fingerprints", ()))
    d2 = list(arrays.get("rdkit2d", ()))
    if sum(m[-3] for m in meta) != len(graphs) or sum(m[-2] for m in meta) != len(fps) or \
            sum(m[-1] for m in meta) != len(d2):
        raise ValueError("arrays and records do not match")
    out, g, f, d = [], iter(graphs), iter(fps), iter(d2)
    for m in meta:
        rec = molio.MoleculeRecord(**dict(zip(_META_FIELDS, m)))
        rec.graph = next(g) if m[-3] else None
        rec.fingerprint = next(f) if m[-2] else None
        rec.rdkit2d = next(d) if m[-1] else None
        out.append(rec)
    return out


def report_of(rec) -> dict:
    """The rule-report columns of a processed molecule record (descriptors + drug-likeness rules)."""
    return {c: (rec.druglikeness.get(c) if c in rec.druglikeness else rec.descriptors.get(c)) for c in REPORT_COLUMNS}


def molecule_reports(canonical: list[str]) -> list[dict]:
    """The rule report (descriptors, Lipinski, Veber, PAINS) of already standardised SMILES."""
    from ...io.molecules import descriptors, druglikeness, parse_smiles

    out = []
    for smi in canonical:
        mol = parse_smiles(smi, standardise=False, max_heavy_atoms=10**6)
        d = descriptors(mol)
        r = druglikeness(mol, d)
        out.append({c: r.get(c, d.get(c)) for c in REPORT_COLUMNS})
    return out


def mol_feature_kinds(mol_features: str) -> tuple[str, ...]:
    """The :func:`medmm.io.molecules.process_molecules` features behind ``head.mol_features``, in column order
    (the fingerprint first: the head standardises the trailing descriptor columns)."""
    names = {"morgan": "fingerprint", "rdkit2d": "rdkit2d"}
    return () if mol_features == "none" else tuple(names[p] for p in mol_features.split("+"))


@register_featuriser("molecules")
class MoleculeFeaturiser(Featuriser):
    """SMILES -> RDKit pipeline in ``head.data.workers`` processes -> ``mol_graph`` or ``smiles_fingerprint`` items."""

    report_columns = REPORT_COLUMNS

    def __init__(self, cfg):
        super().__init__(cfg)
        self.kind = {"mol_graph": "graph", "smiles_fingerprint": "fingerprint"}.get(cfg.loader)
        if self.kind is None:
            raise ConfigError(f"head.loader: molecules take mol_graph or smiles_fingerprint, not '{cfg.loader}'")

    def featurise(self, values: list[str], sources: list[str]) -> Featurised:
        from ..loaders import MolGraphLoader

        pre = self.cfg.preprocess
        extra = mol_feature_kinds(self.cfg.mol_features) if self.kind == "graph" else ()
        recs = cached_process_molecules(values, sources, standardise_options(pre),
                                        features=(self.kind, "scaffold") + extra,
                                        workers=self.cfg.data.workers, fingerprint_bits=pre.fingerprint_bits,
                                        fingerprint_radius=pre.fingerprint_radius)
        out = Featurised(groups=[])
        for r in recs:
            if not r.ok:
                out.errors.append(r.error)
                continue
            item = MolGraphLoader.from_graph(r.graph) if self.kind == "graph" else {"x": torch.from_numpy(r.fingerprint)}
            if extra:  # (bits + descriptors,): the head's head.mol_features
                item["features"] = torch.from_numpy(np.concatenate([r.fingerprint if k == "fingerprint" else r.rdkit2d
                                                                    for k in extra]).astype(np.float32))
            out.items.append(item)
            out.sources.append(r.source)
            out.inputs.append(r.input)
            out.canonical.append(r.smiles)
            out.groups.append(r.scaffold)
        return out

    def collate(self, items: list[dict]) -> dict:
        batch = self.loader.collate(items)
        if "features" in items[0]:  # head.mol_features: (B, fingerprint bits + descriptors)
            batch["features"] = torch.stack([it["features"] for it in items]).float()
        return batch

    def reports(self, canonical: list[str]) -> list[dict]:
        return molecule_reports(canonical)


def read_labelled_molecules(path: str | Path, smiles_col: str, label_col: str | None,
                            positive: str = "yes") -> tuple[list[str], list[str], list[int | None], list[dict]]:
    """``(smiles, sources, labels, errors)`` from a CSV (``smiles_col``/``label_col``) or a conversation JSONL.

    In a JSONL, the SMILES is the record's molecule modality and the label is 1 when its last (gpt)
    answer is ``positive`` (case-insensitive), else 0.
    """
    from ...utils import read_jsonl
    from ..conversation import reference_of
    from . import parse_label

    path = Path(path)
    smiles, sources, labels, errors = [], [], [], []
    if path.suffix == ".jsonl":
        for i, rec in enumerate(read_jsonl(path), start=1):
            src = f"{path}:{i} (id={rec.get('id')})"
            mods = rec.get("modalities") or {}
            value = next((v for v in mods.values() if isinstance(v, str)), None)
            ref = reference_of(rec)
            if value is None:
                errors.append(InvalidInputError(src, "no molecule in 'modalities'").to_record())
                continue
            smiles.append(value)
            sources.append(src)
            labels.append(None if ref is None else int(ref.strip().lower().rstrip(".") == positive.lower()))
        return smiles, sources, labels, errors
    for src, row in read_table(path, smiles_col, label_col):
        try:
            labels.append(parse_label(row.get(label_col), src, label_col) if label_col else None)
        except InvalidInputError as e:
            errors.append(e.to_record())
            continue
        smiles.append(row.get(smiles_col) or "")
        sources.append(src)
    return smiles, sources, labels, errors
