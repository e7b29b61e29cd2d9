"""``medmm prepare dicom``: a DICOM tree of any size -> de-identified, preprocessed webdataset shards.

Stages (each with a progress bar; stages 1 and 2 run in ``--workers`` processes):

1. scan: read every file's header; a file that is not DICOM, is truncated or has no pixels goes to
   ``errors.jsonl`` (path, error, message) and the job goes on; ``BurnedInAnnotation=YES`` images are
   skipped and listed;
2. series: group by SeriesInstanceUID + orientation + frame of reference; a series of slices becomes
   a volume (ordered by position along the normal, MONAI ``Spacing`` onto an orthogonal grid, which
   undoes gantry tilt), a single image stays 2D; windowed to [0, 1] and resized;
3. write: ``OUT/shard-000000.tar`` ... (``<key>.npz`` float16 array, ``<key>.json`` de-identified
   metadata, ``<key>.txt`` the paired report), ``OUT/manifest.json`` (counts), ``OUT/errors.jsonl``,
   and ``OUT/<task>_train.jsonl`` / ``_eval.jsonl`` conversations that point at ``shard.tar#key.npz``.

De-identification (PS3.15 Basic Profile, :mod:`medmm.io.deid`) is on unless ``keep_phi``: shard keys
and metadata hold only pseudonymous UIDs, and nothing written names the patient. Reports are joined
on the original StudyInstanceUID or AccessionNumber before identifiers are dropped; report text is
the user's and is written as given.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import random
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DicomError, InvalidInputError
from ..utils import atomic_write_text, write_jsonl

log = logging.getLogger(__name__)


@dataclass
class DicomPrepareOptions:
    """How ``prepare dicom`` preprocesses and protects."""

    window: str | None = None
    """Window preset (lung, mediastinum, bone, brain, abdomen); None = the file's VOI window or min-max."""
    spacing: tuple[float, float, float] | None = None
    """Resample volumes to this spacing in mm (slice, row, column) before resizing; None keeps the grid."""
    size_2d: int = 224
    """Side of 2D images."""
    size_3d: tuple[int, int, int] = (32, 128, 128)
    """(D, H, W) of volumes."""
    keep_phi: bool = False
    """Write original identifiers (off by default)."""
    salt: str = "medmm-default-salt"
    """Secret that fixes pseudonyms, UID mapping and date shifts; the same salt gives the same mapping."""
    task: str = "report"
    """report | vqa: what the CSV pairs with each study."""
    workers: int = 1
    """Worker processes."""
    shard_maxcount: int = 1000
    """Samples per shard."""
    eval_fraction: float = 0.2
    """Share of studies held out for evaluation (split by study)."""
    seed: int = 0
    extra_meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- stage 1: headers


def _header(path: str) -> dict:
    """Header facts needed for grouping, or an error record."""
    import pydicom

    from ..io.deid import burned_in

    try:
        ds = pydicom.dcmread(path, defer_size=1024)  # large values (pixel data) stay on disk
    except Exception as e:  # not DICOM, truncated header
        return {"path": path, "error": "DicomError", "message": f"not a readable DICOM file ({type(e).__name__}: {e})"}
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        return {"path": path, "error": "DicomError",
                "message": f"no pixel data (modality {ds.get('Modality', '?')}, SOP class {ds.get('SOPClassUID', '?')})"}
    if burned_in(ds):
        return {"path": path, "error": "BurnedInAnnotation", "message": "BurnedInAnnotation=YES: skipped, not shared"}
    ori = ds.get("ImageOrientationPatient")
    return {
        "path": path,
        "study": str(ds.get("StudyInstanceUID", "")),
        # a file without SeriesInstanceUID stands alone rather than merging with other such files
        "series": str(ds.get("SeriesInstanceUID", "")) or f"no-series:{path}",
        "accession": str(ds.get("AccessionNumber", "")),
        "for": str(ds.get("FrameOfReferenceUID", "")),
        "orientation": tuple(round(float(v), 3) for v in ori) if ori else None,
        "frames": int(ds.get("NumberOfFrames", 1) or 1),
        "modality": str(ds.get("Modality", "")),
    }


# ----------------------------------------------------------------------------- stage 2: series -> sample


def _npz_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, arr=arr)
    return buf.getvalue()


def _image_2d(frame: np.ndarray, is_color: bool, opts: DicomPrepareOptions, meta: dict):
    """One frame (modality units or RGB in [0, 1]) -> windowed, resized (S, S[, 3]) array + geometry."""
    import torch

    from ..io.dicom import window

    arr = np.clip(frame, 0, 1) if is_color else window(frame, opts.window, meta.get("window"))
    t = torch.from_numpy(np.ascontiguousarray(arr)).float()
    t = t.permute(2, 0, 1) if t.ndim == 3 else t[None]
    s = opts.size_2d
    t = torch.nn.functional.interpolate(t[None], size=(s, s), mode="bilinear", antialias=True)[0]
    out = t.permute(1, 2, 0).numpy() if t.shape[0] == 3 else t[0].numpy()
    return out, {"pixel_spacing": meta.get("pixel_spacing"), "source_shape": list(frame.shape[:2])}


