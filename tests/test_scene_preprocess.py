"""Scene preprocessing (stage-1 front-of-camera crops, stage-2 cubes): library functions and the three scripts.

Most script tests run on a small hand-built EgoBody-layout root (``tiny_root``) whose cameras and bodies are
placed on purpose (one stage-1 centre sits in a room corner so its crop is too small); one test per script runs
the script as a subprocess on the shared synthetic world.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch

import preprocess_scene_s1 as s1
import preprocess_scene_s2_for_test as s2_test
import preprocess_scene_s2_for_train as s2_train
from dataloaders import scene_preprocess as sp
from utils import egobody
from utils.body_model import create_smpl
from utils.geometry import ADD_TRANS, rotation_about_y, rotmat_to_aa, transform_points
from utils.io import DataError, atomic_np_savez, atomic_pickle_dump

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = sp.SCENE_VERTS_NUM_TARGET


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------
def random_rigid(rng) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = q, rng.normal(size=3) * 3
    return T


def camera_scene_to_pv(position, target) -> np.ndarray:
    """Scene (y up) -> OpenCV camera at ``position`` looking at ``target`` (x right, y down, z forward)."""
    forward = np.asarray(target, float) - position
    forward[1] = 0.0  # keep the camera level so y is straight down
    forward /= np.linalg.norm(forward)
    down = np.array([0.0, -1.0, 0.0])
    right = np.cross(down, forward)
    R = np.stack([right, down, forward], axis=1)  # camera -> scene
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R.T, -R.T @ position
    return T


def yawed_xz(points, centre, theta):
    """Brute force: rotate by rotation_about_y(theta) about the vertical through centre; x/z offsets."""
    rotated = (points - centre) @ rotation_about_y(theta).T
    return rotated[:, 0], rotated[:, 2]


def kth_reference(points, target):
    k = len(points) // target
    return points[::k][:target]


# ------------------------------------------------------------------------------------------------------------------
# library: decimation, mesh reading
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('n, target, k', [(1000, 300, 3), (1000, 1000, 1), (999, 499, 2), (60001, 20000, 3)])
def test_decimate_every_kth_keeps_every_kth_vertex_in_order(n, target, k):
    points = np.arange(3 * n, dtype=np.float64).reshape(n, 3)
    out = sp.decimate_every_kth(points, target)
    assert out.shape == (target, 3)
    np.testing.assert_array_equal(out, points[np.arange(target) * k])


def test_decimate_pads_short_crops_by_repetition_with_a_warning(caplog):
    points = np.arange(21, dtype=np.float64).reshape(7, 3)
    with caplog.at_level(logging.WARNING, logger=sp.__name__):
        out = sp.decimate_every_kth(points, 20, what='frame_x')
    assert out.shape == (20, 3)
    np.testing.assert_array_equal(out, points[np.arange(20) % 7])
    assert any('frame_x' in r.message and 'padded' in r.message for r in caplog.records)


def test_decimate_rejects_empty_crop_and_bad_target():
    with pytest.raises(DataError, match='frame_y'):
        sp.decimate_every_kth(np.zeros((0, 3)), 5, what='frame_y')
    with pytest.raises(ValueError):
        sp.decimate_every_kth(np.zeros((4, 3)), 0)


def test_read_obj_vertices_keeps_every_v_record_in_file_order(tmp_path):
    rng = np.random.default_rng(0)
    vertices = rng.normal(size=(12, 3))
    lines = ['# header', 'mtllib room.mtl']
    lines += ['v %.17g %.17g %.17g 0.5 0.25 1' % tuple(v) for v in vertices[:6]]  # with colours
    lines += ['vt 0 0', 'vt 1 0', 'vn 0 0 1']
    lines += ['v\t%.17g %.17g %.17g' % tuple(v) for v in vertices[6:]]
    lines += ['f 5/1/1 2/2/1 8/1/1', 'f 4/2/1 1/1/1 3/2/1']  # vertices 9..12 are referenced by no face
    path = tmp_path / 'room.obj'
    path.write_text('\r\n'.join(lines) + '\r\n')
    np.testing.assert_array_equal(sp.read_obj_vertices(str(path)), vertices)


def test_read_obj_vertices_agrees_with_trimesh_on_a_plain_mesh(tmp_path):
    import trimesh
    rng = np.random.default_rng(1)
    vertices = rng.normal(size=(30, 3))
    faces = np.stack([np.arange(28), np.arange(1, 29), np.arange(2, 30)], axis=1)[rng.permutation(28)]
    path = tmp_path / 'plain.obj'
    path.write_text(''.join('v %.17g %.17g %.17g\n' % tuple(v) for v in vertices)
                    + ''.join('f %d %d %d\n' % tuple(f + 1) for f in faces))
    mesh = trimesh.load(str(path), force='mesh', process=False, maintain_order=True)
    np.testing.assert_array_equal(sp.read_obj_vertices(str(path)), np.asarray(mesh.vertices))


def test_read_obj_vertices_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match='missing scene mesh'):
        sp.read_obj_vertices(str(tmp_path / 'nope.obj'))
    empty = tmp_path / 'empty.obj'
    empty.write_text('# nothing\nvt 0 0\n')
    with pytest.raises(DataError, match='empty.obj'):
        sp.read_obj_vertices(str(empty))


def test_scene_mesh_cache_reads_each_scene_once(tmp_path, monkeypatch):
    folder = tmp_path / 'scene_mesh' / 'hall'
    folder.mkdir(parents=True)
    (folder / 'hall.obj').write_text('v 0 0 0\nv 1 2 3\n')
    calls = []
    original = sp.read_obj_vertices
    monkeypatch.setattr(sp, 'read_obj_vertices', lambda path: calls.append(path) or original(path))
    cache = sp.SceneMeshCache(str(tmp_path))
    first, second = cache.vertices('hall'), cache.vertices('hall')
    assert first is second and len(calls) == 1 and len(cache) == 1
    np.testing.assert_array_equal(first, [[0, 0, 0], [1, 2, 3]])
    assert not first.flags.writeable


# ------------------------------------------------------------------------------------------------------------------
# library: stage 1
# ------------------------------------------------------------------------------------------------------------------
def test_s1_saved_frames_every_15_and_at_every_recording_change():
    recordings = ['a'] * 20 + ['b'] * 3 + ['a'] * 17
    saved = sp.s1_saved_frames(recordings)
    expected = [0] * 15 + [15] * 5 + [20] * 3 + [23] * 7 + [30] * 10
    assert saved.tolist() == expected
    assert all(recordings[s] == r for s, r in zip(saved, recordings))


def test_crop_in_front_of_camera_matches_the_original_chain():
    rng = np.random.default_rng(2)
    scene = rng.uniform(-4, 4, size=(70000, 3))
    T_k2s, T_k2h, T_h2pv = random_rigid(rng), random_rigid(rng), random_rigid(rng)
    T_k2pv = egobody.kinect_to_pv(T_k2h, T_h2pv)
    crop, available = sp.crop_in_front_of_camera(scene, T_k2s, T_k2pv, TARGET, what='f')
    # original order: scene -> kinect -> holo -> pv(OpenGL) -> pv(OpenCV); keep z > 0; decimate; map back.
    pv = transform_points(transform_points(transform_points(
        transform_points(scene, np.linalg.inv(T_k2s)), T_k2h), T_h2pv), ADD_TRANS)
    front = pv[pv[:, 2] > 0]
    expected = transform_points(transform_points(transform_points(
        kth_reference(front, TARGET), ADD_TRANS), np.linalg.inv(T_h2pv)), np.linalg.inv(T_k2h))
    assert available == len(front) and crop.shape == (TARGET, 3) and crop.dtype == np.float64
    np.testing.assert_allclose(crop, expected, atol=1e-9)
    assert (transform_points(crop, T_k2pv)[:, 2] > 0).all()


# ------------------------------------------------------------------------------------------------------------------
# library: stage 2
# ------------------------------------------------------------------------------------------------------------------
def test_yawed_offsets_follow_rotation_about_y():
    rng = np.random.default_rng(3)
    points, centre = rng.normal(size=(50, 3)), rng.normal(size=3)
    for theta in (0.0, 0.7, np.pi, 5.5):
        x, z = sp.yawed_offsets(points, centre, theta)
        bx, bz = yawed_xz(points, centre, theta)
        np.testing.assert_allclose(x, bx, atol=1e-12)
        np.testing.assert_allclose(z, bz, atol=1e-12)


def test_cube_crop_matches_brute_force_prism():
    rng = np.random.default_rng(4)
    floor = np.c_[rng.uniform(-3, 3, 300000), rng.normal(0, 0.01, 300000), rng.uniform(-3, 3, 300000)]
    clutter = rng.uniform([-3, -0.5, -3], [3, 4, 3], size=(60000, 3))
    scene = np.concatenate([floor, clutter])[rng.permutation(360000)]
    centre, theta, shift = np.array([0.3, 0.9, -0.2]), 1.1, (0.25, -0.4)
    crop, available = sp.cube_crop(scene, centre, theta, shift, 2.0, TARGET, what='f')
    x, z = yawed_xz(scene, centre, theta)
    inside = scene[(x >= shift[0] - 1) & (x <= shift[0] + 1) & (z >= shift[1] - 1) & (z <= shift[1] + 1)]
    inside = inside[inside[:, 1] <= inside[:, 1].min() + 2.0]
    assert available == len(inside) > TARGET
    assert inside[:, 1].max() < 2.0 < scene[:, 1].max()  # the height limit removed some clutter
    np.testing.assert_array_equal(crop, kth_reference(inside, TARGET))
    assert crop.dtype == np.float64 and crop.shape == (TARGET, 3)


def test_cube_shift_bounds_hand_computed_and_keep_the_body_inside():
    body = np.array([[-0.9, 0.0, 0.1], [0.7, 1.0, -0.2], [0.0, 0.5, 0.0]])
    centre = np.zeros(3)
    (x_low, x_high), (z_low, z_high) = sp.cube_shift_bounds(body, centre, 0.0, 2.0)
    assert (x_low, x_high) == pytest.approx((-0.3, 0.1))   # max(-.5, .7-1), min(.5, 1-.9)
    assert (z_low, z_high) == pytest.approx((-0.5, 0.5))   # body z extent is small
    rng = np.random.default_rng(5)
    body = rng.normal(size=(500, 3)) * [0.25, 0.8, 0.15] + [2.0, 1.0, -1.0]
    centre = body.mean(axis=0)
    for index in range(50):
        theta, (sx, sz) = sp.draw_cube_yaw_and_shift(sp.frame_rng(0, index), body, centre, 2.0)
        assert 0.0 <= theta < 2 * np.pi and abs(sx) <= 0.5 and abs(sz) <= 0.5
        x, z = yawed_xz(body, centre, theta)
        assert (np.abs(x - sx) <= 1.0).all() and (np.abs(z - sz) <= 1.0).all()


def test_frame_rng_depends_only_on_seed_and_index():
    def draw(seed, index):
        return sp.draw_cube_yaw_and_shift(sp.frame_rng(seed, index), None, np.zeros(3))
    assert draw(0, 7) == draw(0, 7)
    assert draw(0, 7) != draw(1, 7) and draw(0, 7) != draw(0, 8)
    assert draw(0, 7)[1] == (0.0, 0.0)


def test_smpl_genders_maps_m_f_and_names_a_bad_frame():
    assert sp.smpl_genders(np.array(['m', 'f', 'm']), ['a', 'b', 'c']) == ['male', 'female', 'male']
    assert sp.smpl_genders([b'f'], ['a']) == ['female']
    with pytest.raises(DataError, match=r"frame 'img_2'.*'x'"):
        sp.smpl_genders(['m', 'f', 'x'], ['img_0', 'img_1', 'img_2'])


# ------------------------------------------------------------------------------------------------------------------
# a tiny EgoBody-layout root with placed cameras and bodies
# ------------------------------------------------------------------------------------------------------------------
FLOOR_Y = -1.2
FLOOR_LO, FLOOR_HI = np.array([7.5, 2.5]), np.array([12.5, 7.5])   # x, z extent of the 5x5 m floor
CORNER_FRAME = 5  # its fake stage-1 translation sits in a floor corner: too few points for a 20000-point cube


def build_room_vertices() -> np.ndarray:
    grid = np.arange(400) * 0.0125
    gx, gz = np.meshgrid(FLOOR_LO[0] + grid, FLOOR_LO[1] + grid, indexing='ij')
    floor = np.c_[gx.ravel(), np.full(gx.size, FLOOR_Y), gz.ravel()]
    wx, wy = np.meshgrid(np.arange(FLOOR_LO[0], FLOOR_HI[0], 0.04), np.arange(FLOOR_Y, FLOOR_Y + 2.6, 0.04))
    wall = np.c_[wx.ravel(), wy.ravel(), np.full(wx.size, FLOOR_HI[1])]
    return np.concatenate([floor, wall])


def rotmat_to_axis_angle(R: np.ndarray) -> np.ndarray:
    return rotmat_to_aa(torch.as_tensor(R, dtype=torch.float64)[None])[0].numpy()


def build_tiny_root(root: str, seed: int = 0) -> types.SimpleNamespace:
    """Three recordings (two in the same scene) with 20 + 7 + 18 frames; returns the placed geometry."""
    rng = np.random.default_rng(seed)
    vertices = build_room_vertices()
    recordings = {'recording_a': ('room', 20), 'recording_b': ('room', 7), 'recording_c': ('hall', 18)}
    for scene in ('room', 'hall'):
        path = egobody.scene_mesh_path(root, scene)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'w') as f:
            f.write('vt 0 0\n')
            np.savetxt(f, vertices, fmt='v %.5f %.5f %.5f')
            f.write('f 1/1 2/1 401/1\n')
    pd.DataFrame({'recording_name': list(recordings), 'scene_name': [s for s, _ in recordings.values()],
                  'body_idx_fpv': ['0 male'] * 3}).to_csv(os.path.join(root, egobody.DATA_INFO_CSV), index=False)
    transf, imgnames, transl_pv, orient_pv, genders, scene_to_pv = {}, [], [], [], [], []
    for r, (recording, (scene, count)) in enumerate(recordings.items()):
        T_k2s, T_k2h = random_rigid(rng), random_rigid(rng)
        calib = egobody.kinect_to_scene_path(root, recording, scene)
        os.makedirs(os.path.dirname(calib), exist_ok=True)
        with open(calib, 'w') as f:
            json.dump({'trans': T_k2s.tolist()}, f)
        world2pv = {}
        for j in range(count):
            ts = str(132754997786014666 + 1000 * (100 * r + j))
            imgnames.append(f'egocentric_color/{recording}/2021-09-0{r + 1}-155421/PV/{ts}_frame_{j:05d}.jpg')
            body = np.array([rng.uniform(9.7, 10.3), FLOOR_Y + 1.0, rng.uniform(4.7, 5.3)])
            angle = rng.uniform(0, 2 * np.pi)
            camera = body + [2.0 * np.cos(angle), 0.6, 2.0 * np.sin(angle)]
            T_s2pv = camera_scene_to_pv(camera, body)
            # T_s2pv = ADD . T_h2pv . T_k2h . inv(T_k2s)  =>  T_h2pv = ADD . T_s2pv . T_k2s . inv(T_k2h)
            world2pv[ts] = ADD_TRANS @ T_s2pv @ T_k2s @ np.linalg.inv(T_k2h)
            T_s2pv_used = egobody.scene_to_pv(T_k2s, T_k2h.astype(np.float32), world2pv[ts].astype(np.float32))
            scene_to_pv.append(T_s2pv_used)
            transl_pv.append(transform_points(body[None], T_s2pv_used)[0])
            orient_pv.append(rotmat_to_axis_angle(T_s2pv_used[:3, :3]))
            genders.append('mf'[j % 2])
        transf[recording] = {'trans_kinect2holo': T_k2h, 'trans_world2pv': world2pv}
    atomic_pickle_dump(transf, os.path.join(root, egobody.TRANSF_PKL))
    n = len(imgnames)
    for split in ('train', 'test'):
        atomic_np_savez(egobody.annotation_npz_path(root, split), imgname=np.array(imgnames),
                        gender=np.array(genders), shape=rng.normal(0, 0.5, (n, 10)),
                        pose=rng.normal(0, 0.1, (n, 69)), global_orient_pv=np.array(orient_pv),
                        transl_pv=np.array(transl_pv))
    return types.SimpleNamespace(root=root, imgnames=imgnames, transl_pv=np.array(transl_pv),
                                 scene_to_pv=np.array(scene_to_pv), recordings=recordings)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return build_tiny_root(str(tmp_path_factory.mktemp('tiny_egobody')))


def write_stage1_results(path, translations) -> str:
    atomic_pickle_dump({'pred_cam_full_list': np.asarray(translations, dtype=np.float32)}, str(path))
    return str(path)


def load_pickle(path):
    with open(path, 'rb') as f:
        return pickle.load(f)


# ------------------------------------------------------------------------------------------------------------------
# stage-1 script
# ------------------------------------------------------------------------------------------------------------------
def test_s1_script_keys_maps_and_points(tiny, tmp_path):
    summary = s1.main(['--data_root', tiny.root, '--save_root', str(tmp_path), '--split', 'train'])
    pcd = load_pickle(tmp_path / 'pcd_verts_dict_train.pkl')
    mapping = load_pickle(tmp_path / 'map_dict_train.pkl')
    keys = [egobody.frame_key(name) for name in tiny.imgnames]
    assert list(mapping) == keys
    assert set(mapping.values()) == set(pcd)
    # saved: every 15th frame plus each recording's first frame (recording_b shares recording_a's scene)
    assert sorted(keys.index(k) for k in pcd) == [0, 15, 20, 27, 30]
    assert summary.frames == 45 and summary.written == 5 and summary.padded == 0
    index_of = {k: i for i, k in enumerate(keys)}
    for key, saved in mapping.items():
        assert egobody.parse_imgname(key)[0] == egobody.parse_imgname(saved)[0]
        assert index_of[saved] <= index_of[key]
    with open(tmp_path / 'pcd_verts_dict_train.pkl', 'rb') as f:
        assert f.read(2) == b'\x80\x02'  # pickle protocol 2
    for key, points in pcd.items():
        assert points.shape == (TARGET, 3) and points.dtype == np.float64
        name = tiny.imgnames[index_of[key]]
        T_k2pv = egobody.kinect_to_pv(*egobody.frame_transforms(tiny.root, name))
        assert (transform_points(points, T_k2pv)[:, 2] > 0).all()
        # Kinect frame: mapped to the scene, the points are room vertices (floor or wall)
        recording = egobody.parse_imgname(name)[0]
        T_k2s = egobody.load_kinect_to_scene(tiny.root, recording, egobody.scene_of(tiny.root, recording))
        in_scene = transform_points(points, T_k2s)
        on_floor = np.abs(in_scene[:, 1] - FLOOR_Y) < 1e-4
        on_wall = np.abs(in_scene[:, 2] - FLOOR_HI[1]) < 1e-4
        assert (on_floor | on_wall).all()


def test_s1_keys_do_not_depend_on_the_data_root_depth(tiny, tmp_path):
    deep = tmp_path / 'mnt' / 'disk' / 'datasets' / 'more'
    deep.mkdir(parents=True)
    os.symlink(tiny.root, deep / 'egobody_release')
    s1.main(['--data_root', str(deep / 'egobody_release') + '/', '--save_root', str(tmp_path / 'deep'),
             '--split', 'train'])
    s1.main(['--data_root', tiny.root, '--save_root', str(tmp_path / 'flat'), '--split', 'train'])
    for name in ('map_dict_train.pkl', 'pcd_verts_dict_train.pkl'):
        deep_dict, flat_dict = load_pickle(tmp_path / 'deep' / name), load_pickle(tmp_path / 'flat' / name)
        assert list(deep_dict) == list(flat_dict)
        for key in deep_dict:
            np.testing.assert_array_equal(deep_dict[key], flat_dict[key])


def linked_root(tiny, folder, skip=()) -> str:
    """A new data root whose entries link to the tiny root's (except ``skip``), so outputs land apart."""
    folder.mkdir()
    for entry in os.listdir(tiny.root):
        if entry not in skip and not entry.startswith('Egohmr_'):
            os.symlink(os.path.join(tiny.root, entry), folder / entry)
    return str(folder)


