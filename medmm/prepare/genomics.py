"""``medmm prepare dna|variants``: TSVs of DNA sequences with a label (plain or k-mers), and VCF/BCF variants cut
into windows of a reference FASTA (variant-effect Q&A) -> conversation JSONL; bad rows go to ``errors.jsonl``.

With ``--num-shards`` a part takes the rows (DNA: by line) or variants (by chromosome, position and alleles) whose
keyed hash falls in it, and records split by a hash of their id (:mod:`medmm.prepare.parts`)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import InvalidInputError
from ..utils import write_jsonl
from .common import binary_label, read_rows, split_train_eval, write_prepared
from .parts import Part, holds, write_part

log = logging.getLogger(__name__)


def prepare_dna(tsv_path: str | Path, out: str | Path, question: str = "Does this DNA sequence contain a promoter? "
                "Answer yes or no.", eval_fraction: float = 0.2, seed: int = 0, name: str = "dna",
                sequence_col: str = "sequence", label_col: str = "label", part: Part | None = None) -> dict:
    """TSV (sequence, label) -> DNA conversations; invalid sequences and labels go to errors.jsonl.

    Sequences written as overlapping k-mers separated by spaces (DNABERT's files) are decoded back to
    the plain sequence.
    """
    from ..io.genomics import clean_sequence, decode_kmers, looks_like_kmers

    tsv_path, out = Path(tsv_path), Path(out)
    recs, errors = [], []
    for i, row in read_rows(tsv_path, [sequence_col, label_col], delimiter="\t"):
        if not holds(part, f"row {i}"):
            continue
        src = f"{tsv_path}:{i}"
        try:
            text = row.get(sequence_col) or ""
            seq = clean_sequence(decode_kmers(text, src) if looks_like_kmers(text) else text, src)
            answer = "yes" if binary_label(row, label_col, src) else "no"
            recs.append({"id": f"{name}-{i}", "modalities": {"dna": seq}, "answer_type": "CLOSED",
                         "conversations": [{"from": "human", "value": f"<dna>\n{question}"},
                                           {"from": "gpt", "value": answer}]})
        except InvalidInputError as e:
            errors.append(e.to_record())
    train, evals = split_train_eval(recs, eval_fraction, seed, key=lambda r: r["id"])
    write_part(out, part, "dna", str(tsv_path), {"question": question, "eval_fraction": eval_fraction, "seed": seed,
                                                 "name": name, "sequence_col": sequence_col, "label_col": label_col})
    return write_prepared(out, name, train, evals, errors, {"source": str(tsv_path)})


def prepare_variants(vcf: str | Path, reference: str | Path, out: str | Path, flank: int = 50,
                     label_info: str | None = None, region: str | None = None, eval_fraction: float = 0.2,
                     seed: int = 0, name: str = "variants", index_dir: str | Path | None = None,
                     part: Part | None = None) -> dict:
    """VCF/BCF + reference FASTA -> variant-effect Q&A records on (reference, alternate) DNA windows.

    Variants whose REF disagrees with the reference, whose contig is missing, or whose ALT is symbolic
    are listed in errors.jsonl (as is an unreadable VCF); labelled records (SnpEff ``ANN``/``EFF``
    effect, or INFO ``label_info``) are split into train/eval, unlabelled ones go to
    ``<name>_requests.jsonl`` for ``infer.py --manifest``.
    """
    from ..errors import SequenceError
    from ..io.genomics import ReferenceGenome, read_vcf, variant_effect_records, variant_windows

    out = Path(out)
    errors: list = []
    try:
        ref = ReferenceGenome(reference, index_dir)
        windows = variant_windows(read_vcf(vcf, region, errors), ref, flank, errors)
    except SequenceError as e:
        errors.append(e)
        windows = []
    windows = [w for w in windows if holds(part, f"{w.variant.chrom}-{w.variant.pos}-{w.variant.ref}-{w.alt}")]
    recs = variant_effect_records(windows, label_info, name)
    # an error belongs to the part its source (file:line, or the file) falls in
    errors = [e for e in errors if holds(part, str(e.to_record().get("path")))]
    labelled = [r for r in recs if r["conversations"][-1]["from"] == "gpt"]
    requests = [r for r in recs if r["conversations"][-1]["from"] != "gpt"]
    train, evals = split_train_eval(labelled, eval_fraction, seed, key=lambda r: r["id"])
    write_part(out, part, "variants", {"vcf": str(vcf), "reference": str(reference)},
               {"flank": flank, "label_info": label_info, "region": region, "eval_fraction": eval_fraction,
                "seed": seed, "name": name})
    if requests:
        write_jsonl(out / f"{name}_requests.jsonl", requests)
    return write_prepared(out, name, train, evals, [e.to_record() for e in errors],
                  {"source": str(vcf), "reference": str(reference), "flank": flank, "windows": len(windows),
                   "unlabelled": len(requests)})
