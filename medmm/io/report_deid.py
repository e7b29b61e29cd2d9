"""De-identification of free-text reports paired with a DICOM study (``medmm prepare dicom --reports``).

A report names the patient the same way the headers do, so its de-identification starts from the
study's own headers (:func:`identifiers_from_header`) and then adds pattern rules for what headers do
not list. :func:`deidentify_report` finds spans with each detector below, keeps the first of any two
that overlap (e-mail and URLs first, then in the order listed), and writes a token in place of each:

1. names of every person in the headers (patient, other/birth/mother's names, referring, performing,
   reading and requesting physicians, operators: every PN value), in any order and case, with or
   without comma, initials or honorific: ``Doe^Jane^Q`` matches "Jane Doe", "DOE, JANE Q.", "Doe J",
   "J. Q. Doe", "Ms. Doe" -> ``[NAME]`` (an honorific before it is kept: "Ms. [NAME]"). A lone name
   part is removed everywhere unless it is also a clinical or common word ("White", "Mass", "May"):
   such a part goes only next to another name part, an honorific, "patient", or a trailing "MD";
2. header identifiers (patient and other IDs, accession, study, admission, order and procedure IDs,
   station, device serial), with any separators, and their long digit runs alone -> ``[ID]``;
3. institution, department and addresses from the headers (and sub-phrases such as "Example
   Hospital" of "St Example Hospital") -> ``[INSTITUTION]`` / ``[ADDRESS]``; header phone numbers;
4. pattern-based PHI from presidio-analyzer's recognizers, run without any NLP model: e-mail, URL,
   IP address, SSN, credit card, IBAN, NPI, Medicare MBI, NHS number, UK postcode, DEA number
   (``[EMAIL]``, ``[URL]``, ``[ID]``, ``[ADDRESS]``), and phone numbers through Google's
   libphonenumber rules (``[PHONE]``);
5. rules of our own for what presidio has no recognizer for: labelled record numbers ("MRN: 123",
   "Acc # A55", "Encounter 99-12") -> ``[ID]``, street addresses, "ST 12345" ZIP codes and PO boxes
   -> ``[ADDRESS]``, DICOM UIDs -> ``[UID]``, other runs of 6+ digits -> ``[ID]``, ages over 89 ->
   ``[AGE]`` (HIPAA Safe Harbor);
6. dates ("2020-01-15", "01/15/2020", "15.01.2020", "20200115", "Jan 15th, 2020", "15-JAN-2020",
   "January 2020", "March 3") are shifted back by the patient's header offset
   (:func:`medmm.io.deid.date_shift_days`, the one that shifts header dates) and written in the same
   format; the birth date, in any of these formats, becomes ``[DATE]``.

Findings text is left as it is: measurements, scores ("5/5", "T2 N0 M0", "BI-RADS 4") and years
alone are not identifiers here. Headers of one series are the source: a name that appears in no
header of the series and matches no pattern stays (there is no name model).
"""

from __future__ import annotations

import datetime as _dt
import functools
import re
from dataclasses import dataclass, field

from ..utils import optional_import

NAME, ID, DATE, PHONE, EMAIL, URL, ADDRESS, INSTITUTION, UID, AGE = (
    "[NAME]", "[ID]", "[DATE]", "[PHONE]", "[EMAIL]", "[URL]", "[ADDRESS]", "[INSTITUTION]", "[UID]", "[AGE]")

# Header attributes (by keyword, at any depth) that identify, other than person names (every PN is taken).
ID_KEYWORDS = frozenset({
    "PatientID", "OtherPatientIDs", "AccessionNumber", "StudyID", "AdmissionID", "ServiceEpisodeID",
    "RequestedProcedureID", "PerformedProcedureStepID", "ScheduledProcedureStepID", "MedicalRecordLocator",
    "FillerOrderNumberImagingServiceRequest", "PlacerOrderNumberImagingServiceRequest", "InsurancePlanIdentification",
    "StationName", "DeviceSerialNumber", "PlateID", "CassetteID", "DetectorID", "GantryID", "IssuerOfPatientID",
})
INSTITUTION_KEYWORDS = frozenset({"InstitutionName", "InstitutionalDepartmentName", "ResponsibleOrganization",
                                  "ScheduledPatientInstitutionResidence", "CurrentPatientLocation",
                                  "PerformedLocation", "RequestedProcedureLocation"})
ADDRESS_KEYWORDS = frozenset({"PatientAddress", "InstitutionAddress", "ReferringPhysicianAddress", "PersonAddress"})
PHONE_KEYWORDS = frozenset({"PatientTelephoneNumbers", "ReferringPhysicianTelephoneNumbers", "PersonTelephoneNumbers",
                            "OrderCallbackPhoneNumber"})
