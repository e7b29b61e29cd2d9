"""Slides: a slide JSONL (``modalities.slide`` = a tile-feature file, ``label``) -> bags of tile features.

The JSONL is what ``medmm prepare wsi --features --labels`` writes. Bags are read lazily, one per
item of a batch: a training bag larger than ``head.train_max_tokens`` keeps a random subset of its
tiles (a fresh one each epoch: a regulariser, and bounded memory); evaluation and prediction keep
up to ``preprocess.slide_max_tiles`` evenly spaced tiles (deterministic).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...errors import InvalidInputError, SlideError
from ...io.slide_features import feature_shape
from . import Featurised, Featuriser, Item, Row, register_featuriser


@register_featuriser("slides")
class SlideFeaturiser(Featuriser):
    """Tile-feature files -> ``{"x": (N, D), "mask": (N,)}`` bags for a pooling aggregator (``abmil``)."""

    def read_rows(self, path: str | Path, input_col: str | None = None, label_col: str | None = None,
                  labelled: bool = True) -> list[Row]:
        """One row per slide. ``prepare wsi`` writes a label record and a report record per slide: records are
        merged by feature file (two different labels for one slide is an error naming both lines); records
        without a label (report only) are skipped, and a file with no labelled slide at all is an error."""
        from ...utils import read_jsonl

        path = Path(path)
        if not path.exists():
            raise InvalidInputError(path, "slide JSONL not found")
        label_key = label_col or self.cfg.data.label_col
        out: dict[str, Row] = {}
        lines: dict[str, int] = {}
        for i, r in enumerate(read_jsonl(path), 1):
            feat = (r.get("modalities") or {}).get("slide") or r.get("features")
            if not feat:
                raise InvalidInputError(f"{path}:{i}", "needs modalities.slide (a tile-feature file)")
            fp = Path(feat)
            key = str(fp if fp.is_absolute() else path.parent / fp)
            label = r.get(label_key)
            if labelled and label in (None, ""):
                continue
            if labelled and key in out and str(out[key].label) != str(label):
                raise InvalidInputError(f"{path}:{i}", f"slide {feat} is labelled '{label}' here and "
                                                       f"'{out[key].label}' at line {lines[key]}")
            if key not in out:
                out[key] = Row(f"{path}:{i} (id={r.get('id', '')})", key, None if label is None else str(label))
                lines[key] = i
            if self.cfg.data.limit is not None and len(out) >= self.cfg.data.limit:
                break
        if labelled and not out:
            raise InvalidInputError(path, f"no record has a '{label_key}'")
        return list(out.values())

    def featurise(self, values: list[str], sources: list[str]) -> Featurised:
        """Checks each file's header (present, 2-D, the configured width, not empty); bags are read in :meth:`load`."""
        want = self.cfg.preprocess.slide_feature_dim
        out = Featurised()
        for value, src in zip(values, sources):
            try:
                n, d = feature_shape(value)
                if n == 0:
                    raise SlideError(value, "the slide has no tiles (no tissue found?)")
                if d != want:
                    raise SlideError(value, f"tile features have width {d}, but head.preprocess.slide_feature_dim "
                                            f"is {want}")
            except InvalidInputError as e:
                out.errors.append(e.to_record())
                continue
            out.items.append({"path": str(value)})
            out.sources.append(src)
            out.inputs.append(str(value))
            out.canonical.append(str(value))
        return out

    def load(self, item: Item, train: bool = False, rng: np.random.Generator | None = None) -> Item:
        from ...io.slide_features import load_slide_features
        from ...io.wsi import evenly_spaced

        feats, coords, meta = load_slide_features(item["path"])
        cap = self.cfg.train_max_tokens if train and self.cfg.train_max_tokens else self.cfg.preprocess.slide_max_tiles
        if feats.shape[0] > cap:
            idx = np.sort(rng.choice(feats.shape[0], cap, replace=False)) if train and rng is not None else \
                evenly_spaced(feats.shape[0], cap)
            feats = feats[idx]
            coords = None if coords is None else coords[idx]
        out = {"x": torch.from_numpy(np.ascontiguousarray(feats)), "mask": torch.ones(feats.shape[0], dtype=torch.bool),
               "meta": {**meta, "path": item["path"]}}
        if coords is not None:
            out["coords"] = torch.from_numpy(np.ascontiguousarray(coords))
        return out
