"""Normalisation statistics of the stage-2 diffusion variable (the original's ``preprocess_stats.npz``).

The diffused variable is the 24-joint full pose (global orientation in the PV frame, then the 23 body joints) as
6D rotations in the ``'diffusion'`` layout, 144 values per frame. ``Xmean`` is its per-dimension mean over the
un-augmented train frames; ``Xstd`` is the per-dimension std (ddof=0) pooled into two values: the mean of the six
global-orientation stds (dims 0-5) and the mean of the 138 body-pose stds (dims 6-143).
"""
from __future__ import annotations

import os
from typing import Tuple

import numpy as np
import torch

from utils.geometry import aa_to_rotmat, rotmat_to_rot6d
from utils.io import DataError, atomic_np_savez, load_npz_checked

STATS_FILENAME = 'preprocess_stats.npz'
STATS_DIRNAME = 'preprocess_stats'
BODY_REP_DIM = 144
GLOBAL_ORIENT_DIMS = 6


def full_pose_rot6d(global_orient: np.ndarray, body_pose: np.ndarray) -> np.ndarray:
    """``[N, 3]`` + ``[N, 69]`` axis-angle -> ``[N, 144]`` float64 6D (diffusion layout), joints 0..23."""
    global_orient = np.asarray(global_orient, dtype=np.float64)
    body_pose = np.asarray(body_pose, dtype=np.float64)
    if global_orient.ndim != 2 or global_orient.shape[1] != 3:
        raise ValueError(f"global_orient_pv must have shape [N,3], got {list(global_orient.shape)}")
    if body_pose.ndim != 2 or body_pose.shape[1] != 69:
        raise ValueError(f"pose must have shape [N,69], got {list(body_pose.shape)}")
    if len(global_orient) != len(body_pose):
        raise ValueError(f"global_orient_pv has {len(global_orient)} rows but pose has {len(body_pose)}")
    full_pose = torch.from_numpy(np.concatenate([global_orient, body_pose], axis=1)).reshape(-1, 24, 3)
    rot6d = rotmat_to_rot6d(aa_to_rotmat(full_pose), mode='diffusion')  # [N, 24, 6]
    return rot6d.reshape(-1, BODY_REP_DIM).numpy()


def compute_body_rep_stats(global_orient_pv: np.ndarray, pose: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(``Xmean [144]``, ``Xstd [144]``) float32 of the 6D full pose; ``Xstd`` takes two pooled values."""
    features = full_pose_rot6d(global_orient_pv, pose)
    if len(features) == 0:
        raise ValueError("cannot compute body-representation statistics from zero frames")
    x_mean = features.mean(axis=0)
    x_std = features.std(axis=0)
    x_std[:GLOBAL_ORIENT_DIMS] = x_std[:GLOBAL_ORIENT_DIMS].mean()
    x_std[GLOBAL_ORIENT_DIMS:] = x_std[GLOBAL_ORIENT_DIMS:].mean()
    return x_mean.astype(np.float32), x_std.astype(np.float32)


def save_body_rep_stats(directory: str, x_mean: np.ndarray, x_std: np.ndarray) -> str:
    """Write ``<directory>/preprocess_stats.npz`` (keys ``Xmean``, ``Xstd``; compressed, atomic); returns the path."""
    _check_stats(x_mean, x_std, 'statistics to save')
    path = os.path.join(directory, STATS_FILENAME)
    atomic_np_savez(path, compressed=True, Xmean=np.asarray(x_mean, dtype=np.float32),
                    Xstd=np.asarray(x_std, dtype=np.float32))
    return path


def stats_path(dir_or_file: str) -> str:
    """Resolve a stats location: an ``.npz`` file, a folder holding ``preprocess_stats.npz``, or a run/checkpoint
    folder holding ``preprocess_stats/preprocess_stats.npz``."""
    if os.path.isfile(dir_or_file):
        return dir_or_file
    candidates = [os.path.join(dir_or_file, STATS_FILENAME),
                  os.path.join(dir_or_file, STATS_DIRNAME, STATS_FILENAME)]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise DataError(f"missing body-representation statistics: no file at '{dir_or_file}', "
                    f"'{candidates[0]}' or '{candidates[1]}' (they are written when training stage 2)")


def load_body_rep_stats(dir_or_file: str) -> Tuple[np.ndarray, np.ndarray]:
    """Read (``Xmean``, ``Xstd``) float32 ``[144]`` from a file or folder (see :func:`stats_path`)."""
    path = stats_path(dir_or_file)
    arrays = load_npz_checked(path, ('Xmean', 'Xstd'), what='body-representation statistics',
                              shapes={'Xmean': (BODY_REP_DIM,), 'Xstd': (BODY_REP_DIM,)})
    _check_stats(arrays['Xmean'], arrays['Xstd'], f"body-representation statistics '{path}'")
    return arrays['Xmean'].astype(np.float32), arrays['Xstd'].astype(np.float32)


def _check_stats(x_mean: np.ndarray, x_std: np.ndarray, what: str) -> None:
    x_mean, x_std = np.asarray(x_mean), np.asarray(x_std)
    for name, arr in (('Xmean', x_mean), ('Xstd', x_std)):
        if arr.shape != (BODY_REP_DIM,):
            raise DataError(f"{what}: '{name}' has shape {list(arr.shape)}, expected [{BODY_REP_DIM}]")
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{what}: '{name}' contains non-finite values")
    if np.any(x_std <= 0):
        raise DataError(f"{what}: 'Xstd' must be positive everywhere")
