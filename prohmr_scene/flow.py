"""Conditional Glow normalising flow over the 144-d 6D body pose (ProHMR's, from its nflows fork).

The module tree reproduces the parameter names of the ``nflows`` fork used by ProHMR/EgoHMR, so released
checkpoints load without renaming::

    ConditionalGlow
      _transform = CompositeTransform
        _transforms.{3i}   ActNorm           log_scale, shift, initialized
        _transforms.{3i+1} LULinear          bias, lower_entries, upper_entries, unconstrained_upper_diag
        _transforms.{3i+2} AdditiveCoupling  identity_features, transform_features, transform_net (ResidualNet)

Every transform (and the composite) carries a scalar ``dummy_buffer`` (1.0), as in the fork.

Direction: ``forward`` maps data -> noise and returns ``(z, logabsdet)``; ``inverse`` maps noise -> data and
returns ``(x, logabsdet_of_the_inverse)``. ``log p(x|c) = log N(forward(x)) + logabsdet``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LU_DIAG_EPS = 1e-3        # diag(U) = softplus(unconstrained) + eps
ACTNORM_MIN_STD = 1e-3    # std clamp of the data-dependent ActNorm initialisation
# ProHMR's nflows fork builds the ResidualBlock batch norms as BatchNorm1d(features, affine=True), i.e. with
# PyTorch's default eps 1e-5; upstream nflows uses 1e-3, but that is not the library the checkpoints were trained with.
BATCH_NORM_EPS = 1e-5


class Transform(nn.Module):
    """Base class: an invertible map with log-determinants; holds the fork's ``dummy_buffer``."""

    def __init__(self):
        super().__init__()
        self.register_buffer('dummy_buffer', torch.tensor(1.0))

    def forward(self, inputs: torch.Tensor, context: Optional[torch.Tensor] = None):
        raise NotImplementedError

    def inverse(self, inputs: torch.Tensor, context: Optional[torch.Tensor] = None):
        raise NotImplementedError


class CompositeTransform(Transform):
    """Apply ``_transforms`` in order (forward) or their inverses in reverse order (inverse), summing log-dets."""

    def __init__(self, transforms):
        super().__init__()
        self._transforms = nn.ModuleList(transforms)

    @staticmethod
    def _cascade(inputs, funcs, context):
        total = inputs.new_zeros(inputs.shape[0])
        for func in funcs:
            inputs, logabsdet = func(inputs, context)
            total = total + logabsdet
        return inputs, total

    def forward(self, inputs, context=None):
        return self._cascade(inputs, [t.forward for t in self._transforms], context)

    def inverse(self, inputs, context=None):
        return self._cascade(inputs, [t.inverse for t in reversed(self._transforms)], context)


class ActNorm(Transform):
    """Per-feature affine map ``y = exp(log_scale) * x + shift`` with data-dependent initialisation.

    While in train mode and not yet ``initialized``, the first forward pass sets ``log_scale = -log(std)`` and
    ``shift = -mean(x / std)`` from its input batch (std unbiased, clamped to >= 1e-3), so its output has zero
    mean and unit variance per feature.
    """

    def __init__(self, features: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(features))
        self.shift = nn.Parameter(torch.zeros(features))
        self.register_buffer('initialized', torch.tensor(False, dtype=torch.bool))

    @torch.no_grad()
    def initialize_from(self, inputs: torch.Tensor) -> None:
        """Set scale and shift so that ``inputs`` get zero mean and unit std per feature."""
        std = inputs.std(dim=0).clamp_min(ACTNORM_MIN_STD)
        self.log_scale.copy_(-torch.log(std))
        self.shift.copy_(-(inputs / std).mean(dim=0))
        self.initialized.fill_(True)

    def forward(self, inputs, context=None):
        if self.training and not bool(self.initialized):
            self.initialize_from(inputs)
        outputs = inputs * torch.exp(self.log_scale) + self.shift
        return outputs, self.log_scale.sum().expand(inputs.shape[0])

    def inverse(self, inputs, context=None):
        outputs = (inputs - self.shift) * torch.exp(-self.log_scale)
        return outputs, (-self.log_scale.sum()).expand(inputs.shape[0])


