"""``medmm prepare text``: data selection over text corpora for continued pre-training (readers in
:mod:`medmm.io.text`).

A corpus is one or more files, or folders of them:

- ``*.jsonl``: one JSON object per line, the document in its ``text`` field (``--text-field`` names another);
- ``*.txt``: one document per non-empty line.

``prepare_text`` reads them in order and keeps a document unless a rule drops it; the first rule that fires is
the one counted in ``stats.json``:

=================  ======================================================================================
``empty``          nothing but whitespace
``too_short``      fewer than ``min_chars`` characters or ``min_words`` words
``too_long``       more than ``max_chars`` characters
``bad_chars``      more than ``max_bad_char_fraction`` of its characters are control characters or U+FFFD
                   (the mark of a broken decode)
``non_alpha``      fewer than ``min_alpha_fraction`` of its non-space characters are letters (tables, codes)
``language``       its language tag is not in ``languages`` (only when that list is given)
``exact_duplicate`` the same text as a kept document after Unicode (NFKC) normalisation, case folding and
                   whitespace collapsing
``near_duplicate`` MinHash (``num_perm`` permutations over word ``shingle``-grams) estimates a Jaccard
                   similarity of at least ``jaccard`` with a kept document; LSH finds the candidates
=================  ======================================================================================

The first of a group of duplicates is kept. Each kept document gets a language tag from ``py3langid``
(the langid.py model, shipped inside the package: no download). The held-out split is a function of the
normalised text (a keyed hash), so it does not depend on file order and exact duplicates can never straddle
it. Output: ``DIR/train.jsonl`` and ``DIR/eval.jsonl`` (``{"text", "lang", "source"}``), ``DIR/stats.json``
and, for unreadable lines, ``DIR/errors.jsonl``.

With ``--num-shards N --shard-index I`` a part keeps the documents whose normalised text hashes into it, so exact
duplicates meet in one part and are dropped exactly as in one run, and the split (a hash of the text) is the same;
near-duplicates are found within a part only: a pair that falls in two parts both survive the merge (about
``1/N`` of the near-duplicate pairs of a corpus prepared in ``N`` parts are kept twice).

Run::

    medmm prepare text corpus/ notes.txt --out runs/text [--jaccard 0.8] [--languages en]
"""

from __future__ import annotations

import hashlib
import json
import time
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..io.text import held_out, iter_documents, open_text, shingles, text_files, text_key
from ..utils import atomic_write_text, optional_import
from .parts import Part, holds, write_part

RULES = ("empty", "too_short", "too_long", "bad_chars", "non_alpha", "language", "exact_duplicate",
         "near_duplicate")


def _char_stats(text: str) -> tuple[float, float]:
    """(fraction of letters among non-space characters, fraction of control/replacement characters)."""
    non_space = letters = bad = 0
    for ch in text:
        if ch == "\ufffd" or (unicodedata.category(ch) == "Cc" and ch not in "\t\n\r"):
            bad += 1
        if not ch.isspace():
            non_space += 1
            letters += ch.isalpha()
    return letters / max(non_space, 1), bad / max(len(text), 1)


# --------------------------------------------------------------------------------------------
# Selection