def test_s1_default_save_root_is_where_the_dataset_reads(tiny, tmp_path):
    root = linked_root(tiny, tmp_path / 'root')
    s1.main(['--data_root', root, '--split', 'test', '--scene_verts_num_target', '500'])
    out = os.path.join(root, egobody.S1_FOLDER)
    assert os.path.isfile(os.path.join(out, 'pcd_verts_dict_test.pkl'))
    map_path = os.path.join(out, 'map_dict_test.pkl')
    assert len(load_pickle(map_path)) == 45
    # --skip_existing leaves complete outputs alone
    before = os.stat(map_path).st_mtime_ns
    summary = s1.main(['--data_root', root, '--split', 'test', '--skip_existing'])
    assert summary.skipped == 45 and summary.written == 0
    assert os.stat(map_path).st_mtime_ns == before


def test_s1_pads_small_crops_and_continues(tiny, tmp_path, caplog):
    target = 200000  # more than the whole room holds
    with caplog.at_level(logging.WARNING):
        summary = s1.main(['--data_root', tiny.root, '--save_root', str(tmp_path), '--split', 'train',
                           '--scene_verts_num_target', str(target)])
    assert summary.padded == summary.written == 5
    assert sum('padded by repetition' in r.message for r in caplog.records) == 5
    pcd = load_pickle(tmp_path / 'pcd_verts_dict_train.pkl')
    assert all(points.shape == (target, 3) for points in pcd.values())


