"""CMU MoCap poses: the "real" samples of the stage-1 pose/shape discriminator (the original ``MoCapDataset``)."""
from __future__ import annotations

from typing import Dict

import numpy as np
from torch.utils.data import Dataset

from utils.checks import check_finite
from utils.io import DataError, load_npz_checked


class MoCapDataset(Dataset):
    """Items ``{'body_pose': [69] float32, 'betas': [10] float32}`` from ``cmu_mocap.npz``.

    The file stores ``body_pose [M, 72]`` (global orientation first, dropped here) and ``betas [M, 10]``.
    """

    def __init__(self, npz_path: str):
        arrays = load_npz_checked(npz_path, ('body_pose', 'betas'), what='MoCap npz',
                                  shapes={'body_pose': (None, 72), 'betas': (None, 10)})
        if len(arrays['body_pose']) != len(arrays['betas']):
            raise DataError(f"MoCap npz '{npz_path}': 'body_pose' has {len(arrays['body_pose'])} rows but "
                            f"'betas' has {len(arrays['betas'])}")
        check_finite(arrays, npz_path, 'MoCap npz')
        self.path = npz_path
        self.body_pose = np.ascontiguousarray(arrays['body_pose'][:, 3:], dtype=np.float32)
        self.betas = np.ascontiguousarray(arrays['betas'], dtype=np.float32)

    def __len__(self) -> int:
        return len(self.body_pose)

    def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
        return {'body_pose': self.body_pose[index].copy(), 'betas': self.betas[index].copy()}
