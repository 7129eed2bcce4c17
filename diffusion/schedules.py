"""Noise schedules (betas) for the Gaussian diffusion.

All schedules are returned as float64 numpy arrays of length ``num_diffusion_timesteps``;
entry ``i`` is the variance beta_i of the forward step x_i -> x_{i+1} (index 0 is the
least noisy step).  EgoHMR uses the cosine schedule with T = 50.
"""
import math

import numpy as np

# Upper bound on any single beta; prevents alpha_bar from reaching exactly 0 at the end.
MAX_BETA = 0.999
# Offset s of the cosine schedule (Nichol & Dhariwal 2021).
COSINE_OFFSET = 0.008


def cosine_alpha_bar(tau):
    """Continuous cumulative signal level alpha_bar(tau) = cos^2(((tau + s)/(1 + s)) * pi/2), tau in [0, 1]."""
    angle = (tau + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * (math.pi / 2.0)
    return math.cos(angle) ** 2


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=MAX_BETA):
    """Discretise a continuous alpha_bar(tau) into per-step betas.

    beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta), for i = 0..T-1.

    :param num_diffusion_timesteps: T, the number of betas to produce.
    :param alpha_bar: callable mapping tau in [0, 1] to the cumulative product of (1 - beta).
    :param max_beta: clip value for each beta.
    :return: float64 array [T].
    """
    steps = int(num_diffusion_timesteps)
    betas = np.empty(steps, dtype=np.float64)
    for i in range(steps):
        ratio = alpha_bar((i + 1) / steps) / alpha_bar(i / steps)
        betas[i] = min(1.0 - ratio, max_beta)
    return betas


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps, scale_betas=1.0):
    """Return the named beta schedule as a float64 array [T].

    :param schedule_name: 'cosine' (EgoHMR) or 'linear' (Ho et al., rescaled to T steps).
    :param num_diffusion_timesteps: T.
    :param scale_betas: multiplies the linear schedule only; ignored for 'cosine' (as in EgoHMR).
    """
    steps = int(num_diffusion_timesteps)
    if steps < 1:
        raise ValueError(f"num_diffusion_timesteps must be a positive integer, got {num_diffusion_timesteps!r}")
    if schedule_name == "cosine":
        return betas_for_alpha_bar(steps, cosine_alpha_bar)
    if schedule_name == "linear":
        # Ho et al. used 1e-4 .. 0.02 over 1000 steps; keep the same overall noise for other T.
        scale = scale_betas * 1000.0 / steps
        return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
    raise ValueError(f"unknown beta schedule {schedule_name!r}; expected 'cosine' or 'linear'")
