"""Stage-1 prediction heads: the pose flow wrapper (``model.flow``) and its FC head (``model.flow.fc_head``).

``SMPLFlowHead.flow`` is the conditional Glow over the 144-d 6D pose (ProHMR layout, joint 0 = global
orientation); ``SMPLFlowHead.fc_head`` predicts betas and the weak-perspective crop camera ``(s, tx, ty)`` as
offsets from the SMPL mean parameters. Both read the same context vector.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from prohmr_scene.flow import ConditionalGlow
from utils.body_model import NUM_SMPL_JOINTS
from utils.geometry import rot6d_to_rotmat
from utils.io import load_npz_checked

NUM_BETAS = 10


class FCHead(nn.Module):
    """``context [B, C] -> (betas [B, S, 10], cam [B, S, 3])``; the same values for all S samples."""

    def __init__(self, context_features: int, hidden_features: int, mean_params_path: str):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(context_features, hidden_features), nn.ReLU(),
                                    nn.Linear(hidden_features, NUM_BETAS + 3))
        nn.init.xavier_uniform_(self.layers[2].weight, gain=0.02)
        mean = load_npz_checked(mean_params_path, ('shape', 'cam'), what='SMPL mean parameters',
                                shapes={'cam': (3,)})
        init_betas = np.asarray(mean['shape'], dtype=np.float32).reshape(-1)[:NUM_BETAS]
        self.register_buffer('init_cam', torch.from_numpy(np.asarray(mean['cam'], np.float32)).view(1, 1, 3))
        self.register_buffer('init_betas', torch.from_numpy(init_betas.copy()).view(1, 1, NUM_BETAS))

    def forward(self, context: torch.Tensor, num_samples: int) -> Tuple[torch.Tensor, torch.Tensor]:
        offset = self.layers(context)[:, None, :].expand(-1, num_samples, -1)
        betas = offset[..., :NUM_BETAS] + self.init_betas
        cam = offset[..., NUM_BETAS:] + self.init_cam
        return betas, cam


class SMPLFlowHead(nn.Module):
    """Pose distribution (``flow``) plus shape/camera regressor (``fc_head``), conditioned on one context."""

    def __init__(self, context_features: int, mean_params_path: str, pose_dim: int = 6 * NUM_SMPL_JOINTS,
                 hidden_features: int = 1024, num_layers: int = 4, num_blocks_per_layer: int = 2,
                 fc_hidden: int = 1024):
        super().__init__()
        self.pose_dim = pose_dim
        self.flow = ConditionalGlow(pose_dim, hidden_features, num_layers, num_blocks_per_layer, context_features)
        self.fc_head = FCHead(context_features, fc_hidden, mean_params_path)

    def log_prob(self, pose_6d: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``log p(pose_6d [B, S, 144] | context [B, C])`` -> ``[B, S]`` (context repeated per sample)."""
        batch, num_samples = pose_6d.shape[:2]
        rows = context.repeat_interleave(num_samples, dim=0)
        log_prob, _ = self.flow.log_prob(pose_6d.reshape(batch * num_samples, -1), rows)
        return log_prob.view(batch, num_samples)

    def forward(self, context: torch.Tensor, num_samples: int, noise: Optional[torch.Tensor] = None) -> Dict:
        """Decode ``num_samples`` poses per context row (random z, or the given ``noise [B, S, 144]``).

        Returns ``pred_pose_6d [B,S,144]``, ``log_prob [B,S]``, ``global_orient [B,S,1,3,3]``,
        ``body_pose [B,S,23,3,3]``, ``betas [B,S,10]``, ``cam [B,S,3]``.
        """
        pose_6d, log_prob, _ = self.flow.sample_and_log_prob(num_samples, context, noise=noise)
        num_samples = pose_6d.shape[1]
        rotmats = rot6d_to_rotmat(pose_6d.reshape(-1, 6), mode='prohmr').view(
            context.shape[0], num_samples, NUM_SMPL_JOINTS, 3, 3)
        betas, cam = self.fc_head(context, num_samples)
        return {'pred_pose_6d': pose_6d, 'log_prob': log_prob, 'global_orient': rotmats[:, :, :1],
                'body_pose': rotmats[:, :, 1:], 'betas': betas, 'cam': cam}

    def sample_with_mode(self, context: torch.Tensor, num_samples: int,
                         noise: Optional[torch.Tensor] = None) -> Dict:
        """``num_samples`` poses per row, sample 0 being the mode (z = 0).

        As in the original, the S-1 random draws run first (they consume the RNG, as does dropout in train
        mode), then the mode pass; the mode is concatenated in front. ``noise [B, S-1, 144]``: the z of samples
        1..S-1 (per-frame streams at test time) instead of one ``randn``.
        """
        zeros = context.new_zeros(context.shape[0], 1, self.pose_dim)
        if num_samples <= 1:
            return self(context, 1, noise=zeros)
        if noise is not None and tuple(noise.shape) != (context.shape[0], num_samples - 1, self.pose_dim):
            raise ValueError(f"sample_with_mode: noise has shape {tuple(noise.shape)}, expected "
                             f"{(context.shape[0], num_samples - 1, self.pose_dim)}")
        random = self(context, num_samples - 1, noise=noise)
        mode = self(context, 1, noise=zeros)
        return {k: torch.cat([mode[k], random[k]], dim=1) for k in mode}
