"""A lean KV-cached forward of a small Llama-family decoder, for a speculative draft (batch of one).

A 1-2-layer draft's step on a CPU costs more in Hugging Face's per-call machinery (mask building, cache
objects, output wrappers, decorators) than in its matrix products: 3.9 ms against 2.3 ms for the int8
12 x 512 pair's 1-layer draft in ``bench/decoding.py``. :class:`LeanRunner` runs the same modules (the
model's own projections, norms, MLP and rotary embedding, quantised or not) over a preallocated key/value
buffer that it crops by moving an index. It is for drafts only: the target keeps HF's forward, and every
guess is checked by the target, so a draft runner can change the speed of speculative decoding, never its
output. Tests hold its logits to HF's forward.

Supported: decoders whose layers are Llama's (``llama``, ``qwen2``, ``qwen3`` with its q/k norms,
``mistral`` within its sliding window) with full attention. :func:`lean_unsupported` names why another
model is not, and the draft then keeps :class:`~.decoding.CausalRunner`.
"""

from __future__ import annotations

import math

import torch

_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def lean_unsupported(llm) -> str | None:
    """Why :class:`LeanRunner` cannot run ``llm`` (None when it can)."""
    cfg = llm.config
    if cfg.model_type not in _TYPES:
        return f"model_type {cfg.model_type!r} (lean runner: {', '.join(_TYPES)})"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []):
        return "sliding-window layers"
    if getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention"
    inner = getattr(llm, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return f"{type(llm).__name__} has no .model.layers / .model.rotary_emb"
    for layer in inner.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return f"{type(layer).__name__} is not a Llama-style layer"
    return None


class LeanRunner:
    """The decoder's forward over a growing key/value buffer; :meth:`forward` returns the last position's logits.

    Raises:
        ValueError: the model is not supported (:func:`lean_unsupported` says why).
    """

    def __init__(self, llm, suppress: list[int] | None = None, capacity: int = 512):
        why = lean_unsupported(llm)
        if why:
            raise ValueError(f"lean runner: {why}")
        self.llm = llm
        self.model = llm.model
        cfg = llm.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.window = getattr(cfg, "sliding_window", None) if cfg.model_type == "mistral" else None
        self.suppress = list(suppress or [])
        p = next(llm.parameters(), None)
        emb = llm.get_input_embeddings().weight
        self.device, self.dtype = emb.device, (p.dtype if p is not None and p.is_floating_point() else emb.dtype)
        self.length = 0  # positions held in the buffer
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        """(Re)allocate the buffer for ``capacity`` positions, keeping what it holds; rotary tables to match."""
        n_layers = len(self.model.layers)
        shape = (n_layers, 1, self.kv_heads, capacity, self.head_dim)  # (L, 1, KV, S, D)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros_like(k)
        if self.length:
            k[:, :, :, : self.length] = self.k[:, :, :, : self.length]
            v[:, :, :, : self.length] = self.v[:, :, :, : self.length]
        self.k, self.v = k, v
        pos = torch.arange(capacity, device=self.device)[None]
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = self.model.rotary_emb(probe, pos)  # (1, S, D): the model's own rope (type, scaling)
        self.cos, self.sin = cos[0], sin[0]
        self.capacity = capacity

    def crop(self, length: int) -> None:
        """Forget positions from ``length`` on."""
        self.length = min(self.length, max(0, length))

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    @torch.no_grad()
    def forward(self, ids: list[int] | None = None, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``ids`` (or ``embeds`` (1, T, H)) after the buffer; returns the last position's logits (V,)."""
        if embeds is None:
            embeds = self.model.embed_tokens(torch.tensor([ids], device=self.device))
        h = embeds.to(self.dtype)  # (1, T, H)
        T, p = h.shape[1], self.length
        if self.window is not None and p + T > self.window:
            raise ValueError(f"lean runner: {p + T} positions exceed mistral's sliding window {self.window}")
        if p + T > self.capacity:
            self._alloc(max(2 * self.capacity, p + T))
        cos = self.cos[p: p + T][None, None]  # (1, 1, T, D)
        sin = self.sin[p: p + T][None, None]
        # a new position sees the buffer and the new positions up to itself; one position needs no mask
        mask = torch.ones(T, p + T, dtype=torch.bool, device=self.device).tril(p) if T > 1 else None
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, T, self.heads, self.head_dim)
            k = attn.k_proj(x).view(1, T, self.kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):  # qwen3 normalises each head before the rotation
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = self._rotate(q.transpose(1, 2), cos, sin)  # (1, heads, T, D)
            self.k[i, :, :, p: p + T] = self._rotate(k.transpose(1, 2), cos, sin)
            self.v[i, :, :, p: p + T] = attn.v_proj(x).view(1, T, self.kv_heads, self.head_dim).transpose(1, 2)
            o = torch.nn.functional.scaled_dot_product_attention(
                q, self.k[i, :, :, : p + T], self.v[i, :, :, : p + T], attn_mask=mask,
                scale=getattr(attn, "scaling", 1 / math.sqrt(self.head_dim)), enable_gqa=self.kv_heads != self.heads)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(1, T, self.heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        self.length = p + T
        logits = self.llm.lm_head(self.model.norm(h[:, -1]))[0].float()  # (V,)
        if self.suppress:
            logits[self.suppress] = -math.inf
        return logits
