"""ResNet-PointNet: the pooled-once blocks compute the original concatenation formulation."""
from __future__ import annotations

import torch

from backbones.pointnet import ResnetPointnet


def concatenation_reference(model: ResnetPointnet, points: torch.Tensor) -> torch.Tensor:
    """The original forward written out: after every block but the last, ``[feature, max over points]`` is the next
    block's input, and every block is ``shortcut(x) + fc_1(relu(fc_0(relu(x))))``."""
    pos = getattr(model, model.pos_layer_name)
    net = points @ pos.weight.t() + pos.bias
    for k, i in enumerate(model.block_ids):
        block = getattr(model, f'block_{i}')
        inner = torch.relu(net) @ block.fc_0.weight.t() + block.fc_0.bias
        net = net @ block.shortcut.weight.t() + torch.relu(inner) @ block.fc_1.weight.t() + block.fc_1.bias
        if k < len(model.block_ids) - 1:
            pooled = net.max(dim=1, keepdim=True).values
            net = torch.cat([net, pooled.expand(-1, net.shape[1], -1)], dim=2)
    return torch.relu(net.max(dim=1).values) @ model.fc_c.weight.t() + model.fc_c.bias


def randomised(model: ResnetPointnet) -> ResnetPointnet:
    with torch.no_grad():
        for param in model.parameters():    # fc_1 starts at zero: give every layer weight
            param.normal_(0.0, 0.2)
    return model


def test_pooled_once_equals_the_concatenation():
    torch.manual_seed(0)
    model = randomised(ResnetPointnet(out_dim=5, hidden_dim=6, pos_layer_name='fc_pos_0'))
    plain = ResnetPointnet(out_dim=5, hidden_dim=6, pos_layer_name='fc_pos_0', pooled_once=False)
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict())
    points = torch.randn(3, 50, 3)
    exact = concatenation_reference(model.double(), points.double())
    model.float()
    out = model(points)
    torch.testing.assert_close(out, exact.float(), rtol=1e-5, atol=1e-6 * exact.abs().max().item())
    # fp64: values and the gradients of every parameter and of the points.
    model.double()
    x = points.double().requires_grad_()
    weights = torch.randn(3, 5, dtype=torch.float64)
    (model(x) * weights).sum().backward()
    fast = [x.grad] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    x.grad = None
    (concatenation_reference(model, x) * weights).sum().backward()
    slow = [x.grad] + [p.grad for p in model.parameters()]
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_concatenating_encoder_keeps_the_original_layers():
    """``pooled_once=False`` (COAP) runs the blocks on the concatenated input: the same nn.Linear calls as before."""
    torch.manual_seed(1)
    model = randomised(ResnetPointnet(out_dim=4, hidden_dim=8, block_ids=(0, 1, 3, 4), pooled_once=False))
    points = torch.randn(2, 30, 3)
    net = model.fc_pos(points)
    for k, i in enumerate(model.block_ids):
        net = getattr(model, f'block_{i}')(net)
        if k < 3:
            net = torch.cat([net, net.max(dim=1, keepdim=True)[0].expand_as(net)], dim=2)
    expected = model.fc_c(torch.relu(net.max(dim=1)[0]))
    with torch.no_grad():
        assert torch.equal(model(points), expected)
    torch.testing.assert_close(model(points), concatenation_reference(model, points), rtol=1e-5, atol=1e-6)


def test_sliced_scene_encoding_equals_one_piece():
    """Clouds larger than ``slice_points``, without gradients: slices of points of every cloud, the same bits (also
    with the points at a maximum marked); small clouds in one piece."""
    torch.manual_seed(3)
    model = randomised(ResnetPointnet(out_dim=16, hidden_dim=64, pos_layer_name='fc_pos_0'))
    points = torch.randn(3, 3000, 3)
    with torch.no_grad():
        whole = model(points)
        model.slice_points = 2048                     # 682 points of each of the 3 clouds a slice
        sliced = model(points)
        features, at_max = model._pooled_features_in_slices(points, rows_at_max=True)
    assert torch.equal(sliced, whole) and torch.equal(model.fc_c(features), whole)
    expected_at_max, net, pooled = torch.zeros(3, 3000, dtype=torch.bool), model.fc_pos_0(points), None
    with torch.no_grad():                             # brute force: every block's outputs equal to their max
        for k in range(len(model.block_ids)):
            net = model._block_input(k, net, pooled)
            pooled = net.max(dim=1, keepdim=True).values
            expected_at_max |= (net == pooled).any(dim=-1)
    assert torch.equal(at_max, expected_at_max) and int(at_max.sum(dim=1).max()) <= 4 * 64
    calls = []
    model._pooled_features_in_slices = lambda x: calls.append(x) or torch.zeros(x.shape[0], 64)
    with torch.no_grad():
        model(points[:, :2000])                       # small clouds: one piece
    assert not calls
    with torch.no_grad():
        model(points)
    assert len(calls) == 1


def dense_features(model: ResnetPointnet, points: torch.Tensor) -> torch.Tensor:
    """The encoder on all points with autograd's full backward (no slicing, no subset)."""
    return model.fc_c(model._pooled_features(points))


