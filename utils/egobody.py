"""EgoBody dataset layout: folder names, image-name parsing and the coordinate-frame chain.

Frames: scene mesh (y up) --T_s2k--> master Kinect --kinect2holo--> HoloLens world --holo2pv--> PV (OpenGL)
--ADD_TRANS--> PV (OpenCV). All 4x4 matrices act on column vectors; apply them to row-vector points with
:func:`utils.geometry.transform_points`.
"""
from __future__ import annotations

import functools
import os
from typing import Dict, Tuple

import numpy as np

from utils.checks import check_matrix
from utils.geometry import ADD_TRANS
from utils.io import DataError, load_json, load_pickle, require_file

SPLITS = ('train', 'val', 'test')

NPZ_FOLDER = 'annotation_egocentric_smpl_npz'
S1_FOLDER = 'Egohmr_scene_preprocess_s1_release'
CUBE_FROM_GT_FOLDER = 'Egohmr_scene_preprocess_cube_s2_from_gt_release'
CUBE_FROM_PRED_FOLDER = 'Egohmr_scene_preprocess_cube_s2_from_pred_release'
DATA_INFO_CSV = 'data_info_release.csv'
TRANSF_PKL = 'transf_matrices_all_seqs.pkl'
KINECT_COLOR_JSON = os.path.join('kinect_cam_params', 'kinect_master', 'Color.json')

# npz keys and their per-frame shapes (None = any length), as in the EgoBody release.
NPZ_KEYS = ('imgname', 'center', 'scale', 'valid_keypoints', '3d_joints_pv', 'pose', 'shape',
            'global_orient_pv', 'transl_pv', 'gender', 'fx', 'fy', 'cx', 'cy')
NPZ_SHAPES = {'center': (None, 2), 'scale': (None,), 'valid_keypoints': (None, 25, 3),
              'pose': (None, 69), 'shape': (None, 10), 'global_orient_pv': (None, 3), 'transl_pv': (None, 3),
              'fx': (None,), 'fy': (None,), 'cx': (None,), 'cy': (None,)}


def annotation_npz_path(dataset_root: str, split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {SPLITS}, got {split!r}")
    return os.path.join(dataset_root, NPZ_FOLDER, f'egocapture_{split}_smpl.npz')


def parse_imgname(imgname: str) -> Tuple[str, str, str]:
    """``.../egocentric_color/<rec>/<date>/PV/<ts>_frame_<id>.jpg`` -> (recording, date folder, frame name).

    Only the last five path components are read, so the key does not depend on the data root's depth.
    """
    parts = str(imgname).replace('\\', '/').split('/')
    if len(parts) < 5 or parts[-2] != 'PV':
        raise DataError(f"image name '{imgname}' does not look like egocentric_color/<rec>/<date>/PV/<file>.jpg")
    return parts[-4], parts[-3], os.path.splitext(parts[-1])[0]


def frame_key(imgname: str) -> str:
    """Depth-independent key of a frame: ``egocentric_color/<rec>/<date>/PV/<file>.jpg``."""
    return '/'.join(str(imgname).replace('\\', '/').split('/')[-5:])


def timestamp_of(imgname: str) -> str:
    """The PV timestamp string: the image basename up to its first ``_``."""
    return os.path.basename(str(imgname)).split('_')[0]


@functools.lru_cache(maxsize=4)
def load_recording_scenes(dataset_root: str) -> Dict[str, str]:
    """``recording_name -> scene_name`` from ``data_info_release.csv``."""
    import pandas as pd
    path = require_file(os.path.join(dataset_root, DATA_INFO_CSV), 'EgoBody data info csv')
    table = pd.read_csv(path)
    for column in ('recording_name', 'scene_name'):
        if column not in table.columns:
            raise DataError(f"'{path}' has no column '{column}'")
    return dict(zip(table['recording_name'].astype(str), table['scene_name'].astype(str)))


@functools.lru_cache(maxsize=4)
def load_transf_matrices(dataset_root: str) -> dict:
    """The per-recording ``trans_kinect2holo`` / ``trans_world2pv[timestamp]`` dict of the pkl."""
    path = os.path.join(dataset_root, TRANSF_PKL)
    return load_pickle(path, 'EgoBody transformation pkl',
                       hint='it is distributed with EgoBody; the README of the original repo links it')


def frame_transforms(dataset_root: str, imgname: str) -> Tuple[np.ndarray, np.ndarray]:
    """(``T_kinect2holo``, ``T_holo2pv``) float32 4x4 of the frame named by ``imgname``."""
    recording, _, _ = parse_imgname(imgname)
    transf = load_transf_matrices(dataset_root)
    if recording not in transf:
        raise DataError(f"'{TRANSF_PKL}' has no entry for recording '{recording}'")
    entry = transf[recording]
    ts = timestamp_of(imgname)
    if ts not in entry['trans_world2pv']:
        raise DataError(f"'{TRANSF_PKL}' recording '{recording}' has no trans_world2pv for timestamp '{ts}'")
    where = f"'{TRANSF_PKL}' recording '{recording}'"
    return (check_matrix(entry['trans_kinect2holo'], (4, 4), f"{where} trans_kinect2holo").astype(np.float32),
            check_matrix(entry['trans_world2pv'][ts], (4, 4), f"{where} trans_world2pv['{ts}']").astype(np.float32))


def kinect_to_scene_path(dataset_root: str, recording: str, scene: str) -> str:
    return os.path.join(dataset_root, 'calibrations', recording, 'cal_trans', 'kinect12_to_world', f'{scene}.json')


@functools.lru_cache(maxsize=256)
def load_kinect_to_scene(dataset_root: str, recording: str, scene: str) -> np.ndarray:
    """``kinect12_to_world/<scene>.json['trans']``: master Kinect -> scene mesh frame (4x4)."""
    path = kinect_to_scene_path(dataset_root, recording, scene)
    trans = load_json(path, 'Kinect-to-scene calibration', keys=('trans',))['trans']
    return check_matrix(trans, (4, 4), f"Kinect-to-scene calibration '{path}' key 'trans'")


def kinect_to_pv(T_kinect2holo: np.ndarray, T_holo2pv: np.ndarray) -> np.ndarray:
    """``ADD_TRANS @ T_holo2pv @ T_kinect2holo``: master Kinect -> PV (OpenCV axes)."""
    return ADD_TRANS @ np.asarray(T_holo2pv, dtype=np.float64) @ np.asarray(T_kinect2holo, dtype=np.float64)


def scene_to_pv(T_kinect2scene: np.ndarray, T_kinect2holo: np.ndarray, T_holo2pv: np.ndarray) -> np.ndarray:
    """Scene mesh frame -> PV (OpenCV axes): ``kinect_to_pv @ inv(T_kinect2scene)``."""
    return kinect_to_pv(T_kinect2holo, T_holo2pv) @ np.linalg.inv(T_kinect2scene)


def scene_mesh_path(dataset_root: str, scene: str) -> str:
    return os.path.join(dataset_root, 'scene_mesh', scene, f'{scene}.obj')


def scene_of(dataset_root: str, recording: str) -> str:
    scenes = load_recording_scenes(dataset_root)
    if recording not in scenes:
        raise DataError(f"'{DATA_INFO_CSV}' has no row for recording '{recording}'")
    return scenes[recording]
