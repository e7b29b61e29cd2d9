"""From a DICOM study to a DICOM SR: an auditable chain of small operators.

    load_study(source, work_dir)         files, a folder or in-memory datasets -> Study (headers, a folder per series)
    select_series(study, model, cfg)     which series, through which model modality, and why
    infer(predictor, study, sel, cfg)    the question through medmm.inference.predictor.Predictor -> Finding
    write_sr(study, sel, finding, alg)   a Comprehensive SR in the source study (medmm.serve.dicom_sr), listing
                                         the SR it amends (``predecessor``) in its Predecessor Documents Sequence

:class:`ReportPipeline` chains them (``run``); ``run_many`` reports several studies with one batched
``infer_many`` (each study loaded, selected and written on its own, so a study that fails fails alone; greedy
answers equal ``run``'s). Each step appends one entry to the study's audit trail
(``StudyReport.record["steps"]``: what it did, on which UIDs, how long it took). Records hold UIDs,
counts and timings, never patient names, IDs or the report text, so they can go to ordinary logs.

Untrusted studies (uploads, C-STOREs, WADO-RS): every file the chain writes is named by an index
(``series/000/000000.dcm``), never by a UID, checked to stay in the work folder and created new (no link or
existing file is written through); a file whose Study/Series/SOP UIDs are not valid UIDs is rejected. Pixels
are held to a budget (``ReportConfig.max_decoded_mib``, float32 bytes from the headers) before anything is
decoded or inflated; header values never reach a message, a record or the log (invalid ones are left out of the
SR and named in the ``write_sr`` step's ``fallbacks``).

A series goes through the model's ``volume`` modality (a modality whose loader is ``volume``) when
it has at least ``min_volume_slices`` slices or frames, otherwise its middle instance goes through
the ``image`` modality. The modality is chosen by the loader type in the model config, never by name.

    medmm pacs report --checkpoint C --input study_folder/ --out sr.dcm
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DecodingConfig, ReportConfig  # noqa: F401  (ReportConfig: defined in medmm.config)
from ..errors import DicomError, InvalidInputError
from ..io.dicom import (
    HeaderReader,
    decoded_size,
    has_pixels,
    open_dataset,
    pixel_budget,
    quiet_pydicom,
    redact_pydicom_values,
)

log = logging.getLogger("medmm.pacs")
MiB = 1 << 20
DEFAULT_MAX_DECODED_BYTES = ReportConfig.max_decoded_mib * MiB
"""The pixel budget of one study when none is given (:attr:`ReportConfig.max_decoded_mib`)."""
# SOP classes / modalities that carry no pixels a model can read (reports, presentation states, key objects).
NON_IMAGE_MODALITIES = {"SR", "PR", "KO", "DOC", "SEG", "RTSTRUCT", "RTPLAN", "RWV", "REG", "FID", "AU", "ECG"}


@dataclass
class Instance:
    """One stored instance: where it is and the header fields the chain needs."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    modality: str
    instance_number: int | None
    position: float | None
    """Position along the slice normal (mm), for ordering; None when the header has no geometry."""
    frames: int
    has_pixels: bool
    pixel_bytes: int = 0
    """What decoding it takes (float32 bytes, from the header): what it costs of the pixel budget."""
    link: Path | None = None
    """Its file in the series folder, under a name the server chose (``000000.dcm``), never one from the data."""


@dataclass
class Series:
    uid: str
    modality: str
    number: int | None
    folder: Path
    """A folder holding only this series' files (links or copies), what the volume loader reads."""
    instances: list[Instance]

    @property
    def images(self) -> list[Instance]:
        return [i for i in self.instances if i.has_pixels and self.modality not in NON_IMAGE_MODALITIES]

    @property
    def slices(self) -> int:
        imgs = self.images
        return max(i.frames for i in imgs) if len(imgs) == 1 else len(imgs)


@dataclass
class Study:
    uid: str
    series: list[Series]
    headers: list
    """One pydicom Dataset per instance, pixel data not loaded: the SR's evidence and patient module."""
    rejected: list[dict] = field(default_factory=list)
    """Files that are not readable DICOM (``errors.jsonl`` records)."""

    def header(self, sop_uid: str):
        return next(h for h in self.headers if str(h.SOPInstanceUID) == sop_uid)


