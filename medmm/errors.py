"""One small hierarchy of typed errors. Each names the input (file, row, key) and the problem.

Batch jobs catch :class:`InvalidInputError`, record it in ``errors.jsonl`` and go on.
"""

from __future__ import annotations

from encoders.registry import Registry, RegistryError

EXCERPT_CHARS = 64  # the most of an offending input an error message repeats


def excerpt(value, limit: int = EXCERPT_CHARS) -> str:
    """A short, printable prefix of an input for an error message: errors never echo a whole (possibly huge or
    identifying) value back. Longer values end with ``... (N chars)``; control characters are escaped."""
    text = str(value)
    head = text[:limit].encode("unicode_escape").decode("ascii")
    return head if len(text) <= limit else f"{head}... ({len(text)} chars)"


class MedmmError(Exception):
    """Base class of every error medmm raises on purpose."""


class ConfigError(MedmmError, RegistryError):
    """A configuration file or override is wrong: names the file and the dotted key.

    Also what every registry raises for an unknown name (``trainer.stage: unknown stage 'x'; choose one of: ...``).
    It subclasses ``encoders.registry.RegistryError`` (a ``ValueError``): the one registry primitive lives in
    ``encoders/``, which never imports medmm, so importing this module makes :class:`~encoders.registry.Registry`
    raise this class (see :mod:`encoders.registry`).
    """


Registry.error = ConfigError


class InvalidInputError(MedmmError, ValueError):
    """An input (file, row, value) cannot be used. ``source`` names it; the message says why."""

    def __init__(self, source: str, message: str):
        self.source = str(source)
        self.reason = message
        super().__init__(f"{self.source}: {message}")

    def to_record(self) -> dict:
        """The line a batch job writes to ``errors.jsonl``."""
        return {"path": self.source, "error": type(self).__name__, "message": self.reason}


class DicomError(InvalidInputError):
    """A DICOM file or series cannot be read or assembled."""


class ImageError(InvalidInputError):
    """A PNG/JPEG (or other raster) image cannot be read."""


class SlideError(InvalidInputError):
    """A whole-slide image cannot be read."""


class SmilesError(InvalidInputError):
    """A SMILES string cannot be parsed or standardised."""


class SequenceError(InvalidInputError):
    """A DNA sequence or FASTA/VCF record is invalid."""


class ConversationError(InvalidInputError):
    """A conversation record is malformed (roles, placeholders, modalities)."""


class ModalityMismatchError(MedmmError, ValueError):
    """The number of modality placeholders in the text does not match the modality inputs."""
