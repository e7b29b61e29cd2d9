"""Text corpora on disk, read the one way ``medmm prepare text`` and continued pre-training both use, and the
normalised text key behind exact de-duplication and the held-out split.

A corpus is one or more files, or folders of them: ``*.jsonl`` (one JSON object per line, the document in its
``text`` field) or ``*.txt`` (one document per non-empty line), each optionally gzipped.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

from ..errors import InvalidInputError

TEXT_SUFFIXES = (".jsonl", ".txt", ".jsonl.gz", ".txt.gz")
_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+")


def _is_text_file(p: Path) -> bool:
    return p.is_file() and any(p.name.endswith(s) for s in TEXT_SUFFIXES)


def text_files(path: str | Path) -> list[Path]:
    """The corpus files of ``path``: the file itself, or every ``.jsonl``/``.txt`` (optionally ``.gz``) under a folder."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if _is_text_file(f))
        if not files:
            raise InvalidInputError(p, f"no corpus files ({', '.join(TEXT_SUFFIXES)}) in this folder")
        return files
    if not p.exists():
        raise InvalidInputError(p, "no such file or folder")
    if not _is_text_file(p):
        raise InvalidInputError(p, f"not a corpus file (expected one of {', '.join(TEXT_SUFFIXES)})")
    return [p]


def open_text(p: Path):
    """A corpus file opened for reading text (UTF-8; gzip when its name ends in ``.gz``)."""
    return gzip.open(p, "rt", encoding="utf-8") if p.name.endswith(".gz") else open(p, encoding="utf-8")


def iter_documents(path: str | Path, text_field: str = "text",
                   errors: list[dict] | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``(source, text)`` for each document of a corpus file or folder; ``source`` is ``file:line``.

    A line that is not a JSON object with a string ``text_field`` raises :class:`InvalidInputError` naming the
    file and line, unless ``errors`` is given: then its record is appended there and reading goes on.
    """
    for f in text_files(path):
        jsonl = f.name.endswith((".jsonl", ".jsonl.gz"))
        try:
            with open_text(f) as fh:
                for i, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    source = f"{f}:{i}"
                    if not jsonl:
                        yield source, line.rstrip("\r\n")
                        continue
                    try:
                        rec = json.loads(line)
                        if not isinstance(rec, dict):
                            raise InvalidInputError(source, "a JSON object per line is expected")
                        text = rec.get(text_field)
                        if not isinstance(text, str):
                            raise InvalidInputError(source, f"no string field '{text_field}'")
                    except json.JSONDecodeError as e:
                        err = InvalidInputError(source, f"not valid JSON ({e.msg})")
                        if errors is None:
                            raise err from e
                        errors.append(err.to_record())
                        continue
                    except InvalidInputError as e:
                        if errors is None:
                            raise
                        errors.append(e.to_record())
                        continue
                    yield source, text
        except UnicodeDecodeError as e:
            raise InvalidInputError(f, f"not UTF-8 text ({e.reason} at byte {e.start})") from e


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """Every document of a corpus file or folder (errors name the file and line)."""
    return [t for _, t in iter_documents(path, text_field)]


def normalize(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed: the form exact duplicates are compared in."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def text_key(text: str) -> bytes:
    """16-byte digest of the normalised text (exact-duplicate key)."""
    return hashlib.blake2b(normalize(text).encode(), digest_size=16).digest()


def held_out(text: str, fraction: float, seed: int = 0, purpose: str = "prepare") -> bool:
    """Whether a document belongs to the held-out split: a keyed hash of its normalised text, below ``fraction``.

    Independent of file order; identical texts always land on the same side. ``purpose`` keys the hash, so the
    split a training run makes (``trainer.eval_fraction``) is independent of the one ``prepare text`` made.
    """
    if fraction <= 0:
        return False
    key = f"medmm-{purpose}-{seed}".encode()[:64]
    h = hashlib.blake2b(normalize(text).encode(), digest_size=8, key=key).digest()
    return int.from_bytes(h, "big") / 2**64 < fraction


def shingles(text: str, n: int = 5) -> set[bytes]:
    """Word ``n``-grams of the normalised text (punctuation dropped); a text shorter than ``n`` words is one shingle."""
    words = _WORD.findall(normalize(text))
    if len(words) < n:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}
