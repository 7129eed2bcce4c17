"""Stage-1 checkpoints: ``{'state_dict': model.state_dict()}`` (plus training state from the trainer), loadable
by the original scripts; reading goes through :mod:`utils.checkpoint_io`."""
from __future__ import annotations

from typing import Dict, Iterable

import torch

from utils.checkpoint_io import checkpoint_state_dict, load_checkpoint_file, load_state_checked
from utils.io import DataError, atomic_torch_save

def save_stage1_checkpoint(model: torch.nn.Module, path: str) -> None:
    """``{'state_dict': model.state_dict()}`` written atomically (the original's format)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({'state_dict': state}, path)


def drop_prefixes(state: Dict[str, torch.Tensor], prefixes: Iterable[str]) -> Dict[str, torch.Tensor]:
    """Entries whose first dotted component is not in ``prefixes``."""
    prefixes = set(prefixes)
    return {k: v for k, v in state.items() if k.split('.')[0] not in prefixes}


def load_stage1_checkpoint(model: torch.nn.Module, path: str, map_location='cpu') -> None:
    """Load a stage-1 checkpoint for testing: ``smpl.*`` is dropped (the neutral model comes from data_dir),
    ``smpl_male.*`` / ``smpl_female.*`` are loaded, as in the original test script.

    Unlike the original's silent ``strict=False``, a checkpoint lacking network weights is an error.
    """
    state = checkpoint_state_dict(load_checkpoint_file(
        path, map_location, 'stage-1 checkpoint',
        hint='train one with train_prohmr_scene.py or download the released 53618/best_model.pt'), path)
    result = load_state_checked(model, drop_prefixes(state, ('smpl',)), path)
    missing = [k for k in result.missing_keys if k.split('.')[0] not in ('smpl', 'smpl_male', 'smpl_female')]
    if missing:
        raise DataError(f"stage-1 checkpoint '{path}' lacks {len(missing)} network weights "
                        f"(e.g. {', '.join(missing[:3])}); is it a ProHMR-scene checkpoint?")
    if result.unexpected_keys:
        raise DataError(f"stage-1 checkpoint '{path}' has unexpected entries (e.g. "
                        f"{', '.join(result.unexpected_keys[:3])}); is it a ProHMR-scene checkpoint?")
