"""The synthetic EgoBody-format world: files, frame chain, SMPL parameters, keypoints, images, scene density."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from dataloaders.scene_preprocess import read_obj_vertices
from synthetic import world as W
from synthetic.scenes import Box, Panel, make_room
from utils.body_model import SMPL_TO_OPENPOSE, create_smpl
from utils.egobody import (NPZ_KEYS, NPZ_SHAPES, SPLITS, annotation_npz_path, frame_transforms, load_kinect_to_scene,
                           load_recording_scenes, parse_imgname, scene_mesh_path, scene_to_pv)
from utils.geometry import ADD_TRANS, transform_points
from utils.io import load_npz_checked, load_pickle


@pytest.fixture(scope='module')
def annotations(synthetic_world):
    root = synthetic_world.dataset_root
    return {s: load_npz_checked(annotation_npz_path(root, s), NPZ_KEYS, shapes=NPZ_SHAPES) for s in SPLITS}


@pytest.fixture(scope='module')
def plan(synthetic_world):
    """The world re-planned in memory with the fixture's arguments (must equal what is on disk)."""
    from tests.conftest import TINY_WORLD
    return W.plan_world(synthetic_world.data_dir, **TINY_WORLD)


def _frames(synthetic_world, annotations):
    """(split, index, npz row dict, T_scene2pv(OpenCV), scene name) for every frame, via the on-disk chain."""
    root = synthetic_world.dataset_root
    for split, ann in annotations.items():
        for i, imgname in enumerate(ann['imgname']):
            rec, _, _ = parse_imgname(str(imgname))
            scene = load_recording_scenes(root)[rec]
            k2h, h2pv = frame_transforms(root, str(imgname))
            T = scene_to_pv(load_kinect_to_scene(root, rec, scene), k2h.astype(np.float64), h2pv.astype(np.float64))
            yield split, i, {k: v[i] for k, v in ann.items()}, T, scene


def test_every_split_nonempty_and_keys_dtypes(synthetic_world, annotations):
    for split, ann in annotations.items():
        n = len(ann['imgname'])
        assert n > 0, split
        assert ann['imgname'].dtype.kind == 'U' and ann['gender'].dtype.kind == 'U'
        assert set(np.unique(ann['gender'])) <= {'m', 'f'}
        assert ann['3d_joints_pv'].shape == (n, 45, 3)
        for key in ('center', 'scale', 'valid_keypoints', '3d_joints_pv', 'pose', 'shape', 'global_orient_pv',
                    'transl_pv', 'fx', 'fy', 'cx', 'cy'):
            assert ann[key].dtype == np.float64 and ann[key].shape[0] == n, key
        assert np.all((ann['fx'] > 1440) & (ann['fx'] < 1510)) and np.allclose(ann['fx'], ann['fy'], atol=1.0)
        assert np.all((ann['cx'] >= 950) & (ann['cx'] <= 970) & (ann['cy'] >= 500) & (ann['cy'] <= 520))
    summary = synthetic_world.summary
    assert summary['frames'] == {s: len(annotations[s]['imgname']) for s in SPLITS}
    names = [r for s in SPLITS for r in summary['recordings'][s]]
    assert len(names) == len(set(names)) == 3


def test_csv_and_calibration_files(synthetic_world):
    import pandas as pd
    root = synthetic_world.dataset_root
    table = pd.read_csv(os.path.join(root, 'data_info_release.csv'))
    for column in ('recording_name', 'scene_name', 'body_idx_fpv', 'body_idx_0', 'body_idx_1', 'start_frame',
                   'end_frame'):
        assert column in table.columns
    for _, row in table.iterrows():
        idx, gender = row['body_idx_fpv'].split(' ')
        assert row[f'body_idx_{idx}'] == gender
        holo = json.load(open(os.path.join(root, 'calibrations', row['recording_name'], 'cal_trans',
                                           'holo_to_kinect12.json')))['trans']
        transforms = load_pickle(os.path.join(root, 'transf_matrices_all_seqs.pkl'))
        k2h = transforms[row['recording_name']]['trans_kinect2holo']
        np.testing.assert_allclose(np.asarray(holo) @ k2h, np.eye(4), atol=1e-9)
        assert os.path.isfile(scene_mesh_path(root, row['scene_name']))
    color = json.load(open(os.path.join(root, 'kinect_cam_params', 'kinect_master', 'Color.json')))
    assert len(color['f']) == 2 and len(color['c']) == 2


