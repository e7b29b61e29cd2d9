"""Row 11: an error never echoes a huge input back.

A 1.5 MB SMILES sent to ``/v1/ask`` got a 422 whose body repeated all 1.5 MB (the loader named the input by the
input itself). Here the same over the real HTTP API on loopback for SMILES and DNA, and the io functions directly:
every message holds at most a short prefix of the offending value.
"""

from __future__ import annotations

import httpx
import pytest

from medmm.errors import SequenceError, SmilesError
from tests.security.conftest import AUTH

pytestmark = pytest.mark.integration

HUGE = 1_500_000  # characters: the size of the observed attack
SMALL_BODY = 4096  # bytes: a typed error record with a short excerpt fits easily


def _ask(url: str, modality: str, value: str) -> httpx.Response:
    body = {"question": "Is this drug-like?", "modalities": {modality: value}, "max_new_tokens": 1}
    return httpx.post(f"{url}/v1/ask", json=body, headers=AUTH, timeout=120)


def test_huge_smiles_and_dna_over_http_get_a_short_answer(api_url):
    """1.5 MB as a SMILES (the observed attack) and as DNA: refused (422, or 413 where a length cap fires first)
    with a body of a few hundred bytes."""
    probes = [("mol", "C" * HUGE),
              # invalid letters (past the API's letters-only check, refused by the nucleotide check), and a non-letter
              # (the API's own refusal)
              ("dna", "ACGTX" * (HUGE // 5)), ("dna", "ACGT" * (HUGE // 4) + "!")]
    for modality, value in probes:
        r = _ask(api_url, modality, value)
        assert r.status_code in (413, 422), (modality, r.status_code)
        assert len(r.content) < SMALL_BODY, f"{modality}: {len(r.content)} bytes echoed back"


def test_smiles_errors_repeat_only_a_short_prefix():
    from medmm.config import PreprocessConfig
    from medmm.data.loaders import FingerprintLoader
    from medmm.io import molecules
    from medmm.io.molecules import StandardiseOptions, parse_smiles, process_molecules

    huge = "C" * HUGE
    cases = [
        lambda: parse_smiles(huge),
        lambda: parse_smiles(huge, options=StandardiseOptions(max_heavy_atoms=10**6)),  # past the per-atom limit too
        lambda: parse_smiles("C1CC" + "(C)" * 2000),  # unclosed ring: RDKit's syntax error
        lambda: parse_smiles("c1cccc1" + "C" * 3000, options=StandardiseOptions(max_heavy_atoms=10**6)),  # kekulize
        lambda: FingerprintLoader(PreprocessConfig()).load(huge),  # the loader the API calls (names the input)
    ]
    for make in cases:
        with pytest.raises(SmilesError) as e:
            make()
        assert len(str(e.value)) < 600, str(e.value)[:300]
    rec = process_molecules([huge])[0]
    assert not rec.ok and len(rec.error["message"]) + len(rec.error["path"]) < 600
    # a hard cap on the text, before RDKit sees it, whatever the heavy-atom limit
    with pytest.raises(SmilesError, match="over the size limit") as e:
        parse_smiles("C" * (molecules.MAX_SMILES_CHARS + 1), options=StandardiseOptions(max_heavy_atoms=10**9))
    assert e.value.kind == "too_large"


def test_sequence_errors_repeat_only_a_short_prefix():
    from medmm.io.genomics import clean_sequence, decode_kmers, tokenize

    cases = [
        lambda: decode_kmers("ACG " + "T" * HUGE),  # a k-mer of the wrong length
        lambda: decode_kmers("A" * HUGE + " " + "C" * HUGE),
        lambda: clean_sequence("ACGT" * 1000 + "".join(map(chr, range(0x100, 0x1100)))),
        lambda: tokenize("ACGT", k=HUGE),
    ]
    for make in cases:
        with pytest.raises(SequenceError) as e:
            make()
        assert len(str(e.value)) < 600, str(e.value)[:300]
