"""The picture a pathologist looks at: the slide thumbnail with its tissue mask, and the attention as a heat map.

    medmm wsi heatmap --checkpoint runs/slide_cls/checkpoint --features runs/wsi/features/S1.safetensors --out S1.png
    python infer.py --checkpoint C --slide runs/wsi/features/S1.safetensors --question "Diagnosis?" --heatmap S1.png

Left panel: the thumbnail with the Otsu tissue mask outlined and the tiles that were used drawn as a
grid. Right panel: each tile coloured by its attention, as a percentile within the slide (raw attention
is dominated by a few tiles; CLAM shows it the same way), with the five most attended tiles boxed.

Attention comes from the model itself (:mod:`medmm.model.attention`): gated ABMIL's attention weights,
or, for the ``resampler`` projector, its cross-attention from the learned queries to the tiles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import SlideError


def rank_normalise(scores: np.ndarray) -> np.ndarray:
    """Scores -> percentile ranks in [0, 1] (ties share their mean rank)."""
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=np.float64)
    if s.size <= 1:
        return np.ones_like(s)
    return (rankdata(s) - 1) / (s.size - 1)


def render_slide_heatmap(slide_path: str | Path, coords: np.ndarray, tile0: float, scores: np.ndarray,
                         out_png: str | Path, *, slide_mpp: float | None = None, backend: str = "auto",
                         title: str | None = None, max_side: int = 1600, normalise: str = "rank",
                         top_k: int = 5) -> dict:
    """Write the two-panel PNG; returns what was drawn (path, size, tiles, most attended tiles).

    Args:
        slide_path: the slide the tiles came from.
        coords: (N, 2) level-0 top-left corners of the tiles.
        tile0: tile side in level-0 pixels.
        scores: (N,) attention (or any per-tile score).
        out_png: output file.
        normalise: ``rank`` (percentile within the slide) or ``minmax``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from PIL import Image

    from ..io.wsi import detect_tissue, open_slide

    coords = np.asarray(coords).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(coords) != len(scores):
        raise ValueError(f"{len(coords)} tile coordinates but {len(scores)} scores")
    with open_slide(slide_path, slide_mpp=slide_mpp, backend=backend) as slide:
        w0, h0 = slide.dimensions[0]
        ds = max(1.0, max(w0, h0) / max_side)
        thumb = slide.read_downsampled(ds)
        mpp = slide.mpp
    # Tissue at the picture's resolution, or coarser (a median filter of 5 px needs some room).
    mask_ds = max(ds, max(w0, h0) / 512)
    small = np.asarray(Image.fromarray(thumb).resize((max(1, int(w0 / mask_ds)), max(1, int(h0 / mask_ds))),
                                                     Image.Resampling.BOX))
    mask, _thr = detect_tissue(small)
    mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(thumb.shape[1::-1],
                                                                         Image.Resampling.NEAREST)) > 127

    vals = rank_normalise(scores) if normalise == "rank" else (scores - scores.min()) / max(np.ptp(scores), 1e-12)
    heat = np.full(thumb.shape[:2], np.nan)
    side = tile0 / ds
    for (x, y), v in zip(coords, vals):
        x0, y0 = int(round(x / ds)), int(round(y / ds))
        x1, y1 = max(x0 + 1, int(round((x + tile0) / ds))), max(y0 + 1, int(round((y + tile0) / ds)))
        heat[y0:y1, x0:x1] = v

    fig, axes = plt.subplots(1, 2, figsize=(12, 6.2 * thumb.shape[0] / max(thumb.shape[1], 1) + 1.0))
    ax = axes[0]
    ax.imshow(thumb)
    if mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors="lime", linewidths=1.0)
    for x, y in coords:
        ax.add_patch(Rectangle((x / ds, y / ds), side, side, fill=False, lw=0.3, ec="black", alpha=0.5))
    ax.set_title(f"tissue (Otsu, green) and {len(coords)} tiles")
    ax = axes[1]
    ax.imshow(thumb)
    im = ax.imshow(np.ma.masked_invalid(heat), cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="nearest")
    top = np.argsort(-scores)[:top_k]
    for i in top:
        x, y = coords[i]
        ax.add_patch(Rectangle((x / ds, y / ds), side, side, fill=False, lw=1.5, ec="white"))
    ax.set_title("attention (percentile within slide)" if normalise == "rank" else "attention (min-max)")
    fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02)
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
    res = f"{mpp:.3g} µm/px at level 0" if mpp else "MPP unknown"
    fig.suptitle(title or f"{Path(slide_path).name}  ({w0}x{h0} px, {res}; thumbnail 1:{ds:.0f})")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return {"heatmap": str(out_png), "tiles": int(len(coords)), "thumbnail_downsample": ds,
            "top_tiles": [{"x": int(coords[i][0]), "y": int(coords[i][1]), "attention": float(scores[i])}
                          for i in top]}


def heatmap_from_item(item: dict, scores: np.ndarray, out_png: str | Path, slide_path: str | None = None,
                      slide_mpp: float | None = None) -> dict:
    """Render from a ``slide_features`` / ``slide_tiles`` loader item (its coords and metadata name the slide)."""
    meta = item.get("meta") or {}
    if "coords" not in item:
        raise SlideError(meta.get("path", "<slide>"), "the feature file has no tile coordinates; a heat map needs "
                                                     "the .safetensors written by `medmm prepare wsi --features`")
    src = slide_path or meta.get("source")
    if not src:
        raise SlideError(meta.get("path", "<slide>"), "the feature file does not name its slide; pass the slide path")
    if not Path(src).exists():
        raise SlideError(src, "the slide named by the feature file is not here; pass its current path")
    tile0 = float(meta["tile0"])
    return render_slide_heatmap(src, item["coords"].numpy(), tile0, scores, out_png, slide_mpp=slide_mpp)


def head_heatmap(checkpoint: str | Path, features: str | Path, out_png: str | Path, slide: str | None = None,
                 slide_mpp: float | None = None, device: str = "auto") -> dict:
    """Attention heat map of a saved slide head model (``trainer.stage: head``, abmil) on one slide's feature file,
    with its class probabilities."""
    from .head import HeadPredictor

    hp = HeadPredictor(checkpoint, device)
    item = hp.featuriser.load({"path": str(features)})
    if "coords" not in item:
        raise SlideError(features, "no tile coordinates in the feature file (write it with "
                                   "`medmm prepare wsi --features`)")
    dev = next(hp.model.parameters()).device
    x, mask = item["x"][None].to(dev), item["mask"][None].to(dev)
    with torch.no_grad():
        att = hp.model.attention(x, mask)[0].float().cpu().numpy()
        logits = hp.model(x, mask).float().cpu().numpy()
    probs = hp.probabilities(logits)[0]
    if hp.model.binary:
        probs = np.array([1 - probs, probs])
    pred = hp.classes[int(probs.argmax())]
    meta = item.get("meta") or {}
    src = slide or meta.get("source")
    if not src or not Path(src).exists():
        raise SlideError(features, f"the slide '{src}' is not here; pass --slide with its current path")
    info = render_slide_heatmap(src, item["coords"].numpy(), float(meta["tile0"]), att, out_png, slide_mpp=slide_mpp,
                                title=f"{Path(src).name}: predicted {pred} (p={probs.max():.2f})")
    return {**info, "prediction": pred, "probabilities": {c: float(p) for c, p in zip(hp.classes, probs)}}
