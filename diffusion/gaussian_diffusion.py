"""Gaussian diffusion for models that predict x0 (EgoHMR stage 2), pure math.

Follows the structure of OpenAI's guided-diffusion, reduced to what EgoHMR uses:

* the network predicts the clean sample x0 ("START_X"); the reverse-process variance is the fixed
  posterior variance ("FIXED_SMALL"); no clipping of x0;
* timesteps are passed to the network as integer indices of the ORIGINAL schedule (no rescaling);
* the network is called as ``model(batch, t) -> dict`` with the current noisy sample written into
  ``batch['x_t']`` beforehand; the dict must hold ``'pred_x_start'`` (same shape as x);
* optional guidance hooks for DDPM (``p_sample_with_grad`` semantics) and DDIM.

Schedule tables are float64 numpy arrays; values gathered for a batch of timesteps are cast to
float32 before they multiply tensors (as the original implementation does).

Guidance hook contract: ``guidance_fn(batch, x_t, t, model_outputs) -> grad or None`` where ``x_t`` is
the current noisy input [bs, ...], ``t`` the ORIGINAL timesteps (LongTensor [bs]) and ``model_outputs``
the model's output dict for this step. It is called under ``torch.enable_grad()`` (the model calls are
under ``torch.no_grad()``); the returned gradient is detached and must have the shape of ``x_t``.
Returning None means "no guidance at this step".
"""
import numpy as np
import torch

MODEL_OUTPUT_KEY = "pred_x_start"

# DDPM guidance (EgoHMR p_sample_with_grad): applied for original t <= 10; for t >= 5 the mean shift is
# w * posterior_variance_t * g, below that the variance is replaced by a constant 0.01.
DDPM_GUIDANCE_MAX_T = 10
DDPM_GUIDANCE_MIN_T_FOR_VARIANCE = 5
DDPM_GUIDANCE_FIXED_VARIANCE = 0.01
# DDIM guidance (EgoHMR ddim_sample_with_grad): applied for RESPACED j <= 3, scale 1 (no weight).
DDIM_GUIDANCE_MAX_J = 3
DDIM_GUIDANCE_SCALE = 1.0


def extract_into_tensor(table, timesteps, broadcast_shape):
    """Gather ``table[timesteps]`` as float32 and broadcast it to ``broadcast_shape``.

    :param table: 1-D numpy array (float64 schedule table).
    :param timesteps: LongTensor [bs] of indices into ``table``.
    :param broadcast_shape: shape [bs, ...] of the tensor the values will multiply.
    :return: float32 tensor of ``broadcast_shape`` on ``timesteps.device``.
    """
    values = torch.from_numpy(np.asarray(table)).to(device=timesteps.device)[timesteps].float()
    values = values.reshape(values.shape + (1,) * (len(broadcast_shape) - values.dim()))
    return values.expand(broadcast_shape)


