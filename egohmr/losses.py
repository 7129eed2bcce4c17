"""Stage-2 training losses, all computed on the single-step x0 prediction decoded to SMPL.

There is no loss in diffusion space. Each term function returns a scalar; :func:`compute_losses` weighs them with the
model's ``loss_weights`` and, in eval mode, also sums the visible-joint errors used for model selection.
"""
from __future__ import annotations

from typing import Dict

import torch

from egohmr import collision
from egohmr.visibility import in_image_mask
from utils.body_model import NUM_SMPL_JOINTS, SMPL_TO_OPENPOSE
from utils.geometry import aa_to_rotmat

# The original train_egohmr.py defaults.
DEFAULT_LOSS_WEIGHTS = dict(v2v=0.5, keypoints_3d=0.05, keypoints_3d_full=0.02, keypoints_2d_full=0.01,
                            betas=0.0005, body_pose=0.001, global_orient=0.001, pose_6d_ortho=0.1,
                            coap_penetration=0.0002)
# OpenPose joints ignored by the full-image 2D loss (neck, hips).
IGNORED_OPENPOSE_JOINTS = (1, 9, 12)
LOSS_NAMES = tuple(DEFAULT_LOSS_WEIGHTS)


def keypoint_2d_loss(pred: torch.Tensor, gt: torch.Tensor, ignore=IGNORED_OPENPOSE_JOINTS) -> torch.Tensor:
    """Per-sample ``sum_j,xy conf_j |pred - gt|`` ``[B]``; ``gt [B,J,3]`` carries the confidence; ``ignore`` -> 0."""
    conf = gt[:, :, 2:3].clone()
    conf[:, list(ignore)] = 0
    return (conf * (pred - gt[:, :, :2]).abs()).sum(dim=(1, 2))


def keypoint_3d_loss(pred: torch.Tensor, gt: torch.Tensor, pelvis_align: bool = False) -> torch.Tensor:
    """Per-sample ``sum_j,xyz |pred - gt|`` ``[B]``, optionally after subtracting joint 0 from each."""
    if pelvis_align:
        pred = pred - pred[:, :1]
        gt = gt - gt[:, :1]
    return (pred - gt).abs().sum(dim=(1, 2))


def v2v_loss(pred_vertices, pred_pelvis, gt_vertices, gt_pelvis) -> torch.Tensor:
    """Mean L1 over B x V x 3 of pelvis-aligned vertices (pelvis ``[B,3]``)."""
    return ((pred_vertices - pred_pelvis[:, None]) - (gt_vertices - gt_pelvis[:, None])).abs().mean()


def sum_squared_error_per_sample(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """``sum (pred - gt)^2 / B`` (the original's parameter loss)."""
    return ((pred - gt) ** 2).sum() / pred.shape[0]


def pose_6d_ortho_loss(pose_6d: torch.Tensor) -> torch.Tensor:
    """Mean of ``(A^T A - I2)^2`` with ``A = [c1 c2]`` the 3x2 matrices of the de-normalised diffusion-layout 6D."""
    a = pose_6d.reshape(-1, 3, 2)
    eye = torch.eye(2, dtype=a.dtype, device=a.device)
    return ((a.transpose(1, 2) @ a - eye) ** 2).mean()


def visible_joint_error_sum(pred_joints, gt_joints, gt_joints_cam, focal_px, cam_center):
    """(sum of pelvis-aligned per-joint L2 over eval-visible joints, number of visible joints).

    Visible = the GT joint (``gt_joints_cam``, camera frame) projects inside 1920x1080.
    """
    visible = in_image_mask(gt_joints_cam, focal_px, cam_center)
    err = ((pred_joints - pred_joints[:, :1]) - (gt_joints - gt_joints[:, :1])).norm(dim=-1)
    return (err * visible).sum(), visible.sum()


def compute_losses(model, batch: Dict, output: Dict, cur_epoch: int = 0) -> torch.Tensor:
    """All stage-2 loss terms and their weighted sum (see module docstring)."""
    pred_joints = output['pred_keypoints_3d'][:, :NUM_SMPL_JOINTS]
    pred_joints_full = output['pred_keypoints_3d_full'][:, :NUM_SMPL_JOINTS]
    pred_kp2d = output['pred_keypoints_2d_full'][:, SMPL_TO_OPENPOSE]
    pred_params = output['pred_smpl_params']
    gt_params = dict(batch['smpl_params'])
    if 'gt_transl' in batch:       # test-time: the input transl was replaced by the stage-1 one
        gt_params['transl'] = batch['gt_transl']
    bs = pred_joints.shape[0]

    terms = {
        'keypoints_2d_full': keypoint_2d_loss(pred_kp2d, batch['orig_keypoints_2d'].float()).mean(),
        'keypoints_3d': keypoint_3d_loss(pred_joints, batch['keypoints_3d'].float(), pelvis_align=True).mean(),
        'keypoints_3d_full': keypoint_3d_loss(pred_joints_full, batch['keypoints_3d_full'].float()).mean(),
    }
    gt_vertices, gt_joints = model.gt_smpl_output(gt_params, batch['gender'])
    terms['v2v'] = v2v_loss(output['pred_vertices'], pred_joints[:, 0], gt_vertices, gt_joints[:, 0])
    gt_rot = {'global_orient': aa_to_rotmat(gt_params['global_orient'].float().reshape(bs, 1, 3)),
              'body_pose': aa_to_rotmat(gt_params['body_pose'].float().reshape(bs, -1, 3))}
    terms['betas'] = sum_squared_error_per_sample(pred_params['betas'], gt_params['betas'].float())
    terms['body_pose'] = sum_squared_error_per_sample(pred_params['body_pose'], gt_rot['body_pose'])
    terms['global_orient'] = sum_squared_error_per_sample(pred_params['global_orient'], gt_rot['global_orient'])
    terms['pose_6d_ortho'] = pose_6d_ortho_loss(output['pred_pose_6d'])
    terms['coap_penetration'] = pred_joints.new_zeros(())
    if model.loss_weights['coap_penetration'] > 0 and cur_epoch >= model.start_coap_epoch and model.coap is not None:
        per_sample = collision.penetration_loss(model.coap, output['condition']['scene_points'],
                                                output['pred_vertices'], output['pred_keypoints_3d'],
                                                output['pred_rotmats'], max_point_index=collision.TRAIN_POINT_CAP)
        terms['coap_penetration'] = per_sample.mean()

    loss = sum(model.loss_weights[name] * value for name, value in terms.items())
    losses = {'loss': loss.detach()}
    losses.update({f'loss_{name}': value.detach() for name, value in terms.items()})
    # The original returns this key in training too, as 0; logs and loss-dict readers see the same keys.
    losses['loss_keypoints_3d_vis_batch_sum'] = pred_joints.new_zeros(())
    if not model.training:
        focal, center = model.camera_intrinsics(batch)
        vis_sum, vis_num = visible_joint_error_sum(pred_joints, batch['keypoints_3d'].float(),
                                                   gt_joints[:, :NUM_SMPL_JOINTS], focal[:, 0], center)
        losses['loss_keypoints_3d_vis_batch_sum'] = vis_sum.detach()
        output['joint_vis_num_batch'] = vis_num.detach()
    output['losses'] = losses
    return loss