BIRTH_DATE_KEYWORDS = frozenset({"PatientBirthDate"})

# Name parts that are also clinical or everyday words: removed only in a name context, never alone. Extend it when a
# surname that is also a finding word ("Burns", "Colon", "Minor") turns up.
COMMON_WORDS = frozenset("""
a al an and april art august back ball bell bill black bone bones brain bridge brown bush by cage case chest clay
clear cliff cole cook dale dawn day de dean del dew do dot down drew ed eve faith fall field fields fisher flow ford
foster fox free frank gall gay gil glen gold grace gray green grey guy hall hand hands hart head heart hill hip holly
hope hunter iris ivy jack jade joy june king knee lake lane lee levy liver long low lung lungs main major mark marsh
mass may mesa miles mill moore neck new newman north nurse page park pearl penny pierce pine pole pool price ray reed
rib ribs rich ridge rock rose ross ruby sage salt scan shaft short small snow sky spring stone storm strong summer
sun swift tan terry the tip today town trace vale van vance wall ward wells west white will wing winter wood woods
young apex arch baby banks base beam bird blood block bolt branch bridges bright brook burns chambers child church
clot coil colon cone cord crest cross dark dye early film fine flood foot frost good gross hook hood horn kidney lamb
late light little lock male man minor morrow nail notch pain patch pin plate post power prior rice root rush sharp
shadow shell skin stem tall vessel view walls
""".split())
_PARTICLES = frozenset({"van", "von", "der", "den", "del", "della", "de", "da", "di", "le", "la", "du", "dos", "das",
                        "bin", "ibn", "al", "el", "st"})
# Upper-case "MR", "MS", "DR" need their dot: "MR" and "MS" are also magnetic resonance and multiple sclerosis.
_HONORIFIC = (r"(?:(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Doctor|Professor|Sir|Madam|Mister|MRS|MISS|DOCTOR)\.?|"
              r"(?:MR|MS|DR|PROF)\.)")
_NAME_BEFORE = re.compile(r"(?:" + _HONORIFIC + r"|\b(?i:patient|pt\.?|by|attending|resident|radiologist|"
                          r"physician|signed|dictated|referring|reading|dr\.|mr\.|ms\.|mrs\.?))\s*:?\s*$")
_NAME_AFTER = re.compile(r"^\s*,?\s*(?:M\.?D\b|D\.?O\b|Ph\.?D\b|MBBS\b|FRCR\b|RN\b|R\.?T\b|NP\b|PA-C\b)")
_GENERIC_PLACE = frozenset("""
a and at center centre clinic clinics college community county department dept district general health healthcare
hospital hospitals imaging institute medical memorial of regional radiology saint st the university unit ward
heart children childrens womens women cancer care services service centers main campus north south east west
""".split())

_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_MONTH_NUM = {m.lower(): i + 1 for i, m in enumerate(_MONTHS)}
_MONTH_NUM.update({m[:3].lower(): i + 1 for i, m in enumerate(_MONTHS)})
_MONTH_NUM["sept"] = 9
# Month words in Title or UPPER case only: "may" in lower case is a verb.
_MONTH_RE = "(?:" + "|".join(sorted({w for m in _MONTHS for w in (m, m.upper(), m[:3], m[:3].upper())} |
                                    {"Sept", "SEPT"}, key=len, reverse=True)) + ")"
_ORD = r"(?:st|nd|rd|th|ST|ND|RD|TH)"


@dataclass
class StudyIdentifiers:
    """What the headers of one study (series) say about identity; the input of :func:`deidentify_report`."""

    names: list[tuple[str, ...]] = field(default_factory=list)
    """One (family, given, middle, prefix, suffix) per person named in any PN attribute."""
    ids: list[str] = field(default_factory=list)
    """Patient, accession, study, order and device identifiers."""
    institutions: list[str] = field(default_factory=list)
    """Institution, department and location names."""
    addresses: list[str] = field(default_factory=list)
    """Patient, institution and physician addresses."""
    phones: list[str] = field(default_factory=list)
    """Telephone numbers in the headers."""
    birth_dates: list[_dt.date] = field(default_factory=list)
    """Birth dates: written as [DATE], never shifted."""
    patient_key: str = ""
    """What the date shift depends on (:func:`medmm.io.deid.patient_key`): the report's dates move with the headers'."""