@dataclass
class Selection:
    series: Series
    modality: str
    """The model's modality name that receives the input."""
    loader: str
    """``image`` or ``volume``."""
    value: Path
    """What the loader reads: a file (image) or the series folder (volume)."""
    instances: list[Instance]
    """The instances the model saw (referenced in the SR as INFERRED FROM)."""
    reason: str


@dataclass
class Finding:
    text: str
    record: dict
    """The Predictor's output record (decoding settings, token counts, timings)."""


@dataclass
class StudyReport:
    sr: object
    """The SR (a highdicom ComprehensiveSR, a pydicom Dataset)."""
    text: str
    record: dict
    """The audit record: UIDs, the chosen series and why, per-step timings; no patient identifiers."""


# ---------------------------------------------------------------------------------------------- operators
def _ensure_file_meta(ds) -> None:
    """Datasets from DIMSE/DICOMweb may lack a file meta group; add one so they can be written as files."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "TransferSyntaxUID" not in meta:
        implicit = getattr(ds, "is_implicit_VR", None) or getattr(ds, "original_encoding", (None,))[0]
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta = meta


def _position(reader: HeaderReader) -> float | None:
    """Slice position along the normal of ImageOrientationPatient; None without (valid) geometry."""
    import numpy as np

    ipp = reader.numbers("ImagePositionPatient", 3, None)
    iop = reader.numbers("ImageOrientationPatient", 6, None, lo=-1.01, hi=1.01)
    if ipp is None or iop is None:
        return None
    normal = np.cross(np.array(iop[:3], float), np.array(iop[3:], float))
    return float(np.dot(normal, np.array(ipp, float)))


def _int(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _order_number(ds, keyword: str) -> int | None:
    """InstanceNumber or SeriesNumber, used only to order instances and series; None when absent or invalid
    (read inside quiet_pydicom: no warning quotes the value)."""
    try:
        return _int(ds.get(keyword))
    except Exception:  # noqa: BLE001  (pydicom cannot convert the value: no order from it)
        return None


def _inside(folder: Path, name: str) -> Path:
    """``folder/name`` for a name the server chose, checked to stay in ``folder``: the folder is resolved and the
    entry's parent must be it. Anything else is a bug or an attack, never written to."""
    base = folder.resolve(strict=True)
    target = base / name
    if os.sep in name or name in ("", ".", "..") or target.parent != base:
        raise DicomError(str(folder), "refused to write outside the study's work folder")
    return target


