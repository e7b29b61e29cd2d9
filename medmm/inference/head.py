"""A saved head model (``trainer.stage: head``) on raw inputs: featurise the way training did, return logits.

    from medmm.inference.head import HeadPredictor
    hp = HeadPredictor("runs/druggability_head/checkpoint")
    feats, logits = hp.predict(["CCO", "c1ccccc1O"])          # feats.errors holds rejected inputs
    probs = hp.probabilities(logits)                          # calibrated (the stored temperature)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InvalidInputError


class HeadPredictor:
    """A head model folder plus its featuriser; ``predict`` scores raw inputs (SMILES, sequences, feature files)."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        from ..data.featurisers import build_featuriser
        from ..model.heads import HeadModel, is_head_model
        from .predictor import pick_device

        path = Path(path)
        if not is_head_model(path):
            raise InvalidInputError(path, "not a head model folder (no head_model.json)")
        self.model = HeadModel.from_pretrained(path, pick_device(device))
        self.cfg = self.model.config
        self.featuriser = build_featuriser(self.cfg)

    @property
    def temperature(self) -> float:
        return self.model.temperature

    @property
    def classes(self) -> list[str]:
        return self.model.classes

    def predict(self, values: list[str], sources: list[str] | None = None, labels: list[int | None] | None = None,
                reports: bool = True):
        """Featurise ``values`` (failed ones land in ``.errors``; ``reports`` adds the featuriser's report columns)
        and return ``(featurised, logits)``; ``labels`` (one per value) are carried onto the surviving items."""
        from ..data.featurisers import with_reports
        from ..model.heads import predict_logits

        sources = sources or [f"row {i}" for i in range(len(values))]
        feats = self.featuriser.featurise(values, sources)
        by_source = dict(zip(sources, labels or [None] * len(sources)))
        feats.labels = [by_source[s] for s in feats.sources]
        if reports:
            with_reports(self.featuriser, feats)
        return feats, predict_logits(self.model, self.featuriser, feats.items)

    def probabilities(self, logits: np.ndarray, calibrated: bool = True) -> np.ndarray:
        """Positive-class probabilities ``(n,)`` (binary) or class probabilities ``(n, C)``."""
        from ..scoring import sigmoid

        t = self.temperature if calibrated else 1.0
        if logits.ndim == 1:
            return sigmoid(logits / t)
        z = logits / t
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
