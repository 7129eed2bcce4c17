"""utils/metrics.py: stage-1 errors against hand-computed values and a direct Procrustes fit."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.spatial.transform import Rotation

from utils.metrics import (STAGE1_METRICS, mean_point_error, mpjpe, pa_error, similarity_procrustes,
                           stage1_frame_errors)


def random_body(rng, n=24):
    return rng.normal(0.0, 0.3, size=(n, 3))


def direct_procrustes_error(pred, gt):
    """Fit scale, rotation and translation by numerically minimising the summed squared distance (BFGS,
    several starts), then report the mean joint distance."""
    def aligned(params):
        scale, rotvec, t = np.exp(params[0]), params[1:4], params[4:7]
        return scale * pred @ Rotation.from_rotvec(rotvec).as_matrix().T + t

    def cost(params):
        return ((aligned(params) - gt) ** 2).sum()

    best = min((minimize(cost, np.r_[0.0, start, np.zeros(3)], method='BFGS', options={'gtol': 1e-10})
                for start in np.random.default_rng(0).normal(0, 1.5, size=(6, 3))), key=lambda r: r.fun)
    return np.linalg.norm(aligned(best.x) - gt, axis=-1).mean()


def test_pa_mpjpe_agrees_with_a_direct_similarity_fit():
    rng = np.random.default_rng(1)
    gt = random_body(rng)
    rot = Rotation.from_rotvec([0.4, -1.1, 0.7]).as_matrix()
    pred = 1.3 * gt @ rot.T + np.array([0.2, -0.5, 3.0]) + rng.normal(0, 0.02, size=gt.shape)
    ours = pa_error(pred[None], gt[None])[0]
    assert ours == pytest.approx(direct_procrustes_error(pred, gt), rel=1e-4)
    assert ours > 0.005                                   # the noise is not aligned away


def test_procrustes_recovers_exact_similarity_and_refuses_reflections():
    rng = np.random.default_rng(2)
    gt = random_body(rng)
    rot = Rotation.from_rotvec([1.0, 0.2, -0.3]).as_matrix()
    pred = 0.7 * gt @ rot.T + np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(similarity_procrustes(pred[None], gt[None])[0], gt, atol=1e-10)
    mirrored = gt * np.array([-1.0, 1.0, 1.0])            # a reflection is not a rotation
    assert pa_error(mirrored[None], gt[None])[0] > 0.01


def test_perfect_prediction_scores_zero():
    rng = np.random.default_rng(3)
    joints, verts = random_body(rng)[None], random_body(rng, 100)[None]
    errors = stage1_frame_errors(joints, verts, joints, verts)
    assert set(errors) == set(STAGE1_METRICS)
    for name, value in errors.items():
        assert value.shape == (1,) and value[0] == pytest.approx(0.0, abs=1e-6), name


def test_translation_error_only_affects_global_metrics():
    rng = np.random.default_rng(4)
    joints, verts = random_body(rng)[None], random_body(rng, 100)[None]
    offset = np.array([0.03, -0.04, 0.0])                 # 5 cm
    errors = stage1_frame_errors(joints + offset, verts + offset, joints, verts)
    assert errors['G-MPJPE'][0] == pytest.approx(50.0) and errors['G-V2V'][0] == pytest.approx(50.0)
    for name in ('MPJPE', 'PA-MPJPE', 'V2V', 'PA-V2V'):
        assert errors[name][0] == pytest.approx(0.0, abs=1e-6)


def test_mpjpe_hand_value():
    gt = np.zeros((1, 3, 3))
    pred = np.array([[[0.0, 0.0, 0.0], [0.3, 0.4, 0.0], [0.0, 0.0, 1.0]]])
    assert mpjpe(pred, gt)[0] == pytest.approx((0.0 + 0.5 + 1.0) / 3)
    assert mean_point_error(pred + 1.0, gt + 1.0)[0] == pytest.approx(0.5)
