"""DNA sequences: plain (ACGT + IUPAC) or DNABERT-style overlapping k-mers separated by spaces -> k-mer ids.

K-mer text is decoded back to the plain sequence first, so a model trained on one form reads the other.
"""

from __future__ import annotations

from ...errors import InvalidInputError
from . import Featurised, Featuriser, register_featuriser


@register_featuriser("dna")
class DnaFeaturiser(Featuriser):
    """Sequence column -> cleaned sequence -> the ``dna_tokens`` loader's ids + mask."""

    def featurise(self, values: list[str], sources: list[str]) -> Featurised:
        from ...io.genomics import clean_sequence, decode_kmers, looks_like_kmers

        out = Featurised()
        for value, src in zip(values, sources):
            try:
                text = str(value or "")
                seq = clean_sequence(decode_kmers(text, src) if looks_like_kmers(text) else text, src)
                out.items.append(self.loader.load(seq))
                out.sources.append(src)
                out.inputs.append(text)
                out.canonical.append(seq)
            except InvalidInputError as e:
                out.errors.append(e.to_record())
        return out
