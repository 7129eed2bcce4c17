"""Session fixtures: one tiny synthetic EgoBody-format world, generated once per test session."""
from __future__ import annotations

import os
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault('PYOPENGL_PLATFORM', 'egl')
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_WORLD = dict(num_recordings=3, frames_per_recording=6, seed=0)


@pytest.fixture(scope='session')
def synthetic_world(tmp_path_factory):
    """A tiny world: ``.data_dir`` (SMPL files, mean params, mocap), ``.dataset_root`` (EgoBody layout)."""
    from synthetic.world import make_world
    out = str(tmp_path_factory.mktemp('synthetic_world'))
    summary = make_world(out, **TINY_WORLD)
    return types.SimpleNamespace(root=out, data_dir=os.path.join(out, 'data'),
                                 dataset_root=os.path.join(out, 'egobody'), summary=summary)


@pytest.fixture(scope='session')
def body_model_dir(synthetic_world):
    """A ``data/`` folder holding ``smpl/smpl/SMPL_*.pkl``, ``smpl_mean_params.npz`` and ``datasets/cmu_mocap.npz``."""
    return synthetic_world.data_dir
