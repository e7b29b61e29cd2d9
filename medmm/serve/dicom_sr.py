"""DICOM Comprehensive SR for a generated report (highdicom), and the reader that checks one.

The document follows the shape of TID 2000 (Basic Diagnostic Imaging Report)::

    CONTAINER  Diagnostic Imaging Report (LN 18748-4)
      HAS CONCEPT MOD  Language of Content: English (United States)
      HAS OBS CONTEXT  Observer Type: Device; Device Observer UID/Name/Manufacturer/Model = the model
      CONTAINS  CONTAINER Request (DCM 121062)
                  CONTAINS TEXT Request: the question asked
      CONTAINS  CONTAINER Findings (DCM 121070)
                  CONTAINS TEXT Finding (DCM 121071): the generated report
                    INFERRED FROM  IMAGE  Source image (one per instance the model saw)
                    HAS CONCEPT MOD  Algorithm Name / Version / Parameters (TID 4019)

It is written in the source study (same Study Instance UID, patient and study modules copied from
the source by highdicom), in a new series, with every source instance listed in the Current
Requested Procedure Evidence Sequence. ``VerificationFlag = UNVERIFIED``, ``CompletionFlag =
COMPLETE``, ``PreliminaryFlag = PRELIMINARY``: a clinician must verify it before it counts.

A report that amends an earlier one (more instances of the study arrived, the study was run again) lists
that SR in its Predecessor Documents Sequence (0040,A360), so a PACS shows one report lineage per study
rather than unrelated documents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import DicomError
from ..io.dicom import HeaderReader, open_dataset, quiet_pydicom, valid_copy

SERIES_DESCRIPTION = "medmm AI report (UNVERIFIED)"
# Hash whole weight files up to this size; above it, size + first and last MiB (a 14 GB LLM stays fast).
_FULL_HASH_BYTES = 64 << 20


@dataclass
class AlgorithmInfo:
    """Who wrote the report: stamped into the SR as device observer and TID 4019 algorithm identification."""

    name: str
    """Algorithm name, e.g. ``medmm/checkpoint``."""
    version: str
    """medmm version and the weights fingerprint."""
    uid: str
    """A DICOM UID derived from the fingerprint: the same weights always get the same UID."""
    fingerprint: str
    """sha256 over the model folder's config, tokenizer and weight files."""
    parameters: dict[str, str] = field(default_factory=dict)
    """Settings that shaped the output (decoding, question, series rule)."""


def fingerprint_model(checkpoint: str | Path) -> str:
    """sha256 of a model folder's files (config, tokenizer, weights); large files by size + head + tail."""
    root = Path(checkpoint)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file() and not q.name.startswith(".")):
        size = p.stat().st_size
        h.update(f"{p.relative_to(root)}\0{size}\0".encode())
        with open(p, "rb") as f:
            if size <= _FULL_HASH_BYTES:
                h.update(f.read())
            else:
                h.update(f.read(1 << 20))
                f.seek(-(1 << 20), 2)
                h.update(f.read())
    return h.hexdigest()


def algorithm_info(checkpoint: str | Path, parameters: dict[str, str] | None = None) -> AlgorithmInfo:
    """The algorithm identification of a model folder."""
    from pydicom.uid import generate_uid

    fp = fingerprint_model(checkpoint)
    name = f"medmm/{Path(checkpoint).resolve().name}"
    return AlgorithmInfo(name=name, version=f"medmm {__version__}; weights sha256:{fp[:16]}",
                         uid=str(generate_uid(prefix="2.25.", entropy_srcs=[fp])), fingerprint=fp,
                         parameters=dict(parameters or {}))


def _codes():
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return {
        "report": hd.sr.CodedConcept("18748-4", "LN", "Diagnostic Imaging Report"),
        "english": hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)"),
        "request": codes.DCM.Request,
        "findings": codes.DCM.Findings,
        "finding": codes.DCM.Finding,
        "source_image": codes.DCM.SourceImage,
        "device": codes.DCM.Device,
    }


