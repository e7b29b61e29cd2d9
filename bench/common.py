"""What every side-by-side benchmark in ``bench/`` shares: offline settings, the common flags, the machine's
description and the result file.

A benchmark script starts with::

    from common import ROOT, bench_parser, environment, resolve_device, write_result

(``python bench/NAME.py`` puts ``bench/`` first on ``sys.path``; importing this module puts the repository there
too, so ``medmm`` imports from the checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def bench_parser(doc: str | None, result_name: str, sizes: dict | None = None) -> argparse.ArgumentParser:
    """An argument parser with ``--device``, ``--seed``, ``--out`` (``bench/results/<result_name>.json``) and, given
    ``sizes``, ``--size`` (default ``small``)."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    if sizes:
        ap.add_argument("--size", choices=sorted(sizes), default="small" if "small" in sizes else sorted(sizes)[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / f"{result_name}.json"))
    return ap


def resolve_device(ap: argparse.ArgumentParser, args: argparse.Namespace):
    """The torch device ``args.device`` names (``auto``: CUDA when present); sets ``args.device`` to its type and
    exits through ``ap.error`` when the device is absent."""
    from medmm.inference.predictor import pick_device

    try:
        device = pick_device(args.device)
    except ValueError as e:
        ap.error(f"--device: {e}")
    args.device = device.type
    return device


def environment(device) -> dict:
    """The machine a figure was measured on: device, its name, CPU threads, Python and torch versions."""
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": device.type, "device_name": name, "cpu_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}


def write_result(out: str | Path, result: dict) -> Path:
    """Write ``result`` as indented JSON to ``out`` (folders created); returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out
