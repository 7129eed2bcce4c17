"""Glue between the stage-2 model and a body-occupancy model (COAP); the guidance rule is in ``egohmr.guidance``.

Everything happens in the canonical frame: scene points minus the input translation, and the neutral SMPL body of
the predicted pose and betas without translation. Only the scene points inside each body's axis-aligned vertex box are
queried; the original loops over bodies one at a time, we pad the per-body point sets and run the batch at once
(same values, see :func:`gather_box_points`).

An occupancy model is any object with ``query(points [1,T,3], body) -> [1,T]`` and
``collision_loss(points, body) -> [1]``, where ``body`` has ``vertices``, ``joints`` and axis-angle
``full_pose [1,72]``.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Optional

import numpy as np
import torch
from smplx.utils import SMPLOutput

from utils.body_model import NUM_SMPL_JOINTS
from utils.geometry import rotmat_to_aa

OCCUPANCY_LEVEL = 0.5
# Training loss: with more than this many points in the body box, only those among the first 4000 stored points are
# kept (the original's indexing, not "keep 4000 of them"; reproduced for parity).
TRAIN_POINT_CAP = 4000
COLLISION_MODELS = ('coap', 'exact')
# Seed of COAP's surface samples in the collision metric and the guidance gradient (see collision_ratio).
COAP_SAMPLE_SEED = 0
# Padding for per-body point sets: far outside any body part box (occupancy exactly 0).
FAR_POINT = 1.0e4


def body_for_occupancy(vertices: torch.Tensor, joints: torch.Tensor, rotmats: torch.Tensor) -> SMPLOutput:
    """An smplx-style output with axis-angle ``full_pose [B,72]`` (differentiable rotmat -> quaternion -> aa)."""
    bs = vertices.shape[0]
    full_pose = rotmat_to_aa(rotmats.reshape(-1, 3, 3)).reshape(bs, 3 * NUM_SMPL_JOINTS)
    return SMPLOutput(vertices=vertices, joints=joints, full_pose=full_pose)


def points_in_body_box(points: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """``[P]`` bool: points ``[P,3]`` inside the (inclusive, detached) axis-aligned box of ``vertices [V,3]``."""
    vertices = vertices.detach()
    lo, hi = vertices.min(dim=0).values, vertices.max(dim=0).values
    return ((points >= lo) & (points <= hi)).all(dim=-1)


def box_mask_with_cap(points: torch.Tensor, vertices: torch.Tensor, max_point_index: Optional[int]) -> torch.Tensor:
    """:func:`points_in_body_box`, then, if more than ``max_point_index`` points qualify, drop every index
    ``>= max_point_index`` of the stored array (not "keep 4000 of the qualifying points"; as the original)."""
    mask = points_in_body_box(points, vertices)
    if max_point_index is not None and int(mask.sum()) > max_point_index:
        mask[max_point_index:] = False
    return mask


def box_masks_with_cap(scene_points: torch.Tensor, vertices: torch.Tensor,
                       max_point_index: Optional[int] = None) -> torch.Tensor:
    """``[B, P]`` bool: :func:`box_mask_with_cap` of every body at once (same masks, no loop over bodies)."""
    vertices = vertices.detach()
    lo, hi = vertices.min(dim=1).values[:, None], vertices.max(dim=1).values[:, None]
    masks = ((scene_points >= lo) & (scene_points <= hi)).all(dim=-1)
    if max_point_index is not None:
        over = masks.sum(dim=1) > max_point_index
        masks[:, max_point_index:] &= ~over[:, None]
    return masks


def gather_box_points(scene_points: torch.Tensor, vertices: torch.Tensor,
                      max_point_index: Optional[int] = None):
    """Per body, the scene points in its box (in stored order), padded into one ``[B, T, 3]`` tensor (T = the
    largest count).

    Padding rows hold :data:`FAR_POINT`, outside every part box, so their occupancy is exactly 0 and they change
    neither the collision loss nor the colliding-point count. This lets the occupancy model run once for the batch
    instead of once per body (the original's loop), with the same result. COAP's sparse path
    (:meth:`COAPBodyModel.sparse_query`) evaluates its decoder only at (point, part) pairs inside a part box, so the
    padding costs no network evaluation. Returns (points, counts [B]).
    """
    masks = box_masks_with_cap(scene_points, vertices, max_point_index)
    counts = masks.sum(dim=1)
    padded = scene_points.new_full((scene_points.shape[0], int(counts.max()) if counts.numel() else 0, 3), FAR_POINT)
    rows, cols = masks.nonzero(as_tuple=True)
    slots = masks.long().cumsum(dim=1)[rows, cols] - 1
    padded[rows, slots] = scene_points[rows, cols]
    return padded, counts.tolist()


def per_body_losses(occupancy_model, scene_points: torch.Tensor, body: SMPLOutput,
                    max_point_index: Optional[int] = None, generators: Optional[list] = None) -> torch.Tensor:
    """Per-body collision loss ``[B]`` (0 where no scene point is in the body box); differentiable w.r.t. the body.
    ``generators``: one per body for COAP's surface samples (:mod:`utils.frame_rng`), or None (the torch RNG)."""
    points, counts = gather_box_points(scene_points, body.vertices, max_point_index)
    if max(counts) == 0:
        return body.vertices.new_zeros(scene_points.shape[0]) * body.vertices.sum()
    return _collision_loss(occupancy_model, points, body, generators).reshape(-1)


def _uses_sparse_path(occupancy_model, body) -> bool:
    """COAP's sparse evaluation, unless its body-code cache already holds this body (then the dense call reuses
    that code and draws no new surface samples, as the original does)."""
    return hasattr(occupancy_model, 'sparse_query') and not occupancy_model._cache_is_valid(body)


def _collision_loss(occupancy_model, points, body, generators=None) -> torch.Tensor:
    if _uses_sparse_path(occupancy_model, body):
        return occupancy_model.sparse_collision_loss(points, body, generators)
    return occupancy_model.collision_loss(points, body)


def _occupancy(occupancy_model, points, body, generators=None) -> torch.Tensor:
    if _uses_sparse_path(occupancy_model, body):
        return occupancy_model.sparse_query(points, body, generators)[0]
    return occupancy_model.query(points, body)


def penetration_loss(occupancy_model, scene_points, vertices, joints, rotmats,
                     max_point_index: Optional[int] = TRAIN_POINT_CAP) -> torch.Tensor:
    """Training penetration loss per sample ``[B]`` (as the original); the caller takes the mean."""
    return per_body_losses(occupancy_model, scene_points, body_for_occupancy(vertices, joints, rotmats),
                           max_point_index)


@contextlib.contextmanager
def seeded_rng(seed: Optional[int], device: torch.device):
    """Run the block on a forked torch RNG seeded with ``seed`` (the global stream is left untouched); with
    ``seed=None`` on the global stream itself."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def collision_ratio(occupancy_model, scene_points, vertices, joints, rotmats,
                    seed: Optional[int] = COAP_SAMPLE_SEED, generators: Optional[list] = None) -> np.ndarray:
    """``#(occupancy > 0.5) / P`` per body ``[B]`` (P = all scene points of that frame, as the original's metric).

    COAP encodes a body from new random surface samples on each call, so the original's metric is itself random and
    advances the global RNG. Here its samples come from ``seed`` in a forked RNG (None: the global stream, as the
    original), so two runs that differ only in guidance score the same body alike. ``generators`` (one per body,
    :mod:`utils.frame_rng`) replace that stream: then a body's score does not depend on the batch it is in.
    """
    body = body_for_occupancy(vertices, joints, rotmats)
    points, counts = gather_box_points(scene_points, body.vertices)
    if max(counts) == 0:
        return np.zeros(scene_points.shape[0])
    with seeded_rng(None if generators is not None else seed, points.device):
        occupancy = _occupancy(occupancy_model, points, body, generators)
    return ((occupancy > OCCUPANCY_LEVEL).sum(dim=1).double() / scene_points.shape[1]).cpu().numpy()


def build_occupancy_model(model, name: str = 'coap', coap_checkpoint: Optional[str] = None):
    """The occupancy model used for guidance and the collision metric.

    ``'coap'``: the model's ``smpl.coap`` (weights from the stage-2 checkpoint, or ``coap_checkpoint`` if given).
    ``'exact'``: an exact inside/outside test of the posed mesh from ``egohmr.coap.exact`` (if that module exists);
    it must provide ``build_exact_occupancy(smpl)`` or a class ``ExactOccupancy(smpl)`` with the COAP interface.
    """
    if name not in COLLISION_MODELS:
        raise ValueError(f"--collision_model must be one of {COLLISION_MODELS}, got {name!r}")
    if name == 'coap':
        if model.coap is None:
            raise ValueError("--collision_model coap needs COAP (the egohmr.coap package); "
                             "or set --eval_coll_loss False --with_coap_grad False")
        if coap_checkpoint:
            from egohmr.coap.checkpoint import load_coap_checkpoint
            load_coap_checkpoint(model.coap, coap_checkpoint)
        return model.coap
    try:
        exact = importlib.import_module('egohmr.coap.exact')
    except ImportError as exc:
        raise ValueError(f"--collision_model exact needs egohmr/coap/exact.py ({exc})") from exc
    factory = getattr(exact, 'build_exact_occupancy', None) or getattr(exact, 'ExactOccupancy', None)
    if factory is None:
        raise ValueError("egohmr.coap.exact provides neither build_exact_occupancy nor ExactOccupancy")
    return factory(model.smpl)
