"""Checks of user input that every script shares, each ending in one line that names the file / key / frame / flag.

Flags: :func:`finite_float_flags_error`, :func:`output_dir_error` / :func:`output_file_error` (run before any work
starts, so nothing is written or computed for a run that cannot save its results). Arrays: :func:`check_finite`,
:func:`check_rows`, :func:`check_smpl_arrays`. Files: :func:`check_jpeg_complete`, :func:`verify_zip_crcs`,
:func:`check_state_dict_finite`. Messages: :func:`error_line` (the one line of a DataLoader-worker error).
"""
from __future__ import annotations

import math
import os
import zipfile
from typing import Dict, Iterable, Optional, Sequence

import numpy as np

from utils.io import DataError

SMPL_NUM_VERTICES = 6890
SMPL_NUM_JOINTS = 24


# --------------------------------------------------------------------------------------------------------------
# flags and output paths
# --------------------------------------------------------------------------------------------------------------
def finite_float_flags_error(args) -> str:
    """'--name must be a finite number, got nan' for the first float flag that is NaN or infinite, else ''."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            return f"--{name} must be a finite number, got {value}"
    return ''


def _blocking_file(path: str) -> Optional[str]:
    """The first existing component of ``path`` (itself or a parent folder) that is not a folder, else None."""
    path = os.path.abspath(path)
    while True:
        if os.path.exists(path):
            return None if os.path.isdir(path) else path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def output_dir_error(path: str, flag: str) -> str:
    """'' when folder ``path`` exists or can be created, else a one-line reason naming ``flag``."""
    blocking = _blocking_file(path)
    if blocking is None:
        return ''
    where = '' if os.path.abspath(blocking) == os.path.abspath(path) else f" ('{blocking}' is a file)"
    return f"{flag} '{path}' must be a folder, but a file is in the way{where}"


def output_file_error(path: str, flag: str) -> str:
    """'' when file ``path`` can be written (not a folder, its folder can exist), else a one-line reason."""
    if os.path.isdir(path):
        return f"{flag} '{path}' is a folder, expected a file path"
    return output_dir_error(os.path.dirname(os.path.abspath(path)), flag)


def require_output_dirs(pairs: Iterable[Sequence[str]]) -> None:
    """Raise a DataError for the first ``(path, flag)`` whose folder cannot be created."""
    for path, flag in pairs:
        message = output_dir_error(path, flag)
        if message:
            raise DataError(message)


# --------------------------------------------------------------------------------------------------------------
# arrays
# --------------------------------------------------------------------------------------------------------------
def _frame_name(index: int, names: Optional[Sequence[str]]) -> str:
    if names is not None and 0 <= index < len(names):
        return f"frame {index} ('{names[index]}')"
    return f"row {index}"


def check_finite(arrays: Dict[str, np.ndarray], path: str, what: str,
                 names: Optional[Sequence[str]] = None) -> None:
    """Raise a DataError naming the file, key and first frame where a float array holds NaN or infinity."""
    for key, value in arrays.items():
        value = np.asarray(value)
        if value.dtype.kind not in 'fc' or np.all(np.isfinite(value)):
            continue
        bad = ~np.isfinite(value.reshape(len(value), -1) if value.ndim else value.reshape(1, 1))
        rows = np.flatnonzero(bad.any(axis=1))
        more = f" and {len(rows) - 1} more rows" if len(rows) > 1 else ''
        raise DataError(f"{what} '{path}' key '{key}' has non-finite values (NaN/inf) at "
                        f"{_frame_name(int(rows[0]), names)}{more}; expected finite numbers")


def check_rows(arrays: Dict[str, np.ndarray], path: str, what: str, reference: str = 'imgname') -> None:
    """Raise a DataError when a key has another number of rows than ``reference`` (one row per frame)."""
    count = len(arrays[reference])
    for key, value in arrays.items():
        if len(value) != count:
            raise DataError(f"{what} '{path}' key '{key}' has {len(value)} rows, expected {count} (as '{reference}')")


def check_smpl_arrays(data: dict, path: str) -> None:
    """The arrays of an SMPL model file agree with each other and with SMPL's 6890 vertices / 24 joints."""
    def shape(key):
        return tuple(np.shape(data[key])) if not hasattr(data[key], 'tocsr') else tuple(data[key].shape)

    def fail(key, expected):
        raise DataError(f"SMPL body model '{path}' key '{key}' has shape {list(shape(key))}, expected {expected} "
                        f"(SMPL has {SMPL_NUM_VERTICES} vertices and {SMPL_NUM_JOINTS} joints)")

    v = SMPL_NUM_VERTICES
    if shape('v_template') != (v, 3):
        fail('v_template', f'[{v},3]')
    if len(shape('f')) != 2 or shape('f')[1] != 3:
        fail('f', '[F,3]')
    faces = np.asarray(data['f'])
    if faces.size and (faces.min() < 0 or faces.max() >= v):
        raise DataError(f"SMPL body model '{path}' key 'f' indexes vertex {int(faces.max())}, expected indices "
                        f"below {v}")
    if shape('J_regressor') != (SMPL_NUM_JOINTS, v):
        fail('J_regressor', f'[{SMPL_NUM_JOINTS},{v}]')
    if shape('weights') != (v, SMPL_NUM_JOINTS):
        fail('weights', f'[{v},{SMPL_NUM_JOINTS}]')
    if len(shape('shapedirs')) != 3 or shape('shapedirs')[:2] != (v, 3):
        fail('shapedirs', f'[{v},3,B]')
    posedirs = shape('posedirs')
    if posedirs not in ((v, 3, 9 * (SMPL_NUM_JOINTS - 1)), (3 * v, 9 * (SMPL_NUM_JOINTS - 1))):
        fail('posedirs', f'[{v},3,{9 * (SMPL_NUM_JOINTS - 1)}]')
    if shape('kintree_table') != (2, SMPL_NUM_JOINTS):
        fail('kintree_table', f'[2,{SMPL_NUM_JOINTS}]')


