"""Molecule encoders: a Morgan-fingerprint MLP (input ``(B, bits)``) and a GIN message-passing network over
the atom/bond graph (input: a packed ``(B, N, atom_dim + N)`` batch, see :func:`pack_graphs`). Both are made
from SMILES by ``medmm.io.molecules`` and the ``smiles_fingerprint`` / ``mol_graph`` loaders.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import EncoderOutput, register_encoder


class FingerprintMLP(nn.Module):
    """Fingerprint -> MLP -> ``num_tokens`` tokens of width ``hidden``."""

    def __init__(self, bits: int = 2048, hidden: int = 256, num_tokens: int = 4, layers: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        dims = [bits] + [hidden] * (layers - 1) + [hidden * num_tokens]
        mods: list[nn.Module] = []
        for i in range(len(dims) - 1):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                mods += [nn.GELU(), nn.Dropout(dropout)]
        self.mlp = nn.Sequential(*mods)
        self.out_dim, self.num_tokens, self.bits = hidden, num_tokens, bits

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        if x.shape[-1] != self.bits:
            raise ValueError(f"fingerprint has {x.shape[-1]} bits, the encoder expects {self.bits}")
        return EncoderOutput(self.mlp(x.float()).view(x.shape[0], self.num_tokens, self.out_dim), None)


@register_encoder("mol_fingerprint_mlp", modality="mol")
def mol_fingerprint_mlp(bits: int = 2048, hidden: int = 256, num_tokens: int = 4, layers: int = 2,
                        dropout: float = 0.0) -> nn.Module:
    """Morgan-fingerprint MLP emitting a few tokens per molecule."""
    return FingerprintMLP(bits, hidden, num_tokens, layers, dropout)


@register_encoder("mol_fingerprint_tiny", modality="mol")
def mol_fingerprint_tiny(bits: int = 2048, hidden: int = 32, num_tokens: int = 2) -> nn.Module:
    """Tiny fingerprint MLP for tests and the demo."""
    return FingerprintMLP(bits, hidden, num_tokens, layers=2)


# ----------------------------------------------------------------------------- graph neural network
# Packed graph batch (what the ``mol_graph`` loader collates): one float tensor so it passes through the
# one-tensor encoder contract ``forward(x, mask)`` unchanged (device moves, dtype casts, sessions):
#   x[..., :atom_dim]  (B, N, atom_dim)  atom features (zero rows = padding)
#   x[..., atom_dim:]  (B, N, N)         bond code between atoms i and j: 0 = none, 1..num_bond_codes
DEFAULT_ATOM_DIM = 58  # == medmm.io.molecules.ATOM_FEATURE_DIM (a test checks they agree)
DEFAULT_BOND_CODES = 8  # == medmm.io.molecules.NUM_BOND_CODES


def pack_graphs(node_features: list[torch.Tensor], adjacency: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a list of graphs ``(N_i, F)`` + ``(N_i, N_i)`` into ``x (B, N, F + N)`` and ``mask (B, N)``."""
    n = max(f.shape[0] for f in node_features)
    F_ = node_features[0].shape[1]
    x = torch.zeros(len(node_features), n, F_ + n)
    mask = torch.zeros(len(node_features), n, dtype=torch.bool)
    for b, (f, a) in enumerate(zip(node_features, adjacency)):
        k = f.shape[0]
        x[b, :k, :F_] = f
        x[b, :k, F_: F_ + k] = a.float()
        mask[b, :k] = True
    return x, mask