def test_frame_chain_round_trip(synthetic_world, annotations):
    """The four transforms compose to a rigid scene->PV map whose inverse brings PV points back exactly, and the
    pv.txt pv2world rows are the inverses of the pkl's world2pv."""
    root = synthetic_world.dataset_root
    rng = np.random.default_rng(0)
    points = rng.uniform(-3, 3, (50, 3))
    for _, _, row, T, _ in _frames(synthetic_world, annotations):
        R = T[:3, :3]
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-5)
        assert np.linalg.det(R) > 0
        back = transform_points(transform_points(points, T), np.linalg.inv(T))
        np.testing.assert_allclose(back, points, atol=1e-5)
        # the same chain spelled out: ADD_TRANS @ holo2pv @ kinect2holo @ inv(kinect2scene)
        rec, date, _ = parse_imgname(str(row['imgname']))
        k2h, h2pv = frame_transforms(root, str(row['imgname']))
        k2s = load_kinect_to_scene(root, rec, load_recording_scenes(root)[rec])
        chain = ADD_TRANS @ h2pv @ k2h @ np.linalg.inv(k2s)
        np.testing.assert_allclose(chain, T, atol=1e-4)
    rec, date, _ = parse_imgname(str(annotations['test']['imgname'][0]))
    lines = open(os.path.join(root, 'egocentric_color', rec, date, f'{date}_pv.txt')).read().splitlines()
    cx, cy, w, h = (float(v) for v in lines[0].split(','))
    assert (w, h) == (1920, 1080) and cx == annotations['test']['cx'][0]
    world2pv = load_pickle(os.path.join(root, 'transf_matrices_all_seqs.pkl'))[rec]['trans_world2pv']
    for line in lines[1:]:
        values = line.split(',')
        pv2world = np.array(values[3:19], float).reshape(4, 4)
        i = [os.path.basename(str(n)).split('_')[0] for n in annotations['test']['imgname']].index(values[0])
        assert (float(values[1]), float(values[2])) == (annotations['test']['fx'][i], annotations['test']['fy'][i])
        np.testing.assert_allclose(pv2world @ world2pv[values[0]], np.eye(4), atol=1e-9)


def test_smpl_params_reproduce_joints(synthetic_world, annotations):
    models = {g: create_smpl(synthetic_world.data_dir, g) for g in ('male', 'female')}
    for ann in annotations.values():
        for gender_code, gender in (('m', 'male'), ('f', 'female')):
            sel = ann['gender'] == gender_code
            if not sel.any():
                continue
            t = {k: torch.tensor(ann[k][sel], dtype=torch.float32)
                 for k in ('pose', 'shape', 'global_orient_pv', 'transl_pv')}
            with torch.no_grad():
                out = models[gender](body_pose=t['pose'], betas=t['shape'], global_orient=t['global_orient_pv'],
                                     transl=t['transl_pv'])
            assert np.abs(out.joints.numpy() - ann['3d_joints_pv'][sel]).max() < 1e-4


def test_keypoints_are_projected_joints(annotations):
    total_visible = 0
    for ann in annotations.values():
        joints = ann['3d_joints_pv'][:, SMPL_TO_OPENPOSE]
        fx, cx, cy = ann['fx'][:, None], ann['cx'][:, None], ann['cy'][:, None]
        uv = np.stack([fx * joints[..., 0] / joints[..., 2] + cx, fx * joints[..., 1] / joints[..., 2] + cy], -1)
        kp = ann['valid_keypoints']
        visible = kp[..., 2] > 0
        inside = ((joints[..., 2] > 0) & (uv[..., 0] >= 0) & (uv[..., 0] < 1920)
                  & (uv[..., 1] >= 0) & (uv[..., 1] < 1080))
        np.testing.assert_array_equal(visible, inside)
        assert np.abs(uv[visible] - kp[visible][:, :2]).max() < 1.0
        assert np.all((kp[visible][:, 2] >= 0.6) & (kp[visible][:, 2] <= 0.95))
        assert np.all(visible.sum(axis=1) >= 6)
        for i in range(len(kp)):
            pts = kp[i, visible[i], :2]
            np.testing.assert_allclose(ann['center'][i], pts.mean(axis=0), atol=1e-6)
            np.testing.assert_allclose(ann['scale'][i], (pts.max(0) - pts.min(0)).max() / 200 * 1.2, atol=1e-6)
        total_visible += visible.sum()
    assert total_visible > 0