# ------------------------------------------------------------------------------------------------------------------
# stage-2 test script
# ------------------------------------------------------------------------------------------------------------------
def crop_centres(tiny, translations_pv):
    return np.array([transform_points(t[None], np.linalg.inv(T))[0]
                     for t, T in zip(np.asarray(translations_pv, np.float64), tiny.scene_to_pv)])


def fake_stage1(tiny, tmp_path):
    translations = tiny.transl_pv.copy()
    corner = np.array([FLOOR_LO[0] + 0.1, FLOOR_Y + 1.0, FLOOR_LO[1] + 0.1])
    translations[CORNER_FRAME] = transform_points(corner[None], tiny.scene_to_pv[CORNER_FRAME])[0]
    return write_stage1_results(tmp_path / 'results.pkl', translations), translations


def test_s2_test_script_centres_on_stage1_translations(tiny, tmp_path, caplog):
    results, translations = fake_stage1(tiny, tmp_path)
    out = tmp_path / 'cubes'
    with caplog.at_level(logging.WARNING):
        summary = s2_test.main(['--data_root', tiny.root, '--save_root', str(out), '--stage1_result_path', results])
    assert (summary.frames, summary.written, summary.padded) == (45, 45, 1)
    assert [r.message for r in caplog.records if 'padded' in r.message][0].startswith(
        egobody.frame_key(tiny.imgnames[CORNER_FRAME]))
    centres = crop_centres(tiny, np.asarray(translations, np.float32))
    for i, name in enumerate(tiny.imgnames):
        crop = np.load(sp.cube_output_path(str(out), 'test', name))
        assert crop.shape == (TARGET, 3) and crop.dtype == np.float64
        theta = sp.frame_rng(0, i).uniform(0.0, 2 * np.pi)
        x, z = yawed_xz(crop, centres[i], theta)
        assert np.abs(x).max() <= 1.0 + 1e-9 and np.abs(z).max() <= 1.0 + 1e-9   # square centred, no shift
        assert crop[:, 1].max() <= crop[:, 1].min() + 2.0
    scene = sp.read_obj_vertices(egobody.scene_mesh_path(tiny.root, 'room'))
    for i in (0, 21):  # recordings a and b (scene 'room'): the crop is the brute-force prism, decimated
        theta = sp.frame_rng(0, i).uniform(0.0, 2 * np.pi)
        x, z = yawed_xz(scene, centres[i], theta)
        inside = scene[(np.abs(x) <= 1.0) & (np.abs(z) <= 1.0)]
        inside = inside[inside[:, 1] <= inside[:, 1].min() + 2.0]
        crop = np.load(sp.cube_output_path(str(out), 'test', tiny.imgnames[i]))
        np.testing.assert_array_equal(crop, kth_reference(inside, TARGET))


