"""EgoHMR's collision guidance: the COAP gradient and the rule for which steps it moves, and by how much.

The diffusion core (``diffusion/``) knows nothing of this: its sampling loops call the hooks of a
:class:`CollisionGuidance` and add what they return. What the original EgoHMR does, and this module reproduces:

* Gradient (:func:`collision_guidance_gradient`): pose the neutral SMPL body with the de-normalised 6D pose of the
  NOISY chain input ``x_t`` (betas of the step's prediction, detached), take COAP's per-body collision loss ``L_i``
  over the scene points in that body's box, and differentiate ``-mean L`` w.r.t. the de-normalised pose. The mean
  runs over the images of ONE chain: the original runs one chain of ``bs`` rows per sample, so a body's gradient is
  scaled by ``1/bs`` however many samples we batch into one chain. The gradient is weighted per joint: hips x1;
  knees, ankles and feet x2; every other joint 0 (the original multiplies joints 0-2 by 1 and 3-23 by 2, then keeps
  only these eight). It is added in NORMALISED space without the ``Xstd`` chain-rule factor, as the original.
* DDPM (:meth:`CollisionGuidance.condition_mean`): at the chain's own step index ``t[0] <= 10`` the posterior mean
  moves by ``w * var * g``, with ``var`` the (unclipped) posterior variance for ``t >= 5`` and the constant 0.01
  below; ``w`` is ``--cond_grad_weight`` (2.0 for COAP). On a respaced chain the original uses the RESPACED index for
  this rule (and hands it to its gradient function), not the original timestep; so do we. For the 50-step ddpm of
  the scripts the two agree.
* DDIM (:meth:`CollisionGuidance.condition_score`): at respaced ``j <= 3`` the score gradient is ``g`` itself (scale
  1, ``w`` ignored). The original's README says DDIM is not meant for guidance; the test script refuses it.
* The last DDPM step's guided update is computed and discarded by the original (its output is the model's x0
  prediction at t = 0). :meth:`CollisionGuidance.final_step` applies it instead (``--guide_final_step``, opt-in).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from egohmr.collision import COAP_SAMPLE_SEED, body_for_occupancy, per_body_losses, seeded_rng
from utils.body_model import NUM_SMPL_JOINTS
from utils.geometry import rot6d_to_rotmat
from utils.tensors import full_precision

# DDPM: guided where the chain's step index is <= 10; posterior variance from step 5 up, 0.01 below.
DDPM_GUIDANCE_MAX_T = 10
DDPM_GUIDANCE_MIN_T_FOR_VARIANCE = 5
DDPM_GUIDANCE_FIXED_VARIANCE = 0.01
# DDIM: guided where the respaced index is <= 3 (original t in {0, 10, 20, 30} for ddim5), scale 1.
DDIM_GUIDANCE_MAX_J = 3
DDIM_GUIDANCE_SCALE = 1.0
DEFAULT_COAP_GUIDANCE_WEIGHT = 2.0
# Gradient weight per SMPL joint: hips x1; knees, ankles, feet x2; the rest 0.
GUIDANCE_JOINT_WEIGHTS = torch.zeros(NUM_SMPL_JOINTS)
GUIDANCE_JOINT_WEIGHTS[[1, 2]] = 1.0
GUIDANCE_JOINT_WEIGHTS[[4, 5, 7, 8, 10, 11]] = 2.0
# Key of a chain batch that says how many samples share the chain (rows = samples x images, sample-major).
SAMPLES_IN_CHAIN_KEY = 'samples_in_chain'
# Key of a chain batch holding its rows' random streams (utils.frame_rng.RowStreams), if it has them: COAP's surface
# samples of the guided step t then come from each row's own ('coap_surface', t) stream.
ROW_STREAMS_KEY = 'row_streams'


def collision_guidance_gradient(model, x_t: torch.Tensor, betas: torch.Tensor, scene_points: torch.Tensor,
                                occupancy_model=None, seed: Optional[int] = COAP_SAMPLE_SEED,
                                num_images: Optional[int] = None,
                                generators: Optional[list] = None) -> Optional[torch.Tensor]:
    """The original's guidance gradient ``[R,144]`` for the ``R`` rows of a chain, or None if no body collides.

    ``-sum_i L_i / num_images`` is differentiated w.r.t. the de-normalised 6D pose of ``x_t``: ``num_images`` is the
    number of images of one original chain (default: all ``R`` rows, the original's ``mean``), so each body gets
    the gradient it gets in its own chain of ``num_images`` rows. COAP's surface samples come from ``seed`` in a
    forked RNG (None: the global stream, as the original), so guidance leaves the chain's diffusion noise as it is
    without guidance; or, with ``generators`` (one per row), from the rows' own streams.
    """
    occupancy_model = occupancy_model if occupancy_model is not None else model.coap
    rows = x_t.shape[0]
    num_images = rows if num_images is None else int(num_images)
    with torch.enable_grad():
        # The body in fp32 in a bf16 run too (under autocast only COAP's networks run in bf16, egohmr.coap.model).
        with full_precision(x_t):
            pose_6d = model.denormalize_pose(x_t.detach().float()).requires_grad_(True)
            rotmats = rot6d_to_rotmat(pose_6d, mode='diffusion').reshape(rows, NUM_SMPL_JOINTS, 3, 3)
            smpl_out = model.smpl(global_orient=rotmats[:, :1], body_pose=rotmats[:, 1:],
                                  betas=betas.detach().float(), pose2rot=False)
            body = body_for_occupancy(smpl_out.vertices, smpl_out.joints, rotmats)
            scene_points = scene_points.float()
        with seeded_rng(None if generators is not None else seed, x_t.device):
            losses = per_body_losses(occupancy_model, scene_points, body, max_point_index=None,
                                     generators=generators)
            if not bool((losses != 0).any()):
                return None
            grad = torch.autograd.grad(-losses.sum() / num_images, pose_6d)[0]
    weights = GUIDANCE_JOINT_WEIGHTS.to(grad.device, grad.dtype)
    return (grad.reshape(rows, NUM_SMPL_JOINTS, 6) * weights[None, :, None]).reshape(rows, -1).detach()


class CollisionGuidance:
    """COAP collision guidance as hooks for ``diffusion``'s sampling loops (module docstring).

    :param model: the EgoHMR model (SMPL layer, pose statistics, ``coap``).
    :param occupancy_model: COAP or another occupancy model (default: ``model.coap``).
    :param weight: ``w``, the DDPM guidance weight (``--cond_grad_weight``).
    :param seed: seed of COAP's surface samples (None: the global RNG stream, as the original).
    """

    def __init__(self, model, occupancy_model=None, weight: float = DEFAULT_COAP_GUIDANCE_WEIGHT,
                 seed: Optional[int] = COAP_SAMPLE_SEED):
        self.model = model
        self.occupancy_model = occupancy_model if occupancy_model is not None else model.coap
        self.weight = float(weight)
        self.seed = seed

    def gradient(self, x: torch.Tensor, model_output: Dict, batch: Dict, step: int = 0) -> Optional[torch.Tensor]:
        """:func:`collision_guidance_gradient` for a chain batch: betas and scene points of the step's output,
        the mean over the images of one sample (``batch[SAMPLES_IN_CHAIN_KEY]`` samples share the chain); COAP's
        surface samples from the rows' ``('coap_surface', step)`` streams where the batch has
        ``batch[ROW_STREAMS_KEY]``."""
        samples = int(batch.get(SAMPLES_IN_CHAIN_KEY, 1))
        streams = batch.get(ROW_STREAMS_KEY)
        generators = streams.generators('coap_surface', step) if streams is not None else None
        return collision_guidance_gradient(self.model, x, model_output['pred_smpl_params']['betas'],
                                           model_output['condition']['scene_points'], self.occupancy_model,
                                           self.seed, num_images=x.shape[0] // samples, generators=generators)

    def condition_mean(self, x: torch.Tensor, t: torch.Tensor, p_mean_var: Dict, batch: Dict):
        """DDPM hook: the shift of the posterior mean at the chain's step ``t[0]`` (None where not guided)."""
        step = int(t[0])
        if step > DDPM_GUIDANCE_MAX_T:
            return None
        grad = self.gradient(x, p_mean_var['model_output'], batch, step)
        if grad is None:
            return None
        if step >= DDPM_GUIDANCE_MIN_T_FOR_VARIANCE:
            return self.weight * p_mean_var['variance'] * grad
        return self.weight * DDPM_GUIDANCE_FIXED_VARIANCE * grad

    def condition_score(self, x: torch.Tensor, t: torch.Tensor, p_mean_var: Dict, batch: Dict):
        """DDIM hook: the score gradient at respaced ``t[0] <= 3`` (scale 1), else None."""
        if int(t[0]) > DDIM_GUIDANCE_MAX_J:
            return None
        grad = self.gradient(x, p_mean_var['model_output'], batch, int(t[0]))
        return None if grad is None else DDIM_GUIDANCE_SCALE * grad

    def final_step(self, x0: torch.Tensor, model_output: Dict, batch: Dict) -> torch.Tensor:
        """``--guide_final_step``: the t = 0 guided update ``x0 + w * 0.01 * g`` applied to the returned x0, with the
        gradient taken at ``x0`` itself (the original computes this update at the chain input and discards it)."""
        t0 = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
        shift = self.condition_mean(x0, t0, {'model_output': model_output, 'variance': torch.zeros_like(x0)},
                                    batch)
        return x0 if shift is None else x0 + shift
