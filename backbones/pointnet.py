"""ResNet-PointNet point-cloud encoders (per-point residual MLP blocks with max-pool feature sharing).

Two configurations are used, with parameter names fixed by the released checkpoints:

* scene encoder (both stages): ``ResnetPointnet(out_dim=512, hidden_dim=256, pos_layer_name='fc_pos_0')``
  with blocks 0-3;
* COAP part encoder: ``ResnetPointnet(out_dim=128, hidden_dim=128, block_ids=(0, 1, 3, 4))`` (no ``block_2``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.tensors import map_row_chunks


class ResnetBlockFC(nn.Module):
    """``shortcut(x) + fc_1(relu(fc_0(relu(x))))`` with a bias-free linear shortcut and zero-initialised ``fc_1``."""

    def __init__(self, size_in: int, size_out: int, size_h: int):
        super().__init__()
        self.fc_0 = nn.Linear(size_in, size_h)
        self.fc_1 = nn.Linear(size_h, size_out)
        self.actvn = nn.ReLU()
        self.shortcut = nn.Linear(size_in, size_out, bias=False) if size_in != size_out else None
        nn.init.zeros_(self.fc_1.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dx = self.fc_1(self.actvn(self.fc_0(self.actvn(x))))
        skip = self.shortcut(x) if self.shortcut is not None else x
        return skip + dx

    def forward_pooled(self, x: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """``forward(cat([x, pooled.expand_as(x)], -1))`` for ``x [B, N, C]`` and ``pooled [B, 1, C]``, without
        building the ``[B, N, 2C]`` input: the pooled half goes through ``fc_0`` and the shortcut once per cloud
        instead of once per point. The same function; each sum over input channels is split in two, so the
        float rounding differs."""
        if self.shortcut is None:
            return self.forward(torch.cat([x, pooled.expand_as(x)], dim=-1))
        c = x.shape[-1]
        w0, ws = self.fc_0.weight, self.shortcut.weight
        h = F.linear(self.actvn(x), w0[:, :c]) + F.linear(self.actvn(pooled), w0[:, c:], self.fc_0.bias)
        dx = self.fc_1(self.actvn(h))
        return F.linear(x, ws[:, :c]) + F.linear(pooled, ws[:, c:]) + dx


class ResnetPointnet(nn.Module):
    """Encode a point cloud ``[B, N, dim]`` into a global feature ``[B, out_dim]``.

    After every block but the last, the max over points is concatenated to each point's feature.

    ``pooled_once`` (default): the next block reads that max through :meth:`ResnetBlockFC.forward_pooled` (projected
    once per cloud, no ``[B, N, 2*hidden]`` concatenation); ``False``: the concatenation, as the original (COAP keeps
    it: its encodings of single parts are bit-identical to the rows of a batch).

    ``chunk_points``: encode the batch a few clouds at a time, about this many points per slice (at least one
    cloud), so that the per-point activations stay in the CPU cache; the clouds are independent, so the values are
    the same. None: the whole batch at once.
    """

    def __init__(self, out_dim: int = 512, hidden_dim: int = 256, dim: int = 3,
                 block_ids: Sequence[int] = (0, 1, 2, 3), pos_layer_name: str = 'fc_pos', pooled_once: bool = True,
                 chunk_points: Optional[int] = None):
        super().__init__()
        self.block_ids = tuple(block_ids)
        self.pooled_once = pooled_once
        self.chunk_points = chunk_points
        self.pos_layer_name = pos_layer_name
        self.add_module(pos_layer_name, nn.Linear(dim, 2 * hidden_dim))
        for i in self.block_ids:
            self.add_module(f'block_{i}', ResnetBlockFC(2 * hidden_dim, hidden_dim, hidden_dim))
        self.fc_c = nn.Linear(hidden_dim, out_dim)
        self.actvn = nn.ReLU()

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.fc_c(self.pooled_features(points))

    def pooled_features(self, points: torch.Tensor) -> torch.Tensor:
        """The global feature before the output layer: ``relu(max over points)`` ``[B, hidden_dim]``."""
        if self.chunk_points is None:
            return self._pooled_features(points)
        return map_row_chunks(self._pooled_features, (points,), max(1, self.chunk_points // max(1, points.shape[1])))

    def _pooled_features(self, points: torch.Tensor) -> torch.Tensor:
        net = getattr(self, self.pos_layer_name)(points)
        last = len(self.block_ids) - 1
        pooled = None
        for k, i in enumerate(self.block_ids):
            block = getattr(self, f'block_{i}')
            net = block(net) if pooled is None else block.forward_pooled(net, pooled)
            if k < last:
                pooled = net.max(dim=1, keepdim=True)[0]
                if not self.pooled_once:
                    net, pooled = torch.cat([net, pooled.expand_as(net)], dim=2), None
        return self.actvn(net.max(dim=1)[0])
