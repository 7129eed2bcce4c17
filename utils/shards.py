"""Splitting a test run over independent jobs or torchrun processes, and merging their shares.

``--shard K/N`` (or rank K of N under torchrun) evaluates share K of the test frames and writes
``<output dir>/shards/shard_K_of_N.pt``; ``--merge True`` (or rank 0 under torchrun, once every rank has written)
reads the N shares and writes what one process writes: ``metrics.json``, the results pickle, ``predictions.npz``.

The shares are whole batches: share K holds batches ``[K*B/N, (K+1)*B/N)`` of the ``B`` batches of one process, so
every frame is evaluated in the batch it has in a single-process run. With the per-frame random streams of
:mod:`utils.frame_rng` each frame's samples, and so the merged metrics, then equal a single-process run's bit for bit.
With another batch size a frame's numbers agree with it to float rounding (BLAS kernels for a few rows and for many
sum in different orders, ~1e-7 m here); they are not bit-identical.

A share file is a ``torch.save`` dict: ``format`` (``'egohmr-shard-1'``), ``stage``, ``shard`` ``[K, N]``,
``settings`` (the flags that must agree between shares), ``frame_index [n]``, ``metrics_state``, the stage's
per-frame results, and ``predictions`` (the arrays of :mod:`utils.predictions`, or None).
"""
from __future__ import annotations

import glob
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from utils.io import DataError

FORMAT = 'egohmr-shard-1'
SHARD_DIR = 'shards'
_NAME = re.compile(r'^shard_(\d+)_of_(\d+)\.pt$')


def parse_shard(text: Optional[str]) -> Optional[Tuple[int, int]]:
    """``'K/N'`` -> ``(K, N)`` with ``0 <= K < N``; None for None."""
    if text is None:
        return None
    match = re.fullmatch(r'\s*(\d+)\s*/\s*(\d+)\s*', str(text))
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise DataError(f"--shard: expected K/N with 0 <= K < N (share K of N, e.g. 0/4), got '{text}'")
    return int(match.group(1)), int(match.group(2))


