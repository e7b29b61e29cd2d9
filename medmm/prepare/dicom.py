"""``medmm prepare dicom``: a DICOM tree of any size -> de-identified, preprocessed webdataset shards.

Stages (each with a progress bar; stages 1 and 2 run in ``--workers`` processes):

1. scan: read every file's header (through :class:`~medmm.io.dicom.HeaderReader`); a file that is not
   DICOM or is truncated goes to ``errors.jsonl`` (path, error, message) and the job goes on; objects
   without pixels (DICOMDIR, SR, RT plans) and ``BurnedInAnnotation=YES`` images are skipped and listed;
   what is not a regular file (a FIFO, device, socket, dangling link, link loop) is rejected without being
   opened, and a link to a folder is listed as skipped, not followed (:func:`medmm.io.files.walk_entries`);
2. series: group by SeriesInstanceUID + frame of reference; :func:`~medmm.io.dicom.assemble_series` keeps
   exact duplicates once, splits slices sharing positions by acquisition/echo/temporal position, splits
   orientations, and reports missing slices (``on_gap``: keep, split, reject). A stack of slices becomes a
   volume (ordered by position along the normal, MONAI ``Spacing`` onto an orthogonal grid, which undoes
   gantry tilt), a single image stays 2D; windowed to [0, 1] and resized, by the transforms of
   :mod:`medmm.modalities.volume` and :mod:`medmm.modalities.image` that serving applies to raw inputs too;
3. write: ``OUT/shard-000000.tar`` ... (``<key>.npz`` float16 array, ``<key>.json`` de-identified
   metadata with the transform's options under ``preprocess``, ``<key>.txt`` the paired report),
   ``OUT/manifest.json`` (counts, ``preprocess``: the transforms' options, which training copies into the
   checkpoint, and ``series_outcomes``:
   per series ``outcome`` kept/split/rejected, ``reason``, ``duplicates_dropped``, ``gap_positions``),
   ``OUT/files.jsonl`` (one line per source file: ``path``, ``outcome`` written/rejected/skipped,
   ``series`` the sample key it went into, ``error``/``message`` when rejected, ``reason`` when skipped,
   ``fallbacks`` the header fallbacks taken), ``OUT/errors.jsonl`` and ``OUT/<task>_train.jsonl`` /
   ``_eval.jsonl`` conversations that point at ``shard.tar#key.npz``. Each shard sample also carries its
   conversations, modality and train/eval ``split`` (``<key>.conversations.json``), so training can stream the
   shards alone (``format: wds``, :mod:`medmm.data.streaming`). The split is by patient (PatientID; a study
   without one is its own group): a keyed hash of it, so no patient is in both splits.

Preparing in parts (``--num-shards N --shard-index I``, :mod:`medmm.prepare.parts`): every part scans every header
(stage 1 is cheap next to decoding), then keeps the series of the patients whose key hashes into it: a patient,
hence a study, is never split between parts; a file that joins no series falls in the part its path (relative to
the source) hashes into. The parts must share the salt (``--salt`` or ``$MEDMM_DEID_SALT``: a part refuses to
invent its own); its fingerprint goes into ``manifest.json`` and ``part.json`` for ``medmm prepare merge``.

No file and no series ends the job: every exception in a file or series (a worker process dying in a
decoder included) becomes a typed record in ``errors.jsonl`` and ``files.jsonl``.

De-identification (PS3.15 Basic Profile, :mod:`medmm.io.deid`) is on unless ``keep_phi``: shard keys
and metadata hold only pseudonymous UIDs, and nothing written names the patient. Reports are joined
on the original StudyInstanceUID or AccessionNumber before identifiers are dropped; report (and VQA)
text is de-identified too (:mod:`medmm.io.report_deid`: the study's header names, IDs, birth date and
institution, pattern-based PHI, dates shifted with the headers' offset) unless ``keep_report_phi``.
Without a salt, a random one is kept in ``OUT/.deid_salt`` (mode 0600) and reused by later runs.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import logging
import os
from collections import defaultdict, deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ..config import DicomPrepareOptions  # noqa: F401  (defined in medmm.config; imported from here too)
from ..errors import ConfigError, DicomError, InvalidInputError
from ..io.deid import pseudonym
from ..io.files import LINK_TO_FOLDER, check_regular_file, not_regular_reason, walk_entries
from ..modalities.image import ImageOptions, dicom_image
from ..modalities.volume import VolumeOptions, volume_array
from ..utils import atomic_write_text, write_jsonl
from .common import write_prepared
from .parts import Part, holds, salt_fingerprint, split_of, write_part

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- stage 1: headers


def _header(path: str) -> dict:
    """Header facts needed for grouping; or ``skip`` (no image: DICOMDIR, SR, RT plan, BurnedInAnnotation=YES), or
    an error record (path, error, message). Never raises: a file's problem is that file's record."""
    from ..io.dicom import ends_mid_element, has_pixels, is_dicomdir, pixel_data_unreached, read_header

    try:
        check_regular_file(path, DicomError)  # again here: the walk and this read are apart in time
        ds, reader = read_header(path)  # large values (pixel data) stay on disk
        if is_dicomdir(ds, reader):
            return {"path": path, "skip": "DICOMDIR: a media directory, it holds no image"}
        modality = reader.text("Modality")
        if not has_pixels(ds):
            sop_class = reader.uid("SOPClassUID")
            what = f"modality {modality or '?'}, SOP class {sop_class or '?'}"
            if ends_mid_element(ds, path):
                if _is_image_class(sop_class):  # an image cut before its pixels: the image is lost
                    return {"path": path, "error": "DicomError", "message": f"the file ends inside an element before "
                                                                            f"any pixel data: truncated ({what})"}
                return {"path": path, "skip": f"no pixel data (truncated; {what})"}
            if pixel_data_unreached(ds, path):
                return {"path": path, "error": "DicomError", "message": f"the header is corrupt: the file holds pixel "
                                                                        f"data its header does not reach ({what})"}
            return {"path": path, "skip": f"no pixel data ({what})"}
        if reader.text("BurnedInAnnotation").strip().upper() == "YES":
            return {"path": path, "error": "BurnedInAnnotation", "message": "BurnedInAnnotation=YES: skipped, not shared",
                    "skip": "BurnedInAnnotation=YES: pixels may show identity, not shared"}
        series = reader.uid("SeriesInstanceUID")
        return {
            "path": path,
            "study": reader.uid("StudyInstanceUID"),
            "patient": reader.text("PatientID").strip(),
            # a file without a valid SeriesInstanceUID stands alone rather than merging with other such files
            "series": series or f"no-series:{path}",
            "accession": reader.text("AccessionNumber"),
            "for": reader.uid("FrameOfReferenceUID"),
            "modality": modality,
        }
    except DicomError as e:
        return e.to_record()
    except Exception as e:  # anything else is still this file's problem, not the job's
        return {"path": path, "error": "DicomError",
                "message": f"header cannot be read ({type(e).__name__}: {str(e)[:200]})"}


def _is_image_class(uid: str) -> bool:
    """True for an image storage SOP class (CT, MR, CR, secondary capture ...), by its registered name."""
    from pydicom.uid import UID

    return "Image Storage" in UID(uid).name if uid else False


def _headers(paths: list[str]) -> list[dict]:
    """A chunk of files -> their header records (one task for a worker)."""
    return [_header(p) for p in paths]


# ----------------------------------------------------------------------------- stage 2: series -> sample


def _npz_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, arr=arr)
    return buf.getvalue()


def volume_options(opts: DicomPrepareOptions) -> VolumeOptions:
    """The volume transform's options for these prepare options (recorded in the manifest and each sample)."""
    return VolumeOptions(window=opts.window, window_fallback=opts.window_fallback, spacing=opts.spacing,
                         size=tuple(opts.size_3d))


