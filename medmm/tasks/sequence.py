"""DNA sequence classification: the featuriser of ``task: sequence_classification`` head recipes.

Sequences may be plain (ACGT + IUPAC) or DNABERT-style overlapping k-mers separated by spaces, which
are decoded back to the plain sequence first.
"""

from __future__ import annotations

from ..errors import InvalidInputError
from .head import Featurised, HeadTaskConfig, register_featuriser


@register_featuriser("sequence_classification")
def featurise_sequences(cfg: HeadTaskConfig, values: list[str], sources: list[str]) -> Featurised:
    from ..data.loaders import build_loader
    from ..io.genomics import clean_sequence, decode_kmers, looks_like_kmers

    loader = build_loader(cfg.loader, cfg.preprocess)
    out = Featurised([], [], [], [], [])
    for value, src in zip(values, sources):
        try:
            text = str(value or "")
            seq = clean_sequence(decode_kmers(text, src) if looks_like_kmers(text) else text, src)
            out.items.append(loader.load(seq))
            out.sources.append(src)
            out.inputs.append(text)
            out.canonical.append(seq)
        except InvalidInputError as e:
            out.errors.append(e.to_record())
    return out
