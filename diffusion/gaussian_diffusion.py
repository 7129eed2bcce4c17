"""Gaussian diffusion for models that predict x0, pure math (knows nothing of the task it serves).

Follows the structure of OpenAI's guided-diffusion, reduced to what an x0-predicting model needs:

* the network predicts the clean sample x0 ("START_X"); the reverse-process variance is the fixed
  posterior variance ("FIXED_SMALL"); no clipping of x0;
* timesteps are passed to the network as integer indices of the ORIGINAL schedule (no rescaling);
* the network is opaque: ``model(x_t, t, **model_kwargs) -> dict`` holding ``'pred_x_start'`` (x's shape);
  nothing is written into ``model_kwargs``;
* guidance enters only through hooks, called under ``torch.enable_grad()`` with a detached ``x`` (the model
  calls are under ``torch.no_grad()``), with the RESPACED step index ``t`` of the chain being run and the step's
  ``p_mean_var`` dict (``mean``, ``variance``, ``log_variance``, ``pred_xstart``, ``model_output``):

  - DDPM, ``cond_mean_fn(x, t, p_mean_var, **model_kwargs) -> shift or None``: the shift is added to the
    posterior mean (guided-diffusion's ``condition_mean`` with the rule left to the hook);
  - DDIM, ``cond_score_fn(x, t, p_mean_var, **model_kwargs) -> g or None``: ``eps <- eps - sqrt(1 - abar_t) g``
    and x0 is recomputed from eps (guided-diffusion's ``condition_score``).

  None means "no guidance at this step"; a returned tensor must have x's shape.

* the per-step noise of the sampling loops is ``torch.randn_like(x)`` unless a ``noise_fn(x, t) -> tensor of x's
  shape`` is given (``t``: the respaced step index tensor); with it the caller decides where every draw comes from
  (per-row generators make a row's chain independent of the batch it runs in).

Schedule tables are float64 numpy arrays; values gathered for a batch of timesteps are cast to
float32 before they multiply tensors (as the original implementation does).
"""
import numpy as np
import torch

MODEL_OUTPUT_KEY = "pred_x_start"


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
    """Final result of a sampling loop: the last step's sample, x0 prediction and model output dict (j = 0)."""
    return {"sample": step_out["sample"], "pred_xstart": step_out["pred_xstart"],
            "model_output": step_out["model_output"]}


def _step_noise(noise_fn, x, t):
    """The step's noise: ``torch.randn_like(x)``, or ``noise_fn(x, t)`` checked to have x's shape."""
    if noise_fn is None:
        return torch.randn_like(x)
    noise = noise_fn(x, t)
    if noise.shape != x.shape:
        raise ValueError(f"noise_fn returned a tensor of shape {tuple(noise.shape)}, expected {tuple(x.shape)}")
    return noise.to(device=x.device, dtype=x.dtype)


