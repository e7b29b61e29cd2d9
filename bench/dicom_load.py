"""DICOM series -> volume benchmark: medmm ``read_series`` vs MONAI ``LoadImage(reader="PydicomReader")`` vs bare pydicom.

All three readers get the same ``.dcm`` files and produce a float32 volume in modality units (HU):

* medmm: ``medmm.io.dicom.read_series(folder, files=[...])`` -> ``(1, D, H, W)`` MetaTensor + report
  (per file: ``dcmread`` + ``pixel_array`` + modality LUT + header metadata; ordering along the slice normal);
* MONAI 1.6: ``LoadImage(reader="PydicomReader", fname_regex=r".*\\.dcm$", image_only=True)(folder)``; the
  folder is read as one series (a list of files would be stacked as channels instead), the regex restricts it
  to the same ``.dcm`` files; slices sorted by InstanceNumber, rescale slope/intercept applied, ``(W, H, D)``;
* bare pydicom: ``dcmread`` + ``pixel_array`` per file, sorted by ImagePositionPatient z, ``np.stack``, then
  one in-place ``slope * x + intercept`` in float32 (the floor: no metadata, no checks).

Datasets: the real 28-slice GE head CT with gantry tilt (``/work/shared/data/dicom/ct_series_head_GE_tilt``,
its LICENSE/README text files excluded), and a synthetic series of ``--slices`` slices written to a temp dir
from pydicom's ``CT_small.dcm`` (upsampled to ``--size`` px, shuffled file names, z positions 1 mm apart).

Timing: one warm-up call per reader, then ``--repeats`` rounds with the readers interleaved; medians are
reported. Sanity checks: medmm and bare volumes equal in value and in (D, H, W) order; MONAI's volume has the
same shape (after moving its axes to (D, H, W)) and the same slices. Goals: medmm >= 2x faster than MONAI
and within 1.2x of bare pydicom. Writes ``bench/results/dicom_load.json``; the last printed line is the
headline.

Run::

    python bench/dicom_load.py                         # defaults: --slices 200 --size 512 --repeats 5
    python bench/dicom_load.py --slices 100 --repeats 3 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import platform
import pstats
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL_DIR = Path("/work/shared/data/dicom/ct_series_head_GE_tilt")
OUT_JSON = ROOT / "bench" / "results" / "dicom_load.json"
MONAI_REGEX = r".*\.dcm$"


def dcm_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")


def make_synthetic(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` slices of CT_small.dcm (upsampled to ``size`` px), 1 mm apart, one series, shuffled file names."""
    import pydicom
    from pydicom.uid import generate_uid

    from medmm.io.dicom import pydicom_test_files

    src = pydicom.dcmread(pydicom_test_files() / "CT_small.dcm")  # read from the wheel, never downloaded
    arr = src.pixel_array
    if size and size != arr.shape[0]:
        f = max(1, size // arr.shape[0])
        arr = np.kron(arr, np.ones((f, f), arr.dtype))
        src.Rows, src.Columns = arr.shape
        src.PixelSpacing = [float(v) / f for v in src.PixelSpacing]
    src.PixelData = np.ascontiguousarray(arr).tobytes()
    src.SeriesInstanceUID = generate_uid()
    x, y, z0 = (float(v) for v in src.ImagePositionPatient)
    names = [f"{i:05d}" for i in range(n)]
    random.Random(seed).shuffle(names)
    rng = np.random.default_rng(seed)
    for i in range(n):
        # vary pixels per slice so that a wrong slice order is visible in the sanity check
        src.PixelData = np.ascontiguousarray(arr + np.int16(rng.integers(0, 50))).tobytes()
        src.InstanceNumber = i + 1
        src.ImagePositionPatient = [x, y, z0 + i * 1.0]
        src.SliceLocation = z0 + i * 1.0
        src.SOPInstanceUID = generate_uid()
        src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
        src.save_as(folder / f"img_{names[i]}.dcm", enforce_file_format=True)


def load_medmm(folder: Path, files: list[Path]) -> np.ndarray:
    from medmm.io.dicom import read_series

    vol, report = read_series(folder, files=files)
    assert report.slices == len(files) and not report.rejected, report
    return vol.numpy()[0]  # (D, H, W)


def make_monai_loader():
    from monai.transforms import LoadImage

    return LoadImage(reader="PydicomReader", image_only=True, fname_regex=MONAI_REGEX)


def load_monai(loader, folder: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = loader(str(folder))
    return np.asarray(img)  # (W, H, D) with MONAI's default swap_ij


def load_bare(files: list[Path]) -> np.ndarray:
    import pydicom

    dss = [pydicom.dcmread(p) for p in files]
    dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    vol = np.stack([d.pixel_array for d in dss])
    d0 = dss[0]
    slope, icpt = float(d0.get("RescaleSlope", 1.0)), float(d0.get("RescaleIntercept", 0.0))
    out = vol.astype(np.float32)
    out *= np.float32(slope)
    out += np.float32(icpt)
    return out


def sanity(med: np.ndarray, mon: np.ndarray, bare: np.ndarray) -> dict:
    mon_dhw = np.ascontiguousarray(np.transpose(mon, (2, 1, 0)))  # (W, H, D) -> (D, H, W)
    out = {
        "shape_medmm": list(med.shape),
        "shape_bare": list(bare.shape),
        "shape_monai_raw": list(mon.shape),
        "shape_monai_dhw": list(mon_dhw.shape),
        "medmm_equals_bare": bool(med.shape == bare.shape and med.dtype == bare.dtype and np.array_equal(med, bare)),
        "monai_same_shape": bool(mon_dhw.shape == med.shape),
    }
    # MONAI orders by InstanceNumber: compare as a set of slices, and report whether the order also matches
    if out["monai_same_shape"]:
        key = lambda v: sorted(v.reshape(v.shape[0], -1).astype(np.float64).sum(1).tolist())  # noqa: E731
        out["monai_same_slices"] = bool(np.allclose(key(mon_dhw), key(med)))
        out["monai_same_order"] = bool(np.allclose(mon_dhw, med))
    return out


def bench(name: str, folder: Path, repeats: int) -> dict:
    files = dcm_files(folder)
    loader = make_monai_loader()
    readers = {
        "medmm": lambda: load_medmm(folder, files),
        "monai": lambda: load_monai(loader, folder),
        "bare_pydicom": lambda: load_bare(files),
    }
    outs = {k: fn() for k, fn in readers.items()}  # warm-up (imports, page cache) and sanity outputs
    check = sanity(outs["medmm"], outs["monai"], outs["bare_pydicom"])
    times: dict[str, list[float]] = {k: [] for k in readers}
    for r in range(repeats):
        order = list(readers) if r % 2 == 0 else list(reversed(readers))  # interleave, alternate order
        for k in order:
            t = time.perf_counter()
            readers[k]()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {
        "dataset": name,
        "folder": str(folder),
        "files": len(files),
        "slices": int(outs["medmm"].shape[0]),
        "shape_dhw": list(outs["medmm"].shape),
        "median_s": med,
        "all_s": times,
        "speedup_vs_monai": med["monai"] / med["medmm"],
        "ratio_vs_bare": med["medmm"] / med["bare_pydicom"],
        "sanity": check,
    }
    res["goal_2x_vs_monai"] = res["speedup_vs_monai"] >= 2.0
    res["goal_within_1p2x_bare"] = res["ratio_vs_bare"] <= 1.2
    print(f"[{name}] {res['slices']} slices {tuple(res['shape_dhw'])}: medmm {med['medmm']:.3f} s, "
          f"monai {med['monai']:.3f} s ({res['speedup_vs_monai']:.2f}x faster, goal >=2x: "
          f"{'met' if res['goal_2x_vs_monai'] else 'NOT met'}), bare pydicom {med['bare_pydicom']:.3f} s "
          f"({res['ratio_vs_bare']:.2f}x, goal <=1.2x: {'met' if res['goal_within_1p2x_bare'] else 'NOT met'})")
    print(f"[{name}] sanity: {check}")
    return res


def profile_medmm(folder: Path, top: int = 15) -> str:
    files = dcm_files(folder)
    load_medmm(folder, files)
    pr = cProfile.Profile()
    pr.enable()
    load_medmm(folder, files)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(top)
    return s.getvalue()


def versions() -> dict:
    import monai
    import pydicom
    import torch

    v = {"python": platform.python_version(), "numpy": np.__version__, "pydicom": pydicom.__version__,
         "monai": monai.__version__, "torch": torch.__version__, "platform": platform.platform()}
    try:
        import medmm

        v["medmm"] = getattr(medmm, "__version__", "?")
    except Exception:  # pragma: no cover
        v["medmm"] = "?"
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real-dir", type=Path, default=REAL_DIR)
    ap.add_argument("--slices", type=int, default=200, help="synthetic series length (0: skip)")
    ap.add_argument("--size", type=int, default=512, help="synthetic slice size in px (CT_small is 128)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of medmm on the real series")
    ap.add_argument("--out", type=Path, default=OUT_JSON)
    args = ap.parse_args()
    logging.getLogger("medmm").setLevel(logging.ERROR)  # tilt/uneven-spacing warnings are expected here

    results = []
    if args.real_dir.is_dir():
        results.append(bench("real_GE_head_tilt", args.real_dir, args.repeats))
    else:
        print(f"real series not found at {args.real_dir}; skipped")
    with tempfile.TemporaryDirectory(prefix="medmm_dicom_bench_") as tmp:
        if args.slices > 0:
            make_synthetic(Path(tmp), args.slices, args.size)
            results.append(bench(f"synthetic_CT_small_{args.slices}x{args.size}", Path(tmp), args.repeats))
        if args.profile:
            print(profile_medmm(args.real_dir if args.real_dir.is_dir() else Path(tmp)))

    payload = {
        "benchmark": "dicom_load",
        "repeats": args.repeats,
        "timing": "warm-up once, then median of interleaved repeats (page cache warm)",
        "results": results,
        "goals_met": {r["dataset"]: {"2x_vs_monai": r["goal_2x_vs_monai"], "within_1.2x_bare": r["goal_within_1p2x_bare"]}
                      for r in results},
        "sanity_ok": all(r["sanity"]["medmm_equals_bare"] and r["sanity"]["monai_same_shape"] for r in results),
        "versions": versions(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    h = results[0]
    m = h["median_s"]
    print(f"dicom_load: medmm {m['medmm']:.2f} s, monai {m['monai']:.2f} s ({h['speedup_vs_monai']:.1f}x faster), "
          f"bare pydicom {m['bare_pydicom']:.2f} s ({h['ratio_vs_bare']:.1f}x) on {h['slices']} slices"
          + "".join(f"; {r['slices']}-slice synthetic: {r['speedup_vs_monai']:.1f}x vs monai, "
                    f"{r['ratio_vs_bare']:.1f}x vs bare" for r in results[1:]))


if __name__ == "__main__":
    main()
