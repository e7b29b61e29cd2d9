"""DICOM -> float32 images in modality units with metadata; series -> MONAI MetaTensor volumes.

* ``HeaderReader``: the one way medmm reads a DICOM header value. Every attribute medmm uses is declared
  in :data:`HEADER_ATTRIBUTES` and read through it; an invalid value (not a number, empty, several values
  where one is expected, a wrong VR, an absurd size) becomes a :class:`~medmm.errors.DicomError` naming the
  file, or a documented fallback recorded in ``meta["fallbacks"]``. It never raises anything else.
* ``read_dicom(path)``: one file (any transfer syntax pydicom decodes with the pylibjpeg plugins),
  modality LUT (rescale slope/intercept or LUT sequence) applied, MONOCHROME1 inverted, palette and
  YBR converted to RGB, multi-frame kept as frames. Returns :class:`DicomImage`.
* ``window(img, preset | (center, width))``: VOI windowing to [0, 1].
* ``assemble_series(images)`` / ``read_volumes(folder)``: one series -> the volumes it holds. Exact
  duplicates are kept once and reported, slices sharing a position are split by AcquisitionNumber,
  EchoNumbers, TemporalPositionIdentifier, TriggerTime, DiffusionBValue or ImageType, missing slices
  are reported with their positions (``on_gap``: keep, split or reject), and slices are ordered by their
  position along the slice normal (never by file name or InstanceNumber). A series is rejected only
  when nothing separates slices that share a position.
* ``read_series(folder)``: the single volume of a series as ``(1, D, H, W)`` MetaTensor with its RAS
  affine, spacing taken from the positions, uneven spacing, gaps and gantry tilt reported.

Metadata never includes patient identifiers: only geometry, modality and UIDs needed downstream, and
fallback records never quote the invalid value (it could be an identifier). Neither do errors: pydicom's
messages are passed on with quoted values removed, and its value warnings are silenced (:func:`quiet_pydicom`;
servers also call :func:`redact_pydicom_values`). :func:`valid_copy` copies a value into a new object (an SR) only
when it is valid for its VR.

Memory: pixels are counted as the float32 array read_dicom returns. One file may ask for at most
:data:`MAX_DECODED_BYTES`; inside :func:`pixel_budget` (servers: one per request) every decode is charged to the
budget before it happens; a Deflated file is inflated in bounded steps before pydicom reads it
(:func:`open_dataset`). All of it is decided from the header, before any decoding.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DicomError

log = logging.getLogger(__name__)

WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    # name: (center, width) in HU
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
}

HEADER_ATTRIBUTES: dict[str, str] = {
    # keyword: VR. Every header value medmm reads, each read through HeaderReader (a keyword missing here is
    # a programming error). Fuzz tests make each of them invalid in turn.
    "TransferSyntaxUID": "UI", "SOPClassUID": "UI", "SOPInstanceUID": "UI", "StudyInstanceUID": "UI",
    "SeriesInstanceUID": "UI", "FrameOfReferenceUID": "UI", "StudyDate": "DA", "Modality": "CS",
    "AccessionNumber": "SH", "BodyPartExamined": "CS", "BurnedInAnnotation": "CS", "PatientID": "LO",
    "PatientName": "PN", "ImageType": "CS", "PhotometricInterpretation": "CS",
    "Rows": "US", "Columns": "US", "SamplesPerPixel": "US", "BitsAllocated": "US", "BitsStored": "US",
    "HighBit": "US", "PixelRepresentation": "US", "NumberOfFrames": "IS", "LUTDescriptor": "US",
    "PixelSpacing": "DS", "SliceThickness": "DS", "SpacingBetweenSlices": "DS", "ImageOrientationPatient": "DS",
    "ImagePositionPatient": "DS", "WindowCenter": "DS", "WindowWidth": "DS", "RescaleSlope": "DS",
    "RescaleIntercept": "DS", "AcquisitionNumber": "IS", "EchoNumbers": "IS", "TemporalPositionIdentifier": "IS",
    "TriggerTime": "DS", "DiffusionBValue": "FD",
}

FLOAT_BYTES = 4
"""Bytes per sample of what read_dicom returns (float32): the measure of every pixel cap and budget."""
MAX_DECODED_BYTES = 4 * 2**30
"""Largest pixel array read_dicom returns, in bytes after conversion to float32 (a header asking for more is an
absurd size). Servers set a tighter budget per request with :func:`pixel_budget`."""
MAX_INFLATED_BYTES = 2**30
"""Largest dataset a Deflated Explicit VR Little Endian file may inflate to (pydicom inflates it whole, in memory,
as it reads the header); checked in bounded steps before pydicom reads the file."""
INFLATE_SLACK_BYTES = 64 * 2**20
"""How far a deflated dataset may inflate past the pixel data its header declares (the other elements)."""
MAX_COORDINATE_MM = 1e6
"""Positions, spacings and thicknesses beyond this (in mm) are absurd and treated as invalid."""
POSITION_TOLERANCE_MM = 1e-3
"""Slices whose positions along the normal differ by less than this share one position."""
SPLIT_KEYS: tuple[tuple[str, str], ...] = (
    # (meta key, DICOM keyword): what can separate slices that share a position, tried in this order
    ("acquisition_number", "AcquisitionNumber"), ("echo_numbers", "EchoNumbers"),
    ("temporal_position", "TemporalPositionIdentifier"), ("trigger_time", "TriggerTime"),
    ("diffusion_b_value", "DiffusionBValue"), ("image_type", "ImageType"),
)
ON_GAP = ("keep", "split", "reject")
"""What a missing slice does to its volume: kept and reported, split into runs, or the volume rejected."""
MAX_GAP_POSITIONS = 1000
"""At most this many missing-slice positions are listed per series (``SeriesReport.gaps`` has the counts)."""

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_INT = re.compile(r"^[+-]?[0-9]+$")
_CS = re.compile(r"^[A-Z0-9 _]{1,16}$")
_DEC = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$")
_STRUCTURAL_DICOMDIR = "1.2.840.10008.1.3.10"


# ----------------------------------------------------------------------------- the header reader


class _Invalid(Exception):
    """A value that cannot be used; the message says why without quoting the value."""


class _Quiet:
    """Process-wide state of :func:`quiet_pydicom`: the first thread in switches pydicom's validation off, the
    last one out restores it (a server reads in several threads at once; one leaving must not switch the
    warnings back on under another)."""

    lock = threading.Lock()
    depth = 0
    saved: tuple | None = None


@contextlib.contextmanager
def quiet_pydicom():
    """Read and write without pydicom's value validation: its warnings quote the value, which may identify a
    patient, and medmm validates every value it uses itself (HeaderReader). pydicom's own log is quiet inside
    too (decoder failures become DicomError). Changes process-wide settings while any thread is inside (nested
    and concurrent use is counted: the settings come back when the last one leaves)."""
    from pydicom import config

    with _Quiet.lock:
        if _Quiet.depth == 0:
            settings, pydicom_log = config.settings, logging.getLogger("pydicom")
            caught = warnings.catch_warnings()
            caught.__enter__()
            warnings.simplefilter("ignore", UserWarning)
            _Quiet.saved = (settings.reading_validation_mode, settings.writing_validation_mode, pydicom_log.level,
                            caught)
            settings.reading_validation_mode = settings.writing_validation_mode = config.IGNORE
            pydicom_log.setLevel(logging.CRITICAL)  # decoder failures are logged with tracebacks; medmm raises
        _Quiet.depth += 1
    try:
        yield
    finally:
        with _Quiet.lock:
            _Quiet.depth -= 1
            if _Quiet.depth == 0:
                reading, writing, level, caught = _Quiet.saved
                config.settings.reading_validation_mode, config.settings.writing_validation_mode = reading, writing
                logging.getLogger("pydicom").setLevel(level)
                caught.__exit__(None, None, None)
                _Quiet.saved = None


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def _redact(text: str) -> str:
    """``text`` with every quoted part replaced: pydicom quotes the offending value in its messages."""
    return _QUOTED.sub("'<value>'", text)


class _RedactValues(logging.Filter):
    """Rewrites pydicom's log records without the values they quote (``Invalid value for VR DA: '...'``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            record.msg, record.args = _redact(record.getMessage()), ()
        except Exception:  # a record that cannot be formatted is dropped rather than logged raw
            return False
        return True


def redact_pydicom_values() -> None:
    """For servers: pydicom's log records and its value warnings never carry a header value, even outside
    :func:`quiet_pydicom` (a value read late, a library that writes DICOM). Installs a filter on the ``pydicom``
    logger that replaces quoted values, and ignores pydicom's "Invalid value" warnings; idempotent."""
    pydicom_log = logging.getLogger("pydicom")
    if not any(isinstance(f, _RedactValues) for f in pydicom_log.filters):
        pydicom_log.addFilter(_RedactValues())
        for pattern in (r"(?s).*Invalid value", r"(?s).*value length .* exceeds", r"(?s).*Unable to convert",
                        r"(?s).*not a valid"):
            warnings.filterwarnings("ignore", message=pattern, category=UserWarning)


def _why(e: BaseException, limit: int = 200) -> str:
    """``Type: message`` of an exception from pydicom or numpy for an error message, quoted values removed."""
    return f"{type(e).__name__}: {_redact(str(e))[:limit]}"


def _as_list(value) -> list:
    """An element value -> list of its values ([] when empty). Strings are stripped and split on backslashes."""
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError as e:
            raise _Invalid("holds binary data where text or a number is expected") from e
        if any(not (c.isprintable() or c in "\x00") for c in value):
            raise _Invalid("holds binary data where text or a number is expected")
    if isinstance(value, str):
        value = value.strip("\x00 ")
        if not value:
            return []
        return [v.strip("\x00 ") for v in value.split("\\")] if "\\" in value else [value]
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        out = []
        for v in value:
            out.extend(_as_list(v) if isinstance(v, (str, bytes, bytearray)) else [v])
        return out
    return [value]


