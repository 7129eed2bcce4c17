"""Checkpoint reading for stage 2: the ProHMR backbone initialisation and EgoHMR weights.

Checkpoints hold ``{'state_dict': ...}`` with the original key names (plus the training state this code adds).
ProHMR's released file is a PyTorch-Lightning checkpoint; :mod:`utils.checkpoint_io` reads it without Lightning.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, Tuple

import torch

from utils.checkpoint_io import checkpoint_state_dict, load_checkpoint_file, load_prohmr_backbone
from utils.io import DataError, atomic_torch_save

# COAP's part tables depend on the body mesh; they are always recomputed from the SMPL model in use.
COAP_PART_TABLE_KEYS = tuple(f'smpl.coap.partitioner.{name}' for name in
                             ('tight_face_tensor', 'extended_face_tensor', 'tight_vert_selector'))


# Body-model buffers (rebuilt from the SMPL files in use) may be absent from a checkpoint; network weights may not.
BODY_MODEL_PREFIXES = ('smpl', 'smpl_male', 'smpl_female')


def read_state_dict(path: str, what: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """The ``state_dict`` of a checkpoint file (``{'state_dict': ...}`` or a bare state dict), on the CPU."""
    return checkpoint_state_dict(load_checkpoint_file(path, what=what), path)


def load_backbone_from_prohmr(model: torch.nn.Module, path: str, log=print) -> int:
    """Load the ``backbone.*`` entries (318 for ResNet-50) of a ProHMR checkpoint; returns the count."""
    return load_prohmr_backbone(model, path, only_backbone=True, log=log)


def load_egohmr_weights(model: torch.nn.Module, path: str, strict_shapes: bool = True) -> Tuple[list, list]:
    """Load a stage-2 checkpoint with ``strict=False`` (all keys, as the original test does), except that missing
    network weights (anything outside the body models, e.g. a stage-1 checkpoint) are a DataError.

    COAP part tables are kept as recomputed from our SMPL model (a warning says when the checkpoint's differ).
    ``smpl.coap.*`` entries are skipped when the model has no COAP. Other shape mismatches raise a DataError.
    Returns (missing keys, unexpected keys).
    """
    state = dict(read_state_dict(path, 'EgoHMR checkpoint (--checkpoint)'))
    own = model.state_dict()
    differing = [k for k in COAP_PART_TABLE_KEYS if k in state and k in own and state[k].shape != own[k].shape]
    for key in COAP_PART_TABLE_KEYS:
        if key in own:
            state.pop(key, None)
    if differing:
        warnings.warn(f"checkpoint '{path}': COAP part tables were made for another body mesh; "
                      "using the tables recomputed from the current SMPL model", stacklevel=2)
    if not any(k.startswith('smpl.coap.') for k in own):
        state = {k: v for k, v in state.items() if not k.startswith('smpl.coap.')}
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched and strict_shapes:
        k = mismatched[0]
        raise DataError(f"checkpoint '{path}': '{k}' has shape {list(state[k].shape)}, the model expects "
                        f"{list(own[k].shape)} ({len(mismatched)} mismatched entries)")
    state = {k: v for k, v in state.items() if k not in mismatched}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in COAP_PART_TABLE_KEYS]
    network = [k for k in missing if k.split('.')[0] not in BODY_MODEL_PREFIXES]
    if network:
        raise DataError(f"checkpoint '{path}' lacks {len(network)} of the denoiser's weights (e.g. "
                        f"{', '.join(network[:2])}); is it a stage-2 EgoHMR checkpoint? (stage-1 checkpoints are "
                        "tested with test_prohmr_scene.py)")
    return missing, list(result.unexpected_keys)


def save_egohmr_checkpoint(model: torch.nn.Module, path: str) -> None:
    """``{'state_dict': model.state_dict()}`` written atomically (the original's checkpoint format)."""
    atomic_torch_save({'state_dict': model.state_dict()}, path)


def checkpoint_run_dir(checkpoint_path: str) -> str:
    """The folder of a checkpoint (its stats live in ``<dir>/preprocess_stats/preprocess_stats.npz``)."""
    return os.path.dirname(os.path.abspath(checkpoint_path))
