"""DNA: FASTA and VCF/BCF reading, variant windows, and nucleotide / k-mer tokenisation with N and IUPAC codes.

FASTA files are read with Biopython (whole records) or, for reference genomes, through pysam's faidx
(random access, :class:`ReferenceGenome`). VCF and BCF go through pysam (htslib): one library for both
formats, bgzip/tabix/CSI regions, and the same faidx for the reference; htslib's log is captured into
the typed :class:`SequenceError` records instead of being printed.

Token ids: 0 = padding, 1 = N (any ambiguous base: N, R, Y, S, W, K, M, B, D, H, V), then the 4**k
k-mers over ACGT in lexicographic order. U is read as T.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SequenceError, excerpt

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
        raise SequenceError(source, f"characters that are not nucleotides or IUPAC codes: {excerpt(''.join(bad[:10]))}")
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
        raise SequenceError(path, f"not a readable FASTA file ({excerpt(e, 240)})") from e
    if not records:
        raise SequenceError(path, "no FASTA records")
    return records


def decode_kmers(text: str, source: str = "<sequence>") -> str:
    """Whitespace-separated overlapping k-mers (DNABERT style, stride 1) -> the plain sequence.

    Each k-mer must overlap the previous one by k-1 bases; otherwise SequenceError.
    """
    kmers = text.split()
    if not kmers:
        raise SequenceError(source, "empty sequence")
    k = len(kmers[0])
    for i, (a, b) in enumerate(zip(kmers, kmers[1:]), start=1):
        if len(b) != k or a[1:] != b[:-1]:
            raise SequenceError(source, f"k-mer {i} ('{excerpt(b, 32)}') does not overlap k-mer {i - 1} "
                                        f"('{excerpt(a, 32)}') by {k - 1} bases")
    return kmers[0] + "".join(m[-1] for m in kmers[1:])


def looks_like_kmers(text: str) -> bool:
    """True when ``text`` is two or more equal-length tokens, each overlapping the next by k-1 bases."""
    kmers = text.split()
    if len(kmers) < 2 or len(kmers[0]) < 2:
        return False
    return all(len(b) == len(kmers[0]) and a[1:] == b[:-1] for a, b in zip(kmers, kmers[1:]))


# ----------------------------------------------------------------------------- htslib (pysam) log capture
class _FdCapture:
    """Redirect the C-level stderr (fd 2, where htslib logs) into a temporary file while active."""

    def __init__(self):
        import tempfile

        self._tmp = tempfile.TemporaryFile()
        self._saved: int | None = None
        self._pos = 0

    def __enter__(self):
        import os
        import sys

        sys.stderr.flush()
        self._saved = os.dup(2)
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, *exc):
        import os

        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._saved = None
        return False

    def new_lines(self) -> list[str]:
        """htslib's lines written since the last call, without the ``[E::func]`` prefixes."""
        import re

        self._tmp.seek(self._pos)
        data = self._tmp.read()
        self._pos += len(data)
        return [re.sub(r"^\[[EWID]::\w+\]\s*", "", ln).strip()
                for ln in data.decode(errors="replace").splitlines() if ln.strip()]

    def close(self) -> None:
        self._tmp.close()


# ----------------------------------------------------------------------------- VCF / BCF
@dataclass
class Variant:
    """One VCF/BCF record. ``pos`` is 1-based as in the file; ``info`` holds the raw INFO text per key."""

    chrom: str
    pos: int
    ref: str
    alts: tuple[str, ...]
    id: str | None = None
    qual: float | None = None
    filters: tuple[str, ...] = ()
    info: dict[str, str] = field(default_factory=dict)
    source: str = ""

    @property
    def name(self) -> str:
        return f"{self.chrom}:{self.pos} {self.ref}>{','.join(self.alts)}"


def _raw_info(line: str) -> dict[str, str]:
    cols = line.rstrip("\n").split("\t")
    if len(cols) < 8 or cols[7] in ("", "."):
        return {}
    out = {}
    for part in cols[7].split(";"):
        key, _, value = part.partition("=")
        out[key] = value
    return out


