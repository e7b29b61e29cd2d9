"""Whole-slide tiling benchmark: tiles/s from slide to encoder input, 1 process vs N workers, and decode vs model time.

Slides (real data, read in place from ``../shared/data/pathology/wsi``):

- ``CMU-1-Small-Region.svs``: Aperio, JPEG tiles, 0.499 µm/px (OpenSlide);
- ``tcga-cr-7395-01a-01-ts1.svs``: Aperio, JPEG 2000 tiles, no MPP in its metadata (``slide_mpp=0.25`` given);
- ``cmu_x6.tif``: the CMU region repeated 3 x 2 (6660 x 5934 px) written here as a tiled JPEG pyramidal TIFF
  (q=90, 256 px tiles, 0.5 µm/px, 3 levels): a larger slide with real tissue texture, read by both OpenSlide
  (generic TIFF) and medmm's tifffile reader.

Decode = slide -> normalised float tensor ``(B, 3, 224, 224)`` at 0.5 µm/px, every tile of the grid
(``min_tissue=0``, so all readers see the same tiles):

- ``naive``: the obvious loop: ``OpenSlide.read_region(...).convert("RGB")`` + torchvision ``ToTensor`` +
  ``Normalize`` per tile, one process;
- ``medmm_1``: ``medmm.prepare.wsi.read_chunk`` (level choice, white background, resize only when needed)
  + the tile encoder's batched ``preprocess``, one process;
- ``medmm_N``: the same chunks through a spawned pool of N workers with a bounded window, as
  ``medmm prepare wsi --workers N`` runs them (pool start-up reported apart).

Decode timings run with ``torch.set_num_threads(1)`` (as in DataLoader workers).

End to end: ``prepare_wsi(..., features="vit_tile")`` with a randomly initialised ViT-S/16 tile encoder
(22 M parameters; UNI's ViT-L/16 is ~13x the FLOPs) on the tissue tiles of ``cmu_x6.tif``
(``min_tissue=0.5``, torch's default threads for the model), 0 and N workers: tiles/s and the
share of time in decode vs model (from the run's manifest). Decode: one warm-up, then medians of
``--repeats`` runs; end to end: median of ``--repeats - 2`` runs (at least one).
Writes ``bench/results/wsi_tiles.json``; the last printed line is the headline.

    python bench/wsi_tiles.py                 # --workers = CPU count, --repeats 3
    python bench/wsi_tiles.py --workers 8 --model vit_base_patch16_224 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = (ROOT.parent / "shared" / "data" / "pathology" / "wsi").resolve()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from medmm.io import wsi  # noqa: E402
from medmm.prepare.wsi import WsiSettings, read_chunk  # noqa: E402


def make_cmu_x6(out: Path) -> Path:
    import tifffile

    with wsi.open_slide(SHARED / "CMU-1-Small-Region.svs") as s:
        region = s.read_region((0, 0), 0, s.dimensions[0])
    base = np.tile(region, (2, 3, 1))
    path = out / "cmu_x6.tif"
    with tifffile.TiffWriter(path) as t:
        for k in range(3):
            t.write(base[:: 2**k, :: 2**k], tile=(256, 256), photometric="rgb", compression="jpeg",
                    compressionargs={"level": 90}, subfiletype=0 if k == 0 else 1,
                    **({"resolution": (1e4 / 0.5, 1e4 / 0.5), "resolutionunit": "CENTIMETER"} if k == 0 else {}))
    return path


def plan(path: Path, slide_mpp: float | None, backend: str):
    with wsi.open_slide(path, slide_mpp=slide_mpp, backend=backend) as s:
        choice = wsi.select_level(s, 0.5, 224)
        grid = wsi.tile_grid(s, choice, None)
    return choice, grid.coords


def naive(path: Path, choice, coords) -> tuple[float, torch.Tensor]:
    import openslide
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize(224), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    t0 = time.perf_counter()
    s = openslide.OpenSlide(str(path))
    out = []
    for x, y in coords:
        img = s.read_region((int(x), int(y)), choice.level, (choice.read_size, choice.read_size)).convert("RGB")
        out.append(tf(img))
    batch = torch.stack(out)
    s.close()
    return time.perf_counter() - t0, batch


def medmm_single(path: Path, settings: WsiSettings, choice, coords, prep, chunk: int = 32) -> dict:
    from dataclasses import asdict

    from medmm.prepare import wsi as prepare_wsi_module

    prepare_wsi_module._OPEN.clear()  # a cold open, like the naive loop
    t0 = time.perf_counter()
    read_s, outs = 0.0, []
    for i in range(0, len(coords), chunk):
        r = read_chunk(str(path), settings, asdict(choice), coords[i:i + chunk], False)
        read_s += r["seconds"]
        outs.append(prep(torch.from_numpy(r["tiles"])))
    batch = torch.cat(outs)
    return {"seconds": time.perf_counter() - t0, "read_s": read_s, "batch": batch}


def medmm_workers(pool, path: Path, settings: WsiSettings, choice, coords, prep, workers: int, chunk: int = 32) -> dict:
    from dataclasses import asdict

    t0 = time.perf_counter()
    pending: deque = deque()
    outs = []
    for i in range(0, len(coords), chunk):
        while len(pending) >= 2 * workers:
            outs.append(prep(torch.from_numpy(pending.popleft().get()["tiles"])))
        pending.append(pool.apply_async(read_chunk, (str(path), settings, asdict(choice), coords[i:i + chunk], False)))
    while pending:
        outs.append(prep(torch.from_numpy(pending.popleft().get()["tiles"])))
    return {"seconds": time.perf_counter() - t0, "batch": torch.cat(outs)}


def end_to_end(path: Path, workers: int, model: str, device: str) -> dict:
    from medmm.prepare.wsi import prepare_wsi

    with tempfile.TemporaryDirectory() as d:
        m = prepare_wsi(path, Path(d) / "out", mpp=0.5, tile=224, features="vit_tile", min_tissue=0.5,
                        encoder_kwargs={"model_name": model, "init_values": None}, workers=workers, device=device,
                        batch_size=32, progress=False)
    t = m["timing"]
    tiles = m["counts"]["tiles"]
    return {"workers": workers, "tiles": tiles, "wall_s": t["wall_s"], "tiles_per_s": tiles / t["wall_s"],
            "decode_s": t["decode_s"], "model_s": t["model_s"], "plan_s": t["plan_s"], "write_s": t["write_s"],
            "decode_share": t["decode_s"] / (t["decode_s"] + t["model_s"]),
            "model_share": t["model_s"] / (t["decode_s"] + t["model_s"])}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="vit_small_patch16_224", help="timm name of the tile encoder (random weights)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "wsi_tiles.json")
    args = ap.parse_args(argv)
    import multiprocessing as mp

    from encoders import build_encoder

    prep_enc = build_encoder("vit_tile_tiny", img_size=224)  # only its preprocess (resize + ImageNet mean/std)
    prep = prep_enc.preprocess
    results = []
    with tempfile.TemporaryDirectory(prefix="medmm_wsi_bench_") as tmp:
        x6 = make_cmu_x6(Path(tmp))
        slides = [("CMU-1-Small-Region.svs (JPEG, OpenSlide)", SHARED / "CMU-1-Small-Region.svs", None, "openslide"),
                  ("tcga-cr-7395 (JPEG 2000, OpenSlide)", SHARED / "tcga-cr-7395-01a-01-ts1.svs", 0.25, "openslide"),
                  ("cmu_x6.tif (JPEG pyramid, tifffile)", x6, None, "tifffile"),
                  ("cmu_x6.tif (JPEG pyramid, OpenSlide)", x6, None, "openslide")]
        # Decode runs with one intra-op thread, as in DataLoader workers: per-tile torch ops with contended
        # threads are what a busy machine punishes, and that is not what this compares.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        pool = mp.get_context("spawn").Pool(args.workers)
        pool.apply(np.zeros, (1,))
        pool_start = time.perf_counter() - t0
        for name, path, smpp, backend in slides:
            st = WsiSettings(slide_mpp=smpp, backend=backend)
            choice, coords = plan(path, smpp, backend)
            runs = {"naive": [], "medmm_1": [], "medmm_1_read": [], "medmm_N": []}
            same = None
            naive(path, choice, coords[:8])  # warm-up: imports, page cache, decoder set-up
            medmm_single(path, st, choice, coords[:8], prep)
            medmm_workers(pool, path, st, choice, coords[:8 * args.workers], prep, args.workers, chunk=8)
            for _ in range(args.repeats):
                s_n, b_n = naive(path, choice, coords)
                r1 = medmm_single(path, st, choice, coords, prep)
                rn = medmm_workers(pool, path, st, choice, coords, prep, args.workers)
                runs["naive"].append(s_n)
                runs["medmm_1"].append(r1["seconds"])
                runs["medmm_1_read"].append(r1["read_s"])
                runs["medmm_N"].append(rn["seconds"])
                same = bool(torch.equal(r1["batch"], rn["batch"]))
                max_diff = float((r1["batch"] - b_n).abs().max())
            med = {k: statistics.median(v) for k, v in runs.items()}
            n = len(coords)
            res = {"slide": name, "tiles": n, "level": choice.level, "read_size": choice.read_size,
                   "median_s": med, "tiles_per_s": {k: n / med[k] for k in ("naive", "medmm_1", "medmm_N")},
                   "medmm_1_read_share": med["medmm_1_read"] / med["medmm_1"],
                   "speedup_N_vs_1": med["medmm_1"] / med["medmm_N"],
                   "speedup_medmm_1_vs_naive": med["naive"] / med["medmm_1"],
                   "workers_equal_single": same, "max_abs_diff_vs_naive": max_diff}
            results.append(res)
            tp = res["tiles_per_s"]
            print(f"{name}: {n} tiles; naive {tp['naive']:.0f}/s, medmm 1 proc {tp['medmm_1']:.0f}/s, "
                  f"medmm {args.workers} workers {tp['medmm_N']:.0f}/s (x{res['speedup_N_vs_1']:.2f})", flush=True)
        pool.close()
        pool.join()
        torch.set_num_threads(threads)
        e2e = []
        if not args.skip_e2e:
            for w in (0, args.workers):
                reps = [end_to_end(x6, w, args.model, args.device) for _ in range(max(1, args.repeats - 2))]
                best = sorted(reps, key=lambda r: r["wall_s"])[len(reps) // 2]
                e2e.append(best)
                print(f"end to end ({args.model}, workers={w}): {best['tiles_per_s']:.1f} tiles/s, decode "
                      f"{best['decode_share']:.0%} / model {best['model_share']:.0%}", flush=True)
    payload = {
        "benchmark": "wsi_tiles", "workers": args.workers, "repeats": args.repeats, "pool_start_s": pool_start,
        "target": "0.5 µm/px, 224 px tiles, every grid tile (min_tissue=0)", "decode": results,
        "end_to_end": {"model": args.model, "runs": e2e},
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg(), "platform": platform.platform(),
                    "cuda": torch.cuda.is_available()},
        "versions": {"torch": torch.__version__, "openslide": _v("openslide-python"),
                     "openslide-bin": _v("openslide-bin"), "tifffile": _v("tifffile"),
                     "imagecodecs": _v("imagecodecs")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    big = next(r for r in results if r["slide"].startswith("cmu_x6.tif (JPEG pyramid, tifffile)"))
    tp = big["tiles_per_s"]
    line = (f"wsi_tiles: slide->encoder input {tp['medmm_1']:.0f} tiles/s in 1 process, {tp['medmm_N']:.0f} with "
            f"{args.workers} workers (x{big['speedup_N_vs_1']:.2f}); naive openslide+torchvision loop "
            f"{tp['naive']:.0f} tiles/s ({big['tiles']} tiles, cmu_x6.tif)")
    if e2e:
        one = e2e[0]
        line += (f"; with {args.model} features: {one['tiles_per_s']:.1f} tiles/s, decode {one['decode_share']:.0%} / "
                 f"model {one['model_share']:.0%} of time")
    print(line)


def _v(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