def _parse_int(v) -> int:
    if isinstance(v, bool):
        raise _Invalid("is not an integer")
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        if math.isfinite(v) and v.is_integer():
            return int(v)
        raise _Invalid("is not an integer")
    s = str(v).strip()
    if _INT.match(s):
        return int(s)
    if _DEC.match(s):  # "2.0": an integer written as a decimal (IS often is)
        f = float(s)
        if math.isfinite(f) and f.is_integer() and abs(f) < 2**63:
            return int(f)
    raise _Invalid("is not an integer")


def _parse_float(v) -> float:
    if isinstance(v, bool):
        raise _Invalid("is not a number")
    if isinstance(v, (int, float)):
        f = float(v)
    else:
        s = str(v).strip()
        if not _DEC.match(s):
            raise _Invalid("is not a number")
        f = float(s)
    if not math.isfinite(f):
        raise _Invalid("is not a finite number")
    return f


def _range_check(lo, hi, nonzero=False):
    def check(v):
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise _Invalid(f"is out of range ({lo}..{hi})")
        if nonzero and v == 0:
            raise _Invalid("is zero")

    return check


class HeaderReader:
    """Reads the header values medmm uses from one dataset; raises only :class:`DicomError` naming the file.

    Each accessor takes the keyword (declared in :data:`HEADER_ATTRIBUTES`), a ``default`` returned when the
    attribute is absent, and ``required`` (absent or invalid -> DicomError) / ``strict`` (invalid ->
    DicomError, absent -> default). Otherwise an invalid value (cannot be decoded, not a number, empty,
    several values where one is expected, out of range) returns ``default`` and appends a record
    ``{"attribute", "problem", "fallback"}`` to :attr:`fallbacks`. Records never quote the invalid value.

    Args:
        ds: a pydicom Dataset (or a sequence item).
        source: the file, named in errors.
        fallbacks: list the records go to (shared with sub-readers of sequence items).
        prefix: name of the sequence item the reader looks into, for the records.
    """

    def __init__(self, ds, source: str | Path, fallbacks: list[dict] | None = None, prefix: str = ""):
        self.ds = ds
        self.source = str(source)
        self.fallbacks: list[dict] = [] if fallbacks is None else fallbacks
        self.prefix = prefix

    def item(self, ds, name: str) -> HeaderReader:
        """A reader for a sequence item, recording into the same fallback list."""
        return HeaderReader(ds, self.source, self.fallbacks, f"{self.prefix}{name}.")

    # -- raw access

    def _container(self, keyword: str):
        if keyword not in HEADER_ATTRIBUTES:
            raise KeyError(f"{keyword} is not declared in HEADER_ATTRIBUTES")
        if keyword == "TransferSyntaxUID":
            return getattr(self.ds, "file_meta", None)
        return self.ds

    def present(self, keyword: str) -> bool:
        """True when the attribute is in the dataset (whatever its value)."""
        from pydicom.datadict import tag_for_keyword

        ds = self._container(keyword)
        try:
            return ds is not None and tag_for_keyword(keyword) in ds
        except Exception:
            return False

    def _values(self, keyword: str) -> list | None:
        """The values as a list, None when absent; raises _Invalid when the element cannot be decoded."""
        from pydicom.datadict import tag_for_keyword

        if not self.present(keyword):
            return None
        try:
            with quiet_pydicom():
                value = self._container(keyword)[tag_for_keyword(keyword)].value
        except Exception as e:  # wrong length for its VR, undecodable bytes, broken sequence
            raise _Invalid(f"cannot be decoded ({type(e).__name__})") from e
        return _as_list(value)

    def _bad(self, keyword: str, problem: str, default, required: bool):
        name = self.prefix + keyword
        if required:
            raise DicomError(self.source, f"{name} {problem}")
        rec = {"attribute": name, "problem": problem, "fallback": default}
        if rec not in self.fallbacks:  # the same attribute read twice is one fallback
            self.fallbacks.append(rec)
            log.debug("%s: %s %s; using %r", self.source, name, problem, default)
        return default

    def _read(self, keyword, default, required, strict, n, parse, check):
        """Parsed values, or _Sentinel when ``default`` applies (absent, or invalid and recorded)."""
        try:
            vals = self._values(keyword)
            if vals is None:
                if required:
                    raise DicomError(self.source, f"{self.prefix}{keyword} is missing")
                return _Sentinel
            if not vals:
                raise _Invalid("is empty")
            if n is not None and len(vals) != n:
                what = "one is" if n == 1 else f"{n} are"
                raise _Invalid(f"has {len(vals)} values where {what} expected")
            out = [parse(v) for v in vals]
            for v in out:
                if check is not None:
                    check(v)
            return out
        except _Invalid as e:
            self._bad(keyword, str(e), default, required or strict)
            return _Sentinel

    # -- typed accessors

    def integer(self, keyword: str, default: int | None = None, *, lo: int | None = None, hi: int | None = None,
                choices: tuple[int, ...] | None = None, required: bool = False, strict: bool = False) -> int | None:
        """One integer (IS, US, UL, SS ...), within [lo, hi] and among ``choices`` when given."""

        def check(v):
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise _Invalid(f"is out of range ({lo}..{hi})")
            if choices is not None and v not in choices:
                raise _Invalid(f"is not one of {list(choices)}")

        out = self._read(keyword, default, required, strict, 1, _parse_int, check)
        return default if out is _Sentinel else out[0]

    def number(self, keyword: str, default: float | None = None, *, lo: float | None = None,
               hi: float | None = None, first: bool = False, nonzero: bool = False, required: bool = False,
               strict: bool = False) -> float | None:
        """One finite number (DS, FD ...) within [lo, hi]; ``first`` takes the first of several values
        (WindowCenter may hold one per VOI) instead of treating several as invalid."""
        out = self._read(keyword, default, required, strict, None if first else 1, _parse_float,
                         _range_check(lo, hi, nonzero))
        return default if out is _Sentinel else out[0]

    def numbers(self, keyword: str, n: int | None, default=None, *, lo: float | None = None, hi: float | None = None,
                nonzero: bool = False, required: bool = False, strict: bool = False):
        """Exactly ``n`` finite numbers (any count when ``n`` is None), each within [lo, hi]."""

        out = self._read(keyword, default, required, strict, n, _parse_float, _range_check(lo, hi, nonzero))
        return default if out is _Sentinel else out

    def uid(self, keyword: str, default: str = "", *, required: bool = False) -> str:
        """One UID: digits and dots, at most 64 characters."""

        def parse(v):
            s = str(v).strip()
            if len(s) > 64:
                raise _Invalid("is longer than 64 characters")
            if not _UID.match(s):
                raise _Invalid("is not a valid UID")
            return s

        out = self._read(keyword, default, required, False, 1, parse, None)
        return default if out is _Sentinel else out[0]

    def date(self, keyword: str, default: str = "") -> str:
        """One date as YYYYMMDD (a calendar date between 1800 and 2999; ``YYYY.MM.DD`` accepted)."""
        import datetime as dt

        def parse(v):
            s = str(v).strip().replace(".", "") if len(str(v).strip()) == 10 else str(v).strip()
            try:
                d = dt.datetime.strptime(s, "%Y%m%d")
            except ValueError as e:
                raise _Invalid("is not a valid date") from e
            if not 1800 <= d.year <= 2999 or len(s) != 8:
                raise _Invalid("is not a plausible date")
            return s

        out = self._read(keyword, default, False, False, 1, parse, None)
        return default if out is _Sentinel else out[0]

    def code(self, keyword: str, default: str = "") -> str:
        """One code string (CS): at most 16 upper-case letters, digits, spaces or underscores."""

        def parse(v):
            s = str(v).strip()
            if not _CS.match(s):
                raise _Invalid("is not a valid code string")
            return s

        out = self._read(keyword, default, False, False, 1, parse, None)
        return default if out is _Sentinel else out[0]

    def text(self, keyword: str, default: str = "", *, max_len: int = 1024) -> str:
        """Text of a string attribute; several values are joined with a backslash."""

        def parse(v):
            s = str(v)
            if len(s) > max_len:
                raise _Invalid(f"is longer than {max_len} characters")
            return s

        out = self._read(keyword, default, False, False, None, parse, None)
        return default if out is _Sentinel else "\\".join(out)

    def sequence(self, keyword_or_tag) -> list:
        """Items of a sequence ([] when absent); an undecodable sequence is recorded and read as absent."""
        try:
            if keyword_or_tag not in self.ds:
                return []
            with quiet_pydicom():
                value = self.ds[keyword_or_tag].value
            return list(value) if value is not None else []
        except Exception as e:
            self.fallbacks.append({"attribute": f"{self.prefix}{keyword_or_tag}",
                                   "problem": f"cannot be decoded ({type(e).__name__})", "fallback": None})
            return []


class _SentinelType:
    pass


_Sentinel = _SentinelType()


def _set(ds, keyword: str, value) -> None:
    """Replace an element with a clean one of its dictionary VR (so pydicom's decoder reads a valid value)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import DataElement

    tag = tag_for_keyword(keyword)
    ds[tag] = DataElement(tag, dictionary_VR(tag), value)


# ----------------------------------------------------------------------------- the decoded-pixel budget


class PixelBudget:
    """Bytes of float32 pixels one request may still decode (see :func:`pixel_budget`)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.used = 0

    @property
    def remaining(self) -> int:
        return self.max_bytes - self.used


