"""File input/output with clear errors and atomic writes.

Every writer here writes to a temporary file in the destination folder and renames it into place, so an
interrupted run never leaves a half-written file where a complete one used to be.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import tempfile
import threading
from typing import Iterable, Optional

import numpy as np


_UMASK = os.umask(0)
os.umask(_UMASK)


class DataError(ValueError):
    """A problem with user-supplied data: the message names the file/key and what was expected."""


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ''):
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    The temporary file has the final file name (plus ``suffix`` when the name lacks it) inside a hidden folder
    ``.<name>.<pid>.<random>.tmp`` beside ``path``, so writers that record the file name (``torch.save`` names
    the zip's inner folder after it) give the same bytes as a direct write. The folder is removed on success,
    on errors, on Ctrl-C and on SIGTERM (turned into ``SystemExit(143)`` while the file is written); folders
    left by a killed process (SIGKILL) are removed by the next write of the same file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    os.makedirs(folder, exist_ok=True)
    _remove_stale_temporaries(folder, name)
    tmp_dir = tempfile.mkdtemp(prefix=f'.{name}.{os.getpid()}.', suffix='.tmp', dir=folder)
    tmp = os.path.join(tmp_dir, name if name.endswith(suffix) else name + suffix)
    try:
        with _sigterm_as_exit():
            yield tmp
            os.chmod(tmp, 0o666 & ~_UMASK)  # give the file the usual permissions
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _remove_stale_temporaries(folder: str, name: str) -> None:
    """Remove ``.<name>.<pid>.*.tmp`` folders of earlier writes of ``name`` whose process no longer runs."""
    pattern = re.compile(r'^\.' + re.escape(name) + r'\.(\d+)\.[A-Za-z0-9_]{8}\.tmp$')  # mkdtemp: 8 characters
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        match = pattern.match(entry)
        if match and not _process_alive(int(match.group(1))):
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to another user
        return True
    return True


@contextlib.contextmanager
def _sigterm_as_exit():
    """While inside, SIGTERM raises ``SystemExit(143)`` (so ``finally`` blocks clean up) instead of killing."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def atomic_pickle_dump(obj, path: str, protocol: int = 2) -> None:
    with atomic_path(path) as tmp, open(tmp, 'wb') as f:
        pickle.dump(obj, f, protocol=protocol)


def atomic_np_save(path: str, array: np.ndarray) -> None:
    """``np.save`` to exactly ``path`` (which should end in ``.npy``)."""
    with atomic_path(path, suffix='.npy') as tmp:
        np.save(tmp, array)


def atomic_np_savez(path: str, compressed: bool = False, **arrays) -> None:
    """``np.savez`` / ``np.savez_compressed`` to exactly ``path`` (which should end in ``.npz``)."""
    with atomic_path(path, suffix='.npz') as tmp:
        (np.savez_compressed if compressed else np.savez)(tmp, **arrays)


def atomic_json_dump(obj, path: str, indent: int = 2) -> None:
    with atomic_path(path) as tmp, open(tmp, 'w') as f:
        json.dump(obj, f, indent=indent)
        f.write('\n')


def atomic_text_write(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, 'w') as f:
        f.write(text)


def atomic_torch_save(obj, path: str) -> None:
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def require_file(path: str, what: str, hint: str = '') -> str:
    """Return ``path`` if it is a file, else raise a one-line DataError naming it."""
    if not os.path.isfile(path):
        raise DataError(f"missing {what}: expected a file at '{path}'" + (f" ({hint})" if hint else ''))
    return path


def load_pickle(path: str, what: str = 'pickle file', hint: str = ''):
    require_file(path, what, hint)
    try:
        with open(path, 'rb') as f:
            return pickle.load(f, encoding='latin1')
    except Exception as exc:  # corrupt or foreign file
        raise DataError(f"cannot read {what} '{path}': {type(exc).__name__}: {exc}") from exc


def load_json(path: str, what: str = 'json file', keys: Iterable[str] = ()):
    require_file(path, what)
    try:
        with open(path) as f:
            data = json.load(f)
    except Exception as exc:
        raise DataError(f"cannot read {what} '{path}': {exc}") from exc
    for key in keys:
        if key not in data:
            raise DataError(f"{what} '{path}' has no key '{key}'")
    return data


def load_npz_checked(path: str, keys: Iterable[str], what: str = 'npz file',
                     shapes: Optional[dict] = None) -> dict:
    """Load the given keys of an npz file into a dict, checking presence and (optionally) trailing shapes.

    ``shapes`` maps a key to its expected shape with ``None`` for free dimensions, e.g. ``{'center': (None, 2)}``.
    """
    require_file(path, what)
    try:
        archive = np.load(path, allow_pickle=True)
    except Exception as exc:
        raise DataError(f"cannot read {what} '{path}': {exc}") from exc
    out = {}
    with archive:
        for key in keys:
            if key not in archive.files:
                raise DataError(f"{what} '{path}' lacks key '{key}' (has: {', '.join(sorted(archive.files))})")
            out[key] = archive[key]
    for key, shape in (shapes or {}).items():
        arr = out[key]
        ok = arr.ndim == len(shape) and all(e is None or e == a for e, a in zip(shape, arr.shape))
        if not ok:
            pretty = '[' + ','.join('N' if e is None else str(e) for e in shape) + ']'
            raise DataError(f"{what} '{path}' key '{key}' has shape {list(arr.shape)}, expected {pretty}")
    return out
