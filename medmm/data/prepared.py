"""The preprocessing a training mixture's data was prepared with, read from its manifests (or first shard sample).

``medmm prepare`` records its options (:mod:`medmm.modalities`) in ``manifest.json`` and in every shard sample's
``json``; :func:`prepared_preprocess` collects them per dataset so training can copy them into the model config
(:func:`medmm.modalities.adopt_prepared`) before the checkpoint is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import DatasetConfig
from ..errors import InvalidInputError
from .streaming import expand_shards, shard_samples

MANIFEST = "manifest.json"


def _manifest_preprocess(folder: Path) -> tuple[str, dict] | None:
    """``(path, preprocess)`` of ``folder/manifest.json`` when it records any; None when there is no manifest."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidInputError(path, f"manifest cannot be read ({e})") from e
    return str(path), (doc.get("preprocess") or {}) if isinstance(doc, dict) else {}


def _first_sample_preprocess(url: str) -> tuple[str, dict]:
    """``(url#key, preprocess)`` from a shard's first sample (its ``json`` member), for shards without a manifest."""
    for sample in shard_samples(url):
        raw = sample.get("json")
        try:
            meta = json.loads(raw) if raw else {}
        except ValueError:
            meta = {}
        return f"{url}#{sample['__key__']}", (meta.get("preprocess") or {}) if isinstance(meta, dict) else {}
    return url, {}


def prepared_preprocess(datasets: list[DatasetConfig]) -> list[tuple[str, dict]]:
    """``(where, {kind: options record})`` for every dataset that records how it was prepared.

    ``format: wds``: the ``manifest.json`` beside the first local shard, else the first sample's ``json``; a
    conversation JSONL: the ``manifest.json`` beside it (``prepare dicom`` writes both). Text corpora record nothing.
    """
    out: list[tuple[str, dict]] = []
    for ds in datasets:
        if ds.format == "wds":
            urls = expand_shards(ds.shards or ds.path)
            local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
            found = _manifest_preprocess(Path(local[0]).parent) if local else None
            found = found or _first_sample_preprocess(urls[0])
        elif ds.format == "conversation" and ds.path:
            found = _manifest_preprocess(Path(ds.path).expanduser().parent)
        else:
            found = None
        if found and found[1]:
            out.append(found)
    return out