def read_vcf(path: str | Path, region: str | None = None, errors: list | None = None) -> Iterator[Variant]:
    """Variants of a VCF, bgzipped VCF or BCF file, read with pysam (htslib).

    Args:
        path: the file. ``region`` (``chr17:1000-2000``) needs a ``.tbi``/``.csi`` index beside it.
        region: optional region to fetch.
        errors: malformed records become :class:`SequenceError` records appended here and reading goes
            on; without a list the first one is raised.

    Raises:
        SequenceError: the file is missing, empty, or its header cannot be read (htslib's reason quoted).
    """
    import pysam

    path = Path(path)
    if not path.exists():
        raise SequenceError(path, "VCF/BCF file not found")
    if path.stat().st_size == 0:
        raise SequenceError(path, "empty file (0 bytes): not a VCF/BCF file")
    cap = _FdCapture()
    try:
        with cap:
            try:
                vf = pysam.VariantFile(str(path))
            except (ValueError, OSError) as e:
                detail = "; ".join(cap.new_lines()) or str(e)
                raise SequenceError(path, f"cannot read the VCF/BCF header: {excerpt(detail, 240)}") from e
            it = vf.fetch(region=region) if region else iter(vf)
        header_warnings = cap.new_lines()  # noqa: F841 - header sanity warnings (e.g. wrong Type) are not errors
        n = 0
        while True:
            with cap:
                try:
                    rec = next(it)
                    bad = None
                except StopIteration:
                    break
                except (OSError, ValueError) as e:
                    bad = e
            n += 1
            src = f"{path}: record {n}"
            if bad is not None:
                err = SequenceError(src, f"malformed VCF record: {excerpt('; '.join(cap.new_lines()) or bad, 240)}")
                if errors is None:
                    raise err from bad
                errors.append(err)
                continue
            cap.new_lines()  # per-record warnings (undeclared INFO keys, contigs) are not errors
            yield Variant(rec.chrom, int(rec.pos), rec.ref or "", tuple(rec.alts or ()), rec.id,
                          None if rec.qual is None else float(rec.qual), tuple(rec.filter.keys()),
                          _raw_info(str(rec)), f"{path}: record {n} ({rec.chrom}:{rec.pos})")
    finally:
        cap.close()


