"""Synthetic stand-ins for the licensed inputs, in their exact formats: an SMPL-format body model, its mean
parameters, MoCap poses and an EgoBody-format world (``synthetic.world.make_world``). This package CREATES data;
``dataloaders/`` reads it (or the real files) the same way."""
from synthetic.body_model import build_body_model, build_body_models, mean_params, rest_joints, write_body_model_files
from synthetic.poses import (POSE_KINDS, SIT_KINDS, is_sitting, sample_betas, sample_global_orient, sample_mocap,
                             sample_poses, sitting_mask)

__all__ = ['build_body_model', 'build_body_models', 'mean_params', 'rest_joints', 'write_body_model_files',
           'POSE_KINDS', 'SIT_KINDS', 'is_sitting', 'sample_betas', 'sample_global_orient', 'sample_mocap',
           'sample_poses', 'sitting_mask']
