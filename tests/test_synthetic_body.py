"""The synthetic SMPL stand-in: mesh, skinning, regressor, landmarks, shapes, poses and the files it writes."""
from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from synthetic import body_model, poses

GENDERS = ('neutral', 'male', 'female')
NUM_MOCAP = 48


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('synthetic_body'))
    body_model.write_body_model_files(out, seed=0, num_mocap=NUM_MOCAP)
    return out


@pytest.fixture(scope='module')
def models():
    return body_model.build_body_models(seed=0)


@pytest.fixture(scope='module')
def smpl(data_dir):
    import smplx
    return {g: smplx.create(os.path.join(data_dir, 'smpl'), model_type='smpl', gender=g) for g in GENDERS}


def run(model, body_pose=None, betas=None, n=1):
    """Vertices and 45 joints (24 + smplx landmarks) of an smplx SMPL model, as numpy."""
    kwargs = dict(global_orient=torch.zeros(n, 3), body_pose=torch.zeros(n, 69), betas=torch.zeros(n, 10))
    if body_pose is not None:
        kwargs['body_pose'] = torch.as_tensor(body_pose, dtype=torch.float32)
    if betas is not None:
        kwargs['betas'] = torch.as_tensor(betas, dtype=torch.float32)
    with torch.no_grad():
        out = model(**kwargs)
    return out.vertices.numpy(), out.joints.numpy()


def test_smpl_fields(models):
    for gender, m in models.items():
        assert m['v_template'].shape == (6890, 3) and m['v_template'].dtype == np.float64
        assert m['f'].shape == (13776, 3) and m['f'].max() == 6889
        assert isinstance(m['J_regressor'], sp.csc_matrix) and m['J_regressor'].shape == (24, 6890)
        assert m['weights'].shape == (6890, 24)
        assert m['shapedirs'].shape == (6890, 3, 10) and m['posedirs'].shape == (6890, 3, 207)
        assert m['kintree_table'].dtype == np.int64
        np.testing.assert_array_equal(m['kintree_table'][1], np.arange(24))
        assert m['kintree_table'][0, 0] == 4294967295
        assert list(m['kintree_table'][0, 1:]) == body_model.SMPL_PARENTS[1:]
        assert m['bs_style'] == 'lbs' and m['bs_type'] == 'lrotmin'
        np.testing.assert_allclose(m['J'], m['J_regressor'] @ m['v_template'])
    # One topology, three templates.
    np.testing.assert_array_equal(models['MALE']['f'], models['FEMALE']['f'])
    assert not np.allclose(models['MALE']['v_template'], models['FEMALE']['v_template'])


def test_mesh_is_closed_genus0(models):
    import trimesh
    mesh = trimesh.Trimesh(models['NEUTRAL']['v_template'], models['NEUTRAL']['f'], process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.euler_number == 2
    assert mesh.volume > 0.03  # outward normals, body-sized (m^3)
    height = np.ptp(mesh.vertices[:, 1])
    assert 1.6 < height < 1.9


def test_skinning_weights(models):
    m = models['NEUTRAL']
    w = m['weights']
    assert w.min() >= 0
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-9)
    owner = w.argmax(axis=1)
    counts = np.bincount(owner, minlength=24)
    assert counts.min() >= 10, counts
    # Every part is spatially coherent: almost all its vertices form one connected patch of the mesh.
    f = m['f'].astype(np.int64)
    edges = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    same = owner[edges[:, 0]] == owner[edges[:, 1]]
    graph = sp.coo_matrix((np.ones(same.sum()), (edges[same, 0], edges[same, 1])), shape=(6890, 6890))
    _, labels = sp.csgraph.connected_components(graph, directed=False)
    for j in range(24):
        part_labels = labels[owner == j]
        assert np.bincount(part_labels).max() >= 0.9 * len(part_labels), f"joint {j} is scattered"
    # Each part lies near its own joint: the mean owner position is closer to that joint's bone than to the root's.
    joints = m['J']
    knee_verts = m['v_template'][owner == 4]
    assert np.all(np.abs(knee_verts[:, 1] - joints[4, 1]) < np.abs(knee_verts[:, 1] - joints[0, 1]))


def test_joint_regressor_reproduces_rest_joints(models):
    m = models['NEUTRAL']
    reg = m['J_regressor']
    np.testing.assert_allclose(np.asarray(reg.sum(axis=1)).ravel(), 1.0, atol=1e-9)
    assert reg.min() >= 0
    assert np.abs(reg @ m['v_template'] - body_model.rest_joints()).max() < 1e-3
    # Left joints on the body's left (+x), mirrored on the right.
    joints = m['J']
    for left in (1, 4, 7, 13, 16, 18, 20, 22):
        assert joints[left, 0] > 0.05 and joints[left + 1, 0] < -0.05


