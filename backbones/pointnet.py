"""ResNet-PointNet point-cloud encoders (per-point residual MLP blocks with max-pool feature sharing).

Two configurations are used, with parameter names fixed by the released checkpoints:

* scene encoder (both stages): ``ResnetPointnet(out_dim=512, hidden_dim=256, pos_layer_name='fc_pos_0')``
  with blocks 0-3;
* COAP part encoder: ``ResnetPointnet(out_dim=128, hidden_dim=128, block_ids=(0, 1, 3, 4))`` (no ``block_2``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


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


class ResnetPointnet(nn.Module):
    """Encode a point cloud ``[B, N, dim]`` into a global feature ``[B, out_dim]``.

    After every block but the last, the max over points is concatenated to each point's feature.
    """

    def __init__(self, out_dim: int = 512, hidden_dim: int = 256, dim: int = 3,
                 block_ids: Sequence[int] = (0, 1, 2, 3), pos_layer_name: str = 'fc_pos'):
        super().__init__()
        self.block_ids = tuple(block_ids)
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
        net = getattr(self, self.pos_layer_name)(points)
        last = len(self.block_ids) - 1
        for k, i in enumerate(self.block_ids):
            net = getattr(self, f'block_{i}')(net)
            if k < last:
                pooled = net.max(dim=1, keepdim=True)[0].expand_as(net)
                net = torch.cat([net, pooled], dim=2)
        return self.actvn(net.max(dim=1)[0])
