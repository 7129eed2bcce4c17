"""Tensor <-> array helpers."""
from __future__ import annotations

import numpy as np
import torch


def to_numpy(x, dtype=None) -> np.ndarray:
    """A numpy array of a tensor (detached, on the CPU) or of anything ``np.asarray`` takes; cast to ``dtype``."""
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return array if dtype is None else array.astype(dtype, copy=False)