def image_options(opts: DicomPrepareOptions) -> ImageOptions:
    """The 2D transform's options for these prepare options (recorded in the manifest and each sample)."""
    return ImageOptions(window=opts.window, window_fallback=opts.window_fallback, size=opts.size_2d)


def _series_sample(args) -> dict:
    """One series -> ``{"samples", "errors", "files", "outcome", "series_key"}`` (runs in a worker; never raises).

    ``samples``: one per volume or image the series holds (:func:`~medmm.io.dicom.assemble_series`);
    ``files``: path -> its line of ``files.jsonl``; ``outcome``: the series' entry of ``series_outcomes``.
    """
    paths, opts, series, part = args
    try:
        return _assemble_sample(paths, opts, part)
    except Exception as e:  # a bug or a decoder failure is this series' problem, not the job's
        log.warning("series of %d files failed: %s", len(paths), type(e).__name__)
        return _failed_series(paths, opts, series, part, getattr(e, "reason", None) or _unexpected(e))


def _series_key(opts: DicomPrepareOptions, series: str, first_path: str, label: str = "") -> str:
    from ..io.deid import pseudonym

    base = series or first_path
    if label:
        base += "|" + label
    if opts.keep_phi:
        return pseudonym("keep-phi", base, 24)
    return pseudonym(opts.salt, "series|" + base, 24)