def _values(elem) -> list[str]:
    value = elem.value
    if value is None or value == "":
        return []
    items = list(value) if elem.VM > 1 or isinstance(value, (list, tuple)) else [value]
    return [str(v).strip() for v in items if str(v).strip()]


def _parse_da(value: str) -> _dt.date | None:
    try:
        return _dt.datetime.strptime(value.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def identifiers_from_header(ds) -> StudyIdentifiers:
    """Collect every identifier of a pydicom Dataset (sequences included) that a report may repeat."""
    from pydicom.valuerep import PersonName

    from .deid import patient_key

    ident = StudyIdentifiers(patient_key=patient_key(ds))

    def visit(dataset):
        for elem in dataset:
            if elem.VR == "SQ":
                for item in elem.value or []:
                    visit(item)
                continue
            kw = elem.keyword
            if elem.VR == "PN":
                for v in _values(elem):
                    pn = v if isinstance(v, PersonName) else PersonName(str(v))
                    parts = (pn.family_name, pn.given_name, pn.middle_name, pn.name_prefix, pn.name_suffix)
                    if any(parts):
                        ident.names.append(tuple(str(p).strip() for p in parts))
            elif kw in ID_KEYWORDS:
                ident.ids.extend(_values(elem))
            elif kw in INSTITUTION_KEYWORDS:
                ident.institutions.extend(_values(elem))
            elif kw in ADDRESS_KEYWORDS:
                ident.addresses.extend(_values(elem))
            elif kw in PHONE_KEYWORDS:
                ident.phones.extend(_values(elem))
            elif kw in BIRTH_DATE_KEYWORDS:
                ident.birth_dates.extend(d for d in map(_parse_da, _values(elem)) if d)

    visit(ds)
    return ident


# ----------------------------------------------------------------------------- spans


@dataclass(frozen=True)
class Span:
    """One finding: text[start:end] is replaced by ``replacement``; ``kind`` says which detector found it."""

    start: int
    end: int
    replacement: str
    kind: str


def _boundary(pattern: str) -> str:
    return r"(?<![A-Za-z0-9])(?:" + pattern + r")(?![A-Za-z0-9])"


def _flex_words(text: str, sep: str = r"[\s,.\-'’]*") -> str | None:
    words = re.findall(r"[A-Za-z0-9]+", text)
    return sep.join(re.escape(w) for w in words) if words else None


# --- names


def _name_tokens(person: tuple[str, ...]) -> tuple[set[str], set[str], set[str]]:
    """(full parts, initials, attachments) of one person: attachments (prefix, suffix) never count alone."""
    family, given, middle, prefix, suffix = (list(person) + [""] * 5)[:5]
    fulls: set[str] = set()
    initials: set[str] = set()
    for comp in (family, given, middle):
        comp = comp.strip()
        if not comp:
            continue
        fulls.add(comp)
        for sub in re.split(r"[\s\-]+", comp):
            sub = sub.strip(".,")
            if len(sub) >= 2 and sub.lower() not in _PARTICLES:
                fulls.add(sub)
    for comp in (given, middle):
        for sub in re.split(r"[\s\-]+", comp.strip()):
            if sub[:1].isalpha():
                initials.add(sub[0].upper())
    attach = {a.strip() for a in (prefix, suffix) if a.strip()}
    return fulls, initials, attach


def _part_regex(part: str) -> str:
    out = []
    for ch in part:
        if ch in "'’":
            out.append("['’]?")
        elif ch.isspace() or ch == "-":
            out.append(r"[\s\-]+")
        else:
            out.append(re.escape(ch))
    return "".join(out)


@dataclass(frozen=True)
class _NameRules:
    run: re.Pattern
    """A run of name parts and initials, an honorific before it."""
    full: re.Pattern
    """One full name part (to list the parts found in a run)."""
    weak: frozenset[str]
    """Parts (lower case) that are also common words, or of two letters: never removed alone."""


@functools.lru_cache(maxsize=256)
def _name_rules(people: tuple[tuple[str, ...], ...]) -> _NameRules | None:
    fulls: set[str] = set()
    initials: set[str] = set()
    attach: set[str] = set()
    for person in people:
        f, i, a = _name_tokens(person)
        fulls |= f
        initials |= i
        attach |= a
    if not fulls:
        return None
    full_alt = "|".join(_part_regex(p) for p in sorted(fulls, key=len, reverse=True))
    token = rf"(?:(?i:{full_alt})|(?i:{'|'.join(sorted(initials)) or '(?!)'})\.?"
    if attach:
        token += "|(?i:" + "|".join(_part_regex(p) for p in sorted(attach, key=len, reverse=True)) + r")\.?"
    token += ")"
    # between tokens: a comma, a caret (a PN pasted as is), spaces, or nothing after an initial's dot
    sep = r"(?:\s*[,^]\s*|\s+|(?<=\.))"
    run = re.compile(rf"(?<![\w\-])(?P<hon>{_HONORIFIC}\s*)?(?P<run>{token}(?:{sep}{token})*)(?![\w\-])")
    full = re.compile(rf"(?<![\w\-])(?i:{full_alt})(?![\w\-])")
    weak = frozenset(p.lower() for p in fulls if p.lower() in COMMON_WORDS or len(p) <= 2)
    return _NameRules(run, full, weak)


def _find_names(text: str, ident: StudyIdentifiers) -> list[Span]:
    rules = _name_rules(tuple(tuple(p) for p in ident.names))
    if rules is None:
        return []
    spans = []
    for m in rules.run.finditer(text):
        run = m.group("run")
        parts = [x.group(0) for x in rules.full.finditer(run)]
        if not parts:
            continue  # initials or a suffix alone
        if any(re.sub(r"[\s\-]+", " ", p.lower()) not in rules.weak for p in parts):
            spans.append(Span(m.start("run"), m.end("run"), NAME, "name"))
            continue
        # only parts that are also words ("White", "May"): a name only when written as one and in a name's place
        if not all(p[:1].isupper() for p in parts):
            continue
        context = bool(m.group("hon")) or bool(_NAME_BEFORE.search(text[:m.start()])) or bool(
            _NAME_AFTER.match(text[m.end():]))
        initial = len(re.findall(r"[A-Za-z]+", run)) > len(parts)
        if context or len({p.lower() for p in parts}) >= 2 or initial:
            spans.append(Span(m.start("run"), m.end("run"), NAME, "name"))
    return spans


# --- header identifiers, places, phones


def _find_ids(text: str, ident: StudyIdentifiers) -> list[Span]:
    patterns = set()
    for value in ident.ids:
        chunks = re.findall(r"[A-Za-z0-9]+", value)
        n = sum(len(c) for c in chunks)
        has_digit = any(c.isdigit() for c in "".join(chunks))
        if chunks and (n >= 4 if has_digit else n >= 5):
            patterns.add(r"[\s\-_./:#]*".join(re.escape(c) for c in chunks))
        for digits in re.findall(r"\d+", value):  # "ACC-55501" is often written "55501"
            for d in {digits, digits.lstrip("0")}:
                if len(d) >= 5:
                    patterns.add(re.escape(d))
    if not patterns:
        return []
    rx = re.compile(_boundary("|".join(sorted(patterns, key=len, reverse=True))), re.I)
    return [Span(m.start(), m.end(), ID, "header_id") for m in rx.finditer(text)]


def _place_patterns(value: str) -> list[str]:
    words = re.findall(r"[A-Za-z0-9]+", value)
    if not words:
        return []
    out = []
    full = _flex_words(value)
    if full and sum(len(w) for w in words) >= 4:
        out.append(full)
    # shorter runs of two or more words that keep a distinctive word ("Example Hospital" of "St Example Hospital")
    for i in range(len(words)):
        for j in range(i + 2, len(words) + 1):
            sub = words[i:j]
            if j - i < len(words) and any(w.lower() not in _GENERIC_PLACE and not w.isdigit() and len(w) >= 3
                                          for w in sub):
                out.append(r"[\s,.\-'’]*".join(re.escape(w) for w in sub))
    return out


def _find_places(text: str, ident: StudyIdentifiers) -> list[Span]:
    spans = []
    for values, token, kind in ((ident.institutions, INSTITUTION, "institution"), (ident.addresses, ADDRESS, "address")):
        pats = {p for v in values for p in _place_patterns(v)}
        if pats:
            rx = re.compile(_boundary("|".join(sorted(pats, key=len, reverse=True))), re.I)
            spans += [Span(m.start(), m.end(), token, kind) for m in rx.finditer(text)]
    digits = {re.sub(r"\D", "", p) for p in ident.phones}
    for d in digits:
        if len(d) >= 6:
            rx = re.compile(r"(?<!\d)" + r"[\s\-.()+]*".join(d) + r"(?!\d)")
            spans += [Span(m.start(), m.end(), PHONE, "header_phone") for m in rx.finditer(text)]
    return spans


# --- presidio's pattern recognizers (no NLP model)


@functools.lru_cache(maxsize=1)
def _tld_extract():
    tldextract = optional_import("tldextract")
    # the bundled Public Suffix List snapshot: never fetch it (de-identification must work offline)
    return tldextract.TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True)


