"""SMPL body model loading and the joint tables shared by both stages.

The licensed SMPL ``.pkl`` files hold ``chumpy`` arrays. chumpy does not install on current Python/numpy, so
:func:`load_smpl_data` unpickles them with stand-in classes and turns every chumpy array into numpy. The result is
handed to ``smplx.SMPL(data_struct=...)``, so the real files and our synthetic ones load the same way.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import pickle

import numpy as np

from utils.checks import check_smpl_arrays
from utils.io import DataError

SMPL_GENDERS = ('neutral', 'male', 'female')
NUM_SMPL_JOINTS = 24

# Parent of each of the 24 SMPL joints (-1 for the pelvis).
SMPL_PARENTS = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21]
# The 23 (parent, child) edges of the kinematic tree.
SMPL_EDGES = [(p, c) for c, p in enumerate(SMPL_PARENTS) if p >= 0]

# smplx's 45-joint SMPL output (24 + nose, eyes, ears, feet, finger tips) -> OpenPose BODY_25.
SMPL_TO_OPENPOSE = [24, 12, 17, 19, 21, 16, 18, 20, 0, 2, 5, 8, 1, 4, 7, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34]
# For each SMPL joint, the OpenPose joint whose detection decides its visibility (EgoHMR's ``openpose_to_smpl``).
OPENPOSE_TO_SMPL_TRAIN = [8, 12, 9, 8, 13, 10, 8, 14, 11, 8, 14, 11, 0, 5, 2, 0, 5, 2, 6, 3, 7, 4, 7, 4]
OPENPOSE_TO_SMPL_TEST = [8, 13, 10, 8, 13, 10, 8, 14, 11, 8, 14, 11, 1, 5, 2, 0, 5, 2, 6, 3, 7, 4, 7, 4]
OPENPOSE_MIDHIP = 8

# Left/right permutations used by horizontal flipping.
SMPL_FLIP_PERM = [0, 2, 1, 3, 5, 4, 6, 8, 7, 9, 11, 10, 12, 14, 13, 15, 17, 16, 19, 18, 21, 20, 23, 22]
BODY25_FLIP_PERM = [0, 1, 5, 6, 7, 2, 3, 4, 8, 12, 13, 14, 9, 10, 11, 16, 15, 18, 17, 22, 23, 24, 19, 20, 21]
# 69-d body pose (joints 1..23, axis-angle triplets) flip permutation, derived from SMPL_FLIP_PERM.
SMPL_POSE_FLIP_PERM = [3 * (SMPL_FLIP_PERM[j] - 1) + k for j in range(1, NUM_SMPL_JOINTS) for k in range(3)]

OFFICIAL_SMPL_HINT = ("the official files come from https://smpl.is.tue.mpg.de (SMPL for Python), renamed "
                      "SMPL_NEUTRAL.pkl / SMPL_MALE.pkl / SMPL_FEMALE.pkl; or run make_synthetic_data.py for stand-ins")


class _ChumpyStandIn:
    """Receives the pickled state of any chumpy object."""

    def __init__(self, *args, **kwargs):
        self._state = {}

    def __setstate__(self, state):
        self._state = state if isinstance(state, dict) else {'state': state}

    def to_numpy(self):
        state = self._state
        if 'x' in state:
            return np.asarray(_to_numpy(state['x']))
        arrays = [v for v in state.values() if isinstance(v, (np.ndarray, _ChumpyStandIn))]
        if len(arrays) == 1:
            return np.asarray(_to_numpy(arrays[0]))
        raise DataError(f"cannot convert a chumpy object with fields {sorted(state)} to an array")


def _to_numpy(value):
    return value.to_numpy() if isinstance(value, _ChumpyStandIn) else value


class _SmplUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.split('.')[0] == 'chumpy':
            return _ChumpyStandIn
        return super().find_class(module, name)


def smpl_model_path(data_dir: str, gender: str) -> str:
    """``<data_dir>/smpl/smpl/SMPL_<GENDER>.pkl``, the layout ``smplx.create('<data_dir>/smpl', 'smpl')`` reads."""
    if gender not in SMPL_GENDERS:
        raise ValueError(f"SMPL gender must be one of {SMPL_GENDERS}, got {gender!r}")
    return os.path.join(data_dir, 'smpl', 'smpl', f'SMPL_{gender.upper()}.pkl')


@functools.lru_cache(maxsize=8)
def load_smpl_data(path: str) -> dict:
    """Read an SMPL ``.pkl`` (official or synthetic) into a dict of numpy arrays / scipy sparse matrices."""
    if not os.path.isfile(path):
        raise DataError(f"missing SMPL body model: expected a file at '{path}' ({OFFICIAL_SMPL_HINT})")
    try:
        with open(path, 'rb') as f:
            raw = _SmplUnpickler(f, encoding='latin1').load()
    except Exception as exc:
        raise DataError(f"cannot read SMPL body model '{path}': {type(exc).__name__}: {exc}") from exc
    if not isinstance(raw, dict):
        raise DataError(f"SMPL body model '{path}' should hold a dict, found {type(raw).__name__}")
    data = {key: _to_numpy(value) for key, value in raw.items()}
    for key in ('v_template', 'f', 'J_regressor', 'weights', 'shapedirs', 'posedirs', 'kintree_table'):
        if key not in data:
            raise DataError(f"SMPL body model '{path}' lacks key '{key}'")
    return data


def create_smpl(data_dir: str = 'data', gender: str = 'neutral', **kwargs):
    """Build an ``smplx.SMPL`` from ``<data_dir>/smpl/smpl/SMPL_<GENDER>.pkl``.

    Extra keyword arguments go to ``smplx.SMPL`` (e.g. ``batch_size``, ``create_transl``).
    """
    import smplx
    from smplx.utils import Struct

    path = smpl_model_path(data_dir, gender)
    data = load_smpl_data(path)
    check_smpl_arrays(data, path)  # SMPL's 6890 vertices / 24 joints, before smplx fails deep inside
    # smplx prints a warning about SMPL having 10 shape coefficients on every construction; that is expected.
    with contextlib.redirect_stdout(io.StringIO()):
        return smplx.SMPL(model_path=path, data_struct=Struct(**data), gender=gender, **kwargs)


def gender_to_index(gender) -> int:
    """EgoBody convention: ``'m'`` -> 0 (male), ``'f'`` -> 1 (female); any other code is a ValueError."""
    if isinstance(gender, bytes):
        gender = gender.decode()
    code = str(gender).strip()
    if code not in ('m', 'f'):
        raise ValueError(f"gender code {str(gender)!r}, expected 'm' or 'f'")
    return 0 if code == 'm' else 1


def resolve_data_path(path: str, data_dir: str) -> str:
    """Resolve a config path (``SMPL.MEAN_PARAMS``): absolute stays; ``data/<rest>`` -> ``<data_dir>/<rest>``;
    another relative path -> under ``data_dir``."""
    if os.path.isabs(path):
        return path
    norm = path.replace('\\', '/')
    if norm.startswith('data/'):
        norm = norm[len('data/'):]
    return os.path.join(data_dir, norm)
