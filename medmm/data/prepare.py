"""``medmm prepare``: raw sources -> conversation JSONL (train/eval) + ``errors.jsonl`` + ``manifest.json``.

Sources handled here: VQA-RAD-style question files over PNG/JPEG images (split by image, so no
image is in both splits), CSVs of SMILES with a binary label, TSVs of DNA sequences with a label,
and a list of DICOM files with a question about their modality. Every bad row is written to
``errors.jsonl`` with its source and reason and the job goes on; nothing with patient identifiers
is written (records carry file paths and the generated text only).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from ..errors import InvalidInputError
from ..utils import atomic_write_text, write_jsonl


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
                seed: int = 0, name: str = "vqa") -> dict:
    """VQA-RAD-style JSON list (image_name, question, answer, answer_type) -> image conversations."""
    from ..io.images import read_image

    questions, images, out = Path(questions), Path(images), Path(out)
    rows = json.loads(questions.read_text())
    errors, by_image = [], {}
    ok_images: dict[str, bool] = {}
    for i, q in enumerate(rows):
        src = f"{questions}:{i} (qid={q.get('qid')})"
        try:
            for k in ("image_name", "question", "answer"):
                if not str(q.get(k, "")).strip():
                    raise InvalidInputError(src, f"missing '{k}'")
            img = images / q["image_name"]
            if q["image_name"] not in ok_images:
                read_image(img)  # validate once per image
                ok_images[q["image_name"]] = True
            by_image.setdefault(q["image_name"], []).append(q)
        except InvalidInputError as e:
            errors.append(e.to_record())
    train_imgs, eval_imgs = _split(sorted(by_image), eval_fraction, seed)

    def recs(names):
        out_recs = []
        for n in names:
            for q in by_image[n]:
                out_recs.append({"id": f"{name}-{q.get('qid', len(out_recs))}",
                                 "modalities": {"image": str((images / n).resolve())},
                                 "answer_type": q.get("answer_type"),
                                 "conversations": [{"from": "human", "value": f"<image>\n{q['question']}"},
                                                   {"from": "gpt", "value": str(q["answer"])}]})
        return out_recs

    return _write(out, name, recs(train_imgs), recs(eval_imgs), errors,
                  {"source": str(questions), "images": len(by_image)})


def prepare_molecules(csv_path: str | Path, out: str | Path, smiles_col: str = "smiles", label_col: str | None = None,
                      question: str = "Is this molecule likely to be an approved drug? Answer yes or no.",
                      eval_fraction: float = 0.2, seed: int = 0, name: str = "molecules") -> dict:
    """CSV of SMILES (+ optional 0/1 label) -> molecule conversations; invalid SMILES go to errors.jsonl."""
    from ..io.molecules import canonical_smiles, parse_smiles

    csv_path, out = Path(csv_path), Path(out)
    recs, errors = [], []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if smiles_col not in (reader.fieldnames or []):
            raise InvalidInputError(csv_path, f"no column '{smiles_col}' (columns: {reader.fieldnames})")
        for i, row in enumerate(reader, start=2):
            src = f"{csv_path}:{i}"
            try:
                smi = canonical_smiles(parse_smiles(row[smiles_col], source=src))
                rec = {"id": f"{name}-{i}", "modalities": {"mol": smi}}
                if label_col:
                    lab = str(row.get(label_col, "")).strip()
                    if lab not in ("0", "1", "0.0", "1.0"):
                        raise InvalidInputError(src, f"label '{lab}' in column '{label_col}' is not 0/1")
                    answer = "yes" if float(lab) == 1 else "no"
                    rec["answer_type"] = "CLOSED"
                    rec["conversations"] = [{"from": "human", "value": f"<mol>\n{question}"},
                                            {"from": "gpt", "value": answer}]
                else:
                    rec["conversations"] = [{"from": "human", "value": f"<mol>\n{question}"}]
                recs.append(rec)
            except InvalidInputError as e:
                errors.append(e.to_record())
    train, evals = _split(recs, eval_fraction, seed)
    return _write(out, name, train, evals, errors, {"source": str(csv_path)})


def prepare_dna(tsv_path: str | Path, out: str | Path, question: str = "Does this DNA sequence contain a promoter? "
                "Answer yes or no.", eval_fraction: float = 0.2, seed: int = 0, name: str = "dna") -> dict:
    """TSV (sequence, label) -> DNA conversations; invalid sequences go to errors.jsonl."""
    from ..io.genomics import clean_sequence

    tsv_path, out = Path(tsv_path), Path(out)
    recs, errors = [], []
    with open(tsv_path) as f:
        reader = csv.DictReader(f, delimiter="\t")
        for i, row in enumerate(reader, start=2):
            src = f"{tsv_path}:{i}"
            try:
                seq = clean_sequence(row.get("sequence", ""), src)
                answer = "yes" if str(row.get("label")).strip() == "1" else "no"
                recs.append({"id": f"{name}-{i}", "modalities": {"dna": seq}, "answer_type": "CLOSED",
                             "conversations": [{"from": "human", "value": f"<dna>\n{question}"},
                                               {"from": "gpt", "value": answer}]})
            except InvalidInputError as e:
                errors.append(e.to_record())
    train, evals = _split(recs, eval_fraction, seed)
    return _write(out, name, train, evals, errors, {"source": str(tsv_path)})


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
    """The test files shipped inside the pydicom wheel (read directly; get_testdata_files downloads)."""
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files"