@functools.lru_cache(maxsize=1)
def _recognizers():
    pr = optional_import("presidio_analyzer.predefined_recognizers")

    class OfflineEmailRecognizer(pr.EmailRecognizer):
        """presidio's e-mail rule; the top-level-domain check uses the bundled suffix list, not the network."""

        def validate_result(self, pattern_text: str):
            return _tld_extract()(pattern_text.rsplit("@", 1)[-1]).suffix != ""

    return [
        (OfflineEmailRecognizer(), EMAIL),
        (pr.UrlRecognizer(), URL),
        (pr.IpRecognizer(), ID),
        (pr.UsSsnRecognizer(), ID),
        (pr.CreditCardRecognizer(), ID),
        (pr.IbanRecognizer(), ID),
        (pr.UsNpiRecognizer(), ID),
        (pr.UsMbiRecognizer(), ID),
        (pr.NhsRecognizer(), ID),
        (pr.MedicalLicenseRecognizer(), ID),
        (pr.UkPostcodeRecognizer(), ADDRESS),
        (pr.PhoneRecognizer(), PHONE),
    ]


# five digits or more, with separators: no region's phone number is shorter
_DIGIT_RUN = re.compile(r"\d(?:[\s\-.()/+]{0,3}\d){4,}")


def _url_ok(s: str) -> bool:
    """A bare domain counts only in lower case, with a real suffix and a label of 2+ characters: "e.g" and
    "lobe.The" (a missing space) are not URLs."""
    if re.match(r"(?i)(?:[a-z][a-z0-9+.\-]*://|www\.)", s):
        return True
    ext = _tld_extract()(s)
    return s == s.lower() and bool(ext.suffix) and len(ext.domain) >= 2