def test_s2_test_script_is_reproducible_and_seeded(tiny, tmp_path):
    results, _ = fake_stage1(tiny, tmp_path)
    common = ['--data_root', tiny.root, '--stage1_result_path', results, '--scene_verts_num_target', '3000']
    runs = {}
    for name, seed in (('a', 0), ('b', 0), ('c', 1)):
        s2_test.main(common + ['--save_root', str(tmp_path / name), '--seed', str(seed)])
        runs[name] = [np.load(sp.cube_output_path(str(tmp_path / name), 'test', f)) for f in tiny.imgnames]
    assert all(np.array_equal(a, b) for a, b in zip(runs['a'], runs['b']))
    assert sum(not np.array_equal(a, c) for a, c in zip(runs['a'], runs['c'])) >= 40
    # partial rerun: delete some files, --skip_existing recreates exactly those, identically
    for name in tiny.imgnames[10:13]:
        os.remove(sp.cube_output_path(str(tmp_path / 'a'), 'test', name))
    summary = s2_test.main(common + ['--save_root', str(tmp_path / 'a'), '--skip_existing'])
    assert (summary.written, summary.skipped) == (3, 42)
    again = [np.load(sp.cube_output_path(str(tmp_path / 'a'), 'test', f)) for f in tiny.imgnames]
    assert all(np.array_equal(a, b) for a, b in zip(again, runs['b']))


