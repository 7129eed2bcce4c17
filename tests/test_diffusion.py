"""Tests for the diffusion package: schedule numbers, forward/posterior maths, respacing, loops, guidance."""
import math

import numpy as np
import pytest
import torch

from diffusion import (GaussianDiffusion, SpacedDiffusion, UniformSampler, create_gaussian_diffusion,
                       get_named_beta_schedule, space_timesteps)

T = 50


class ConstantX0Model:
    """A 'perfect' x0 predictor: always returns the known x0; records the timesteps and inputs it sees."""

    def __init__(self, x0):
        self.x0 = x0
        self.timesteps = []
        self.inputs = []

    def __call__(self, x_t, t, **kwargs):
        self.timesteps.append(t.clone())
        self.inputs.append(x_t.clone())
        return {"pred_x_start": self.x0.clone(), "extra": t.clone()}


class ConstantHook:
    """Guidance hook returning a constant tensor; records the (respaced) step indices and grad mode it sees."""

    def __init__(self, value):
        self.value = value
        self.timesteps = []
        self.grad_enabled = []

    def __call__(self, x_t, t, p_mean_var, **kwargs):
        self.timesteps.append(int(t[0]))
        self.grad_enabled.append(torch.is_grad_enabled())
        assert "pred_x_start" in p_mean_var["model_output"] and x_t.shape == self.value.shape
        assert not x_t.requires_grad
        return self.value.clone()


@pytest.fixture(scope="module")
def diffusion():
    return create_gaussian_diffusion(T, "")