def _default_device(model, noise, device):
    """Pick the sampling device: explicit argument, else the noise's, else the model's, else CPU."""
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        first = next(iter(parameters()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


def _timestep_iterator(num_steps, progress):
    """Respaced indices N-1, ..., 0, optionally wrapped in a tqdm progress bar."""
    indices = list(range(num_steps))[::-1]
    if progress:
        from tqdm.auto import tqdm  # lazy: tqdm is only needed for progress bars
        return tqdm(indices)
    return indices


def _loop_result(step_out):
    """Final result of a sampling loop: the last step's sample, x0 prediction and model outputs.

    ``'outputs'`` and ``'other_outputs'`` are the same dict (the model output at the last step, j = 0).
    """
    return {
        "sample": step_out["sample"],
        "pred_xstart": step_out["pred_xstart"],
        "other_outputs": step_out["other_outputs"],
        "outputs": step_out["other_outputs"],
    }


class GaussianDiffusion:
    """Forward process, posterior and reverse sampling loops for an x0-predicting model.

    :param betas: 1-D array of per-step betas (index 0 = least noisy step), values in (0, 1].
    """

    def __init__(self, betas):
        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 1:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must all lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.concatenate([[1.0], self.alphas_cumprod[:-1]])
        self.alphas_cumprod_next = np.concatenate([self.alphas_cumprod[1:], [0.0]])

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        # x_0 <-> eps conversions
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0)
        one_minus_abar = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus_abar
        # The posterior variance is 0 at t = 0; its log is taken with entry 0 replaced by entry 1.
        if self.num_timesteps > 1:
            variance_for_log = np.concatenate([self.posterior_variance[1:2], self.posterior_variance[1:]])
        else:
            variance_for_log = self.posterior_variance
        with np.errstate(divide="ignore"):
            self.posterior_log_variance_clipped = np.log(variance_for_log)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / one_minus_abar
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / one_minus_abar

    # ------------------------------------------------------------------ timesteps
    def original_timesteps(self, t):
        """Map (respaced) indices to the original schedule's indices; identity for the base class."""
        return t

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0), each of x_start's shape."""
        mean = extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

        :param x_start: clean sample [bs, ...].
        :param t: LongTensor [bs] of timesteps.
        :param noise: optional standard normal noise of x_start's shape (drawn with randn_like if None).
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"q_sample: noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def training_inputs(self, x_start, t, noise=None):
        """Noisy training input x_t for clean x_start at timesteps t (stage-2 training; losses live elsewhere)."""
        return self.q_sample(x_start, t, noise=noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"posterior: x_start shape {tuple(x_start.shape)} != x_t shape {tuple(x_t.shape)}")
        mean = (extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        variance = extract_into_tensor(self.posterior_variance, t, x_t.shape)
        log_variance = extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ x0 / eps conversions
    def predict_xstart_from_eps(self, x_t, t, eps):
        """x0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps."""
        return (extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """eps = (sqrt(1/abar_t) x_t - x0) / sqrt(1/abar_t - 1)."""
        return ((extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart)
                / extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(self, model, batch, x, t, clip_denoised=False, denoised_fn=None):
        """Run the model at (x, t) and form p(x_{t-1} | x_t).

        Writes ``batch['x_t'] = x`` and calls ``model(batch, original_t)``. ``clip_denoised`` and
        ``denoised_fn`` are accepted for API compatibility and ignored (EgoHMR never clips).

        :return: dict(mean, variance, log_variance, pred_xstart, other_outputs=model output dict).
        """
        del clip_denoised, denoised_fn  # intentionally unused
        if t.shape != (x.shape[0],):
            raise ValueError(f"timesteps must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        batch["x_t"] = x
        outputs = model(batch, self.original_timesteps(t))
        if not isinstance(outputs, dict) or MODEL_OUTPUT_KEY not in outputs:
            raise ValueError(f"model output must be a dict with key '{MODEL_OUTPUT_KEY}'")
        pred_xstart = outputs[MODEL_OUTPUT_KEY]
        if pred_xstart.shape != x.shape:
            raise ValueError(f"model output '{MODEL_OUTPUT_KEY}' has shape {tuple(pred_xstart.shape)}, "
                             f"expected {tuple(x.shape)} (the shape of x_t)")
        mean, variance, log_variance = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_xstart": pred_xstart, "other_outputs": outputs}

    def _call_guidance(self, guidance_fn, batch, x, t, outputs):
        """Run the guidance hook with gradients enabled; return a detached gradient or None."""
        with torch.enable_grad():
            grad = guidance_fn(batch, x, self.original_timesteps(t), outputs)
        if grad is None:
            return None
        if grad.shape != x.shape:
            raise ValueError(f"guidance_fn returned a gradient of shape {tuple(grad.shape)}, "
                             f"expected {tuple(x.shape)} (the shape of x_t)")
        return grad.detach()

    def p_sample(self, model, batch, x, t, guidance_fn=None, guidance_weight=1.0,
                 clip_denoised=False, denoised_fn=None):
        """One DDPM step x_t -> x_{t-1}, optionally guided (EgoHMR ``p_sample_with_grad``).

        Order of operations (matters for the RNG stream): model, draw eps, guidance hook.
        Guidance applies where the ORIGINAL timestep is <= 10: mean += w * var * g with var the unclipped
        posterior variance for t >= 5, else the constant 0.01.

        :return: dict(sample, pred_xstart, other_outputs).
        """
        with torch.no_grad():
            out = self.p_mean_variance(model, batch, x, t, clip_denoised, denoised_fn)
            noise = torch.randn_like(x)
        mean = out["mean"]
        if guidance_fn is not None:
            t_orig = self.original_timesteps(t)
            guided = t_orig <= DDPM_GUIDANCE_MAX_T
            if bool(guided.any()):
                grad = self._call_guidance(guidance_fn, batch, x, t, out["other_outputs"])
                if grad is not None:
                    fixed = torch.full_like(out["variance"], guidance_weight * DDPM_GUIDANCE_FIXED_VARIANCE)
                    use_variance = (t_orig >= DDPM_GUIDANCE_MIN_T_FOR_VARIANCE).reshape(
                        (-1,) + (1,) * (x.dim() - 1))
                    coef = torch.where(use_variance, guidance_weight * out["variance"], fixed)
                    coef = coef * guided.float().reshape((-1,) + (1,) * (x.dim() - 1))
                    mean = mean + coef * grad
        with torch.no_grad():
            nonzero = (t != 0).float().reshape((-1,) + (1,) * (x.dim() - 1))
            sample = mean + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"], "other_outputs": out["other_outputs"]}

    def p_sample_loop_progressive(self, model, batch, shape, noise=None, device=None, progress=False,
                                  guidance_fn=None, guidance_weight=1.0, clip_denoised=False, denoised_fn=None):
        """Yield the dict of every DDPM step, from j = N-1 down to 0 (see :meth:`p_sample`)."""
        device = _default_device(model, noise, device)
        x = noise if noise is not None else torch.randn(*shape, device=device)
        for j in _timestep_iterator(self.num_timesteps, progress):
            t = torch.full((x.shape[0],), j, dtype=torch.long, device=device)
            step = self.p_sample(model, batch, x, t, guidance_fn=guidance_fn, guidance_weight=guidance_weight,
                                 clip_denoised=clip_denoised, denoised_fn=denoised_fn)
            yield step
            x = step["sample"]

    def p_sample_loop(self, model, batch, shape, noise=None, device=None, progress=False,
                      guidance_fn=None, guidance_weight=1.0, clip_denoised=False, denoised_fn=None):
        """Full DDPM reverse chain from x_N ~ N(0, I) (or ``noise``).

        :param shape: shape of x, e.g. (bs, 144).
        :param guidance_fn: optional hook (module docstring); ``guidance_weight`` is w (EgoHMR COAP: 2.0).
        :return: dict(sample=final x, pred_xstart, other_outputs=outputs=model output dict of the last step j=0).
        """
        final = None
        for step in self.p_sample_loop_progressive(model, batch, shape, noise=noise, device=device,
                                                   progress=progress, guidance_fn=guidance_fn,
                                                   guidance_weight=guidance_weight,
                                                   clip_denoised=clip_denoised, denoised_fn=denoised_fn):
            final = step
        return _loop_result(final)

    def ddim_sample(self, model, batch, x, t, eta=0.0, guidance_fn=None, clip_denoised=False, denoised_fn=None):
        """One DDIM step x_t -> x_{t-1}, optionally guided (EgoHMR ``ddim_sample_with_grad``).

        Order of operations (matters for the RNG stream): model, guidance hook, draw eps.
        Guidance applies where the RESPACED index j <= 3: eps <- eps - sqrt(1 - abar_j) g (scale 1), then
        x0 is recomputed from eps and detached.

        :return: dict(sample, pred_xstart, other_outputs).
        """
        with torch.no_grad():
            out = self.p_mean_variance(model, batch, x, t, clip_denoised, denoised_fn)
        pred_xstart = out["pred_xstart"]
        if guidance_fn is not None and bool((t <= DDIM_GUIDANCE_MAX_J).any()):
            grad = self._call_guidance(guidance_fn, batch, x, t, out["other_outputs"])
            if grad is not None:
                with torch.no_grad():
                    guided = (t <= DDIM_GUIDANCE_MAX_J).float().reshape((-1,) + (1,) * (x.dim() - 1))
                    eps = self.predict_eps_from_xstart(x, t, pred_xstart)
                    sqrt_one_minus_abar = extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x.shape)
                    eps = eps - guided * sqrt_one_minus_abar * grad * DDIM_GUIDANCE_SCALE
                    pred_xstart = self.predict_xstart_from_eps(x, t, eps).detach()
        with torch.no_grad():
            eps = self.predict_eps_from_xstart(x, t, pred_xstart)
            abar = extract_into_tensor(self.alphas_cumprod, t, x.shape)
            abar_prev = extract_into_tensor(self.alphas_cumprod_prev, t, x.shape)
            sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
            noise = torch.randn_like(x)
            mean_pred = pred_xstart * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma ** 2) * eps
            nonzero = (t != 0).float().reshape((-1,) + (1,) * (x.dim() - 1))
            sample = mean_pred + nonzero * sigma * noise
        return {"sample": sample, "pred_xstart": pred_xstart, "other_outputs": out["other_outputs"]}

    def ddim_sample_loop_progressive(self, model, batch, shape, eta=0.0, noise=None, device=None, progress=False,
                                     guidance_fn=None, clip_denoised=False, denoised_fn=None):
        """Yield the dict of every DDIM step, from j = N-1 down to 0 (see :meth:`ddim_sample`)."""
        device = _default_device(model, noise, device)
        x = noise if noise is not None else torch.randn(*shape, device=device)
        for j in _timestep_iterator(self.num_timesteps, progress):
            t = torch.full((x.shape[0],), j, dtype=torch.long, device=device)
            step = self.ddim_sample(model, batch, x, t, eta=eta, guidance_fn=guidance_fn,
                                    clip_denoised=clip_denoised, denoised_fn=denoised_fn)
            yield step
            x = step["sample"]

    def ddim_sample_loop(self, model, batch, shape, eta=0.0, noise=None, device=None, progress=False,
                         guidance_fn=None, clip_denoised=False, denoised_fn=None):
        """Full DDIM reverse chain (deterministic given x_N for eta = 0; one randn is still drawn per step).

        The guided DDIM path (EgoHMR §5.9) is implemented, but the original authors state DDIM is not meant
        for guidance; callers (test scripts) should refuse ddim + guidance unless explicitly enabled.

        :return: same structure as :meth:`p_sample_loop`.
        """
        final = None
        for step in self.ddim_sample_loop_progressive(model, batch, shape, eta=eta, noise=noise, device=device,
                                                      progress=progress, guidance_fn=guidance_fn,
                                                      clip_denoised=clip_denoised, denoised_fn=denoised_fn):
            final = step
        return _loop_result(final)

    def sample(self, model, batch, shape, method="ddpm", noise=None, device=None, progress=False,
               guidance_fn=None, guidance_weight=1.0, eta=0.0):
        """Run a full reverse chain with ``method`` 'ddpm' (:meth:`p_sample_loop`) or 'ddim'
        (:meth:`ddim_sample_loop`; ``guidance_weight`` is ignored there, as in EgoHMR)."""
        if method == "ddpm":
            return self.p_sample_loop(model, batch, shape, noise=noise, device=device, progress=progress,
                                      guidance_fn=guidance_fn, guidance_weight=guidance_weight)
        if method == "ddim":
            return self.ddim_sample_loop(model, batch, shape, eta=eta, noise=noise, device=device,
                                         progress=progress, guidance_fn=guidance_fn)
        raise ValueError(f"unknown sampling method {method!r}; expected 'ddpm' or 'ddim'")