class LULinear(Transform):
    """Invertible linear map ``y = L U x + b`` with unit lower-triangular L and upper-triangular U.

    ``lower_entries`` / ``upper_entries`` fill the strict triangles in ``numpy.tril_indices(n, -1)`` /
    ``numpy.triu_indices(n, 1)`` order; ``diag(U) = softplus(unconstrained_upper_diag) + 1e-3``. Initialised to
    the identity.
    """

    def __init__(self, features: int):
        super().__init__()
        self.features = features
        n_tri = features * (features - 1) // 2
        self.bias = nn.Parameter(torch.zeros(features))
        self.lower_entries = nn.Parameter(torch.zeros(n_tri))
        self.upper_entries = nn.Parameter(torch.zeros(n_tri))
        diag_init = math.log(math.expm1(1.0 - LU_DIAG_EPS))  # softplus^-1(1 - eps): diag(U) = 1
        self.unconstrained_upper_diag = nn.Parameter(torch.full((features,), diag_init))
        lower_rows, lower_cols = np.tril_indices(features, -1)
        upper_rows, upper_cols = np.triu_indices(features, 1)
        # Index tables: plain attributes (not state), rebuilt from ``features``.
        self._lower_idx = (torch.as_tensor(lower_rows), torch.as_tensor(lower_cols))
        self._upper_idx = (torch.as_tensor(upper_rows), torch.as_tensor(upper_cols))

    def upper_diag(self) -> torch.Tensor:
        return F.softplus(self.unconstrained_upper_diag) + LU_DIAG_EPS

    def lower_upper(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The dense factors ``(L, U)``."""
        n = self.features
        lower = torch.eye(n, dtype=self.lower_entries.dtype, device=self.lower_entries.device)
        device = lower.device
        lower = lower.index_put(tuple(i.to(device) for i in self._lower_idx), self.lower_entries)
        upper = torch.diag(self.upper_diag())
        upper = upper.index_put(tuple(i.to(device) for i in self._upper_idx), self.upper_entries)
        return lower, upper

    def logabsdet(self) -> torch.Tensor:
        return torch.log(self.upper_diag()).sum()

    def forward(self, inputs, context=None):
        lower, upper = self.lower_upper()
        outputs = F.linear(F.linear(inputs, upper), lower, self.bias)
        return outputs, self.logabsdet().expand(inputs.shape[0])

    def inverse(self, inputs, context=None):
        lower, upper = self.lower_upper()
        rhs = (inputs - self.bias).T
        y = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
        x = torch.linalg.solve_triangular(upper, y, upper=True)
        return x.T, (-self.logabsdet()).expand(inputs.shape[0])


class ResidualBlock(nn.Module):
    """``x + linear_1(dropout(relu(bn_1(linear_0(relu(bn_0(x)))))))``; ``linear_1`` starts near zero."""

    def __init__(self, features: int, dropout_probability: float = 0.0, use_batch_norm: bool = True):
        super().__init__()
        self.use_batch_norm = use_batch_norm
        if use_batch_norm:
            self.batch_norm_layers = nn.ModuleList(
                [nn.BatchNorm1d(features, eps=BATCH_NORM_EPS) for _ in range(2)])
        self.linear_layers = nn.ModuleList([nn.Linear(features, features) for _ in range(2)])
        self.dropout = nn.Dropout(p=dropout_probability)
        nn.init.uniform_(self.linear_layers[1].weight, -1e-3, 1e-3)
        nn.init.uniform_(self.linear_layers[1].bias, -1e-3, 1e-3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        h = inputs
        for k, linear in enumerate(self.linear_layers):
            if self.use_batch_norm:
                h = self.batch_norm_layers[k](h)
            h = F.relu(h)
            if k == 1:
                h = self.dropout(h)
            h = linear(h)
        return inputs + h


class ResidualNet(nn.Module):
    """``final_layer(blocks(initial_layer(cat(x, context))))``: the coupling's conditioner network."""

    def __init__(self, in_features: int, out_features: int, hidden_features: int, context_features: int,
                 num_blocks: int = 2, dropout_probability: float = 0.0, use_batch_norm: bool = True):
        super().__init__()
        self.initial_layer = nn.Linear(in_features + context_features, hidden_features)
        self.blocks = nn.ModuleList([ResidualBlock(hidden_features, dropout_probability, use_batch_norm)
                                     for _ in range(num_blocks)])
        self.final_layer = nn.Linear(hidden_features, out_features)
        bound = 0.01 / math.sqrt(hidden_features)
        nn.init.uniform_(self.final_layer.weight, -bound, bound)
        nn.init.uniform_(self.final_layer.bias, -bound, bound)

    def forward(self, inputs: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.initial_layer(torch.cat([inputs, context], dim=1))
        for block in self.blocks:
            h = block(h)
        return self.final_layer(h)


class AdditiveCoupling(Transform):
    """``y[transform] = x[transform] + NN(x[identity], context)``, ``y[identity] = x[identity]``; log-det 0."""

    def __init__(self, identity_features, transform_features, transform_net: nn.Module):
        super().__init__()
        self.register_buffer('identity_features', torch.as_tensor(identity_features, dtype=torch.long))
        self.register_buffer('transform_features', torch.as_tensor(transform_features, dtype=torch.long))
        self.transform_net = transform_net

    def _shifted(self, inputs, context, sign: float):
        shift = self.transform_net(inputs[:, self.identity_features], context)
        outputs = inputs.clone()
        outputs[:, self.transform_features] = inputs[:, self.transform_features] + sign * shift
        return outputs, inputs.new_zeros(inputs.shape[0])

    def forward(self, inputs, context=None):
        return self._shifted(inputs, context, 1.0)

    def inverse(self, inputs, context=None):
        return self._shifted(inputs, context, -1.0)


class StandardNormal(nn.Module):
    """Isotropic unit Gaussian base distribution (no state: nflows' ``_log_z`` buffer is non-persistent)."""

    def __init__(self, features: int):
        super().__init__()
        self.features = features
        self._log_z = 0.5 * features * math.log(2 * math.pi)   # a Python float: exact in any dtype

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return -0.5 * (z ** 2).sum(dim=-1) - self._log_z


def coupling_masks(features: int, layer: int):
    """(identity, transform) feature indices: even layers keep the even indices fixed, odd layers the odd ones."""
    even, odd = list(range(0, features, 2)), list(range(1, features, 2))
    return (even, odd) if layer % 2 == 0 else (odd, even)


class ConditionalGlow(nn.Module):
    """Glow-style conditional flow: ``num_layers`` x (ActNorm -> LULinear -> AdditiveCoupling).

    Args:
        features: data dimension (144).
        hidden_features: width of the coupling networks (1024).
        num_layers: number of (ActNorm, LULinear, coupling) triples (4).
        num_blocks_per_layer: residual blocks per coupling network (2).
        context_features: conditioning dimension (2566 in stage 1).
        dropout_probability / batch_norm_within_layers: inside the coupling networks (0.5 / True).
    """

    def __init__(self, features: int, hidden_features: int, num_layers: int, num_blocks_per_layer: int,
                 context_features: int, dropout_probability: float = 0.5, batch_norm_within_layers: bool = True):
        super().__init__()
        self.features = features
        transforms = []
        for layer in range(num_layers):
            identity, transform = coupling_masks(features, layer)
            net = ResidualNet(len(identity), len(transform), hidden_features, context_features,
                              num_blocks=num_blocks_per_layer, dropout_probability=dropout_probability,
                              use_batch_norm=batch_norm_within_layers)
            transforms += [ActNorm(features), LULinear(features), AdditiveCoupling(identity, transform, net)]
        self._transform = CompositeTransform(transforms)
        self._distribution = StandardNormal(features)

    def actnorms(self):
        return [t for t in self._transform._transforms if isinstance(t, ActNorm)]

    def transform_to_noise(self, inputs: torch.Tensor, context: torch.Tensor):
        """Data ``[N, D]`` -> ``(z [N, D], logabsdet [N])``."""
        return self._transform(inputs, context)

    def log_prob(self, inputs: torch.Tensor, context: torch.Tensor):
        """``(log p(inputs | context) [N], z [N, D])``."""
        z, logabsdet = self._transform(inputs, context)
        return self._distribution.log_prob(z) + logabsdet, z

    def sample_from_noise(self, noise: torch.Tensor, context: torch.Tensor):
        """Noise ``[N, D]`` -> ``(samples [N, D], log p(samples | context) [N])``; rows of noise and context pair up."""
        samples, logabsdet = self._transform.inverse(noise, context)
        return samples, self._distribution.log_prob(noise) - logabsdet

    def sample_and_log_prob(self, num_samples: int, context: torch.Tensor, noise: Optional[torch.Tensor] = None):
        """Draw ``num_samples`` per context row (one ``randn`` call unless ``noise [B, S, D]`` is given).

        Returns ``(samples [B, S, D], log_prob [B, S], z [B, S, D])``; the samples of one context row are
        consecutive.
        """
        batch = context.shape[0]
        if noise is None:
            noise = torch.randn(batch * num_samples, self.features, device=context.device, dtype=context.dtype)
        else:
            num_samples = noise.shape[1]
        noise = noise.reshape(batch * num_samples, self.features)
        context_rows = context.repeat_interleave(num_samples, dim=0)
        samples, log_prob = self.sample_from_noise(noise, context_rows)
        return (samples.view(batch, num_samples, -1), log_prob.view(batch, num_samples),
                noise.view(batch, num_samples, -1))
