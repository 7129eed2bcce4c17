import pickle
import sys
import types

import numpy as np
import pytest
import scipy.sparse as sp

from utils import body_model as bm
from utils.io import DataError, atomic_pickle_dump, load_npz_checked


def test_flip_permutations_are_involutions_and_pose_perm_matches_joint_perm():
    for perm in (bm.SMPL_FLIP_PERM, bm.BODY25_FLIP_PERM, bm.SMPL_POSE_FLIP_PERM):
        assert [perm[i] for i in perm] == list(range(len(perm)))
    # joint 1 (left hip) <-> joint 2 (right hip): 69-d entries 0..2 <-> 3..5
    assert bm.SMPL_POSE_FLIP_PERM[:6] == [3, 4, 5, 0, 1, 2]
    assert len(bm.SMPL_EDGES) == 23


def _fake_chumpy_pickle(path):
    """Write a pickle that references chumpy classes, as the official SMPL files do."""
    module = types.ModuleType('chumpy.ch')

    class Ch:  # stand-in with the same module path
        def __init__(self, x):
            self.x = x

        def __reduce__(self):
            return (Ch, (None,), {'x': self.x})

    Ch.__module__ = 'chumpy.ch'
    Ch.__qualname__ = 'Ch'
    module.Ch = Ch
    pkg = types.ModuleType('chumpy')
    pkg.ch = module
    sys.modules['chumpy'], sys.modules['chumpy.ch'] = pkg, module
    try:
        data = {'v_template': Ch(np.ones((4, 3))), 'f': np.zeros((2, 3), np.uint32),
                'J_regressor': sp.csc_matrix(np.eye(2, 4)), 'weights': Ch(np.full((4, 2), 0.5)),
                'shapedirs': Ch(np.zeros((4, 3, 10))), 'posedirs': np.zeros((4, 3, 9)),
                'kintree_table': np.array([[4294967295, 0], [0, 1]])}
        with open(path, 'wb') as f:
            pickle.dump(data, f, protocol=2)
    finally:
        del sys.modules['chumpy'], sys.modules['chumpy.ch']


def test_chumpy_style_pickle_loads_without_chumpy(tmp_path):
    path = str(tmp_path / 'SMPL_NEUTRAL.pkl')
    _fake_chumpy_pickle(path)
    assert 'chumpy' not in sys.modules
    data = bm.load_smpl_data(path)
    assert isinstance(data['v_template'], np.ndarray) and data['v_template'].shape == (4, 3)
    assert np.allclose(data['weights'], 0.5)
    assert sp.issparse(data['J_regressor'])


def test_missing_smpl_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match=r"SMPL_MALE\.pkl"):
        bm.create_smpl(str(tmp_path), 'male')
    with pytest.raises(ValueError, match='gender'):
        bm.smpl_model_path(str(tmp_path), 'other')


def test_smpl_from_synthetic_files_poses(body_model_dir):
    import torch
    model = bm.create_smpl(body_model_dir, 'neutral')
    out = model(body_pose=torch.zeros(1, 69), global_orient=torch.zeros(1, 3))
    assert out.vertices.shape == (1, 6890, 3) and out.joints.shape == (1, 45, 3)


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / 'x.pkl')
    atomic_pickle_dump({'a': 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError('boom')

    with pytest.raises(RuntimeError):
        atomic_pickle_dump({'b': Unpicklable()}, path)
    with open(path, 'rb') as f:
        assert pickle.load(f) == {'a': 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['x.pkl']


def test_load_npz_checked_reports_file_key_and_shape(tmp_path):
    path = str(tmp_path / 'a.npz')
    np.savez(path, center=np.zeros((3, 3)))
    with pytest.raises(DataError, match=r"a\.npz.*'scale'"):
        load_npz_checked(path, ['center', 'scale'])
    with pytest.raises(DataError, match=r"'center' has shape \[3, 3\], expected \[N,2\]"):
        load_npz_checked(path, ['center'], shapes={'center': (None, 2)})
