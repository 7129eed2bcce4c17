"""Read and write COAP checkpoints in the original ``coap_smpl_<gender>.ckpt`` layout.

The official files are PyTorch Lightning checkpoints: a dict whose ``state_dict`` holds exactly the COAP module's
keys (no prefix), next to Lightning's bookkeeping (``epoch``, ``global_step``, ``callbacks``, ``optimizer_states``,
``loops``, ...). We read them without Lightning: every class the pickle names outside torch/numpy/the standard
containers is replaced by an inert stand-in, so the bookkeeping loads as opaque objects and the tensors load as
tensors.

The three part tables (``partitioner.tight_face_tensor``, ``extended_face_tensor``, ``tight_vert_selector``) are
functions of the body mesh. They are always recomputed from the body model in use; a checkpoint's copies are only
compared with them, and a difference (e.g. a checkpoint trained on the real SMPL loaded onto the synthetic body) is
reported in one warning line.
"""
from __future__ import annotations

import pickle
import types
import warnings
from typing import Optional

import torch

from egohmr.coap.partition import PART_TABLE_NAMES
from utils.checks import check_state_dict_finite, verify_zip_crcs
from utils.io import DataError, atomic_torch_save, require_file

TRAINER_TAG = 'none (egohmr train_coap.py)'
# Modules whose classes are imported for real while unpickling; anything else becomes a stand-in.
_TRUSTED_MODULE_ROOTS = ('torch', 'numpy', 'collections', 'builtins', '_codecs', 'copyreg', 'datetime',
                         'argparse', 'pathlib', 'enum')


class OpaqueObject(dict):
    """Stand-in for a pickled object of a class we do not import (e.g. Lightning's AttributeDict or enums)."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.pickled_args = args

    def __setstate__(self, state):
        self.pickled_state = state

    def __reduce__(self):  # keep stand-ins picklable (e.g. when a loaded checkpoint is re-saved)
        return (OpaqueObject, self.pickled_args, getattr(self, 'pickled_state', None), None, iter(self.items()))


class _StandInUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.split('.')[0] in _TRUSTED_MODULE_ROOTS:
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                pass
        stand_in = type(name, (OpaqueObject,), {'__module__': f'stand_in.{module}'})
        return stand_in


_stand_in_pickle = types.SimpleNamespace(
    __name__='egohmr_stand_in_pickle', Unpickler=_StandInUnpickler, load=pickle.load, Pickler=pickle.Pickler,
    dump=pickle.dump, loads=pickle.loads, dumps=pickle.dumps, HIGHEST_PROTOCOL=pickle.HIGHEST_PROTOCOL)


def read_checkpoint_file(path: str) -> dict:
    """Load a (Lightning or plain) torch checkpoint onto the CPU without importing Lightning."""
    require_file(path, 'COAP checkpoint', 'an official coap_smpl_<gender>.ckpt or the output of train_coap.py')
    verify_zip_crcs(path, 'COAP checkpoint')
    try:
        return torch.load(path, map_location='cpu', pickle_module=_stand_in_pickle, weights_only=False)
    except Exception as exc:
        raise DataError(f"cannot read COAP checkpoint '{path}': {type(exc).__name__}: {exc}") from exc


def extract_coap_state_dict(checkpoint, path: str = '<checkpoint>') -> dict:
    """The COAP state dict inside a checkpoint: ``ckpt['state_dict']`` (Lightning/ours), a bare state dict, or
    the ``smpl.coap.*`` entries of a stage-2 EgoHMR checkpoint."""
    if not isinstance(checkpoint, dict):
        raise DataError(f"COAP checkpoint '{path}' should hold a dict, found {type(checkpoint).__name__}")
    state = checkpoint.get('state_dict', checkpoint)
    if not isinstance(state, dict):
        raise DataError(f"COAP checkpoint '{path}': 'state_dict' is a {type(state).__name__}, expected a dict")
    prefix = 'smpl.coap.'
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def load_coap_state_dict(coap, state: dict, source: str = '<state_dict>') -> dict:
    """Strictly load ``state`` into ``coap``, keeping the part tables recomputed from the body model.

    Returns ``{table name: (checkpoint shape, our shape)}`` for the part tables that differ.
    """
    own = coap.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise DataError(f"COAP checkpoint '{source}' does not match the COAP model: "
                        f"missing keys {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                        f"unexpected keys {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}")
    differing = {}
    state = dict(state)
    for name in PART_TABLE_NAMES:
        key = f'partitioner.{name}'
        theirs, ours = state[key], own[key]
        if theirs.shape != ours.shape or not torch.equal(theirs.to(ours.dtype), ours):
            differing[name] = (tuple(theirs.shape), tuple(ours.shape))
        state[key] = ours
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise DataError(f"COAP checkpoint '{source}': '{key}' has shape {list(value.shape)}, "
                            f"the model expects {list(own[key].shape)}")
    coap.load_state_dict(state, strict=True)
    if differing:
        detail = ', '.join(f"{n} {list(a)} vs {list(b)}" for n, (a, b) in differing.items())
        warnings.warn(f"COAP checkpoint '{source}' was made for a different body mesh (part tables {detail}, "
                      "checkpoint vs current body model); using tables recomputed from the current body model",
                      stacklevel=2)
    coap.detach_cache()
    return differing


def load_coap_checkpoint(coap, path: str) -> dict:
    """Load an official ``coap_smpl_*.ckpt`` or a ``train_coap.py`` output into ``coap`` (strict); returns the
    raw checkpoint dict."""
    checkpoint = read_checkpoint_file(path)
    state = extract_coap_state_dict(checkpoint, path)
    check_state_dict_finite(state, path, 'COAP checkpoint')
    load_coap_state_dict(coap, state, path)
    return checkpoint


FULL_PRECISION_PREFIX = 'encoder.fc_c.'   # kept float32 by save_coap_checkpoint(half_precision=True)


def save_coap_checkpoint(coap, path: str, epoch: int = 0, global_step: int = 0,
                         hyper_parameters: Optional[dict] = None, metrics: Optional[dict] = None,
                         half_precision: bool = False) -> None:
    """Write ``coap`` in the official checkpoint layout (atomic).

    ``half_precision`` stores the float tensors as float16 (about half the size; they load into float32 models),
    except the encoder's output layer ``encoder.fc_c``: trained codes subtract nearly equal numbers there
    (see :func:`egohmr.coap.training.standardise_codes_`), which float16 weights would turn into noise.
    """
    def stored(name: str, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().cpu().clone()
        half = half_precision and value.is_floating_point() and not name.startswith(FULL_PRECISION_PREFIX)
        return value.half() if half else value

    checkpoint = {
        'epoch': int(epoch),
        'global_step': int(global_step),
        'pytorch-lightning_version': TRAINER_TAG,
        'state_dict': {k: stored(k, v) for k, v in coap.state_dict().items()},
        'hyper_parameters': dict(hyper_parameters or {}),
        'metrics': dict(metrics or {}),
    }
    atomic_torch_save(checkpoint, path)
