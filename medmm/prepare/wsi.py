"""``medmm prepare wsi``: whole-slide images -> webdataset shards of tiles (or of tile features), resumably.

    medmm prepare wsi slides/ --out runs/wsi --mpp 0.5 --tile 224 --labels labels.csv --workers 8
    medmm prepare wsi slides/ --out runs/wsi_feats --features vit_tile --encoder-checkpoint uni.bin
    medmm prepare wsi dicom_slides/ --out runs/wsi_dcm --tile 224    # DICOM VL WSI: one slide per series

A folder may hold DICOM whole-slide images (VL Whole Slide Microscopy, one ``.dcm`` per pyramid level):
each series becomes one slide named after its finest level's file; other DICOM objects in the folder
(CT, annotations, unreadable files) are recorded in ``errors.jsonl`` as SlideErrors. See ``medmm.io.wsi``.

What ``OUT`` holds:

- ``shard-000000.tar`` ...: webdataset shards (``webdataset.ShardWriter``). Tile mode: one sample per
  tile, ``<slide>__t<index>.jpg`` + ``.json`` (slide, index, level-0 x/y, level, MPP, tissue, label).
  Feature mode: one sample per slide (a MIL bag), ``<slide>.features.npy`` (N, D) float32,
  ``.coords.npy`` (N, 2) and ``.json``. A labelled slide's sample JSON also carries ``modality`` (``image`` for a
  tile, ``slide`` for a bag), its train/eval ``split`` and ``conversations`` (the label question; for a bag also
  the report), so training can stream the shards alone (``format: wds``, :mod:`medmm.data.streaming`).
- ``coords/<slide>.csv`` + ``.json``: the kept tiles (level-0 x, y, tissue fraction) and how they were
  chosen (level, read size, MPP source, Otsu threshold): the audit trail, and what a resumed run reuses.
- ``features/<slide>.safetensors`` (feature mode): what the ``slide_features`` loader reads;
  ``slides_train.jsonl`` / ``slides_eval.jsonl`` conversations when ``--labels`` gives labels or reports
  (split by patient, so no patient is in both; one record per label and one per report).
- ``manifest.json`` (settings, one entry per slide, shards, counts, timings), ``errors.jsonl`` (one
  ``{path, error, message}`` line per slide that failed; the job goes on), ``progress.jsonl`` (commit log).

Atomicity and resume: a slide's tiles are staged and only enter the shards once all of them were read,
so a corrupt slide leaves nothing behind. Each closed shard is logged in ``progress.jsonl`` with the
samples it holds; running the same command again deletes any shard that was not closed, skips committed
samples, and continues, numbering new shards after the last committed one.

Decoding runs in ``--workers`` processes (spawned; a bounded window of chunks in flight); the optional
feature encoder runs in the main process on the decoded tiles as they arrive.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import shutil
import tarfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import WsiSettings  # noqa: F401  (defined in medmm.config; imported from here too)
from ..errors import InvalidInputError, SlideError
from ..io.slide_features import load_slide_features, patient_id, save_slide_features, slide_id
from ..modalities.slide import TileOptions, read_tiles, tile_plan
from .parts import Part, split_of, write_part

log = logging.getLogger(__name__)
SHARD_PATTERN = "shard-%06d.tar"
MANIFEST_VERSION = 1


# --------------------------------------------------------------------------------------------
# Settings and worker tasks (top-level functions: they run in spawned processes)


_OPEN: dict[str, Any] = {}


def _slide(path: str, s: WsiSettings):
    """An open slide per worker process (kept for the chunks that follow; at most two open)."""
    from ..io.wsi import open_slide

    if path not in _OPEN:
        while len(_OPEN) >= 2:
            _OPEN.pop(next(iter(_OPEN))).close()
        _OPEN[path] = open_slide(path, slide_mpp=s.slide_mpp, backend=s.backend)
    return _OPEN[path]


def _forget(path: str) -> None:
    sl = _OPEN.pop(path, None)
    if sl is not None:
        sl.close()


def tile_options(s: WsiSettings) -> TileOptions:
    """The tile transform's options for these settings (recorded in the manifest and each tile's JSON)."""
    return TileOptions(mpp=s.mpp, tile=s.tile, min_tissue=s.min_tissue, mask_mpp=s.mask_mpp, scan_mpp=s.slide_mpp)


def plan_slide(path: str, sid: str, s: WsiSettings, coords_dir: str) -> dict:
    """Open, choose the level, detect tissue, lay the grid, save coords; or reuse saved coords (resume)."""
    from ..io.wsi import load_coords, save_coords

    t0 = time.perf_counter()
    stem = Path(coords_dir) / sid
    want = {"target_mpp": s.mpp, "tile_size": s.tile, "min_tissue": s.min_tissue, "mask_mpp": s.mask_mpp}
    try:
        if stem.with_suffix(".json").exists() and stem.with_suffix(".csv").exists():
            coords, tissue, meta = load_coords(stem)
            if meta.get("settings") == want and meta["slide"]["path"] == path:
                return {"ok": True, "sid": sid, "path": path, "coords": coords, "tissue": tissue,
                        "choice": meta["level_choice"], "slide": meta["slide"], "grid": meta["grid"],
                        "tissue_fraction": (meta.get("tissue_mask") or {}).get("fraction"), "reused": True,
                        "seconds": time.perf_counter() - t0}
        slide = _slide(path, s)
        choice, grid, tm = tile_plan(slide, tile_options(s))  # the slide_tiles loader lays the same grid
        save_coords(stem, slide, grid, tm, {"settings": want})
        return {"ok": True, "sid": sid, "path": path, "coords": grid.coords, "tissue": grid.tissue,
                "choice": asdict(choice), "slide": slide.describe(), "grid": list(grid.grid),
                "tissue_fraction": tm.fraction, "reused": False, "seconds": time.perf_counter() - t0}
    except SlideError as e:
        _forget(path)
        return {"ok": False, "sid": sid, "path": path, "error": e.to_record()}
    except Exception as e:  # an unexpected reader failure is still this slide's problem, not the job's
        _forget(path)
        return {"ok": False, "sid": sid, "path": path,
                "error": SlideError(path, f"{type(e).__name__}: {e}").to_record()}


def read_chunk(path: str, s: WsiSettings, choice: dict, coords: np.ndarray, encode: bool) -> dict:
    """Read tiles at ``coords``: encoded bytes (tile mode) or a uint8 (k, T, T, 3) stack (feature mode)."""
    from ..io.wsi import level_choice_from_dict

    t0 = time.perf_counter()
    try:
        slide = _slide(path, s)
        ch = level_choice_from_dict(choice)
        tiles = read_tiles(slide, ch, coords)  # (k, T, T, 3) uint8: what the slide_tiles loader reads
        if encode:
            from PIL import Image

            out = []
            for t in tiles:
                buf = io.BytesIO()
                if s.image_format == "jpg":
                    Image.fromarray(t).save(buf, format="JPEG", quality=s.quality)
                else:
                    Image.fromarray(t).save(buf, format="PNG")
                out.append(buf.getvalue())
            payload: Any = out
        else:
            payload = tiles
        return {"ok": True, "tiles": payload, "seconds": time.perf_counter() - t0}
    except SlideError as e:
        _forget(path)
        return {"ok": False, "error": e.to_record(), "seconds": time.perf_counter() - t0}
    except Exception as e:
        _forget(path)
        return {"ok": False, "error": SlideError(path, f"{type(e).__name__}: {e}").to_record(),
                "seconds": time.perf_counter() - t0}


class _Inline:
    """``Pool.apply_async`` run in this process (``--workers 0``)."""

    class _Done:
        def __init__(self, value):
            self.value = value

        def get(self):
            return self.value

    def apply_async(self, fn, args):
        return self._Done(fn(*args))

    def close(self):
        pass

    def join(self):
        pass

    def terminate(self):
        pass


# --------------------------------------------------------------------------------------------
# Inputs


def discover_slides(src: str | Path) -> list[Path]:
    """One slide file, or every slide file under a folder (recursively, sorted).

    DICOM files count once per slide: the finest VOLUME instance of each series stands for it (its
    other levels, label and overview are read through it). Every other ``.dcm`` file (a CT, an
    annotation object, a broken file) is listed on its own and fails with a SlideError when opened.
    """
    from ..io.wsi import DICOM_SUFFIXES, WSI_SUFFIXES, group_dicom_slides

    src = Path(src)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise InvalidInputError(src, "no such file or folder")
    files = [p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in WSI_SUFFIXES
             and not p.name.startswith(".")]
    dicom = [p for p in files if p.suffix.lower() in DICOM_SUFFIXES]
    return sorted([p for p in files if p.suffix.lower() not in DICOM_SUFFIXES] + group_dicom_slides(dicom))


def read_labels(path: str | Path) -> dict[str, dict]:
    """Labels CSV -> {slide id: row}. Columns: ``slide`` (file name or stem; required), ``label``, ``report``,
    ``patient``, ``split`` (train/eval), all optional."""
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(path, "labels file not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        if "slide" not in cols:
            raise InvalidInputError(path, f"needs a 'slide' column (has {cols})")
        if not {"label", "report"} & set(cols):
            raise InvalidInputError(path, f"needs a 'label' and/or 'report' column (has {cols})")
        out: dict[str, dict] = {}
        for i, row in enumerate(reader, start=2):
            name = str(row.get("slide") or "").strip()
            if not name:
                raise InvalidInputError(f"{path}:{i}", "empty 'slide'")
            split = (row.get("split") or "").strip().lower()
            if split and split not in ("train", "eval"):
                raise InvalidInputError(f"{path}:{i}", f"split '{split}' is not train/eval")
            sid = slide_id(name)
            if sid in out:
                raise InvalidInputError(f"{path}:{i}", f"slide '{name}' is listed twice")
            out[sid] = {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k}
    return out


# --------------------------------------------------------------------------------------------
# Run state: commit log, staged slides


class _RunState:
    def __init__(self, out: Path, settings: WsiSettings):
        self.out = out
        self.progress = out / "progress.jsonl"
        self.committed: dict[str, int] = {}
        self.shards: list[str] = []
        self.pending: dict[str, list[int]] = {}  # sid -> [first index, count] in the open shard
        run = out / "run.json"
        cur = asdict(settings)
        if run.exists():
            prev = json.loads(run.read_text())
            diff = {k: (prev.get(k), v) for k, v in cur.items() if prev.get(k) != v}
            if diff:
                raise InvalidInputError(run, f"{out} holds a run with other settings {diff} (previous, now); "
                                             "use another --out or the same settings to resume")
        else:
            from ..utils import atomic_write_text

            atomic_write_text(run, json.dumps(cur, indent=2))
        if self.progress.exists():
            for line in self.progress.read_text().splitlines():
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a torn last line: that shard was not committed
                    break
                self.shards.append(rec["shard"])
                for sid, (_start, n) in rec["samples"].items():
                    self.committed[sid] = self.committed.get(sid, 0) + int(n)
        for p in out.glob("shard-*.tar"):
            if p.name not in self.shards:  # written by a run that stopped before closing it
                p.unlink()
        self.next_shard = 1 + max([int(re.findall(r"\d+", s)[0]) for s in self.shards], default=-1)

    def wrote(self, sid: str, index: int) -> None:
        ent = self.pending.setdefault(sid, [index, 0])
        ent[1] += 1

    def commit(self, fname: str) -> None:
        """ShardWriter ``post`` hook: the shard is closed; log what it holds (fsync'd) before going on."""
        import os

        rec = {"shard": Path(fname).name, "samples": self.pending}
        with open(self.progress, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.shards.append(rec["shard"])
        for sid, (_s, n) in self.pending.items():
            self.committed[sid] = self.committed.get(sid, 0) + n
        self.pending = {}


class _Stage:
    """A slide's samples before they enter the shards: a tar file under ``OUT/.staging``."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tar = tarfile.open(path, "w")
        self.count = 0

    def add(self, key: str, files: dict[str, bytes]) -> None:
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def samples(self):
        self.tar.close()
        with tarfile.open(self.path, "r") as t:
            cur: dict | None = None
            for m in t:
                key, ext = m.name.split(".", 1)
                if cur is None or cur["__key__"] != key:
                    if cur is not None:
                        yield cur
                    cur = {"__key__": key}
                cur[ext] = t.extractfile(m).read()
            if cur is not None:
                yield cur

    def discard(self) -> None:
        try:
            self.tar.close()
        finally:
            self.path.unlink(missing_ok=True)


@dataclass
class _SlideJob:
    plan: dict
    start: int
    label: dict | None
    chunks_total: int
    chunks_done: int = 0
    error: dict | None = None
    stage: _Stage | None = None
    feats: list = field(default_factory=list)
    decode_s: float = 0.0


# --------------------------------------------------------------------------------------------
# The job


def prepare_wsi(src: str | Path, out: str | Path, mpp: float = 0.5, tile: int = 224, labels: str | Path | None = None,
                features: str | None = None, encoder_checkpoint: str | None = None,
                encoder_kwargs: dict | None = None, workers: int = 0, slide_mpp: float | None = None,
                min_tissue: float = 0.5, mask_mpp: float = 8.0, backend: str = "auto", image_format: str = "jpg",
                quality: int = 90, shard_maxcount: int = 10000, shard_maxsize: float = 1e9, chunk: int = 32,
                batch_size: int = 64, device: str = "auto", question: str = "What is the diagnosis for this slide?",
                report_question: str = "Write the pathology report for this slide.", eval_fraction: float = 0.2,
                seed: int = 0, progress: bool = True, part: Part | None = None) -> dict:
    """Tile (and optionally encode) every slide under ``src`` into webdataset shards in ``out``.

    With ``part`` (``--num-shards N --shard-index I``), only the slides whose patient (the labels' ``patient``
    column, else the TCGA barcode's patient, else the slide) hashes into that part: a patient's slides stay
    together, and the split by patient is the same in every part (:mod:`medmm.prepare.parts`).

    Args:
        src: a slide file or a folder of slides (searched recursively).
        out: output folder; running again with the same settings resumes.
        mpp: target microns per pixel of the tiles.
        tile: tile side in pixels at ``mpp``.
        labels: CSV with ``slide`` and ``label`` and/or ``report`` (+ optional ``patient``, ``split``).
        features: a registered tile encoder (e.g. ``vit_tile``): store one feature bag per slide instead of tiles.
        encoder_checkpoint: local weights for the encoder (UNI/CONCH-style state dicts are remapped).
        encoder_kwargs: architecture arguments of the encoder.
        workers: decoding processes (0 = this process).
        slide_mpp: base MPP for slides whose metadata has none.
        min_tissue: least tissue fraction of a kept tile.
        mask_mpp: µm per pixel of the tissue mask.

    Returns:
        The manifest (also written to ``out/manifest.json``).
    """
    from tqdm.auto import tqdm

    from ..utils import atomic_write_text

    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be jpg or png, got {image_format}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = WsiSettings(mpp=float(mpp), tile=int(tile), min_tissue=float(min_tissue), mask_mpp=float(mask_mpp),
                           slide_mpp=slide_mpp, backend=backend, image_format=image_format, quality=int(quality),
                           features=features, encoder_kwargs=dict(encoder_kwargs or {}),
                           encoder_checkpoint=str(encoder_checkpoint) if encoder_checkpoint else None)
    state = _RunState(out, settings)
    slides = discover_slides(src)
    label_rows = read_labels(labels) if labels else {}
    ids = [slide_id(p) for p in slides]
    dup = {s for s in ids if ids.count(s) > 1}
    if dup:
        raise InvalidInputError(src, f"slides share a file name (ids {sorted(dup)}); ids must be unique")
    unmatched = sorted(set(label_rows) - set(ids))
    if part is not None:
        mine = [i for i, sid in enumerate(ids) if part.holds(_patient(label_rows, sid))]
        slides, ids = [slides[i] for i in mine], [ids[i] for i in mine]
    # the train/eval split (by patient) is decided before anything is written: every shard sample carries it
    splits = _split_of(label_rows, ids, eval_fraction, seed)
    prev = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    entries: dict[str, dict] = dict(prev.get("slides", {}))
    errors_path = out / "errors.jsonl"
    errors_path.write_text("")  # failed slides are retried; their errors are written again if they persist
    n_errors = 0
    coords_dir = out / "coords"
    coords_dir.mkdir(exist_ok=True)
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)

    import webdataset  # noqa: F401  (imports torch: pay it here, not inside the write timing)

    encoder = dev = None
    if features:
        encoder, dev = _build_tile_encoder(features, encoder_checkpoint, encoder_kwargs or {}, device)
    timing = {"plan_s": 0.0, "decode_s": 0.0, "model_s": 0.0, "write_s": 0.0}
    t_start = time.perf_counter()

    if workers > 0:
        import multiprocessing as mp

        pool: Any = mp.get_context("spawn").Pool(workers)
    else:
        pool = _Inline()
    window = max(2, 2 * workers)
    writer = None

    def get_writer():
        nonlocal writer
        if writer is None:
            import webdataset as wds

            writer = wds.ShardWriter(str(out / SHARD_PATTERN), maxcount=shard_maxcount, maxsize=shard_maxsize,
                                     post=state.commit, start_shard=state.next_shard, verbose=0)
        return writer

    def record_error(rec: dict) -> None:
        nonlocal n_errors
        n_errors += 1
        with open(errors_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    bar = tqdm(total=0, unit="tile", desc="prepare wsi", disable=not progress, dynamic_ncols=True)
    pending: deque = deque()  # (job, index of first tile, async result)

    def finish(job: _SlideJob, write: bool = True) -> None:
        plan, sid = job.plan, job.plan["sid"]
        if job.error is not None:
            if job.stage is not None:
                job.stage.discard()
            record_error(job.error)
            entries[sid] = {"path": plan["path"], "status": "error", "error": job.error["message"]}
            return
        t0 = time.perf_counter()
        n = len(plan["coords"])
        meta = _slide_meta(plan, settings, job.label)
        if not write:
            entry_extra = {"features": f"features/{sid}.safetensors"} if features else {}
        elif features:
            w = get_writer()
            feats = np.concatenate(job.feats) if job.feats else np.zeros((0, encoder.out_dim), np.float32)
            fpath = save_slide_features(out / "features" / f"{sid}.safetensors", feats, plan["coords"],
                                        {**meta, "encoder": features, "feature_dim": int(feats.shape[1])})
            w.write({"__key__": sid, "features.npy": _npy(feats), "coords.npy": _npy(plan["coords"]),
                     "json": json.dumps({**meta, "tiles": n, **_sample_conversations(
                         "slide", job.label, splits.get(sid), question, report_question)}).encode()})
            state.wrote(sid, 0)
            entry_extra = {"features": str(fpath.relative_to(out)), "feature_dim": int(feats.shape[1])}
        else:
            w = get_writer() if job.stage is not None and job.stage.count else None
            for sample in job.stage.samples() if job.stage else []:
                w.write(sample)
                state.wrote(sid, int(sample["__key__"].rsplit("__t", 1)[1]))
            if job.stage:
                job.stage.discard()
            entry_extra = {}
        timing["write_s"] += time.perf_counter() - t0
        entries[sid] = {"path": plan["path"], "status": "ok", "tiles": n, "grid": plan["grid"],
                        "tissue_fraction": plan["tissue_fraction"], "level": plan["choice"]["level"],
                        "read_size": plan["choice"]["read_size"], "effective_mpp": plan["choice"]["effective_mpp"],
                        "slide_mpp": plan["slide"]["mpp"], "mpp_source": plan["slide"]["mpp_source"],
                        "backend": plan["slide"]["backend"], "label": (job.label or {}).get("label"),
                        "coords": f"coords/{sid}.csv", **entry_extra}

    def handle(job: _SlideJob, first: int, res) -> None:
        r = res.get()
        job.chunks_done += 1
        job.decode_s += r["seconds"]
        timing["decode_s"] += r["seconds"]
        if job.error is None and not r["ok"]:
            job.error = r["error"]
        elif job.error is None:
            if features:
                t0 = time.perf_counter()
                job.feats.append(_embed(encoder, dev, r["tiles"], batch_size))
                timing["model_s"] += time.perf_counter() - t0
                bar.update(len(r["tiles"]))
            else:
                plan = job.plan
                for k, data in enumerate(r["tiles"]):
                    i = first + k
                    x, y = (int(v) for v in plan["coords"][i])
                    info = {**_slide_meta(plan, settings, job.label), "index": i, "x": x, "y": y,
                            "tissue": round(float(plan["tissue"][i]), 4),
                            **_sample_conversations("image", {"label": (job.label or {}).get("label")},
                                                    splits.get(plan["sid"]), question, None)}
                    job.stage.add(f"{plan['sid']}__t{i:06d}", {image_format: data, "json": json.dumps(info).encode()})
                bar.update(len(r["tiles"]))
        if job.chunks_done == job.chunks_total:
            finish(job)

    try:
        plan_q: deque = deque()
        todo = list(zip(slides, ids))
        while todo or plan_q:
            while todo and len(plan_q) < max(1, workers):
                p, sid = todo.pop(0)
                plan_q.append(pool.apply_async(plan_slide, (str(p), sid, settings, str(coords_dir))))
            plan = plan_q.popleft().get()
            sid = plan["sid"]
            if not plan["ok"]:
                record_error(plan["error"])
                entries[sid] = {"path": plan["path"], "status": "error", "error": plan["error"]["message"]}
                continue
            timing["plan_s"] += plan["seconds"]
            n = len(plan["coords"])
            expected = 1 if features else n
            done = state.committed.get(sid, 0)
            lab = label_rows.get(sid)
            if n == 0:
                entries[sid] = {"path": plan["path"], "status": "no_tissue", "tiles": 0, "grid": plan["grid"],
                                "tissue_fraction": plan["tissue_fraction"], "coords": f"coords/{sid}.csv"}
                continue
            if done >= expected:
                finish(_SlideJob(plan, n, lab, 0), write=False)  # committed by an earlier run
                continue
            bar.total += n if features else n - done
            bar.refresh()
            start = 0 if features else done
            if features:
                cached = _cached_features(out / "features" / f"{sid}.safetensors", n, features)
                if cached is not None:
                    job = _SlideJob(plan, 0, lab, 0, feats=[cached])
                    finish(job)
                    bar.update(n)
                    continue
            starts = list(range(start, n, chunk))
            job = _SlideJob(plan, start, lab, len(starts))
            if not features:
                job.stage = _Stage(staging / f"{sid}.tar")
            if not starts:
                finish(job)
                continue
            for s0 in starts:
                while len(pending) >= window:
                    handle(*pending.popleft())
                args = (plan["path"], settings, plan["choice"], plan["coords"][s0:s0 + chunk], not features)
                pending.append((job, s0, pool.apply_async(read_chunk, args)))
        while pending:
            handle(*pending.popleft())
        pool.close()
        pool.join()
    except BaseException:
        pool.terminate()
        raise
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        shutil.rmtree(staging, ignore_errors=True)

    records = _conversations(out, entries, label_rows, features, question, report_question, splits)
    ok = [e for e in entries.values() if e.get("status") == "ok"]
    manifest = {
        "kind": "wsi", "version": MANIFEST_VERSION, "source": str(src), "settings": asdict(settings),
        # what the tile transform did (medmm.modalities): training copies it into the checkpoint, serving applies it
        "preprocess": {TileOptions.kind: tile_options(settings).to_record()},
        "shards": list(state.shards), "pattern": SHARD_PATTERN,
        "samples": ("one per slide (features.npy, coords.npy, json)" if features
                    else f"one per tile ({image_format}, json)"),
        "counts": {"slides": len(slides), "slides_ok": len(ok), "slides_failed": n_errors,
                   "slides_no_tissue": sum(1 for e in entries.values() if e.get("status") == "no_tissue"),
                   "tiles": int(sum(e.get("tiles", 0) for e in ok)), **records},
        "labels_unmatched": unmatched,
        "timing": {**{k: round(v, 3) for k, v in timing.items()}, "wall_s": round(time.perf_counter() - t_start, 3),
                   "workers": workers},
        "slides": entries,
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    write_part(out, part, "wsi", str(src),
               {"settings": asdict(settings), "labels": str(labels) if labels else None, "shard_maxcount": shard_maxcount,
                "question": question, "report_question": report_question, "eval_fraction": eval_fraction, "seed": seed},
               groups={_patient(label_rows, sid): split for sid, split in splits.items()})
    return manifest


def _slide_meta(plan: dict, s: WsiSettings, label: dict | None) -> dict:
    ch = plan["choice"]
    return {"slide": plan["sid"], "source": plan["path"], "level": ch["level"], "read_size": ch["read_size"],
            "tile_size": ch["tile_size"], "tile0": ch["tile0"], "mpp": ch["effective_mpp"], "target_mpp": s.mpp,
            "label": (label or {}).get("label"), "preprocess": {TileOptions.kind: tile_options(s).to_record()}}


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _cached_features(path: Path, n: int, encoder: str) -> np.ndarray | None:
    """Features of an earlier run that stopped before their shard closed: reused when they match."""
    if not path.exists():
        return None
    try:
        feats, _coords, meta = load_slide_features(path)
    except SlideError:
        return None
    return feats if feats.shape[0] == n and meta.get("encoder") == encoder else None


def _build_tile_encoder(name: str, checkpoint: str | None, kwargs: dict, device: str):
    import torch

    from encoders import build_encoder

    enc = build_encoder(name, checkpoint=checkpoint, **kwargs)
    if not hasattr(enc, "embed_tiles"):
        raise InvalidInputError(name, "--features needs a tile encoder (one with embed_tiles), e.g. vit_tile")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    return enc.to(dev).eval(), dev


def _embed(encoder, dev, tiles: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 (k, T, T, 3) -> float32 (k, D) features, in batches."""
    import torch

    outs = []
    with torch.inference_mode():
        for i in range(0, len(tiles), batch_size):
            x = encoder.preprocess(torch.from_numpy(tiles[i:i + batch_size]).to(dev))
            outs.append(encoder.embed_tiles(x).float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, encoder.out_dim), np.float32)


def _patient(rows: dict, sid: str) -> str:
    """A slide's patient: the labels' ``patient`` column, else the TCGA barcode's patient, else the slide itself."""
    return (rows.get(sid) or {}).get("patient") or patient_id(sid)


def _split_of(rows: dict, ids: list[str], eval_fraction: float, seed: int) -> dict[str, str]:
    """Slide id -> ``train``/``eval`` for the labelled slides: the CSV's ``split`` column, else by patient (no
    patient in both): a keyed hash of the patient (about ``eval_fraction`` of them), the same in every part of a
    sharded run."""
    labelled = {sid: rows[sid] for sid in ids if sid in rows and (rows[sid].get("label") or rows[sid].get("report"))}
    return {sid: row.get("split") or split_of(_patient(rows, sid), eval_fraction, seed) for sid, row in labelled.items()}


def _sample_conversations(modality: str, label: dict | None, split: str | None, question: str,
                          report_question: str | None) -> dict:
    """What a shard sample's JSON carries for training on the shards alone (``format: wds``): its ``modality``,
    ``split`` and ``conversations`` (the label question, and the report one when ``report_question``); nothing for
    an unlabelled slide."""
    label = label or {}
    convs = [[{"from": "human", "value": f"<{modality}>\n{q}"}, {"from": "gpt", "value": str(answer)}]
             for q, answer in ((question, label.get("label")), (report_question, label.get("report")))
             if q and answer]
    if not convs:
        return {}
    return {"modality": modality, "split": split, "conversations": convs}


def _conversations(out: Path, entries: dict, rows: dict, features: str | None, question: str,
                   report_question: str, splits: dict[str, str]) -> dict:
    """Feature mode + labels: ``slides_{train,eval}.jsonl``, split by patient (or the CSV's ``split`` column)."""
    from ..utils import write_jsonl

    if not features or not rows:
        return {}
    recs, sids = [], []
    for sid, e in sorted(entries.items()):
        row = rows.get(sid)
        if e.get("status") != "ok" or not row or not e.get("tiles"):
            continue
        # One record per target, so evaluating the report never sees the true label in its prompt.
        for kind, q, answer, atype in (("label", question, row.get("label"), "CLOSED"),
                                       ("report", report_question, row.get("report"), "OPEN")):
            if not answer:
                continue
            sids.append(sid)
            recs.append({"id": f"wsi-{sid}-{kind}", "modalities": {"slide": e["features"]},
                         "label": row.get("label") or None, "answer_type": atype,
                         "patient": row.get("patient") or patient_id(sid), "split": row.get("split") or None,
                         "conversations": [{"from": "human", "value": f"<slide>\n{q}"},
                                           {"from": "gpt", "value": answer}]})
    train = [r for r, sid in zip(recs, sids) if splits.get(sid) != "eval"]
    evals = [r for r, sid in zip(recs, sids) if splits.get(sid) == "eval"]
    write_jsonl(out / "slides_train.jsonl", train)
    write_jsonl(out / "slides_eval.jsonl", evals)
    return {"train_records": len(train), "eval_records": len(evals)}
