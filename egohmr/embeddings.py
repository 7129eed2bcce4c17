"""Small encoders of the stage-2 denoiser: timestep, noisy pose, translation and the betas head.

Parameter names follow the released checkpoints (``embed_timestep.time_embed.{0,2}``, ``input_process.poseEmbedding``,
``transl_enc.layers.{0,2}``, ``beta_layer.layers.{0,2}`` + ``beta_layer.init_betas``).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from utils.io import load_npz_checked

TIMESTEP_EMBED_DIM = 512
POSITION_TABLE_LENGTH = 5000
BETAS_HEAD_HIDDEN = 1024
BETAS_HEAD_GAIN = 0.02


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """``pe[p, 2i] = sin(p 10000^(-2i/dim))``, ``pe[p, 2i+1] = cos(...)``, shape ``[length, dim]``."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


class PositionalEncoding(nn.Module):
    """Holds the sinusoidal table as buffer ``pe [length, 1, dim]``.

    The dropout module exists for parity with the original but the table is only ever looked up, never added.
    """

    def __init__(self, dim: int = TIMESTEP_EMBED_DIM, dropout: float = 0.1, max_len: int = POSITION_TABLE_LENGTH):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        self.register_buffer('pe', sinusoidal_table(max_len, dim)[:, None, :])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sequence-first ``x [L, B, dim]`` plus the table (unused by EgoHMR)."""
        return self.dropout(x + self.pe[:x.shape[0]])


class TimestepEmbedder(nn.Module):
    """Integer timesteps ``[B]`` -> ``[B, dim]``: table lookup then Linear-SiLU-Linear.

    The :class:`PositionalEncoding` is shared with the owner model, so its ``pe`` is saved under both names.
    """

    def __init__(self, dim: int, sequence_pos_encoder: PositionalEncoding):
        super().__init__()
        self.sequence_pos_encoder = sequence_pos_encoder
        self.time_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.time_embed(self.sequence_pos_encoder.pe[timesteps.long(), 0])


class PoseEmbedding(nn.Module):
    """Per-joint linear embedding of the noisy 6D pose: ``[B, J, 6]`` -> ``[B, J, dim]``."""

    def __init__(self, in_dim: int = 6, dim: int = 512):
        super().__init__()
        self.poseEmbedding = nn.Linear(in_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.poseEmbedding(x)


class TranslEncoder(nn.Module):
    """Raw metric body translation ``[B, 3]`` -> ``[B, 128]`` (Linear 3->64, ReLU, Linear 64->128)."""

    def __init__(self, in_dim: int = 3, out_dim: int = 128):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_dim, 64), nn.ReLU(), nn.Linear(64, out_dim))

    def forward(self, transl: torch.Tensor) -> torch.Tensor:
        return self.layers(transl)


class BetasHead(nn.Module):
    """``init_betas + MLP(features)``: Linear(in->1024), ReLU, Linear(1024->10) with a small xavier init."""

    def __init__(self, in_dim: int, mean_params_path: str = None, num_betas: int = 10):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_dim, BETAS_HEAD_HIDDEN), nn.ReLU(),
                                    nn.Linear(BETAS_HEAD_HIDDEN, num_betas))
        nn.init.xavier_uniform_(self.layers[2].weight, gain=BETAS_HEAD_GAIN)
        init_betas = np.zeros((1, num_betas), dtype=np.float32)
        if mean_params_path is not None:
            shape = load_npz_checked(mean_params_path, ('shape',), what='SMPL mean parameters')['shape']
            shape = np.asarray(shape, dtype=np.float32).reshape(-1)
            if shape.shape[0] < num_betas:
                raise ValueError(f"SMPL mean parameters '{mean_params_path}' key 'shape' has {shape.shape[0]} "
                                 f"values, expected {num_betas}")
            init_betas = shape[None, :num_betas]
        self.register_buffer('init_betas', torch.from_numpy(np.ascontiguousarray(init_betas)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features) + self.init_betas