# ---------------------------------------------------------------------------------------------- schedule
def test_cosine_schedule_matches_reference_table(diffusion):
    betas = get_named_beta_schedule("cosine", T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    reference = {0: (0.001748, 0.998252), 5: (0.011527, 0.960887), 10: (0.021791, 0.879122),
                 20: (0.046416, 0.617425), 30: (0.085736, 0.311590), 40: (0.184972, 0.076650)}
    for t, (beta, abar) in reference.items():
        assert betas[t] == pytest.approx(beta, abs=1e-6)
        assert diffusion.alphas_cumprod[t] == pytest.approx(abar, abs=1e-6)
    assert betas[49] == 0.999
    assert (betas[:49] < 0.999).all()  # only the last beta is clipped
    assert diffusion.alphas_cumprod[49] == pytest.approx(9.7e-7, rel=0.01)
    # the identity-respaced diffusion rebuilds betas from alphas_cumprod: equal up to float64 rounding
    np.testing.assert_allclose(diffusion.betas, betas, rtol=1e-12)
    np.testing.assert_array_equal(GaussianDiffusion(betas).betas, betas)
    # alpha_bar_prev = [1, abar_0..abar_48]
    assert diffusion.alphas_cumprod_prev[0] == 1.0
    np.testing.assert_array_equal(diffusion.alphas_cumprod_prev[1:], diffusion.alphas_cumprod[:-1])


def test_cosine_betas_follow_closed_form():
    betas = get_named_beta_schedule("cosine", T)
    abar = lambda tau: math.cos((tau + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for i in (0, 17, 48):
        assert betas[i] == pytest.approx(1 - abar((i + 1) / T) / abar(i / T), rel=1e-12)


def test_posterior_variance_reference_values(diffusion):
    expected = [0, 0.00119, 0.00277, 0.00452, 0.00634, 0.00822, 0.01015, 0.01212, 0.01412, 0.01617, 0.01826]
    np.testing.assert_allclose(diffusion.posterior_variance[:11], expected, atol=6e-6)
    assert diffusion.posterior_variance[0] == 0.0
    # log variance "clipped": entry 0 replaced by entry 1
    assert diffusion.posterior_log_variance_clipped[0] == pytest.approx(math.log(diffusion.posterior_variance[1]))
    np.testing.assert_allclose(diffusion.posterior_log_variance_clipped[1:], np.log(diffusion.posterior_variance[1:]))
    # at t = 0 the posterior mean is x0
    assert diffusion.posterior_mean_coef1[0] == pytest.approx(1.0) and diffusion.posterior_mean_coef2[0] == 0.0


def test_unknown_schedule_and_bad_betas_raise():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        get_named_beta_schedule("quadratic", T)
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(np.array([0.1, 0.0, 0.2]))
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(np.ones((2, 2)) * 0.1)


def test_gathered_values_are_float32(diffusion):
    x = torch.zeros(3, 4)
    t = torch.tensor([0, 5, 49])
    mean, var, logvar = diffusion.q_posterior_mean_variance(x, x, t)
    assert var.dtype == torch.float32 and logvar.dtype == torch.float32
    np.testing.assert_array_equal(var[:, 0].numpy(), diffusion.posterior_variance[[0, 5, 49]].astype(np.float32))


# ---------------------------------------------------------------------------------------------- forward process
def test_q_sample_exact_with_given_noise(diffusion):
    torch.manual_seed(0)
    x0, noise = torch.randn(4, 144), torch.randn(4, 144)
    t = torch.tensor([0, 10, 30, 49])
    abar = diffusion.alphas_cumprod[t.numpy()]
    expected = (np.sqrt(abar)[:, None] * x0.double().numpy()
                + np.sqrt(1 - abar)[:, None] * noise.double().numpy())
    x_t = diffusion.q_sample(x0, t, noise=noise)
    np.testing.assert_allclose(x_t.numpy(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(diffusion.training_inputs(x0, t, noise=noise), x_t)
    with pytest.raises(ValueError, match="noise shape"):
        diffusion.q_sample(x0, t, noise=noise[:, :10])


def test_q_sample_statistics(diffusion):
    torch.manual_seed(1)
    n = 200000
    x0 = torch.full((n, 1), 1.5)
    t = torch.full((n,), 20, dtype=torch.long)
    x_t = diffusion.q_sample(x0, t).double()
    abar = diffusion.alphas_cumprod[20]
    # standard errors: sqrt(var/n) ~ 0.0014 for the mean
    assert x_t.mean().item() == pytest.approx(1.5 * math.sqrt(abar), abs=0.01)
    assert x_t.var().item() == pytest.approx(1 - abar, rel=0.02)
    mean, var, logvar = diffusion.q_mean_variance(x0[:2], t[:2])
    assert mean[0, 0].item() == pytest.approx(1.5 * math.sqrt(abar), rel=1e-6)
    assert var[0, 0].item() == pytest.approx(1 - abar, rel=1e-6)
    assert logvar[0, 0].item() == pytest.approx(math.log(1 - abar), rel=1e-6)


@pytest.mark.parametrize("t", [1, 2, 9, 25, 49])
def test_posterior_matches_bayes_rule(diffusion, t):
    """q(x_{t-1}|x_t,x_0) ∝ N(x_{t-1}; √ᾱ_{t-1} x0, 1-ᾱ_{t-1}) · N(x_t; √α_t x_{t-1}, β_t), by completing the square."""
    betas = get_named_beta_schedule("cosine", T)
    abar = np.cumprod(1 - betas)
    abar_prev, alpha, beta = abar[t - 1], 1 - betas[t], betas[t]
    precision = 1 / (1 - abar_prev) + alpha / beta
    var = 1 / precision
    torch.manual_seed(t)
    x0, x_t = torch.randn(3, 6), torch.randn(3, 6)
    mean_expected = var * (math.sqrt(abar_prev) * x0.double().numpy() / (1 - abar_prev)
                           + math.sqrt(alpha) * x_t.double().numpy() / beta)
    tt = torch.full((3,), t, dtype=torch.long)
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x0, x_t, tt)
    np.testing.assert_allclose(mean.numpy(), mean_expected, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(variance.numpy(), var, rtol=1e-6)
    np.testing.assert_allclose(log_variance.numpy(), math.log(var), rtol=1e-5)


def test_posterior_at_t0_returns_x0(diffusion):
    x0, x_t = torch.randn(2, 5), torch.randn(2, 5)
    mean, variance, _ = diffusion.q_posterior_mean_variance(x0, x_t, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(mean, x0)
    assert (variance == 0).all()


# ---------------------------------------------------------------------------------------------- respacing
def test_space_timesteps_variants():
    assert space_timesteps(T, "ddim5") == {0, 10, 20, 30, 40}
    assert space_timesteps(T, "ddim50") == set(range(T))
    assert space_timesteps(T, "ddim7") == set(range(0, T, 8))  # smallest stride giving 7 steps
    for alias in ("", "ddpm", None):
        assert space_timesteps(T, alias) == set(range(T))
    assert space_timesteps(T, [T]) == set(range(T))
    # comma-separated sections: 50 -> two sections of 25; 3 evenly spaced steps in the first, 2 in the second
    assert space_timesteps(T, "3,2") == {0, 12, 24, 25, 49}
    assert space_timesteps(10, "1") == {0}
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(T, "ddim49")
    with pytest.raises(ValueError, match="timestep_respacing"):
        space_timesteps(T, "ddimfive")
    with pytest.raises(ValueError, match="timestep_respacing"):
        space_timesteps(T, "fast")
    with pytest.raises(ValueError, match="cannot keep"):
        space_timesteps(T, "30,2")


def test_spaced_ddim5_reproduces_original_alphas_cumprod(diffusion):
    spaced = create_gaussian_diffusion(T, "ddim5")
    assert isinstance(spaced, SpacedDiffusion) and spaced.num_timesteps == 5
    np.testing.assert_array_equal(spaced.timestep_map, [0, 10, 20, 30, 40])
    np.testing.assert_allclose(spaced.alphas_cumprod, diffusion.alphas_cumprod[[0, 10, 20, 30, 40]], rtol=1e-12)
    abar = diffusion.alphas_cumprod
    expected_betas = [1 - abar[0], 1 - abar[10] / abar[0], 1 - abar[20] / abar[10], 1 - abar[30] / abar[20],
                      1 - abar[40] / abar[30]]
    np.testing.assert_allclose(spaced.betas, expected_betas, rtol=1e-12)
    # identity respacing keeps the schedule
    np.testing.assert_allclose(diffusion.betas, get_named_beta_schedule("cosine", T), rtol=1e-12)
    np.testing.assert_array_equal(diffusion.timestep_map, np.arange(T))
    with pytest.raises(ValueError, match="use_timesteps"):
        SpacedDiffusion([0, 50], get_named_beta_schedule("cosine", T))


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_model_receives_original_timesteps_and_x_t(method):
    spaced = create_gaussian_diffusion(T, "ddim5")
    model = ConstantX0Model(torch.zeros(2, 3))
    kwargs = {"batch": {}}
    torch.manual_seed(0)
    noise = torch.randn(2, 3)
    spaced.sample(model, (2, 3), method=method, noise=noise, model_kwargs=kwargs)
    seen = [t.tolist() for t in model.timesteps]
    assert seen == [[40, 40], [30, 30], [20, 20], [10, 10], [0, 0]]
    assert all(t.dtype == torch.long for t in model.timesteps)
    torch.testing.assert_close(model.inputs[0], noise)  # the first call sees x_N
    assert kwargs == {"batch": {}}                       # nothing is written into the caller's kwargs


# ---------------------------------------------------------------------------------------------- loops
def test_ddpm_loop_with_perfect_predictor_returns_x0(diffusion):
    torch.manual_seed(3)
    x0 = torch.randn(4, 144)
    model = ConstantX0Model(x0)
    result = diffusion.p_sample_loop(model, (4, 144))
    assert len(model.timesteps) == T
    assert [int(t[0]) for t in model.timesteps] == list(range(T - 1, -1, -1))
    torch.testing.assert_close(result["model_output"]["pred_x_start"], x0)
    assert sorted(result) == ["model_output", "pred_xstart", "sample"]   # one key per value
    assert int(result["model_output"]["extra"][0]) == 0  # the LAST step's model output
    torch.testing.assert_close(result["sample"], x0, rtol=0, atol=1e-5)  # at t=0 the mean is x0, no noise added
    torch.testing.assert_close(result["pred_xstart"], x0)


def test_ddim_loop_with_perfect_predictor_is_exact(diffusion):
    torch.manual_seed(4)
    x0 = torch.randn(3, 144)
    noise = torch.randn(3, 144)
    for diff in (diffusion, create_gaussian_diffusion(T, "ddim5")):
        model = ConstantX0Model(x0)
        result = diff.ddim_sample_loop(model, (3, 144), noise=noise)
        torch.testing.assert_close(result["sample"], x0, rtol=0, atol=1e-5)
        torch.testing.assert_close(result["model_output"]["pred_x_start"], x0)
        # with a perfect predictor every intermediate input is the DDIM interpolation of x0 and the initial noise
        abar = diff.alphas_cumprod
        for j, x_in in zip(range(diff.num_timesteps - 2, -1, -1), model.inputs[1:]):
            expected = math.sqrt(abar[j]) * x0 + math.sqrt(1 - abar[j]) * (
                (noise - math.sqrt(abar[-1]) * x0) / math.sqrt(1 - abar[-1]))
            torch.testing.assert_close(x_in, expected, rtol=1e-4, atol=1e-4)


def test_loops_draw_one_randn_per_step_including_last(diffusion):
    """Initial noise plus one ε per step (also at j=0 and for deterministic DDIM), consumed like the original."""
    shape = (2, 3)
    model = ConstantX0Model(torch.zeros(shape))
    torch.manual_seed(7)
    for _ in range(T + 1):
        torch.randn(shape)
    expected_next = torch.randn(shape)
    for run in (lambda: diffusion.p_sample_loop(model, shape),
                lambda: diffusion.ddim_sample_loop(model, shape)):
        torch.manual_seed(7)
        run()
        torch.testing.assert_close(torch.randn(shape), expected_next)


def test_ddim_eta1_step_equals_ddpm_step(diffusion):
    """With eta=1 on the full schedule, σ² equals the posterior variance and the DDIM step is the DDPM step."""
    torch.manual_seed(5)
    x0, x = torch.randn(2, 8), torch.randn(2, 8)
    model = ConstantX0Model(x0)
    for j in (1, 10, 30):
        t = torch.full((2,), j, dtype=torch.long)
        torch.manual_seed(11)
        ddpm = diffusion.p_sample(model, x, t)["sample"]
        torch.manual_seed(11)
        ddim = diffusion.ddim_sample(model, x, t, eta=1.0)["sample"]
        torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-5)


def test_model_output_validation(diffusion):
    t = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="pred_x_start"):
        diffusion.p_mean_variance(lambda x, tt: {"x0": torch.zeros(2, 3)}, torch.zeros(2, 3), t)
    with pytest.raises(ValueError, match="shape"):
        diffusion.p_mean_variance(lambda x, tt: {"pred_x_start": torch.zeros(2, 4)}, torch.zeros(2, 3), t)
    with pytest.raises(ValueError, match="method"):
        diffusion.sample(ConstantX0Model(torch.zeros(2, 3)), (2, 3), method="euler")


def test_model_called_without_grad_and_progress_bar(diffusion):
    grad_flags = []

    def model(x_t, t):
        grad_flags.append(torch.is_grad_enabled())
        return {"pred_x_start": torch.zeros_like(x_t)}

    out = create_gaussian_diffusion(T, "ddim5").sample(model, (1, 2), method="ddim", progress=True)
    assert out["sample"].shape == (1, 2)
    diffusion.p_sample_loop(model, (1, 2))
    assert grad_flags and not any(grad_flags)


# ---------------------------------------------------------------------------------------------- guidance hooks
def test_ddpm_hook_shift_is_added_to_the_mean_at_every_step(diffusion):
    """The core adds exactly what the hook returns to the posterior mean, at every step, with the respaced index."""
    shift = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])
    x = torch.linspace(-1, 1, 6).reshape(2, 3)
    model = ConstantX0Model(torch.zeros(2, 3))
    for j in (0, 4, 30):
        t = torch.full((2,), j, dtype=torch.long)
        hook = ConstantHook(shift)
        torch.manual_seed(2)
        guided = diffusion.p_sample(model, x, t, cond_mean_fn=hook)["sample"]
        torch.manual_seed(2)
        plain = diffusion.p_sample(model, x, t)["sample"]
        torch.testing.assert_close(guided - plain, shift, rtol=1e-5, atol=1e-6)
        assert hook.timesteps == [j] and hook.grad_enabled == [True]
    hook = ConstantHook(torch.zeros(1, 3))
    create_gaussian_diffusion(T, "ddim5").p_sample_loop(ConstantX0Model(torch.zeros(1, 3)), (1, 3), cond_mean_fn=hook)
    assert hook.timesteps == [4, 3, 2, 1, 0]      # respaced indices, not the original 40, 30, ...


def test_hook_returning_none_is_no_op_and_shapes_are_checked(diffusion):
    model = ConstantX0Model(torch.zeros(1, 3))
    torch.manual_seed(9)
    plain = diffusion.p_sample_loop(model, (1, 3))["sample"]
    torch.manual_seed(9)
    hooked = diffusion.p_sample_loop(model, (1, 3), cond_mean_fn=lambda x, t, o: None)["sample"]
    torch.testing.assert_close(hooked, plain)
    with pytest.raises(ValueError, match="cond_mean_fn"):
        diffusion.p_sample_loop(model, (1, 3), cond_mean_fn=lambda x, t, o: torch.zeros(1, 2))
    with pytest.raises(ValueError, match="cond_score_fn"):
        diffusion.ddim_sample_loop(model, (1, 3), cond_score_fn=lambda x, t, o: torch.zeros(1, 2))


def test_ddim_score_hook_by_hand():
    """eps <- eps - sqrt(1 - abar_j) g, x0 recomputed from eps (detached), then the plain DDIM update."""
    spaced = create_gaussian_diffusion(T, "ddim5")
    grad = torch.tensor([[0.5, -1.0, 2.0]])
    model = ConstantX0Model(torch.zeros(1, 3))
    x = torch.tensor([[0.3, -0.2, 1.0]])
    for j in (1, 3, 4):
        t = torch.full((1,), j, dtype=torch.long)
        hook = ConstantHook(grad)
        out = spaced.ddim_sample(model, x, t, cond_score_fn=hook)
        assert hook.timesteps == [j]
        abar, abar_prev = spaced.alphas_cumprod[j], spaced.alphas_cumprod_prev[j]
        xd, gd = x.double().numpy(), grad.double().numpy()
        eps = math.sqrt(1 / abar) * xd / math.sqrt(1 / abar - 1) - math.sqrt(1 - abar) * gd
        x0_hat = math.sqrt(1 / abar) * xd - math.sqrt(1 / abar - 1) * eps
        expected = x0_hat * math.sqrt(abar_prev) + math.sqrt(1 - abar_prev) * eps
        np.testing.assert_allclose(out["pred_xstart"].numpy(), x0_hat, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out["sample"].numpy(), expected, rtol=1e-4, atol=1e-5)
        assert not out["pred_xstart"].requires_grad


# ---------------------------------------------------------------------------------------------- resample
def test_uniform_sampler_matches_numpy_choice():
    sampler = UniformSampler(T)
    np.random.seed(123)
    t, weights = sampler.sample(16, torch.device("cpu"))
    np.random.seed(123)
    expected = np.random.choice(T, size=(16,), p=np.ones(T) / T)
    assert t.dtype == torch.long and t.shape == (16,)
    np.testing.assert_array_equal(t.numpy(), expected)
    torch.testing.assert_close(weights, torch.ones(16))
    assert UniformSampler(create_gaussian_diffusion(T, "")).num_timesteps == T
    with pytest.raises(ValueError, match="num_timesteps"):
        UniformSampler(0)