def _unexpected(e: BaseException) -> str:
    return f"unexpected {type(e).__name__}: {str(e)[:200]}"


def _failed_series(paths: list[str], opts: DicomPrepareOptions, series: str, part: str, message: str) -> dict:
    """Every file of a series rejected with one DicomError record (the series could not be assembled)."""
    errors = [{"path": p, "error": "DicomError", "message": message} for p in paths]
    return {"samples": [], "errors": errors,
            "files": {p: {"path": p, "outcome": "rejected", "series": None, "error": "DicomError", "message": message}
                      for p in paths},
            "series_key": _series_key(opts, series, paths[0] if paths else "", part),
            "outcome": {"outcome": "rejected", "reason": message, "duplicates_dropped": [], "gap_positions": [],
                        "volumes": [], "files": len(paths)}}


def _assemble_sample(paths: list[str], opts: DicomPrepareOptions, part: str) -> dict:
    from ..io.dicom import assemble_series, read_dicom

    images, errors, files = [], [], {}
    for p in paths:
        try:
            images.append((p, read_dicom(p)))
        except DicomError as e:
            rec = e.to_record()
            errors.append(rec)
            files[p] = {"path": p, "outcome": "rejected", "series": None, "error": rec["error"], "message": rec["message"]}
    if not images:
        res = _failed_series([], opts, "", "", "no file of the series could be read")
        res.update(errors=errors, files=files, series_key=_series_key(opts, "", paths[0], part))
        res["outcome"]["files"] = len(paths)
        return res
    asm = assemble_series(images, source=Path(paths[0]).parent, on_gap=opts.on_gap)
    series_uid = asm.series_uid
    series_key = _series_key(opts, series_uid, paths[0], part)
    for rec in asm.rejected:
        errors.append(rec)
        files[rec["path"]] = {"path": rec["path"], "outcome": "rejected", "series": None, "error": rec["error"],
                              "message": rec["message"]}
    fallbacks = {p: im.meta.get("fallbacks") or [] for p, im in images}
    header = _series_header(asm.volumes[0].paths[0], opts) if asm.volumes else None
    samples, keys = [], []
    for v in asm.volumes:
        key = series_key if len(asm.volumes) == 1 else _series_key(opts, series_uid, paths[0],
                                                                    "|".join(x for x in (part, v.label) if x))
        try:
            out, geometry, preprocess = _volume_array(v, opts)
        except Exception as e:  # one volume failing (resampling, memory) leaves the others
            msg = getattr(e, "reason", None) or _unexpected(e)
            for p in v.paths:
                errors.append({"path": p, "error": "DicomError", "message": msg})
                files[p] = {"path": p, "outcome": "rejected", "series": None, "error": "DicomError", "message": msg}
            continue
        attrs = sorted({f["attribute"] for p in v.paths for f in fallbacks.get(p, [])})
        meta = {"kind": v.kind, "modality": v.meta.get("modality", ""), "shape": list(out.shape),
                "window": opts.window, "files": len(v.paths), **geometry, **header["meta"],
                "preprocess": {"image" if v.is_color or v.kind == "image" else "volume": preprocess}}
        if v.label:
            meta["volume"] = v.label
        if attrs:
            meta["header_fallbacks"] = attrs
        samples.append({"key": key, "npz": _npz_bytes(out.astype(np.float16)), "meta": meta,
                        "orig_study": header["study"], "orig_accession": header["accession"], "phi": header["phi"]})
        keys.append(key)
        for p in v.paths:
            files[p] = {"path": p, "outcome": "written", "series": key}
    for p in asm.duplicates_dropped:
        kept = asm.duplicate_of.get(p, "")
        files[p] = {"path": p, "outcome": "skipped", "series": files.get(kept, {}).get("series"),
                    "reason": f"duplicate of {kept}"}
    for p, line in files.items():
        if fallbacks.get(p):
            line["fallbacks"] = fallbacks[p]
    outcome = "kept" if len(samples) == 1 else "split" if len(samples) > 1 else "rejected"
    reason = asm.reason or ("" if samples else "no volume of the series could be written")
    return {"samples": samples, "errors": errors, "files": files, "series_key": series_key,
            "outcome": {"outcome": outcome, "reason": reason, "duplicates_dropped": asm.duplicates_dropped,
                        "duplicate_of": asm.duplicate_of, "gap_positions": asm.gap_positions, "volumes": keys,
                        "files": len(paths)}}