def test_landmarks_at_anatomical_spots(smpl):
    _, j = run(smpl['neutral'])
    j = j[0]
    names = ['nose', 'reye', 'leye', 'rear', 'lear', 'LBigToe', 'LSmallToe', 'LHeel', 'RBigToe', 'RSmallToe',
             'RHeel', 'lthumb', 'lindex', 'lmiddle', 'lring', 'lpinky', 'rthumb', 'rindex', 'rmiddle', 'rring',
             'rpinky']
    lm = dict(zip(names, j[24:]))
    head, neck = j[15], j[12]
    assert lm['nose'][2] > head[2] + 0.07 and lm['nose'][1] > neck[1]
    assert lm['leye'][0] > 0 > lm['reye'][0] and min(lm['leye'][2], lm['reye'][2]) > head[2] + 0.05
    assert lm['lear'][0] > 0.06 and lm['rear'][0] < -0.06
    for side, ankle in (('L', j[7]), ('R', j[8])):
        assert lm[f'{side}BigToe'][2] > ankle[2] + 0.1 and lm[f'{side}SmallToe'][2] > ankle[2] + 0.08
        assert lm[f'{side}Heel'][2] < ankle[2] - 0.02
        assert max(lm[f'{side}BigToe'][1], lm[f'{side}Heel'][1]) < ankle[1]
        # The big toe is on the inner side of the foot.
        assert abs(lm[f'{side}BigToe'][0]) < abs(lm[f'{side}SmallToe'][0])
    assert lm['LBigToe'][0] > 0 > lm['RBigToe'][0]
    for side, wrist in (('l', j[20]), ('r', j[21])):
        for finger in ('index', 'middle', 'ring', 'pinky'):
            assert abs(lm[side + finger][0]) > abs(wrist[0]) + 0.1
        assert lm[side + 'thumb'][2] > lm[side + 'pinky'][2] + 0.05  # thumb to the front, palms down
    assert lm['lindex'][0] > 0 > lm['rindex'][0]


def test_all_genders_load_and_pose(smpl):
    body_pose, _ = poses.sample_poses(np.random.default_rng(1), 4)
    heights = {}
    for gender, model in smpl.items():
        assert model.faces.shape == (13776, 3)
        verts, joints = run(model, body_pose=body_pose, n=4)
        assert verts.shape == (4, 6890, 3) and joints.shape == (4, 45, 3)
        assert np.isfinite(verts).all()
        heights[gender] = np.ptp(run(model)[0][0, :, 1])
    assert heights['male'] > heights['neutral'] > heights['female']


def test_height_grows_with_beta0(smpl):
    betas = np.zeros((5, 10))
    betas[:, 0] = np.linspace(-2, 2, 5)
    verts, _ = run(smpl['neutral'], betas=betas, n=5)
    heights = np.ptp(verts[:, :, 1], axis=1)
    assert np.all(np.diff(heights) > 0.02), heights
    # Each shape direction moves the body by centimetres per unit, like SMPL's.
    dirs = np.abs(body_model.build_body_model(0)['shapedirs']).max(axis=(0, 1))
    assert np.all((dirs > 0.005) & (dirs < 0.06)), dirs


def test_sitting_pose_geometry(smpl):
    body_pose, kinds = poses.sample_poses(np.random.default_rng(2), 8, kinds=('sit',))
    assert poses.sitting_mask(kinds).all()
    _, j = run(smpl['neutral'], body_pose=body_pose, n=8)
    for hip, knee, ankle in ((1, 4, 7), (2, 5, 8)):
        assert np.all(j[:, knee, 2] - j[:, hip, 2] > 0.25)                 # knees in front of the hips
        assert np.all(np.abs(j[:, knee, 1] - j[:, hip, 1]) < 0.12)         # at about hip height
        assert np.all(j[:, ankle, 1] < j[:, knee, 1] - 0.3)                # feet below the knees
        assert np.all(np.abs(j[:, ankle, 2] - j[:, knee, 2]) < 0.25)             # shins near vertical