_BUDGET: contextvars.ContextVar[PixelBudget | None] = contextvars.ContextVar("medmm_pixel_budget", default=None)


@contextlib.contextmanager
def pixel_budget(max_bytes: int):
    """A budget of decoded pixels for the block (this thread or task only; an inner one replaces an outer one).

    Every :func:`read_dicom` inside charges what it will return (float32 bytes, computed from the header) before
    it decodes, and raises DicomError instead when that is more than what is left; :func:`open_dataset` inflates
    a deflated dataset only up to what is left. Servers wrap each request in one, so that one upload cannot
    claim more memory than that however its pixels are compressed. Yields the :class:`PixelBudget`.
    """
    budget = PixelBudget(max_bytes)
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _charge(source: str, decoded: int, what: str) -> None:
    """Check ``decoded`` float32 bytes of one file against the per-file cap and the budget in force, and charge it."""
    if decoded > MAX_DECODED_BYTES:
        raise DicomError(source, f"the header asks for {decoded / 2**30:.1f} GiB of pixels as float32 ({what})")
    budget = _BUDGET.get()
    if budget is not None:
        if decoded > budget.remaining:
            raise DicomError(source, f"the pixels need {_mib(decoded)} decoded as float32 ({what}), more than the "
                                     f"{_mib(budget.remaining)} left of the {_mib(budget.max_bytes)} pixel budget")
        budget.used += decoded


def decoded_size(ds, source: str | Path) -> int:
    """Bytes of the float32 array :func:`read_dicom` would return for ``ds``, from its header alone (no decoding;
    native pixel data may stay deferred on disk). The frame count is the one read_dicom would use: NumberOfFrames,
    or when it is invalid the frames the pixel data holds. Raises DicomError for a pixel module read_dicom
    would refuse (Rows, Columns, SamplesPerPixel, BitsAllocated missing or invalid), and 0 without pixel data."""
    reader = HeaderReader(ds, source)
    if not has_pixels(ds):
        return 0
    rows = reader.integer("Rows", required=True, lo=1, hi=65535)
    cols = reader.integer("Columns", required=True, lo=1, hi=65535)
    spp = reader.integer("SamplesPerPixel", required=True, choices=(1, 3, 4))
    bits = reader.integer("BitsAllocated", required=True, choices=(1, 8, 16, 32, 64))
    frames = reader.integer("NumberOfFrames", 1, lo=1, hi=2**31 - 1) or 1
    if any(f["attribute"] == "NumberOfFrames" for f in reader.fallbacks):  # invalid: what the data holds
        keyword = next(k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds)
        with quiet_pydicom():
            raw = ds.get_item(keyword)  # a deferred value stays on disk: only its length is needed
            length = getattr(raw, "length", None)
            undefined = length == 0xFFFFFFFF if length is not None else bool(getattr(raw, "is_undefined_length",
                                                                                     False))
            if undefined:
                frames = _encapsulated_frames(ds[keyword].value) or 0
            else:
                length = length if length is not None else len(ds[keyword].value or b"")
                frames = length // max(1, (rows * cols * spp * bits + 7) // 8)
        if not frames:
            raise DicomError(source, "NumberOfFrames is invalid and the pixel data holds no whole frame")
    return rows * cols * spp * frames * FLOAT_BYTES


# ----------------------------------------------------------------------------- one file


@dataclass
class DicomImage:
    """Pixels ``(frames, H, W)`` (grey, modality units) or ``(frames, H, W, 3)`` (colour), plus metadata."""

    pixels: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def is_color(self) -> bool:
        return self.pixels.ndim == 4


