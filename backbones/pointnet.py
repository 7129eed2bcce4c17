"""ResNet-PointNet point-cloud encoders (per-point residual MLP blocks with max-pool feature sharing).

Two configurations are used, with parameter names fixed by the released checkpoints:

* scene encoder (both stages): ``ResnetPointnet(out_dim=512, hidden_dim=256, pos_layer_name='fc_pos_0',
  slice_points=SCENE_SLICE_POINTS)``
  with blocks 0-3;
* COAP part encoder: ``ResnetPointnet(out_dim=128, hidden_dim=128, block_ids=(0, 1, 3, 4))`` (no ``block_2``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.tensors import map_row_chunks

# Points per slice (all clouds together) of the scene encoders' evaluation without gradients (best measured on a
# 2-core CPU: 1.9x faster at 2 x 20000 points).
SCENE_SLICE_POINTS = 8192


class _AmaxOverPoints(torch.autograd.Function):
    """``amax(dim=1, keepdim=True)`` with torch's gradient (to the points equal to the max, divided by their number)
    computed in three passes instead of torch's six: ``where(x == max, g / count, 0)`` with an int32 count, where
    torch's own backward converts the bool mask to int64 for the count and to the gradient's dtype for a product
    (1.6x faster, about 5 % of a training step). The same values, bit for bit (zeros may differ in sign only)."""

    @staticmethod
    def forward(ctx, net):
        result = net.amax(dim=1, keepdim=True)
        ctx.save_for_backward(net, result)
        return result

    @staticmethod
    def backward(ctx, grad):
        net, result = ctx.saved_tensors
        mask = net == result
        return torch.where(mask, grad / mask.sum(dim=1, keepdim=True, dtype=torch.int32), 0)


def max_over_points(net: torch.Tensor) -> torch.Tensor:
    """``net.max(dim=1, keepdim=True)[0]`` as ``amax``: the same values, ~20x faster on the CPU (no argmax kept).

    The backward is the same too, bit for bit, wherever a channel's maximum is taken by one point (``max`` sends the
    gradient to its index, ``amax`` to the points equal to the max, divided by their number, 1); where duplicated
    points tie, ``amax`` shares the gradient among the copies and ``max`` gives it to one of them, which is the same
    gradient for every weight (the copies have the same Jacobians) -- the points themselves need none. With
    gradients, :class:`_AmaxOverPoints` (amax's gradient, fewer passes).
    """
    if torch.is_grad_enabled() and net.requires_grad:
        return _AmaxOverPoints.apply(net)
    return net.amax(dim=1, keepdim=True)


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

    ``slice_points``: without gradients, a batch of clouds of more points than this (a scene's 20000) is encoded in
    slices of about this many points, the same points of every cloud (:meth:`_pooled_features_in_slices`; the same
    values). None or off the CPU: in one piece.

    ``max_rows_backward`` (default): with gradients, the backward pass runs on the points that reach a maximum only
    (:meth:`_pooled_features_max_rows`: the same value, the same gradient up to float rounding, a fraction of the
    cost); False: autograd through the whole forward.
    """

    def __init__(self, out_dim: int = 512, hidden_dim: int = 256, dim: int = 3,
                 block_ids: Sequence[int] = (0, 1, 2, 3), pos_layer_name: str = 'fc_pos', pooled_once: bool = True,
                 chunk_points: Optional[int] = None, slice_points: Optional[int] = None,
                 max_rows_backward: bool = True):
        super().__init__()
        self.max_rows_backward = max_rows_backward
        self.block_ids = tuple(block_ids)
        self.pooled_once = pooled_once
        self.chunk_points = chunk_points
        self.slice_points = slice_points
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
        if self.max_rows_backward and torch.is_grad_enabled():
            return self._pooled_features_max_rows(points)
        # Without gradients only: autograd would sum the weight gradients slice by slice (other float rounding). On the
        # CPU only, as the clouds' chunks (utils.tensors.map_row_chunks): it is about the CPU's cache.
        if (self.slice_points is not None and points.shape[1] > self.slice_points and not torch.is_grad_enabled()
                and points.device.type == 'cpu'):
            return self._pooled_features_in_slices(points)
        if self.chunk_points is None:
            return self._pooled_features(points)
        return map_row_chunks(self._pooled_features, (points,), self._clouds_per_chunk(points))

    def _clouds_per_chunk(self, points: torch.Tensor) -> int:
        """Clouds of ``points [B, N, dim]`` per ``chunk_points`` slice (at least one)."""
        return max(1, self.chunk_points // max(1, points.shape[1]))

    def _block_input(self, k: int, net: torch.Tensor, pooled: Optional[torch.Tensor]):
        """Block ``k``'s call on the previous features ``net`` and the previous max ``pooled`` (None before block 0)."""
        block = getattr(self, f'block_{self.block_ids[k]}')
        if pooled is None:
            return block(net)
        if self.pooled_once:
            return block.forward_pooled(net, pooled)
        return block(torch.cat([net, pooled.expand(-1, net.shape[1], -1)], dim=2))

    def _pooled_features(self, points: torch.Tensor) -> torch.Tensor:
        net = getattr(self, self.pos_layer_name)(points)
        pooled = None
        for k in range(len(self.block_ids)):
            net = self._block_input(k, net, pooled)
            pooled = max_over_points(net)
        return self.actvn(pooled[:, 0])

    def _pooled_features_in_slices(self, points: torch.Tensor, rows_at_max: bool = False):
        """:meth:`_pooled_features` with every block run on ``slice_points`` points at a time: the per-point layers
        treat points independently and the max over points is the max of the slices' maxima, so the values are the
        same while each slice's activations stay in the cache (the blocks' outputs are kept between blocks). A slice
        holds the same points of every cloud, so the per-cloud max projections see the batch they see unsliced.

        ``rows_at_max``: also return ``[B, N]`` bool, the points whose output equals its cloud's maximum in some
        channel of some block (off the CPU, or with ``slice_points`` None, in one slice)."""
        sliced = self.slice_points is not None and points.device.type == 'cpu'
        step = max(1, self.slice_points // points.shape[0]) if sliced else max(1, points.shape[1])
        last = len(self.block_ids) - 1
        net, pooled = points, None
        at_max = points.new_zeros(points.shape[:2], dtype=torch.bool) if rows_at_max else None
        for k in range(len(self.block_ids)):
            nxt, maxima = None, []
            for start in range(0, points.shape[1], step):
                piece = net[:, start:start + step]
                if k == 0:
                    piece = getattr(self, self.pos_layer_name)(piece)
                out = self._block_input(k, piece, pooled)
                maxima.append(max_over_points(out))
                if step >= points.shape[1]:        # one slice: the block's output itself
                    nxt = out
                elif k < last or rows_at_max:      # kept for the next block, written in place (no gradients here)
                    if nxt is None:
                        nxt = out.new_empty(points.shape[0], points.shape[1], out.shape[-1])
                    nxt[:, start:start + step] = out
            pooled = max_over_points(torch.cat(maxima, dim=1))
            if rows_at_max:       # nxt - max is 0 exactly where nxt == max (else < 0): one pass less than == .any()
                at_max |= (nxt - pooled).amax(dim=-1) == 0
            net = nxt
        features = self.actvn(pooled[:, 0])
        return (features, at_max) if rows_at_max else features

    def _pooled_features_max_rows(self, points: torch.Tensor) -> torch.Tensor:
        """:meth:`_pooled_features` with gradients, its backward taken on the points that reach a maximum.

        The points interact only through the max over points, whose gradient goes to the points equal to the
        maximum; a point's gradient in a block comes from that block's max or from its own row in the later blocks.
        So every point that reaches no maximum, in any channel of any block, has a gradient of exactly zero, and so
        do its terms in the weights' gradients. The encoder first runs without gradients on all points
        (:meth:`_pooled_features_in_slices`, which marks the points at a maximum: at most ``blocks x hidden`` per
        cloud), then again with gradients on those points alone, each cloud padded to the largest count with copies
        of one of its points that reach no maximum (they change no maximum and get no gradient). The value returned
        is the first run's, bit for bit; the gradient is the full backward's up to float rounding (the weights'
        gradients sum the same nonzero terms without the zero rows, in another order) at a small fraction of its
        cost (20000-point scenes: about 1000 rows per cloud).
        """
        with torch.no_grad():
            features, at_max = self.pooled_features_and_rows_at_max(points)
        with_grad = self.pooled_features_on_rows(points, at_max)
        return features + (with_grad - with_grad.detach())

    def pooled_features_and_rows_at_max(self, points: torch.Tensor):
        """Without gradients: :meth:`pooled_features` ``[B, hidden]`` (the same values) and ``[B, N]`` bool, the points
        whose output equals its cloud's maximum in some channel of some block (sliced as :meth:`pooled_features`,
        or a few clouds at a time with ``chunk_points``)."""
        if self.slice_points is not None or self.chunk_points is None:
            return self._pooled_features_in_slices(points, rows_at_max=True)
        return map_row_chunks(lambda clouds: self._pooled_features_in_slices(clouds, rows_at_max=True), (points,),
                              self._clouds_per_chunk(points))

    def pooled_features_on_rows(self, points: torch.Tensor, at_max: torch.Tensor) -> torch.Tensor:
        """:meth:`_pooled_features` of the points marked in ``at_max [B, N]`` (from
        :meth:`pooled_features_and_rows_at_max` of the same points and weights) alone, each cloud padded to the
        largest count with copies of one of its points at no maximum: the value of the whole clouds' features (up to
        float rounding) and, with gradients, their gradient (:meth:`_pooled_features_max_rows`)."""
        counts = at_max.sum(dim=1)
        width = max(1, int(counts.max()))           # (0 only where the outputs are NaN)
        order = torch.argsort((~at_max).to(torch.uint8), dim=1, stable=True)   # the rows at a max first, in order
        filler = order.gather(1, counts.clamp_max(points.shape[1] - 1)[:, None])  # a row at no max (if any)
        rows = torch.where(torch.arange(width, device=points.device) < counts[:, None], order[:, :width], filler)
        subset = points.gather(1, rows[..., None].expand(-1, -1, points.shape[-1]))
        return self._pooled_features(subset)
