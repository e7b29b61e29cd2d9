"""Projectors map (B, N, D) to (B, K, H); the resampler caps K and honours the mask."""

import pytest
import torch

from medmm.model.projectors import build_projector, list_projectors


@pytest.mark.parametrize("name", list_projectors())
def test_shapes(name):
    p = build_projector(name, 16, 32, num_queries=5, heads=4)
    y = p(torch.randn(3, 11, 16))
    k = p.num_tokens(11)
    assert y.shape == (3, k, 32)
    assert k == (5 if name == "resampler" else 11)


def test_resampler_caps_tokens_and_ignores_masked():
    p = build_projector("resampler", 8, 16, num_queries=4, heads=2, depth=2).eval()
    x = torch.randn(1, 1000, 8)
    assert p(x).shape == (1, 4, 16)
    mask = torch.zeros(1, 1000, dtype=torch.bool)
    mask[:, :10] = True
    a = p(x, mask)
    x2 = x.clone()
    x2[:, 10:] = torch.randn_like(x2[:, 10:]) * 100  # masked tokens must not matter
    torch.testing.assert_close(a, p(x2, mask))
    with pytest.raises(ValueError, match="all masked"):
        p(x, torch.zeros(1, 1000, dtype=torch.bool))