def shard_indices(num_frames: int, batch_size: int, shard: int, num_shards: int) -> List[int]:
    """Dataset indices of share ``shard`` of ``num_shards``: whole batches of ``batch_size`` (module docstring)."""
    num_batches = -(-num_frames // batch_size)
    first, last = shard * num_batches // num_shards, (shard + 1) * num_batches // num_shards
    return list(range(first * batch_size, min(last * batch_size, num_frames)))


def shard_path(out_dir: str, shard: int, num_shards: int) -> str:
    return os.path.join(out_dir, SHARD_DIR, f'shard_{shard}_of_{num_shards}.pt')


def write_shard(out_dir: str, shard: Tuple[int, int], stage: str, settings: Dict, payload: Dict) -> str:
    """Write one share (atomically); returns its path."""
    from utils.io import atomic_torch_save
    path = shard_path(out_dir, *shard)
    atomic_torch_save(dict(payload, format=FORMAT, stage=stage, shard=list(shard), settings=dict(settings)), path)
    return path


def load_shards(out_dir: str, stage: str, settings: Optional[Dict] = None) -> List[Dict]:
    """Every share under ``<out_dir>/shards``, in share order, checked to form one complete split.

    One-line :class:`DataError` when there is none, when shares of different ``N`` lie there, when a share is missing,
    unreadable or of another stage, or when their ``settings`` differ (from each other or from ``settings``).
    """
    import torch
    folder = os.path.join(out_dir, SHARD_DIR)
    found = {}
    for path in sorted(glob.glob(os.path.join(folder, 'shard_*_of_*.pt'))):
        match = _NAME.match(os.path.basename(path))
        if match:
            found[(int(match.group(1)), int(match.group(2)))] = path
    if not found:
        raise DataError(f"--merge: no share files in '{folder}' (write them with --shard K/N first)")
    totals = sorted({n for _, n in found})
    if len(totals) > 1:
        raise DataError(f"--merge: '{folder}' holds shares of different splits (N = {totals}); remove the old ones")
    total = totals[0]
    missing = [k for k in range(total) if (k, total) not in found]
    if missing:
        raise DataError(f"--merge: '{folder}' lacks share(s) {', '.join(f'{k}/{total}' for k in missing)} of "
                        f"{total}")
    shares = []
    for k in range(total):
        path = found[(k, total)]
        try:
            share = torch.load(path, map_location='cpu', weights_only=False)
        except Exception as exc:
            raise DataError(f"--merge: cannot read share '{path}': {type(exc).__name__}: {exc}") from exc
        if not isinstance(share, dict) or share.get('format') != FORMAT:
            raise DataError(f"--merge: '{path}' is not a share file of format '{FORMAT}'")
        if share.get('stage') != stage:
            raise DataError(f"--merge: '{path}' is a share of stage '{share.get('stage')}', not '{stage}'")
        shares.append(share)
    reference = settings if settings is not None else shares[0]['settings']
    for k, share in enumerate(shares):
        differing = sorted(key for key in set(reference) | set(share['settings'])
                           if reference.get(key) != share['settings'].get(key))
        if differing:
            key = differing[0]
            raise DataError(f"--merge: share {k}/{total} was run with {key}={share['settings'].get(key)!r}, "
                            f"expected {reference.get(key)!r}; rerun it with the same flags")
    frames = np.concatenate([np.asarray(s['frame_index']) for s in shares])
    if len(np.unique(frames)) != len(frames):
        raise DataError(f"--merge: the shares in '{folder}' overlap (a frame appears twice)")
    expected = int(shares[0]['num_frames_split'])
    if len(frames) != expected:
        raise DataError(f"--merge: the {total} shares in '{folder}' hold {len(frames)} frames, the split has "
                        f"{expected}")
    return shares


def merged_predictions(shares: Sequence[Dict]) -> Optional[Dict[str, np.ndarray]]:
    """The shares' prediction arrays as one set in frame order (None if a share has none)."""
    from utils.predictions import merge_prediction_arrays
    parts = [s.get('predictions') for s in shares]
    if any(p is None for p in parts):
        return None
    return merge_prediction_arrays(parts)


def process_share(args) -> Optional[Tuple[int, int]]:
    """``(K, N)`` of this process: ``--shard K/N``, or rank/world size under torchrun (None: the whole split)."""
    from utils import distributed
    shard = parse_shard(getattr(args, 'shard', None))
    if distributed.world_size() > 1:
        if shard is not None:
            raise DataError("--shard cannot be combined with torchrun (each process takes its rank's share)")
        return distributed.rank(), distributed.world_size()
    return shard


def split_dataset(dataset, batch_size: int, share: Optional[Tuple[int, int]]):
    """The part of ``dataset`` that share ``(K, N)`` evaluates (the whole dataset for None)."""
    if share is None:
        return dataset
    from torch.utils.data import Subset
    return Subset(dataset, shard_indices(len(dataset), batch_size, *share))


def finish_test_run(out_dir: str, share: Optional[Tuple[int, int]], stage: str, settings: Dict, result: Dict,
                    payload, write_outputs, merge):
    """The end of a test script's run: the whole split (``share`` None) calls ``write_outputs()``; a share writes
    ``payload()`` (:func:`finish_share`). Returns the result of the whole split where this process has it."""
    if share is None:
        write_outputs()
        return result
    return finish_share(out_dir, share, stage, settings, payload(), merge) or result


def finish_share(out_dir: str, share: Tuple[int, int], stage: str, settings: Dict, payload: Dict, merge,
                 log=print):
    """Write this process's share. Under torchrun every rank waits for the others and rank 0 then calls ``merge()``
    (which writes the outputs of the whole split) and returns its result; otherwise returns None."""
    from utils import distributed
    path = write_shard(out_dir, share, stage, settings, payload)
    hint = '' if distributed.world_size() > 1 else '; when all shares are written, rerun with --merge True'
    log(f"share {share[0]}/{share[1]}: {len(payload['frame_index'])} frames written to {path}{hint}")
    if distributed.world_size() == 1:
        return None
    distributed.barrier()
    result = merge() if distributed.is_main() else None
    distributed.barrier()
    return result


def add_shard_flags(p) -> None:
    from utils.cli import add_bool_flag
    p.add_argument('--shard', default=None, metavar='K/N',
                   help='evaluate share K of N of the test frames (whole batches) and write it to '
                        '<output dir>/shards/; under torchrun each process takes its rank\'s share by itself')
    add_bool_flag(p, '--merge', False, 'read the N shares of an earlier --shard K/N run (same flags) and write the '
                                       'metrics, results and predictions of the whole split')


def share_flags_error(args) -> str:
    """A reason to refuse the --shard / --merge flags, or ''."""
    try:
        parse_shard(args.shard)
    except DataError as exc:
        return str(exc)
    if args.shard is not None and args.merge:
        return "--shard and --merge cannot be combined: write the shares first, then merge them"
    from utils import distributed
    if distributed.launched_by_torchrun() and (args.merge or args.shard is not None):
        return ("under torchrun each process takes its rank's share and rank 0 merges: drop --shard / --merge "
                "(they are for independent jobs)")
    return ''