def _find_presidio(text: str) -> tuple[list[Span], list[Span]]:
    """(spans before dates, phone spans): phones come after dates so "20200115" is a date, not a number."""
    first, phones = [], []
    for rec, token in _recognizers():
        if token == PHONE:
            phones += _find_phones(rec, text)
            continue
        for r in rec.analyze(text, rec.supported_entities, None):
            if r.score <= 0:
                continue
            s = text[r.start:r.end]
            if token == URL:
                end = r.end - (len(s) - len(s.rstrip(".,;:!?)]}'\"")))  # the sentence's punctuation is not the URL's
                if end <= r.start or not _url_ok(text[r.start:end]):
                    continue
                r.end = end
            if token == ADDRESS and r.score < 0.1:
                continue
            first.append(Span(r.start, r.end, token, r.entity_type.lower()))
    return first, phones


def _find_phones(rec, text: str) -> list[Span]:
    """libphonenumber run on the windows around digit runs only: it tries every digit group of what it is given in
    every region, which on a whole report ("6 mm", "series 2") is most of the time taken."""
    windows: list[list[int]] = []
    for m in _DIGIT_RUN.finditer(text):
        a, b = max(0, m.start() - 8), min(len(text), m.end() + 8)  # room for "+", "(" and "ext. 12"
        if windows and a <= windows[-1][1]:
            windows[-1][1] = b
        else:
            windows.append([a, b])
    spans = []
    for a, b in windows:
        for r in rec.analyze(text[a:b], rec.supported_entities, None):
            spans.append(Span(a + r.start, a + r.end, PHONE, "phone_number"))
    return spans


# --- own rules

_LABEL = (r"(?:MRN|MR\s*#|MR\s*No\.?|Medical\s+Record(?:\s+(?:Number|No\.?|#))?|Record\s*(?:#|No\.?|Number)|"
          r"Patient\s*(?:ID|#|No\.?|Number)|Pt\.?\s*(?:ID|#|No\.?)|PID|Hospital\s*(?:#|No\.?|Number)|"
          r"Unit\s*(?:#|No\.?|Number)|Acc(?:ession)?\.?\s*(?:#|No\.?|Number)?|Account\s*(?:#|No\.?|Number)?|"
          r"Encounter\s*(?:ID|#|No\.?|Number)?|Visit\s*(?:ID|#|No\.?|Number)|FIN|CSN|Order\s*(?:ID|#|No\.?|Number)|"
          r"Requisition\s*(?:#|No\.?|Number)?|Case\s*(?:#|No\.?|Number)|Study\s*ID|Exam\s*(?:#|No\.?|Number)|"
          r"SSN|NHS\s*(?:No\.?|Number)?|Member\s*ID|Policy\s*(?:#|No\.?|Number)|Insurance\s*(?:ID|#|No\.?)|ID)")
