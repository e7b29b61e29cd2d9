"""Helpers of the CLI rows (12-14): hand-made PNGs and reading a job's output folder."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width`` x ``height`` RGB pixels but holds one compressed row: a few dozen bytes on disk
    (a decompression bomb as far as the header goes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x00" * 3 * min(width, 64))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def png(path: Path, value: int = 128, size: int = 8) -> Path:
    """A real, small grey PNG."""
    from PIL import Image

    Image.new("L", (size, size), value).save(path)
    return path


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def question(qid: int, image_name: str) -> dict:
    return {"qid": qid, "image_name": image_name, "question": "Is there an abnormality?", "answer": "no",
            "answer_type": "CLOSED"}
