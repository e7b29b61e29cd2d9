"""``medmm prepare vqa``: VQA-RAD-style question files over PNG/JPEG images -> conversation JSONL (train/eval) +
``errors.jsonl`` + ``manifest.json``.

Split by image, so no image is in both splits: a keyed hash of the image's path under ``--images``, so the parts
of a ``--num-shards`` run (each takes the images whose hash falls in it, :mod:`medmm.prepare.parts`) split alike. Every bad row is written to ``errors.jsonl`` with its source and
reason and the job goes on; nothing with patient identifiers is written (records carry image paths relative to
``--out`` and the generated text only).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..errors import ImageError, InvalidInputError, excerpt
from ..io.images import read_image
from .common import split_train_eval, write_prepared
from .parts import Part, holds, write_part

log = logging.getLogger(__name__)


def prepare_vqa(questions: str | Path, images: str | Path, out: str | Path, eval_fraction: float = 0.2,
                seed: int = 0, name: str = "vqa", allow_outside: bool = False, part: Part | None = None) -> dict:
    """VQA-RAD-style JSON list (image_name, question, answer, answer_type) -> image conversations.

    Images are written relative to ``out`` (training and evaluation resolve a record's paths against its JSONL's
    folder), never as absolute paths. An ``image_name`` that resolves outside ``images`` (``..``, an absolute path,
    a link out; links are followed) is refused with a line in ``errors.jsonl``, unless ``allow_outside``: then it is
    read, with a warning, and still written as a relative path. Each image is read once; an unreadable one (a
    decompression bomb, a FIFO, a truncated file) rejects its rows with a line each and the job goes on.
    ``part``: only the images (and rows naming no usable image) whose key falls in this part of a sharded run.
    """
    questions, images, out = Path(questions), Path(images), Path(out)
    rows = json.loads(questions.read_text())
    if not isinstance(rows, list):
        raise InvalidInputError(questions, "the question file must hold a JSON list")
    root, base = images.resolve(), out.resolve()
    errors, by_image, key_of = [], {}, {}
    checked: dict[str, str | None] = {}  # reference -> None when the image reads, else why not
    for i, q in enumerate(rows):
        src = f"{questions.name}:{i}" + (f" (qid={excerpt(q.get('qid'))})" if isinstance(q, dict) else "")
        key = f"row {i}"  # a row that names no usable image is keyed by its place in the file
        try:
            if not isinstance(q, dict):
                raise InvalidInputError(src, "a question must be a JSON object")
            for k in ("image_name", "question", "answer"):
                if not str(q.get(k, "")).strip():
                    raise InvalidInputError(src, f"missing '{k}'")
            image, rel = _vqa_image(str(q["image_name"]), images, root, src, allow_outside)
            # the image's place under --images keys the part and the split: --out differs between parts
            key = Path(os.path.relpath(image, root)).as_posix()
            if not holds(part, key):
                continue
            ref = os.path.relpath(image, base)
            key_of[ref] = key
            if ref not in checked:
                try:
                    read_image(image)  # validate once per image
                    checked[ref] = None
                except ImageError as e:
                    checked[ref] = e.reason
            if checked[ref] is not None:  # the image is named (relative to --images), the row that wanted it too
                errors.append({**ImageError(rel, checked[ref]).to_record(), "row": src})
                continue
            by_image.setdefault(ref, []).append((i, q))
        except InvalidInputError as e:
            if holds(part, key):
                errors.append(e.to_record())
    train_imgs, eval_imgs = split_train_eval(sorted(by_image), eval_fraction, seed, key=key_of.__getitem__)
    write_part(out, part, "vqa", {"questions": str(questions), "images": str(images)},
               {"eval_fraction": eval_fraction, "seed": seed, "name": name, "allow_outside": allow_outside},
               groups={key_of[r]: "eval" for r in eval_imgs} | {key_of[r]: "train" for r in train_imgs})

    def recs(refs):
        out_recs = []
        for ref in refs:
            for i, q in by_image[ref]:  # without a qid, the row's place in the file names it (the same in every part)
                out_recs.append({"id": f"{name}-{q.get('qid', i)}",
                                 "modalities": {"image": Path(ref).as_posix()},
                                 "answer_type": q.get("answer_type"),
                                 "conversations": [{"from": "human", "value": f"<image>\n{q['question']}"},
                                                   {"from": "gpt", "value": str(q["answer"])}]})
        return out_recs

    return write_prepared(out, name, recs(train_imgs), recs(eval_imgs), errors,
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