_LABELLED_ID = re.compile(r"(?<![\w])(?i:" + _LABEL + r")\s*(?:is\s+|[:#=]\s*)?"
                          r"(?P<v>(?=[A-Za-z0-9\-/.]*\d)[A-Za-z0-9][A-Za-z0-9\-/.]*[A-Za-z0-9]|\d)")
_STREET_SUFFIX = (r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|Terrace|"
                  r"Parkway|Pkwy|Highway|Hwy|Circle|Cir|Square|Sq|Trail|Trl|Alley|Plaza|"
                  r"STREET|AVENUE|AVE|ROAD|BOULEVARD|BLVD|LANE|DRIVE|COURT|PLACE|TERRACE|PARKWAY|HIGHWAY|CIRCLE)")
_STATES = ("AL AK AZ AR CA CO CT DE DC FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV NH NJ NM NY NC ND "
           "OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY").split()
_STREET = re.compile(
    r"(?<![\w.])\d{1,6}[A-Za-z]?\s+(?:[NSEW]\.?\s+)?(?:[A-Z][A-Za-z'’\-]*\.?\s+){1,4}" + _STREET_SUFFIX + r"\b\.?"
    r"(?:,?\s*(?:Apt|Apartment|Suite|Ste|Unit|Fl|Floor|#)\.?\s*#?[\w\-]+)?"
    r"(?:,\s*[A-Z][A-Za-z]+(?:\s+[A-Z][A-Za-z]+){0,2})?"
    r"(?:,?\s*(?:" + "|".join(_STATES) + r")\b)?(?:\s+\d{5}(?:-\d{4})?)?")
_ZIP = re.compile(r"\b(?:" + "|".join(_STATES) + r")\s+\d{5}(?:-\d{4})?\b")
_PO_BOX = re.compile(r"(?i)\bP\.?\s*O\.?\s*Box\s+\d+\b")
_DICOM_UID = re.compile(r"(?<![\w.])\d+(?:\.\d+){4,}(?![\w]|\.\d)")
_LONG_NUMBER = re.compile(r"(?<![\w.,/\-])[A-Za-z]{0,3}\d{6,}(?![\w]|[.,]\d)")
_SSN_SHAPE = re.compile(r"(?<![\w\-])\d{3}-\d{2}-\d{4}(?![\w\-])")
_OLD_AGE = re.compile(r"(?i)(?<!\d)(?:9\d|1[0-4]\d)\s*(?:-\s*)?(?:years?|yrs?|y)(?:\s*-?\s*|\.)?(?:old|o\.?)\b|"
                      r"(?i:\bage[d:]?\s*)(?:9\d|1[0-4]\d)\b")


def _find_rules(text: str) -> tuple[list[Span], list[Span]]:
    """(before dates, after dates): long digit runs and UIDs yield to dates ("20200115")."""
    first = [Span(m.start("v"), m.end("v"), ID, "labelled_id") for m in _LABELLED_ID.finditer(text)
             if not re.fullmatch(r"\d{1,2}", m.group("v"))]  # "ID 3" (a figure), not a record number
    first += [Span(m.start(), m.end(), ADDRESS, "street") for m in _STREET.finditer(text)]
    first += [Span(m.start(), m.end(), ADDRESS, "zip") for m in _ZIP.finditer(text)]
    first += [Span(m.start(), m.end(), ADDRESS, "po_box") for m in _PO_BOX.finditer(text)]
    first += [Span(m.start(), m.end(), ID, "ssn") for m in _SSN_SHAPE.finditer(text)]
    first += [Span(m.start(), m.end(), AGE, "age_over_89") for m in _OLD_AGE.finditer(text)]
    after = [Span(m.start(), m.end(), UID, "uid") for m in _DICOM_UID.finditer(text)]
    after += [Span(m.start(), m.end(), ID, "long_number") for m in _LONG_NUMBER.finditer(text)]
    return first, after


# --- dates