def test_bodies_rest_on_floor_or_seat(synthetic_world, annotations):
    """Mapped to the scene through the on-disk chain, no body vertex is below the floor by more than 1 cm; standing
    bodies touch the floor, seated ones have their pelvis above a seat and their feet above the floor."""
    models = {'m': create_smpl(synthetic_world.data_dir, 'male', dtype=torch.float64),
              'f': create_smpl(synthetic_world.data_dir, 'female', dtype=torch.float64)}
    floors = {}
    for _, _, row, T, scene in _frames(synthetic_world, annotations):
        if scene not in floors:
            floors[scene] = read_obj_vertices(scene_mesh_path(synthetic_world.dataset_root, scene))[:, 1].min()
        with torch.no_grad():
            out = models[str(row['gender'])](
                body_pose=torch.tensor(row['pose'])[None], betas=torch.tensor(row['shape'])[None],
                global_orient=torch.tensor(row['global_orient_pv'])[None], transl=torch.tensor(row['transl_pv'])[None])
        verts = transform_points(out.vertices[0].numpy(), np.linalg.inv(T))
        lowest = verts[:, 1].min() - floors[scene]
        assert lowest >= -0.01
        pelvis_height = transform_points(out.joints[0, :1].numpy(), np.linalg.inv(T))[0, 1] - floors[scene]
        assert lowest <= 0.01 or pelvis_height < 0.9   # standing on the floor, or seated (pelvis low)


def test_scene_density_for_preprocessing(synthetic_world, annotations):
    """Stage 1 keeps scene vertices with z > 0 in PV: at least 20000 in every frame."""
    vertices = {}
    for _, _, _, T, scene in _frames(synthetic_world, annotations):
        if scene not in vertices:
            vertices[scene] = read_obj_vertices(scene_mesh_path(synthetic_world.dataset_root, scene))
        z = vertices[scene] @ T[2, :3] + T[2, 3]
        assert (z > 0).sum() >= 20000


def test_scene_density_for_cube_crops(synthetic_world, plan):
    """Stage 2 keeps a randomly turned and shifted 2x2 m square around the body, up to 2 m above its lowest point:
    at least 20000 scene vertices for every frame and random draw (the original script exits otherwise)."""
    rng = np.random.default_rng(5)
    for rec in plan.recordings:
        vertices = read_obj_vertices(scene_mesh_path(synthetic_world.dataset_root, rec.scene))
        for body in rec.body.verts:
            center = body.mean(axis=0)
            for _ in range(4):
                theta = rng.uniform(0, 2 * np.pi)
                rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
                points = (vertices[:, [0, 2]] - center[[0, 2]]) @ rot.T
                extent = (body[:, [0, 2]] - center[[0, 2]]) @ rot.T
                shift = rng.uniform(np.maximum(-0.5, extent.max(0) - 1), np.minimum(0.5, 1 + extent.min(0)))
                heights = vertices[np.all(np.abs(points - shift) <= 1.0, axis=1), 1]
                assert (heights <= heights.min() + 2).sum() >= 20000


def test_images_show_the_body(synthetic_world, annotations, plan):
    """Every image exists at 1920x1080; around the projected pelvis it differs from a render of the empty scene."""
    import cv2
    from utils.renderer import Renderer
    checked = 0
    renderer = None
    for _, i, row, T, scene in _frames(synthetic_world, annotations):
        image = cv2.imread(os.path.join(synthetic_world.dataset_root, str(row['imgname'])))
        assert image is not None and image.shape == (1080, 1920, 3)
        x, y, conf = row['valid_keypoints'][8]
        if checked >= 3 or conf == 0 or not (20 <= x < 1900 and 20 <= y < 1060):
            continue
        renderer = renderer or Renderer(1920, 1080)
        intrinsics = (row['fx'], row['fy'], row['cx'], row['cy'])
        empty, _ = renderer.render([(plan.rooms[scene].render_mesh(), None)], K=intrinsics,
                                   cam_pose_opencv_to_world=np.linalg.inv(T), ambient=(0.35, 0.35, 0.35))
        window = np.s_[int(y) - 15:int(y) + 16, int(x) - 15:int(x) + 16]
        difference = np.abs(image[window].astype(float) - empty[..., ::-1][window].astype(float)).mean()
        assert difference > 25, (row['imgname'], difference)
        # away from the body the render of the empty scene matches the image (same camera, same scene)
        corner = np.s_[0:40, 0:40] if x > 300 else np.s_[0:40, -40:]
        assert np.abs(image[corner].astype(float) - empty[..., ::-1][corner].astype(float)).mean() < 12
        checked += 1
    if renderer is not None:
        renderer.close()
    assert checked > 0


