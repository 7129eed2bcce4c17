"""Stage-1 loss terms (the original's). Every per-sample term has shape ``[B, S]``; sample 0 is the mode.

"mode" = sample 0 summed over the batch / B; "exp" = samples 1.. summed / (B (S-1)), 0 when S = 1.
"""
from __future__ import annotations

from typing import Tuple

import torch

# OpenPose BODY_25 joints whose 2D confidence is ignored by the keypoint losses: neck, right hip, left hip.
IGNORED_OPENPOSE_JOINTS = (1, 9, 12)


def split_mode_exp(per_sample: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[B, S]`` -> (mode term, expectation term over the random samples)."""
    batch, num_samples = per_sample.shape[:2]
    mode = per_sample[:, 0].sum() / batch
    if num_samples < 2:
        return mode, per_sample.new_zeros(())
    return mode, per_sample[:, 1:].sum() / (batch * (num_samples - 1))


def keypoint_2d_loss(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Confidence-weighted L1 summed over joints and xy: ``pred [B,S,J,2]``, ``gt [B,J,3]`` -> ``[B,S]``.

    The confidences of OpenPose joints 1, 9 and 12 are treated as 0 (the batch is not modified).
    """
    conf = gt[:, None, :, 2:].clone()
    conf[:, :, list(IGNORED_OPENPOSE_JOINTS)] = 0.0
    return (conf * (pred - gt[:, None, :, :2]).abs()).sum(dim=(2, 3))


def keypoint_3d_loss(pred: torch.Tensor, gt: torch.Tensor, pelvis_id: int = None) -> torch.Tensor:
    """L1 summed over joints and xyz: ``pred [B,S,J,3]``, ``gt [B,J,3]`` -> ``[B,S]``; optionally pelvis-aligned."""
    gt = gt[:, None]
    if pelvis_id is not None:
        pred = pred - pred[:, :, pelvis_id:pelvis_id + 1]
        gt = gt - gt[:, :, pelvis_id:pelvis_id + 1]
    return (pred - gt).abs().sum(dim=(2, 3))


def vertex_loss(pred_verts: torch.Tensor, pred_pelvis: torch.Tensor, gt_verts: torch.Tensor,
                gt_pelvis: torch.Tensor) -> torch.Tensor:
    """Mean L1 of pelvis-relative vertices: ``pred [B,S,V,3]``, ``pred_pelvis [B,S,3]``, ``gt [B,V,3]`` -> ``[B,S]``."""
    pred_rel = pred_verts - pred_pelvis[:, :, None]
    gt_rel = (gt_verts - gt_pelvis[:, None])[:, None]
    return (pred_rel - gt_rel).abs().mean(dim=(2, 3))


def parameter_loss(pred: torch.Tensor, gt: torch.Tensor, has_param: torch.Tensor) -> torch.Tensor:
    """Masked squared error summed over all entries: ``pred [B,S,...]``, ``gt [B,...]`` -> ``[B,S]``."""
    batch, num_samples = pred.shape[:2]
    err = (pred.reshape(batch, num_samples, -1) - gt.reshape(batch, 1, -1)) ** 2
    return has_param.to(err.dtype).view(batch, 1) * err.sum(dim=-1)


def orthonormality_loss(pose_6d: torch.Tensor) -> torch.Tensor:
    """``(A^T A - I_2)^2`` per joint for the ProHMR 6D layout ``[B,S,144]`` (A = [c1 c2]) -> ``[B,S,24,4]``."""
    batch, num_samples = pose_6d.shape[:2]
    cols = pose_6d.reshape(batch, num_samples, -1, 2, 3)          # rows of this view are c1, c2
    gram = cols @ cols.transpose(-1, -2)
    eye = torch.eye(2, dtype=gram.dtype, device=gram.device)
    return ((gram - eye) ** 2).reshape(batch, num_samples, -1, 4)


def orthonormality_mode_exp(pose_6d: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Means of :func:`orthonormality_loss` over sample 0 and over samples 1...

    With one sample the original takes the mean of an empty tensor (NaN); we return 0 instead (deliberate fix).
    """
    per = orthonormality_loss(pose_6d)
    mode = per[:, 0].mean()
    exp = per[:, 1:].mean() if per.shape[1] > 1 else per.new_zeros(())
    return mode, exp


def adversarial_generator_loss(disc_out: torch.Tensor, batch_size: int) -> torch.Tensor:
    """LSGAN generator term ``sum (D(pred) - 1)^2 / B`` over all B*S samples (ProHMR's normalisation)."""
    return ((disc_out - 1.0) ** 2).sum() / batch_size


def discriminator_loss(disc_fake: torch.Tensor, disc_real: torch.Tensor) -> torch.Tensor:
    """LSGAN discriminator term: ``sum D(fake)^2 / N_fake + sum (D(real) - 1)^2 / N_real``."""
    return (disc_fake ** 2).sum() / disc_fake.shape[0] + ((disc_real - 1.0) ** 2).sum() / disc_real.shape[0]
