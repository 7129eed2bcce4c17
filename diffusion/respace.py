"""Timestep respacing: run the reverse process on a subset of the original timesteps.

A :class:`SpacedDiffusion` keeps the original alphas_cumprod at the kept steps and rebuilds all tables from
the implied betas. The network is always called with ORIGINAL timestep indices (``timestep_map``), never
rescaled; guidance hooks also receive original indices.
"""
import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion
from .schedules import get_named_beta_schedule

# Respacing strings that mean "keep every step".
ALL_STEPS_ALIASES = (None, "", "ddpm")


def _ddim_steps(num_timesteps, desired_count):
    """Steps range(0, T, k) for the smallest integer stride k giving exactly ``desired_count`` steps."""
    for stride in range(1, num_timesteps + 1):
        steps = range(0, num_timesteps, stride)
        if len(steps) == desired_count:
            return set(steps)
    raise ValueError(f"cannot create exactly {desired_count} steps with an integer stride from {num_timesteps} steps")


def _parse_section_counts(section_counts):
    """Turn '10,15,20' / 12 / [10, 15] into a list of ints, with a clear error otherwise."""
    if isinstance(section_counts, (int, np.integer)):
        return [int(section_counts)]
    if isinstance(section_counts, str):
        parts = [part.strip() for part in section_counts.split(",")]
        try:
            return [int(part) for part in parts]
        except ValueError:
            raise ValueError(f"timestep_respacing {section_counts!r}: expected '', 'ddpm', 'ddimN' "
                             f"or comma-separated integers") from None
    return [int(count) for count in section_counts]


def space_timesteps(num_timesteps, section_counts):
    """Choose which original timesteps to keep.

    :param num_timesteps: T, the number of steps of the original schedule.
    :param section_counts: one of
        * None, '' or 'ddpm': all T steps;
        * 'ddimN': range(0, T, k) for the smallest integer stride k giving N steps (T=50, ddim5 -> {0,10,...,40});
        * comma-separated counts (string, int or list): T is split into that many equal sections (the first
          T % n sections one step longer), and each section keeps that many evenly spaced steps
          (fractional stride, rounded), always including the section's first step.
    :return: set of kept original timestep indices.
    """
    num_timesteps = int(num_timesteps)
    if section_counts in ALL_STEPS_ALIASES:
        return set(range(num_timesteps))
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        try:
            desired = int(section_counts[len("ddim"):])
        except ValueError:
            raise ValueError(f"timestep_respacing {section_counts!r}: expected 'ddimN' with an integer N") from None
        return _ddim_steps(num_timesteps, desired)

    counts = _parse_section_counts(section_counts)
    base_size, remainder = divmod(num_timesteps, len(counts))
    kept = set()
    section_start = 0
    for index, count in enumerate(counts):
        size = base_size + (1 if index < remainder else 0)
        if count > size:
            raise ValueError(f"cannot keep {count} steps from a section of {size} steps")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.add(section_start + round(position))
            position += stride
        section_start += size
    return kept


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over a subset ``use_timesteps`` of the steps of a base schedule ``betas``.

    New betas: beta'_j = 1 - abar[kept_j] / abar[kept_{j-1}] (abar = 1 before the first kept step), so the
    cumulative products at the kept steps equal the original ones.
    """

    def __init__(self, use_timesteps, betas):
        base = GaussianDiffusion(betas)
        kept = sorted(int(step) for step in use_timesteps)
        if not kept:
            raise ValueError("use_timesteps is empty: keep at least one timestep")
        if kept[0] < 0 or kept[-1] >= base.num_timesteps:
            raise ValueError(f"use_timesteps must lie in [0, {base.num_timesteps}), got {kept[0]}..{kept[-1]}")
        self.use_timesteps = set(kept)
        self.original_num_steps = base.num_timesteps
        new_betas = []
        previous_abar = 1.0
        for step in kept:
            abar = base.alphas_cumprod[step]
            new_betas.append(1.0 - abar / previous_abar)
            previous_abar = abar
        self.timestep_map = np.array(kept, dtype=np.int64)
        super().__init__(np.array(new_betas, dtype=np.float64))

    def original_timesteps(self, t):
        """Map respaced indices j (LongTensor) to the original timesteps timestep_map[j]."""
        table = torch.from_numpy(self.timestep_map).to(device=t.device)
        return table[t]


def create_gaussian_diffusion(num_diffusion_timesteps=50, timestep_respacing="", noise_schedule="cosine"):
    """EgoHMR's diffusion: cosine schedule over ``num_diffusion_timesteps`` steps, respaced as requested.

    :param timestep_respacing: '' / 'ddpm' / None (all steps), 'ddimN', or section counts (see space_timesteps).
    :return: SpacedDiffusion.
    """
    betas = get_named_beta_schedule(noise_schedule, num_diffusion_timesteps)
    return SpacedDiffusion(space_timesteps(num_diffusion_timesteps, timestep_respacing), betas)
