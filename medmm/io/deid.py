"""De-identification after DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile,
with the Retain Longitudinal Temporal Information with Modified Dates option.

What :func:`deidentify` does to a pydicom Dataset (in place):

* every attribute of the profile's table that carries identity is removed (X), emptied (Z) or
  replaced by a dummy (D); patient name and ID become a salted pseudonym, so studies of one patient
  stay linked;
* catch-alls on top of the table: every person name (PN) is replaced, every remaining
  date/time (DA/DT) is shifted, every UID (UI) except well-known DICOM UIDs (SOP classes, transfer
  syntaxes, coding schemes) is remapped, private tags, overlays and curves are dropped, sequences
  are processed recursively;
* dates are shifted by a whole number of days that depends only on (salt, patient ID), so
  intervals within a patient are kept; UIDs map to ``2.25.<hash(salt, uid)>``: the same salt gives
  the same mapping on a re-run, and references between files stay consistent;
* ``PatientIdentityRemoved=YES`` and the ``DeidentificationMethodCodeSequence`` (113100, 113107)
  record what was done.

Images with ``BurnedInAnnotation=YES`` cannot be cleaned by header edits: :func:`burned_in` tells
the caller to skip and list them.

The salt is a secret: whoever knows it can hash candidate MRNs and match pseudonyms. There is no
default in the code; :func:`resolve_salt` takes the one given, else ``$MEDMM_DEID_SALT``, else a random
one kept in ``OUT/.deid_salt`` (mode 0600) so that re-runs into the same folder map alike.
Report text is de-identified with the same date shift by :mod:`medmm.io.report_deid`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from ..errors import InvalidInputError

SALT_ENV = "MEDMM_DEID_SALT"
"""Environment variable that holds the salt when none is given."""
SALT_FILE = ".deid_salt"
"""File in the output folder that keeps a generated salt (mode 0600)."""

# PS3.15 Table E.1-1 (Basic Profile) attributes, by keyword. Action: "X" remove, "Z" empty, "D" dummy.
BASIC_PROFILE: dict[str, str] = {
    "AccessionNumber": "Z", "AcquisitionComments": "X", "AcquisitionDeviceProcessingDescription": "X",
    "AdditionalPatientHistory": "X", "AdmissionID": "X", "AdmittingDiagnosesCodeSequence": "X",
    "AdmittingDiagnosesDescription": "X", "Allergies": "X", "Arbitrary": "X", "AuthorObserverSequence": "X",
    "BranchOfService": "X", "CassetteID": "X", "CommentsOnThePerformedProcedureStep": "X",
    "ConfidentialityConstraintOnPatientDataDescription": "X", "ContentCreatorIdentificationCodeSequence": "X",
    "ContentCreatorName": "Z", "ContributionDescription": "X", "CountryOfResidence": "X",
    "CurrentPatientLocation": "X", "CustodialOrganizationSequence": "X", "DataSetTrailingPadding": "X",
    "DerivationDescription": "X", "DetectorID": "X", "DeviceSerialNumber": "X", "DeviceUID": "X",
    "DigitalSignaturesSequence": "X", "DischargeDiagnosisDescription": "X", "DistributionAddress": "X",
    "DistributionName": "X", "EthnicGroup": "X", "FillerOrderNumberImagingServiceRequest": "Z",
    "FrameComments": "X", "GantryID": "X", "GeneratorID": "X", "HumanPerformerName": "X",
    "HumanPerformerOrganization": "X", "IconImageSequence": "X", "IdentifyingComments": "X",
    "ImageComments": "X", "ImagePresentationComments": "X", "ImagingServiceRequestComments": "X",
    "Impressions": "X", "InstitutionAddress": "X", "InstitutionCodeSequence": "X", "InstitutionName": "X",
    "InstitutionalDepartmentName": "X", "InsurancePlanIdentification": "X",
    "IntendedRecipientsOfResultsIdentificationSequence": "X", "InterpretationApproverSequence": "X",
    "InterpretationAuthor": "X", "InterpretationDiagnosisDescription": "X", "InterpretationIDIssuer": "X",
    "InterpretationRecorder": "X", "InterpretationText": "X", "InterpretationTranscriber": "X",
    "IssuerOfAdmissionID": "X", "IssuerOfPatientID": "X", "IssuerOfServiceEpisodeID": "X",
    "MedicalAlerts": "X", "MedicalRecordLocator": "X", "MilitaryRank": "X", "ModifiedAttributesSequence": "X",
    "ModifyingDeviceID": "X", "ModifyingDeviceManufacturer": "X", "NameOfPhysiciansReadingStudy": "X",
    "NamesOfIntendedRecipientsOfResults": "X", "Occupation": "X", "OperatorIdentificationSequence": "X",
    "OperatorsName": "X", "OriginalAttributesSequence": "X", "OrderCallbackPhoneNumber": "X",
    "OrderEnteredBy": "X", "OrderEntererLocation": "X", "OtherPatientIDs": "X", "OtherPatientIDsSequence": "X",
    "OtherPatientNames": "X", "ParticipantSequence": "X", "PatientAddress": "X", "PatientAge": "X",
    "PatientBirthDate": "Z", "PatientBirthName": "X", "PatientBirthTime": "X", "PatientComments": "X",
    "PatientInsurancePlanCodeSequence": "X", "PatientMotherBirthName": "X", "PatientPrimaryLanguageCodeSequence": "X",
    "PatientReligiousPreference": "X", "PatientSize": "X", "PatientState": "X", "PatientTelephoneNumbers": "X",
    "PatientTelecomInformation": "X", "PatientTransportArrangements": "X", "PatientWeight": "X",
    "PerformedLocation": "X", "PerformedProcedureStepDescription": "X", "PerformedProcedureStepID": "X",
    "PerformingPhysicianIdentificationSequence": "X", "PerformingPhysicianName": "X",
    "PersonAddress": "X", "PersonIdentificationCodeSequence": "X", "PersonName": "D", "PersonTelephoneNumbers": "X",
    "PhysicianApprovingInterpretation": "X", "PhysiciansOfRecord": "X",
    "PhysiciansOfRecordIdentificationSequence": "X", "PhysiciansReadingStudyIdentificationSequence": "X",
    "PlacerOrderNumberImagingServiceRequest": "Z", "PlateID": "X", "PreMedication": "X", "PregnancyStatus": "X",
    "ProtocolName": "X", "ReasonForTheImagingServiceRequest": "X", "ReasonForStudy": "X",
    "ReferencedPatientAliasSequence": "X", "ReferencedPatientPhotoSequence": "X", "ReferencedPatientSequence": "X",
    "ReferencedStudySequence": "X", "ReferringPhysicianAddress": "X",
    "ReferringPhysicianIdentificationSequence": "X", "ReferringPhysicianName": "Z",
    "ReferringPhysicianTelephoneNumbers": "X", "RegionOfResidence": "X", "RequestAttributesSequence": "X",
    "RequestedContrastAgent": "X", "RequestedProcedureComments": "X", "RequestedProcedureDescription": "X",
    "RequestedProcedureID": "X", "RequestedProcedureLocation": "X", "RequestingPhysician": "X",
    "RequestingService": "X", "ResponsibleOrganization": "X", "ResponsiblePerson": "X", "ResultsComments": "X",
    "ResultsDistributionListSequence": "X", "ResultsIDIssuer": "X", "ReviewerName": "X",
    "ScheduledHumanPerformersSequence": "X", "ScheduledPatientInstitutionResidence": "X",
    "ScheduledPerformingPhysicianIdentificationSequence": "X", "ScheduledPerformingPhysicianName": "X",
    "ScheduledProcedureStepDescription": "X", "ScheduledProcedureStepID": "X", "ScheduledStationAETitle": "X",
    "ScheduledStationGeographicLocationCodeSequence": "X", "ScheduledStationName": "X",
    "ScheduledStationNameCodeSequence": "X", "ServiceEpisodeDescription": "X", "ServiceEpisodeID": "X",
    "SmokingStatus": "X", "SourceImageSequence": "X", "SpecialNeeds": "X", "StationName": "X",
    "StudyComments": "X", "StudyDescription": "X", "StudyID": "Z", "StudyIDIssuer": "X", "TextComments": "X",
    "TextString": "X", "TopicAuthor": "X", "TopicKeywords": "X", "TopicSubject": "X", "TopicTitle": "X",
    "VerifyingObserverIdentificationCodeSequence": "X", "VerifyingObserverName": "D",
    "VerifyingObserverSequence": "D", "VerifyingOrganization": "X", "VisitComments": "X",
    "SeriesDescription": "X", "RequestedProcedureCodeSequence": "X",
    "ProcedureCodeSequence": "X", "AdmittingDate": "X", "AdmittingTime": "X", "DischargeDate": "X",
    "DischargeTime": "X", "LastMenstrualDate": "X", "PatientSexNeutered": "X",
}
# UIDs that name DICOM concepts (not instances) are kept: SOP classes, transfer syntaxes, coding schemes.
_DICOM_ROOT = "1.2.840.10008."
_KEEP_UID_KEYWORDS = {"SOPClassUID", "ReferencedSOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID",
                      "ImplementationClassUID", "CodingSchemeUID", "ContextGroupExtensionCreatorUID",
                      "MappingResourceUID", "AffectedSOPClassUID", "RequestedSOPClassUID"}


def resolve_salt(out_dir: str | Path, salt: str | None = None) -> tuple[str, str]:
    """The salt to use for ``out_dir`` and where it came from.

    Args:
        out_dir: the output folder; a generated salt is kept there as :data:`SALT_FILE`.
        salt: the salt given by the user (``--salt``); empty or None means "not given".

    Returns:
        ``(salt, source)`` with source ``"given"``, ``"env"`` (``$MEDMM_DEID_SALT``), ``"file"`` (an existing
        ``OUT/.deid_salt``, reused) or ``"new"`` (a random 256-bit secret just written to ``OUT/.deid_salt``).

    Raises:
        InvalidInputError: the salt file exists but is empty or unreadable.
    """
    if salt:
        return salt, "given"
    if os.environ.get(SALT_ENV):
        return os.environ[SALT_ENV], "env"
    path = Path(out_dir) / SALT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    new = secrets.token_hex(32)
    try:
        # O_EXCL: two runs starting together cannot both write; 0600: only the owner may read it
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fd = None
    if fd is None:
        try:
            if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                os.chmod(path, 0o600)  # copied with looser permissions: tighten before reading
            kept = path.read_text().strip()
        except OSError as e:
            raise InvalidInputError(path, f"de-identification salt file cannot be read ({e})") from e
        if not kept:
            raise InvalidInputError(path, "de-identification salt file is empty: delete it to make a new one, "
                                          "or pass --salt / $MEDMM_DEID_SALT")
        return kept, "file"
    with os.fdopen(fd, "w") as f:
        f.write(new + "\n")
    os.chmod(path, 0o600)  # whatever the umask did
    return new, "new"


def patient_key(ds) -> str:
    """The value pseudonyms and the date shift of a patient are derived from (PatientID, else the name)."""
    return str(ds.get("PatientID", "")) or str(ds.get("PatientName", "")) or "unknown"


def pseudonym(salt: str, value: str, n: int = 16) -> str:
    """A stable pseudonym: the first ``n`` hex digits of HMAC-SHA256(salt, value)."""
    return hmac.new(salt.encode(), str(value).encode(), hashlib.sha256).hexdigest()[:n]


def remap_uid(salt: str, uid: str) -> str:
    """Deterministic UID under the ``2.25`` (UUID-derived) root; at most 64 characters."""
    digest = hmac.new(salt.encode(), str(uid).encode(), hashlib.sha256).digest()[:16]
    return "2.25." + str(int.from_bytes(digest, "big"))


def date_shift_days(salt: str, patient_id: str, max_days: int = 3650) -> int:
    """A per-patient shift in days (back in time, 1..max_days)."""
    return 1 + int(pseudonym(salt, "date-shift|" + str(patient_id), 12), 16) % max_days


def _shift_da(value: str, days: int) -> str:
    try:
        d = _dt.datetime.strptime(value.strip()[:8], "%Y%m%d")
    except ValueError:
        return ""
    return (d - _dt.timedelta(days=days)).strftime("%Y%m%d")


def _shift_dt(value: str, days: int) -> str:
    v = value.strip()
    if len(v) < 8:
        return ""
    return _shift_da(v[:8], days) + v[8:]


def burned_in(ds) -> bool:
    """True when the image declares burned-in annotation (pixels may show identity)."""
    return str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES"


def deidentify(ds, salt: str) -> dict:
    """De-identify ``ds`` in place. Returns {"patient_pseudonym", "date_shift_days"} (for the manifest)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    if not salt:
        raise ValueError("de-identification needs a non-empty salt (keep it secret and fixed across runs)")
    pid = patient_key(ds)
    pseudo = pseudonym(salt, "patient|" + pid)
    days = date_shift_days(salt, pid)

    def visit(dataset):
        dataset.remove_private_tags()
        for elem in list(dataset):
            tag = elem.tag
            if 0x5000 <= tag.group <= 0x50FF or 0x6000 <= tag.group <= 0x60FF:
                del dataset[tag]  # curves and overlays can carry burned-in style annotations
                continue
            kw = elem.keyword
            action = BASIC_PROFILE.get(kw)
            if action == "X":
                del dataset[tag]
                continue
            if action == "Z":
                elem.value = "" if elem.VR != "SQ" else Sequence([])
                continue
            if action == "D":
                if elem.VR == "SQ":
                    del dataset[tag]
                else:
                    elem.value = "ANONYMOUS" if elem.VR == "PN" else ""
                continue
            if elem.VR == "SQ":
                for item in elem.value:
                    visit(item)
            elif elem.VR == "PN":
                elem.value = "ANONYMOUS" if kw != "PatientName" else f"ANON^{pseudo[:8]}"
            elif elem.VR == "UI" and kw not in _KEEP_UID_KEYWORDS and elem.value:
                vals = elem.value if isinstance(elem.value, list) or elem.VM > 1 else [elem.value]
                new = [v if str(v).startswith(_DICOM_ROOT) else remap_uid(salt, str(v)) for v in vals]
                elem.value = new if len(new) > 1 else new[0]
            elif elem.VR == "DA" and elem.value:
                elem.value = _shift_da(str(elem.value), days) if elem.VM == 1 else [
                    _shift_da(str(v), days) for v in elem.value]
            elif elem.VR == "DT" and elem.value:
                elem.value = _shift_dt(str(elem.value), days)
            elif kw in ("PatientID",):
                elem.value = pseudo
            elif elem.VR in ("LO", "SH", "LT", "ST", "UT") and "Patient" in kw and kw not in (
                    "PatientSex", "PatientPosition", "PatientOrientation"):
                del dataset[tag]

    visit(ds)
    if hasattr(ds, "file_meta"):
        fm = ds.file_meta
        if "MediaStorageSOPInstanceUID" in fm and fm.MediaStorageSOPInstanceUID:
            fm.MediaStorageSOPInstanceUID = remap_uid(salt, str(fm.MediaStorageSOPInstanceUID))
    ds.PatientID = pseudo
    ds.PatientName = f"ANON^{pseudo[:8]}"
    ds.PatientIdentityRemoved = "YES"
    ds.LongitudinalTemporalInformationModified = "MODIFIED"
    ds.DeidentificationMethod = "medmm PS3.15 Basic Profile + Retain Longitudinal Temporal Info (Modified Dates)"
    codes = []
    for value, meaning in (("113100", "Basic Application Confidentiality Profile"),
                           ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")):
        c = Dataset()
        c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, "DCM", meaning
        codes.append(c)
    ds.DeidentificationMethodCodeSequence = Sequence(codes)
    return {"patient_pseudonym": pseudo, "date_shift_days": days}
