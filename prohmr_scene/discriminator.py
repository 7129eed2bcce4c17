"""HMR-style pose and shape discriminator, used only during stage-1 training."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_BODY_JOINTS = 23


class Discriminator(nn.Module):
    """``(body_pose [N, 23, 3, 3], betas [N, 10]) -> scores [N, 25]`` = 23 per-joint, 1 shape, 1 whole-pose."""

    def __init__(self, num_joints: int = NUM_BODY_JOINTS, num_betas: int = 10, conv_channels: int = 32,
                 hidden: int = 1024):
        super().__init__()
        self.num_joints = num_joints
        self.D_conv1 = nn.Conv2d(9, conv_channels, kernel_size=1)
        self.D_conv2 = nn.Conv2d(conv_channels, conv_channels, kernel_size=1)
        self.pose_out = nn.ModuleList([nn.Linear(conv_channels, 1) for _ in range(num_joints)])
        self.betas_fc1 = nn.Linear(num_betas, 10)
        self.betas_fc2 = nn.Linear(10, 5)
        self.betas_out = nn.Linear(5, 1)
        self.D_alljoints_fc1 = nn.Linear(conv_channels * num_joints, hidden)
        self.D_alljoints_fc2 = nn.Linear(hidden, hidden)
        self.D_alljoints_out = nn.Linear(hidden, 1)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, body_pose: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
        n = body_pose.shape[0]
        # [N, 23, 3, 3] -> channels = the 9 matrix entries, "height" = joints: [N, 9, 23, 1]
        x = body_pose.reshape(n, self.num_joints, 1, 9).permute(0, 3, 1, 2)
        x = F.relu(self.D_conv2(F.relu(self.D_conv1(x))))              # [N, 32, 23, 1]
        per_joint = torch.cat([head(x[:, :, j, 0]) for j, head in enumerate(self.pose_out)], dim=1)
        shape = self.betas_out(F.relu(self.betas_fc2(F.relu(self.betas_fc1(betas)))))
        whole = x.reshape(n, -1)                                        # channel-major flatten, 736
        whole = self.D_alljoints_out(F.relu(self.D_alljoints_fc2(F.relu(self.D_alljoints_fc1(whole)))))
        return torch.cat([per_joint, shape, whole], dim=1)
