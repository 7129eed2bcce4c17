"""Reading checkpoints of any of the original's formats, without their training frameworks.

* ProHMR's ``checkpoint.pt`` is a PyTorch Lightning file. It is read without importing Lightning: first with
  ``torch.load(weights_only=False)``, and if that fails because a pickled class cannot be imported (e.g. a
  ``pytorch_lightning`` callback used as a dict key), again with an unpickler that stubs unknown classes.
* Checkpoints of this code and of the original scripts hold ``{'state_dict': ...}`` (plus training state here);
  a bare state dict is accepted too. Zip CRCs are checked and every tensor must be finite.

Both stages read through these functions; ``prohmr_scene/checkpoints.py`` and ``egohmr/checkpoints.py`` hold what
is specific to each stage.
"""
from __future__ import annotations

import os
import pickle
import types
from typing import Dict

import torch

from backbones.resnet import extract_backbone_state
from utils.checks import check_state_dict_finite, verify_zip_crcs
from utils.io import DataError

PROHMR_HINT = ("pass --load_pretrained False to start from random weights, or point --checkpoint at ProHMR's "
               "checkpoint.pt (released with nkolot/ProHMR)")


class _Stub:
    """Stand-in for a class that cannot be imported; keeps whatever state it is given."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):
        return _Stub(*args, **kwargs)


class _StubUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Stub,), {'__module__': module})


_stub_pickle = types.ModuleType('stub_pickle')
_stub_pickle.Unpickler = _StubUnpickler
_stub_pickle.load = lambda f, **kw: _StubUnpickler(f, **kw).load()
_stub_pickle.__name__ = 'stub_pickle'


def load_checkpoint_file(path: str, map_location='cpu', what: str = 'checkpoint', hint: str = ''):
    """``torch.load`` a trusted checkpoint; classes that cannot be imported are replaced by stubs."""
    if not os.path.isfile(path):
        raise DataError(f"missing {what}: no file at '{path}'" + (f"; {hint}" if hint else ''))
    verify_zip_crcs(path, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (ImportError, AttributeError):
        pass
    except Exception as exc:  # not a torch file at all
        raise DataError(f"cannot read {what} '{path}': {type(exc).__name__}: {exc}") from exc
    try:
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_stub_pickle)
    except Exception as exc:
        raise DataError(f"cannot read {what} '{path}': {type(exc).__name__}: {exc}") from exc


def checkpoint_state_dict(checkpoint, path: str) -> Dict[str, torch.Tensor]:
    """The ``state_dict`` of a checkpoint dict (or the dict itself when it already maps names to tensors);
    a DataError when it has none or a tensor holds NaN/inf."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get('state_dict'), dict):
        state = checkpoint['state_dict']
    elif isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state = checkpoint
    else:
        raise DataError(f"checkpoint '{path}' has no 'state_dict' entry")
    check_state_dict_finite(state, path, 'checkpoint')
    return state


def load_prohmr_backbone(model: torch.nn.Module, path: str, only_backbone: bool = True, log=print) -> int:
    """Initialise ``model`` from ProHMR's (or any compatible) checkpoint; returns the number of tensors loaded.

    ``only_backbone``: load the ``backbone.*`` entries (318 for ProHMR). Otherwise every entry whose name and
    shape match the model, skipping the body models (``smpl*``) and reporting what was skipped (the original
    passed everything and failed on the flow/head size mismatch).
    """
    state = checkpoint_state_dict(load_checkpoint_file(path, what='ProHMR checkpoint', hint=PROHMR_HINT), path)
    if only_backbone:
        selected = extract_backbone_state(state)
        if not selected:
            raise DataError(f"ProHMR checkpoint '{path}' has no 'backbone.*' weights; {PROHMR_HINT}")
    else:
        own = model.state_dict()
        selected, skipped = {}, []
        for key, value in state.items():
            if key.split('.')[0] in ('smpl', 'smpl_male', 'smpl_female'):
                continue
            if key in own and tuple(own[key].shape) == tuple(value.shape):
                selected[key] = value
            else:
                skipped.append(key)
        if skipped:
            log(f"checkpoint '{path}': skipped {len(skipped)} entries absent from this model or of another shape "
                f"(e.g. {', '.join(skipped[:3])})")
    result = load_state_checked(model, selected, path)
    if result.unexpected_keys:
        raise DataError(f"checkpoint '{path}': unexpected keys {result.unexpected_keys[:3]}")
    log(f"loaded {len(selected)} tensors from '{path}'")
    return len(selected)


def load_state_checked(model: torch.nn.Module, state: Dict[str, torch.Tensor], path: str):
    """``load_state_dict(strict=False)`` with a one-line error on shape mismatches."""
    try:
        return model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        detail = [line.strip() for line in str(exc).splitlines() if 'size mismatch' in line]
        raise DataError(f"checkpoint '{path}' does not fit this model: "
                        f"{detail[0] if detail else str(exc).splitlines()[0]}") from None