def unpack_graphs(x: torch.Tensor, atom_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_graphs`: ``(B, N, atom_dim)`` features and ``(B, N, N)`` long bond codes."""
    if x.ndim != 3 or x.shape[-1] != atom_dim + x.shape[1]:
        raise ValueError(f"a packed molecular graph batch is (B, N, {atom_dim} + N); got {tuple(x.shape)} "
                         "(atom feature size of the data and the encoder differ?)")
    return x[..., :atom_dim], x[..., atom_dim:].round().long()


def bond_list(adj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bonds of a dense ``(B, N, N)`` code matrix as flat ``(dst, src, code)`` over the (B * N) padded atoms."""
    bi, i, j = adj.nonzero(as_tuple=True)
    n = adj.shape[1]
    return bi * n + i, bi * n + j, adj[bi, i, j]


class GINLayer(nn.Module):
    """GINE message passing (Hu et al. 2020) on a dense bond-code matrix.

    h_i' = h_i + MLP(LN((1 + eps) h_i + sum_j ReLU(h_j + e_{code(i,j)})))

    The neighbour sum runs over the bonds only (a gather and an ``index_add`` over the (B * N) padded atoms, with
    the bond list read once per forward from the dense codes by :func:`bond_list`): the same sum as
    sum_t A_t @ ReLU(h + e_t) with A_t = (adjacency == t), at O(bonds * D) instead of O(codes * B * N^2 * D).
    """

    def __init__(self, dim: int, num_bond_codes: int, dropout: float = 0.0):
        super().__init__()
        self.bond = nn.Embedding(num_bond_codes + 1, dim)
        self.eps = nn.Parameter(torch.zeros(1))  # (1,), not a 0-dim tensor: DeepSpeed views params as bytes
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, adj: torch.Tensor, mask: torch.Tensor,
                bonds: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, n, d = h.shape
        dst, src, code = bonds if bonds is not None else bond_list(adj)  # (E,) each: atom i <- atom j, code
        flat = h.reshape(b * n, d)
        m = torch.relu(flat[src] + self.bond.weight[code])  # (E, D)
        msg = torch.zeros_like(flat).index_add_(0, dst, m).view(b, n, d)  # (B, N, D)
        out = h + self.drop(self.mlp(self.norm((1 + self.eps) * h + msg)))
        return out * mask.unsqueeze(-1).to(h.dtype)


class MolGIN(nn.Module):
    """GIN-style message passing over atoms and bonds (plain torch, dense per batch).

    ``readout="nodes"``: one token per atom ``(B, N, hidden)`` + mask (variable: pair it with the
    resampler projector). ``readout="graph"``: ``num_tokens`` tokens from the masked mean and max of
    every layer's atom states (jumping knowledge), for fixed-size projectors.

    ``virtual_node=True`` adds a virtual node joined to every atom (Gilmer et al. 2017; OGB's GIN-VN): its state
    is added to every atom before each layer and updated between layers from the sum of the atom states
    (``vn <- vn + MLP(LN(sum_i h_i + vn))``), so distant atoms exchange information in 3 layers.
    """

    def __init__(self, atom_dim: int = DEFAULT_ATOM_DIM, hidden: int = 128, layers: int = 4,
                 num_bond_codes: int = DEFAULT_BOND_CODES, dropout: float = 0.0, readout: str = "nodes",
                 num_tokens: int = 1, virtual_node: bool = False):
        super().__init__()
        if readout not in ("nodes", "graph"):
            raise ValueError(f"readout must be 'nodes' or 'graph', got '{readout}'")
        self.atom_dim, self.readout = atom_dim, readout
        self.embed = nn.Linear(atom_dim, hidden)
        self.layers = nn.ModuleList(GINLayer(hidden, num_bond_codes, dropout) for _ in range(layers))
        self.virtual_node = bool(virtual_node)
        if self.virtual_node:
            self.vn = nn.Parameter(torch.zeros(1, hidden))  # the virtual node's state before the first layer
            self.vn_mlps = nn.ModuleList(
                nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Dropout(dropout),
                              nn.Linear(2 * hidden, hidden)) for _ in range(max(0, layers - 1)))
        self.norm = nn.LayerNorm(hidden)
        if readout == "graph":
            self.pool = nn.Linear(2 * hidden * (layers + 1), hidden * num_tokens)
        self.out_dim = hidden
        self.num_tokens = num_tokens if readout == "graph" else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> EncoderOutput:
        feats, adj = unpack_graphs(x, self.atom_dim)
        if mask is None:
            mask = feats.abs().sum(-1) > 0  # every real atom has an element bit set
        m = mask.unsqueeze(-1).to(feats.dtype)  # (B, N, 1)
        h = self.embed(feats) * m  # (B, N, D)
        states = [h]
        bonds = bond_list(adj)  # read once, shared by every layer
        vn = self.vn.expand(h.shape[0], -1) if self.virtual_node else None  # (B, D)
        for i, layer in enumerate(self.layers):
            if vn is not None:
                h = (h + vn.unsqueeze(1)) * m  # every real atom hears the virtual node
            h = layer(h, adj, mask, bonds)
            if vn is not None and i < len(self.vn_mlps):
                vn = vn + self.vn_mlps[i](h.sum(1) + vn)  # h is zero on padding: a sum over the real atoms
            states.append(h)
        if self.readout == "nodes":
            return EncoderOutput(self.norm(h), mask)
        count = m.sum(1).clamp(min=1)  # (B, 1)
        pooled = []
        for s in states:
            pooled.append(s.sum(1) / count)  # masked mean (B, D)
            pooled.append(s.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1).clamp(min=-1e4))  # masked max
        g = self.pool(torch.cat(pooled, -1))  # (B, D * num_tokens)
        return EncoderOutput(self.norm(g.view(x.shape[0], self.num_tokens, self.out_dim)), None)


@register_encoder("mol_gin", modality="mol")
def mol_gin(atom_dim: int = DEFAULT_ATOM_DIM, hidden: int = 128, layers: int = 4,
            num_bond_codes: int = DEFAULT_BOND_CODES, dropout: float = 0.0, readout: str = "nodes",
            num_tokens: int = 1, virtual_node: bool = False) -> nn.Module:
    """GIN message-passing encoder over the molecular graph (input: the ``mol_graph`` loader's packed batch);
    ``virtual_node``: GIN-VN (a virtual node joined to every atom)."""
    return MolGIN(atom_dim, hidden, layers, num_bond_codes, dropout, readout, num_tokens, virtual_node)


@register_encoder("mol_gin_tiny", modality="mol")
def mol_gin_tiny(hidden: int = 32, layers: int = 2, readout: str = "nodes", num_tokens: int = 1,
                 dropout: float = 0.0) -> nn.Module:
    """Tiny GIN for tests and the demo."""
    return MolGIN(DEFAULT_ATOM_DIM, hidden, layers, DEFAULT_BOND_CODES, dropout, readout, num_tokens)
