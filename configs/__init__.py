"""yacs configuration: dataset/augmentation defaults merged with ``configs/prohmr.yaml``."""
from __future__ import annotations

import os
from typing import Optional

from yacs.config import CfgNode as CN

PROHMR_YAML = os.path.join(os.path.dirname(os.path.realpath(__file__)), 'prohmr.yaml')

_C = CN(new_allowed=True)
_C.TRAIN = CN(new_allowed=True)
_C.LOSS_WEIGHTS = CN(new_allowed=True)
_C.MODEL = CN(new_allowed=True)
_C.EXTRA = CN(new_allowed=True)
_C.DATASETS = CN(new_allowed=True)
_C.DATASETS.CONFIG = CN(new_allowed=True)
_C.DATASETS.CONFIG.SCALE_FACTOR = 0.3
_C.DATASETS.CONFIG.ROT_FACTOR = 30
_C.DATASETS.CONFIG.TRANS_FACTOR = 0.02
_C.DATASETS.CONFIG.COLOR_SCALE = 0.2
_C.DATASETS.CONFIG.ROT_AUG_RATE = 0.6
_C.DATASETS.CONFIG.TRANS_AUG_RATE = 0.5   # present in the original, never used
_C.DATASETS.CONFIG.DO_FLIP = True
_C.DATASETS.CONFIG.FLIP_AUG_RATE = 0.5


def default_config() -> CN:
    """A fresh copy of the built-in defaults (datasets/augmentation only)."""
    return _C.clone()


def get_config(config_file: Optional[str] = None, merge: bool = True, overrides: Optional[list] = None) -> CN:
    """Defaults merged with ``config_file`` (``configs/prohmr.yaml`` when None), then ``overrides``; frozen."""
    config_file = config_file or PROHMR_YAML
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"--model_cfg: no config file at '{config_file}'")
    cfg = default_config() if merge else CN(new_allowed=True)
    cfg.merge_from_file(config_file)
    if overrides:
        cfg.merge_from_list(overrides)
    cfg.freeze()
    return cfg


def prohmr_config() -> CN:
    """``configs/prohmr.yaml`` merged over the defaults."""
    return get_config(PROHMR_YAML)
