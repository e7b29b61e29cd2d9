"""DNA sequence encoders. Input: token ids ``(B, L)`` (A,C,G,T,N or k-mers) + ``(B, L)`` mask."""

from __future__ import annotations

import torch
from torch import nn

from .registry import EncoderOutput, register_encoder


class DnaCnnTransformer(nn.Module):
    """Embedding -> strided 1D convolutions (downsample by ``stride**n_conv``) -> transformer encoder."""

    def __init__(self, vocab_size: int = 8, dim: int = 128, n_conv: int = 2, kernel: int = 9, stride: int = 2,
                 layers: int = 2, heads: int = 4, max_length: int = 4096, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.convs = nn.ModuleList(
            nn.Conv1d(dim, dim, kernel, stride=stride, padding=kernel // 2) for _ in range(n_conv))
        self.stride, self.n_conv = stride, n_conv
        self.pos = nn.Parameter(torch.zeros(1, max_length // stride**n_conv + 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out_dim, self.num_tokens = dim, None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        if mask is None:
            mask = x != 0
        h = self.embed(x).transpose(1, 2)  # (B, D, L)
        m = mask.float().unsqueeze(1)  # (B, 1, L)
        for conv in self.convs:
            h = torch.nn.functional.gelu(conv(h * m))
            m = torch.nn.functional.max_pool1d(m, kernel_size=self.stride, stride=self.stride, ceil_mode=True)
            m = m[..., : h.shape[-1]]
        h = h.transpose(1, 2)  # (B, N, D)
        if h.shape[1] > self.pos.shape[1]:
            raise ValueError(f"sequence too long for this encoder: {h.shape[1]} tokens > {self.pos.shape[1]}")
        h = h + self.pos[:, : h.shape[1]]
        keep = m.squeeze(1) > 0  # (B, N)
        h = self.transformer(h, src_key_padding_mask=~keep)
        return EncoderOutput(self.norm(h), keep)


@register_encoder("dna_cnn_transformer", modality="dna")
def dna_cnn_transformer(**kwargs) -> nn.Module:
    """CNN + transformer DNA encoder (variable length, masked)."""
    return DnaCnnTransformer(**kwargs)


@register_encoder("dna_tiny", modality="dna")
def dna_tiny(vocab_size: int = 8, dim: int = 32, layers: int = 2, heads: int = 2, max_length: int = 1024) -> nn.Module:
    """Tiny DNA encoder for tests and the demo."""
    return DnaCnnTransformer(vocab_size=vocab_size, dim=dim, layers=layers, heads=heads, max_length=max_length)
