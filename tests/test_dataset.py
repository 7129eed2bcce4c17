"""Tests for the EgoBody dataset, the MoCap dataset and the diffusion body-representation statistics."""
import json
import os
import pickle

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from configs import prohmr_config
from dataloaders.augmentation import AugParams
from dataloaders.body_rep_stats import (compute_body_rep_stats, load_body_rep_stats, save_body_rep_stats,
                                        stats_path)
from dataloaders.egobody_dataset import EgoBodyDataset, PelvisRegressor
from dataloaders.mocap_dataset import MoCapDataset
from utils import egobody
from utils.body_model import SMPL_TO_OPENPOSE, create_smpl
from utils.camera import IMAGE_SIZE
from utils.io import DataError

CFG = prohmr_config()
SPLIT = 'train'
NUM_SCENE_POINTS = 40
SHARED = [(b, j) for b, j in enumerate(SMPL_TO_OPENPOSE) if j < 24]   # (BODY_25 index, SMPL joint)


# --------------------------------------------------------------------------------------------------------------
# fixtures: the synthetic world plus our own stage-1 pickles and cube crops, behind a deeper symlinked root
# --------------------------------------------------------------------------------------------------------------

def apply(matrix, points):
    """Hand-written rigid transform (independent of utils.geometry)."""
    return np.einsum('ij,nj->ni', matrix[:3, :3], points) + matrix[:3, 3]


def kinect_to_pv_by_hand(transf, imgname):
    """4x4 master Kinect -> PV (OpenCV) from the pkl entries: flip y/z after world2pv after kinect2holo."""
    recording = imgname.split('/')[-4]
    timestamp = os.path.basename(imgname).split('_')[0]
    entry = transf[recording]
    holo_from_kinect = np.asarray(entry['trans_kinect2holo'], dtype=np.float64)
    pv_from_holo = np.asarray(entry['trans_world2pv'][timestamp], dtype=np.float64)
    return np.diag([1.0, -1.0, -1.0, 1.0]) @ pv_from_holo @ holo_from_kinect


class World:
    """The synthetic world's annotation arrays and the extra scene files written for these tests."""

    def __init__(self, synthetic_world, root):
        self.data_dir = synthetic_world.data_dir
        self.root = root
        npz = np.load(egobody.annotation_npz_path(synthetic_world.dataset_root, SPLIT), allow_pickle=True)
        self.npz = {key: npz[key] for key in npz.files}
        self.imgnames = [str(n) for n in self.npz['imgname']]
        with open(os.path.join(synthetic_world.dataset_root, egobody.TRANSF_PKL), 'rb') as f:
            self.transf = pickle.load(f, encoding='latin1')
        self.expected_s1 = {}      # frame index -> expected un-augmented PV points, whole-scene mode
        self.expected_cube = {}    # the same for cube mode


