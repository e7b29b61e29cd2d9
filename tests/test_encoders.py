"""Every registered encoder honours the contract: (B, N, D) tokens (+ mask), out_dim, num_tokens."""

import pytest
import torch

from encoders import build_encoder, list_encoders
from encoders.registry import get_encoder_spec
from medmm.errors import ConfigError


def _mol_graphs():
    """Two packed molecular graphs (5 and 3 atoms): x (2, 5, 58 + 5), mask (2, 5)."""
    from encoders.molecule import DEFAULT_ATOM_DIM, pack_graphs

    feats = [torch.eye(DEFAULT_ATOM_DIM)[[0, 0, 1, 2, 0]], torch.eye(DEFAULT_ATOM_DIM)[[0, 2, 0]]]
    adj = [torch.tensor([[0, 1, 0, 0, 0], [1, 0, 8, 0, 0], [0, 8, 0, 2, 0], [0, 0, 2, 0, 1], [0, 0, 0, 1, 0]]),
           torch.tensor([[0, 4, 0], [4, 0, 1], [0, 1, 0]])]
    return pack_graphs(feats, adj)

TINY_INPUTS = {
    "vit_tile_tiny": lambda: (torch.randn(2, 7, 3, 32, 32), torch.arange(7).expand(2, 7) < torch.tensor([[7], [4]])),
    "abmil_tiny": lambda: (torch.randn(2, 7, 32), torch.arange(7).expand(2, 7) < torch.tensor([[7], [4]])),
    "slide_tokens_tiny": lambda: (torch.randn(2, 7, 32), torch.arange(7).expand(2, 7) < torch.tensor([[7], [4]])),
    "vit2d_tiny": lambda: (torch.randn(2, 3, 64, 64), None),
    "vit3d_tiny": lambda: (torch.randn(2, 1, 16, 64, 64), None),
    "mol_fingerprint_tiny": lambda: ((torch.rand(2, 2048) > 0.9).float(), None),
    "mol_gin_tiny": _mol_graphs,
    "dna_tiny": lambda: (torch.randint(2, 6, (2, 40)), torch.arange(40).expand(2, 40) < torch.tensor([[40], [25]])),
}
# Full-size presets are built with small overrides so the test stays fast.
def _tiny_open_clip_dir():
    import json
    import tempfile

    d = tempfile.mkdtemp(prefix="oc-")
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                           "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}}
    with open(f"{d}/tiny-clip.json", "w") as f:
        json.dump(cfg, f)
    return d


SMALL_OVERRIDES = {
    "vit_tile": dict(model_name="vit_tiny_patch16_224", img_size=32, embed_dim=32, depth=1, num_heads=2),
    "abmil": dict(in_dim=48, hidden=32, attn_dim=16, branches=2),
    "slide_tokens": dict(in_dim=48, dim=32),
    "open_clip_vision": dict(model_name="tiny-clip", config_dir=_tiny_open_clip_dir()),
    "vit2d": dict(model_name="vit_tiny_patch16_224", img_size=32, embed_dim=32, depth=1, num_heads=2),
    "vit3d": dict(img_size=(16, 32, 32), patch_size=(8, 16, 16), hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2),
    "mol_fingerprint_mlp": dict(bits=256, hidden=32, num_tokens=3),
    "mol_gin": dict(hidden=32, layers=1, readout="graph", num_tokens=2),
    "dna_cnn_transformer": dict(dim=32, layers=1, heads=2, max_length=256),
    "hf_vision": dict(config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=32, patch_size=8)),
}
SMALL_INPUTS = {
    "vit_tile": lambda: (torch.randn(2, 7, 3, 32, 32), torch.arange(7).expand(2, 7) < torch.tensor([[7], [4]])),
    "abmil": lambda: (torch.randn(2, 7, 48), torch.arange(7).expand(2, 7) < torch.tensor([[7], [4]])),
    "slide_tokens": lambda: (torch.randn(2, 7, 48), torch.arange(7).expand(2, 7) < torch.tensor([[7], [4]])),
    "open_clip_vision": lambda: (torch.randn(2, 3, 32, 32), None),
    "vit2d": lambda: (torch.randn(2, 3, 32, 32), None),
    "vit3d": lambda: (torch.randn(2, 1, 16, 32, 32), None),
    "mol_fingerprint_mlp": lambda: (torch.rand(2, 256), None),
    "mol_gin": _mol_graphs,
    "dna_cnn_transformer": lambda: (torch.randint(2, 6, (2, 50)), None),
    "hf_vision": lambda: (torch.randn(2, 3, 32, 32), None),
}


@pytest.mark.parametrize("name", list_encoders())
def test_encoder_contract(name):
    make = TINY_INPUTS.get(name) or SMALL_INPUTS.get(name)
    assert make is not None, f"new encoder '{name}': add a test input here"
    enc = build_encoder(name, **SMALL_OVERRIDES.get(name, {}))
    x, mask = make()
    tokens, out_mask = enc(x, mask)
    assert tokens.ndim == 3 and tokens.shape[0] == 2 and tokens.shape[2] == enc.out_dim
    if enc.num_tokens is not None:
        assert tokens.shape[1] == enc.num_tokens
    else:
        assert out_mask is not None and out_mask.shape == tokens.shape[:2]
    assert torch.isfinite(tokens).all()
    tokens.sum().backward()
    assert any(p.grad is not None for p in enc.parameters())
    assert get_encoder_spec(name).modality in {"image", "volume", "mol", "dna", "slide"}


def test_dna_mask_excludes_padding():
    enc = build_encoder("dna_tiny").eval()
    x = torch.randint(2, 6, (1, 40))
    padded = torch.cat([x, torch.zeros(1, 24, dtype=torch.long)], 1)
    t1, m1 = enc(x, torch.ones_like(x, dtype=torch.bool))
    t2, m2 = enc(padded, padded != 0)
    n = int(m1.sum())
    assert int(m2.sum()) == n
    torch.testing.assert_close(t1[0, :n], t2[0, :n], atol=1e-5, rtol=1e-4)


def test_checkpoint_loading_safetensors_and_torch(tmp_path):
    from safetensors.torch import save_file

    src = build_encoder("vit2d_tiny")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save(src.state_dict(), tmp_path / "w.pt")
    for f in ("w.safetensors", "w.pt"):
        enc = build_encoder("vit2d_tiny", checkpoint=str(tmp_path / f))
        for (k, a), b in zip(src.state_dict().items(), enc.state_dict().values()):
            assert torch.equal(a, b), k
    torch.save({"bad": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="do not match"):
        build_encoder("vit2d_tiny", checkpoint=str(tmp_path / "bad.pt"))


def test_unknown_encoder():
    with pytest.raises(ConfigError, match="unknown encoder 'nope'"):
        build_encoder("nope")


def test_open_clip_weights_from_local_file(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    d = SMALL_OVERRIDES["open_clip_vision"]["config_dir"]
    open_clip.add_model_config(d)
    clip = open_clip.create_model("tiny-clip", pretrained=None)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    enc = build_encoder("open_clip_vision", model_name="tiny-clip", config_dir=d, weights=str(tmp_path / "clip.safetensors"))
    for k, v in clip.visual.state_dict().items():
        assert torch.equal(enc.visual.state_dict()[k], v), k
    assert enc.num_tokens == 16 and enc.out_dim == 32