_DATE_PATTERNS = [
    # 2020-01-15, 2020/01/15, 2020.01.15
    ("ymd", re.compile(r"(?<![\d.])(?P<y>(?:19|20)\d{2})(?P<s>[-/.])(?P<m>\d{1,2})(?P=s)(?P<d>\d{1,2})(?![\d]|\.\d)")),
    # 01/15/2020, 1-15-20, 15/01/2020 (day first when the first number cannot be a month)
    ("num", re.compile(r"(?<![\d./\-])(?P<a>\d{1,2})(?P<s>[/\-])(?P<b>\d{1,2})(?P=s)(?P<y>\d{4}|\d{2})(?![\d]|[./\-]\d)")),
    # 15.01.2020 (day first)
    ("dmy_dot", re.compile(r"(?<![\d.])(?P<d>\d{1,2})\.(?P<m>\d{1,2})\.(?P<y>(?:19|20)\d{2})(?![\d]|\.\d)")),
    # 20200115
    ("compact", re.compile(r"(?<![\w.])(?P<y>(?:19|20)\d{2})(?P<m>0[1-9]|1[0-2])(?P<d>0[1-9]|[12]\d|3[01])(?![\w]|\.\d)")),
    # January 15th, 2020 / Jan. 15 2020
    ("mdy_name", re.compile(rf"\b(?P<mon>{_MONTH_RE})(?P<dot>\.?)(?P<s1>\s+)(?P<d>\d{{1,2}})(?P<ord>{_ORD})?"
                            r"(?P<s2>,?\s+)(?P<y>(?:19|20)\d{2})(?!\d)")),
    # 15 January 2020 / 15th of Jan 2020 / 15-JAN-2020 / 15-Jan-20
    ("dmy_name", re.compile(rf"(?<![\w.])(?P<d>\d{{1,2}})(?P<ord>{_ORD})?(?P<s1>\s+of\s+|\s+|-)(?P<mon>{_MONTH_RE})"
                            r"(?P<dot>\.?)(?P<s2>,?\s+|-)(?P<y>(?:19|20)\d{2}|\d{2})(?!\d)")),
    # January 2020
    ("my_name", re.compile(rf"\b(?P<mon>{_MONTH_RE})(?P<dot>\.?)(?P<s1>,?\s+)(?P<y>(?:19|20)\d{{2}})(?!\d)")),
    # March 3rd (no year)
    ("md_name", re.compile(rf"\b(?P<mon>{_MONTH_RE})(?P<dot>\.?)(?P<s1>\s+)(?P<d>\d{{1,2}})(?P<ord>{_ORD})?(?![\d:])")),
    # 3 March (no year)
    ("dm_name", re.compile(rf"(?<![\w.])(?P<d>\d{{1,2}})(?P<ord>{_ORD})?(?P<s1>\s+of\s+|\s+)(?P<mon>{_MONTH_RE})\b")),
]


def _year(y: str) -> int:
    if len(y) == 4:
        return int(y)
    pivot = _dt.date.today().year % 100
    return 2000 + int(y) if int(y) <= pivot else 1900 + int(y)


def _fmt_num(value: int, padded: bool) -> str:
    return f"{value:02d}" if padded else str(value)


def _fmt_year(value: int, like: str) -> str:
    return f"{value % 100:02d}" if len(like) == 2 else f"{value:04d}"


def _fmt_month(value: int, like: str) -> str:
    """Month ``value`` written as ``like`` was: full name or abbreviation, Title or UPPER case."""
    full = _MONTHS[value - 1]
    written_full = like.lower() == _MONTHS[_MONTH_NUM[like.lower()] - 1].lower()
    word = full if written_full else "Sept" if value == 9 and like.lower() == "sept" else full[:3]
    return word.upper() if like.isupper() else word


def _ordinal(day: int, like: str) -> str:
    suf = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return suf.upper() if like.isupper() else suf