def _series_header(path: str, opts: DicomPrepareOptions) -> dict:
    """What the samples of a series say about its study (de-identified unless keep_phi), the join keys for the
    reports, and the identifiers report text is cleaned of."""
    from ..io.deid import deidentify
    from ..io.dicom import HeaderReader, drop_unreadable, open_dataset, quiet_pydicom
    from ..io.report_deid import identifiers_from_header

    first = open_dataset(path, stop_before_pixels=True)
    drop_unreadable(first, path)  # whole-dataset walks below must not fail on one undecodable element
    reader = HeaderReader(first, path)
    study, series = reader.uid("StudyInstanceUID"), reader.uid("SeriesInstanceUID")
    accession = reader.text("AccessionNumber")
    if opts.keep_phi:
        meta = {"study_uid": study, "series_uid": series, "patient_id": reader.text("PatientID"), "accession": accession}
        return {"meta": meta, "study": study, "accession": accession, "phi": None}
    with quiet_pydicom():
        phi = identifiers_from_header(first)
        hdr = copy.deepcopy(first)  # Dataset.copy() shares elements: de-identifying it would alter `first`
        info = deidentify(hdr, opts.salt)
    out = HeaderReader(hdr, path)
    meta = {"study_uid": out.uid("StudyInstanceUID"), "series_uid": out.uid("SeriesInstanceUID"),
            "patient": info["patient_pseudonym"], "study_date": out.date("StudyDate"),
            "body_part": out.text("BodyPartExamined")}
    return {"meta": meta, "study": study, "accession": accession, "phi": phi}


def _volume_array(v, opts: DicomPrepareOptions):
    """A SeriesVolume -> (the modality's transform of it: float32 in [0, 1], geometry for the sample's metadata,
    the transform's options record). Single images and colour go through :func:`medmm.modalities.image.dicom_image`
    (read again from their one file, as a served DICOM image is), stacks through
    :func:`medmm.modalities.volume.volume_array`."""
    if v.is_color or v.kind == "image":
        io_opts = image_options(opts)
        out, meta = dicom_image(v.paths[0], io_opts)
        shape = v.array.shape[1:3] if v.is_color else v.array.shape[2:4]
        return out, {"pixel_spacing": meta.get("pixel_spacing"), "source_shape": list(shape)}, io_opts.to_record()
    vo = volume_options(opts)
    out = volume_array(v.array, v.meta.get("window"), vo)
    report = v.report
    geometry = {"spacing": list(report.spacing or []), "slices": report.slices,
                "uneven_spacing": report.uneven_spacing, "gap_positions": report.gap_positions,
                "missing_slices": sum(g["missing"] for g in report.gaps),
                "gantry_tilt_deg": round(report.gantry_tilt_deg, 3), "resampled_to": opts.spacing,
                "frame_order_only": report.frame_order_only}
    return out, geometry, vo.to_record()


