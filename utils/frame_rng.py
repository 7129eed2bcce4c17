"""Random draws that belong to a test frame, not to the batch it happens to be in.

At test time every random draw of a sample -- the stage-2 chain's starting noise and per-step noise, COAP's surface
samples in the guided steps and in the collision metric, the stage-1 flow's random samples -- comes from its own
generator, seeded by ``(seed, frame index in the split, sample index, purpose, step)``. The results of a frame then
do not depend on the batch size, ``--num_workers``, ``--samples_per_chain`` or how the test set is split into shards
or processes. The seed mixing is numpy's ``SeedSequence`` (well spread 64-bit seeds from the five integers); the
draws are made on the CPU and moved to the device, so a GPU run draws the same numbers as a CPU run.

A :class:`RowStreams` describes the rows of one batch (row ``r`` is sample ``samples[r]`` of frame ``frames[r]``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch

# What a stream is for (part of its seed, so two purposes never share draws).
PURPOSES = {'diffusion_noise': 1, 'coap_surface': 2, 'collision_ratio': 3, 'flow_noise': 4}


def stream_seed(seed: int, frame: int, sample: int, purpose: str, step: int = 0) -> int:
    """The 63-bit seed of one stream (see the module docstring)."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown stream purpose {purpose!r}; expected one of {sorted(PURPOSES)}")
    words = np.random.SeedSequence([int(seed), int(frame), int(sample), PURPOSES[purpose], int(step)]).generate_state(
        2, np.uint32)
    return (int(words[0]) | (int(words[1]) << 32)) & ((1 << 63) - 1)


def generator(seed: int, frame: int, sample: int, purpose: str, step: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`stream_seed`."""
    return torch.Generator().manual_seed(stream_seed(seed, frame, sample, purpose, step))


class RowStreams:
    """One stream per batch row: row ``r`` is sample ``samples[r]`` of frame ``frames[r]`` (module docstring)."""

    def __init__(self, seed: int, frames: Sequence[int], samples: Sequence[int]):
        if len(frames) != len(samples):
            raise ValueError(f"RowStreams: {len(frames)} frame indices but {len(samples)} sample indices")
        self.seed = int(seed)
        self.frames = [int(f) for f in frames]
        self.samples = [int(s) for s in samples]

    @classmethod
    def sample_major(cls, seed: int, frames: Sequence[int], first_sample: int, num_samples: int) -> 'RowStreams':
        """Rows ``s * bs + i`` = sample ``first_sample + s`` of frame ``frames[i]`` (a stage-2 chain's layout)."""
        frames = [int(f) for f in frames]
        return cls(seed, frames * num_samples, [first_sample + s for s in range(num_samples) for _ in frames])

    @classmethod
    def frame_major(cls, seed: int, frames: Sequence[int], first_sample: int, num_samples: int) -> 'RowStreams':
        """Rows ``i * S + s`` = sample ``first_sample + s`` of frame ``frames[i]`` (the stage-1 flow's layout)."""
        return cls(seed, [int(f) for f in frames for _ in range(num_samples)],
                   [first_sample + s for _ in frames for s in range(num_samples)])

    def __len__(self) -> int:
        return len(self.frames)

    def generators(self, purpose: str, step: int = 0) -> List[torch.Generator]:
        """One fresh CPU generator per row for ``(purpose, step)``."""
        return [generator(self.seed, f, s, purpose, step) for f, s in zip(self.frames, self.samples)]

    def randn(self, width: int, purpose: str, step: int = 0, device=None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[rows, width]`` standard normal draws, row ``r`` from its own stream."""
        rows = [torch.randn(width, generator=g, dtype=dtype) for g in self.generators(purpose, step)]
        out = torch.stack(rows) if rows else torch.zeros(0, width, dtype=dtype)
        return out.to(device) if device is not None else out


def frame_indices(batch: dict) -> Optional[List[int]]:
    """The batch's ``frame_index`` entries as ints (None if the batch has none)."""
    value = batch.get('frame_index')
    if value is None:
        return None
    return [int(v) for v in (value.tolist() if hasattr(value, 'tolist') else value)]
