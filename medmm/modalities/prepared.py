"""The options ``medmm prepare`` recorded, read back and copied into a model config (so into its checkpoint).

``manifest.json`` and each shard sample's JSON carry ``preprocess: {kind: options record}`` (kinds: ``volume``,
``image``, ``slide_tile``). Training calls :func:`adopt_prepared` on its data's records before it builds the model:
each modality whose loader a kind configures takes that kind's options into its ``preprocess``, which
``save_pretrained`` writes beside the weights and every serving path reads back.
"""

from __future__ import annotations

from dataclasses import fields

from ..config import ModelConfig, PreprocessConfig
from ..errors import ConfigError
from .image import ImageOptions
from .slide import TileOptions
from .volume import VolumeOptions

OPTIONS = {cls.kind: cls for cls in (VolumeOptions, ImageOptions, TileOptions)}
"""kind -> its options dataclass (``to_record``/``from_record``/``preprocess_fields``/``from_preprocess``)."""

_DEFAULTS = {f.name: getattr(PreprocessConfig(), f.name) for f in fields(PreprocessConfig)}


def options_for_loader(loader: str) -> list[type]:
    """The options classes that configure runtime loader ``loader`` (none for molecules, DNA, features)."""
    return [cls for cls in OPTIONS.values() if loader in cls.loaders]


def adopt_prepared(model: ModelConfig, prepared: list[tuple[str, dict]]) -> dict[str, dict]:
    """Copy the recorded preprocessing of the data into ``model``'s modalities, in place.

    Args:
        model: the model config training is about to build (its ``modalities[*].preprocess`` are updated).
        prepared: ``(where, {kind: record})`` per prepared source (a manifest or a shard sample's JSON).

    Returns:
        ``{modality: {field: value}}`` of what was copied.

    Raises:
        ConfigError: a field the config sets (to other than its default) differs from the data's, or two data
            sources disagree; the message names both values and where each comes from.
    """
    copied: dict[str, dict] = {}
    for name, m in model.modalities.items():
        origin: dict[str, str] = {}  # field -> where its value came from
        for where, records in prepared:
            for cls in options_for_loader(m.loader):
                rec = (records or {}).get(cls.kind)
                if rec is None:
                    continue
                for key, value in cls.from_record(rec).preprocess_fields().items():
                    current = getattr(m.preprocess, key)
                    if _same(current, value):
                        origin.setdefault(key, where)
                        continue
                    if key in origin:
                        raise ConfigError(f"model.modalities.{name}.preprocess.{key}: the data disagree: {origin[key]} "
                                          f"was prepared with {current!r}, {where} with {value!r}")
                    if not _same(current, _DEFAULTS[key]):
                        raise ConfigError(f"model.modalities.{name}.preprocess.{key} is {current!r}, but {where} was "
                                          f"prepared with {value!r}: a model trained on it would be served other "
                                          f"inputs; set {key}: {value!r} (or leave it unset) or prepare again")
                    setattr(m.preprocess, key, list(value) if isinstance(value, tuple) else value)
                    origin[key] = where
                    copied.setdefault(name, {})[key] = value
    return copied


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b
