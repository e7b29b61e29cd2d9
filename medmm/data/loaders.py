"""Modality input loaders: a raw value (path, SMILES, sequence) -> the tensor an encoder takes.

One registered class per kind of input (``medmm list loaders`` prints them with what each returns). Each loader
also collates a list of items and makes a dummy item, which the trainer feeds when a batch lacks the modality
(every rank must run every encoder under ZeRO-3).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from encoders.registry import Registry

from ..config import PreprocessConfig
from ..errors import DicomError, ImageError, InvalidInputError, SequenceError, SlideError, excerpt
from ..io.dicom import is_dicom_file
from ..io.files import check_regular_file
from ..io.images import read_image
from ..modalities.image import ImageOptions, dicom_image
from ..modalities.slide import TileOptions, read_tiles, tile_plan
from ..modalities.volume import VolumeOptions, load_volume

Item = dict[str, torch.Tensor]


def _resolve(value: str, base_dir: Path | None) -> Path:
    """A manifest value as a path (relative ones against the manifest's folder). Loaders then check with
    :func:`medmm.io.files.check_regular_file` before opening: ``open()`` on a FIFO blocks for ever."""
    p = Path(value).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return p


def _is_array_ref(value: Any) -> bool:
    if isinstance(value, np.ndarray):  # already decoded (a streamed shard sample, medmm.data.streaming)
        return True
    v = str(value)
    return ".tar#" in v or v.endswith((".npz", ".npy"))


def _read_array(value: Any, base_dir: Path | None) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return np.asarray(value, dtype=np.float32)
    from ..io.shards import read_shard_array

    return np.asarray(read_shard_array(str(value), base_dir), dtype=np.float32)


class ModalityLoader:
    """Base class. Subclasses implement ``load``; ``collate`` stacks fixed-size items."""

    name = ""

    def __init__(self, pre: PreprocessConfig):
        self.pre = pre

    def load(self, value: Any, base_dir: Path | None = None) -> Item:  # pragma: no cover - interface
        raise NotImplementedError

    def dummy(self) -> Item:  # pragma: no cover - interface
        raise NotImplementedError

    def collate(self, items: list[Item]) -> Item:
        return {"x": torch.stack([it["x"] for it in items])}


class ImageLoader(ModalityLoader):
    """2D image: PNG/JPEG via Pillow or DICOM (windowed; middle frame of a multi-frame file)."""

    name = "image"

    def load(self, value: Any, base_dir: Path | None = None) -> Item:
        if _is_array_ref(value):  # preprocessed by `prepare dicom`: [0, 1], (H, W) or (H, W, 3)
            arr = _read_array(value, base_dir)
            return {"x": self.to_tensor(arr[..., None] if arr.ndim == 2 else arr)}
        path = check_regular_file(_resolve(str(value), base_dir), ImageError, missing_ok=True)
        if is_dicom_file(path):  # the transform `prepare dicom` applied, with the options it recorded
            arr, _meta = dicom_image(path, ImageOptions.from_preprocess(self.pre))
            arr = arr if arr.ndim == 3 else arr[..., None]
        else:
            arr = read_image(path)
        return {"x": self.to_tensor(arr)}

    def to_tensor(self, arr: np.ndarray) -> torch.Tensor:
        """(H, W, C) in [0, 1] -> normalised (channels, S, S)."""
        t = torch.from_numpy(np.ascontiguousarray(arr)).float().permute(2, 0, 1)  # (C, H, W)
        c = self.pre.channels
        if t.shape[0] == 1 and c == 3:
            t = t.expand(3, -1, -1)
        elif t.shape[0] == 3 and c == 1:
            t = t.mean(0, keepdim=True)
        s = self.pre.image_size
        t = F.interpolate(t[None], size=(s, s), mode="bilinear", align_corners=False, antialias=True)[0]
        mean = torch.tensor(self.pre.mean).view(-1, 1, 1)
        std = torch.tensor(self.pre.std).view(-1, 1, 1)
        return (t.clamp(0, 1) - mean) / std

    def dummy(self) -> Item:
        s = self.pre.image_size
        return {"x": torch.zeros(self.pre.channels, s, s)}


class VolumeLoader(ModalityLoader):
    """3D volume: a DICOM series folder (or multi-frame file) -> windowed, resized (1, D, H, W)."""

    name = "volume"

    def load(self, value: Any, base_dir: Path | None = None) -> Item:
        if _is_array_ref(value):  # preprocessed by `prepare dicom`: (D, H, W) in [0, 1]
            arr = _read_array(value, base_dir).astype(np.float32)
        else:  # the transform `prepare dicom` applied (window, spacing, size), with the options it recorded
            path = _resolve(str(value), base_dir)
            if not path.is_dir():  # a series folder, else one (multi-frame) file
                check_regular_file(path, DicomError, missing_ok=True)
            arr = load_volume(path, VolumeOptions.from_preprocess(self.pre))  # (D, H, W) in [0, 1]
        t = torch.from_numpy(arr)[None]  # (1, D, H, W)
        if list(arr.shape) != list(self.pre.volume_size):  # the encoder's input size, for shards and raw alike
            from monai.transforms import Resize

            t = Resize(tuple(self.pre.volume_size), mode="trilinear")(t)
        return {"x": torch.as_tensor(t).float()}

    def dummy(self) -> Item:
        return {"x": torch.zeros(1, *self.pre.volume_size)}


class FingerprintLoader(ModalityLoader):
    """SMILES -> standardised molecule -> Morgan fingerprint (bits,)."""

    name = "smiles_fingerprint"

    def load(self, value: Any, base_dir: Path | None = None) -> Item:
        from ..io.molecules import morgan_fingerprint, parse_smiles

        mol = parse_smiles(str(value), source=f"SMILES '{excerpt(value)}'")
        fp = morgan_fingerprint(mol, self.pre.fingerprint_bits, self.pre.fingerprint_radius)
        return {"x": torch.from_numpy(fp)}

    def dummy(self) -> Item:
        return {"x": torch.zeros(self.pre.fingerprint_bits)}


class DnaLoader(ModalityLoader):
    """DNA sequence string, or a FASTA path (first record) -> k-mer ids (L,) + mask, padded in collate."""

    name = "dna_tokens"

    def load(self, value: Any, base_dir: Path | None = None) -> Item:
        from ..io.genomics import FASTA_SUFFIXES, read_fasta, tokenize

        text = str(value)
        source = "<sequence>"
        path = _resolve(text, base_dir) if len(text) < 4096 else None
        if path is not None and (path.suffix.lower() in FASTA_SUFFIXES or "".join(path.suffixes[-2:]) in
                                 FASTA_SUFFIXES) :
            if not path.exists():
                raise SequenceError(path, "FASTA file not found")
            check_regular_file(path, SequenceError)
            source, text = str(path), read_fasta(path)[0][1]
        ids = torch.from_numpy(tokenize(text, self.pre.kmer, self.pre.max_length, source=source))
        return {"x": ids, "mask": torch.ones_like(ids, dtype=torch.bool)}

    def collate(self, items: list[Item]) -> Item:
        n = max(it["x"].shape[0] for it in items)
        x = torch.zeros(len(items), n, dtype=torch.long)
        m = torch.zeros(len(items), n, dtype=torch.bool)
        for i, it in enumerate(items):
            x[i, : it["x"].shape[0]] = it["x"]
            m[i, : it["x"].shape[0]] = True
        return {"x": x, "mask": m}

    def dummy(self) -> Item:
        ids = torch.full((8,), 2, dtype=torch.long)
        return {"x": ids, "mask": torch.ones(8, dtype=torch.bool)}


LOADERS = Registry("loader")
"""name -> ``cls(pre: PreprocessConfig) -> ModalityLoader``."""


def register_loader(name: str, cls: Callable[[PreprocessConfig], ModalityLoader], summary: str | None = None) -> None:
    """Register a loader class under ``name`` (summary: its docstring's first paragraph unless given)."""
    LOADERS.register(name, cls, summary)


def list_loaders() -> list[str]:
    """Registered loader names."""
    return LOADERS.names()


def build_loader(name: str, pre: PreprocessConfig) -> ModalityLoader:
    """The loader ``name`` with these preprocessing settings; a ConfigError lists the registered ones."""
    return LOADERS.get(name)(pre)


register_loader("image", ImageLoader)
register_loader("volume", VolumeLoader)
register_loader("smiles_fingerprint", FingerprintLoader)
register_loader("dna_tokens", DnaLoader)


class MolGraphLoader(ModalityLoader):
    """SMILES -> standardised molecule -> atom/bond graph, for the ``mol_gin`` encoders.

    An item holds ``x`` (N, F) atom features, ``adj`` (N, N) bond codes and the edge list
    (``edge_index`` (2, E), ``edge_code`` (E,)). ``collate`` pads to the batch's largest molecule and
    packs features and bond codes into one ``x`` (B, N, F + N) with ``mask`` (B, N); it also returns
    the edge list with node ids offset into the flattened (B * N) padded nodes.
    """

    name = "mol_graph"

    def options(self):
        from ..io.molecules import StandardiseOptions

        return StandardiseOptions(largest_fragment=self.pre.mol_largest_fragment, neutralise=self.pre.mol_neutralise,
                                  canonical_tautomer=self.pre.mol_canonical_tautomer,
                                  remove_stereo=self.pre.mol_remove_stereo,
                                  max_heavy_atoms=self.pre.mol_max_heavy_atoms)

    def load(self, value: Any, base_dir: Path | None = None) -> Item:
        from ..io.molecules import mol_graph, parse_smiles

        return self.from_graph(mol_graph(parse_smiles(str(value), source=f"SMILES '{excerpt(value)}'", options=self.options())))

    @staticmethod
    def from_graph(graph) -> Item:
        """An item from a :class:`medmm.io.molecules.MolGraph` (e.g. made in worker processes)."""
        return {"x": torch.from_numpy(graph.node_features), "adj": torch.from_numpy(graph.adjacency()),
                "edge_index": torch.from_numpy(graph.edge_index), "edge_code": torch.from_numpy(graph.edge_code)}

    def collate(self, items: list[Item]) -> Item:
        from encoders.molecule import pack_graphs

        x, mask = pack_graphs([it["x"] for it in items], [it["adj"] for it in items])  # (B, N, F + N), (B, N)
        n = x.shape[1]
        edge_index = torch.cat([it["edge_index"] + b * n for b, it in enumerate(items)], 1)  # (2, E)
        edge_code = torch.cat([it["edge_code"] for it in items])  # (E,)
        return {"x": x, "mask": mask, "edge_index": edge_index, "edge_code": edge_code}

    def dummy(self) -> Item:
        from ..io.molecules import mol_graph, parse_smiles

        return self.from_graph(mol_graph(parse_smiles("C", source="<dummy>")))  # methane: one atom, no bonds


register_loader("mol_graph", MolGraphLoader)


class SlideFeatureLoader(ModalityLoader):
    """A slide as a bag of precomputed tile features: ``.safetensors`` from ``medmm prepare wsi --features`` or a
    ``.npy`` (N, D) -> ``x`` (N, D) + ``mask``; ``collate`` pads bags to the longest (``x`` (B, N, D), ``mask`` (B, N)).

    Bags over ``slide_max_tiles`` keep an evenly spaced subset; the item also carries the tiles' level-0
    ``coords`` and the file's metadata (slide path, tile size) for heat maps."""

    name = "slide_features"

    def load(self, value: Any, base_dir: Path | None = None) -> Item:
        from ..io.slide_features import load_slide_features
        from ..io.wsi import evenly_spaced

        if isinstance(value, np.ndarray):  # a streamed feature-shard sample's (N, D) bag
            path, feats, coords, meta = "<shard sample>", np.asarray(value, np.float32), None, {}
        else:
            path = check_regular_file(_resolve(str(value), base_dir), SlideError, missing_ok=True)
            feats, coords, meta = load_slide_features(path)
        if feats.shape[0] == 0:
            raise SlideError(path, "the slide has no tiles (no tissue found?)")
        if feats.shape[1] != self.pre.slide_feature_dim:
            raise SlideError(path, f"tile features have width {feats.shape[1]}, but the model expects "
                                   f"preprocess.slide_feature_dim={self.pre.slide_feature_dim}")
        keep = evenly_spaced(feats.shape[0], self.pre.slide_max_tiles)
        item = {"x": torch.from_numpy(np.ascontiguousarray(feats[keep])),
                "mask": torch.ones(len(keep), dtype=torch.bool), "meta": {**meta, "path": str(path)}}
        if coords is not None:
            item["coords"] = torch.from_numpy(np.ascontiguousarray(coords[keep]))
        return item

    def collate(self, items: list[Item]) -> Item:
        n = max(it["x"].shape[0] for it in items)
        x = torch.zeros(len(items), n, *items[0]["x"].shape[1:], dtype=items[0]["x"].dtype)
        m = torch.zeros(len(items), n, dtype=torch.bool)
        for i, it in enumerate(items):
            x[i, : it["x"].shape[0]] = it["x"]
            m[i, : it["x"].shape[0]] = it["mask"]
        return {"x": x, "mask": m}

    def dummy(self) -> Item:
        return {"x": torch.zeros(1, self.pre.slide_feature_dim), "mask": torch.ones(1, dtype=torch.bool)}


class SlideTileLoader(SlideFeatureLoader):
    """A slide file (SVS, NDPI, MRXS, TIFF ...) tiled on the fly -> ``x`` (N, 3, S, S) normalised tiles + ``mask``.

    Tiles of ``slide_tile`` px at ``slide_mpp`` where the tissue fraction is >= ``slide_min_tissue``, at most
    ``slide_max_tiles`` (evenly spaced), resized to ``image_size`` and normalised with ``mean``/``std``. For
    training, precompute features with ``medmm prepare wsi --features`` and use ``slide_features``."""

    name = "slide_tiles"

    def load(self, value: Any, base_dir: Path | None = None) -> Item:
        from ..io.wsi import evenly_spaced, open_slide

        path = check_regular_file(_resolve(str(value), base_dir), SlideError, missing_ok=True)
        opts = TileOptions.from_preprocess(self.pre)  # what `prepare wsi` recorded: the same grid, the same tiles
        with open_slide(path, slide_mpp=opts.scan_mpp) as slide:
            choice, grid, _mask = tile_plan(slide, opts)
            if len(grid) == 0:
                raise SlideError(path, f"no tile has >= {self.pre.slide_min_tissue:.0%} tissue")
            keep = evenly_spaced(len(grid), self.pre.slide_max_tiles)
            coords = grid.coords[keep]
            tiles = read_tiles(slide, choice, coords)  # (N, T, T, 3) uint8
        t = torch.from_numpy(tiles).permute(0, 3, 1, 2).float().div_(255.0)  # (N, 3, T, T)
        s = self.pre.image_size
        if t.shape[-1] != s:
            t = F.interpolate(t, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.pre.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.pre.std).view(1, -1, 1, 1)
        meta = {"source": str(path), "tile0": choice.tile0, "tile_size": choice.tile_size, "level": choice.level,
                "mpp": choice.effective_mpp, "path": str(path)}
        return {"x": (t - mean) / std, "mask": torch.ones(len(keep), dtype=torch.bool),
                "coords": torch.from_numpy(coords), "meta": meta}

    def dummy(self) -> Item:
        s = self.pre.image_size
        return {"x": torch.zeros(1, 3, s, s), "mask": torch.ones(1, dtype=torch.bool)}


register_loader("slide_features", SlideFeatureLoader,
                "A slide as a bag of precomputed tile features (.safetensors or .npy) -> x (N, D) + mask")
register_loader("slide_tiles", SlideTileLoader)


__all__ = ["LOADERS", "InvalidInputError", "ModalityLoader", "build_loader", "list_loaders", "register_loader"]
