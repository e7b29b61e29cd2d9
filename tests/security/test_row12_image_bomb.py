"""Row 12: ``medmm prepare vqa`` over a PNG declaring 100000 x 100000 pixels.

Before: Pillow's uncaught ``DecompressionBombError`` ended the whole job. Now the image reader refuses any image over
its pixel cap (Pillow's default limit, the warning zone included) before decoding, as an ``ImageError`` naming the
file; the job lists it in ``errors.jsonl`` and writes the good images' records.
"""

from __future__ import annotations

import json

import pytest

from medmm.cli import main
from tests.security._user_files import jsonl, png, png_header_only, question


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own note on warn.png
def test_prepare_vqa_lists_a_decompression_bomb_and_goes_on(tmp_path):
    from PIL import Image

    default_cap = Image.MAX_IMAGE_PIXELS
    images = tmp_path / "images"
    images.mkdir()
    png(images / "good1.png", 10)
    png(images / "good2.png", 200)
    png_header_only(images / "bomb.png", 100_000, 100_000)  # over twice Pillow's limit: it raises
    png_header_only(images / "warn.png", 10_000, 9_000)  # 90 M pixels: only a warning in Pillow
    rows = [question(1, "good1.png"), question(2, "bomb.png"), question(3, "good2.png"), question(4, "warn.png"),
            question(5, "good1.png")]
    (tmp_path / "q.json").write_text(json.dumps(rows))
    out = tmp_path / "out"

    main(["prepare", "vqa", str(tmp_path / "q.json"), "--images", str(images), "--out", str(out)])

    written = jsonl(out / "vqa_train.jsonl") + jsonl(out / "vqa_eval.jsonl")
    assert sorted(r["id"] for r in written) == ["vqa-1", "vqa-3", "vqa-5"]
    errors = jsonl(out / "errors.jsonl")
    assert len(errors) == 2 and all(e["error"] == "ImageError" for e in errors)
    bomb = next(e for e in errors if "bomb.png" in e["path"])
    assert "decompression bomb" in bomb["message"] and "not decoded" in bomb["message"]
    warn = next(e for e in errors if "warn.png" in e["path"])
    assert "90000000 pixels" in warn["message"]  # refused before decoding, not a decode failure
    manifest = json.loads((out / "manifest.json").read_text())["vqa"]
    assert manifest["rejected"] == 2 and manifest["images"] == 2
    assert default_cap is not None and Image.MAX_IMAGE_PIXELS == default_cap  # nothing lifted Pillow's own guard