def test_scene_encoder_backward_runs_on_the_points_at_a_maximum():
    """With gradients a scene encoder (``slice_points`` set) returns the value of its no-gradient run bit for bit and
    the full backward's gradients of every parameter and of the points: to 1e-12 in fp64 (the zero rows are left out of
    the sums, nothing else), to float rounding in fp32; ties (duplicated points), clouds with different numbers of
    points at a maximum (padding) and clouds whose every point is at one included; each cloud encoded alone gets the
    value and the point gradients it gets in the padded batch (to float rounding: other GEMM shapes). The backward
    pass sees at most blocks x hidden (64) of the 3000 points of a cloud, and no other point gets a gradient."""
    torch.manual_seed(6)
    model = randomised(ResnetPointnet(out_dim=8, hidden_dim=16, pos_layer_name='fc_pos_0', slice_points=1024))
    clouds = torch.randn(3, 3000, 3)
    clouds[0, 100:110] = clouds[0, :10]                # duplicates: tied maxima share the gradient
    clouds[1] *= 0.5
    widths = []
    dense_call = model._pooled_features
    model._pooled_features = lambda x: widths.append(x.shape[1]) or dense_call(x)
    for points in (clouds, clouds[:2, :3]):            # 3 points: every point reaches some maximum
        weights = torch.randn(points.shape[0], 8)
        for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            model.to(dtype)
            x = points.to(dtype).detach().clone().requires_grad_()
            with torch.no_grad():
                expected = model(x)
            widths.clear()
            model.zero_grad()
            out = model(x)
            assert torch.equal(out, expected)
            (out * weights.to(dtype)).sum().backward()
            assert len(widths) == 1
            fast = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
            model.zero_grad()
            x.grad = None
            (dense_features(model, x) * weights.to(dtype)).sum().backward()
            slow = [x.grad] + [p.grad for p in model.parameters()]
            for a, b in zip(fast, slow):
                torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance * b.abs().max().item())
            with torch.no_grad():
                at_max = model._pooled_features_in_slices(x, rows_at_max=True)[1]
            assert widths[0] == int(at_max.sum(dim=1).max()) <= 4 * 16
            assert bool((fast[0].abs().sum(dim=-1) > 0).le(at_max).all())     # no gradient off the subset
            if points.shape[1] == 3:
                assert bool(at_max.all())
            for i in range(points.shape[0]):              # each cloud alone (no padding): its own value and gradient
                xi = x[i:i + 1].detach().clone().requires_grad_()
                alone = model(xi)
                torch.testing.assert_close(alone[0], out[i], rtol=tolerance, atol=tolerance)   # other GEMM shapes
                (alone * weights[i:i + 1].to(dtype)).sum().backward()
                torch.testing.assert_close(xi.grad[0], fast[0][i], rtol=tolerance,
                                           atol=tolerance * fast[0].abs().max().item())
    model.float()


def test_chunked_clouds_equal_one_piece_with_gradients():
    """``chunk_points`` (COAP's part encoder): a few clouds at a time, values and input gradients the same bits."""
    torch.manual_seed(4)
    model = randomised(ResnetPointnet(out_dim=8, hidden_dim=32, block_ids=(0, 1, 3, 4), pooled_once=False))
    points = torch.randn(7, 1000, 3, requires_grad=True)
    results = []
    for chunk in (None, 3000):                        # 3 clouds a slice: 3, 3, 1
        model.chunk_points = chunk
        out = model(points)
        results.append((out, torch.autograd.grad(out.square().sum(), points)[0]))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_max_over_points_has_torchs_amax_gradient_bit_for_bit():
    """The few-pass backward of max_over_points against autograd's amax backward, ties included (duplicated points
    share the gradient), in fp32 and bf16; and a whole encoder's weight gradients with one against the other."""
    import backbones.pointnet as pointnet
    torch.manual_seed(5)
    x = torch.randn(3, 500, 16)
    x[:, 7] = x[:, 3]                                  # duplicated points: tied maxima
    x[1, :, 2] = 0.25                                  # a channel where every point ties
    grad = torch.randn(3, 1, 16)
    for dtype in (torch.float32, torch.bfloat16):
        a = x.to(dtype).clone().requires_grad_()
        b = x.to(dtype).clone().requires_grad_()
        pointnet.max_over_points(a).backward(grad.to(dtype))
        b.amax(dim=1, keepdim=True).backward(grad.to(dtype))
        assert torch.equal(a.grad, b.grad) and a.grad.dtype == dtype
        assert (a.grad[1, :, 2] != 0).all()            # shared among all 500 points
    model = randomised(ResnetPointnet(out_dim=8, hidden_dim=32))
    points = torch.randn(2, 300, 3)
    points[:, 10:20] = points[:, :10]
    grads = []
    for pool in (pointnet.max_over_points, lambda net: net.amax(dim=1, keepdim=True)):
        saved, pointnet.max_over_points = pointnet.max_over_points, pool
        try:
            model.zero_grad()
            model(points).square().sum().backward()
        finally:
            pointnet.max_over_points = saved
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(g, h) for g, h in zip(*grads))