def _create(path: Path):
    """A new file opened for writing: never an existing entry (``O_EXCL``) and never through a link
    (``O_NOFOLLOW``), so nothing outside the work folder can be created or overwritten through it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    return os.fdopen(os.open(path, flags, 0o600), "wb")


def _folder(parent: Path, name: str) -> Path:
    """A new sub-folder ``name`` of ``parent`` (checked inside it; an existing link is refused, never followed)."""
    path = _inside(parent, name)
    path.mkdir(mode=0o700, exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        raise DicomError(str(parent), "refused to write outside the study's work folder")
    return path


def _place(inst: Instance, folder: Path, name: str) -> Path:
    """Put ``inst``'s file in its series folder as ``name``: a link to the source, else a copy. Neither replaces an
    existing entry nor writes through a link (``os.symlink`` and ``O_EXCL`` refuse an existing name)."""
    dest = _inside(folder, name)
    try:
        os.symlink(inst.path.resolve(), dest)
    except FileExistsError:
        raise DicomError(str(folder), f"{name} already exists in the work folder (reused?)") from None
    except OSError:  # a filesystem without symbolic links: a copy, written only as a new file
        with open(inst.path, "rb") as src, _create(dest) as out:
            shutil.copyfileobj(src, out)
    return dest


def _reject_reason(rejected: list[dict]) -> str:
    """The reasons of rejected files, for the error of a study with no readable instance (paths left out)."""
    if not rejected:
        return ""
    reasons = list(dict.fromkeys(r["message"] for r in rejected))
    more = f"; {len(reasons) - 2} more" if len(reasons) > 2 else ""
    return f" ({len(rejected)} file(s) rejected: {'; '.join(reasons[:2])}{more})"


def load_study(source: str | Path | Sequence, work_dir: str | Path,
               max_decoded_bytes: int | None = DEFAULT_MAX_DECODED_BYTES) -> Study:
    """Read one study's headers and lay its series out under ``work_dir/series/<n>/``.

    Every file the chain writes has a name chosen here (``incoming/000000.dcm``, ``series/000/000000.dcm``),
    never one taken from the data, is checked to stay inside ``work_dir`` and is created as a new file (a link
    or an existing file is never written through or replaced). UIDs only group instances.

    Args:
        source: a DICOM file, a folder (searched recursively; hidden files, such as partly received ones,
            are skipped), a list of paths, or a list of pydicom Datasets (what DICOMweb and DIMSE deliver;
            they are written into ``work_dir``).
        work_dir: a scratch folder owned by the caller (deleted by :class:`ReportPipeline` after the run).
        max_decoded_bytes: the pixel budget (float32 bytes, from the headers): a file that needs more, or a
            Deflated file that inflates past it, is rejected before anything is decoded; None: only
            :mod:`medmm.io.dicom`'s per-file caps. :class:`ReportPipeline` also checks the series it reads.

    Raises:
        DicomError: no readable instance, or instances of more than one study.
    """
    with quiet_pydicom():  # pydicom's warnings quote header values
        return _load_study(source, Path(work_dir), max_decoded_bytes)


def _load_study(source, work: Path, budget: int | None) -> Study:
    work.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    rejected: list[dict] = []
    label = str(source) if isinstance(source, (str, Path)) else f"{len(source)} instance(s)"
    if isinstance(source, (str, Path)):
        p = Path(source)
        if not p.exists():
            raise DicomError(p, "no such file or folder")
        paths = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()
                                               and not any(part.startswith(".") for part in q.relative_to(p).parts))
    else:
        incoming = None
        for i, item in enumerate(source):
            if isinstance(item, (str, Path)):
                paths.append(Path(item))
                continue
            incoming = incoming or _folder(work, "incoming")
            dest = _inside(incoming, f"{i:06d}.dcm")  # an in-memory dataset: named by its place in the list
            try:
                _ensure_file_meta(item)
                with _create(dest) as f:
                    item.save_as(f, enforce_file_format=True)
            except DicomError:
                raise
            except Exception as e:  # noqa: BLE001  (a dataset pydicom cannot write is that instance's problem)
                rejected.append(DicomError(f"instance {i}", f"cannot be written as a file ({type(e).__name__})")
                                .to_record())
                continue
            paths.append(dest)
    entries = []
    for p in paths:
        if p.name.upper() == "DICOMDIR":
            continue
        try:
            entries.append(_instance(p, budget))
        except DicomError as e:
            rejected.append(e.to_record())
    if not entries:
        raise DicomError(label, "no readable DICOM instance" + _reject_reason(rejected))
    studies = sorted({e[0] for e in entries})
    if len(studies) > 1:
        raise DicomError(label, f"instances of {len(studies)} studies; send one study at a time")
    by_series: dict[str, list] = {}
    for _, ds, inst, _ in entries:
        by_series.setdefault(inst.series_instance_uid, []).append((ds, inst))
    number: dict[str, int | None] = {}
    for _, _, inst, n in entries:
        number.setdefault(inst.series_instance_uid, n)  # the series' first instance says its number
    series = []
    root = _folder(work, "series")
    for n, (uid, items) in enumerate(sorted(by_series.items(), key=lambda kv: (number[kv[0]] or 0, kv[0]))):
        folder = _folder(root, f"{n:03d}")
        for k, (_, inst) in enumerate(items):
            inst.link = _place(inst, folder, f"{k:06d}.dcm")
        modality = items[0][1].modality
        series.append(Series(uid=uid, modality=modality, number=number[uid], folder=folder,
                             instances=[inst for _, inst in items]))
    return Study(uid=studies[0], series=series, headers=[e[1] for e in entries], rejected=rejected)


def _instance(p: Path, budget: int | None) -> tuple[str, object, Instance, int | None]:
    """(study UID, header without pixels, Instance, series number) of one file; DicomError when it cannot be
    used: unreadable, a Study/Series/SOP Instance/SOP Class UID that is missing or not a valid UID, or pixels
    over the budget. Messages name the attribute, never its value."""
    ds = open_dataset(p, defer_size=1024, max_decoded_bytes=budget)  # pixel data stays on disk
    reader = HeaderReader(ds, p)
    study_uid = reader.uid("StudyInstanceUID", required=True)
    series_uid = reader.uid("SeriesInstanceUID", required=True)
    sop = reader.uid("SOPInstanceUID", required=True)
    sop_class = reader.uid("SOPClassUID", required=True)
    pixels = has_pixels(ds)
    size = decoded_size(ds, p) if pixels else 0
    if budget is not None and size > budget:
        raise DicomError(p, f"its pixels need {size / MiB:.0f} MiB decoded as float32, over the "
                            f"{budget / MiB:.0f} MiB pixel budget")
    inst = Instance(path=p, sop_instance_uid=sop, sop_class_uid=sop_class, series_instance_uid=series_uid,
                    modality=reader.code("Modality"),
                    instance_number=_order_number(ds, "InstanceNumber"),
                    position=_position(reader), frames=reader.integer("NumberOfFrames", 1, lo=1, hi=2**31 - 1) or 1,
                    has_pixels=pixels, pixel_bytes=size)
    for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if k in ds:
            del ds[k]  # the header is evidence; the pixels stay in the file
    return study_uid, ds, inst, _order_number(ds, "SeriesNumber")


def _modality_for_loader(model_config, loader: str) -> str | None:
    return next((name for name, m in model_config.modalities.items() if m.loader == loader), None)


def _ordered(instances: list[Instance]) -> list[Instance]:
    return sorted(instances, key=lambda i: (i.position is None, i.position if i.position is not None else 0.0,
                                            i.instance_number or 0, i.sop_instance_uid))


def select_series(study: Study, model_config, cfg: ReportConfig) -> Selection:
    """Choose the series and the modality that reads it (see the module docstring for the rule)."""
    source = f"study {study.uid}"
    candidates = [s for s in study.series if s.images and
                  (cfg.series_modalities is None or s.modality in cfg.series_modalities)]
    if not candidates:
        have = ", ".join(f"{s.modality or '?'} x{len(s.instances)}" for s in study.series)
        raise DicomError(source, f"no image series to read (series: {have})")
    volume = _modality_for_loader(model_config, "volume")
    image = _modality_for_loader(model_config, "image")
    # the largest series; ties go to the lowest series number (candidates are in series-number order)
    best = max(candidates, key=lambda s: s.slices)
    if volume and best.slices >= cfg.min_volume_slices:
        imgs = _ordered(best.images)
        value = best.folder if len(imgs) > 1 else imgs[0].link
        return Selection(best, volume, "volume", value, imgs,
                         f"series {best.number} ({best.modality}, {best.slices} slices) has >= "
                         f"{cfg.min_volume_slices} slices: whole series through '{volume}'")
    if image:
        imgs = _ordered(best.images)
        mid = imgs[len(imgs) // 2]
        why = (f"series {best.number} ({best.modality}, {best.slices} slice(s)) is the largest of {len(candidates)}; "
               f"its middle instance through '{image}'")
        if volume:
            why += f" (fewer than {cfg.min_volume_slices} slices for '{volume}')"
        return Selection(best, image, "image", mid.link, [mid], why)
    if volume:
        raise DicomError(source, f"the largest series has {best.slices} slice(s), fewer than min_volume_slices="
                                 f"{cfg.min_volume_slices}, and the model has no image modality")
    raise DicomError(source, "the model has neither an 'image' nor a 'volume' loader modality")


def _request(study: Study, selection: Selection, cfg: ReportConfig) -> dict:
    return {"id": study.uid, "modalities": {selection.modality: str(selection.value)}, "question": cfg.question}


def _finding(study: Study, out: dict) -> Finding:
    """A Predictor output -> a Finding, or its typed error (DicomError for unreadable pixels)."""
    if "error" in out:
        cls = DicomError if out["error"] == "DicomError" else InvalidInputError
        raise cls(f"study {study.uid}", f"inference failed ({out['error']}): {out['message']}")
    from .dicom_sr import clean_text

    return Finding(text=clean_text(str(out["answer"])), record=out)


def infer(predictor, study: Study, selection: Selection, cfg: ReportConfig) -> Finding:
    """Ask the model; a failed request raises its typed error (DicomError for unreadable pixels)."""
    return _finding(study, predictor.predict([_request(study, selection, cfg)], cfg.decoding, batch_size=1)[0])


def infer_many(predictor, items: Sequence[tuple[Study, Selection]], cfg: ReportConfig) -> list[Finding | Exception]:
    """Ask the model about several studies in one batched ``predict`` call (HF ``generate`` with left padding:
    greedy answers equal :func:`infer`'s one by one). One entry per study, in order: its Finding, or the typed
    error of that study alone. If the batched call itself raises (a crash inside the model), each study is asked
    again on its own, so one bad study cannot fail its batch-mates."""
    reqs = [_request(study, sel, cfg) for study, sel in items]
    try:
        outs = predictor.predict(reqs, cfg.decoding, batch_size=len(reqs))
    except Exception as e:  # any crash: retry one by one and let each study keep its own outcome
        log.warning("batched inference of %d studies failed (%s); inferring them one by one", len(reqs),
                    type(e).__name__)
        res: list[Finding | Exception] = []
        for study, sel in items:
            try:
                res.append(infer(predictor, study, sel, cfg))
            except Exception as e1:  # noqa: BLE001  (kept as that study's outcome)
                res.append(e1)
        return res
    res = []
    for (study, _), out in zip(items, outs):
        try:
            res.append(_finding(study, out))
        except InvalidInputError as e:
            res.append(e)
    return res


def write_sr(study: Study, selection: Selection, finding: Finding, algorithm, cfg: ReportConfig, predecessor=None,
             fallbacks: list[dict] | None = None):
    """The Comprehensive SR of ``finding`` in ``study``'s own study (see :mod:`medmm.serve.dicom_sr`).

    ``predecessor``: the SR this one amends (a dataset); it must belong to ``study``. ``fallbacks`` receives one
    record per source attribute left out of the SR because its value is invalid (keywords, never values).
    """
    from .dicom_sr import build_report_sr

    with quiet_pydicom():
        if predecessor is not None and str(predecessor.get("StudyInstanceUID", "")) != study.uid:
            raise DicomError(f"study {study.uid}", "the SR to amend is in another study")
        referenced = [study.header(i.sop_instance_uid) for i in selection.instances]
        evidence = ([h for h in study.headers if str(h.get("Modality", "")) not in NON_IMAGE_MODALITIES]
                    or study.headers)
        return build_report_sr(evidence, referenced, finding.text, cfg.question, algorithm, cfg.sr_series_number,
                               cfg.sr_series_description, cfg.institution_name,
                               predecessors=[predecessor] if predecessor is not None else (), fallbacks=fallbacks)


def check_budget(study: Study, selection: Selection, max_decoded_bytes: int) -> int:
    """The pixels the model will decode for ``selection`` (float32 bytes, from the headers); DicomError when that
    is over ``max_decoded_bytes``. Checked before inference: a study over its budget never reaches the model."""
    files = selection.series.instances if selection.value == selection.series.folder else selection.instances
    need = sum(i.pixel_bytes for i in files)
    if need > max_decoded_bytes:
        raise DicomError(f"study {study.uid}", f"the series to read needs {need / MiB:.0f} MiB of decoded pixels "
                                               f"(float32), over the {max_decoded_bytes / MiB:.0f} MiB pixel budget "
                                               "(max_decoded_mib)")
    return need


# ---------------------------------------------------------------------------------------------- the chain
class ReportPipeline:
    """load_study -> select_series -> infer -> write_sr, with one model loaded once.

    Args:
        checkpoint: a medmm model folder (an ``hf`` export or a training checkpoint).
        config: the question, decoding and SR settings.
        device: ``auto``, ``cpu`` or ``cuda``.
        predictor: an already loaded Predictor over ``checkpoint`` (tests, servers sharing one model).
    """

    def __init__(self, checkpoint: str | Path, config: ReportConfig | None = None, device: str = "auto",
                 predictor=None):
        from ..inference.predictor import Predictor
        from .dicom_sr import algorithm_info

        redact_pydicom_values()  # a server: pydicom's log and warnings never carry a header value
        self.config = config or ReportConfig()
        self.predictor = predictor or Predictor(checkpoint, device=device)
        self.algorithm = algorithm_info(checkpoint, self._parameters(self.config))

    @staticmethod
    def _parameters(cfg: ReportConfig) -> dict[str, str]:
        d = cfg.decoding
        return {"question": cfg.question, "strategy": d.strategy, "max_new_tokens": str(d.max_new_tokens),
                **{k: str(v) for k, v in sorted(d.params.items())}, "min_volume_slices": str(cfg.min_volume_slices)}

    def _settings(self, question: str | None):
        """The config and algorithm identification for ``question`` (None: the configured one)."""
        cfg, algorithm = self.config, self.algorithm
        if question is not None and question != cfg.question:
            cfg = dataclasses.replace(cfg, question=question)
            algorithm = dataclasses.replace(algorithm, parameters=self._parameters(cfg))
        return cfg, algorithm

    @staticmethod
    def _read_predecessor(predecessor):
        if isinstance(predecessor, (str, Path)):
            try:
                return open_dataset(predecessor, stop_before_pixels=True)
            except DicomError as e:
                raise DicomError(predecessor, f"the SR to amend is not readable ({e.reason})") from None
        return predecessor

    def _prepare(self, source, work_dir, cfg: ReportConfig) -> tuple[Study, Selection, list[dict]]:
        """load_study -> select_series -> the pixel budget of what the model will read, with their audit entries."""
        steps = []
        t = time.perf_counter()
        budget = cfg.max_decoded_mib * MiB
        study = load_study(source, work_dir, budget)
        steps.append({"op": "load_study", "study_instance_uid": study.uid, "series": len(study.series),
                      "instances": len(study.headers), "rejected_files": len(study.rejected),
                      "s": round(time.perf_counter() - t, 4)})
        t = time.perf_counter()
        sel = select_series(study, self.predictor.model.config, cfg)
        need = check_budget(study, sel, budget)
        steps.append({"op": "select_series", "series_instance_uid": sel.series.uid, "modality": sel.modality,
                      "loader": sel.loader, "instances": len(sel.instances), "reason": sel.reason,
                      "decoded_mib": round(need / MiB, 1), "s": round(time.perf_counter() - t, 4)})
        return study, sel, steps

    @staticmethod
    def _infer_step(finding: Finding, seconds: float, batch: int) -> dict:
        """``batch``: studies inferred together; ``generate_batch``: rows of the generate call that made this
        finding (1 after a fallback to one by one; None for strategies outside HF generate)."""
        return {"op": "infer", "prompt_tokens": finding.record.get("prompt_tokens"),
                "new_tokens": finding.record.get("new_tokens"), "report_chars": len(finding.text), "batch": batch,
                "generate_batch": finding.record.get("batch_size"), "s": round(seconds, 4)}

    def _finish(self, study: Study, sel: Selection, finding: Finding, steps: list[dict], cfg: ReportConfig,
                algorithm, predecessor) -> StudyReport:
        """write_sr, and the study's audit record."""
        t = time.perf_counter()
        fallbacks: list[dict] = []
        sr = write_sr(study, sel, finding, algorithm, cfg, predecessor, fallbacks)
        steps.append({"op": "write_sr", "sop_instance_uid": str(sr.SOPInstanceUID),
                      "series_instance_uid": str(sr.SeriesInstanceUID),
                      "fallbacks": [f["attribute"] for f in fallbacks],  # left out of the SR: keywords only
                      "s": round(time.perf_counter() - t, 4)})
        pre_uid = HeaderReader(predecessor, "predecessor").uid("SOPInstanceUID") if predecessor is not None else None
        record = {"study_instance_uid": study.uid, "sr_sop_instance_uid": str(sr.SOPInstanceUID),
                  "predecessor_sr": pre_uid,
                  "algorithm": {"name": algorithm.name, "version": algorithm.version, "uid": algorithm.uid},
                  "decoding": dataclasses.asdict(cfg.decoding), "steps": steps,
                  "seconds": round(sum(s["s"] for s in steps), 4)}
        return StudyReport(sr=sr, text=finding.text, record=record)

    def run(self, source, work_dir: str | Path | None = None, question: str | None = None,
            predecessor=None) -> StudyReport:
        """One study in, its SR and audit record out. Errors are typed (DicomError, InvalidInputError).

        ``question`` replaces the configured question for this study (and in the SR's algorithm parameters).
        ``predecessor`` (an SR file or dataset of the same study) is the report this one amends: the new SR
        lists it in its Predecessor Documents Sequence, and the record names it as ``predecessor_sr``.
        """
        cfg, algorithm = self._settings(question)
        predecessor = self._read_predecessor(predecessor)
        with contextlib.ExitStack() as stack:
            if work_dir is None:
                work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="medmm-study-"))
            study, sel, steps = self._prepare(source, work_dir, cfg)
            t = time.perf_counter()
            with pixel_budget(cfg.max_decoded_mib * MiB):  # what decodes is held to what the headers promised
                finding = infer(self.predictor, study, sel, cfg)
            steps.append(self._infer_step(finding, time.perf_counter() - t, 1))
            return self._finish(study, sel, finding, steps, cfg, algorithm, predecessor)

    def run_many(self, sources: Sequence, predecessors: Sequence | None = None,
                 question: str | None = None) -> list[StudyReport | Exception]:
        """Several studies in, one batched inference (:func:`infer_many`), one SR per study out.

        Each study is loaded, selected and written on its own, exactly as :meth:`run` does it: a study that
        cannot be loaded, selected, inferred or written fails alone and the others go on. The infer step of each
        record says how many studies shared the ``generate`` call (``batch``) and its wall time (``s``).

        Args:
            sources: one :meth:`run` ``source`` per study (folders, files, lists of paths or datasets); callers
                keep bursts of one study out of the same call (a later burst amends the earlier one's SR).
            predecessors: per study, the SR it amends (file, dataset or None); default none.
            question: as in :meth:`run`, for every study.

        Returns:
            One entry per source, in order: its :class:`StudyReport`, or the exception that failed it (typed:
            DicomError, InvalidInputError; anything else is a crash of that study).
        """
        cfg, algorithm = self._settings(question)
        predecessors = list(predecessors) if predecessors is not None else [None] * len(sources)
        if len(predecessors) != len(sources):
            raise ValueError(f"{len(sources)} sources but {len(predecessors)} predecessors")
        results: list[StudyReport | Exception | None] = [None] * len(sources)
        with contextlib.ExitStack() as stack:
            ready = []  # (index, study, selection, steps, predecessor dataset)
            for i, (source, pre) in enumerate(zip(sources, predecessors)):
                try:
                    pre = self._read_predecessor(pre)
                    work = stack.enter_context(tempfile.TemporaryDirectory(prefix="medmm-study-"))
                    ready.append((i, *self._prepare(source, work, cfg), pre))
                except Exception as e:  # noqa: BLE001  (that study's outcome; the others go on)
                    results[i] = e
            if ready:
                t = time.perf_counter()
                with pixel_budget(cfg.max_decoded_mib * MiB * len(ready)):  # each study was checked on its own
                    findings = infer_many(self.predictor, [(study, sel) for _, study, sel, _, _ in ready], cfg)
                dt = time.perf_counter() - t
                for (i, study, sel, steps, pre), finding in zip(ready, findings):
                    if isinstance(finding, Exception):
                        results[i] = finding
                        continue
                    steps.append(self._infer_step(finding, dt, len(ready)))
                    try:
                        results[i] = self._finish(study, sel, finding, steps, cfg, algorithm, pre)
                    except Exception as e:  # noqa: BLE001
                        results[i] = e
        return results  # type: ignore[return-value]