def build_report_sr(evidence: Sequence, referenced: Sequence, text: str, question: str, algorithm: AlgorithmInfo,
                    series_number: int = 9901, series_description: str = SERIES_DESCRIPTION,
                    institution_name: str | None = None, predecessors: Sequence = (),
                    fallbacks: list[dict] | None = None):
    """A highdicom ComprehensiveSR carrying ``text``.

    Patient and study attributes are copied from the first evidence instance only when their values are valid
    for their VR (:func:`medmm.io.dicom.valid_copy`: a calendar date, a time, a person name of at most five
    components, an age, ``M``/``F``/``O`` for PatientSex ...). Fallback: an invalid one is left out (a type 2
    attribute is written empty) and recorded in ``fallbacks`` by keyword, never by value; UIDs must be valid.

    Args:
        evidence: every source instance's header (pydicom Datasets of one study; pixel data not needed).
        referenced: the headers of the instances the model saw (``INFERRED FROM`` image references).
        text: the generated report.
        question: the prompt the model answered.
        algorithm: the model's identification.
        series_number, series_description, institution_name: the new SR series' attributes.
        predecessors: earlier SRs of this study that this one amends (datasets or headers with the Study,
            Series, SOP Class and SOP Instance UIDs), written to the Predecessor Documents Sequence.
        fallbacks: receives ``{"attribute", "problem", "fallback": None}`` per source attribute left out.

    Raises:
        DicomError: a source instance's UIDs are missing or invalid, or highdicom refuses what is left (the
            message names no value).
    """
    if not evidence:
        raise ValueError("an SR needs at least one source instance as evidence")
    fallbacks = fallbacks if fallbacks is not None else []
    with quiet_pydicom():  # pydicom's value warnings quote the values; the copies below are validated instead
        study_uid = _uid(evidence[0], "StudyInstanceUID")
        for pre in predecessors:
            if _uid(pre, "StudyInstanceUID") != study_uid:
                raise ValueError(f"predecessor SR {_uid(pre, 'SOPInstanceUID')} belongs to another study")
        try:
            return _build_report_sr(evidence, referenced, text, question, algorithm, series_number,
                                    series_description, institution_name, predecessors, fallbacks)
        except DicomError:
            raise
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            # highdicom's and pydicom's messages quote the offending value: only its type is kept
            raise DicomError("SR", f"the SR cannot be written ({type(e).__name__})") from None


def _build_report_sr(evidence, referenced, text, question, algorithm, series_number, series_description,
                     institution_name, predecessors, fallbacks):
    import highdicom as hd
    from pydicom.uid import generate_uid

    c = _codes()
    device = hd.sr.ObserverContext(
        observer_type=c["device"],
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm.uid, name=algorithm.name[:64], manufacturer_name="medmm", model_name=algorithm.name[:64]))
    finding = hd.sr.TextContentItem(name=c["finding"], value=clean_text(text) or "(the model generated no text)",
                                    relationship_type="CONTAINS")
    children = [hd.sr.ImageContentItem(name=c["source_image"], referenced_sop_class_uid=_uid(ds, "SOPClassUID"),
                                       referenced_sop_instance_uid=_uid(ds, "SOPInstanceUID"),
                                       relationship_type="INFERRED FROM")
                for ds in referenced]
    params = [f"{k}={v}" for k, v in algorithm.parameters.items()]
    children += list(hd.sr.AlgorithmIdentification(algorithm.name, algorithm.version, params or None,
                                                   manufacturer="medmm"))
    finding.ContentSequence = hd.sr.ContentSequence(children)
    findings = hd.sr.ContainerContentItem(name=c["findings"], relationship_type="CONTAINS")
    findings.ContentSequence = hd.sr.ContentSequence([finding])
    request = hd.sr.ContainerContentItem(name=c["request"], relationship_type="CONTAINS")
    request.ContentSequence = hd.sr.ContentSequence(
        [hd.sr.TextContentItem(name=c["request"], value=question, relationship_type="CONTAINS")])
    root = hd.sr.ContainerContentItem(name=c["report"], template_id="2000")
    root.ContentSequence = hd.sr.ContentSequence(
        [*hd.sr.LanguageOfContentItemAndDescendants(language=c["english"]),
         *hd.sr.ObservationContext(observer_device_context=device), request, findings])
    source = evidence[0]
    sr = hd.sr.ComprehensiveSR(
        evidence=[_first_evidence(source, fallbacks), *(_uids(ds) for ds in evidence[1:])], content=root,
        series_instance_uid=generate_uid(),
        series_number=series_number, sop_instance_uid=generate_uid(), instance_number=1, manufacturer="medmm",
        is_complete=True, is_final=False, is_verified=False, institution_name=institution_name,
        series_description=series_description, specific_character_set="ISO_IR 192",  # UTF-8: free text
        previous_versions=[_uids(p) for p in predecessors] or None)
    for kw in PATIENT_KEYWORDS:  # the whole patient module, not only the four attributes highdicom copies
        elem = valid_copy(source, kw, fallbacks)
        if elem is not None:
            sr[elem.tag] = elem
    sr.ManufacturerModelName = algorithm.name[:64]
    sr.SoftwareVersions = algorithm.version[:64]
    return sr


