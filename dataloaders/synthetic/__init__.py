"""Synthetic stand-ins for the licensed inputs: the SMPL body model, its mean parameters and MoCap poses."""
from dataloaders.synthetic.body_model import (build_body_model, build_body_models, mean_params,
                                              rest_joints, write_body_model_files)
from dataloaders.synthetic.poses import (POSE_KINDS, SIT_KINDS, is_sitting, sample_betas, sample_global_orient,
                                         sample_mocap, sample_poses, sitting_mask)

__all__ = ['build_body_model', 'build_body_models', 'mean_params', 'rest_joints', 'write_body_model_files',
           'POSE_KINDS', 'SIT_KINDS', 'is_sitting', 'sample_betas', 'sample_global_orient', 'sample_mocap',
           'sample_poses', 'sitting_mask']
