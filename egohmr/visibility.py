"""The two per-joint visibility notions of stage 2 (both as in the original).

* conditioning visibility (:func:`smpl_joint_visibility`): from OpenPose detection confidences, mapped to the 24 SMPL
  joints; it masks the per-joint image feature and, at test, selects the image-conditioned output in diffuse_fuse;
* evaluation visibility (:func:`in_image_mask`): a GT point counts as visible iff it projects inside 1920x1080.
"""
from __future__ import annotations

import torch

from utils.body_model import OPENPOSE_MIDHIP, OPENPOSE_TO_SMPL_TEST, OPENPOSE_TO_SMPL_TRAIN
from utils.camera import IMAGE_HEIGHT, IMAGE_WIDTH


def openpose_to_smpl_map(pelvis_vis_loosen: bool) -> list:
    """For each SMPL joint, the OpenPose joint deciding its visibility (train map, or the loosened test map)."""
    return list(OPENPOSE_TO_SMPL_TEST if pelvis_vis_loosen else OPENPOSE_TO_SMPL_TRAIN)


def smpl_joint_visibility(orig_keypoints_2d: torch.Tensor, pelvis_vis_loosen: bool) -> torch.Tensor:
    """``[B, 25, 3]`` OpenPose keypoints (confidence last) -> ``[B, 24]`` bool; MidHip is always visible."""
    if orig_keypoints_2d.dim() != 3 or orig_keypoints_2d.shape[1:] != (25, 3):
        raise ValueError(f"batch['orig_keypoints_2d'] must have shape [B,25,3], got {list(orig_keypoints_2d.shape)}")
    visible = orig_keypoints_2d[:, :, 2] > 0
    visible[:, OPENPOSE_MIDHIP] = True
    return visible[:, openpose_to_smpl_map(pelvis_vis_loosen)]


def in_image_mask(points: torch.Tensor, focal_px: torch.Tensor, cam_center: torch.Tensor,
                  width: int = IMAGE_WIDTH, height: int = IMAGE_HEIGHT) -> torch.Tensor:
    """Points ``[B, N, 3]`` in the camera frame -> ``[B, N]`` bool, True iff ``0 <= u < width`` and ``0 <= v < height``.

    ``focal_px [B]`` is used for both axes (as the original does); ``cam_center [B, 2]`` in pixels. There is no depth
    or occlusion test.
    """
    xy = points[..., :2] / points[..., 2:3]
    u = xy[..., 0] * focal_px[:, None] + cam_center[:, None, 0]
    v = xy[..., 1] * focal_px[:, None] + cam_center[:, None, 1]
    return (u >= 0) & (u < width) & (v >= 0) & (v < height)
