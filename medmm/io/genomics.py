"""DNA: FASTA reading and nucleotide / k-mer tokenisation with N and IUPAC ambiguity codes.

Token ids: 0 = padding, 1 = N (any ambiguous base: N, R, Y, S, W, K, M, B, D, H, V), then the 4**k
k-mers over ACGT in lexicographic order. U is read as T.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SequenceError

PAD, UNK = 0, 1
_BASES = "ACGT"
_IUPAC_AMBIGUOUS = set("NRYSWKMBDHV")
FASTA_SUFFIXES = {".fa", ".fasta", ".fna", ".ffn", ".fa.gz", ".fasta.gz"}


def vocab_size(k: int = 1) -> int:
    return 4**k + 2


def clean_sequence(seq: str, source: str = "<sequence>") -> str:
    """Upper-case, U->T, whitespace removed; any letter outside ACGT + IUPAC raises SequenceError."""
    s = "".join(seq.split()).upper().replace("U", "T")
    if not s:
        raise SequenceError(source, "empty sequence")
    bad = sorted(set(s) - set(_BASES) - _IUPAC_AMBIGUOUS)
    if bad:
        raise SequenceError(source, f"characters that are not nucleotides or IUPAC codes: {''.join(bad[:10])}")
    return s


def tokenize(seq: str, k: int = 1, max_length: int | None = None, source: str = "<sequence>") -> np.ndarray:
    """Sequence -> int64 token ids (overlapping k-mers, stride 1). Long sequences are centre-cropped."""
    s = clean_sequence(seq, source)
    if max_length is not None and len(s) - k + 1 > max_length:
        start = (len(s) - (max_length + k - 1)) // 2
        s = s[start: start + max_length + k - 1]
    if len(s) < k:
        raise SequenceError(source, f"sequence of {len(s)} bases is shorter than k={k}")
    idx = {b: i for i, b in enumerate(_BASES)}
    codes = np.array([idx.get(c, -1) for c in s], dtype=np.int64)
    n = len(s) - k + 1
    out = np.zeros(n, dtype=np.int64)
    valid = np.ones(n, dtype=bool)
    for j in range(k):
        c = codes[j: j + n]
        valid &= c >= 0
        out = out * 4 + np.maximum(c, 0)
    return np.where(valid, out + 2, UNK)


def read_fasta(path: str | Path) -> list[tuple[str, str]]:
    """Records ``(id, sequence)`` of a FASTA file; an unreadable or empty file raises SequenceError."""
    from Bio import SeqIO

    path = Path(path)
    if not path.exists():
        raise SequenceError(path, "file not found")
    opener = open
    if path.suffix == ".gz":
        import gzip

        opener = gzip.open
    try:
        with opener(path, "rt") as f:
            records = [(r.id, str(r.seq)) for r in SeqIO.parse(f, "fasta")]
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise SequenceError(path, f"not a readable FASTA file ({e})") from e
    if not records:
        raise SequenceError(path, "no FASTA records")
    return records
