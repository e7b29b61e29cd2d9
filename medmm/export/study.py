"""From a DICOM study to a DICOM SR: an auditable chain of small operators.

    load_study(source, work_dir)         files, a folder or in-memory datasets -> Study (headers, a folder per series)
    select_series(study, model, cfg)     which series, through which model modality, and why
    infer(predictor, study, sel, cfg)    the question through medmm.inference.predictor.Predictor -> Finding
    write_sr(study, sel, finding, alg)   a Comprehensive SR in the source study (medmm.export.dicom_sr), listing
                                         the SR it amends (``predecessor``) in its Predecessor Documents Sequence

:class:`ReportPipeline` chains them (``run``); ``run_many`` reports several studies with one batched
``infer_many`` (each study loaded, selected and written on its own, so a study that fails fails alone; greedy
answers equal ``run``'s). Each step appends one entry to the study's audit trail
(``StudyReport.record["steps"]``: what it did, on which UIDs, how long it took). Records hold UIDs,
counts and timings, never patient names, IDs or the report text, so they can go to ordinary logs.

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

log = logging.getLogger("medmm.pacs")
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


def _position(ds) -> float | None:
    """Slice position along the normal of ImageOrientationPatient; None without geometry."""
    import numpy as np

    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if not ipp or not iop or len(iop) != 6:
        return None
    normal = np.cross(np.array(iop[:3], float), np.array(iop[3:], float))
    return float(np.dot(normal, np.array(ipp, float)))


def _int(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def load_study(source: str | Path | Sequence, work_dir: str | Path) -> Study:
    """Read one study's headers and lay its series out under ``work_dir/series/<n>/``.

    Args:
        source: a DICOM file, a folder (searched recursively; hidden files, such as partly received ones,
            are skipped), a list of paths, or a list of pydicom Datasets (what DICOMweb and DIMSE deliver;
            they are written into ``work_dir``).
        work_dir: a scratch folder owned by the caller (deleted by :class:`ReportPipeline` after the run).

    Raises:
        DicomError: no readable instance, or instances of more than one study.
    """
    import pydicom

    work = Path(work_dir)
    incoming = work / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    label = str(source) if isinstance(source, (str, Path)) else f"{len(source)} instance(s)"
    if isinstance(source, (str, Path)):
        p = Path(source)
        if not p.exists():
            raise DicomError(p, "no such file or folder")
        paths = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()
                                               and not any(part.startswith(".") for part in q.relative_to(p).parts))
    else:
        for i, item in enumerate(source):
            if isinstance(item, (str, Path)):
                paths.append(Path(item))
            else:  # an in-memory dataset
                _ensure_file_meta(item)
                dest = incoming / f"{i:06d}.dcm"
                item.save_as(dest, enforce_file_format=True)
                paths.append(dest)
    rejected: list[dict] = []
    entries = []
    for p in paths:
        if p.name.upper() == "DICOMDIR":
            continue
        try:
            ds = pydicom.dcmread(p, defer_size=1024)  # pixel data stays on disk
            sop, study_uid, series_uid = str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        except Exception as e:  # pydicom raises many types on non-DICOM or broken headers
            rejected.append(DicomError(p, f"not a readable DICOM instance ({type(e).__name__}: {e})").to_record())
            continue
        has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
        for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if k in ds:
                del ds[k]  # the header is evidence; the pixels stay in the file
        inst = Instance(path=p, sop_instance_uid=sop, sop_class_uid=str(ds.SOPClassUID), series_instance_uid=series_uid,
                        modality=str(ds.get("Modality", "")), instance_number=_int(ds.get("InstanceNumber")),
                        position=_position(ds), frames=_int(ds.get("NumberOfFrames")) or 1, has_pixels=has_pixels)
        entries.append((study_uid, ds, inst))
    if not entries:
        raise DicomError(label, "no readable DICOM instance" + (f" ({len(rejected)} file(s) rejected)" if rejected else ""))
    studies = sorted({e[0] for e in entries})
    if len(studies) > 1:
        raise DicomError(label, f"instances of {len(studies)} studies; send one study at a time")
    by_series: dict[str, list] = {}
    for _, ds, inst in entries:
        by_series.setdefault(inst.series_instance_uid, []).append((ds, inst))
    series = []
    for n, (uid, items) in enumerate(sorted(by_series.items(), key=lambda kv: (_int(kv[1][0][0].get("SeriesNumber"))
                                                                                or 0, kv[0]))):
        folder = work / "series" / f"{n:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for _, inst in items:
            link = folder / f"{inst.sop_instance_uid}.dcm"
            try:
                os.symlink(inst.path.resolve(), link)
            except OSError:
                shutil.copy2(inst.path, link)
        ds0 = items[0][0]
        series.append(Series(uid=uid, modality=str(ds0.get("Modality", "")), number=_int(ds0.get("SeriesNumber")),
                             folder=folder, instances=[inst for _, inst in items]))
    return Study(uid=studies[0], series=series, headers=[ds for _, ds, _ in entries], rejected=rejected)


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
        value = best.folder if len(imgs) > 1 else best.folder / f"{imgs[0].sop_instance_uid}.dcm"
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
        return Selection(best, image, "image", best.folder / f"{mid.sop_instance_uid}.dcm", [mid], why)
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


def write_sr(study: Study, selection: Selection, finding: Finding, algorithm, cfg: ReportConfig, predecessor=None):
    """The Comprehensive SR of ``finding`` in ``study``'s own study (see :mod:`medmm.export.dicom_sr`).

    ``predecessor``: the SR this one amends (a dataset); it must belong to ``study``.
    """
    from .dicom_sr import build_report_sr

    if predecessor is not None and str(predecessor.StudyInstanceUID) != study.uid:
        raise DicomError(f"study {study.uid}", f"the SR to amend ({predecessor.SOPInstanceUID}) is in another study")
    referenced = [study.header(i.sop_instance_uid) for i in selection.instances]
    evidence = [h for h in study.headers if str(h.get("Modality", "")) not in NON_IMAGE_MODALITIES] or study.headers
    return build_report_sr(evidence, referenced, finding.text, cfg.question, algorithm, cfg.sr_series_number,
                           cfg.sr_series_description, cfg.institution_name,
                           predecessors=[predecessor] if predecessor is not None else ())


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
            import pydicom

            try:
                return pydicom.dcmread(predecessor, stop_before_pixels=True)
            except Exception as e:  # pydicom raises many types on broken files
                raise DicomError(predecessor, f"the SR to amend is not readable ({type(e).__name__}: {e})") from e
        return predecessor

    def _prepare(self, source, work_dir, cfg: ReportConfig) -> tuple[Study, Selection, list[dict]]:
        """load_study -> select_series, with their audit entries."""
        steps = []
        t = time.perf_counter()
        study = load_study(source, work_dir)
        steps.append({"op": "load_study", "study_instance_uid": study.uid, "series": len(study.series),
                      "instances": len(study.headers), "rejected_files": len(study.rejected),
                      "s": round(time.perf_counter() - t, 4)})
        t = time.perf_counter()
        sel = select_series(study, self.predictor.model.config, cfg)
        steps.append({"op": "select_series", "series_instance_uid": sel.series.uid, "modality": sel.modality,
                      "loader": sel.loader, "instances": len(sel.instances), "reason": sel.reason,
                      "s": round(time.perf_counter() - t, 4)})
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
        sr = write_sr(study, sel, finding, algorithm, cfg, predecessor)
        steps.append({"op": "write_sr", "sop_instance_uid": str(sr.SOPInstanceUID),
                      "series_instance_uid": str(sr.SeriesInstanceUID), "s": round(time.perf_counter() - t, 4)})
        record = {"study_instance_uid": study.uid, "sr_sop_instance_uid": str(sr.SOPInstanceUID),
                  "predecessor_sr": str(predecessor.SOPInstanceUID) if predecessor is not None else None,
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
