"""Rotations, camera projection and rigid transforms shared by both stages.

Conventions
-----------
* Rotation matrices act on column vectors; points are stored as rows, so a rigid transform
  ``T = [R | t]`` maps points with ``p' = p @ R.T + t`` (the semantics of open3d's ``transform``).
* Two 6D rotation layouts exist (checkpoints of each stage are tied to theirs). Both keep the first two *columns*
  ``c1 = R[:, 0]`` and ``c2 = R[:, 1]`` of ``R``:

  ``'prohmr'``     ``[R00, R10, R20, R01, R11, R21]`` = ``[c1, c2]`` (stage 1 flow)
  ``'diffusion'``  ``[R00, R01, R10, R11, R20, R21]`` (row-major 3x2, stage 2)
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# OpenGL PV camera <-> OpenCV PV camera (its own inverse).
ADD_TRANS = np.diag([1.0, -1.0, -1.0, 1.0])

ROT6D_MODES = ('prohmr', 'diffusion')


def aa_to_rotmat(axis_angle: torch.Tensor) -> torch.Tensor:
    """Axis-angle ``[..., 3]`` -> rotation matrices ``[..., 3, 3]`` (Rodrigues, safe at zero angle)."""
    shape = axis_angle.shape[:-1]
    aa = axis_angle.reshape(-1, 3)
    angle = torch.sqrt((aa * aa).sum(dim=-1, keepdim=True).clamp_min(1e-16))  # safe gradient at zero
    axis = aa / angle
    cos, sin = torch.cos(angle)[:, :, None], torch.sin(angle)[:, :, None]
    x, y, z = axis.unbind(-1)
    zeros = torch.zeros_like(x)
    skew = torch.stack([zeros, -z, y, z, zeros, -x, -y, x, zeros], dim=-1).view(-1, 3, 3)
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand_as(skew)
    rotmat = eye + sin * skew + (1.0 - cos) * torch.bmm(skew, skew)
    return rotmat.view(*shape, 3, 3)


def rotmat_to_quat(rotmat: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rotation matrices ``[..., 3, 3]`` -> unit quaternions ``[..., 4]`` in (w, x, y, z) order.

    Branches on the largest diagonal term for stability; differentiable everywhere it is defined.
    """
    shape = rotmat.shape[:-2]
    m = rotmat.reshape(-1, 3, 3)
    m00, m01, m02 = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    m10, m11, m12 = m[:, 1, 0], m[:, 1, 1], m[:, 1, 2]
    m20, m21, m22 = m[:, 2, 0], m[:, 2, 1], m[:, 2, 2]
    trace = m00 + m11 + m22
    candidates = torch.stack([
        torch.stack([1 + trace, m21 - m12, m02 - m20, m10 - m01], -1),
        torch.stack([m21 - m12, 1 + m00 - m11 - m22, m01 + m10, m02 + m20], -1),
        torch.stack([m02 - m20, m01 + m10, 1 - m00 + m11 - m22, m12 + m21], -1),
        torch.stack([m10 - m01, m02 + m20, m12 + m21, 1 - m00 - m11 + m22], -1),
    ], dim=1)  # [N, 4 candidates, 4]
    diag = torch.stack([trace, m00, m11, m22], dim=-1)
    best = diag.argmax(dim=-1)
    quat = candidates[torch.arange(m.shape[0], device=m.device), best]
    norm_sq = quat.gather(-1, best[:, None]).clamp_min(eps)
    quat = quat * (0.5 / torch.sqrt(norm_sq))
    quat = quat * torch.where(quat[:, :1] < 0, -1.0, 1.0)  # w >= 0
    return quat.view(*shape, 4)


def quat_to_aa(quat: torch.Tensor) -> torch.Tensor:
    """Quaternions ``[..., 4]`` (w, x, y, z) -> axis-angle ``[..., 3]``."""
    w, xyz = quat[..., :1], quat[..., 1:]
    sin_half = torch.linalg.norm(xyz, dim=-1, keepdim=True)
    angle = 2.0 * torch.atan2(sin_half, w)
    # angle / sin(angle/2) -> 2 as the angle goes to zero
    small = sin_half < 1e-6
    scale = torch.where(small, 2.0 / w.clamp_min(1e-6), angle / sin_half.clamp_min(1e-12))
    return xyz * scale