def _find_dates(text: str, ident: StudyIdentifiers, shift_days: int) -> list[Span]:
    births = set(ident.birth_dates)
    birthdays = {(d.month, d.day) for d in births}
    delta = _dt.timedelta(days=shift_days)
    spans = []
    for kind, rx in _DATE_PATTERNS:
        for m in rx.finditer(text):
            g = m.groupdict()
            try:
                if kind == "num":
                    a, b, y = int(g["a"]), int(g["b"]), _year(g["y"])
                    month_first = 1 <= a <= 12
                    mo, d = (a, b) if month_first else (b, a)
                    date = _dt.date(y, mo, d)
                elif kind in ("ymd", "dmy_dot", "compact"):
                    date = _dt.date(int(g["y"]), int(g["m"]), int(g["d"]))
                elif kind in ("mdy_name", "dmy_name"):
                    date = _dt.date(_year(g["y"]), _MONTH_NUM[g["mon"].lower()], int(g["d"]))
                elif kind == "my_name":
                    date = _dt.date(int(g["y"]), _MONTH_NUM[g["mon"].lower()], 15)
                else:  # no year: a non-leap year unless it is 29 February
                    mo, d = _MONTH_NUM[g["mon"].lower()], int(g["d"])
                    date = _dt.date(2000 if (mo, d) == (2, 29) else 2001, mo, d)
            except ValueError:
                continue  # 13/45/2020 is no date
            has_year = kind not in ("md_name", "dm_name")
            if (has_year and date in births) or (not has_year and (date.month, date.day) in birthdays):
                spans.append(Span(m.start(), m.end(), DATE, "birth_date"))
                continue
            new = date - delta
            # zero padding as written: "01/05/2020" and "11/15/2020" keep two digits, "1/5/2020" keeps one
            nums = [g[k] for k in ("a", "b", "m", "d") if g.get(k)]
            padded = any(x.startswith("0") for x in nums) or (len(nums) == 2 and all(len(x) == 2 for x in nums))
            if kind == "num":
                first, second = (new.month, new.day) if month_first else (new.day, new.month)
                out = f"{_fmt_num(first, padded)}{g['s']}{_fmt_num(second, padded)}{g['s']}{_fmt_year(new.year, g['y'])}"
            elif kind == "ymd":
                out = f"{new.year:04d}{g['s']}{_fmt_num(new.month, padded)}{g['s']}{_fmt_num(new.day, padded)}"
            elif kind == "dmy_dot":
                out = f"{_fmt_num(new.day, padded)}.{_fmt_num(new.month, padded)}.{new.year:04d}"
            elif kind == "compact":
                out = new.strftime("%Y%m%d")
            else:
                mon = _fmt_month(new.month, g["mon"]) + (g.get("dot") or "")
                day = _fmt_num(new.day, (g.get("d") or "").startswith("0")) + (_ordinal(new.day, g["ord"]) if g.get("ord") else "")
                if kind == "mdy_name":
                    out = f"{mon}{g['s1']}{day}{g['s2']}{_fmt_year(new.year, g['y'])}"
                elif kind == "dmy_name":
                    out = f"{day}{g['s1']}{mon}{g['s2']}{_fmt_year(new.year, g['y'])}"
                elif kind == "my_name":
                    out = f"{mon}{g['s1']}{new.year:04d}"
                elif kind == "md_name":
                    out = f"{mon}{g['s1']}{day}"
                else:
                    out = f"{day}{g['s1']}{mon}"
            spans.append(Span(m.start(), m.end(), out, "date"))
    return spans


# ----------------------------------------------------------------------------- the function


def find_phi(text: str, ident: StudyIdentifiers | None = None, shift_days: int = 0) -> list[Span]:
    """Every span of ``text`` to replace, in text order, overlaps resolved (earlier detectors win, then longer)."""
    ident = ident or StudyIdentifiers()
    presidio_first, phones = _find_presidio(text)
    rules_first, rules_after = _find_rules(text)
    # e-mail and URLs first: "john.smith@example.org" is one e-mail, not two names
    ordered = [
        presidio_first, _find_names(text, ident), _find_ids(text, ident), _find_places(text, ident),
        rules_first, _find_dates(text, ident, shift_days), phones, rules_after,
    ]
    taken: list[Span] = []
    occupied = bytearray(len(text))
    for group in ordered:
        for s in sorted(group, key=lambda s: (-(s.end - s.start), s.start)):
            if s.end > s.start and not any(occupied[s.start:s.end]):
                taken.append(s)
                occupied[s.start:s.end] = b"\x01" * (s.end - s.start)
    return sorted(taken, key=lambda s: s.start)


def deidentify_report(text: str, ident: StudyIdentifiers | None = None, shift_days: int = 0) -> str:
    """Report text with identifiers replaced by tokens and dates shifted back by ``shift_days``.

    Args:
        text: the report (any length; findings are left as written).
        ident: identifiers from the study's headers (:func:`identifiers_from_header`); None uses patterns only.
        shift_days: the patient's date offset, the one :func:`medmm.io.deid.deidentify` applied to header dates.

    Returns:
        The de-identified text.
    """
    if not text:
        return text
    out, pos = [], 0
    for s in find_phi(text, ident, shift_days):
        out.append(text[pos:s.start])
        out.append(s.replacement)
        pos = s.end
    out.append(text[pos:])
    return "".join(out)


def deidentify_row(row: dict, ident: StudyIdentifiers | None, salt: str,
                   columns: tuple[str, ...] = ("report", "question", "answer")) -> dict:
    """A copy of a report/VQA CSV row whose text ``columns`` are de-identified with the patient's date shift."""
    from .deid import date_shift_days

    shift = date_shift_days(salt, ident.patient_key) if ident is not None and ident.patient_key else 0
    return {k: (deidentify_report(v, ident, shift) if k in columns and isinstance(v, str) else v)
            for k, v in row.items()}
