"""``medmm prepare``: raw sources -> conversation JSONL (train/eval) + ``errors.jsonl`` + ``manifest.json``.

Sources handled here: VQA-RAD-style question files over PNG/JPEG images (split by image, so no
image is in both splits), CSVs of SMILES with a binary label (standardised by RDKit, random or
scaffold split, optional descriptor Q&A), TSVs of DNA sequences with a label (plain or k-mers), VCF/BCF
variants cut into windows of a reference FASTA (variant-effect Q&A), and a list of DICOM files with a question about their modality. Every bad row is written to
``errors.jsonl`` with its source and reason and the job goes on; nothing with patient identifiers
is written (records carry file paths and the generated text only).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from pathlib import Path

from ..errors import ImageError, InvalidInputError, excerpt
from ..io.images import read_image
from ..utils import atomic_write_text, write_jsonl

log = logging.getLogger(__name__)


def _split(items: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    items = list(items)
    random.Random(seed).shuffle(items)
    n_eval = max(1, int(round(len(items) * eval_fraction))) if eval_fraction > 0 and len(items) > 1 else 0
    return items[n_eval:], items[:n_eval]


def _write(out: Path, name: str, train: list[dict], evals: list[dict], errors: list[dict], extra: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / f"{name}_train.jsonl", train)
    write_jsonl(out / f"{name}_eval.jsonl", evals)
    if errors:
        with open(out / "errors.jsonl", "a") as f:
            for e in errors:
                f.write(json.dumps(e) + "\n")
    manifest = {"name": name, "train": len(train), "eval": len(evals), "rejected": len(errors), **extra}
    mf = out / "manifest.json"
    allm = json.loads(mf.read_text()) if mf.exists() else {}
    allm[name] = manifest
    atomic_write_text(mf, json.dumps(allm, indent=2))
    return manifest


def prepare_vqa(questions: str | Path, images: str | Path, out: str | Path, eval_fraction: float = 0.2,
                seed: int = 0, name: str = "vqa", allow_outside: bool = False) -> dict:
    """VQA-RAD-style JSON list (image_name, question, answer, answer_type) -> image conversations.

    Images are written relative to ``out`` (training and evaluation resolve a record's paths against its JSONL's
    folder), never as absolute paths. An ``image_name`` that resolves outside ``images`` (``..``, an absolute path,
    a link out; links are followed) is refused with a line in ``errors.jsonl``, unless ``allow_outside``: then it is
    read, with a warning, and still written as a relative path. Each image is read once; an unreadable one (a
    decompression bomb, a FIFO, a truncated file) rejects its rows with a line each and the job goes on.
    """
    questions, images, out = Path(questions), Path(images), Path(out)
    rows = json.loads(questions.read_text())
    if not isinstance(rows, list):
        raise InvalidInputError(questions, "the question file must hold a JSON list")
    root, base = images.resolve(), out.resolve()
    errors, by_image = [], {}
    checked: dict[str, str | None] = {}  # reference -> None when the image reads, else why not
    for i, q in enumerate(rows):
        src = f"{questions.name}:{i}" + (f" (qid={excerpt(q.get('qid'))})" if isinstance(q, dict) else "")
        try:
            if not isinstance(q, dict):
                raise InvalidInputError(src, "a question must be a JSON object")
            for k in ("image_name", "question", "answer"):
                if not str(q.get(k, "")).strip():
                    raise InvalidInputError(src, f"missing '{k}'")
            image, rel = _vqa_image(str(q["image_name"]), images, root, src, allow_outside)
            ref = os.path.relpath(image, base)
            if ref not in checked:
                try:
                    read_image(image)  # validate once per image
                    checked[ref] = None
                except ImageError as e:
                    checked[ref] = e.reason
            if checked[ref] is not None:  # the image is named (relative to --images), the row that wanted it too
                errors.append({**ImageError(rel, checked[ref]).to_record(), "row": src})
                continue
            by_image.setdefault(ref, []).append(q)
        except InvalidInputError as e:
            errors.append(e.to_record())
    train_imgs, eval_imgs = _split(sorted(by_image), eval_fraction, seed)

    def recs(refs):
        out_recs = []
        for ref in refs:
            for q in by_image[ref]:
                out_recs.append({"id": f"{name}-{q.get('qid', len(out_recs))}",
                                 "modalities": {"image": Path(ref).as_posix()},
                                 "answer_type": q.get("answer_type"),
                                 "conversations": [{"from": "human", "value": f"<image>\n{q['question']}"},
                                                   {"from": "gpt", "value": str(q["answer"])}]})
        return out_recs

    return _write(out, name, recs(train_imgs), recs(eval_imgs), errors,
                  {"source": questions.name, "images": len(by_image)})


def _vqa_image(image_name: str, images: Path, root: Path, src: str, allow_outside: bool) -> tuple[Path, str]:
    """``(resolved path, name for messages)`` of a question's image; ImageError when it lies outside ``--images``
    (unless ``allow_outside``) or the name cannot be a path. Messages repeat a relative name as given, never an
    absolute path."""
    # an absolute name is not repeated: outputs hold no absolute path
    said = "an absolute image_name" if os.path.isabs(image_name) else f"image_name {excerpt(image_name)!r}"
    try:
        image = (images / image_name).resolve()  # links followed: a link out of --images is outside
    except (OSError, RuntimeError, ValueError) as e:  # a link loop (RuntimeError before 3.13), a NUL byte
        raise ImageError(src, f"{said} cannot be resolved ({type(e).__name__})") from e
    if image.is_relative_to(root):
        return image, image.relative_to(root).as_posix()
    if not allow_outside:
        raise ImageError(src, f"{said} lies outside --images; refused (--allow-outside-images reads it)")
    log.warning("%s: %s lies outside --images; read because of --allow-outside-images", src, said)
    return image, said


def _read_rows(path: Path, columns: list[str], delimiter: str = ",") -> list[tuple[int, dict]]:
    """``(line, row)`` pairs of a CSV/TSV (``.gz`` allowed); a missing column raises InvalidInputError."""
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for c in columns:
            if c and c not in (reader.fieldnames or []):
                raise InvalidInputError(path, f"no column '{c}' (columns: {reader.fieldnames})")
        return list(enumerate(reader, start=2))


def _label(row: dict, col: str, src: str) -> int:
    lab = str(row.get(col) or "").strip()
    if lab not in ("0", "1", "0.0", "1.0"):
        raise InvalidInputError(src, f"label '{lab}' in column '{col}' is not 0/1" if lab else f"no label in column '{col}'")
    return int(float(lab))


def prepare_molecules(csv_path: str | Path, out: str | Path, smiles_col: str = "smiles", label_col: str | None = None,
                      question: str = "Is this molecule likely to be an approved drug? Answer yes or no.",
                      eval_fraction: float = 0.2, seed: int = 0, name: str = "molecules", split: str = "random",
                      workers: int = 0, options=None, qa: bool = False) -> dict:
    """CSV of SMILES (+ optional 0/1 label) -> molecule conversations; invalid SMILES go to errors.jsonl.

    Each SMILES goes through the RDKit pipeline of :mod:`medmm.io.molecules` (``options``: a
    ``StandardiseOptions``) in ``workers`` processes; a record holds the canonical SMILES and its input
    row and text. ``split="scaffold"`` keeps every Bemis-Murcko scaffold on one side of train/eval.
    ``qa=True`` also writes ``<name>_qa_train/eval.jsonl``: one multi-turn record per molecule asking
    about descriptors and drug-likeness rules, answered by RDKit (the molecule Q&A recipe's data).
    """
    from ..data.splits import scaffold_split
    from ..io.molecules import molecule_qa, process_molecules

    if split not in ("random", "scaffold"):
        raise ValueError(f"split must be 'random' or 'scaffold', got '{split}'")
    csv_path, out = Path(csv_path), Path(out)
    rows = _read_rows(csv_path, [smiles_col, label_col])
    features = ("scaffold",) + (("descriptors", "druglikeness") if qa else ())
    mols = process_molecules([r.get(smiles_col) or "" for _, r in rows], [f"{csv_path}:{i}" for i, _ in rows],
                             options, features=features, workers=workers)
    recs, qa_recs, scaffolds, errors = [], [], [], []
    for (i, row), m in zip(rows, mols):
        if not m.ok:
            errors.append(m.error)
            continue
        try:
            rec = {"id": f"{name}-{i}", "modalities": {"mol": m.smiles},
                   "input": {"row": i, "smiles": m.input}}
            if label_col:
                rec["answer_type"] = "CLOSED"
                rec["conversations"] = [{"from": "human", "value": f"<mol>\n{question}"},
                                        {"from": "gpt", "value": "yes" if _label(row, label_col, m.source) else "no"}]
            else:
                rec["conversations"] = [{"from": "human", "value": f"<mol>\n{question}"}]
        except InvalidInputError as e:
            errors.append(e.to_record())
            continue
        recs.append(rec)
        scaffolds.append(m.scaffold)
        if qa:
            turns = []
            for k, (q, a) in enumerate(molecule_qa(m.descriptors, m.druglikeness)):
                turns += [{"from": "human", "value": f"<mol>\n{q}" if k == 0 else q}, {"from": "gpt", "value": a}]
            qa_recs.append({"id": f"{name}-qa-{i}", "modalities": {"mol": m.smiles}, "conversations": turns})
    if split == "scaffold" and len(recs) > 1:
        tr, _, ev = scaffold_split(scaffolds, (1 - eval_fraction, 0.0, eval_fraction), seed)
        train, evals = [recs[j] for j in tr], [recs[j] for j in ev]
    else:
        tr = ev = None
        train, evals = _split(recs, eval_fraction, seed)
    extra = {"source": str(csv_path), "split": split, "workers": workers}
    if qa:  # same molecules on the same side as the main records
        ids = {r["id"].rsplit("-", 1)[1] for r in evals}
        _write(out, f"{name}_qa", [r for r in qa_recs if r["id"].rsplit("-", 1)[1] not in ids],
               [r for r in qa_recs if r["id"].rsplit("-", 1)[1] in ids], [], {"source": str(csv_path)})
    return _write(out, name, train, evals, errors, extra)


def prepare_dna(tsv_path: str | Path, out: str | Path, question: str = "Does this DNA sequence contain a promoter? "
                "Answer yes or no.", eval_fraction: float = 0.2, seed: int = 0, name: str = "dna",
                sequence_col: str = "sequence", label_col: str = "label") -> dict:
    """TSV (sequence, label) -> DNA conversations; invalid sequences and labels go to errors.jsonl.

    Sequences written as overlapping k-mers separated by spaces (DNABERT's files) are decoded back to
    the plain sequence.
    """
    from ..io.genomics import clean_sequence, decode_kmers, looks_like_kmers

    tsv_path, out = Path(tsv_path), Path(out)
    recs, errors = [], []
    for i, row in _read_rows(tsv_path, [sequence_col, label_col], delimiter="\t"):
        src = f"{tsv_path}:{i}"
        try:
            text = row.get(sequence_col) or ""
            seq = clean_sequence(decode_kmers(text, src) if looks_like_kmers(text) else text, src)
            answer = "yes" if _label(row, label_col, src) else "no"
            recs.append({"id": f"{name}-{i}", "modalities": {"dna": seq}, "answer_type": "CLOSED",
                         "conversations": [{"from": "human", "value": f"<dna>\n{question}"},
                                           {"from": "gpt", "value": answer}]})
        except InvalidInputError as e:
            errors.append(e.to_record())
    train, evals = _split(recs, eval_fraction, seed)
    return _write(out, name, train, evals, errors, {"source": str(tsv_path)})


def prepare_variants(vcf: str | Path, reference: str | Path, out: str | Path, flank: int = 50,
                     label_info: str | None = None, region: str | None = None, eval_fraction: float = 0.2,
                     seed: int = 0, name: str = "variants", index_dir: str | Path | None = None) -> dict:
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
    recs = variant_effect_records(windows, label_info, name)
    labelled = [r for r in recs if r["conversations"][-1]["from"] == "gpt"]
    requests = [r for r in recs if r["conversations"][-1]["from"] != "gpt"]
    train, evals = _split(labelled, eval_fraction, seed)
    if requests:
        write_jsonl(out / f"{name}_requests.jsonl", requests)
    return _write(out, name, train, evals, [e.to_record() for e in errors],
                  {"source": str(vcf), "reference": str(reference), "flank": flank, "windows": len(windows),
                   "unlabelled": len(requests)})


def prepare_dicom_modality(files: list[str | Path], out: str | Path, name: str = "dicom",
                           question: str = "What is the imaging modality of this image?") -> dict:
    """DICOM files -> "what modality" conversations (answer = the Modality attribute). Unreadable files are
    listed in errors.jsonl. Every readable file goes to both splits (a mechanics check, not a benchmark)."""
    from ..io.dicom import read_dicom

    recs, errors = [], []
    for p in files:
        try:
            img = read_dicom(p)
            if img.is_color:
                raise InvalidInputError(p, "colour DICOM skipped for the modality question")
            recs.append({"id": f"{name}-{Path(p).stem}", "modalities": {"image": str(Path(p).resolve())},
                         "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                           {"from": "gpt", "value": img.meta["modality"] or "unknown"}]})
        except InvalidInputError as e:
            errors.append(e.to_record())
    return _write(Path(out), name, recs, recs, errors, {"files": len(files)})


def pydicom_test_files() -> Path:
    """The test files shipped inside the pydicom wheel, read in place (pydicom's own helper downloads)."""
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files"