def test_plan_is_deterministic_and_matches_files(annotations, plan):
    for split in SPLITS:
        regenerated = W.split_annotation(plan, split)
        for key in NPZ_KEYS:
            np.testing.assert_array_equal(regenerated[key], annotations[split][key], err_msg=key)


def test_summary_share_outside(synthetic_world, annotations):
    outside = []
    for ann in annotations.values():
        j = ann['3d_joints_pv'][:, :24]
        u = ann['fx'][:, None] * j[..., 0] / j[..., 2] + ann['cx'][:, None]
        v = ann['fx'][:, None] * j[..., 1] / j[..., 2] + ann['cy'][:, None]
        outside += list(~np.all((u >= 0) & (u < 1920) & (v >= 0) & (v < 1080), axis=1))
    assert synthetic_world.summary['share_frames_joints_outside'] == pytest.approx(np.mean(outside))
    for split, ann in annotations.items():     # per split, from the files, against the summary
        j = ann['3d_joints_pv'][:, :24]
        u = ann['fx'][:, None] * j[..., 0] / j[..., 2] + ann['cx'][:, None]
        v = ann['fx'][:, None] * j[..., 1] / j[..., 2] + ann['cy'][:, None]
        share = np.mean(~np.all((u >= 0) & (u < 1920) & (v >= 0) & (v < 1080), axis=1))
        assert synthetic_world.summary['share_frames_joints_outside_per_split'][split] == pytest.approx(share)


def _demo_sizes():
    """{size: (recordings, frames, world seed)} as demo.sh sets them for tiny and small."""
    import re
    text = open(os.path.join(os.path.dirname(__file__), '..', 'demo.sh')).read()
    sizes = {}
    for name in ('tiny', 'small'):
        line = re.search(rf'^\s*{name}\)(.*);;', text, re.M).group(1)
        value = {k: int(v) for k, v in re.findall(r'(\w+)=(\d+)', line)}
        sizes[name] = (value['RECS'], value['FRAMES'], value['WSEED'])
    return sizes


@pytest.mark.parametrize('size', ['tiny', 'small'])
def test_demo_worlds_have_cut_and_seated_frames_in_every_split(tmp_path, size):
    """Every split of the demo worlds: >= 30 % of frames with a joint outside the image, and a seated body."""
    from synthetic.body_model import write_body_model_files
    recordings, frames, seed = _demo_sizes()[size]
    write_body_model_files(str(tmp_path), seed=seed)         # as make_world does: the body model follows the seed
    plan = W.plan_world(str(tmp_path), recordings, frames, seed)
    for split in SPLITS:
        assert W.outside_share(plan, split) >= 0.3, split
        assert W.seated_share(plan, split) > 0, split
        for rec in plan.recordings:      # a cut frame: some joint outside, yet >= 6 keypoints detected
            if rec.split == split:
                assert (rec.annotation['valid_keypoints'][:, :, 2] > 0).sum(axis=1).min() >= W.MIN_VISIBLE_KEYPOINTS


def test_framing_plan_covers_every_split():
    split_of = ['train'] * 7 + ['val', 'test', 'test']
    cut, seated = W.framing_plan(split_of)
    assert sum(cut[:7]) == 3 and cut[7] and sum(cut[8:]) == 1
    assert seated[6] and seated[7] and seated[9] and sum(seated) == 3


# ------------------------------------------------------------------------------------------ small unit tests

def test_pv_smpl_params_formula():
    """transl_pv = R (transl_s + J0) + t - J0 maps an SMPL-like rotation about J0 exactly."""
    rng = np.random.default_rng(1)
    from scipy.spatial.transform import Rotation
    R_s, T = Rotation.random(random_state=rng).as_matrix(), W.rigid(Rotation.random(random_state=rng).as_matrix(),
                                                                       rng.normal(size=3))
    j0, t_s, v = rng.normal(size=3), rng.normal(size=3), rng.normal(size=(20, 3))
    scene = (v - j0) @ R_s.T + j0 + t_s
    orient, transl = W.pv_smpl_params(R_s, t_s, T, j0)
    R_pv = Rotation.from_rotvec(orient).as_matrix()
    np.testing.assert_allclose((v - j0) @ R_pv.T + j0 + transl, transform_points(scene, T), atol=1e-12)


def test_world_to_pv_chain_inverts():
    rng = np.random.default_rng(2)
    from scipy.spatial.transform import Rotation
    k2s, k2h, pv2s = (W.rigid(Rotation.random(random_state=rng).as_matrix(), rng.normal(size=3)) for _ in range(3))
    world2pv = W.world_to_pv_chain(k2s, k2h, pv2s)
    np.testing.assert_allclose(scene_to_pv(k2s, k2h, world2pv) @ pv2s, np.eye(4), atol=1e-12)