@pytest.fixture(scope='module')
def world(synthetic_world, tmp_path_factory):
    """A root reached through a deeper path of symlinks, holding s1 pickles and cube crops with known points.

    Frame i gets a random pattern of PV points in front of the camera, mapped back into the Kinect frame (s1) and
    the scene frame (cube) with hand-built matrices. In s1 the odd frames reuse the previous frame's points, which
    they must see through their own matrices.
    """
    base = tmp_path_factory.mktemp('linked')
    root = os.path.join(str(base), 'one', 'two', 'three', 'egobody_link')
    os.makedirs(root)
    for entry in os.listdir(synthetic_world.dataset_root):
        os.symlink(os.path.join(synthetic_world.dataset_root, entry), os.path.join(root, entry))
    w = World(synthetic_world, root)
    rng = np.random.default_rng(0)
    scenes = egobody.load_recording_scenes(synthetic_world.dataset_root)

    keys = [egobody.frame_key(name) for name in w.imgnames]
    saved_of = [i - i % 2 for i in range(len(keys))]
    kinect_points, pcd_verts = [], {}
    for i, name in enumerate(w.imgnames):
        pattern = rng.uniform(-1, 1, (NUM_SCENE_POINTS, 3)) + [0, 0, 3]
        kinect_points.append(apply(np.linalg.inv(kinect_to_pv_by_hand(w.transf, name)), pattern))
        recording, date, frame = egobody.parse_imgname(name)
        with open(egobody.kinect_to_scene_path(synthetic_world.dataset_root, recording, scenes[recording])) as f:
            scene_from_kinect = np.asarray(json.load(f)['trans'], dtype=np.float64)
        scene_points = apply(scene_from_kinect, kinect_points[i])
        for folder, points in ((egobody.CUBE_FROM_GT_FOLDER, scene_points),
                               (egobody.CUBE_FROM_PRED_FOLDER, scene_points + [0.0, 5.0, 0.0])):
            out_dir = os.path.join(root, folder, SPLIT, recording, date)
            os.makedirs(out_dir, exist_ok=True)
            np.save(os.path.join(out_dir, frame + '.npy'), points)
        w.expected_cube[i] = pattern
    for i, name in enumerate(w.imgnames):
        pcd_verts[keys[saved_of[i]]] = kinect_points[saved_of[i]]
        w.expected_s1[i] = apply(kinect_to_pv_by_hand(w.transf, name), kinect_points[saved_of[i]])

    s1 = os.path.join(root, egobody.S1_FOLDER)
    os.makedirs(s1)
    with open(os.path.join(s1, f'map_dict_{SPLIT}.pkl'), 'wb') as f:
        pickle.dump({key: keys[saved_of[i]] for i, key in enumerate(keys)}, f, protocol=2)
    with open(os.path.join(s1, f'pcd_verts_dict_{SPLIT}.pkl'), 'wb') as f:
        pickle.dump(pcd_verts, f, protocol=2)
    return w


def make_dataset(world, **kwargs):
    kwargs.setdefault('data_dir', world.data_dir)
    return EgoBodyDataset(CFG, world.root, SPLIT, **kwargs)


@pytest.fixture(scope='module')
def plain(world):
    return make_dataset(world)


@pytest.fixture(scope='module')
def augmenting(world):
    return make_dataset(world, do_augment=True, seed=0)


@pytest.fixture(scope='module')
def smpl_models(world):
    return [create_smpl(world.data_dir, g) for g in ('male', 'female')]


# --------------------------------------------------------------------------------------------------------------
# items without augmentation
# --------------------------------------------------------------------------------------------------------------

def test_item_keys_shapes_and_values(world, plain):
    npz = world.npz
    assert len(plain) == len(world.imgnames) >= 4
    item = plain[1]
    expected = {'img': ((3, 224, 224), np.float32), 'keypoints_2d': ((25, 3), np.float32),
                'orig_keypoints_2d': ((25, 3), np.float32), 'keypoints_2d_vis_mask': ((25,), np.bool_),
                'keypoints_3d': ((24, 3), np.float32), 'keypoints_3d_full': ((24, 3), np.float32),
                'box_center': ((2,), np.float32), 'transf_kinect2holo': ((4, 4), np.float32),
                'transf_holo2pv': ((4, 4), np.float32), 'scene_pcd_verts_full': ((NUM_SCENE_POINTS, 3), np.float32)}
    for key, (shape, dtype) in expected.items():
        assert item[key].shape == shape and item[key].dtype == dtype, key
    for key in ('fx', 'fy', 'cam_cx', 'cam_cy', 'box_size'):
        assert isinstance(item[key], np.float32), key
    assert isinstance(item['gender'], np.int32) and int(item['gender']) == (0 if str(npz['gender'][1]) == 'm' else 1)
    assert item['orig_img'] == 0
    assert isinstance(item['frame_index'], np.int64) and int(item['frame_index']) == 1   # its row in the split npz
    assert item['imgname'] == os.path.join(world.root, world.imgnames[1]) and os.path.isfile(item['imgname'])
    shapes = {'global_orient': (3,), 'body_pose': (69,), 'betas': (10,), 'transl': (3,)}
    npz_keys = {'global_orient': 'global_orient_pv', 'body_pose': 'pose', 'betas': 'shape', 'transl': 'transl_pv'}
    for key, shape in shapes.items():
        assert item['smpl_params'][key].shape == shape and item['smpl_params'][key].dtype == np.float32
        np.testing.assert_allclose(item['smpl_params'][key], npz[npz_keys[key]][1], rtol=1e-6, atol=1e-6)
        assert item['has_smpl_params'][key] is True
    assert item['smpl_params_is_axis_angle'] == {'global_orient': True, 'body_pose': True, 'betas': False,
                                                 'transl': False}
    np.testing.assert_allclose(item['keypoints_3d_full'], npz['3d_joints_pv'][1][:24], atol=1e-5)
    assert item['fx'] == pytest.approx(npz['fx'][1] / 1500, rel=1e-6)
    assert item['fy'] == pytest.approx(npz['fy'][1] / 1500, rel=1e-6)
    assert item['cam_cx'] == pytest.approx(npz['cx'][1], rel=1e-6)
    assert item['cam_cy'] == pytest.approx(npz['cy'][1], rel=1e-6)
    np.testing.assert_allclose(item['box_center'], npz['center'][1], rtol=1e-6)
    assert item['box_size'] == pytest.approx(npz['scale'][1] * 1.2 * 200, rel=1e-6)
    full_px = (item['orig_keypoints_2d'][:, :2] + 0.5) * list(IMAGE_SIZE)
    np.testing.assert_allclose(full_px, npz['valid_keypoints'][1][:, :2], atol=1e-2)
    transf = world.transf[world.imgnames[1].split('/')[-4]]
    np.testing.assert_allclose(item['transf_kinect2holo'], transf['trans_kinect2holo'], rtol=1e-6, atol=1e-6)