# ----------------------------------------------------------------------------- reference FASTA, variant windows
class ReferenceGenome:
    """Random access to a reference FASTA (plain or bgzipped) through pysam's faidx.

    An existing ``<fasta>.fai`` is used; otherwise the index is built into ``index_dir`` (default
    ``~/.cache/medmm/faidx``), so references in read-only folders work. Contig names are matched with
    or without a ``chr`` prefix (``17`` finds ``chr17``; ``MT`` finds ``chrM``).
    """

    def __init__(self, path: str | Path, index_dir: str | Path | None = None):
        import hashlib
        import os

        import pysam

        self.path = Path(path)
        if not self.path.exists():
            raise SequenceError(self.path, "reference FASTA not found")
        fai = Path(str(self.path) + ".fai")
        if not fai.exists():
            st = self.path.stat()
            key = hashlib.sha1(f"{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
            idx_dir = Path(index_dir or os.environ.get("MEDMM_CACHE", Path.home() / ".cache" / "medmm")) / "faidx"
            idx_dir.mkdir(parents=True, exist_ok=True)
            fai = idx_dir / f"{self.path.name}.{key}.fai"
            if not fai.exists():
                cap = _FdCapture()
                try:
                    with cap:
                        try:
                            pysam.faidx(str(self.path), "--fai-idx", str(fai))
                        except pysam.utils.SamtoolsError as e:
                            raise SequenceError(self.path, f"cannot index the FASTA: "
                                                f"{'; '.join(cap.new_lines()) or e}") from e
                finally:
                    cap.close()
        self.fasta = pysam.FastaFile(str(self.path), filepath_index=str(fai))
        self.contigs = dict(zip(self.fasta.references, self.fasta.lengths))

    def resolve(self, chrom: str) -> str | None:
        """The reference's name for ``chrom`` (exact, then with/without ``chr``, then M/MT), or None."""
        if chrom in self.contigs:
            return chrom
        bare = chrom[3:] if chrom.lower().startswith("chr") else chrom
        for cand in (bare, f"chr{bare}", {"M": "MT", "MT": "M"}.get(bare.upper(), ""),
                     "chr" + {"M": "MT", "MT": "M"}.get(bare.upper(), "")):
            if cand and cand in self.contigs:
                return cand
        return None

    def fetch(self, chrom: str, start: int, end: int) -> str:
        """Upper-case bases of ``[start, end)`` (0-based); the part outside the contig is padded with N."""
        length = self.contigs[chrom]
        s, e = max(0, start), min(length, end)
        seq = self.fasta.fetch(chrom, s, e).upper() if e > s else ""
        return "N" * (s - start) + seq + "N" * (end - e) if end > start else ""


@dataclass
class VariantWindow:
    """Reference and alternate sequence around one ALT allele; the variant starts at ``offset`` in both."""

    variant: Variant
    alt: str
    contig: str
    start: int
    """0-based reference coordinate of the window's first base (may be < 0: padded with N)."""
    ref_seq: str
    alt_seq: str
    offset: int


_SYMBOLIC = re.compile(r"^<.*>$|[\[\]]|^\*$|^\.$")


def variant_windows(variants: Iterable[Variant], reference: ReferenceGenome, flank: int = 50,
                    errors: list | None = None) -> list[VariantWindow]:
    """Cut ``flank`` bases either side of each variant from ``reference``, one window per ALT allele.

    Each variant's REF is checked against the reference; a mismatch, an unknown contig, a position
    past the contig's end or a symbolic ALT (``<DEL>``, ``*``, breakends) becomes a
    :class:`SequenceError` in ``errors`` (raised when ``errors`` is None) and the variant is skipped.
    """
    out: list[VariantWindow] = []

    def fail(v: Variant, msg: str) -> None:
        err = SequenceError(v.source or excerpt(v.name, 128), msg)
        if errors is None:
            raise err
        errors.append(err)

    for v in variants:
        contig = reference.resolve(v.chrom)
        if contig is None:
            names = list(reference.contigs)
            fail(v, f"contig '{excerpt(v.chrom)}' is not in the reference {reference.path.name} (it has {', '.join(names[:5])}"
                    f"{'...' if len(names) > 5 else ''})")
            continue
        start0, ref = v.pos - 1, v.ref.upper()
        if v.pos < 1 or start0 + len(ref) > reference.contigs[contig]:
            fail(v, f"position {excerpt(v.chrom)}:{v.pos} is outside {contig} (length {reference.contigs[contig]})")
            continue
        actual = reference.fetch(contig, start0, start0 + len(ref))
        if any(a != r and r != "N" for a, r in zip(actual, ref)):
            fail(v, f"REF mismatch at {excerpt(v.chrom)}:{v.pos}: the VCF says '{excerpt(v.ref)}', the reference "
                    f"{reference.path.name} has '{excerpt(actual)}' (wrong genome build or contig naming?)")
            continue
        left = reference.fetch(contig, start0 - flank, start0)
        right = reference.fetch(contig, start0 + len(ref), start0 + len(ref) + flank)
        for alt in v.alts:
            if _SYMBOLIC.search(alt):
                fail(v, f"symbolic ALT '{excerpt(alt)}' at {excerpt(v.chrom)}:{v.pos} cannot be applied to the sequence; skipped")
                continue
            out.append(VariantWindow(v, alt.upper(), contig, start0 - flank, left + actual + right,
                                     left + alt.upper() + right, flank))
    return out


def variant_effect(v: Variant, alt: str) -> str | None:
    """The annotated effect of ``alt``: SnpEff ``ANN`` (first entry for that allele) or older ``EFF``; None if absent.

    Returns text such as ``missense_variant (MODERATE impact, gene BRCA1)``.
    """
    if "ANN" in v.info:
        for ann in v.info["ANN"].split(","):
            f = ann.split("|")
            if len(f) > 3 and f[0].upper() == alt.upper():
                return f"{f[1]} ({f[2]} impact{', gene ' + f[3] if f[3] else ''})"
    if "EFF" in v.info:
        m = re.match(r"([A-Za-z0-9_+&]+)\(([^|)]*)\|(?:[^|)]*\|){4}([^|)]*)", v.info["EFF"])
        if m:
            return f"{m.group(1).lower()} ({m.group(2)} impact{', gene ' + m.group(3) if m.group(3) else ''})"
    return None


def variant_effect_records(windows: list[VariantWindow], label_info: str | None = None, name: str = "variants",
                           question: str = "The first sequence is the reference window and the second carries the "
                                           "variant. What is the effect of this variant?") -> list[dict]:
    """Conversation records for variant-effect Q&A: two ``<dna>`` inputs (reference, alternate window).

    The answer is the SnpEff annotation (``ANN``/``EFF``), or the raw value of INFO key ``label_info``
    (e.g. ``CLNSIG``) when given; a variant with no label gets a prompt-only record (for inference).
    """
    recs = []
    for w in windows:
        v = w.variant
        answer = v.info.get(label_info) if label_info else variant_effect(v, w.alt)
        where = (f"{v.chrom}:{v.pos} {v.ref}>{w.alt}, starting at base {w.offset + 1} of both "
                 f"{len(w.ref_seq)}/{len(w.alt_seq)}-base windows")
        rec = {"id": f"{name}-{v.chrom}-{v.pos}-{v.ref}-{w.alt}",
               "modalities": {"dna": [w.ref_seq, w.alt_seq]},
               "variant": {"chrom": v.chrom, "pos": v.pos, "ref": v.ref, "alt": w.alt, "id": v.id},
               "conversations": [{"from": "human", "value": f"<dna>\n<dna>\nVariant {where}. {question}"}]}
        if answer:
            rec["conversations"].append({"from": "gpt", "value": answer.replace("_", " ")})
        recs.append(rec)
    return recs