def test_limbs_bend_the_natural_way(smpl):
    body_pose, kinds = poses.sample_poses(np.random.default_rng(3), 40)
    _, j = run(smpl['neutral'], body_pose=body_pose, n=40)
    for hip, knee, ankle in ((1, 4, 7), (2, 5, 8)):
        thigh, shin = j[:, knee] - j[:, hip], j[:, ankle] - j[:, knee]
        bent = np.degrees(np.arccos(np.sum(thigh * shin, -1) / np.linalg.norm(thigh, axis=-1)
                                    / np.linalg.norm(shin, axis=-1))) > 15
        # A bent knee sends the shin backwards relative to the thigh: (thigh x shin) points to the body's left (+x)
        # in the frame where the body faces +z, which is the world frame here (identity root).
        assert np.all(np.cross(thigh, shin)[bent, 0] > 0)
    for shoulder, elbow, wrist in ((16, 18, 20), (17, 19, 21)):
        upper, fore = j[:, elbow] - j[:, shoulder], j[:, wrist] - j[:, elbow]
        cos = np.sum(upper * fore, -1) / np.linalg.norm(upper, axis=-1) / np.linalg.norm(fore, axis=-1)
        assert np.all(np.degrees(np.arccos(cos)) < 110)
    standing = ~poses.sitting_mask(kinds)
    assert np.all(j[standing][:, [7, 8], 1].max(axis=1) < j[standing][:, 0, 1] - 0.6)  # feet well below pelvis


def test_sample_poses_and_betas():
    rng = np.random.default_rng(0)
    body_pose, kinds = poses.sample_poses(rng, 30, kinds=('stand', 'walk'))
    assert body_pose.shape == (30, 69) and body_pose.dtype == np.float64
    assert set(kinds) <= {'stand', 'walk'} and not poses.sitting_mask(kinds).any()
    assert poses.is_sitting('sit') and not poses.is_sitting('walk')
    assert np.linalg.norm(body_pose.reshape(30, 23, 3), axis=-1).max() < np.pi
    again, _ = poses.sample_poses(np.random.default_rng(0), 30, kinds=('stand', 'walk'))
    np.testing.assert_array_equal(body_pose, again)
    with pytest.raises(ValueError, match='kinds'):
        poses.sample_poses(rng, 2, kinds=('dance',))
    betas = poses.sample_betas(np.random.default_rng(0), 500)
    assert betas.shape == (500, 10) and np.abs(betas).max() <= 2.0
    assert 0.5 < betas.std() < 0.8


def test_mean_params_and_mocap_files(data_dir):
    from utils.geometry import rot6d_to_rotmat

    mean = np.load(os.path.join(data_dir, 'smpl_mean_params.npz'))
    assert set(mean.files) == {'pose', 'shape', 'cam'}
    assert mean['pose'].shape == (144,) and mean['shape'].shape == (10,) and mean['cam'].shape == (3,)
    assert all(mean[k].dtype == np.float32 for k in mean.files)
    rots = rot6d_to_rotmat(torch.from_numpy(mean['pose']).reshape(24, 6), mode='prohmr').numpy()
    np.testing.assert_allclose(rots, body_model.mean_pose_rotmats(), atol=1e-6)
    np.testing.assert_allclose(rots[0], np.eye(3), atol=1e-6)
    assert 0.5 < mean['cam'][0] < 1.5

    mocap = np.load(os.path.join(data_dir, 'datasets', 'cmu_mocap.npz'))
    assert set(mocap.files) == {'body_pose', 'betas'}
    assert mocap['body_pose'].shape == (NUM_MOCAP, 72) and mocap['body_pose'].dtype == np.float64
    assert mocap['betas'].shape == (NUM_MOCAP, 10) and mocap['betas'].dtype == np.float64
    assert np.isfinite(mocap['body_pose']).all()


def test_files_are_deterministic(data_dir, tmp_path):
    """A fresh build (cache cleared) with the same seed writes byte-identical files."""
    body_model._neutral_model.cache_clear()
    body_model.write_body_model_files(str(tmp_path), seed=0, num_mocap=NUM_MOCAP)
    for rel in ('smpl/smpl/SMPL_NEUTRAL.pkl', 'smpl/smpl/SMPL_MALE.pkl', 'smpl/smpl/SMPL_FEMALE.pkl',
                'smpl_mean_params.npz', 'datasets/cmu_mocap.npz'):
        with open(os.path.join(data_dir, rel), 'rb') as a, open(os.path.join(tmp_path, rel), 'rb') as b:
            assert a.read() == b.read(), rel
    assert not [name for name in os.listdir(tmp_path / 'smpl' / 'smpl') if name.endswith('.tmp')]