def test_items_collate_into_batches(plain):
    batch = next(iter(DataLoader(plain, batch_size=3, shuffle=False)))
    assert batch['img'].shape == (3, 3, 224, 224) and batch['fx'].dtype == torch.float32
    assert batch['smpl_params']['transl'].shape == (3, 3) and batch['has_smpl_params']['betas'].all()
    assert batch['scene_pcd_verts_full'].shape == (3, NUM_SCENE_POINTS, 3) and len(batch['imgname']) == 3


def test_spacing_and_scene_downsampling(world):
    ds = make_dataset(world, spacing=2, scene_downsample_rate=4)
    assert len(ds) == (len(world.imgnames) + 1) // 2
    item = ds[1]
    assert int(item['frame_index']) == 2                   # the frame's row in the split npz, not in the spaced list
    np.testing.assert_allclose(item['smpl_params']['betas'], world.npz['shape'][2], atol=1e-6)
    np.testing.assert_allclose(item['scene_pcd_verts_full'], world.expected_s1[2][::4], atol=1e-4)


def test_whole_scene_points_land_at_expected_pv_positions(world, plain):
    """Known Kinect-frame points (through a deeper symlinked root, keyed by frame_key) appear where expected."""
    for index in range(len(plain)):
        points = plain.get_item(index)['scene_pcd_verts_full']
        np.testing.assert_allclose(points, world.expected_s1[index], atol=1e-4)


def test_cube_points_land_at_expected_pv_positions_and_folder_choice(world):
    gt = make_dataset(world, scene_type='cube')
    pred = make_dataset(world, scene_type='cube', scene_crop_by_stage1_transl=True)
    for index in (0, len(gt) - 1):
        np.testing.assert_allclose(gt[index]['scene_pcd_verts_full'], world.expected_cube[index], atol=1e-4)
        shifted = pred[index]['scene_pcd_verts_full']
        assert np.abs(shifted - world.expected_cube[index]).max() > 1.0   # the from_pred copy is a different crop


def test_frame_key_ignores_root_depth(world):
    short = world.imgnames[0]
    deep = os.path.join('/a/b/c/d/e/f', short)
    assert egobody.frame_key(deep) == egobody.frame_key(short) == '/'.join(short.split('/')[-5:])


# --------------------------------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------------------------------

def test_pelvis_regressor_matches_smpl_forward(smpl_models):
    rng = np.random.default_rng(0)
    for model in smpl_models:
        betas = rng.normal(size=10)
        with torch.no_grad():
            out = model(betas=torch.tensor(betas[None], dtype=torch.float32),
                        body_pose=torch.tensor(rng.normal(size=(1, 69)) * 0.5, dtype=torch.float32),
                        global_orient=torch.tensor(rng.normal(size=(1, 3)), dtype=torch.float32))
        np.testing.assert_allclose(PelvisRegressor(model)(betas), out.joints[0, 0].numpy(), atol=1e-5)


