"""ProHMR-scene: the stage-1 network (ProHMR with a scene encoder, as EgoHMR's).

image --ResNet-50--> 2048 ┐
scene points --ResNet-PointNet--> 512 ├─ context (2566) ─┬─ conditional Glow --> 144-d 6D pose (S samples, mode first)
camera / box features (6) ┘ └─ FC head --> betas, crop camera (s, tx, ty)

The neutral SMPL turns pose and betas into 45 joints and 6890 vertices; the crop camera gives the full-image
translation (``convert_pare_to_full_img_cam``), the global 3D joints and their 2D projections.

``state_dict()`` keys and shapes equal the original's (``manifests/stage1_prohmr_scene.tsv``).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from prohmr_scene import losses as L
from backbones.resnet import resnet50_backbone
from prohmr_scene.discriminator import Discriminator
from prohmr_scene.heads import SMPLFlowHead
from utils.body_model import NUM_SMPL_JOINTS, SMPL_TO_OPENPOSE, create_smpl, resolve_data_path
from utils.camera import IMAGE_CENTER, camera_features, normalise_full_image_points
from utils.geometry import aa_to_rotmat, convert_pare_to_full_img_cam, perspective_projection, rotmat_to_rot6d
from backbones.pointnet import SCENE_SLICE_POINTS, ResnetPointnet

PELVIS = 0


class ProHMRScene(nn.Module):
    """Stage-1 probabilistic body regressor conditioned on the egocentric image crop and the scene point cloud.

    Args:
        cfg: yacs config (``configs/prohmr.yaml``): ``TRAIN.NUM_TRAIN_SAMPLES/NUM_TEST_SAMPLES``,
            ``LOSS_WEIGHTS``, ``SMPL.MEAN_PARAMS``, ``MODEL.*``, ``CAM.FX_NORM_COEFF``, ``EXTRA.FOCAL_LENGTH``.
        data_dir: folder with ``smpl/smpl/SMPL_*.pkl`` and the mean parameters.
        device: move the model there after construction (None: stay on the CPU).
        with_focal_length / with_bbox_info / with_cam_center: which camera features enter the context.
        scene_feat_dim: scene encoder output size (512).
        scene_cano: subtract the GT ``transl`` from the scene points (off in stage 1; leaks GT at test).
        with_full_2d_loss: use the full-image 2D keypoint loss instead of the crop one.
        with_global_3d_loss: add the global (non-aligned) 3D joint loss.
    """

    def __init__(self, cfg, data_dir: str = 'data', device=None, with_focal_length: bool = True,
                 with_bbox_info: bool = True, with_cam_center: bool = True, scene_feat_dim: int = 512,
                 scene_cano: bool = False, with_full_2d_loss: bool = True, with_global_3d_loss: bool = True):
        super().__init__()
        self.cfg = cfg
        self.with_focal_length = with_focal_length
        self.with_bbox_info = with_bbox_info
        self.with_cam_center = with_cam_center
        self.scene_cano = scene_cano
        self.with_full_2d_loss = with_full_2d_loss
        self.with_global_3d_loss = with_global_3d_loss
        self.image_size = int(cfg.MODEL.IMAGE_SIZE)
        self.fx_norm_coeff = float(cfg.CAM.FX_NORM_COEFF)

        # Top-level ActNorm data-initialisation flag: the first state_dict key.
        self.register_buffer('initialized', torch.tensor(False, dtype=torch.bool))
        self.backbone = resnet50_backbone()
        context_dim = (int(cfg.MODEL.BACKBONE.OUT_CHANNELS) + scene_feat_dim + int(with_focal_length)
                       + 3 * int(with_bbox_info) + 2 * int(with_cam_center))
        self.context_dim = context_dim
        flow_cfg = cfg.MODEL.FLOW
        self.flow = SMPLFlowHead(context_dim, resolve_data_path(cfg.SMPL.MEAN_PARAMS, data_dir),
                                 pose_dim=int(flow_cfg.DIM), hidden_features=int(flow_cfg.LAYER_HIDDEN_FEATURES),
                                 num_layers=int(flow_cfg.NUM_LAYERS),
                                 num_blocks_per_layer=int(flow_cfg.LAYER_DEPTH),
                                 fc_hidden=int(cfg.MODEL.FC_HEAD.NUM_FEATURES))
        self.scene_enc = ResnetPointnet(out_dim=scene_feat_dim, hidden_dim=256, pos_layer_name='fc_pos_0',
                                        slice_points=SCENE_SLICE_POINTS)
        self.discriminator = Discriminator()
        self.smpl = create_smpl(data_dir, 'neutral')
        self.smpl_male = create_smpl(data_dir, 'male')
        self.smpl_female = create_smpl(data_dir, 'female')
        if device is not None:
            self.to(device)

    # ------------------------------------------------------------------------------------------------------------
    # camera and context
    # ------------------------------------------------------------------------------------------------------------
    def focal_length(self, batch: Dict) -> torch.Tensor:
        """Focal length in pixels ``[B]``: ``fx * 1500`` (or the fixed ``EXTRA.FOCAL_LENGTH``)."""
        fx = batch['fx'].float()
        if self.with_focal_length:
            return fx * self.fx_norm_coeff
        return torch.full_like(fx, float(self.cfg.EXTRA.FOCAL_LENGTH))

    def camera_center(self, batch: Dict) -> torch.Tensor:
        """Principal point in pixels ``[B, 2]`` (the fixed image centre without ``with_focal_length``)."""
        if self.with_focal_length:
            return torch.stack([batch['cam_cx'].float(), batch['cam_cy'].float()], dim=-1)
        return batch['fx'].new_tensor(IMAGE_CENTER).float().expand(batch['fx'].shape[0], 2)

    def conditioning(self, batch: Dict) -> torch.Tensor:
        """Context ``[B, 2566]`` = [cam_cx/f, cam_cy/f, box_cx/f, box_cy/f, box_size/f, fx, image(2048), scene(512)]."""
        parts = [camera_features(batch, self.focal_length(batch), self.with_cam_center, self.with_bbox_info,
                                 self.with_focal_length)]
        parts.append(self.backbone(batch['img']))
        points = batch['scene_pcd_verts_full'].float()
        if self.scene_cano:
            points = points - batch['smpl_params']['transl'].float()[:, None]
        parts.append(self.scene_enc(points))
        return torch.cat(parts, dim=-1)

    # ------------------------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------------------------
    @staticmethod
    def gt_pose_6d(smpl_params: Dict) -> torch.Tensor:
        """GT axis-angle pose -> ProHMR-layout 6D ``[B, 1, 144]``."""
        pose = torch.cat([smpl_params['global_orient'], smpl_params['body_pose']], dim=-1).float()
        rotmats = aa_to_rotmat(pose.reshape(pose.shape[0], -1, 3))
        return rotmat_to_rot6d(rotmats, mode='prohmr').reshape(pose.shape[0], 1, -1)

    def initialize_actnorm(self, batch: Dict, context: torch.Tensor) -> None:
        """ActNorm data initialisation from the GT poses of this batch (only ActNorms in train mode change)."""
        with torch.no_grad():
            self.flow.log_prob(self.gt_pose_6d(batch['smpl_params']), context)
        self.initialized.fill_(True)

    def forward_step(self, batch: Dict, train: bool = False, sample_seed: Optional[int] = None) -> Dict:
        """Run the network on a batch; returns the output dict of ``manifests/stage1_forward_io.json``.

        ``sample_seed``: the random samples 1..S-1 of frame ``f`` draw their z from the per-frame stream
        ``(seed, f, s, 'flow_noise')`` (:mod:`utils.frame_rng`; needs ``batch['frame_index']``), so they do not
        depend on the batch; None: one ``randn`` on the global stream (training, and the original).
        """
        num_samples = int(self.cfg.TRAIN.NUM_TRAIN_SAMPLES if train else self.cfg.TRAIN.NUM_TEST_SAMPLES)
        context = self.conditioning(batch)
        batch_size = context.shape[0]
        if not bool(self.initialized):
            self.initialize_actnorm(batch, context)
        noise = None
        if sample_seed is not None and num_samples > 1:
            from utils.frame_rng import RowStreams, frame_indices
            frames = frame_indices(batch)
            if frames is None:
                raise ValueError("per-frame sampling streams need the batch's 'frame_index' (EgoBodyDataset items)")
            streams = RowStreams.frame_major(sample_seed, frames, 1, num_samples - 1)
            noise = streams.randn(self.flow.pose_dim, 'flow_noise', device=context.device, dtype=context.dtype)
            noise = noise.reshape(batch_size, num_samples - 1, -1)
        pred = self.flow.sample_with_mode(context, num_samples, noise=noise)

        smpl_out = self.smpl(global_orient=pred['global_orient'].reshape(-1, 1, 3, 3),
                             body_pose=pred['body_pose'].reshape(-1, 23, 3, 3),
                             betas=pred['betas'].reshape(-1, pred['betas'].shape[-1]), pose2rot=False)
        joints = smpl_out.joints.reshape(batch_size, num_samples, -1, 3)
        vertices = smpl_out.vertices.reshape(batch_size, num_samples, -1, 3)

        cam = pred['cam']
        focal = self.focal_length(batch)
        center = self.camera_center(batch)
        focal_bs = focal[:, None].expand(-1, num_samples)
        pred_cam_t = torch.stack([cam[..., 1], cam[..., 2],
                                  2.0 * focal_bs / (self.image_size * cam[..., 0] + 1e-9)], dim=-1)

        def per_sample(x):  # [B, ...] -> [B*S, ...], each row repeated S times
            return x.repeat_interleave(num_samples, dim=0)

        cam_t_full = convert_pare_to_full_img_cam(
            cam.reshape(-1, 3), bbox_height=per_sample(batch['box_size'].float()),
            bbox_center=per_sample(batch['box_center'].float()), img_w=per_sample(2.0 * center[:, 0]),
            img_h=per_sample(2.0 * center[:, 1]), focal_length=per_sample(focal)).view(batch_size, num_samples, 3)

        flat_joints = joints.reshape(batch_size * num_samples, -1, 3)
        focal_xy = per_sample(torch.stack([focal, focal], dim=-1))
        kp2d_full = perspective_projection(flat_joints, cam_t_full.reshape(-1, 3), focal_xy, per_sample(center))
        kp2d_full = normalise_full_image_points(kp2d_full)
        kp2d_crop = perspective_projection(flat_joints, pred_cam_t.reshape(-1, 3), focal_xy,
                                           torch.zeros_like(focal_xy)) / self.image_size
        return {
            'pred_cam': cam,
            'pred_smpl_params': {'global_orient': pred['global_orient'], 'body_pose': pred['body_pose'],
                                 'betas': pred['betas']},
            'log_prob': pred['log_prob'],
            'conditioning_feats': context,
            'pred_pose_6d': pred['pred_pose_6d'],
            'pred_keypoints_3d': joints,
            'pred_vertices': vertices,
            'pred_cam_t': pred_cam_t,
            'pred_keypoints_3d_full': joints + cam_t_full[:, :, None],
            'pred_keypoints_2d_full': kp2d_full.view(batch_size, num_samples, -1, 2),
            'pred_cam_t_full': cam_t_full,
            'pred_keypoints_2d': kp2d_crop.view(batch_size, num_samples, -1, 2),
        }

    def forward(self, batch: Dict) -> Dict:
        return self.forward_step(batch, train=False)

    # ------------------------------------------------------------------------------------------------------------
    # ground truth and losses
    # ------------------------------------------------------------------------------------------------------------
    def gt_smpl_output(self, batch: Dict) -> Tuple[torch.Tensor, torch.Tensor]:
        """GT ``(joints [B,45,3], vertices [B,6890,3])`` in the PV frame from the gender-matched SMPL.

        Each body runs once, through the male (gender 0) or female (any other code) model.
        """
        params = batch['smpl_params']
        gender = batch['gender'].reshape(-1).long()
        joints = vertices = None
        for model, select in ((self.smpl_male, gender == 0), (self.smpl_female, gender != 0)):
            idx = select.nonzero(as_tuple=True)[0]
            if idx.numel() == 0:
                continue
            out = model(global_orient=params['global_orient'][idx].float(),
                        body_pose=params['body_pose'][idx].float(), betas=params['betas'][idx].float(),
                        transl=params['transl'][idx].float())
            if joints is None:
                joints = out.joints.new_zeros((gender.shape[0],) + out.joints.shape[1:])
                vertices = out.vertices.new_zeros((gender.shape[0],) + out.vertices.shape[1:])
            joints[idx] = out.joints
            vertices[idx] = out.vertices
        return joints, vertices

    def compute_loss(self, batch: Dict, output: Dict, train: bool = True) -> Tuple[torch.Tensor, Dict]:
        """Weighted stage-1 loss (without the adversarial term) and a dict of its detached components."""
        w = self.cfg.LOSS_WEIGHTS
        gt_params = batch['smpl_params']
        has_params = batch['has_smpl_params']
        pred_params = output['pred_smpl_params']

        gt_joints_smpl, gt_vertices = self.gt_smpl_output(batch)
        gt_joints_pv = batch['keypoints_3d_full'].float()
        joints24 = output['pred_keypoints_3d'][:, :, :NUM_SMPL_JOINTS]

        per_sample = {
            'keypoints_2d': L.keypoint_2d_loss(output['pred_keypoints_2d'][:, :, SMPL_TO_OPENPOSE],
                                               batch['keypoints_2d'].float()),
            'keypoints_2d_full': L.keypoint_2d_loss(output['pred_keypoints_2d_full'][:, :, SMPL_TO_OPENPOSE],
                                                    batch['orig_keypoints_2d'].float()),
            'keypoints_3d': L.keypoint_3d_loss(joints24, batch['keypoints_3d'].float(), pelvis_id=PELVIS),
            'keypoints_3d_full': L.keypoint_3d_loss(output['pred_keypoints_3d_full'][:, :, :NUM_SMPL_JOINTS],
                                                    gt_joints_pv),
            'v2v': L.vertex_loss(output['pred_vertices'], output['pred_keypoints_3d'][:, :, PELVIS],
                                 gt_vertices, gt_joints_smpl[:, PELVIS]),
            'global_orient': L.parameter_loss(pred_params['global_orient'],
                                              aa_to_rotmat(gt_params['global_orient'].float()),
                                              has_params['global_orient']),
            'body_pose': L.parameter_loss(pred_params['body_pose'],
                                          aa_to_rotmat(gt_params['body_pose'].float().reshape(-1, 23, 3)),
                                          has_params['body_pose']),
            'betas': L.parameter_loss(pred_params['betas'], gt_params['betas'].float(), has_params['betas']),
        }
        terms = {}
        for name, value in per_sample.items():
            terms[f'loss_{name}_mode'], terms[f'loss_{name}_exp'] = L.split_mode_exp(value)
        terms['loss_pose_6d_mode'], terms['loss_pose_6d_exp'] = L.orthonormality_mode_exp(output['pred_pose_6d'])
        terms['loss_nll'] = -self.flow.log_prob(self._nll_target(gt_params, train),
                                                output['conditioning_feats']).mean()

        use_crop_2d = 1.0 - float(self.with_full_2d_loss)
        use_full_2d = float(self.with_full_2d_loss)
        use_global_3d = float(self.with_global_3d_loss)
        weighted = [
            (w.KEYPOINTS_2D_MODE * use_crop_2d, 'loss_keypoints_2d_mode'),
            (w.KEYPOINTS_2D_EXP * use_crop_2d, 'loss_keypoints_2d_exp'),
            (w.KEYPOINTS_2D_FULL_MODE * use_full_2d, 'loss_keypoints_2d_full_mode'),
            (w.KEYPOINTS_2D_FULL_EXP * use_full_2d, 'loss_keypoints_2d_full_exp'),
            (w.KEYPOINTS_3D_MODE, 'loss_keypoints_3d_mode'),
            (w.KEYPOINTS_3D_EXP, 'loss_keypoints_3d_exp'),
            (w.KEYPOINTS_3D_FULL_MODE * use_global_3d, 'loss_keypoints_3d_full_mode'),
            (w.KEYPOINTS_3D_FULL_EXP * use_global_3d, 'loss_keypoints_3d_full_exp'),
            (w.V2V_MODE, 'loss_v2v_mode'), (w.V2V_EXP, 'loss_v2v_exp'),
            (w.GLOBAL_ORIENT_MODE, 'loss_global_orient_mode'), (w.GLOBAL_ORIENT_EXP, 'loss_global_orient_exp'),
            (w.BODY_POSE_MODE, 'loss_body_pose_mode'), (w.BODY_POSE_EXP, 'loss_body_pose_exp'),
            (w.BETAS_MODE, 'loss_betas_mode'), (w.BETAS_EXP, 'loss_betas_exp'),
            (w.ORTHOGONAL, 'loss_pose_6d_mode'), (w.ORTHOGONAL, 'loss_pose_6d_exp'),
            (w.NLL, 'loss_nll'),
        ]
        loss = sum(float(weight) * terms[name] for weight, name in weighted)
        terms['loss'] = loss
        return loss, {k: v.detach() for k, v in terms.items()}

    def _nll_target(self, gt_params: Dict, train: bool) -> torch.Tensor:
        """GT pose in the ProHMR 6D layout ``[B, 1, 144]``; in training with N(0, 0.005^2) noise on the 6D values.

        As the original: the axis-angle GT is first converted to 6D (global_orient ``[B, 1, 6]``, body_pose
        ``[B, 1, 138]``), then each of global_orient, body_pose and betas ``[B, 1, 10]`` gets one ``randn_like`` in
        that order (the betas draw only advances the RNG: the flow sees the 144 pose dims).
        """
        target = self.gt_pose_6d(gt_params)
        if not train:
            return target
        ratio = float(self.cfg.TRAIN.SMPL_PARAM_NOISE_RATIO)
        global_orient, body_pose = target[..., :6], target[..., 6:]
        global_orient = global_orient + ratio * torch.randn_like(global_orient)
        body_pose = body_pose + ratio * torch.randn_like(body_pose)
        torch.randn_like(gt_params['betas'].float())  # the original noises betas too; the draw keeps its RNG order
        return torch.cat([global_orient, body_pose], dim=-1)

    def adversarial_loss(self, output: Dict) -> torch.Tensor:
        """Generator LSGAN term on all B*S predicted (body_pose, betas), divided by B."""
        pred = output['pred_smpl_params']
        batch_size = pred['betas'].shape[0]
        scores = self.discriminator(pred['body_pose'].reshape(-1, 23, 3, 3),
                                    pred['betas'].reshape(-1, pred['betas'].shape[-1]))
        return L.adversarial_generator_loss(scores, batch_size)

    def discriminator_loss(self, output: Dict, mocap_batch: Dict) -> torch.Tensor:
        """LSGAN discriminator loss: detached predictions as fake, MoCap (body_pose aa [N,69], betas) as real."""
        pred = output['pred_smpl_params']
        fake = self.discriminator(pred['body_pose'].detach().reshape(-1, 23, 3, 3),
                                  pred['betas'].detach().reshape(-1, pred['betas'].shape[-1]))
        real_pose = aa_to_rotmat(mocap_batch['body_pose'].float().reshape(-1, 23, 3))
        real = self.discriminator(real_pose, mocap_batch['betas'].float())
        return L.discriminator_loss(fake, real)

    def trainable_groups(self):
        """(generator parameters: backbone + flow + scene_enc, discriminator parameters)."""
        gen = [p for m in (self.backbone, self.flow, self.scene_enc) for p in m.parameters()]
        return gen, list(self.discriminator.parameters())