def _check_hook_result(name, value, x):
    if value is not None and value.shape != x.shape:
        raise ValueError(f"{name} returned a tensor of shape {tuple(value.shape)}, "
                         f"expected {tuple(x.shape)} (the shape of x_t)")
    return None if value is None else value.detach()


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
    def p_mean_variance(self, model, x, t, model_kwargs=None):
        """Run the model at (x, t) and form p(x_{t-1} | x_t).

        Calls ``model(x, original_t, **model_kwargs)``; EgoHMR never clips x0, so there is no clipping option.

        :return: dict(mean, variance, log_variance, pred_xstart, model_output=the model's output dict).
        """
        if t.shape != (x.shape[0],):
            raise ValueError(f"timesteps must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        outputs = model(x, self.original_timesteps(t), **(model_kwargs or {}))
        if not isinstance(outputs, dict) or MODEL_OUTPUT_KEY not in outputs:
            raise ValueError(f"model output must be a dict with key '{MODEL_OUTPUT_KEY}'")
        pred_xstart = outputs[MODEL_OUTPUT_KEY]
        if pred_xstart.shape != x.shape:
            raise ValueError(f"model output '{MODEL_OUTPUT_KEY}' has shape {tuple(pred_xstart.shape)}, "
                             f"expected {tuple(x.shape)} (the shape of x_t)")
        mean, variance, log_variance = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_xstart": pred_xstart, "model_output": outputs}

    def condition_mean(self, cond_mean_fn, p_mean_var, x, t, model_kwargs=None):
        """The posterior mean plus the hook's shift (unchanged where the hook returns None)."""
        with torch.enable_grad():
            shift = cond_mean_fn(x.detach(), t, p_mean_var, **(model_kwargs or {}))
        shift = _check_hook_result("cond_mean_fn", shift, x)
        return p_mean_var["mean"] if shift is None else p_mean_var["mean"] + shift

    def condition_score(self, cond_score_fn, p_mean_var, x, t, model_kwargs=None):
        """The x0 prediction after ``eps <- eps - sqrt(1 - abar_t) g`` with the hook's g (unchanged for None)."""
        with torch.enable_grad():
            grad = cond_score_fn(x.detach(), t, p_mean_var, **(model_kwargs or {}))
        grad = _check_hook_result("cond_score_fn", grad, x)
        if grad is None:
            return p_mean_var["pred_xstart"]
        with torch.no_grad():
            eps = self.predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
            eps = eps - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x.shape) * grad
            return self.predict_xstart_from_eps(x, t, eps)

    def p_sample(self, model, x, t, model_kwargs=None, cond_mean_fn=None, noise_fn=None):
        """One DDPM step x_t -> x_{t-1}: model, draw eps, guidance hook (this order matters for the RNG stream).

        :param noise_fn: optional ``noise_fn(x, t)`` giving the step's noise (module docstring).
        :return: dict(sample, pred_xstart, model_output).
        """
        with torch.no_grad():
            out = self.p_mean_variance(model, x, t, model_kwargs)
            noise = _step_noise(noise_fn, x, t)
        mean = out["mean"]
        if cond_mean_fn is not None:
            mean = self.condition_mean(cond_mean_fn, out, x, t, model_kwargs)
        with torch.no_grad():
            nonzero = (t != 0).float().reshape((-1,) + (1,) * (x.dim() - 1))
            sample = mean + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"], "model_output": out["model_output"]}

    def p_sample_loop_progressive(self, model, shape, noise=None, model_kwargs=None, cond_mean_fn=None,
                                  device=None, progress=False, noise_fn=None):
        """Yield the dict of every DDPM step, from j = N-1 down to 0 (see :meth:`p_sample`)."""
        device = _default_device(model, noise, device)
        x = noise if noise is not None else torch.randn(*shape, device=device)
        for j in _timestep_iterator(self.num_timesteps, progress):
            t = torch.full((x.shape[0],), j, dtype=torch.long, device=device)
            step = self.p_sample(model, x, t, model_kwargs, cond_mean_fn, noise_fn)
            yield step
            x = step["sample"]

    def p_sample_loop(self, model, shape, noise=None, model_kwargs=None, cond_mean_fn=None, device=None,
                      progress=False, noise_fn=None):
        """Full DDPM reverse chain from x_N ~ N(0, I) (or ``noise``).

        :param shape: shape of x, e.g. (bs, 144).
        :param cond_mean_fn: optional guidance hook (module docstring).
        :param noise_fn: optional per-step noise (module docstring).
        :return: dict(sample=final x, pred_xstart, model_output=model output dict of the last step j=0).
        """
        final = None
        for step in self.p_sample_loop_progressive(model, shape, noise, model_kwargs, cond_mean_fn, device,
                                                   progress, noise_fn):
            final = step
        return _loop_result(final)

    def ddim_sample(self, model, x, t, model_kwargs=None, cond_score_fn=None, eta=0.0, noise_fn=None):
        """One DDIM step x_t -> x_{t-1}: model, guidance hook, draw eps (this order matters for the RNG stream).

        :return: dict(sample, pred_xstart, model_output).
        """
        with torch.no_grad():
            out = self.p_mean_variance(model, x, t, model_kwargs)
        pred_xstart = out["pred_xstart"]
        if cond_score_fn is not None:
            pred_xstart = self.condition_score(cond_score_fn, out, x, t, model_kwargs)
        with torch.no_grad():
            eps = self.predict_eps_from_xstart(x, t, pred_xstart)
            abar = extract_into_tensor(self.alphas_cumprod, t, x.shape)
            abar_prev = extract_into_tensor(self.alphas_cumprod_prev, t, x.shape)
            sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
            noise = _step_noise(noise_fn, x, t)
            mean_pred = pred_xstart * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma ** 2) * eps
            nonzero = (t != 0).float().reshape((-1,) + (1,) * (x.dim() - 1))
            sample = mean_pred + nonzero * sigma * noise
        return {"sample": sample, "pred_xstart": pred_xstart, "model_output": out["model_output"]}

    def ddim_sample_loop_progressive(self, model, shape, noise=None, model_kwargs=None, cond_score_fn=None,
                                     eta=0.0, device=None, progress=False, noise_fn=None):
        """Yield the dict of every DDIM step, from j = N-1 down to 0 (see :meth:`ddim_sample`)."""
        device = _default_device(model, noise, device)
        x = noise if noise is not None else torch.randn(*shape, device=device)
        for j in _timestep_iterator(self.num_timesteps, progress):
            t = torch.full((x.shape[0],), j, dtype=torch.long, device=device)
            step = self.ddim_sample(model, x, t, model_kwargs, cond_score_fn, eta, noise_fn)
            yield step
            x = step["sample"]

    def ddim_sample_loop(self, model, shape, noise=None, model_kwargs=None, cond_score_fn=None, eta=0.0,
                         device=None, progress=False, noise_fn=None):
        """Full DDIM reverse chain (deterministic given x_N for eta = 0; one randn is still drawn per step).

        :return: same structure as :meth:`p_sample_loop`.
        """
        final = None
        for step in self.ddim_sample_loop_progressive(model, shape, noise, model_kwargs, cond_score_fn, eta,
                                                      device, progress, noise_fn):
            final = step
        return _loop_result(final)

    def sample(self, model, shape, method="ddpm", noise=None, model_kwargs=None, guidance=None, eta=0.0,
               device=None, progress=False, noise_fn=None):
        """Run a full reverse chain with ``method`` 'ddpm' (:meth:`p_sample_loop`) or 'ddim'
        (:meth:`ddim_sample_loop`). ``guidance``: None, or an object with ``condition_mean`` (DDPM) and
        ``condition_score`` (DDIM) hooks of the module docstring's signatures; ``noise``: the starting x_N;
        ``noise_fn``: the per-step noise (module docstring)."""
        if method == "ddpm":
            hook = None if guidance is None else guidance.condition_mean
            return self.p_sample_loop(model, shape, noise, model_kwargs, hook, device, progress, noise_fn)
        if method == "ddim":
            hook = None if guidance is None else guidance.condition_score
            return self.ddim_sample_loop(model, shape, noise, model_kwargs, hook, eta, device, progress, noise_fn)
        raise ValueError(f"unknown sampling method {method!r}; expected 'ddpm' or 'ddim'")