def smpl_joints(model, smpl_params):
    with torch.no_grad():
        out = model(**{key: torch.from_numpy(value[None]) for key, value in smpl_params.items()})
    return out.joints[0, :24].numpy()


@pytest.mark.parametrize('params', [AugParams(scale=1.1, rot=0.0, flip=False, tx=0.01),
                                    AugParams(scale=0.8, rot=35.0, flip=False, ty=-0.02),
                                    AugParams(scale=1.2, rot=-50.0, flip=True),
                                    AugParams(scale=1.0, rot=0.0, flip=True)])
def test_augmented_smpl_parameters_reproduce_augmented_joints(world, augmenting, smpl_models, params):
    """SMPL(augmented pose, re-derived transl) puts its pelvis on keypoints_3d_full[0] and its joints on the rest."""
    for index in (0, 3):
        item = augmenting.get_item(index, params)
        joints = smpl_joints(smpl_models[int(item['gender'])], item['smpl_params'])
        np.testing.assert_allclose(joints[0], item['keypoints_3d_full'][0], atol=2e-5)
        # the synthetic body is symmetric only up to its mesh, hence the looser bound when flipped
        np.testing.assert_allclose(joints, item['keypoints_3d_full'], atol=5e-3 if params.flip else 5e-5)
        if not params.flip and params.rot == 0:
            np.testing.assert_allclose(item['keypoints_3d_full'], world.npz['3d_joints_pv'][index][:24], atol=1e-5)


def reprojection_error(item):
    """Per shared joint: crop-pixel distance between the projected 3D joints (fx, cam_cx, cam_cy; mapped into the
    crop by the box) and the crop keypoints. Also returns the pixel->crop factor, the joint depths and BODY_25 ids."""
    joints = item['keypoints_3d_full'].astype(np.float64)
    fx = float(item['fx']) * 1500
    uv = joints[:, :2] / joints[:, 2:] * fx + [float(item['cam_cx']), float(item['cam_cy'])]
    to_crop = 224 / float(item['box_size'])
    projected = (uv - item['box_center']) * to_crop + 112
    keypoints = (item['keypoints_2d'][:, :2].astype(np.float64) + 0.5) * 224
    body25, smpl = [b for b, _ in SHARED], [j for _, j in SHARED]
    error = np.linalg.norm(projected[smpl] - keypoints[body25], axis=1)
    return error, to_crop, joints[smpl, 2], body25


@pytest.mark.parametrize('seed', range(4))
def test_augmented_joints_reproject_onto_augmented_crop_keypoints(world, augmenting, seed):
    """The 3D augmentation rotates about the camera-z-parallel axis through the crop offset delta at depth tz; the
    image rotates about the box centre, i.e. about that axis scaled to each joint's depth Z. The difference moves a
    joint by 2 sin(rot/2) |delta| |1 - Z/tz| metres; that bound (plus the flip's 1 px and the un-augmented error)
    must hold for every visible joint."""
    rng = np.random.default_rng(seed)
    params = AugParams(scale=rng.uniform(0.7, 1.3), rot=[0.0, 30.0, -45.0, 60.0][seed], flip=seed % 2 == 1,
                       tx=rng.uniform(-0.02, 0.02), ty=rng.uniform(-0.02, 0.02))
    npz = world.npz
    for index in range(0, len(augmenting), 2):
        item = augmenting.get_item(index, params)
        base = augmenting.get_item(index)
        base_error, base_to_crop, _, _ = reprojection_error(base)
        error, to_crop, depth, body25 = reprojection_error(item)
        visible = npz['valid_keypoints'][index][body25, 2] > 0
        base_error = base_error[visible].max()
        tz = npz['transl_pv'][index][2]
        center = npz['center'][index] + np.array([params.tx, params.ty]) * npz['scale'][index] * 1.2 * 200
        offset = np.linalg.norm((center - [npz['cx'][index], npz['cy'][index]]) * tz / npz['fx'][index])
        rotation_bound = (2 * abs(np.sin(np.deg2rad(params.rot) / 2)) * offset * np.abs(1 - depth / tz)
                          * npz['fx'][index] / depth * to_crop)
        allowed = rotation_bound + (to_crop if params.flip else 0.0) + base_error * to_crop / base_to_crop + 1e-2
        assert np.all((error <= allowed)[visible]), (index, error.max(), allowed.min())
        if np.median(rotation_bound[visible]) < 1.0:       # close-up bodies rotated far may move more (bounded above)
            assert np.median(error[visible]) < 3.0