@dataclass
class TextPrepareOptions:
    """Rules and split of ``medmm prepare text``."""

    text_field: str = "text"
    """JSONL field holding the document."""
    min_chars: int = 10
    """Shorter documents are dropped (too_short)."""
    min_words: int = 2
    """Documents with fewer words are dropped (too_short)."""
    max_chars: int = 100_000
    """Longer documents are dropped (too_long)."""
    min_alpha_fraction: float = 0.6
    """Least fraction of letters among non-space characters (non_alpha)."""
    max_bad_char_fraction: float = 0.0
    """Most fraction of control characters and U+FFFD (bad_chars)."""
    languages: list[str] | None = None
    """Keep only these language tags (ISO 639-1, e.g. ["en"]); None tags without filtering."""
    dedup_exact: bool = True
    """Drop exact duplicates (after normalisation)."""
    dedup_near: bool = True
    """Drop MinHash near-duplicates."""
    jaccard: float = 0.8
    """Near-duplicate threshold on the estimated Jaccard similarity of shingle sets."""
    num_perm: int = 128
    """MinHash permutations."""
    shingle: int = 5
    """Words per shingle."""
    eval_fraction: float = 0.01
    """Share of kept documents held out in eval.jsonl (by a hash of the text)."""
    seed: int = 0
    """Key of the held-out hash and of the MinHash permutations."""
    progress: bool = True
    """Show a progress bar."""
    extra: dict = field(default_factory=dict)
    """Free-form notes copied into stats.json."""

    def __post_init__(self):
        if not 0 < self.jaccard <= 1:
            raise ConfigError(f"prepare text: jaccard must be in (0, 1], got {self.jaccard}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"prepare text: eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.shingle <= 0 or self.num_perm <= 0:
            raise ConfigError("prepare text: shingle and num_perm must be positive")


class _LanguageTagger:
    """py3langid's shipped model, loaded once."""

    def __init__(self):
        langid = optional_import("py3langid", "text")
        self._classify = langid.classify

    def __call__(self, text: str) -> str:
        return str(self._classify(text)[0])


class NearDuplicateIndex:
    """MinHash + LSH over word shingles: ``seen(text)`` says whether a similar text was added, and adds it if not.

    LSH is tuned below the threshold (``jaccard - 0.1``, weighted towards recall), so a pair just above the
    threshold is rarely missed by the banding; each candidate is then confirmed on the exact Jaccard similarity
    of the two shingle sets, so neither banding nor the MinHash estimate's noise (about 0.035 at 128
    permutations) decides alone. Memory: the LSH bands and one sorted array of 64-bit shingle hashes per kept
    document.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5, seed: int = 0):
        ds = optional_import("datasketch", "text")
        self._MinHash = ds.MinHash
        self.lsh = ds.MinHashLSH(threshold=max(0.3, threshold - 0.1), num_perm=num_perm, weights=(0.3, 0.7))
        self.threshold, self.num_perm, self.shingle, self.seed = threshold, num_perm, shingle, seed
        self.kept: dict[int, object] = {}  # key -> sorted uint64 shingle hashes
        self._template = ds.MinHash(num_perm=num_perm, seed=seed)  # permutations computed once

    def _hashes(self, text: str):
        import numpy as np

        return np.unique(np.fromiter((int.from_bytes(hashlib.blake2b(s, digest_size=8).digest(), "little")
                                      for s in shingles(text, self.shingle)), dtype=np.uint64))

    def minhash(self, text: str):
        m = self._MinHash(num_perm=self.num_perm, seed=self.seed, permutations=self._template.permutations,
                          scheme=self._template.scheme)
        m.update_batch(list(shingles(text, self.shingle)))
        return m

    def seen(self, text: str, key: int) -> bool:
        import numpy as np

        m = self.minhash(text)
        h = self._hashes(text)
        for c in self.lsh.query(m):
            other = self.kept[c]
            inter = len(np.intersect1d(h, other, assume_unique=True))
            if inter / (len(h) + len(other) - inter) >= self.threshold:
                return True
        self.lsh.insert(key, m)
        self.kept[key] = h
        return False


def _count_lines(files: Sequence[Path]) -> int:
    n = 0
    for f in files:
        with open_text(f) as fh:
            n += sum(1 for line in fh if line.strip())
    return n


def prepare_text(sources: Sequence[str | Path], out: str | Path, options: TextPrepareOptions | None = None,
                 part: Part | None = None) -> dict:
    """Select documents from ``sources`` and write ``train.jsonl``, ``eval.jsonl`` and ``stats.json`` to ``out``;
    with ``part``, only the documents whose normalised text falls in that part of a sharded run.

    Returns:
        The stats: ``read``, ``kept``, ``dropped`` (per rule), ``train``, ``eval``, ``languages``, ``errors``.
    """
    from tqdm.auto import tqdm

    o = options or TextPrepareOptions()
    out = Path(out)
    files = [f for s in sources for f in text_files(s)]
    tag = _LanguageTagger()
    near = NearDuplicateIndex(o.jaccard, o.num_perm, o.shingle, o.seed) if o.dedup_near else None
    exact: set[bytes] = set()
    dropped: Counter = Counter({r: 0 for r in RULES})
    langs: Counter = Counter()
    errors: list[dict] = []
    train, evals = [], []
    read = 0
    t0 = time.perf_counter()
    bar = tqdm(total=_count_lines(files), desc="prepare text", unit="doc", disable=not o.progress, dynamic_ncols=True)
    for f in files:
        for source, text in iter_documents(f, o.text_field, errors):
            bar.update(1)
            if not holds(part, text_key(text).hex()):
                continue
            read += 1
            rule, lang = _first_rule(text, o, tag)
            key = text_key(text) if o.dedup_exact else None
            if rule is None and key is not None and key in exact:
                rule = "exact_duplicate"
            if rule is None and near is not None and near.seen(text, read):
                rule = "near_duplicate"
            if rule is not None:
                dropped[rule] += 1
                continue
            if key is not None:
                exact.add(key)
            langs[lang] += 1
            row = {"text": text, "lang": lang, "source": source}
            (evals if held_out(text, o.eval_fraction, o.seed) else train).append(row)
        bar.set_postfix(kept=len(train) + len(evals))
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    errors = [e for e in errors if holds(part, str(e.get("path")))]  # an unreadable line: the part its place falls in
    write_part(out, part, "text", [str(s) for s in sources],
               {k: v for k, v in asdict(o).items() if k not in ("progress", "extra")})
    for name, rows in (("train", train), ("eval", evals)):
        atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    if errors:
        atomic_write_text(out / "errors.jsonl", "".join(json.dumps(e) + "\n" for e in errors))
    elif (out / "errors.jsonl").exists():  # an earlier run's, into the same folder
        (out / "errors.jsonl").unlink()
    stats = {
        "sources": [str(f) for f in files],
        "read": read, "kept": len(train) + len(evals), "dropped": dict(dropped),
        "train": len(train), "eval": len(evals), "errors": len(errors),
        "languages": dict(langs.most_common()),
        "seconds": round(time.perf_counter() - t0, 2),
        "options": {k: v for k, v in asdict(o).items() if k != "progress"},
    }
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats


def _first_rule(text: str, o: TextPrepareOptions, tag: _LanguageTagger) -> tuple[str | None, str | None]:
    """The first filter rule ``text`` fails (None if none) and its language tag (None when not reached)."""
    s = text.strip()
    if not s:
        return "empty", None
    if len(s) < o.min_chars or len(s.split()) < o.min_words:
        return "too_short", None
    if len(s) > o.max_chars:
        return "too_long", None
    alpha, bad = _char_stats(s)
    if bad > o.max_bad_char_fraction:
        return "bad_chars", None
    if alpha < o.min_alpha_fraction:
        return "non_alpha", None
    lang = tag(s)
    if o.languages is not None and lang not in o.languages:
        return "language", lang
    return None, lang