def open_dataset(path: str | Path, stop_before_pixels: bool = False, defer_size: int | str | None = None,
                 max_decoded_bytes: int | None = None):
    """pydicom Dataset of one file, or DicomError naming it.

    A Deflated Explicit VR Little Endian file is checked before pydicom reads it (pydicom inflates the whole
    dataset in memory as it reads even the header, so a few hundred KB could otherwise claim GBs): refused when
    its header declares more pixels (float32 bytes) than ``max_decoded_bytes`` (default
    :data:`MAX_DECODED_BYTES`), or when it inflates past that or :data:`MAX_INFLATED_BYTES`, whichever is
    less (inflated in bounded steps, output discarded). A :func:`pixel_budget` in force lowers both limits to
    what is left of it.

    Fallback: a file without the ``DICM`` preamble (an old ACR-NEMA-style dataset) is read with ``force``
    and kept only when it holds DICOM attributes (a SOP class, or pixel data with a size); anything else is
    "not a DICOM file".
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    inflated, pixels = MAX_INFLATED_BYTES, MAX_DECODED_BYTES
    budget = _BUDGET.get()
    for cap in (max_decoded_bytes, budget.remaining if budget is not None else None):
        if cap is not None:
            inflated, pixels = min(inflated, int(cap)), min(pixels, int(cap))
    with quiet_pydicom():
        _check_inflation(path, inflated, pixels)
        try:
            return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, defer_size=defer_size)
        except FileNotFoundError as e:
            raise DicomError(path, "file not found") from e
        except IsADirectoryError as e:
            raise DicomError(path, "is a folder, not a file") from e
        except InvalidDicomError as e:
            msg = _redact(str(e).split("\n")[0])[:120]
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, defer_size=defer_size, force=True)
                ok = "SOPClassUID" in ds or ("PixelData" in ds and "Rows" in ds and "Columns" in ds)
            except Exception:
                ok = False
            if not ok:
                raise DicomError(path, f"not a DICOM file ({msg})") from None
            return ds
        except Exception as e:  # pydicom raises many types on truncated/corrupt headers
            raise DicomError(path, f"unreadable DICOM header ({_why(e)})") from None  # the cause may quote values


def _check_inflation(path: Path, limit: int, pixel_limit: int) -> None:
    """DicomError when ``path`` is a deflated dataset whose header declares more than ``pixel_limit`` bytes of
    pixels as float32 (seen in its first inflated MiB), or that inflates past ``limit`` bytes (inflated in steps
    of 1 MiB, keeping nothing, so the check needs no memory). Any other file passes untouched."""
    import zlib

    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    try:
        f = open(path, "rb")
    except OSError:
        return  # dcmread says what is wrong with the path
    with f:
        try:
            read_preamble(f, True)  # without a DICM preamble: rewinds, and the meta group may still follow
            ts = _read_file_meta_info(f).get("TransferSyntaxUID")
        except Exception:
            return  # no readable meta group: not deflated as far as pydicom is concerned
        if ts is None or str(ts) != DeflatedExplicitVRLittleEndian:
            return
        inflate, total, first = zlib.decompressobj(-zlib.MAX_WBITS), 0, True
        while not inflate.eof:
            data = inflate.unconsumed_tail or f.read(1 << 20)
            if not data:
                break
            try:
                out = inflate.decompress(data, 1 << 20)
            except zlib.error:
                return  # corrupt stream: pydicom's own read fails on it
            total += len(out)
            if first and out:
                first = False
                declared, stored = _declared_pixel_bytes(out)
                if declared > pixel_limit:
                    raise DicomError(path, f"the deflated dataset declares {_mib(declared)} of pixels as float32: "
                                           f"over the {_mib(pixel_limit)} pixel budget")
                if stored:  # the rest is its pixel data: a dataset inflating far past that lies about its size
                    limit = min(limit, stored + INFLATE_SLACK_BYTES)
            if total > limit:
                raise DicomError(path, f"the deflated dataset inflates to more than {_mib(limit)}: over the pixel "
                                       "budget or far more than its header declares")


def _declared_pixel_bytes(head: bytes) -> tuple[int, int]:
    """``(float32 bytes, stored bytes)`` of the pixels the start of an inflated Explicit VR Little Endian dataset
    declares (group 0028); 0 for what it cannot tell (the pixel module lies further on, or is incomplete)."""
    import io

    from pydicom.filereader import read_dataset

    try:
        ds = read_dataset(io.BytesIO(head), False, True, stop_when=lambda tag, vr, length: tag > 0x0028FFFF)
        reader = HeaderReader(ds, "deflated header")
        dims = [reader.integer(k, None, lo=1, hi=65535) for k in ("Rows", "Columns", "SamplesPerPixel")]
        frames = reader.integer("NumberOfFrames", 1, lo=1, hi=2**31 - 1) or 1
        bits = reader.integer("BitsAllocated", None, choices=(1, 8, 16, 32, 64))
    except Exception:  # noqa: BLE001  (the header ends inside an element: the full check decides)
        return 0, 0
    if None in dims:
        return 0, 0
    samples = dims[0] * dims[1] * dims[2] * frames
    return samples * FLOAT_BYTES, (samples * bits + 7) // 8 if bits else 0


def read_header(path: str | Path, defer_size: int | str | None = 1024):
    """``(dataset, HeaderReader)`` of one file, pixel data left on disk. Raises DicomError naming the file."""
    ds = open_dataset(path, defer_size=defer_size)
    return ds, HeaderReader(ds, path)


def drop_unreadable(ds, source: str | Path = "") -> list[str]:
    """Make a dataset safe to walk whole (de-identification, identifier collection), in place.

    Elements whose value cannot be decoded are removed and DA/DT values that are not plausible dates
    (1800-2999) are emptied, in sequences too. Returns the names of what was changed.
    """
    dropped: list[str] = []

    def visit(dataset, prefix):
        for tag in list(dataset.keys()):
            try:
                with quiet_pydicom():
                    elem = dataset[tag]
                    value = elem.value
                    vr = elem.VR
                    name = elem.keyword or str(tag)
            except Exception:
                del dataset[tag]
                dropped.append(f"{prefix}{tag}")
                continue
            if vr == "SQ":
                for k, item in enumerate(value or []):
                    visit(item, f"{prefix}{name}[{k}].")
            elif vr in ("DA", "DT") and value:
                try:
                    vals = _as_list(value)
                    ok = all(_plausible_date(str(v)[:8]) for v in vals)
                except _Invalid:
                    ok = False
                if not ok:
                    dataset[tag].value = ""
                    dropped.append(prefix + name)

    visit(ds, "")
    if dropped:
        log.debug("%s: dropped undecodable elements %s", source, dropped)
    return dropped


ENUMERATED_VALUES: dict[str, tuple[str, ...]] = {"PatientSex": ("M", "F", "O")}
"""Attributes whose values come from a closed list; anything else is invalid (:func:`valid_copy`)."""
_AGE = re.compile(r"^[0-9]{3}[DWMY]$")
_NUMERIC_VRS = {"SS", "US", "SL", "UL", "SV", "UV", "FL", "FD", "AT"}  # decoded from their length: always valid
_BINARY_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN"}


def _value_problem(keyword: str, vr: str, value) -> str | None:
    """Why a decoded element value is not valid for its VR (without quoting it), or None. Empty is valid."""
    from pydicom import config
    from pydicom.valuerep import DT, TM, validate_value

    if vr in _NUMERIC_VRS or vr in _BINARY_VRS or value is None or value == "":
        return None
    values = list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
    for v in values:
        if isinstance(v, (bytes, bytearray)):
            return "holds undecoded bytes"
        s = str(v)
        try:
            validate_value(vr, s, config.RAISE)  # lengths, characters, PN groups and components
            if vr == "DA" and not _plausible_date(s.strip()):
                return "is not a calendar date"
            if vr == "TM":
                TM(s.strip())
            elif vr == "DT":
                DT(s.strip())
            elif vr == "PN" and any(len(g.split("^")) > 5 for g in s.split("=")):
                return "has more than five name components"
            elif vr == "AS" and not _AGE.match(s.strip()):
                return "is not an age (nnnD/W/M/Y)"
            elif vr == "DS" and not math.isfinite(float(s)):
                return "is not a finite number"
            elif vr == "IS":
                int(s)
        except Exception:  # noqa: BLE001  (pydicom's message quotes the value: only the VR is reported)
            return f"is not a valid {vr} value"
    allowed = ENUMERATED_VALUES.get(keyword)
    if allowed is not None and any(str(v).strip() not in allowed for v in values):
        return f"is not one of {list(allowed)}"
    return None


def valid_copy(ds, keyword: str, fallbacks: list[dict] | None = None, prefix: str = ""):
    """A deep copy of the element ``keyword`` of ``ds`` when its value is valid for its VR, else None (also when
    absent). Sequences are copied with their invalid elements left out. What is left out is recorded in
    ``fallbacks`` as ``{"attribute", "problem", "fallback": None}``, naming the keyword and never the value.
    For writers that copy header values into a new object (the SR's patient and study modules). Never raises
    and never warns."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return None
    with quiet_pydicom():
        return _valid_copy(ds, tag, keyword, fallbacks if fallbacks is not None else [], prefix)


def _valid_copy(ds, tag, name: str, fallbacks: list[dict], prefix: str):
    import copy

    from pydicom.datadict import keyword_for_tag
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    def bad(problem):
        rec = {"attribute": prefix + name, "problem": problem, "fallback": None}
        if rec not in fallbacks:
            fallbacks.append(rec)

    try:
        elem = ds[tag]
        vr, value = elem.VR, elem.value
    except Exception as e:  # noqa: BLE001  (a value pydicom cannot decode)
        bad(f"cannot be decoded ({type(e).__name__})")
        return None
    if vr == "SQ":
        items = []
        for k, item in enumerate(value or []):
            clean = Dataset()
            for sub in list(item.keys()):
                kw = keyword_for_tag(sub) or str(sub)
                e = _valid_copy(item, sub, kw, fallbacks, f"{prefix}{name}[{k}].")
                if e is not None:
                    clean[sub] = e
            items.append(clean)
        return DataElement(tag, "SQ", Sequence(items))
    problem = _value_problem(name, vr, value)
    if problem is not None:
        bad(problem)
        return None
    return copy.deepcopy(elem)


def _plausible_date(s: str) -> bool:
    import datetime as dt

    try:
        return 1800 <= dt.datetime.strptime(s, "%Y%m%d").year <= 2999
    except ValueError:
        return False


def ends_mid_element(ds, path: str | Path) -> bool:
    """True when the last element pydicom read does not end at the end of the file: the file was cut inside an
    element, or a length was corrupted (pydicom stops there without an error). Unknown (an undefined length, a
    value already decoded) is False."""
    try:
        last = ds.get_item(list(ds.keys())[-1]) if len(ds) else None
        tell, length = getattr(last, "value_tell", None), getattr(last, "length", None)
        if tell is None or length is None or length == 0xFFFFFFFF:
            return False
        return Path(path).stat().st_size != tell + length
    except Exception:
        return False


_PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00")  # (7FE0,0010/0008/0009), LE
_PIXEL_VRS = (b"OB", b"OW", b"OF", b"OD", b"OL", b"UN")


def pixel_data_unreached(ds, path: str | Path, max_bytes: int = 1 << 30) -> bool:
    """True when the file holds a pixel data element that the parsed dataset lacks: a corrupt length or tag
    earlier in the header made pydicom stop (or wander) before it. False for objects that carry pixel data only
    inside an icon sequence, and for files over ``max_bytes``."""
    try:
        if "IconImageSequence" in ds or Path(path).stat().st_size > max_bytes:
            return False
        data = Path(path).read_bytes()
    except Exception:
        return False
    for tag in _PIXEL_TAGS + tuple(t[1::-1] + t[3:1:-1] for t in _PIXEL_TAGS):  # little and big endian
        i = data.find(tag)
        while i >= 0:
            after = data[i + 4:i + 8]
            implicit_len = int.from_bytes(after, "little") if len(after) == 4 else -1
            if after[:2] in _PIXEL_VRS or implicit_len == 0xFFFFFFFF or 0 < implicit_len <= len(data) - i - 8:
                return True
            i = data.find(tag, i + 1)
    return False


def has_pixels(ds) -> bool:
    """True when the dataset holds an image (integer or float pixel data)."""
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def is_dicomdir(ds, reader: HeaderReader | None = None) -> bool:
    """True for a DICOMDIR (media directory): it names files and holds no image."""
    reader = reader or HeaderReader(ds, "?")
    cls = reader.uid("SOPClassUID")
    media = ""
    fm = getattr(ds, "file_meta", None)
    if fm is not None and "MediaStorageSOPClassUID" in fm:
        with contextlib.suppress(Exception):
            media = str(fm.MediaStorageSOPClassUID)
    return _STRUCTURAL_DICOMDIR in (cls, media) or "DirectoryRecordSequence" in ds


def _meta(ds, reader: HeaderReader) -> dict:
    """Geometry, modality, UIDs and the attributes that separate acquisitions; fallbacks recorded."""
    positive = {"lo": 1e-6, "hi": MAX_COORDINATE_MM}
    spacing = reader.numbers("PixelSpacing", 2, None, **positive)
    orientation = reader.numbers("ImageOrientationPatient", 6, None, lo=-1.01, hi=1.01)
    if orientation is not None and not _valid_orientation(orientation):
        orientation = reader._bad("ImageOrientationPatient", "is not two orthogonal unit vectors", None, False)
    image_type = reader.text("ImageType")
    meta = {
        "modality": reader.text("Modality"),
        "photometric": reader.text("PhotometricInterpretation"),
        "rows": reader.integer("Rows", 0, lo=0, hi=65535) or 0,
        "columns": reader.integer("Columns", 0, lo=0, hi=65535) or 0,
        "frames": reader.integer("NumberOfFrames", 1, lo=1, hi=2**31 - 1) or 1,
        "pixel_spacing": spacing,
        "slice_thickness": reader.number("SliceThickness", None, lo=0.0, hi=MAX_COORDINATE_MM),
        "spacing_between_slices": reader.number("SpacingBetweenSlices", None, lo=-MAX_COORDINATE_MM,
                                                hi=MAX_COORDINATE_MM),
        "orientation": orientation,
        "position": reader.numbers("ImagePositionPatient", 3, None, lo=-MAX_COORDINATE_MM, hi=MAX_COORDINATE_MM),
        "study_uid": reader.uid("StudyInstanceUID"),
        "series_uid": reader.uid("SeriesInstanceUID"),
        "sop_uid": reader.uid("SOPInstanceUID"),
        "sop_class_uid": reader.uid("SOPClassUID"),
        "frame_of_reference_uid": reader.uid("FrameOfReferenceUID"),
        "transfer_syntax": reader.uid("TransferSyntaxUID"),
        "window": _file_window(reader),
        "acquisition_number": reader.integer("AcquisitionNumber", None, lo=-(2**31), hi=2**31 - 1),
        "echo_numbers": reader.integer("EchoNumbers", None, lo=-(2**31), hi=2**31 - 1),
        "temporal_position": reader.integer("TemporalPositionIdentifier", None, lo=-(2**31), hi=2**31 - 1),
        "trigger_time": reader.number("TriggerTime", None, lo=-1e9, hi=1e9),
        "diffusion_b_value": reader.number("DiffusionBValue", None, lo=0.0, hi=1e6),
        "image_type": image_type or None,
        "fallbacks": reader.fallbacks,
    }
    # read for the de-identified copy's shifted date; checked here so that a bad value is recorded, not kept (PHI)
    reader.date("StudyDate")
    meta.update(_enhanced_geometry(ds, reader))
    return meta


def _valid_orientation(v: list[float]) -> bool:
    r, c = np.array(v[:3]), np.array(v[3:])
    nr, nc = np.linalg.norm(r), np.linalg.norm(c)
    return bool(abs(nr - 1) < 0.01 and abs(nc - 1) < 0.01 and abs(float(r @ c)) < 0.01)


def _enhanced_geometry(ds, reader: HeaderReader) -> dict:
    """Per-frame positions, orientation and spacing of an enhanced multi-frame CT/MR (functional groups).

    Fallback: a frame whose plane position is missing or invalid leaves ``frame_positions`` out (frames are
    then stacked in file order); an invalid shared value is recorded and left out.
    """
    per = reader.sequence("PerFrameFunctionalGroupsSequence")
    if not per:
        return {}
    shared_items = reader.sequence("SharedFunctionalGroupsSequence")
    shared = shared_items[0] if shared_items else None

    def find(item, seq, name):
        """Reader over the first item of ``seq`` in the frame's item, else in the shared item; or None."""
        for src in (item, shared):
            if src is None:
                continue
            items = HeaderReader(src, reader.source, reader.fallbacks, reader.prefix).sequence(seq)
            if items:
                return reader.item(items[0], f"{seq}[{name}]")
        return None

    out: dict = {}
    positions = []
    for k, frame in enumerate(per):
        sub = find(frame, "PlanePositionSequence", str(k))
        pos = sub.numbers("ImagePositionPatient", 3, None, lo=-MAX_COORDINATE_MM, hi=MAX_COORDINATE_MM) if sub else None
        positions.append(pos)
    if all(p is not None for p in positions):
        out["frame_positions"] = positions
    sub = find(per[0], "PlaneOrientationSequence", "0")
    ori = sub.numbers("ImageOrientationPatient", 6, None, lo=-1.01, hi=1.01) if sub else None
    if ori is not None and _valid_orientation(ori):
        out["orientation"] = ori
    sub = find(per[0], "PixelMeasuresSequence", "0")
    if sub is not None:
        ps = sub.numbers("PixelSpacing", 2, None, lo=1e-6, hi=MAX_COORDINATE_MM)
        if ps is not None:
            out["pixel_spacing"] = ps
        th = sub.number("SliceThickness", None, lo=0.0, hi=MAX_COORDINATE_MM)
        if th is not None:
            out["slice_thickness"] = th
    return out


def _file_window(reader: HeaderReader) -> tuple[float, float] | None:
    """The file's first VOI window (center, width); fallback None (min-max) when invalid or width <= 0."""
    c = reader.number("WindowCenter", None, lo=-1e7, hi=1e7, first=True)
    w = reader.number("WindowWidth", None, lo=-1e7, hi=1e7, first=True)
    if c is None or w is None:
        return None
    return (c, w) if w > 0 else None


def _pixel_module(ds, reader: HeaderReader, meta: dict) -> None:
    """Check the attributes the decoder needs and normalise them in ``ds`` so pydicom decodes them.

    Raises DicomError for missing or invalid Rows, Columns, SamplesPerPixel, BitsAllocated,
    PixelRepresentation and for a decoded size (float32) over :data:`MAX_DECODED_BYTES` or over what is left of
    the :func:`pixel_budget` in force (charged here, before decoding). Fallbacks (recorded):
    BitsStored -> BitsAllocated; HighBit -> BitsStored - 1; NumberOfFrames invalid, or more frames than the
    pixel data holds -> the count the pixel data holds (native: its length over one frame's; encapsulated:
    the basic offset table, else the fragments); no TransferSyntaxUID -> the encoding the dataset was read
    with when the pixel data is not compressed.
    """
    rows = reader.integer("Rows", required=True, lo=1, hi=65535)
    cols = reader.integer("Columns", required=True, lo=1, hi=65535)
    spp = reader.integer("SamplesPerPixel", required=True, choices=(1, 3, 4))
    bits = reader.integer("BitsAllocated", required=True, choices=(1, 8, 16, 32, 64))
    reader.integer("PixelRepresentation", required=True, choices=(0, 1))
    n_fb = len(reader.fallbacks)
    stored = reader.integer("BitsStored", bits, lo=1, hi=bits)
    if len(reader.fallbacks) > n_fb or not reader.present("BitsStored"):
        _set(ds, "BitsStored", stored)
    n_fb = len(reader.fallbacks)
    high = reader.integer("HighBit", stored - 1, lo=0, hi=bits - 1)
    if len(reader.fallbacks) > n_fb or not reader.present("HighBit"):
        _set(ds, "HighBit", high)
    for kw, v in (("Rows", rows), ("Columns", cols), ("SamplesPerPixel", spp), ("BitsAllocated", bits)):
        _set(ds, kw, v)  # a wrong VR (e.g. Rows stored as text) is read by medmm; give the decoder a clean one
    _transfer_syntax(ds, reader)

    if "PixelData" not in ds:  # float pixel data: native only
        frame_bytes, encapsulated = rows * cols * spp * bits // 8, False
        data_len = len(ds[next(k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds)].value)
    else:
        elem = ds["PixelData"]
        encapsulated = bool(getattr(elem, "is_undefined_length", False))
        data_len = len(elem.value) if elem.value is not None else 0
        frame_bytes = max(1, (rows * cols * spp * bits + 7) // 8)
    declared = meta["frames"]
    invalid = any(f["attribute"] == "NumberOfFrames" for f in reader.fallbacks)
    if encapsulated:
        held, whole = _encapsulated_frames(ds["PixelData"].value) or 0, True
    else:
        held = data_len // frame_bytes
        whole = data_len - held * frame_bytes <= 1  # an odd length is padded with one byte
    if invalid:
        if not held:
            raise DicomError(reader.source, "NumberOfFrames is invalid and the pixel data holds no whole frame")
        _replace_fallback(reader, "NumberOfFrames", held)
        declared = held
    elif held and declared > held and whole:
        reader._bad("NumberOfFrames", "is more than the pixel data holds", held, False)
        declared = held
    if reader.present("NumberOfFrames"):
        _set(ds, "NumberOfFrames", declared)
    meta["frames"] = declared
    # what read_dicom returns is float32: that, not the stored bits, is the memory a file claims
    _charge(reader.source, rows * cols * spp * declared * FLOAT_BYTES,
            f"{declared} frames of {rows}x{cols}x{spp}, {bits} bits")


def _replace_fallback(reader: HeaderReader, attribute: str, value) -> None:
    """Set the fallback value of the last record about ``attribute`` (decided after the record was made)."""
    for rec in reversed(reader.fallbacks):
        if rec["attribute"] == reader.prefix + attribute:
            rec["fallback"] = value
            return


def _encapsulated_frames(data: bytes) -> int | None:
    """Frames an encapsulated pixel data element holds: the basic offset table, else its fragments."""
    from pydicom.encaps import parse_basic_offsets, parse_fragments

    try:
        offsets = parse_basic_offsets(data)
        if offsets:
            return len(offsets)
        n, _ = parse_fragments(data[8 + 4 * len(offsets):])
        return n or None
    except Exception:
        return None


def _transfer_syntax(ds, reader: HeaderReader) -> None:
    """Fallback for a missing TransferSyntaxUID: the encoding the dataset was read with (native pixel data)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if reader.uid("TransferSyntaxUID"):
        return
    if "PixelData" in ds and getattr(ds["PixelData"], "is_undefined_length", False):
        raise DicomError(reader.source, "TransferSyntaxUID is missing and the pixel data is compressed")
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        implicit, little = False, True
    uid = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid
    reader.fallbacks.append({"attribute": "TransferSyntaxUID", "problem": "is missing or invalid", "fallback": str(uid)})


def read_dicom(path: str | Path, stop_before_pixels: bool = False, apply_voi: bool = False) -> DicomImage:
    """Read one DICOM file into modality units. Raises DicomError naming the file and the problem, never
    another exception.

    Header values go through :class:`HeaderReader`; the fallbacks it takes are listed in ``meta["fallbacks"]``:

    * absent or invalid PixelSpacing, SliceThickness, SpacingBetweenSlices, ImagePositionPatient,
      ImageOrientationPatient (not six numbers, not orthogonal unit vectors), window, AcquisitionNumber,
      EchoNumbers, TemporalPositionIdentifier, TriggerTime, DiffusionBValue -> None (a single image does not
      need them; a slice of a series without a position is rejected by :func:`assemble_series`);
    * invalid UIDs and StudyDate -> "" (a file without a valid SeriesInstanceUID stands alone);
    * several WindowCenter/WindowWidth values -> the first; an invalid window -> None (min-max);
    * NumberOfFrames invalid, or more frames than the pixel data holds -> the frames the pixel data holds
      (native: its length over one frame's; encapsulated: the basic offset table, else the fragments);
    * BitsStored invalid -> BitsAllocated; HighBit invalid -> BitsStored - 1;
    * no valid TransferSyntaxUID -> the encoding the dataset was read with (native pixel data only);
    * no ``DICM`` preamble -> read anyway when the dataset holds DICOM attributes (:func:`open_dataset`);
    * Rows, Columns, SamplesPerPixel, BitsAllocated, PixelRepresentation missing or invalid, RescaleSlope or
      RescaleIntercept present but invalid (modality values would be wrong), a decoded size (float32) over
      :data:`MAX_DECODED_BYTES` or over the :func:`pixel_budget` in force, a deflated dataset inflating past
      its limit (:func:`open_dataset`), or non-finite values after the modality LUT -> DicomError.

    "Invalid" covers: cannot be decoded, not a number, empty, several values where one is expected, a
    number under a wrong VR that is not a number, and out of range (e.g. positions beyond
    :data:`MAX_COORDINATE_MM`). A number stored under a wrong VR (e.g. Rows as text "512") is read as is.

    ``apply_voi=True`` returns grey images already through the file's VOI transform (VOI LUT sequence,
    else window center/width) and scaled to [0, 1] over the transform's output range (``meta['voi']``).
    """
    path = Path(path)
    ds = open_dataset(path, stop_before_pixels=stop_before_pixels)
    try:
        with quiet_pydicom():
            return _read_dicom(ds, path, stop_before_pixels, apply_voi)
    except DicomError:
        raise
    except MemoryError as e:
        raise DicomError(path, "not enough memory to decode the pixel data") from e
    except Exception as e:  # anything else pydicom or numpy raise on a malformed file is this file's problem
        raise DicomError(path, f"cannot be read ({_why(e)})") from None  # the cause may quote a header value


def _read_dicom(ds, path: Path, stop_before_pixels: bool, apply_voi: bool) -> DicomImage:
    from pydicom.pixels import apply_color_lut, apply_voi_lut

    reader = HeaderReader(ds, path)
    meta = _meta(ds, reader)
    if stop_before_pixels:
        return DicomImage(np.zeros((0,), np.float32), meta)
    if not has_pixels(ds):
        modality = meta["modality"] if _CS.match(meta["modality"]) else "?"  # a code, never free text from the file
        raise DicomError(path, f"no pixel data (SOP class {meta['sop_class_uid'] or '?'}, modality {modality})")
    _pixel_module(ds, reader, meta)
    try:
        arr = ds.pixel_array
    except Exception as e:  # decoder errors: truncated frames, missing plugin, bad lengths
        raise DicomError(path, f"pixel data cannot be decoded ({_why(e)})") from e
    photometric = meta["photometric"]
    frames = meta["frames"]
    spp = int(ds.SamplesPerPixel)
    if arr.ndim not in (2, 3, 4) or arr.size == 0:
        raise DicomError(path, f"pixel data decodes to an unexpected shape {arr.shape}")
    try:
        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds).astype(np.float32)
            arr = arr / (65535.0 if arr.max() > 255 else 255.0)
        elif arr.ndim == (4 if frames > 1 else 3) and spp == 3:
            arr = arr.astype(np.float32)  # pydicom 3 converts YBR to RGB by default
            arr = arr / float(2 ** int(ds.BitsStored) - 1)
        else:
            arr = _modality_lut(arr, ds, reader)
            window_ok = meta["window"] is not None
            if apply_voi and ("VOILUTSequence" in ds or window_ok):
                if "VOILUTSequence" in ds:
                    items = reader.sequence("VOILUTSequence")
                    desc = reader.item(items[0], "VOILUTSequence[0]").numbers("LUTDescriptor", 3, None) if items else None
                    if desc is None or not 1 <= int(desc[2]) <= 16:
                        raise DicomError(path, "VOILUTSequence[0].LUTDescriptor is invalid")
                    lo, hi = 0.0, float(2 ** int(desc[2]) - 1)
                else:
                    _set(ds, "WindowCenter", meta["window"][0])  # the validated first window, for pydicom
                    _set(ds, "WindowWidth", meta["window"][1])
                    lo, hi = 0.0, float(2 ** int(ds.BitsStored) - 1)
                arr = np.clip((apply_voi_lut(arr, ds, prefer_lut=True).astype(np.float32) - lo) / (hi - lo), 0, 1)
                meta["voi"] = "lut" if "VOILUTSequence" in ds else "window"
                if photometric == "MONOCHROME1":
                    arr = 1.0 - arr
            elif photometric == "MONOCHROME1":
                arr = arr.max() + arr.min() - arr  # invert so that higher = brighter
    except DicomError:
        raise
    except Exception as e:
        raise DicomError(path, f"LUT cannot be applied ({_why(e)})") from e
    # Normalise to (frames, H, W[, 3])
    color = arr.ndim == (4 if frames > 1 else 3) and arr.shape[-1] == 3
    if frames == 1:
        arr = arr[None]
    if arr.ndim == 3 and color:
        arr = arr[None]
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise DicomError(path, "pixel values are not finite after the modality LUT")
    return DicomImage(out, meta)


def _modality_lut(arr: np.ndarray, ds, reader: HeaderReader) -> np.ndarray:
    """Stored values -> modality units as float32. A plain rescale is done in float32 in place (pydicom's
    general function goes through float64 temporaries); LUT sequences go through pydicom. RescaleSlope or
    RescaleIntercept present but invalid (or a zero slope) is a DicomError: modality values would be wrong."""
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(arr, ds).astype(np.float32)
    out = arr.astype(np.float32)
    slope = reader.number("RescaleSlope", 1.0, lo=-1e6, hi=1e6, nonzero=True, strict=True)
    intercept = reader.number("RescaleIntercept", 0.0, lo=-1e7, hi=1e7, strict=True)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def window(img: np.ndarray, window: str | tuple[float, float] | None = None,
           fallback: tuple[float, float] | None = None) -> np.ndarray:
    """Map modality values to [0, 1] with a preset name, a (center, width), the file's window, or min-max."""
    if isinstance(window, str):
        if window not in WINDOW_PRESETS:
            raise ValueError(f"unknown window preset '{window}'; known: {', '.join(WINDOW_PRESETS)}")
        window = WINDOW_PRESETS[window]
    window = window or fallback
    if window is None:
        lo, hi = float(np.min(img)), float(np.max(img))
    else:
        c, w = window
        lo, hi = c - w / 2.0, c + w / 2.0
    if hi <= lo:
        return np.zeros_like(img, dtype=np.float32)
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def is_dicom_file(path: str | Path) -> bool:
    """True when the file has the DICM preamble marker (or a .dcm suffix)."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


# ----------------------------------------------------------------------------- series


@dataclass
class SeriesReport:
    """What one volume of a series is: counts, rejected files, spacing problems, gaps, tilt."""

    files: int = 0
    slices: int = 0
    rejected: list[dict] = field(default_factory=list)
    spacing: tuple[float, float, float] | None = None
    uneven_spacing: bool = False
    gap_positions: list[list[float]] = field(default_factory=list)
    """ImagePositionPatient (LPS, mm) of each missing slice, interpolated between its neighbours."""
    gaps: list[dict] = field(default_factory=list)
    """One entry per gap: ``after_slice`` (index in the volume), ``missing`` (slices), ``step_mm``, ``expected_mm``."""
    gantry_tilt_deg: float = 0.0
    series_uid: str = ""
    other_series: list[str] = field(default_factory=list)
    frame_order_only: bool = False
    """True when frames had no (distinct) plane positions and were stacked in file order."""
    duplicates_dropped: list[str] = field(default_factory=list)
    label: str = ""
    """What sets this volume apart within its series (e.g. ``AcquisitionNumber=2``); "" when it is the series."""


@dataclass
class SeriesVolume:
    """One volume (or image) a series yields.

    ``array`` is a ``(1, D, H, W)`` MetaTensor (grey, modality units, RAS affine) or, for colour, a
    ``(frames, H, W, 3)`` array in [0, 1]. ``kind`` is "volume" when D > 1, else "image".
    """

    array: object
    kind: str
    paths: list[str]
    report: SeriesReport
    meta: dict
    label: str = ""

    @property
    def is_color(self) -> bool:
        return isinstance(self.array, np.ndarray) and self.array.ndim == 4


@dataclass
class SeriesAssembly:
    """What became of one series: its volumes, the duplicates dropped, the gaps and the files rejected.

    ``outcome`` is "kept" (one volume), "split" (several) or "rejected" (none; ``reason`` says why).
    """

    series_uid: str = ""
    outcome: str = "rejected"
    reason: str = ""
    volumes: list[SeriesVolume] = field(default_factory=list)
    duplicates_dropped: list[str] = field(default_factory=list)
    duplicate_of: dict[str, str] = field(default_factory=dict)
    gap_positions: list[list[float]] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    files: int = 0
    other_series: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def _duplicate(self, path: str, kept: str, by: str) -> None:
        self.duplicates_dropped.append(path)
        self.duplicate_of[path] = kept
        log.info("%s duplicates %s (%s); kept once", path, kept, by)

    def _reject(self, paths: list[str], source: str, reason: str) -> None:
        for p in paths:
            self.rejected.append(DicomError(p, reason).to_record())
        self.notes.append(reason)
        log.warning("%s: %s", source, reason)


@dataclass
class _Slice:
    path: str
    pixels: np.ndarray  # (H, W)
    position: np.ndarray | None  # (3,) LPS mm
    meta: dict


def read_volumes(folder: str | Path, series_uid: str | None = None, spacing_tolerance: float = 0.05,
                 files: list[Path] | None = None, on_gap: str = "keep") -> SeriesAssembly:
    """Read a folder (or the given files) and assemble one series (the largest, or ``series_uid``).

    Files that cannot be read are listed in ``rejected``; the series is assembled by :func:`assemble_series`.
    Raises DicomError only when no file of the folder is a readable image or ``series_uid`` is absent.
    """
    folder = Path(folder)
    if files is not None:
        paths = list(files)
    else:
        paths = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    n_files = len(paths)
    if files is None and folder.is_dir():  # text files beside the slices (README, LICENSE) are not errors
        paths = [p for p in paths if p.suffix.lower() not in (".txt", ".md", ".json", ".csv", ".pdf")]
    images: list[tuple[str, DicomImage]] = []
    rejected: list[dict] = []
    for p in paths:
        try:
            images.append((str(p), read_dicom(p)))
        except DicomError as e:
            rejected.append(e.to_record())
            log.warning("skipping %s", e)
    if not images:
        raise DicomError(folder, "no readable DICOM image in the series")
    by_series: dict[str, list[tuple[str, DicomImage]]] = {}
    for p, im in images:
        by_series.setdefault(im.meta["series_uid"], []).append((p, im))
    if series_uid is None:
        series_uid = max(by_series, key=lambda k: sum(x.pixels.shape[0] for _, x in by_series[k]))
    if series_uid not in by_series:
        raise DicomError(folder, f"series {series_uid} not found")
    asm = assemble_series(by_series[series_uid], source=folder, on_gap=on_gap, spacing_tolerance=spacing_tolerance)
    asm.rejected = rejected + asm.rejected
    asm.files = n_files
    asm.other_series = sorted(k for k in by_series if k != series_uid)
    return asm


def read_series(folder: str | Path, series_uid: str | None = None, spacing_tolerance: float = 0.05,
                files: list[Path] | None = None, on_gap: str = "keep"):
    """Assemble one series (single-frame slices, or one multi-frame file) into a ``(1, D, H, W)`` MetaTensor.

    Slices (or frames of an enhanced CT/MR) are ordered by their position along the slice normal.
    The affine (RAS) uses the real step between slice positions, so a gantry-tilted series keeps
    its true (sheared) geometry and MONAI's ``Spacing``/``Orientation`` resample it correctly; the
    tilt angle, uneven spacing and gaps (missing slices) are reported; exact duplicates are dropped and
    reported. Returns ``(volume, report)``. A series that holds several volumes (acquisitions, echoes,
    orientations) raises DicomError pointing to :func:`read_volumes`, which returns them all.
    """
    folder = Path(folder)
    asm = read_volumes(folder, series_uid, spacing_tolerance, files, on_gap)
    if not asm.volumes:
        raise DicomError(folder, asm.reason or "no volume in the series")
    if len(asm.volumes) > 1:
        raise DicomError(folder, f"the series holds {len(asm.volumes)} volumes ({asm.reason}); "
                                 "read them with read_volumes")
    vol = asm.volumes[0]
    if vol.is_color:
        raise DicomError(folder, "colour images do not form a volume")
    report = vol.report
    report.rejected = asm.rejected
    report.files = asm.files
    report.series_uid = asm.series_uid
    report.other_series = asm.other_series
    report.duplicates_dropped = asm.duplicates_dropped
    return vol.array, report


def assemble_series(images: list[tuple[str, DicomImage]], source: str | Path = "", on_gap: str = "keep",
                    spacing_tolerance: float = 0.05) -> SeriesAssembly:
    """The images of one series (``(path, DicomImage)``) -> the volumes they hold. Never raises for one slice.

    1. Exact duplicates are kept once (``duplicates_dropped``, ``duplicate_of``): the same SOPInstanceUID with
       identical decoded pixels (the same file twice, or one image in two transfer syntaxes), or the same
       position with identical pixels. Files that share a SOPInstanceUID but not their pixels are kept apart
       (and noted in ``reason``): dropping one would lose an image.
    2. Colour images and multi-frame files among several files stand alone; single-frame grey images are
       stacked by orientation and size (several orientations -> several volumes).
    3. Slices sharing a position are split by the first of :data:`SPLIT_KEYS` that leaves no shared position
       (the one giving fewest volumes); when nothing separates them that stack is rejected with the reason.
    4. Missing slices (a step of at least 1.5 times the local step) are reported with their positions;
       ``on_gap``: "keep" keeps one volume, "split" cuts it at each gap, "reject" rejects it.
    5. A single-frame image without plane geometry in a series of placed slices is rejected (it cannot be
       placed); when no image has geometry, each becomes an image of its own.

    ``outcome`` is "kept" for one volume, "split" for several, "rejected" for none.
    """
    if on_gap not in ON_GAP:
        raise ValueError(f"on_gap must be one of {ON_GAP}, not {on_gap!r}")
    source = str(source)
    images = sorted(images, key=lambda x: x[0])
    asm = SeriesAssembly(series_uid=images[0][1].meta.get("series_uid", "") if images else "", files=len(images))
    seen: dict[str, list[tuple[str, DicomImage]]] = {}
    unique: list[tuple[str, DicomImage]] = []
    for path, im in images:
        sop = im.meta.get("sop_uid") or ""
        same_uid = seen.setdefault(sop, []) if sop else []
        twin = next((p for p, o in same_uid if o.pixels.shape == im.pixels.shape and np.array_equal(o.pixels, im.pixels)),
                    None)
        if twin is not None:
            asm._duplicate(path, twin, "same SOPInstanceUID")  # e.g. one image in two transfer syntaxes
            continue
        if same_uid:
            asm.notes.append("files share a SOPInstanceUID but not their pixels: kept apart")
        if sop:
            same_uid.append((path, im))
        unique.append((path, im))

    singles: list[_Slice] = []
    alone: list[tuple[str, DicomImage]] = []
    for path, im in unique:
        if im.is_color or im.pixels.shape[0] > 1:
            alone.append((path, im))
        else:
            pos = im.meta.get("position")
            singles.append(_Slice(path, im.pixels[0], np.array(pos, float) if pos is not None else None, im.meta))
    for k, (path, im) in enumerate(alone):
        label = f"file {k + 1}" if len(unique) > 1 else ""
        asm.volumes.append(_single_file_volume(path, im, label, spacing_tolerance))
    if alone and len(unique) > 1:
        asm.notes.append("multi-frame or colour files stand alone")

    placed = [s for s in singles if s.position is not None and s.meta.get("orientation") is not None]
    unplaced = [s for s in singles if s.position is None or s.meta.get("orientation") is None]
    if placed and unplaced:
        for s in unplaced:
            asm._reject([s.path], source, "no valid ImagePositionPatient/ImageOrientationPatient: the slice "
                                          "cannot be placed in its series")
    elif unplaced:
        kept = _drop_identical(unplaced, asm)
        for k, s in enumerate(kept):
            label = f"image {k + 1}" if len(kept) > 1 or alone else ""
            asm.volumes.append(_stack_volume([s], label, spacing_tolerance))
        if len(kept) > 1:
            asm.notes.append("images without plane geometry kept one by one")

    stacks: dict[tuple, list[_Slice]] = {}
    for s in placed:
        key = (tuple(round(v, 3) for v in s.meta["orientation"]), s.pixels.shape)
        stacks.setdefault(key, []).append(s)
    if len(stacks) > 1:
        asm.notes.append(f"{len(stacks)} orientations or image sizes")
    for k, stack in enumerate(stacks.values()):
        label = f"stack {k + 1}" if len(stacks) > 1 else ""
        _assemble_stack(stack, label, asm, source, on_gap, spacing_tolerance)

    n = len(asm.volumes)
    asm.outcome = "kept" if n == 1 else "split" if n > 1 else "rejected"
    notes = list(dict.fromkeys(asm.notes))
    asm.reason = "; ".join(notes) if notes else ("" if n else "no image in the series")
    for v in asm.volumes:
        v.report.duplicates_dropped = asm.duplicates_dropped
        v.report.series_uid = asm.series_uid
    asm.gap_positions = asm.gap_positions[:MAX_GAP_POSITIONS]
    return asm


def _drop_identical(slices: list[_Slice], asm: SeriesAssembly) -> list[_Slice]:
    """Keep the first of slices with identical pixels (callers pass slices at one position)."""
    kept: list[_Slice] = []
    for s in slices:
        twin = next((k for k in kept if k.pixels.shape == s.pixels.shape and np.array_equal(k.pixels, s.pixels)), None)
        if twin is not None:
            asm._duplicate(s.path, twin.path, "same position, identical pixels")
        else:
            kept.append(s)
    return kept


def _clusters(dist: np.ndarray) -> list[list[int]]:
    """Indices grouped by position along the normal (``dist`` sorted ascending)."""
    out: list[list[int]] = []
    for i in range(len(dist)):
        if out and dist[i] - dist[out[-1][-1]] < POSITION_TOLERANCE_MM:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _assemble_stack(stack: list[_Slice], label: str, asm: SeriesAssembly, source: str, on_gap: str,
                    tolerance: float) -> None:
    """One orientation's slices -> volumes appended to ``asm`` (or the stack rejected with the reason)."""
    ori = stack[0].meta["orientation"]
    normal = np.cross(np.array(ori[:3]), np.array(ori[3:]))
    stack = sorted(stack, key=lambda s: (float(s.position @ normal), s.path))
    dist = np.array([float(s.position @ normal) for s in stack])
    kept: list[_Slice] = []
    for c in _clusters(dist):
        kept.extend(_drop_identical([stack[i] for i in c], asm))
    stack = kept

    def collides(group: list[_Slice]) -> bool:
        d = np.sort(np.array([float(s.position @ normal) for s in group]))
        return bool(len(d) > 1 and np.any(np.diff(d) < POSITION_TOLERANCE_MM))

    groups: list[tuple[str, list[_Slice]]] = [(label, stack)]
    if collides(stack):
        best = None
        candidates = [(name, lambda s, k=key: s.meta.get(k)) for key, name in SPLIT_KEYS]
        candidates.append(("+".join(n for _, n in SPLIT_KEYS), lambda s: tuple(s.meta.get(k) for k, _ in SPLIT_KEYS)))
        for name, value in candidates:
            by: dict = {}
            for s in stack:
                by.setdefault(_hashable(value(s)), []).append(s)
            if len(by) > 1 and not any(collides(g) for g in by.values()) and (best is None or len(by) < len(best[1])):
                best = (name, by)
        if best is None:
            asm._reject([s.path for s in stack], source,
                        f"{len(stack)} slices share positions and no attribute separates them (tried "
                        f"{', '.join(n for _, n in SPLIT_KEYS)})")
            return
        name, by = best
        asm.notes.append(f"slices sharing positions split by {name} into {len(by)} volumes")
        groups = [(_join(label, f"{name}={_fmt(v)}"), sorted(g, key=lambda s: float(s.position @ normal)))
                  for v, g in sorted(by.items(), key=lambda kv: str(kv[0]))]

    for glabel, group in groups:
        d = np.array([float(s.position @ normal) for s in group])
        gaps = _find_gaps(d)
        asm.gap_positions.extend(_gap_positions(np.array([s.position for s in group]), gaps))
        if gaps and on_gap == "reject":
            asm._reject([s.path for s in group], source,
                        f"{sum(g['missing'] for g in gaps)} missing slices (on_gap=reject)")
            continue
        if gaps and on_gap == "split":
            cuts = [0] + [g["after_slice"] + 1 for g in gaps] + [len(group)]
            asm.notes.append(f"missing slices: split into {len(cuts) - 1} volumes")
            for k in range(len(cuts) - 1):
                asm.volumes.append(_stack_volume(group[cuts[k]:cuts[k + 1]], _join(glabel, f"part {k + 1}"), tolerance,
                                                 normal))
            continue
        if gaps:
            asm.notes.append(f"{sum(g['missing'] for g in gaps)} missing slices kept as a gap")
        asm.volumes.append(_stack_volume(group, glabel, tolerance, normal))


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def _fmt(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, tuple):
        return ",".join(_fmt(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def _join(a: str, b: str) -> str:
    return f"{a}, {b}" if a else b


def _find_gaps(dist: np.ndarray) -> list[dict]:
    """Steps at least 1.5 times the local step are gaps; ``missing`` = round(step / local step) - 1.

    The local step is the larger of the medians of up to three steps on either side, so a series acquired in
    two spacings (e.g. 4 mm then 7 mm) shows no false gap at the change; a gap right where the spacing grows
    may be missed rather than invented.
    """
    steps = np.diff(dist)
    out = []
    if len(steps) < 2:
        return out
    for i, s in enumerate(steps):
        sides = [steps[max(0, i - 3):i], steps[i + 1:i + 4]]
        ref = max(float(np.median(x)) for x in sides if len(x))
        if ref <= POSITION_TOLERANCE_MM:
            continue
        r = s / ref
        if r >= 1.5:
            out.append({"after_slice": i, "missing": max(1, int(round(r)) - 1), "step_mm": round(float(s), 3),
                        "expected_mm": round(ref, 3)})
    return out


def _gap_positions(pos: np.ndarray, gaps: list[dict]) -> list[list[float]]:
    """Positions (LPS, mm) of the missing slices of each gap, evenly between the slices either side of it.

    Args:
        pos: ``(N, 3)`` ImagePositionPatient of the slices, ordered along the normal.
        gaps: from :func:`_find_gaps` over the same slices.
    """
    out: list[list[float]] = []
    for g in gaps:
        i, m = g["after_slice"], g["missing"]
        for j in range(1, m + 1):
            if len(out) >= MAX_GAP_POSITIONS:
                return out
            out.append([round(float(v), 3) for v in pos[i] + (pos[i + 1] - pos[i]) * j / (m + 1)])
    return out


def _single_file_volume(path: str, im: DicomImage, label: str, tolerance: float) -> SeriesVolume:
    """A colour image, or a multi-frame grey file (frames ordered by plane position when they have distinct ones)."""
    if im.is_color:
        rep = SeriesReport(files=1, slices=im.pixels.shape[0], series_uid=im.meta.get("series_uid", ""), label=label)
        return SeriesVolume(im.pixels, "image", [path], rep, im.meta, label)
    frames_pos = im.meta.get("frame_positions")
    ori = im.meta.get("orientation")
    if frames_pos and ori and len(frames_pos) == im.pixels.shape[0]:
        normal = np.cross(np.array(ori[:3]), np.array(ori[3:]))
        slices = [_Slice(path, im.pixels[k], np.array(frames_pos[k], float), im.meta) for k in range(len(frames_pos))]
        d = np.sort([float(s.position @ normal) for s in slices])
        if not np.any(np.diff(d) < POSITION_TOLERANCE_MM):
            slices.sort(key=lambda s: float(s.position @ normal))
            return _stack_volume(slices, label, tolerance, normal)
        log.warning("%s: frames share plane positions; kept in file order", path)
    return _frame_order_volume(path, im, label)


def _frame_order_volume(path: str, im: DicomImage, label: str) -> SeriesVolume:
    """A multi-frame file without (distinct) plane positions: frame order kept, spacing from the header."""
    import torch
    from monai.data import MetaTensor

    m0 = im.meta
    dz = float(m0.get("spacing_between_slices") or m0.get("slice_thickness") or 1.0)
    dz = abs(dz) or 1.0
    ps = m0.get("pixel_spacing") or [1.0, 1.0]
    log.warning("%s: no distinct plane positions; frames kept in file order, %.2f mm apart", Path(path).name, dz)
    data = im.pixels
    rep = SeriesReport(files=1, slices=data.shape[0], spacing=(dz, float(ps[0]), float(ps[1])), frame_order_only=True,
                       series_uid=m0.get("series_uid", ""), label=label)
    affine = _lps_to_ras(np.diag([dz, float(ps[0]), float(ps[1]), 1.0]))
    vol = MetaTensor(torch.from_numpy(np.ascontiguousarray(data)[None]), affine=torch.from_numpy(affine))
    return SeriesVolume(vol, "volume" if data.shape[0] > 1 else "image", [path], rep, m0, label)


def _stack_volume(slices: list[_Slice], label: str, tolerance: float, normal: np.ndarray | None = None) -> SeriesVolume:
    """Slices already ordered along ``normal`` -> ``(1, D, H, W)`` MetaTensor with its RAS affine, and a report."""
    import torch
    from monai.data import MetaTensor

    m0 = slices[0].meta
    ps = m0.get("pixel_spacing") or [1.0, 1.0]
    ori = m0.get("orientation")
    report = SeriesReport(files=len({s.path for s in slices}), slices=len(slices), series_uid=m0.get("series_uid", ""),
                          label=label)
    data = np.empty((len(slices), *slices[0].pixels.shape), dtype=np.float32)  # (D, H, W), filled in place
    for k, s in enumerate(slices):
        data[k] = s.pixels
    if ori is None or slices[0].position is None:  # one image without plane geometry
        dz = float(m0.get("slice_thickness") or 1.0) or 1.0
        report.spacing = (dz, float(ps[0]), float(ps[1]))
        affine = _lps_to_ras(np.diag([dz, float(ps[0]), float(ps[1]), 1.0]))
        vol = MetaTensor(torch.from_numpy(data[None]), affine=torch.from_numpy(affine))
        return SeriesVolume(vol, "volume" if len(slices) > 1 else "image", [s.path for s in slices], report, m0, label)
    row_dir, col_dir = np.array(ori[:3]), np.array(ori[3:])
    if normal is None:
        normal = np.cross(row_dir, col_dir)
    pos = np.array([s.position for s in slices], dtype=float)
    dist = pos @ normal
    if len(slices) > 1:
        gaps = np.diff(dist)
        step = (pos[-1] - pos[0]) / (len(slices) - 1)  # mean step vector (includes tilt shear)
        dz = float(np.median(gaps))
        rel = np.abs(gaps - dz) / max(dz, 1e-6)
        report.uneven_spacing = bool(np.any(rel > tolerance))
        report.gaps = _find_gaps(dist)
        report.gap_positions = _gap_positions(pos, report.gaps)
        cosang = abs(float(np.dot(step, normal))) / (np.linalg.norm(step) + 1e-12)
        report.gantry_tilt_deg = float(np.degrees(np.arccos(min(1.0, cosang))))
        if report.uneven_spacing:
            log.warning("%s: uneven slice spacing (%.2f-%.2f mm); the affine uses the mean step",
                        Path(slices[0].path).parent.name, gaps.min(), gaps.max())
        if report.gaps:
            log.warning("%s: %d missing slices", Path(slices[0].path).parent.name,
                        sum(g["missing"] for g in report.gaps))
        if report.gantry_tilt_deg > 0.5:
            log.warning("%s: gantry tilt of %.1f deg; the affine keeps the sheared geometry",
                        Path(slices[0].path).parent.name, report.gantry_tilt_deg)
    else:
        dz = float(m0.get("slice_thickness") or 1.0) or 1.0
        step = normal * dz
    # index (k, i, j) -> LPS: k along the slice step, i along rows (col_dir), j along columns (row_dir)
    lps = np.eye(4)
    lps[:3, 0] = step
    lps[:3, 1] = col_dir * ps[0]
    lps[:3, 2] = row_dir * ps[1]
    lps[:3, 3] = pos[0]
    report.spacing = (float(np.linalg.norm(step)), float(ps[0]), float(ps[1]))
    vol = MetaTensor(torch.from_numpy(data[None]), affine=torch.from_numpy(_lps_to_ras(lps)))
    return SeriesVolume(vol, "volume" if len(slices) > 1 else "image", [s.path for s in slices], report, m0, label)


def _lps_to_ras(affine: np.ndarray) -> np.ndarray:
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ affine



def pydicom_test_files() -> Path:
    """The test files shipped inside the pydicom wheel, read in place (pydicom's own helper downloads)."""
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files"
