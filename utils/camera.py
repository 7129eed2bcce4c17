"""Camera facts and camera terms both stages use.

EgoBody's egocentric (HoloLens PV) images and the master Kinect colour images are 1920x1080. The original
normalises full-image 2D keypoints by these constants whatever the real image size, and uses the image centre as
the principal point when the focal length is not an input; both are kept for parity.
"""
from __future__ import annotations

from typing import Dict

import torch

IMAGE_WIDTH, IMAGE_HEIGHT = 1920, 1080
IMAGE_SIZE = (IMAGE_WIDTH, IMAGE_HEIGHT)
IMAGE_CENTER = (IMAGE_WIDTH / 2, IMAGE_HEIGHT / 2)


def normalise_full_image_points(points_px: torch.Tensor) -> torch.Tensor:
    """Full-image pixels ``[..., 2]`` -> the original's normalised coordinates ``u/1920 - 0.5, v/1080 - 0.5``."""
    return points_px / points_px.new_tensor(IMAGE_SIZE) - 0.5


def camera_features(batch: Dict, focal_px: torch.Tensor, with_cam_center: bool, with_bbox_info: bool,
                    with_focal_length: bool) -> torch.Tensor:
    """The camera part of the condition, ``[B, k]``: the enabled ones of ``[cam_cx/f, cam_cy/f]``,
    ``[box_cx/f, box_cy/f, box_size/f]`` and the normalised focal length ``fx``, in this order (both stages).

    ``focal_px [B]``: the focal length in pixels each stage divides by.
    """
    focal = focal_px.float()[:, None]
    parts = []
    if with_cam_center:
        parts.append(torch.stack([batch['cam_cx'], batch['cam_cy']], dim=-1).float() / focal)
    if with_bbox_info:
        box = torch.cat([batch['box_center'].float(), batch['box_size'].float()[:, None]], dim=-1)
        parts.append(box / focal)
    if with_focal_length:
        parts.append(batch['fx'].float()[:, None])
    if not parts:
        return focal.new_zeros(focal.shape[0], 0)
    return torch.cat(parts, dim=-1)
