"""Gaussian diffusion for x0-predicting models (EgoHMR stage 2): schedules, respacing, sampling loops."""
from .gaussian_diffusion import GaussianDiffusion, extract_into_tensor
from .resample import UniformSampler, create_named_schedule_sampler
from .respace import SpacedDiffusion, create_gaussian_diffusion, space_timesteps
from .schedules import betas_for_alpha_bar, get_named_beta_schedule

__all__ = [
    "GaussianDiffusion", "SpacedDiffusion", "UniformSampler", "betas_for_alpha_bar", "create_gaussian_diffusion",
    "create_named_schedule_sampler", "extract_into_tensor", "get_named_beta_schedule", "space_timesteps",
]