def test_seeded_augmentation_is_reproducible(world):
    first = make_dataset(world, do_augment=True, seed=123)
    second = make_dataset(world, do_augment=True, seed=123)
    other = make_dataset(world, do_augment=True, seed=124)
    a, b, c = first[2], second[2], other[2]
    np.testing.assert_array_equal(a['img'], b['img'])
    np.testing.assert_array_equal(a['keypoints_3d_full'], b['keypoints_3d_full'])
    assert a['box_size'] == b['box_size']
    assert a['box_size'] != c['box_size'] and not np.array_equal(a['img'], c['img'])
    again = first[2]          # a second visit draws a new augmentation, reproducibly
    assert again['box_size'] != a['box_size']
    np.testing.assert_array_equal(again['img'], second[2]['img'])
    first.set_epoch(1)
    in_epoch_1 = first[2]
    assert not np.array_equal(in_epoch_1['img'], second[2]['img'])       # epoch 1 draws anew
    # an epoch's draws do not depend on what earlier epochs read (a resumed run starts in a later epoch)
    fresh = make_dataset(world, do_augment=True, seed=123)
    fresh.set_epoch(1)
    np.testing.assert_array_equal(fresh[2]['img'], in_epoch_1['img'])


# --------------------------------------------------------------------------------------------------------------
# stage-1 translations, errors
# --------------------------------------------------------------------------------------------------------------

def test_stage1_translations(world, tmp_path):
    rows = np.random.default_rng(0).normal(size=(len(world.imgnames), 3)).astype(np.float32)
    path = str(tmp_path / 'results.pkl')
    with open(path, 'wb') as f:
        pickle.dump({'pred_cam_full_list': rows}, f)
    ds = make_dataset(world, spacing=2, load_stage1_transl=True, stage1_result_path=path)
    item = ds[1]
    assert item['stage1_transl_full'].dtype == np.float32
    np.testing.assert_allclose(item['stage1_transl_full'], rows[2])
    with open(path, 'wb') as f:
        pickle.dump({'pred_cam_full_list': rows[:-1]}, f)
    with pytest.raises(DataError, match=f"{len(rows) - 1} rows.*{len(rows)} frames"):
        make_dataset(world, load_stage1_transl=True, stage1_result_path=path)


def test_missing_npz_key_names_file_and_key(world, tmp_path):
    root = tmp_path / 'root'
    (root / egobody.NPZ_FOLDER).mkdir(parents=True)
    arrays = {key: value for key, value in world.npz.items() if key != 'transl_pv'}
    np.savez(root / egobody.NPZ_FOLDER / f'egocapture_{SPLIT}_smpl.npz', **arrays)
    with pytest.raises(DataError, match=r"egocapture_train_smpl\.npz.*'transl_pv'"):
        EgoBodyDataset(CFG, str(root), SPLIT, data_dir=world.data_dir)


def test_missing_files_raise_clear_errors(world, plain, tmp_path):
    with pytest.raises(DataError, match='map_dict_train.pkl'):
        make_dataset(world, s1_root=str(tmp_path))
    with pytest.raises(DataError, match='scene cube folder'):
        make_dataset(world, scene_type='cube', cube_root=str(tmp_path / 'nowhere'))
    with pytest.raises(ValueError, match='scene_type'):
        make_dataset(world, scene_type='room')
    missing = 'egocentric_color/rec/2021-01-01-000000/PV/123_frame_00000.jpg'
    plain_copy = make_dataset(world)
    plain_copy.imgname = [missing] + plain_copy.imgname[1:]
    with pytest.raises(DataError, match=f"cannot read image '.*{missing}'"):
        plain_copy[0]


