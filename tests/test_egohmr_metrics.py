"""Stage-2 test metrics: definitions of the original plus the corrected variants."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from egohmr.evaluate import (Stage2Metrics, diversity_apd, diversity_std, format_report, json_safe,
                             min_squared_distance_to_scene, procrustes_on_subset)
from utils.geometry import aa_to_rotmat

FOCAL = torch.tensor([1000.0, 1000.0])
CENTER = torch.tensor([[960.0, 540.0], [960.0, 540.0]])


def test_diversity_by_hand():
    pts = np.zeros((2, 3, 3))
    pts[1, :, 0] = 0.3                                           # two samples 0.3 m apart at every joint
    assert diversity_apd(pts) == pytest.approx(0.3 * 2 * 3 / 3 / 2 / 1 / 2)   # = 0.15, half the usual APD
    assert diversity_std(pts) == pytest.approx(np.std([0.0, 0.3], ddof=1) / 3)
    assert diversity_apd(pts[:1]) == 0.0 and diversity_std(pts[:1]) == 0.0    # one sample: 0, not NaN
    assert math.isnan(diversity_apd(pts, np.zeros(3, bool))) and math.isnan(diversity_std(pts, np.zeros(3, bool)))


def test_subset_procrustes_recovers_similarity():
    rng = np.random.default_rng(0)
    gt = rng.normal(size=(24, 3))
    rot = aa_to_rotmat(torch.tensor([0.3, -0.5, 0.2], dtype=torch.float64)).numpy()
    pred = 1.7 * gt @ rot.T + np.array([0.1, 0.2, -0.3])
    pred[20:] += 5.0                                             # invisible joints far off
    mask = np.ones(24, bool)
    mask[20:] = False
    aligned = procrustes_on_subset(pred, gt, mask)
    np.testing.assert_allclose(aligned[:20], gt[:20], atol=1e-9 + 1e-12)
    assert np.linalg.norm(aligned[20:] - gt[20:], axis=-1).min() > 1.0


def test_min_squared_distance():
    verts = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    scene = np.array([[0.0, 0.0, 0.1], [5.0, 5.0, 5.0]])
    assert min_squared_distance_to_scene(verts, scene) == pytest.approx(0.01)


def _bodies(num_samples, offset):
    """Two frames, GT in front of the camera; joint 23 of frame 0 pushed out of the image (invisible)."""
    g = torch.Generator().manual_seed(0)
    gt_local = torch.randn(2, 24, 3, generator=g) * 0.2
    gt_local[:, 0] = 0.0
    transl = torch.tensor([[0.0, 0.0, 3.0], [0.2, 0.0, 4.0]])
    gt_joints = gt_local + transl[:, None]
    gt_joints[0, 23] = torch.tensor([10.0, 0.0, 3.0])
    gt_vertices = gt_joints.repeat(1, 2, 1)                      # 48 "vertices"
    pred_joints = (gt_joints - transl[:, None])[:, None].repeat(1, num_samples, 1, 1).clone()
    pred_joints[:, :, 1:] += offset
    pred_vertices = (gt_vertices - transl[:, None])[:, None].repeat(1, num_samples, 1, 1)
    return pred_joints, pred_vertices, transl, gt_joints, gt_vertices


def test_perfect_prediction_gives_zero_errors():
    pj, pv, transl, gj, gv = _bodies(2, offset=0.0)
    metrics = Stage2Metrics(2)
    scene = torch.zeros(2, 5, 3)
    metrics.update(pj, pv, transl, gj, gv, FOCAL, CENTER, scene_points_full=scene,
                   collision_ratio=np.full((2, 2), 0.25))
    m = metrics.summary()['metrics']
    for key in ('g_mpjpe', 'mpjpe', 'mpjpe_vis', 'mpjpe_invis', 'pa_mpjpe', 'v2v', 'std_joints', 'apd_joints',
                'pa_mpjpe_vis_subset', 'mpjpe_invis_min_of_n'):
        assert m[key] == pytest.approx(0.0, abs=1e-6), key
    assert m['collision_ratio'] == pytest.approx(0.25)
    assert m['contact_ratio'] == 0.0                             # scene at the origin, bodies 3-4 m away


def test_vis_invis_are_joint_weighted_and_min_of_n():
    pj, pv, transl, gj, gv = _bodies(2, offset=0.0)
    pj[:, 0, 1:, 0] += 0.010                                     # sample 0: 1 cm error on every non-root joint
    pj[:, 1, 1:, 0] += 0.030                                     # sample 1: 3 cm
    metrics = Stage2Metrics(2, eval_with_vis_mask_pa=False)
    metrics.update(pj, pv, transl, gj, gv, FOCAL, CENTER)
    summary = metrics.summary()
    m = summary['metrics']
    assert metrics.joint_invis_num == 1 and metrics.joint_vis_num == 47
    assert m['mpjpe'] == pytest.approx(1000 * 0.02 * 23 / 24, rel=1e-6)
    assert m['mpjpe_vis'] == pytest.approx(1000 * 0.02 * 45 / 47, rel=1e-6)   # 2 visible roots have 0 error
    assert m['mpjpe_invis'] == pytest.approx(20.0, abs=1e-3)
    assert m['mpjpe_invis_min_of_n'] == pytest.approx(10.0, abs=1e-3)   # float32 inputs
    assert m['g_mpjpe'] == pytest.approx(m['mpjpe'], rel=1e-6)               # input transl = GT transl
    assert m['apd_joints_standard'] == pytest.approx(2 * m['apd_joints'])
    assert m['apd_joints'] == pytest.approx(1000 * 0.02 * 23 / 24 / 2, rel=1e-6)
    report = format_report(summary)
    assert 'MPJPE all/vis/invis' in report and 'min' not in report.split('MPJPE-invis:')[0][-5:]


def test_single_sample_diversity_is_zero_with_note():
    pj, pv, transl, gj, gv = _bodies(1, offset=0.05)
    metrics = Stage2Metrics(1)
    metrics.update(pj, pv, transl, gj, gv, FOCAL, CENTER)
    summary = metrics.summary()
    assert summary['metrics']['std_joints'] == 0.0 and summary['metrics']['apd_joints_invis'] == 0.0
    assert any('num_samples=1' in note for note in summary['notes'])


def test_pa_is_invariant_to_similarity_of_prediction():
    pj, pv, transl, gj, gv = _bodies(1, offset=0.0)
    rot = aa_to_rotmat(torch.tensor([0.0, 0.7, 0.0]))
    pj = 0.8 * pj @ rot.T
    metrics = Stage2Metrics(1, eval_with_vis_mask_pa=False)
    metrics.update(pj, pv, transl, gj, gv, FOCAL, CENTER)
    m = metrics.summary()['metrics']
    assert m['pa_mpjpe'] == pytest.approx(0.0, abs=1e-3) and m['mpjpe'] > 1.0   # mm, float32 inputs


def test_json_safe_replaces_nan():
    assert json_safe({'a': math.nan, 'b': [1.0, math.inf], 'c': 2.0}) == {'a': None, 'b': [1.0, None], 'c': 2.0}