# The Patient module (and the patient-level parts of Patient Study), copied from the source as they are.
PATIENT_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "TypeOfPatientID",
    "PatientBirthDate", "PatientBirthTime", "PatientSex", "OtherPatientIDsSequence", "OtherPatientNames",
    "EthnicGroup", "PatientComments", "PatientSpeciesDescription", "PatientSpeciesCodeSequence",
    "PatientBreedDescription", "PatientBreedCodeSequence", "BreedRegistrationSequence", "ResponsiblePerson",
    "ResponsiblePersonRole", "ResponsibleOrganization", "PatientIdentityRemoved", "DeidentificationMethod",
    "DeidentificationMethodCodeSequence", "QualityControlSubject", "PatientAge", "PatientSize", "PatientWeight",
)
# Type 2 attributes highdicom reads from the first evidence instance; absent ones are written empty.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")


def _first_evidence(ds, fallbacks: list[dict]):
    """A copy of the study-level header of ``ds``: its UIDs, and the type 2 attributes whose values are valid
    (empty where the source has none or an invalid one, which is recorded in ``fallbacks``)."""
    head = _uids(ds)
    for kw in _TYPE2:
        elem = valid_copy(ds, kw, fallbacks)
        if elem is not None:
            head[elem.tag] = elem
        else:
            setattr(head, kw, None)
    return head


def _uid(ds, keyword: str) -> str:
    """A UID of a source instance; DicomError (naming the attribute, not the value) when missing or invalid."""
    return HeaderReader(ds, "SR source").uid(keyword, required=True)


def _uids(ds):
    """The four UIDs an evidence or Predecessor Documents Sequence item needs, from a dataset or a file header."""
    from pydicom.dataset import Dataset

    out = Dataset()
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"):
        setattr(out, kw, _uid(ds, kw))
    return out


def clean_text(text: str) -> str:
    """Drop control characters a DICOM text value may not hold (TAB, LF, FF and CR are allowed)."""
    return "".join(ch for ch in text if ch in "\t\n\f\r" or not (ord(ch) < 32 or 127 <= ord(ch) < 160)).strip()


def _walk(items, depth=0):
    for it in items or []:
        yield it, depth
        yield from _walk(it.get("ContentSequence"), depth + 1)


def read_report(sr) -> dict:
    """What a medmm SR says: report text, question, referenced instances, algorithm, flags, study and predecessors.

    ``sr`` is a path or a pydicom Dataset; the file is parsed with pydicom only (no highdicom), as a PACS
    viewer would.
    """
    ds = open_dataset(sr) if isinstance(sr, (str, Path)) else sr
    out: dict = {"sop_class_uid": str(ds.SOPClassUID), "sop_instance_uid": str(ds.SOPInstanceUID),
                 "study_instance_uid": str(ds.StudyInstanceUID), "series_instance_uid": str(ds.SeriesInstanceUID),
                 "verification_flag": str(ds.get("VerificationFlag", "")),
                 "completion_flag": str(ds.get("CompletionFlag", "")),
                 "preliminary_flag": str(ds.get("PreliminaryFlag", "")),
                 "text": None, "question": None, "referenced_sop_instance_uids": [], "algorithm": {"parameters": []},
                 "device_observer_uid": None, "evidence_sop_instance_uids": [], "predecessor_sop_instance_uids": []}
    for item, _ in _walk(ds.ContentSequence):
        code = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else None
        vtype = item.get("ValueType")
        if vtype == "TEXT" and code == "121071":
            out["text"] = str(item.TextValue)
        elif vtype == "TEXT" and code == "121062":
            out["question"] = str(item.TextValue)
        elif vtype == "IMAGE":
            out["referenced_sop_instance_uids"].append(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
        elif vtype == "TEXT" and code == "111001":
            out["algorithm"]["name"] = str(item.TextValue)
        elif vtype == "TEXT" and code == "111003":
            out["algorithm"]["version"] = str(item.TextValue)
        elif vtype == "TEXT" and code == "111002":
            out["algorithm"]["parameters"].append(str(item.TextValue))
        elif vtype == "UIDREF" and code == "121012":  # Device Observer UID
            out["device_observer_uid"] = str(item.UID)
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.ReferencedSeriesSequence:
            out["evidence_sop_instance_uids"] += [str(x.ReferencedSOPInstanceUID) for x in series.ReferencedSOPSequence]
    for study in ds.get("PredecessorDocumentsSequence", []):
        for series in study.ReferencedSeriesSequence:
            out["predecessor_sop_instance_uids"] += [str(x.ReferencedSOPInstanceUID)
                                                     for x in series.ReferencedSOPSequence]
    return out
