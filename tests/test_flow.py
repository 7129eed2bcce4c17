"""Conditional Glow (prohmr_scene/flow.py): invertibility, exact log-densities, ActNorm init, nflows layout."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prohmr_scene.flow import ActNorm, AdditiveCoupling, ConditionalGlow, LULinear, coupling_masks


def randomize_(flow: torch.nn.Module, generator: torch.Generator, scale: float = 0.1) -> None:
    """Give every parameter and BN statistic a random value, so no transform is the identity."""
    with torch.no_grad():
        for module in flow.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_(0.0, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
        for param in flow.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def small_flow(dtype=torch.float64, seed=0, features=6, context=3):
    torch.manual_seed(seed)
    flow = ConditionalGlow(features, hidden_features=8, num_layers=2, num_blocks_per_layer=2,
                           context_features=context).to(dtype)
    randomize_(flow, torch.Generator().manual_seed(seed), scale=0.3)
    return flow.eval()


def test_roundtrip_full_size_flow():
    torch.manual_seed(0)
    flow = ConditionalGlow(144, 1024, 4, 2, 2566)
    randomize_(flow, torch.Generator().manual_seed(1), scale=0.02)
    flow.eval()
    x, ctx = torch.randn(8, 144), torch.randn(8, 2566)
    with torch.no_grad():
        z, logdet_fwd = flow.transform_to_noise(x, ctx)
        x_back, logdet_inv = flow._transform.inverse(z, ctx)
    assert not torch.allclose(z, x, atol=1e-2)           # the map is far from the identity
    assert (x_back - x).abs().max().item() < 1e-5
    assert torch.allclose(logdet_inv, -logdet_fwd, atol=1e-3)


def test_log_prob_equals_change_of_variables():
    flow = small_flow()
    x, ctx = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    log_prob, z = flow.log_prob(x, ctx)
    for i in range(5):
        jac = torch.autograd.functional.jacobian(lambda v: flow.transform_to_noise(v[None], ctx[i:i + 1])[0][0], x[i])
        _, logabsdet = torch.linalg.slogdet(jac)
        expected = -0.5 * (z[i] ** 2).sum() - 3 * math.log(2 * math.pi) + logabsdet
        assert abs(log_prob[i].item() - expected.item()) < 1e-9
    assert abs(logabsdet.item()) > 1e-2                    # a non-trivial volume change was tested


def test_sampling_log_prob_matches_density_of_the_sample():
    flow = small_flow(seed=3)
    ctx = torch.randn(4, 3, dtype=torch.float64)
    samples, log_prob, noise = flow.sample_and_log_prob(3, ctx)
    assert samples.shape == (4, 3, 6) and log_prob.shape == (4, 3) and noise.shape == (4, 3, 6)
    direct, z = flow.log_prob(samples.reshape(12, 6), ctx.repeat_interleave(3, dim=0))
    assert torch.allclose(direct.view(4, 3), log_prob, atol=1e-9)
    assert torch.allclose(z.view(4, 3, 6), noise, atol=1e-9)
    # the samples of one context row are consecutive: row i of the noise pairs with context i
    one, _ = flow.sample_from_noise(noise[2], ctx[2:3].expand(3, -1))
    assert torch.allclose(one, samples[2], atol=1e-12)


def test_lu_linear_matches_dense_factors_in_numpy_index_order():
    torch.manual_seed(0)
    n = 5
    lu = LULinear(n)
    with torch.no_grad():
        for p in lu.parameters():
            p.normal_()
    lower = np.eye(n)
    lower[np.tril_indices(n, -1)] = lu.lower_entries.detach().numpy()
    upper = np.zeros((n, n))
    upper[np.triu_indices(n, 1)] = lu.upper_entries.detach().numpy()
    diag = np.log1p(np.exp(lu.unconstrained_upper_diag.detach().numpy())) + 1e-3
    upper[np.diag_indices(n)] = diag
    x = torch.randn(3, n)
    y, logdet = lu(x)
    expected = x.numpy() @ (lower @ upper).T + lu.bias.detach().numpy()
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logdet.detach().numpy(), np.log(diag).sum(), rtol=1e-5)


def test_lu_linear_starts_as_identity():
    lu = LULinear(7)
    x = torch.randn(4, 7)
    y, logdet = lu(x)
    assert torch.allclose(y, x, atol=1e-6) and torch.allclose(logdet, torch.zeros(4), atol=1e-5)


def test_actnorm_data_initialisation_whitens_first_batch_only_in_train_mode():
    x = torch.randn(64, 4) * torch.tensor([0.5, 2.0, 3.0, 1e-5]) + torch.tensor([1.0, -2.0, 0.0, 4.0])
    norm = ActNorm(4)
    norm.eval()
    y, _ = norm(x)
    assert torch.equal(y, x) and not bool(norm.initialized)   # eval mode: no initialisation
    norm.train()
    y, logdet = norm(x)
    assert bool(norm.initialized)
    assert torch.allclose(y[:, :3].mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y[:, :3].std(0), torch.ones(3), atol=1e-4)
    assert norm.log_scale[3].item() == pytest.approx(-math.log(1e-3))   # std clamped at 1e-3
    assert torch.allclose(logdet, norm.log_scale.sum().expand(64))
    before = norm.log_scale.detach().clone()
    norm(x * 10)                                                          # second batch: no re-initialisation
    assert torch.equal(norm.log_scale.detach(), before)


def test_coupling_masks_and_additive_coupling_identity_part():
    identity, transform = coupling_masks(144, 0)
    assert identity == list(range(0, 144, 2)) and transform == list(range(1, 144, 2))
    assert coupling_masks(144, 1) == (transform, identity)
    flow = small_flow()
    coupling = [t for t in flow._transform._transforms if isinstance(t, AdditiveCoupling)][0]
    x, ctx = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    y, logdet = coupling(x, ctx)
    assert torch.equal(y[:, coupling.identity_features], x[:, coupling.identity_features])
    assert torch.equal(logdet, torch.zeros(3, dtype=torch.float64))


def test_nflows_parameter_names():
    flow = ConditionalGlow(144, 16, 4, 2, 10)
    keys = set(flow.state_dict())
    assert '_transform.dummy_buffer' in keys
    assert '_transform._transforms.0.initialized' in keys
    assert '_transform._transforms.1.lower_entries' in keys
    assert '_transform._transforms.11.transform_net.blocks.1.batch_norm_layers.1.running_var' in keys
    assert not any('_log_z' in k for k in keys)
    assert flow.state_dict()['_transform._transforms.1.lower_entries'].shape == (10296,)
    assert flow.state_dict()['_transform._transforms.2.transform_net.initial_layer.weight'].shape == (16, 82)


def test_residual_net_batch_norms_use_pytorch_default_eps():
    """ProHMR's nflows fork builds BatchNorm1d(features, affine=True): eps 1e-5 (upstream nflows' 1e-3 would rescale
    outputs of a trained model with small running variances). Checked against the BN formula by hand."""
    flow = ConditionalGlow(144, hidden_features=1024, num_layers=4, num_blocks_per_layer=2, context_features=2566)
    norms = [m for m in flow.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(norms) == 4 * 2 * 2 and all(m.eps == 1e-5 and m.affine for m in norms)
    bn = norms[0].eval()
    with torch.no_grad():
        bn.running_mean.fill_(0.1)
        bn.running_var.fill_(2e-4)
        bn.weight.fill_(1.5)
        bn.bias.fill_(-0.2)
        x = torch.randn(3, 1024, dtype=torch.float32)
        expected = (x - 0.1) / math.sqrt(2e-4 + 1e-5) * 1.5 - 0.2
        torch.testing.assert_close(bn(x), expected, rtol=1e-5, atol=1e-4)