def test_look_rotation_is_opencv():
    R = W.look_rotation(np.array([0.0, 0.0, 1.0]))
    np.testing.assert_allclose(R, np.diag([-1.0, -1.0, 1.0]), atol=1e-12)  # right = -x, down = -y, forward = +z
    R = W.look_rotation(np.array([1.0, -0.3, 0.2]), roll=0.2)
    np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-12)
    assert np.linalg.det(R) == pytest.approx(1.0)


def test_panel_grid_faces_outward_and_box_segment():
    panel = Panel(np.zeros(3), np.array([1.0, 0, 0]), np.array([0, 0, -0.5]), (0, 0, 0))
    verts, faces = panel.grid(0.1)
    assert len(verts) == 11 * 6 and len(faces) == 2 * 10 * 5
    tri = verts[faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    assert np.all(normals @ panel.normal > 0) and np.allclose(panel.normal, [0, 1, 0])
    box = Box(np.zeros(3), np.array([1.0, 1.0, 1.0]), 0.3)
    assert box.segment_hits(np.array([-2.0, 0, 0]), np.array([2.0, 0, 0]))
    assert not box.segment_hits(np.array([-2.0, 2, 0]), np.array([2.0, 2, 0]))


def test_room_mesh_density_and_free_space():
    room = make_room('r', np.random.default_rng(3), 'livingroom')
    verts, faces = room.dense_mesh()
    assert faces.max() < len(verts) and len(verts) > 60000
    floor = verts[np.abs(verts[:, 1] - room.floor_y) < 1e-9]
    center = room.center[[0, 2]]
    patch = np.all(np.abs(floor[:, [0, 2]] - center) <= 1.0, axis=1)
    assert patch.sum() >= 20000                     # a 2x2 m floor square alone is dense enough for stage 2
    for item in room.furniture:
        assert not room.free(item.center[[0, 2]], 0.0)[0]
    assert room.seats(), 'a living room has a sofa and chairs'


def test_bad_arguments():
    with pytest.raises(ValueError, match='num_recordings'):
        W._check_args(2, 5, (1920, 1080), W.DEFAULT_SPLITS)
    with pytest.raises(ValueError, match='frames_per_recording'):
        W._check_args(3, 0, (1920, 1080), W.DEFAULT_SPLITS)
    splits = W.assign_splits(5, (0.6, 0.2, 0.2), np.random.default_rng(0))
    assert sorted(splits) == ['test', 'train', 'train', 'train', 'val']


def test_renderer_projection_matches_pinhole():
    """A small sphere rendered with OpenCV-convention K and camera pose lands on its pinhole projection."""
    import trimesh
    from utils.renderer import Renderer, body_material
    from scipy.spatial.transform import Rotation
    rng = np.random.default_rng(4)
    cam_to_world = W.rigid(Rotation.random(random_state=rng).as_matrix(), rng.normal(size=3))
    K = (300.0, 310.0, 140.0, 100.0)
    point_cam = np.array([0.3, -0.2, 3.0])                   # right of and above the principal point
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.05)
    sphere.apply_translation(transform_points(point_cam[None], cam_to_world)[0])
    with Renderer(320, 240) as renderer:
        rgb, depth = renderer.render([(sphere, body_material())], K, cam_pose_opencv_to_world=cam_to_world)
    assert rgb.shape == (240, 320, 3) and rgb.dtype == np.uint8
    ys, xs = np.nonzero(depth > 0)
    expected = W.project(point_cam, K[0], K[1], K[2], K[3])
    np.testing.assert_allclose([xs.mean(), ys.mean()], expected - 0.5, atol=0.6)
    assert depth[depth > 0].min() == pytest.approx(3.0 - 0.05, abs=0.01)


def test_make_synthetic_data_prints_the_shares_per_split(synthetic_world):
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), '..', 'make_synthetic_data.py')
    spec = importlib.util.spec_from_file_location('_make_synthetic_data', path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    text = script.format_summary(synthetic_world.summary)
    assert 'joints outside image' in text.splitlines()[0] and 'seated' in text.splitlines()[0]
    for split in SPLITS:
        row = next(line for line in text.splitlines() if line.startswith(split + ' '))
        share = synthetic_world.summary['share_frames_joints_outside_per_split'][split]
        assert f"{100 * share:.0f}% of frames" in row