def check_matrix(value, shape: tuple, where: str) -> np.ndarray:
    """``value`` as a finite float64 array of ``shape``, else a DataError naming ``where``."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where} is not a numeric array: {exc}") from exc
    if array.shape != tuple(shape):
        raise DataError(f"{where} has shape {list(array.shape)}, expected {list(shape)}")
    if not np.all(np.isfinite(array)):
        raise DataError(f"{where} has non-finite values (NaN/inf)")
    return array


# --------------------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------------------
def check_jpeg_complete(path: str) -> None:
    """A DataError when a ``.jpg`` / ``.jpeg`` file lacks the end-of-image marker (a cut-short copy)."""
    if os.path.splitext(path)[1].lower() not in ('.jpg', '.jpeg'):
        return
    with open(path, 'rb') as f:
        head = f.read(2)
        f.seek(max(0, os.path.getsize(path) - 64))
        tail = f.read()
    if head == b'\xff\xd8' and not tail.rstrip(b'\x00\r\n\t ').endswith(b'\xff\xd9'):
        raise DataError(f"image '{path}' is truncated (no JPEG end marker; an interrupted copy?)")


def verify_zip_crcs(path: str, what: str) -> None:
    """For a zip-format torch file, check every member's CRC (``torch.load`` does not) and name a damaged one."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise DataError(f"cannot read {what} '{path}': damaged or truncated file ({exc})") from exc
    if bad is not None:
        raise DataError(f"{what} '{path}' is damaged: entry '{bad}' fails its CRC check (copy the file again)")


def check_state_dict_finite(state: dict, path: str, what: str) -> None:
    """A DataError naming the first floating-point tensor of ``state`` that holds NaN or infinity."""
    import torch
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise DataError(f"{what} '{path}' entry '{key}' has non-finite values (NaN/inf): a damaged file or a "
                            "diverged run")


# --------------------------------------------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------------------------------------------
def error_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line; for an error re-raised from a DataLoader worker, the original one."""
    text = str(exc)
    if 'Original Traceback' in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        head, sep, message = last.partition(': ')
        text = message if sep and ' ' not in head else last
    return ' '.join(text.split('\n')).strip()
