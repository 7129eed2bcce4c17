"""Modulated graph convolution network over the 24 SMPL joints (the stage-2 denoiser, EgoHMR's ``ModulatedGCN``).

Parameter names follow the released checkpoints: ``gconv_input.0.{gconv,bn}``, ``gconv_layers.k.gconv{1,2}.{gconv,bn}``
and ``gconv_output``; every graph convolution holds ``W [2,in,out]``, ``M [24,out]``, ``adj2 [24,24]`` and ``bias``.
The fixed skeleton adjacency is a non-persistent buffer (not in the state_dict) rebuilt by :func:`smpl_adjacency`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence, Tuple

import torch
import torch.nn as nn

from utils.body_model import NUM_SMPL_JOINTS, SMPL_EDGES
from utils.tensors import autocast_is_on, fp32_under_autocast

GCN_WEIGHT_GAIN = 1.414
ADJ_OFFSET_INIT = 1e-6


def smpl_adjacency(edges: Sequence[Tuple[int, int]] = SMPL_EDGES, num_nodes: int = NUM_SMPL_JOINTS) -> torch.Tensor:
    """The fixed adjacency ``[J, J]``: symmetric 0/1 skeleton edges, row-normalised by degree, then diagonal = 1.

    Row ``i`` holds ``1/deg(i)`` at the neighbours of ``i`` (degree counted without self loops), so the matrix is
    not symmetric (e.g. row 0 has 1/3 at joints 1, 2, 3 while row 3 has 1/2 at joint 0).
    """
    adj = torch.zeros(num_nodes, num_nodes)
    for a, b in edges:
        adj[a, b] = adj[b, a] = 1.0
    degree = adj.sum(dim=1, keepdim=True)
    adj = torch.where(degree > 0, adj / degree.clamp_min(1.0), adj)
    adj.fill_diagonal_(1.0)
    return adj


class ModulatedGraphConv(nn.Module):
    """Graph convolution with separate self/neighbour weights, per-node output modulation and a learned
    dense adjacency offset.

    ``out = (A*I) (M * X W0) + (A*(1-I)) (M * X W1) + bias`` with ``A = sym(adj + adj2)``, ``sym(B) = (B + B^T)/2``.
    Input ``[B, J, in]`` -> output ``[B, J, out]``.
    """

    def __init__(self, in_features: int, out_features: int, adj: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        num_nodes = adj.shape[0]
        self.W = nn.Parameter(torch.empty(2, in_features, out_features))
        self.M = nn.Parameter(torch.empty(num_nodes, out_features))
        self.adj2 = nn.Parameter(torch.full((num_nodes, num_nodes), ADJ_OFFSET_INIT))
        self.bias = nn.Parameter(torch.empty(out_features))
        # PyTorch's fan rules for a 3-D tensor: fan_in = in*out, fan_out = 2*out.
        nn.init.xavier_uniform_(self.W, gain=GCN_WEIGHT_GAIN)
        nn.init.xavier_uniform_(self.M, gain=GCN_WEIGHT_GAIN)
        bound = 1.0 / math.sqrt(out_features)
        nn.init.uniform_(self.bias, -bound, bound)
        # Fixed skeleton adjacency: a non-persistent buffer (follows .to(device), never saved).
        self.register_buffer('adj', adj.detach().clone().float(), persistent=False)
        # 1 - I, built once (not per call); non-persistent, so the state_dict keeps its four names.
        self.register_buffer('off_diagonal', 1.0 - torch.eye(num_nodes), persistent=False)
        self._cast_cache = None          # {dtype: W cast}, only inside weights_cast_once

    def effective_adjacency(self) -> torch.Tensor:
        """``sym(adj + adj2)``."""
        adj = self.adj + self.adj2
        return (adj + adj.t()) / 2

    def project_pair(self, x: torch.Tensor, start: int = 0, stop: int = None) -> torch.Tensor:
        """``[x W0[start:stop], x W1[start:stop]]`` stacked, ``[2, *x.shape[:-1], out]``, from one batched GEMM.

        The rows of ``x`` are broadcast over the pair (a stride-0 view), so neither ``x`` nor ``W`` is copied.
        """
        rows = x.reshape(-1, x.shape[-1])
        h = torch.bmm(rows.expand(2, -1, -1), self.weight_for(rows)[:, start:stop])
        return h.view(2, *x.shape[:-1], h.shape[-1])

    def weight_for(self, x: torch.Tensor) -> torch.Tensor:
        """``W``; inside :func:`weights_cast_once` under autocast without gradients, ``W`` in the autocast dtype,
        cast once for the block (autocast would cast the ``[2, in, out]`` weights again at every call: they reach
        ``bmm`` as slices, which its cast cache does not keep)."""
        cache = self._cast_cache
        if cache is None or not autocast_is_on(x) or torch.is_grad_enabled():
            return self.W
        dtype = torch.get_autocast_dtype(x.device.type)
        if dtype not in cache:
            cache[dtype] = self.W.detach().to(dtype)
        return cache[dtype]

    def project(self, x: torch.Tensor, start: int = 0, stop: int = None):
        """``(x W0[start:stop], x W1[start:stop])``: the input channels ``start:stop`` given as ``x``.

        Projections of disjoint channel ranges add up to the projection of their concatenation, so a constant part
        of the input can be projected once and reused (see :meth:`ModulatedGCN.forward`).
        """
        h = self.project_pair(x, start, stop)
        return h[0], h[1]

    def aggregate(self, h_self: torch.Tensor, h_neigh: torch.Tensor) -> torch.Tensor:
        """Modulate the projections and mix them over the graph (self / neighbour terms), add the bias."""
        return self.mix(h_self * self.M, h_neigh * self.M)

    @fp32_under_autocast
    def mix(self, y_self: torch.Tensor, y_neigh: torch.Tensor) -> torch.Tensor:
        """``(A*I) y_self + (A*(1-I)) y_neigh + bias`` of the modulated projections ``[..., J, out]``.

        ``(A*I) y_self`` is ``diag(A) * y_self``: in fp32 the very products the [J, J] GEMM formed (its other terms
        are exact zeros), without that GEMM. Under autocast it runs in fp32 (a [J, J] product: cheap, and its bf16
        rounding would reach every layer's output).
        """
        adj = self.effective_adjacency()
        out = torch.diagonal(adj)[:, None] * y_self + torch.matmul(adj * self.off_diagonal, y_neigh)
        return out + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project_pair(x) * self.M       # both projections modulated in one elementwise op
        return self.mix(y[0], y[1])

    def extra_repr(self) -> str:
        return f'{self.in_features} -> {self.out_features}'


@contextlib.contextmanager
def weights_cast_once(module: nn.Module):
    """Within the block, every :class:`ModulatedGraphConv` of ``module`` casts its ``W`` to the autocast dtype once
    (at its first call under autocast without gradients) instead of at every call; the casts are dropped at exit, so
    weights changed afterwards are cast anew. For a sampling chain (fixed weights, 50 steps)."""
    convs = [m for m in module.modules() if isinstance(m, ModulatedGraphConv)]
    for conv in convs:
        conv._cast_cache = {}
    try:
        yield
    finally:
        for conv in convs:
            conv._cast_cache = None


class GraphConvBlock(nn.Module):
    """``ModulatedGraphConv`` -> BatchNorm over channels (statistics over batch x joints) -> ReLU."""

    def __init__(self, in_features: int, out_features: int, adj: torch.Tensor, p_dropout: float = 0.0):
        super().__init__()
        self.gconv = ModulatedGraphConv(in_features, out_features, adj)
        self.bn = nn.BatchNorm1d(out_features)
        self.relu = nn.ReLU()
        # The original applies dropout between two ReLUs; with the default p = 0 it is the identity.
        self.dropout = nn.Dropout(p_dropout) if p_dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.gconv(x))

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        """BatchNorm + ReLU of a graph-convolution output ``[B, J, C]``."""
        x = self.bn(x.transpose(1, 2)).transpose(1, 2)
        if self.dropout is not None:
            x = self.dropout(self.relu(x))
        return self.relu(x)


class ResGraphConvBlock(nn.Module):
    """``x + gconv2(gconv1(x))`` (no activation after the sum)."""

    def __init__(self, dim: int, adj: torch.Tensor, p_dropout: float = 0.0):
        super().__init__()
        self.gconv1 = GraphConvBlock(dim, dim, adj, p_dropout)
        self.gconv2 = GraphConvBlock(dim, dim, adj, p_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gconv2(self.gconv1(x))


class ModulatedGCN(nn.Module):
    """Input block (in -> hid), ``num_layers`` residual blocks, bare output convolution (hid -> out).

    Defaults match EgoHMR: in 3718, hid 1024, 4 blocks, out 6 (one 6D rotation per joint).
    """

    def __init__(self, in_dim: int = 3718, hid_dim: int = 1024, out_dim: int = 6, num_layers: int = 4,
                 p_dropout: float = 0.0, adj: torch.Tensor = None):
        super().__init__()
        adj = smpl_adjacency() if adj is None else adj
        self.in_dim = in_dim
        self.gconv_input = nn.Sequential(GraphConvBlock(in_dim, hid_dim, adj, p_dropout))
        self.gconv_layers = nn.Sequential(*[ResGraphConvBlock(hid_dim, adj, p_dropout) for _ in range(num_layers)])
        self.gconv_output = ModulatedGraphConv(hid_dim, out_dim, adj)

    def project_leading(self, x_leading: torch.Tensor):
        """Input-layer projections of the first ``x_leading.shape[-1]`` input channels (see :meth:`forward`)."""
        return self.gconv_input[0].gconv.project(x_leading, 0, x_leading.shape[-1])

    def forward(self, x: torch.Tensor, leading=None) -> torch.Tensor:
        """``x [B, J, in_dim]`` -> ``[B, J, out_dim]``.

        With ``leading = (h_self, h_neigh)`` from :meth:`project_leading`, ``x`` holds only the remaining (last)
        input channels: the result equals the full call on the concatenated input (up to float rounding).
        """
        first = self.gconv_input[0]
        if leading is None:
            h = first(x)
        else:
            d_self, d_neigh = first.gconv.project(x, self.in_dim - x.shape[-1], self.in_dim)
            h = first.activate(first.gconv.aggregate(leading[0] + d_self, leading[1] + d_neigh))
        return fp32_under_autocast(self.gconv_output)(self.gconv_layers(h))