def test_s2_test_script_rejects_a_results_pkl_of_the_wrong_length(tiny, tmp_path, capsys):
    results = write_stage1_results(tmp_path / 'short.pkl', tiny.transl_pv[:-1])
    with pytest.raises(SystemExit) as exc:
        s2_test.main(['--data_root', tiny.root, '--save_root', str(tmp_path), '--stage1_result_path', results])
    message = str(exc.value.code)
    assert '44 translations' in message and '45 frames' in message and '\n' not in message
    atomic_pickle_dump({'other': 1}, str(tmp_path / 'bad.pkl'))
    with pytest.raises(SystemExit, match='pred_cam_full_list'):
        s2_test.main(['--data_root', tiny.root, '--stage1_result_path', str(tmp_path / 'bad.pkl')])


# ------------------------------------------------------------------------------------------------------------------
# stage-2 train script (needs the synthetic SMPL files)
# ------------------------------------------------------------------------------------------------------------------
def gt_body_scene_vertices(data_dir, root, split, index):
    data = np.load(egobody.annotation_npz_path(root, split))
    gender = {'m': 'male', 'f': 'female'}[str(data['gender'][index])]
    model = create_smpl(data_dir, gender)
    params = dict(betas=data['shape'][[index]], body_pose=data['pose'][[index]],
                  global_orient=data['global_orient_pv'][[index]], transl=data['transl_pv'][[index]])
    with torch.no_grad():
        verts = model(**{k: torch.as_tensor(v, dtype=torch.float32) for k, v in params.items()}).vertices[0]
    name = str(data['imgname'][index])
    return transform_points(verts.numpy().astype(np.float64), np.linalg.inv(sp.scene_to_pv_of_frame(root, name)))