def _run_jobs(fn, items: list, workers: int, on_error):
    """Yield ``fn(item)`` for each item, in order; an exception, or a worker process that died (a decoder
    crash), becomes ``on_error(item, exc)`` and the rest go on. With ``workers > 1`` at most ``2 * workers``
    items are in flight; the item whose worker died is retried alone once before it is given up."""
    if workers <= 1:
        for item in items:
            try:
                yield fn(item)
            except Exception as e:
                yield on_error(item, e)
        return
    from concurrent.futures.process import BrokenProcessPool

    todo = deque(items)
    flight: deque = deque()
    pool = ProcessPoolExecutor(workers)
    try:
        while todo or flight:
            while todo and len(flight) < 2 * workers:
                item = todo.popleft()
                flight.append((item, pool.submit(fn, item)))
            item, fut = flight.popleft()
            try:
                yield fut.result()
            except BrokenProcessPool:
                pool.shutdown(wait=False, cancel_futures=True)
                todo.extendleft(reversed([i for i, _ in flight]))  # resubmitted to a fresh pool
                flight.clear()
                yield _run_alone(fn, item, on_error)
                pool = ProcessPoolExecutor(workers)
            except Exception as e:
                yield on_error(item, e)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_alone(fn, item, on_error):
    """``fn(item)`` in a process of its own: a second crash is this item's error."""
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(1) as solo:
        try:
            return solo.submit(fn, item).result()
        except BrokenProcessPool as e:
            return on_error(item, RuntimeError(f"the worker process died while reading it ({e})"))
        except Exception as e:
            return on_error(item, e)


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
                  options: DicomPrepareOptions | None = None, part: Part | None = None) -> dict:
    """Run the three stages; returns the manifest. ``part``: only the patients (and loose files) that fall in this
    part of a sharded run."""
    import webdataset as wds
    from tqdm.auto import tqdm

    from ..io.dicom import ON_GAP

    opts = options or DicomPrepareOptions()
    if opts.on_gap not in ON_GAP:
        raise ConfigError(f"on_gap must be one of {', '.join(ON_GAP)}, not {opts.on_gap!r}")
    volume_options(opts), image_options(opts)  # a bad window, spacing or size is a ConfigError before any work
    src, out = Path(src), Path(out)
    if not src.exists():
        raise InvalidInputError(src, "source folder not found")
    if opts.keep_phi:
        log.warning("--keep-phi: original identifiers are written to %s; handle it as PHI", out)
    out.mkdir(parents=True, exist_ok=True)
    if not opts.keep_phi:
        from ..io.deid import SALT_ENV, SALT_FILE, resolve_salt
        from ..io.report_deid import deidentify_row

        if (part is not None and part.num_shards > 1 and not opts.salt and not os.environ.get(SALT_ENV)
                and not (out / SALT_FILE).exists()):
            # a salt of its own would give this part's patients other pseudonyms than the other parts give theirs
            raise ConfigError("prepare dicom --num-shards: the parts must share the de-identification salt: pass "
                              f"--salt, set ${SALT_ENV}, or put the same {SALT_FILE} in every part's --out")
        salt, how = resolve_salt(out, opts.salt)
        opts = dataclasses.replace(opts, salt=salt)
        if how == "new":
            log.warning("no --salt or $MEDMM_DEID_SALT: generated a secret salt in %s (mode 0600); keep it private, "
                        "and keep it (or this folder) to map the same patients alike next time", out / SALT_FILE)
        elif how == "file":
            log.warning("no --salt or $MEDMM_DEID_SALT: reusing the secret salt in %s", out / SALT_FILE)
        if opts.keep_report_phi:
            log.warning("--keep-report-phi: report text is written as given, with any identifiers it names")
    # every entry gets its files.jsonl line: a FIFO, device, socket, dangling link or link loop is never opened (a
    # FIFO would block the scan) and is rejected with why; links to folders are listed, not followed
    entries = walk_entries(src) if src.is_dir() else [(src, not_regular_reason(src))]
    files = [str(p) for p, _ in entries]
    odd = {str(p): why for p, why in entries if why}
    pairs = _read_pairs(Path(reports) if reports else None, opts.task)

    # stage 1: headers, in chunks (one task per chunk); a file's problem becomes its record
    regular = [p for p in files if p not in odd]
    chunks = [regular[i:i + 32] for i in range(0, len(regular), 32)]

    def chunk_failed(chunk, e):
        return [{"path": p, "error": "DicomError", "message": f"header scan failed ({_unexpected(e)})"} for p in chunk]

    headers = []
    with tqdm(total=len(regular), desc="scan", unit="file") as bar:
        for recs in _run_jobs(_headers, chunks, opts.workers, chunk_failed):
            headers.extend(recs)
            bar.update(len(recs))
    errors: list[dict] = []
    file_lines: dict[str, dict] = {}
    groups: dict[tuple, list[str]] = defaultdict(list)

    def mine(p: str) -> bool:  # a file outside any series: the part its path under the source hashes into
        return holds(part, "file " + Path(os.path.relpath(p, src)).as_posix())

    for p, why in odd.items():
        if not mine(p):
            continue
        if why == LINK_TO_FOLDER:
            file_lines[p] = {"path": p, "outcome": "skipped", "series": None, "reason": why}
        else:
            rec = DicomError(p, why).to_record()
            errors.append(rec)
            file_lines[p] = {"path": p, "outcome": "rejected", "series": None, "error": rec["error"],
                             "message": rec["message"]}
    for h in headers:
        p = h["path"]
        if ("skip" in h or "error" in h) and not mine(p):
            continue
        if "skip" in h:
            file_lines[p] = {"path": p, "outcome": "skipped", "series": None, "reason": h["skip"]}
            if "error" in h:  # burned-in annotation: listed in errors.jsonl as before
                errors.append({k: h[k] for k in ("path", "error", "message")})
        elif "error" in h:
            errors.append(h)
            file_lines[p] = {"path": p, "outcome": "rejected", "series": None, "error": h["error"],
                             "message": h["message"]}
        else:
            groups[(h["series"], h["for"])].append(p)
    # the train/eval split, by patient, decided before anything is written so that every shard sample can carry its
    # split (training streams the shards alone); the patient IDs and study UIDs here are the originals, never written
    group_of = _patient_keys([h for h in headers if "skip" not in h and "error" not in h])
    # stage 2: one job per series (orientations, acquisitions and gaps are sorted out inside it); a series
    # spread over several frames of reference is one job per frame of reference, told apart in its key
    n_for = defaultdict(int)
    for series, _ in groups:
        n_for[series] += 1
    groups = {g: v for g, v in groups.items() if holds(part, group_of[v[0]])}  # this part's patients
    grouped = {p for v in groups.values() for p in v}
    files = [p for p in files if p in file_lines or p in grouped]  # this part's files, in the walk's order
    jobs = [(sorted(v), opts, series, f"frame of reference {for_uid}" if n_for[series] > 1 else "")
            for (series, for_uid), v in groups.items()]
    split_by_job = [split_of(group_of[job[0][0]], opts.eval_fraction, opts.seed) for job in jobs]
    results = tqdm(_run_jobs(_series_sample, jobs, opts.workers,
                             lambda job, e: _failed_series(job[0], opts, job[2], job[3], _unexpected(e))),
                   total=len(jobs), desc="series", unit="series")
    series_outcomes: dict[str, dict] = {}
    pattern = str(out / "shard-%06d.tar")
    samples = []
    with wds.ShardWriter(pattern, maxcount=opts.shard_maxcount, verbose=0) as sink:
        for res, split in zip(results, split_by_job):
            errors.extend(res["errors"])
            file_lines.update(res["files"])
            series_outcomes[res["series_key"]] = res["outcome"]
            for s in res["samples"]:
                text = ""
                rows = pairs.get(s["orig_study"]) or pairs.get(s["orig_accession"]) or []
                if rows and s["phi"] is not None and not opts.keep_report_phi:
                    rows = [deidentify_row(r, s["phi"], opts.salt) for r in rows]
                if opts.task == "report" and rows:
                    text = rows[0]["report"]
                record = {"__key__": s["key"], "npz": s["npz"], "json": json.dumps(s["meta"]).encode()}
                if text:
                    record["txt"] = text.encode()
                # the sample carries its conversations, so training can stream the shards alone
                # (medmm.data.streaming); the array is this sample's ``npz``
                modality = "image" if s["meta"]["kind"] == "image" else "volume"
                record["conversations.json"] = json.dumps(
                    {"id": s["key"], "modality": modality, "split": split,
                     "conversations": _conversations(modality, opts.task, rows)}).encode()
                sink.write(record)
                samples.append({"key": s["key"], "shard": Path(sink.fname).name, "meta": s["meta"], "rows": rows,
                                "study": s["meta"]["study_uid"], "split": split})

    # conversations, split by study (the split each shard sample carries)
    studies = sorted({s["study"] for s in samples if s["study"]})  # a series without a StudyInstanceUID is no study
    train, evals = [], []
    for s in samples:
        modality = "image" if s["meta"]["kind"] == "image" else "volume"
        ref = f"{s['shard']}#{s['key']}.npz"
        for i, conv in enumerate(_conversations(modality, opts.task, s["rows"])):
            rec = {"id": f"{s['key']}-{i}", "modalities": {modality: ref}, "conversations": conv}
            (evals if s["split"] == "eval" else train).append(rec)
    write_jsonl(out / f"{opts.task}_train.jsonl", train)
    write_jsonl(out / f"{opts.task}_eval.jsonl", evals)
    write_jsonl(out / "errors.jsonl", errors)
    lines = [file_lines.get(p) or {"path": p, "outcome": "rejected", "series": None, "error": "DicomError",
                                   "message": "not processed"} for p in files]
    write_jsonl(out / "files.jsonl", lines)
    n_outcome = defaultdict(int)
    for line in lines:
        n_outcome[line["outcome"]] += 1
    kinds = defaultdict(int)
    for s in samples:
        kinds[s["meta"]["kind"]] += 1
    manifest = {
        "source": str(src) if opts.keep_phi else src.name, "files_seen": len(files),
        "files_written": n_outcome["written"], "files_rejected": n_outcome["rejected"],
        "files_skipped": n_outcome["skipped"],
        "burned_in_skipped": sum(1 for e in errors if e.get("error") == "BurnedInAnnotation"),
        "duplicates_dropped": sum(len(o["duplicates_dropped"]) for o in series_outcomes.values()),
        "series": len(samples), "series_seen": len(series_outcomes), "studies": len(studies), "by_kind": dict(kinds),
        "shards": sorted({s["shard"] for s in samples}), "train_records": len(train), "eval_records": len(evals),
        "deidentified": not opts.keep_phi, "reports_deidentified": not (opts.keep_phi or opts.keep_report_phi),
        "task": opts.task, "salt_fingerprint": salt_fingerprint(None if opts.keep_phi else opts.salt),
        # what the transforms did (medmm.modalities): training copies it into the checkpoint, serving applies it
        "preprocess": {"volume": volume_options(opts).to_record(), "image": image_options(opts).to_record()},
        "options": {"window": opts.window, "spacing": opts.spacing, "size_2d": opts.size_2d,
                    "size_3d": list(opts.size_3d), "on_gap": opts.on_gap},
        "series_outcomes": series_outcomes,
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    secret = "keep-phi" if opts.keep_phi else opts.salt  # patients named by pseudonym: part.json holds no PHI
    write_part(out, part, "dicom", src.name if not opts.keep_phi else str(src),
               {"reports": Path(reports).name if reports else None, **manifest["options"], "task": opts.task,
                "keep_phi": opts.keep_phi, "keep_report_phi": opts.keep_report_phi,
                "eval_fraction": opts.eval_fraction, "seed": opts.seed},
               salt_fingerprint=manifest["salt_fingerprint"],
               groups={pseudonym(secret, "patient|" + group_of[v[0]], 16): split_of(group_of[v[0]], opts.eval_fraction,
                                                                                   opts.seed)
                       for v in groups.values()})
    return manifest


def _patient_keys(headers: list[dict]) -> dict[str, str]:
    """Path -> the key of its patient, by which the split and the parts go: the study's PatientID (the least one
    among its files, so that a study is never split), else the study, else the series."""
    by_study: dict[str, str] = {}
    for h in headers:
        if h["study"] and h["patient"]:
            by_study[h["study"]] = min(by_study.get(h["study"], h["patient"]), h["patient"])
    keys = {}
    for h in headers:
        if h["study"]:
            keys[h["path"]] = f"patient {by_study[h['study']]}" if h["study"] in by_study else f"study {h['study']}"
        else:
            keys[h["path"]] = f"patient {h['patient']}" if h["patient"] else f"series {h['series']}"
    return keys


def _conversations(modality: str, task: str, rows: list[dict]) -> list[list[dict]]:
    """The conversations of one series: its report (task report) or one per question (task vqa); none without rows."""
    if task == "report":
        if not rows:
            return []
        return [[{"from": "human", "value": f"<{modality}>\nWrite the radiology report."},
                 {"from": "gpt", "value": rows[0]["report"]}]]
    return [[{"from": "human", "value": f"<{modality}>\n{r['question']}"}, {"from": "gpt", "value": r["answer"]}]
            for r in rows]


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
    return write_prepared(Path(out), name, recs, recs, errors, {"files": len(files)})
