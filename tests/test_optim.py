"""utils.optim: the trainers' fused Adam / AdamW follow torch's default update rule to float precision."""
import torch

from utils.optim import adamw, fused_optimizer


def _run_steps(make, params, grads, steps=4):
    params = [p.detach().clone().requires_grad_() for p in params]
    optimizer = make(params)
    for step in range(steps):
        for p, g in zip(params, grads):
            p.grad = g * (1.0 + step)
        optimizer.step()
    return optimizer, params


def test_fused_adamw_matches_the_default_implementation():
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(64, 32, generator=gen), torch.randn(32, generator=gen), torch.randn(3, 3, 3, generator=gen)]
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    fused, ours = _run_steps(lambda ps: adamw(ps, lr=1e-2, weight_decay=1e-2), params, grads)
    _, reference = _run_steps(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2, foreach=False),
                              params, grads)
    assert fused.defaults['fused'] is True
    for a, b, start in zip(ours, reference, params):
        moved = (b.detach() - start).abs().max()
        assert moved > 1e-3                                       # the steps did move the weights
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(moved))


def test_fused_adam_keeps_its_options_and_resumes_from_its_state():
    params = [torch.nn.Parameter(torch.ones(5))]
    optimizer = fused_optimizer(torch.optim.Adam, params, lr=0.5)
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults['lr'] == 0.5
    params[0].grad = torch.full((5,), 2.0)
    optimizer.step()
    state = optimizer.state_dict()
    again = fused_optimizer(torch.optim.Adam, [torch.nn.Parameter(params[0].detach().clone())], lr=0.5)
    again.load_state_dict(state)
    assert again.param_groups[0]['fused'] is True and int(next(iter(again.state.values()))['step']) == 1
