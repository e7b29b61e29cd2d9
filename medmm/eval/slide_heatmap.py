"""Slide heat maps for evaluation reports: the renderer lives in :mod:`medmm.inference.heatmap` (``infer.py
--heatmap`` draws them too), the attention in :mod:`medmm.model.attention`; both are importable from here."""

from ..inference.heatmap import head_heatmap, heatmap_from_item, rank_normalise, render_slide_heatmap
from ..model.attention import bag_attention, resampler_attention

__all__ = ["bag_attention", "head_heatmap", "heatmap_from_item", "rank_normalise", "render_slide_heatmap",
           "resampler_attention"]
