"""Pose/mesh error metrics, defined exactly as the original evaluation code computes them.

All functions take numpy or torch arrays of shape ``[B, N, 3]`` (metres) and return per-frame values ``[B]``.
"""
from __future__ import annotations

import numpy as np

from utils.tensors import to_numpy


def similarity_procrustes(pred, gt) -> np.ndarray:
    """Align ``pred [B,N,3]`` to ``gt`` with the best scale, rotation (no reflection) and translation.

    Returns the aligned prediction ``[B, N, 3]`` (float64).
    """
    pred, gt = to_numpy(pred).astype(np.float64), to_numpy(gt).astype(np.float64)
    mu_p, mu_g = pred.mean(axis=1, keepdims=True), gt.mean(axis=1, keepdims=True)
    xp, xg = pred - mu_p, gt - mu_g
    var_p = (xp ** 2).sum(axis=(1, 2))
    cov = np.einsum('bni,bnj->bij', xg, xp)                 # sum_n g_n p_n^T
    u, s, vt = np.linalg.svd(cov)
    d = np.sign(np.linalg.det(u @ vt))
    fix = np.ones_like(s)
    fix[:, -1] = d
    rot = u @ (fix[:, :, None] * vt)                        # R = U diag(1,1,d) V^T
    scale = (s * fix).sum(axis=1) / np.maximum(var_p, 1e-12)
    return scale[:, None, None] * np.einsum('bij,bnj->bni', rot, xp) + mu_g


def masked_procrustes(pred, gt, visible) -> np.ndarray:
    """The original's visible-joint PA: zero invisible joints in both, fit on all N, apply to the full ``pred``.

    Zeroed joints still count as coincident points at the origin in the means and the SVD, as in the original.
    """
    pred, gt = to_numpy(pred).astype(np.float64), to_numpy(gt).astype(np.float64)
    mask = to_numpy(visible).astype(np.float64)[..., None]
    p_m, g_m = pred * mask, gt * mask
    mu_p, mu_g = p_m.mean(axis=1, keepdims=True), g_m.mean(axis=1, keepdims=True)
    xp, xg = p_m - mu_p, g_m - mu_g
    var_p = (xp ** 2).sum(axis=(1, 2))
    u, s, vt = np.linalg.svd(np.einsum('bni,bnj->bij', xg, xp))
    fix = np.ones_like(s)
    fix[:, -1] = np.sign(np.linalg.det(u @ vt))
    rot = u @ (fix[:, :, None] * vt)
    scale = (s * fix).sum(axis=1) / np.maximum(var_p, 1e-12)
    return scale[:, None, None] * np.einsum('bij,bnj->bni', rot, pred - mu_p) + mu_g


def per_point_error(pred, gt) -> np.ndarray:
    """Euclidean distance per point ``[B, N]``."""
    return np.linalg.norm(to_numpy(pred).astype(np.float64) - to_numpy(gt).astype(np.float64), axis=-1)


def mean_point_error(pred, gt) -> np.ndarray:
    """Mean Euclidean distance per frame ``[B]`` (G-MPJPE / G-V2V when given global coordinates)."""
    return per_point_error(pred, gt).mean(axis=-1)


def pelvis_aligned(points, pelvis) -> np.ndarray:
    """``points [B,N,3]`` minus ``pelvis [B,3]``."""
    return to_numpy(points).astype(np.float64) - to_numpy(pelvis).astype(np.float64)[:, None, :]


def mpjpe(pred_joints, gt_joints) -> np.ndarray:
    """Pelvis-aligned (joint 0) mean per-joint error ``[B]``."""
    return mean_point_error(pelvis_aligned(pred_joints, to_numpy(pred_joints)[:, 0]),
                            pelvis_aligned(gt_joints, to_numpy(gt_joints)[:, 0]))


def pa_error(pred, gt) -> np.ndarray:
    """Mean error after similarity Procrustes alignment ``[B]``."""
    return mean_point_error(similarity_procrustes(pred, gt), gt)


STAGE1_METRICS = ('G-MPJPE', 'MPJPE', 'PA-MPJPE', 'G-V2V', 'V2V', 'PA-V2V')


def stage1_frame_errors(pred_joints, pred_verts, gt_joints, gt_verts) -> dict:
    """Per-frame stage-1 errors in millimetres (as the original), each ``[B]``.

    ``*_joints [B, 24, 3]`` and ``*_verts [B, V, 3]`` are global (PV frame, metres). MPJPE/V2V subtract each body's
    own joint 0; PA-* apply a similarity Procrustes to the pelvis-aligned prediction.
    """
    pred_pelvis, gt_pelvis = to_numpy(pred_joints)[:, 0], to_numpy(gt_joints)[:, 0]
    pj, gj = pelvis_aligned(pred_joints, pred_pelvis), pelvis_aligned(gt_joints, gt_pelvis)
    pv, gv = pelvis_aligned(pred_verts, pred_pelvis), pelvis_aligned(gt_verts, gt_pelvis)
    return {
        'G-MPJPE': 1000.0 * mean_point_error(pred_joints, gt_joints),
        'MPJPE': 1000.0 * mean_point_error(pj, gj),
        'PA-MPJPE': 1000.0 * pa_error(pj, gj),
        'G-V2V': 1000.0 * mean_point_error(pred_verts, gt_verts),
        'V2V': 1000.0 * mean_point_error(pv, gv),
        'PA-V2V': 1000.0 * pa_error(pv, gv),
    }