def rotmat_to_aa(rotmat: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[..., 3, 3]`` -> axis-angle ``[..., 3]`` (via quaternions, differentiable)."""
    return quat_to_aa(rotmat_to_quat(rotmat))


def _check_mode(mode: str) -> None:
    if mode not in ROT6D_MODES:
        raise ValueError(f"6D rotation layout must be one of {ROT6D_MODES}, got {mode!r}")


def rot6d_to_rotmat(x: torch.Tensor, mode: str = 'prohmr') -> torch.Tensor:
    """6D rotations ``[..., 6]`` (or ``[B, 6*J]``) -> rotation matrices ``[..., 3, 3]`` (``[B, J, 3, 3]``).

    Gram-Schmidt on the two stored columns: ``b1 = n(c1)``, ``b2 = n(c2 - (b1.c2) b1)``, ``b3 = b1 x b2``.
    """
    _check_mode(mode)
    if x.shape[-1] != 6:
        if x.shape[-1] % 6:
            raise ValueError(f"6D rotations need a last dimension divisible by 6, got shape {tuple(x.shape)}")
        x = x.reshape(*x.shape[:-1], -1, 6)
    if mode == 'prohmr':
        c1, c2 = x[..., 0:3], x[..., 3:6]
    else:
        pairs = x.reshape(*x.shape[:-1], 3, 2)
        c1, c2 = pairs[..., 0], pairs[..., 1]
    b1 = F.normalize(c1, dim=-1)
    b2 = F.normalize(c2 - (b1 * c2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


def rotmat_to_rot6d(rotmat: torch.Tensor, mode: str = 'prohmr') -> torch.Tensor:
    """Rotation matrices ``[..., 3, 3]`` -> 6D ``[..., 6]`` in the given layout."""
    _check_mode(mode)
    cols = rotmat[..., :, :2]  # [..., 3, 2]
    if mode == 'prohmr':
        return cols.transpose(-1, -2).reshape(*rotmat.shape[:-2], 6)
    return cols.reshape(*rotmat.shape[:-2], 6)


def perspective_projection(points: torch.Tensor, translation: torch.Tensor,
                           focal_length: torch.Tensor, camera_center: torch.Tensor) -> torch.Tensor:
    """Pinhole projection of ``points [B, N, 3] + translation [B, 3]``.

    ``focal_length`` and ``camera_center`` are ``[B, 2]`` (pixels). Returns pixels ``[B, N, 2]``.
    """
    cam_points = points + translation[:, None, :]
    xy = cam_points[..., :2] / cam_points[..., 2:3]
    return xy * focal_length[:, None, :] + camera_center[:, None, :]


def convert_pare_to_full_img_cam(pare_cam: torch.Tensor, bbox_height: torch.Tensor, bbox_center: torch.Tensor,
                                 img_w: torch.Tensor, img_h: torch.Tensor,
                                 focal_length: torch.Tensor) -> torch.Tensor:
    """Weak-perspective crop camera ``(s, tx, ty)`` -> translation in the full-image camera frame.

    ``tz = 2f/(s b)``, ``X = tx + 2(bcx - W/2)/(s b)``, ``Y = ty + 2(bcy - H/2)/(s b)`` (as the original); callers pass
    ``W = 2 cam_cx`` and ``H = 2 cam_cy`` so the offset is taken from the principal point.
    """
    s, tx, ty = pare_cam[:, 0], pare_cam[:, 1], pare_cam[:, 2]
    sb = s * bbox_height
    tz = 2.0 * focal_length / sb
    x = tx + 2.0 * (bbox_center[:, 0] - img_w / 2.0) / sb
    y = ty + 2.0 * (bbox_center[:, 1] - img_h / 2.0) / sb
    return torch.stack([x, y, tz], dim=-1)


def transform_points(points, transform):
    """Apply a 4x4 rigid transform to row-vector points ``[..., N, 3]`` (numpy or torch, batched or not)."""
    if isinstance(points, torch.Tensor):
        transform = torch.as_tensor(transform, dtype=points.dtype, device=points.device)
        return points @ transform[..., :3, :3].transpose(-1, -2) + transform[..., None, :3, 3]
    transform = np.asarray(transform)
    return points @ np.swapaxes(transform[..., :3, :3], -1, -2) + transform[..., None, :3, 3]


def rotation_about_y(theta: float) -> np.ndarray:
    """3x3 rotation by ``theta`` radians about the +y (up) axis."""
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