def test_s2_train_script_crops_around_the_gt_body(tiny, body_model_dir, tmp_path):
    out = tmp_path / 'gt'
    summary = s2_train.main(['--data_root', tiny.root, '--save_root', str(out), '--data_dir', body_model_dir])
    assert (summary.frames, summary.written, summary.padded) == (45, 45, 0)
    for i in (0, 1, 17, 44):  # male and female frames, several recordings
        body = gt_body_scene_vertices(body_model_dir, tiny.root, 'train', i)
        centre = body.mean(axis=0)
        crop = np.load(sp.cube_output_path(str(out), 'train', tiny.imgnames[i]))
        assert crop.shape == (TARGET, 3) and crop.dtype == np.float64
        theta, (sx, sz) = sp.draw_cube_yaw_and_shift(sp.frame_rng(0, i), body, centre, 2.0)
        assert abs(sx) <= 0.5 and abs(sz) <= 0.5
        x, z = yawed_xz(crop, centre, theta)
        bx, bz = yawed_xz(body, centre, theta)
        # the footprint: the 2x2 m square around centre + shift holds the crop and the whole GT body
        assert (np.abs(x - sx) <= 1.0 + 1e-9).all() and (np.abs(z - sz) <= 1.0 + 1e-9).all()
        assert (np.abs(bx - sx) <= 1.0).all() and (np.abs(bz - sz) <= 1.0).all()
        assert crop[:, 1].max() <= crop[:, 1].min() + 2.0


