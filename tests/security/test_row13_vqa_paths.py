"""Row 13: ``medmm prepare vqa`` with ``image_name`` values that lead outside ``--images``.

Before: ``../../outside.png``, an absolute path and a link to a file outside were read, and every image was written
to the output as an absolute path. Now images are written relative to the output folder (where the JSONL lives,
which is what training and evaluation resolve against), and an image that resolves outside ``--images`` (links
followed) is refused with a line in ``errors.jsonl`` saying so, unless ``--allow-outside-images``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from medmm.cli import main
from tests.security._user_files import jsonl, png, question


def _layout(tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    outside = png(tmp_path / "outside.png", 250)
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    png(images / "good.png", 10)
    png(images / "inside.png", 20)
    (images / "link.png").symlink_to(outside)
    rows = [question(1, "good.png"), question(2, "../../outside.png"), question(3, str(outside)),
            question(4, "link.png"), question(5, str(images / "inside.png")), question(6, "./good.png")]
    (tmp_path / "q.json").write_text(json.dumps(rows))
    return images, outside, rows


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_prepare_vqa_refuses_images_outside_and_writes_relative_paths(tmp_path):
    images, outside, _ = _layout(tmp_path)
    out = tmp_path / "out"

    main(["prepare", "vqa", str(tmp_path / "q.json"), "--images", str(images), "--out", str(out)])

    written = jsonl(out / "vqa_train.jsonl") + jsonl(out / "vqa_eval.jsonl")
    assert sorted(r["id"] for r in written) == ["vqa-1", "vqa-5", "vqa-6"]
    for r in written:
        ref = r["modalities"]["image"]
        assert not os.path.isabs(ref)
        target = (out / ref).resolve()  # readers resolve a record's paths against its JSONL's folder
        assert target.parent == images.resolve() and target != outside.resolve()
    for f in out.iterdir():  # no output (records, errors, manifest) names an absolute path
        docs = jsonl(f) if f.suffix == ".jsonl" else [json.loads(f.read_text())]
        assert not [s for s in _strings(docs) if str(tmp_path) in s or os.path.isabs(s)], f.name
    errors = jsonl(out / "errors.jsonl")
    assert sorted(e["path"].split("qid=")[1] for e in errors) == ["2)", "3)", "4)"]
    assert all(e["error"] == "ImageError" and "lies outside --images" in e["message"] for e in errors)


def test_allow_outside_images_reads_them_but_still_writes_relative_paths(tmp_path):
    images, outside, _ = _layout(tmp_path)
    out = tmp_path / "out"

    main(["prepare", "vqa", str(tmp_path / "q.json"), "--images", str(images), "--out", str(out),
          "--allow-outside-images"])

    written = {r["id"]: r["modalities"]["image"] for r in jsonl(out / "vqa_train.jsonl") + jsonl(out / "vqa_eval.jsonl")}
    assert sorted(written) == [f"vqa-{i}" for i in range(1, 7)] and not (out / "errors.jsonl").exists()
    assert not [v for v in written.values() if os.path.isabs(v)]
    assert (out / written["vqa-2"]).resolve() == outside.resolve() == (out / written["vqa-4"]).resolve()
