"""Tensor helpers: arrays, row chunks, fp32 regions under autocast."""
from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch


def to_numpy(x, dtype=None) -> np.ndarray:
    """A numpy array of a tensor (detached, on the CPU) or of anything ``np.asarray`` takes; cast to ``dtype``."""
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return array if dtype is None else array.astype(dtype, copy=False)


def map_row_chunks(fn, tensors, rows_per_chunk: int):
    """``fn(*tensors)`` computed on consecutive dim-0 slices of ``rows_per_chunk`` rows and concatenated (a ``fn``
    that returns a tuple of tensors: each of them concatenated).

    For functions that treat rows independently (per-point MLPs, per-cloud encoders): the same values, with each
    slice's intermediate tensors small enough to stay in the CPU cache instead of streaming through memory between
    layers (about 2x faster for COAP's networks on a 2-core CPU). Slicing is a view; autograd flows through it. On
    other devices (CUDA) one call: there, small slices would only add kernel launches.
    """
    rows = tensors[0].shape[0]
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
    if rows <= rows_per_chunk or tensors[0].device.type != 'cpu':
        return fn(*tensors)
    pieces = [fn(*(t[start:start + rows_per_chunk] for t in tensors)) for start in range(0, rows, rows_per_chunk)]
    if isinstance(pieces[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*pieces))
    return torch.cat(pieces)


def full_precision(x: torch.Tensor):
    """A context in which autocast is off on ``x``'s device: the block runs in the dtypes of its inputs (cast them
    with ``.float()``). For the small, precision-critical pieces of a bf16 run (graph mixing, output layers, SMPL)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def autocast_is_on(x: torch.Tensor) -> bool:
    """Whether autocast is enabled for ``x``'s device type."""
    return torch.is_autocast_enabled(x.device.type)


def _as_fp32(value):
    """A floating tensor as fp32; a dict with its floating tensors so (one level); anything else as it is."""
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _as_fp32(v) for k, v in value.items()}
    return value


def fp32_under_autocast(fn):
    """Decorator: where autocast is on for the device of ``fn``'s first tensor argument, run ``fn`` with autocast off
    and its floating tensor arguments (and those in dict arguments) cast to fp32; otherwise call it as it is. For the
    small, precision-critical pieces of a bf16 run (SMPL decoding, COAP's geometry, graph mixing)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if torch.is_tensor(a)), None)
        if first is None or not autocast_is_on(first):
            return fn(*args, **kwargs)
        with full_precision(first):
            return fn(*(_as_fp32(a) for a in args), **{k: _as_fp32(v) for k, v in kwargs.items()})
    return wrapper


PRECISIONS = ('fp32', 'bf16')


def precision_context(precision: str, device):
    """``'fp32'``: no change; ``'bf16'``: autocast to bfloat16 on ``device`` (CPU: AVX512-BF16 kernels where present;
    no loss scaling is needed, bf16 has fp32's range). The precision-critical pieces keep fp32 themselves
    (:func:`full_precision`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == 'fp32':
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