def _series_sample(args) -> dict:
    """One series -> {"sample": ..., "errors": [...]} (runs in a worker)."""
    import pydicom
    import torch

    from ..io.deid import deidentify, pseudonym
    from ..io.dicom import read_dicom, read_series, window

    paths, opts = args
    errors: list[dict] = []
    try:
        first = pydicom.dcmread(paths[0], stop_before_pixels=True)
        single = len(paths) == 1
        if single:
            img = read_dicom(paths[0])
            if img.pixels.shape[0] > 1 and not img.is_color:
                vol, report = read_series(paths[0])
                kind = "volume"
            else:
                kind = "image"
                frame = img.pixels[img.pixels.shape[0] // 2]
                out, geometry = _image_2d(frame, img.is_color, opts, img.meta)
        else:
            vol, report = read_series(Path(paths[0]).parent, series_uid=str(first.get("SeriesInstanceUID", "")),
                                      files=[Path(p) for p in paths])
            kind = "volume"
            errors.extend(report.rejected)
            if report.slices == 1:  # the other files of the series were rejected: a single image remains
                kind = "image"
                from ..io.dicom import _file_window

                out, geometry = _image_2d(vol.numpy()[0, 0], False, opts, {"window": _file_window(first)})
        if kind == "volume":
            from monai.transforms import Resize, Spacing

            from ..io.dicom import _file_window

            data = window(vol.numpy()[0], opts.window, _file_window(first))
            vol = vol.__class__(torch.from_numpy(data)[None], affine=vol.affine)
            if opts.spacing:
                vol = Spacing(pixdim=opts.spacing, diagonal=True, mode="bilinear")(vol)
            out = torch.as_tensor(Resize(tuple(opts.size_3d), mode="trilinear")(vol))[0].numpy()
            geometry = {"spacing": list(report.spacing or []), "slices": report.slices,
                        "uneven_spacing": report.uneven_spacing, "gap_positions": report.gap_positions,
                        "gantry_tilt_deg": round(report.gantry_tilt_deg, 3), "resampled_to": opts.spacing}
    except InvalidInputError as e:
        return {"sample": None, "errors": errors + [e.to_record()]}
    except Exception as e:  # a decoder or geometry failure is this series' problem, not the job's
        return {"sample": None, "errors": errors + [{"path": paths[0], "error": type(e).__name__, "message": str(e)}]}

    study, series = str(first.get("StudyInstanceUID", "")), str(first.get("SeriesInstanceUID", ""))
    meta = {"kind": kind, "modality": str(first.get("Modality", "")), "shape": list(out.shape),
            "window": opts.window, "files": len(paths), **geometry}
    if opts.keep_phi:
        meta.update({"study_uid": study, "series_uid": series, "patient_id": str(first.get("PatientID", "")),
                     "accession": str(first.get("AccessionNumber", ""))})
        key = pseudonym("keep-phi", series or paths[0], 24)
    else:
        hdr = copy.deepcopy(first)  # Dataset.copy() shares elements: de-identifying it would alter `first`
        info = deidentify(hdr, opts.salt)
        meta.update({"study_uid": str(hdr.get("StudyInstanceUID", "")), "series_uid": str(hdr.get("SeriesInstanceUID", "")),
                     "patient": info["patient_pseudonym"], "study_date": str(hdr.get("StudyDate", "")),
                     "body_part": str(hdr.get("BodyPartExamined", ""))})
        key = pseudonym(opts.salt, "series|" + (series or paths[0]), 24)
    return {"sample": {"key": key, "npz": _npz_bytes(out.astype(np.float16)), "meta": meta,
                       "orig_study": study, "orig_accession": str(first.get("AccessionNumber", ""))},
            "errors": errors}


# ----------------------------------------------------------------------------- driver


def _read_pairs(csv_path: Path | None, task: str) -> dict[str, list[dict]]:
    """CSV rows keyed by study (column ``study_uid`` or ``accession``): report -> [{report}], vqa -> [{q, a}]."""
    if csv_path is None:
        return {}
    out: dict[str, list[dict]] = defaultdict(list)
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        key_col = "study_uid" if "study_uid" in cols else "accession" if "accession" in cols else None
        need = {"report"} if task == "report" else {"question", "answer"}
        if key_col is None or not need <= cols:
            raise InvalidInputError(csv_path, f"needs a 'study_uid' or 'accession' column and {sorted(need)}; "
                                              f"has {sorted(cols)}")
        for row in reader:
            out[row[key_col].strip()].append(row)
    return out


def prepare_dicom(src: str | Path, out: str | Path, reports: str | Path | None = None,
                  options: DicomPrepareOptions | None = None) -> dict:
    """Run the three stages; returns the manifest."""
    import webdataset as wds
    from tqdm.auto import tqdm

    opts = options or DicomPrepareOptions()
    src, out = Path(src), Path(out)
    if not src.exists():
        raise InvalidInputError(src, "source folder not found")
    if opts.keep_phi:
        log.warning("--keep-phi: original identifiers are written to %s; handle it as PHI", out)
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p) for p in src.rglob("*") if p.is_file()) if src.is_dir() else [str(src)]
    pairs = _read_pairs(Path(reports) if reports else None, opts.task)

    pool = ProcessPoolExecutor(opts.workers) if opts.workers > 1 else None
    mapper = pool.map if pool else map
    try:
        headers = list(tqdm(mapper(_header, files, chunksize=16) if pool else map(_header, files), total=len(files),
                            desc="scan", unit="file"))
        errors = [h for h in headers if "error" in h]
        groups: dict[tuple, list[str]] = defaultdict(list)
        for h in headers:
            if "error" not in h:
                groups[(h["series"], h["orientation"], h["for"])].append(h["path"])
        jobs = [(sorted(v), opts) for v in groups.values()]
        results = tqdm(mapper(_series_sample, jobs) if pool else map(_series_sample, jobs), total=len(jobs),
                       desc="series", unit="series")
        pattern = str(out / "shard-%06d.tar")
        samples = []
        with wds.ShardWriter(pattern, maxcount=opts.shard_maxcount, verbose=0) as sink:
            for res in results:
                errors.extend(res["errors"])
                s = res["sample"]
                if s is None:
                    continue
                text = ""
                rows = pairs.get(s["orig_study"]) or pairs.get(s["orig_accession"]) or []
                if opts.task == "report" and rows:
                    text = rows[0]["report"]
                record = {"__key__": s["key"], "npz": s["npz"], "json": json.dumps(s["meta"]).encode()}
                if text:
                    record["txt"] = text.encode()
                sink.write(record)
                samples.append({"key": s["key"], "shard": Path(sink.fname).name, "meta": s["meta"], "rows": rows,
                                "study": s["meta"]["study_uid"]})
    finally:
        if pool:
            pool.shutdown()

    # conversations, split by (pseudonymous) study
    studies = sorted({s["study"] for s in samples})
    random.Random(opts.seed).shuffle(studies)
    n_eval = int(round(len(studies) * opts.eval_fraction)) if len(studies) > 1 else 0
    eval_studies = set(studies[:n_eval])
    train, evals = [], []
    for s in samples:
        modality = "image" if s["meta"]["kind"] == "image" else "volume"
        ref = f"{s['shard']}#{s['key']}.npz"
        if opts.task == "report":
            if not s["rows"]:
                continue
            convs = [[{"from": "human", "value": f"<{modality}>\nWrite the radiology report."},
                      {"from": "gpt", "value": s["rows"][0]["report"]}]]
        else:
            convs = [[{"from": "human", "value": f"<{modality}>\n{r['question']}"}, {"from": "gpt", "value": r["answer"]}]
                     for r in s["rows"]]
        for i, conv in enumerate(convs):
            rec = {"id": f"{s['key']}-{i}", "modalities": {modality: ref}, "conversations": conv}
            (evals if s["study"] in eval_studies else train).append(rec)
    write_jsonl(out / f"{opts.task}_train.jsonl", train)
    write_jsonl(out / f"{opts.task}_eval.jsonl", evals)
    write_jsonl(out / "errors.jsonl", errors)
    kinds = defaultdict(int)
    for s in samples:
        kinds[s["meta"]["kind"]] += 1
    manifest = {
        "source": str(src) if opts.keep_phi else src.name, "files_seen": len(files),
        "files_rejected": sum(1 for e in errors if e.get("error") != "BurnedInAnnotation"),
        "burned_in_skipped": sum(1 for e in errors if e.get("error") == "BurnedInAnnotation"),
        "series": len(samples), "studies": len(studies), "by_kind": dict(kinds),
        "shards": sorted({s["shard"] for s in samples}), "train_records": len(train), "eval_records": len(evals),
        "deidentified": not opts.keep_phi, "task": opts.task,
        "options": {"window": opts.window, "spacing": opts.spacing, "size_2d": opts.size_2d,
                    "size_3d": list(opts.size_3d)},
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    return manifest


def read_shard_array(ref: str, base_dir: Path | None = None) -> np.ndarray:
    """``shard-000000.tar#key.npz`` (or a plain .npz/.npy path) -> the stored array."""
    import tarfile

    path, _, member = str(ref).partition("#")
    p = Path(path)
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    if not p.exists():
        raise InvalidInputError(p, "array file not found")
    if member:
        index = _TAR_INDEX.get(str(p))
        if index is None:
            with tarfile.open(p) as tf:
                index = {m.name: (m.offset_data, m.size) for m in tf.getmembers()}
            _TAR_INDEX[str(p)] = index
        if member not in index:
            raise InvalidInputError(f"{p}#{member}", "member not in the shard")
        off, size = index[member]
        with open(p, "rb") as f:
            f.seek(off)
            data = f.read(size)
        src = io.BytesIO(data)
    else:
        src = p
    try:
        loaded = np.load(src)
        return loaded["arr"] if hasattr(loaded, "files") else loaded
    except Exception as e:
        raise DicomError(ref, f"stored array cannot be read ({e})") from e


_TAR_INDEX: dict[str, dict] = {}