# --------------------------------------------------------------------------------------------------------------
# body-representation statistics
# --------------------------------------------------------------------------------------------------------------

def brute_force_stats(global_orient, pose):
    features = []
    for go, bp in zip(global_orient, pose):
        frame = []
        for aa in np.concatenate([go, bp]).reshape(24, 3):
            r = cv2.Rodrigues(aa.reshape(3, 1))[0]
            frame += [r[0, 0], r[0, 1], r[1, 0], r[1, 1], r[2, 0], r[2, 1]]
        features.append(frame)
    features = np.array(features)
    std = features.std(axis=0)
    return features.mean(axis=0), np.concatenate([np.full(6, std[:6].mean()), np.full(138, std[6:].mean())])


def test_body_rep_stats_computed_saved_and_reloaded(world, tmp_path):
    stats_dir = str(tmp_path / 'run' / 'preprocess_stats')
    ds = make_dataset(world, get_diffuse_feature=True, train=True, body_rep_stats_dir=stats_dir)
    assert ds.Xmean.shape == ds.Xstd.shape == (144,) and ds.Xmean.dtype == ds.Xstd.dtype == np.float32
    assert len(np.unique(ds.Xstd)) == 2 and np.all(ds.Xstd[:6] == ds.Xstd[0]) and np.all(ds.Xstd[6:] == ds.Xstd[6])
    mean, std = brute_force_stats(world.npz['global_orient_pv'], world.npz['pose'])
    np.testing.assert_allclose(ds.Xmean, mean, atol=1e-5)
    np.testing.assert_allclose(ds.Xstd, std, rtol=1e-4)
    for location in (stats_dir, os.path.join(stats_dir, 'preprocess_stats.npz'), str(tmp_path / 'run')):
        x_mean, x_std = load_body_rep_stats(location)
        np.testing.assert_array_equal(x_mean, ds.Xmean)
        np.testing.assert_array_equal(x_std, ds.Xstd)
    assert make_dataset(world, get_diffuse_feature=True, train=False).Xmean is None


def test_body_rep_stats_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    x_mean, x_std = compute_body_rep_stats(rng.normal(size=(7, 3)), rng.normal(size=(7, 69)) * 0.3)
    path = save_body_rep_stats(str(tmp_path), x_mean, x_std)
    assert path == stats_path(str(tmp_path))
    with np.load(path) as archive:
        assert sorted(archive.files) == ['Xmean', 'Xstd']
    np.testing.assert_array_equal(load_body_rep_stats(path)[1], x_std)
    with pytest.raises(DataError, match='preprocess_stats.npz'):
        load_body_rep_stats(str(tmp_path / 'empty'))
    np.savez(tmp_path / 'bad.npz', Xmean=x_mean[:10], Xstd=x_std)
    with pytest.raises(DataError, match=r"'Xmean' has shape \[10\]"):
        load_body_rep_stats(str(tmp_path / 'bad.npz'))
    with pytest.raises(ValueError, match=r'pose must have shape \[N,69\]'):
        compute_body_rep_stats(np.zeros((2, 3)), np.zeros((2, 72)))


# --------------------------------------------------------------------------------------------------------------
# MoCap
# --------------------------------------------------------------------------------------------------------------

def test_mocap_dataset(world, tmp_path):
    path = os.path.join(world.data_dir, 'datasets', 'cmu_mocap.npz')
    ds = MoCapDataset(path)
    with np.load(path) as archive:
        body_pose, betas = archive['body_pose'], archive['betas']
    assert len(ds) == len(body_pose) > 0
    item = ds[len(ds) - 1]
    assert item['body_pose'].shape == (69,) and item['body_pose'].dtype == np.float32
    assert item['betas'].shape == (10,) and item['betas'].dtype == np.float32
    np.testing.assert_allclose(item['body_pose'], body_pose[-1, 3:], rtol=1e-6)
    np.testing.assert_allclose(item['betas'], betas[-1], rtol=1e-6)
    np.savez(tmp_path / 'mocap.npz', body_pose=body_pose)
    with pytest.raises(DataError, match=r"mocap\.npz.*'betas'"):
        MoCapDataset(str(tmp_path / 'mocap.npz'))
