"""EgoHMR stage 2: a pose-diffusion denoiser conditioned on image, scene, translation and camera.

``model(batch, timesteps) -> dict`` predicts the clean normalised 144-d pose ``pred_x_start`` from
``batch['x_t']`` and decodes it to SMPL. Submodule names and registration order give the state_dict of
``manifests/stage2_egohmr.tsv``.

Condition caching: :meth:`EgoHMR.encode_condition` runs the image and scene encoders once; when ``batch['condition']``
holds its result, :meth:`EgoHMR.forward` reuses it instead of re-encoding, so a sampling chain encodes each image once.
:meth:`EgoHMR.sampling_condition` (eval mode) also caches the GCN input-layer projection of the condition channels, so
each denoising step only projects the x_t and timestep features.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn

from egohmr import losses as L
from egohmr.embeddings import (TIMESTEP_EMBED_DIM, BetasHead, PoseEmbedding, PositionalEncoding, TimestepEmbedder,
                               TranslEncoder)
from egohmr.gcn import ModulatedGCN
from egohmr.visibility import smpl_joint_visibility
from backbones.resnet import resnet50_backbone
from utils.body_model import NUM_SMPL_JOINTS, create_smpl, resolve_data_path
from utils.camera import IMAGE_CENTER, camera_features, normalise_full_image_points
from utils.geometry import aa_to_rotmat, perspective_projection, rot6d_to_rotmat, rotmat_to_rot6d
from utils.tensors import fp32_under_autocast
from backbones.pointnet import SCENE_SLICE_POINTS, ResnetPointnet

BODY_REP_DIM = 6 * NUM_SMPL_JOINTS   # 144
IMG_FEAT_DIM = 2048
TRANSL_FEAT_DIM = 128
POSE_EMBED_DIM = 512
# Batch key: True -> the forward returns only the pose prediction, the betas and the condition (no SMPL decoding);
# sampling chains set it for their steps and decode the final prediction once (:meth:`EgoHMR.decode`).
POSE_ONLY_KEY = 'pose_only'


def coap_available() -> bool:
    try:
        import egohmr.coap.model  # noqa: F401
        return True
    except ImportError:
        return False


def _as_stat_tensor(value, fill: float) -> torch.Tensor:
    if value is None:
        return torch.full((BODY_REP_DIM,), fill, dtype=torch.float32)
    tensor = torch.as_tensor(np.asarray(value.cpu() if isinstance(value, torch.Tensor) else value),
                             dtype=torch.float32).reshape(-1)
    if tensor.shape[0] != BODY_REP_DIM:
        raise ValueError(f"body representation statistics must have {BODY_REP_DIM} values, got {tensor.shape[0]}")
    return tensor


class EgoHMR(nn.Module):
    """The stage-2 denoiser.

    Args:
        cfg: yacs config (``CAM.FX_NORM_COEFF``, ``EXTRA.FOCAL_LENGTH``).
        data_dir: folder with ``smpl/smpl/SMPL_*.pkl``; ``cfg.SMPL.MEAN_PARAMS`` (``data/smpl_mean_params.npz``)
            is read from it as in stage 1.
        device: where to build the model (default: CPU; move later with ``.to``).
        body_rep_mean / body_rep_std: ``Xmean`` / ``Xstd`` [144] (numpy or torch); None -> 0 / 1. Kept as
            non-persistent buffers: they move with the model but are not in the state_dict.
        with_focal_length / with_bbox_info / with_cam_center: camera features in the condition. Without the focal
            length the projection uses f = ``EXTRA.FOCAL_LENGTH`` and centre (960, 540) (the original crashes).
        scene_feat_dim: scene code size (512). scene_type: recorded only ('cube' in stage 2).
        scene_cano: encode ``scene - transl`` (True) instead of the raw PV-frame points.
        weight_*: loss weights (0 = off; the training script passes the original's defaults).
        start_coap_epoch: first (0-based) epoch of the COAP penetration loss.
        cond_mask_prob / only_mask_img_cond: training-time condition dropout (see ``mask_cond``).
        pelvis_vis_loosen: use the loosened (test) OpenPose->SMPL visibility map.
        diffuse_fuse: at eval, run the scene-only pass too and keep the image-conditioned output at visible joints.
        with_coap: attach COAP as ``smpl.coap`` (frozen). None = when ``egohmr.coap`` exists.
        coap_checkpoint: optional ``.ckpt`` with COAP weights.
    """

    def __init__(self, cfg, data_dir: str = 'data', device=None, body_rep_mean=None, body_rep_std=None,
                 with_focal_length: bool = True, with_bbox_info: bool = True, with_cam_center: bool = True,
                 scene_feat_dim: int = 512, scene_type: str = 'cube', scene_cano: bool = True,
                 weight_loss_v2v: float = 0.0, weight_loss_keypoints_3d: float = 0.0,
                 weight_loss_keypoints_3d_full: float = 0.0, weight_loss_keypoints_2d_full: float = 0.0,
                 weight_loss_betas: float = 0.0, weight_loss_body_pose: float = 0.0,
                 weight_loss_global_orient: float = 0.0, weight_loss_pose_6d_ortho: float = 0.0,
                 weight_coap_penetration: float = 0.0, start_coap_epoch: int = 3,
                 cond_mask_prob: float = 0.0, only_mask_img_cond: bool = True,
                 diffusion_blk: int = 4, gcn_dropout: float = 0.0, gcn_hid_dim: int = 1024,
                 pelvis_vis_loosen: bool = False, diffuse_fuse: bool = False,
                 with_coap: Optional[bool] = None, coap_checkpoint: Optional[str] = None):
        super().__init__()
        self.cfg = cfg
        self.with_focal_length = with_focal_length
        self.with_bbox_info = with_bbox_info
        self.with_cam_center = with_cam_center
        self.scene_type = scene_type
        self.scene_cano = scene_cano
        self.cond_mask_prob = float(cond_mask_prob)
        self.only_mask_img_cond = only_mask_img_cond
        self.pelvis_vis_loosen = pelvis_vis_loosen
        self.diffuse_fuse = diffuse_fuse
        self.start_coap_epoch = int(start_coap_epoch)
        self.loss_weights = dict(v2v=weight_loss_v2v, keypoints_3d=weight_loss_keypoints_3d,
                                 keypoints_3d_full=weight_loss_keypoints_3d_full,
                                 keypoints_2d_full=weight_loss_keypoints_2d_full, betas=weight_loss_betas,
                                 body_pose=weight_loss_body_pose, global_orient=weight_loss_global_orient,
                                 pose_6d_ortho=weight_loss_pose_6d_ortho, coap_penetration=weight_coap_penetration)

        # Registration order = state_dict order of the manifest.
        self.input_process = PoseEmbedding(6, POSE_EMBED_DIM)
        self.sequence_pos_encoder = PositionalEncoding(TIMESTEP_EMBED_DIM, dropout=0.1)
        self.embed_timestep = TimestepEmbedder(TIMESTEP_EMBED_DIM, self.sequence_pos_encoder)
        self.backbone = resnet50_backbone()
        self.scene_enc = ResnetPointnet(out_dim=scene_feat_dim, hidden_dim=256, pos_layer_name='fc_pos_0',
                                        slice_points=SCENE_SLICE_POINTS)
        self.transl_enc = TranslEncoder(3, TRANSL_FEAT_DIM)
        self.cam_feat_dim = 2 * with_cam_center + 3 * with_bbox_info + 1 * with_focal_length
        self.cond_dim = IMG_FEAT_DIM + scene_feat_dim + TRANSL_FEAT_DIM + self.cam_feat_dim   # 2694
        self.diffusion_model = ModulatedGCN(in_dim=self.cond_dim + POSE_EMBED_DIM + TIMESTEP_EMBED_DIM,
                                            hid_dim=gcn_hid_dim, out_dim=6, num_layers=diffusion_blk,
                                            p_dropout=gcn_dropout)
        self.beta_layer = BetasHead(self.cond_dim, resolve_data_path(cfg.SMPL.MEAN_PARAMS, data_dir))
        self.smpl = create_smpl(data_dir, 'neutral')
        self.smpl_male = create_smpl(data_dir, 'male')
        self.smpl_female = create_smpl(data_dir, 'female')

        self.register_buffer('body_rep_mean', _as_stat_tensor(body_rep_mean, 0.0), persistent=False)
        self.register_buffer('body_rep_std', _as_stat_tensor(body_rep_std, 1.0), persistent=False)

        if with_coap is None:
            with_coap = coap_available()
        self.with_coap = bool(with_coap)
        if self.with_coap:
            self._attach_coap(coap_checkpoint)
        elif self.loss_weights['coap_penetration'] > 0:
            warnings.warn("EgoHMR built without COAP: the penetration loss is disabled", stacklevel=2)
        if device is not None:
            self.to(device)

    # ------------------------------------------------------------------------------------------------ setup
    @classmethod
    def from_config(cls, cfg, data_dir: str = 'data', body_rep_mean=None, body_rep_std=None, training: bool = True,
                    **test_settings) -> 'EgoHMR':
        """The network of a stage-2 config (``cfg.EGOHMR``, see ``configs/egohmr.yaml``).

        ``training``: the loss weights, condition dropout and visibility map of the config. Otherwise (testing) the
        losses are weighted 0, no condition is dropped, and ``test_settings`` give ``pelvis_vis_loosen``,
        ``diffuse_fuse``, ``with_coap`` (the test script's flags).
        """
        s = cfg.EGOHMR
        weights = {('weight_coap_penetration' if k == 'COAP_PENETRATION' else f'weight_loss_{k.lower()}'): float(v)
                   for k, v in s.LOSS_WEIGHTS.items()} if training else {}
        kwargs = dict(with_focal_length=s.WITH_FOCAL_LENGTH, with_bbox_info=s.WITH_BBOX_INFO,
                      with_cam_center=s.WITH_CAM_CENTER, scene_feat_dim=s.SCENE_FEAT_DIM, scene_type=s.SCENE_TYPE,
                      scene_cano=s.SCENE_CANO, start_coap_epoch=s.START_COAP_EPOCH,
                      cond_mask_prob=s.COND_MASK_PROB if training else 0.0, only_mask_img_cond=s.ONLY_MASK_IMG_COND,
                      diffusion_blk=s.DIFFUSION_BLK, gcn_dropout=s.GCN_DROPOUT, gcn_hid_dim=s.GCN_HID_DIM,
                      pelvis_vis_loosen=s.PELVIS_VIS_LOOSEN, diffuse_fuse=False, **weights)
        kwargs.update(test_settings)
        return cls(cfg, data_dir=data_dir, body_rep_mean=body_rep_mean, body_rep_std=body_rep_std, **kwargs)

    def _attach_coap(self, checkpoint: Optional[str]) -> None:
        try:
            from egohmr.coap.model import attach_coap
        except ImportError as exc:
            raise ImportError(f"with_coap=True needs the egohmr.coap package ({exc})") from exc
        attach_coap(self.smpl, checkpoint=checkpoint, frozen=True)
        self.smpl.coap.eval()

    @property
    def coap(self):
        """The frozen COAP body model, or None."""
        return getattr(self.smpl, 'coap', None) if self.with_coap else None

    @property
    def device(self) -> torch.device:
        return self.body_rep_mean.device

    def train(self, mode: bool = True):
        """Train/eval mode for the learned parts; COAP always stays frozen in eval mode."""
        super().train(mode)
        if self.coap is not None:
            self.coap.eval()
        return self

    def trainable_modules(self) -> list:
        """The submodules the optimiser updates (COAP and the SMPL models are excluded)."""
        return [self.backbone, self.scene_enc, self.transl_enc, self.beta_layer, self.diffusion_model,
                self.embed_timestep, self.input_process]

    def trainable_parameters(self) -> list:
        params, seen = [], set()
        for module in self.trainable_modules():
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def set_body_rep_stats(self, mean, std) -> None:
        self.body_rep_mean.copy_(_as_stat_tensor(mean, 0.0).to(self.device))
        self.body_rep_std.copy_(_as_stat_tensor(std, 1.0).to(self.device))

    # ------------------------------------------------------------------------------------------------ body rep
    def normalize_pose(self, pose_6d: torch.Tensor) -> torch.Tensor:
        return (pose_6d - self.body_rep_mean) / self.body_rep_std

    def denormalize_pose(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.body_rep_std + self.body_rep_mean

    def x_start_from_smpl_params(self, smpl_params: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised diffusion variable ``[B, 144]`` of axis-angle ``global_orient [B,3]`` + ``body_pose [B,69]``."""
        full_pose = torch.cat([smpl_params['global_orient'], smpl_params['body_pose']], dim=1).float()
        rot6d = rotmat_to_rot6d(aa_to_rotmat(full_pose.reshape(-1, NUM_SMPL_JOINTS, 3)), mode='diffusion')
        return self.normalize_pose(rot6d.reshape(-1, BODY_REP_DIM))

    def rotmats_from_x(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, 144]`` -> rotation matrices ``[B, 24, 3, 3]``."""
        return rot6d_to_rotmat(self.denormalize_pose(x), mode='diffusion').reshape(-1, NUM_SMPL_JOINTS, 3, 3)

    # ------------------------------------------------------------------------------------------------ condition
    def camera_intrinsics(self, batch) -> tuple:
        """(focal length in pixels ``[B, 2]``, principal point ``[B, 2]``) used for projection."""
        bs = batch['fx'].shape[0]
        if self.with_focal_length:
            focal = (batch['fx'] * self.cfg.CAM.FX_NORM_COEFF)[:, None].repeat(1, 2)
            center = torch.stack([batch['cam_cx'], batch['cam_cy']], dim=-1)
        else:
            focal = torch.full((bs, 2), float(self.cfg.EXTRA.FOCAL_LENGTH), device=batch['fx'].device)
            center = torch.tensor(IMAGE_CENTER, device=batch['fx'].device).repeat(bs, 1)
        return focal.float(), center.float()

    def camera_features(self, batch) -> torch.Tensor:
        """``[cam_cx/f, cam_cy/f, box_cx/f, box_cy/f, box_size/f, fx_norm]`` (the enabled parts, in this order), all
        over the focal length ``fx * FX_NORM_COEFF`` in pixels (also without ``with_focal_length``, as the original)."""
        return camera_features(batch, batch['fx'].float() * self.cfg.CAM.FX_NORM_COEFF, self.with_cam_center,
                               self.with_bbox_info, self.with_focal_length)

    def canonical_scene(self, batch) -> torch.Tensor:
        """Scene points given to the encoder (and to COAP): ``scene - transl`` with ``scene_cano``."""
        scene = batch['scene_pcd_verts_full'].float()
        if self.scene_cano:
            scene = scene - batch['smpl_params']['transl'].float()[:, None, :]
        return scene

    def encode_condition(self, batch) -> Dict[str, torch.Tensor]:
        """Everything of the forward pass that does not depend on ``x_t`` or ``t``.

        Returns ``img_feat [B,2048]``, ``vis_mask_smpl [B,24]`` bool, ``scene_points [B,P,3]`` (canonical),
        ``scene_feat [B,512]``, ``transl [B,3]``, ``transl_feat [B,128]``, ``cam_feat [B,6]``.
        """
        transl = batch['smpl_params']['transl'].float()
        scene_points = self.canonical_scene(batch)
        return {
            'img_feat': self.backbone(batch['img'].float()),
            'vis_mask_smpl': smpl_joint_visibility(batch['orig_keypoints_2d'], self.pelvis_vis_loosen),
            'scene_points': scene_points,
            'scene_feat': self.scene_enc(scene_points),
            'transl': transl,
            'transl_feat': self.transl_enc(transl),
            'cam_feat': self.camera_features(batch),
        }

    def sampling_condition(self, batch) -> Dict[str, torch.Tensor]:
        """:meth:`encode_condition` plus the GCN input-layer projections of the (constant) condition channels.

        For eval-mode sampling: ``gcn_cond_self/neigh`` project ``[img * vis, scene, transl, cam]`` and
        ``gcn_scene_self/neigh`` the image-masked condition of diffuse_fuse; each denoising step then only projects
        the x_t and timestep features. Valid while the weights do not change.
        """
        cond = self.encode_condition(batch)
        img = cond['img_feat'][:, None, :] * cond['vis_mask_smpl'][..., None].to(cond['img_feat'].dtype)
        shared = torch.cat([cond['scene_feat'], cond['transl_feat'], cond['cam_feat']], dim=-1)[:, None, :]
        img_self, img_neigh = self.diffusion_model.project_leading(img)
        gconv = self.diffusion_model.gconv_input[0].gconv
        shared_self, shared_neigh = gconv.project(shared, IMG_FEAT_DIM, self.cond_dim)
        shared_self = shared_self.expand(-1, NUM_SMPL_JOINTS, -1)
        shared_neigh = shared_neigh.expand(-1, NUM_SMPL_JOINTS, -1)
        cond.update(gcn_cond_self=img_self + shared_self, gcn_cond_neigh=img_neigh + shared_neigh,
                    gcn_scene_self=shared_self, gcn_scene_neigh=shared_neigh)
        return cond

    def joint_condition(self, cond: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-joint condition ``[B, 24, 2694]``: ``[img * vis, scene, transl, cam]``."""
        img = cond['img_feat'][:, None, :] * cond['vis_mask_smpl'][..., None].to(cond['img_feat'].dtype)
        shared = torch.cat([cond['scene_feat'], cond['transl_feat'], cond['cam_feat']], dim=-1)
        return torch.cat([img, shared[:, None, :].expand(-1, NUM_SMPL_JOINTS, -1)], dim=-1)

    def mask_cond(self, cond: torch.Tensor, force_mask: bool = False) -> torch.Tensor:
        """Condition dropout, as the original's ``mask_cond``.

        ``force_mask``: zero the image dims of every sample (or everything without ``only_mask_img_cond``).
        Training with ``cond_mask_prob > 0``: the same for a Bernoulli(``cond_mask_prob``) subset of samples.
        """
        if force_mask:
            drop = torch.ones(cond.shape[0], dtype=torch.bool, device=cond.device)
        elif self.training and self.cond_mask_prob > 0:
            drop = torch.bernoulli(torch.full((cond.shape[0],), self.cond_mask_prob, device=cond.device)).bool()
        else:
            return cond
        keep = torch.ones_like(cond[:1, :1, :])
        if self.only_mask_img_cond:
            keep[..., :IMG_FEAT_DIM] = 0
        else:
            keep.zero_()
        return torch.where(drop[:, None, None], cond * keep, cond)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, batch, timesteps: torch.Tensor, x_t: Optional[torch.Tensor] = None) -> Dict:
        """Denoise ``x_t [B,144]`` (default ``batch['x_t']``) at original timesteps ``[B]``; see the module
        docstring for caching. Nothing is written into ``batch``.

        Returns ``pred_x_start``, ``pred_smpl_params`` (rotation matrices, betas), ``pred_pose_6d``,
        ``pred_keypoints_3d``, ``pred_vertices``, ``pred_keypoints_3d_full``, ``pred_keypoints_2d_full`` (manifest
        shapes) plus ``pred_rotmats [B,24,3,3]``, ``vis_mask_smpl [B,24]`` (the original writes it into the batch)
        and ``condition``. With ``batch[POSE_ONLY_KEY]`` only ``pred_x_start``, ``pred_smpl_params['betas']``,
        ``vis_mask_smpl`` and ``condition`` (what a sampling step and the guidance need).
        """
        cond = batch.get('condition')
        if cond is None:
            cond = self.encode_condition(batch)
        if x_t is None:
            x_t = batch['x_t']
        bs = x_t.shape[0]
        x_feat = self.input_process(x_t.reshape(bs, NUM_SMPL_JOINTS, 6).float())
        t_feat = self.embed_timestep(timesteps)[:, None, :].expand(-1, NUM_SMPL_JOINTS, -1)
        fuse = self.diffuse_fuse and not self.training
        if 'gcn_cond_self' in cond and not self.training:
            pred = self._predict_from_projection(cond, torch.cat([x_feat, t_feat], dim=-1), fuse)
        elif fuse:
            pred = self._fused_prediction(self.joint_condition(cond), x_feat, t_feat, cond['vis_mask_smpl'])
        else:
            joint_cond = self.mask_cond(self.joint_condition(cond))
            pred = self.diffusion_model(torch.cat([joint_cond, x_feat, t_feat], dim=-1))
        if batch.get(POSE_ONLY_KEY, False):
            output = {'pred_x_start': pred.reshape(bs, BODY_REP_DIM),
                      'pred_smpl_params': {'betas': self.predict_betas(cond)}}
        else:
            output = self.decode(pred.reshape(bs, BODY_REP_DIM), cond, batch)
        output['vis_mask_smpl'] = cond['vis_mask_smpl']
        output['condition'] = cond
        return output

    def denoise(self, x_t: torch.Tensor, timesteps: torch.Tensor, batch) -> Dict:
        """The diffusion core's model contract ``model(x_t, t, **model_kwargs)``: :meth:`forward` with ``x_t``."""
        return self(batch, timesteps, x_t=x_t)

    def _fused_prediction(self, joint_cond, x_feat, t_feat, vis_mask) -> torch.Tensor:
        """diffuse_fuse (eval only): scene-only output, with the image-conditioned output at visible joints.

        Both passes go through the GCN as one batch (BatchNorm uses running statistics in eval mode, so this equals
        two separate calls).
        """
        bs = joint_cond.shape[0]
        both = torch.cat([torch.cat([joint_cond, x_feat, t_feat], dim=-1),
                          torch.cat([self.mask_cond(joint_cond, force_mask=True), x_feat, t_feat], dim=-1)], dim=0)
        out = self.diffusion_model(both)
        conditional, scene_only = out[:bs], out[bs:]
        return torch.where(vis_mask[..., None], conditional, scene_only)

    def _predict_from_projection(self, cond, dynamic: torch.Tensor, fuse: bool) -> torch.Tensor:
        """GCN output from the cached condition projections (:meth:`sampling_condition`); eval mode only."""
        if not fuse:
            return self.diffusion_model(dynamic, (cond['gcn_cond_self'], cond['gcn_cond_neigh']))
        bs = dynamic.shape[0]
        leading = (torch.cat([cond['gcn_cond_self'], cond['gcn_scene_self']], dim=0),
                   torch.cat([cond['gcn_cond_neigh'], cond['gcn_scene_neigh']], dim=0))
        out = self.diffusion_model(torch.cat([dynamic, dynamic], dim=0), leading)
        return torch.where(cond['vis_mask_smpl'][..., None], out[:bs], out[bs:])

    def predict_betas(self, cond: Dict[str, torch.Tensor]) -> torch.Tensor:
        """SMPL betas ``[B, 10]`` from the unmasked condition."""
        return self.beta_layer(torch.cat([cond['img_feat'], cond['scene_feat'], cond['transl_feat'],
                                          cond['cam_feat']], dim=-1))

    @fp32_under_autocast
    def decode(self, pred_x_start: torch.Tensor, cond: Dict[str, torch.Tensor], batch) -> Dict:
        """Normalised pose ``[B,144]`` + condition -> SMPL outputs (betas from the unmasked condition); in fp32 under
        autocast too (SMPL's skinning in bf16 would move vertices by millimetres)."""
        bs = pred_x_start.shape[0]
        pose_6d = self.denormalize_pose(pred_x_start)
        rotmats = rot6d_to_rotmat(pose_6d, mode='diffusion').reshape(bs, NUM_SMPL_JOINTS, 3, 3)
        betas = self.predict_betas(cond)
        smpl_out = self.smpl(global_orient=rotmats[:, :1], body_pose=rotmats[:, 1:], betas=betas,
                             pose2rot=False, return_full_pose=True)
        joints = smpl_out.joints
        transl = cond['transl']
        focal, center = self.camera_intrinsics(batch)
        kp2d = perspective_projection(joints, transl, focal, center)
        kp2d = normalise_full_image_points(kp2d)
        return {
            'pred_x_start': pred_x_start,
            'pred_smpl_params': {'global_orient': rotmats[:, :1], 'body_pose': rotmats[:, 1:], 'betas': betas},
            'pred_pose_6d': pose_6d,
            'pred_rotmats': rotmats,
            'pred_keypoints_3d': joints,
            'pred_vertices': smpl_out.vertices,
            'pred_keypoints_3d_full': joints + transl[:, None, :],
            'pred_keypoints_2d_full': kp2d,
        }

    # ------------------------------------------------------------------------------------------------ losses
    def gt_smpl_output(self, smpl_params: Dict[str, torch.Tensor], gender: torch.Tensor):
        """Gender-matched GT SMPL (0 male, 1 female) with axis-angle GT params -> (vertices, joints)."""
        params = {k: smpl_params[k].float() for k in ('global_orient', 'body_pose', 'betas', 'transl')}
        male = self.smpl_male(**params)
        female = self.smpl_female(**params)
        is_female = (gender.reshape(-1) == 1)[:, None, None]
        return (torch.where(is_female, female.vertices, male.vertices),
                torch.where(is_female, female.joints, male.joints))

    def compute_loss(self, batch, output: Dict, cur_epoch: int = 0) -> torch.Tensor:
        """Weighted sum of the stage-2 losses (the original's); fills ``output['losses']`` (detached terms).

        In eval mode it also fills ``losses['loss_keypoints_3d_vis_batch_sum']`` and ``output['joint_vis_num_batch']``.
        """
        return L.compute_losses(self, batch, output, cur_epoch)
