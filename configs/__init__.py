"""yacs configuration: dataset/augmentation defaults merged with ``configs/prohmr.yaml`` (both stages) and, for
stage 2, ``configs/egohmr.yaml``."""
from __future__ import annotations

import os
from typing import Optional

from yacs.config import CfgNode as CN

PROHMR_YAML = os.path.join(os.path.dirname(os.path.realpath(__file__)), 'prohmr.yaml')
EGOHMR_YAML = os.path.join(os.path.dirname(os.path.realpath(__file__)), 'egohmr.yaml')

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


# train_egohmr.py flags that are stage-2 config entries (flag -> key under EGOHMR); the loss-weight flags
# ``weight_loss_<term>`` / ``weight_coap_penetration`` map to ``EGOHMR.LOSS_WEIGHTS.<TERM>``.
EGOHMR_FLAG_KEYS = ('scene_type', 'scene_cano', 'scene_downsample_rate', 'add_bbox_scale', 'with_focal_length',
                    'with_bbox_info', 'with_cam_center', 'cond_mask_prob', 'only_mask_img_cond', 'pelvis_vis_loosen',
                    'num_diffusion_timesteps', 'timestep_respacing_eval', 'start_coap_epoch')


def egohmr_flag_key(flag: str) -> Optional[tuple]:
    """The config path of a train_egohmr.py flag, e.g. ``('EGOHMR', 'LOSS_WEIGHTS', 'V2V')``; None for others."""
    if flag in EGOHMR_FLAG_KEYS:
        return ('EGOHMR', flag.upper())
    if flag == 'weight_coap_penetration':
        return ('EGOHMR', 'LOSS_WEIGHTS', 'COAP_PENETRATION')
    if flag.startswith('weight_loss_'):
        return ('EGOHMR', 'LOSS_WEIGHTS', flag[len('weight_loss_'):].upper())
    return None


def egohmr_config(config_file: Optional[str] = None, args=None, explicit=()) -> CN:
    """Stage 2: defaults, ``prohmr.yaml``, ``egohmr.yaml``, then ``config_file`` (``--model_cfg``, if other than
    prohmr.yaml), then the flags of ``args`` named in ``explicit`` (given on the command line). Flags not given take
    the config's values (``args`` is updated), so the run's flags and its config agree. Frozen."""
    cfg = default_config()
    cfg.merge_from_file(PROHMR_YAML)
    cfg.merge_from_file(EGOHMR_YAML)
    if config_file and os.path.abspath(config_file) != os.path.abspath(PROHMR_YAML):
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"--model_cfg: no config file at '{config_file}'")
        cfg.merge_from_file(config_file)
    if args is not None:
        for flag in vars(args):
            path = egohmr_flag_key(flag)
            if path is None:
                continue
            node = cfg
            for key in path[:-1]:
                node = node[key]
            if path[-1] not in node:
                continue
            if flag in explicit:
                node[path[-1]] = type(node[path[-1]])(getattr(args, flag))
            else:
                setattr(args, flag, node[path[-1]])
    cfg.freeze()
    return cfg