def test_s2_train_script_rejects_an_unknown_gender(tiny, body_model_dir, tmp_path):
    root = linked_root(tiny, tmp_path / 'root', skip=(egobody.NPZ_FOLDER,))
    data = dict(np.load(egobody.annotation_npz_path(tiny.root, 'train')))
    data['gender'] = data['gender'].astype('<U8')
    data['gender'][3] = 'unknown'
    atomic_np_savez(egobody.annotation_npz_path(root, 'train'), **data)
    with pytest.raises(SystemExit, match=r"frame '.*_frame_00003\.jpg' is 'unknown'"):
        s2_train.main(['--data_root', root, '--save_root', str(tmp_path / 'o'), '--data_dir', body_model_dir])


# ------------------------------------------------------------------------------------------------------------------
# the scripts as subprocesses on the shared synthetic world
# ------------------------------------------------------------------------------------------------------------------
def run_script(script, *args):
    proc = subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_scripts_run_on_the_synthetic_world(synthetic_world, tmp_path):
    root, data_dir = synthetic_world.dataset_root, synthetic_world.data_dir
    npz = np.load(egobody.annotation_npz_path(root, 'train'))
    imgnames = [str(n) for n in npz['imgname']]
    n = len(imgnames)

    line = run_script('preprocess_scene_s1.py', '--data_root', root, '--save_root', str(tmp_path / 's1'),
                      '--split', 'train')
    assert line.startswith(f'done: {n} frames processed')
    mapping = load_pickle(tmp_path / 's1' / 'map_dict_train.pkl')
    assert set(mapping) == {egobody.frame_key(name) for name in imgnames}

    line = run_script('preprocess_scene_s2_for_train.py', '--data_root', root, '--data_dir', data_dir,
                      '--save_root', str(tmp_path / 'gt'), '--split', 'train')
    assert line.startswith(f'done: {n} frames processed, {n} crops written')
    for i in (0, n - 1):
        crop = np.load(sp.cube_output_path(str(tmp_path / 'gt'), 'train', imgnames[i]))
        assert crop.shape == (TARGET, 3)
        centre = gt_body_scene_vertices(data_dir, root, 'train', i).mean(axis=0)
        x, z = yawed_xz(crop, centre, sp.frame_rng(0, i).uniform(0.0, 2 * np.pi))
        assert np.abs(x).max() <= 1.5 + 1e-9 and np.abs(z).max() <= 1.5 + 1e-9

    test_npz = np.load(egobody.annotation_npz_path(root, 'test'))
    results = write_stage1_results(tmp_path / 'results.pkl', test_npz['transl_pv'])
    summary = s2_test.main(['--data_root', root, '--save_root', str(tmp_path / 'pred'), '--stage1_result_path',
                            results])  # in-process: a third interpreter start would only cost time
    assert summary.written == len(test_npz['imgname'])
