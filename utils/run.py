"""Small helpers shared by the train/test scripts: flag parsing, seeding, devices, run folders, logging."""
from __future__ import annotations

import argparse
import logging
import math
import os
import random
import shutil
import sys
import time
from typing import Callable, Iterator, Tuple

import numpy as np
import torch

from utils.io import atomic_json_dump


def str2bool(value) -> bool:
    """Boolean flag parser accepting true/false/1/0/yes/no (case-insensitive); anything else is an error."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ('true', '1', 'yes', 'y', 'on'):
        return True
    if text in ('false', '0', 'no', 'n', 'off'):
        return False
    raise argparse.ArgumentTypeError(f"expected True/False/1/0, got {value!r}")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices); make cudnn deterministic."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False


def get_device(gpu_id: int = 0) -> torch.device:
    """``cuda:<gpu_id>`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f'cuda:{gpu_id}')
    return torch.device('cpu')


def recursive_to(obj, device):
    """Move every tensor inside nested dicts/lists/tuples to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: recursive_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(recursive_to(v, device) for v in obj)
    return obj


def endless(loader) -> Iterator:
    """Iterate a DataLoader forever, restarting it when exhausted."""
    while True:
        for batch in loader:
            yield batch


def make_run_dir(save_dir: str, run_id=None) -> str:
    """``<save_dir>/<run_id>``; a random id in [1, 100000] not yet used when ``run_id`` is None."""
    os.makedirs(save_dir, exist_ok=True)
    if run_id is None:
        rng = random.Random(time.time_ns())
        while True:
            run_id = rng.randint(1, 100000)
            if not os.path.exists(os.path.join(save_dir, str(run_id))):
                break
    path = os.path.join(save_dir, str(run_id))
    os.makedirs(path, exist_ok=True)
    return path


def save_run_config(run_dir: str, args: argparse.Namespace, cfg_path: str = None) -> None:
    """Write ``params.json`` (the parsed flags and the command line) and a copy of the model config."""
    params = dict(vars(args))
    params['command'] = ' '.join(sys.argv)
    atomic_json_dump(params, os.path.join(run_dir, 'params.json'))
    if cfg_path and os.path.isfile(cfg_path):
        shutil.copyfile(cfg_path, os.path.join(run_dir, os.path.basename(cfg_path)))


def get_logger(run_dir: str = None, name: str = 'egohmr') -> logging.Logger:
    """Logger printing to stdout and, with ``run_dir``, to ``run_<timestamp>.log`` there."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    fmt = logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S')
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if run_dir:
        handler = logging.FileHandler(os.path.join(run_dir, time.strftime('run_%Y%m%d_%H%M%S.log')))
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    logger.propagate = False
    return logger


def start_run(args, cfg_path: str = None):
    """Seed (when ``args.seed`` is set), pick the device, create the run folder with its config copy and logger.

    Returns ``(device, run_dir, logger)``.
    """
    if getattr(args, 'seed', None) is not None:
        seed_everything(args.seed)
    device = get_device(args.gpu_id)
    run_dir = make_run_dir(args.save_dir, args.run_id)
    save_run_config(run_dir, args, cfg_path)
    logger = get_logger(run_dir)
    logger.info(f"run folder: {run_dir} (device {device})")
    return device, run_dir, logger


class CurvesWriter:
    """Forwards scalars to TensorBoard (when installed) and keeps them; ``close()`` writes ``curves.json`` and the
    loss / validation curves ``curves.png`` (matplotlib, where installed) into the run folder."""

    def __init__(self, run_dir: str, tensorboard=None, logger=None):
        self.run_dir, self.tensorboard, self.logger = run_dir, tensorboard, logger
        self.curves: dict = {}

    def add_scalar(self, tag: str, value, step: int) -> None:
        group, _, name = tag.partition('/')
        self.curves.setdefault(group, {}).setdefault(name or group, []).append([int(step), float(value)])
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if not self.curves:
            return
        from utils.plots import curves_figure, matplotlib_missing
        atomic_json_dump(self.curves, os.path.join(self.run_dir, 'curves.json'))
        missing = matplotlib_missing()
        path = None if missing else curves_figure(self.curves, os.path.join(self.run_dir, 'curves.png'),
                                                  title=os.path.basename(self.run_dir.rstrip(os.sep)))
        if self.logger is not None:
            self.logger.info(f"loss / validation curves written to {path}" if path else f"note: {missing}")


def open_summary_writer(run_dir: str, logger) -> CurvesWriter:
    """A :class:`CurvesWriter` for ``run_dir``: TensorBoard events (noted in the log when tensorboard is
    unavailable) and, at ``close()``, ``curves.json`` / ``curves.png``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as exc:  # tensorboard not installed
        logger.info(f"tensorboard unavailable ({type(exc).__name__}: {exc}); scalars are only logged as text")
        return CurvesWriter(run_dir, None, logger)
    return CurvesWriter(run_dir, SummaryWriter(log_dir=run_dir), logger)


def log_scalars(writer, prefix: str, values: dict, step: int) -> None:
    """Write ``values`` as ``<prefix>/<key>`` scalars at ``step`` (no-op without a writer)."""
    if writer is None:
        return
    for key, value in values.items():
        writer.add_scalar(f'{prefix}/{key}', value, step)


def training_loop(loader, *, num_epoch: int, max_iters, iters_per_epoch: int, log_step: int, val_step: int,
                  save_step: int, train_step: Callable[[dict, int], dict], validate: Callable[[int, int], None],
                  save_last: Callable[[], None], writer=None, logger=None,
                  format_losses: Callable[[dict], str] = str, validated_at_start: bool = False) -> Tuple[int, int]:
    """The iteration loop both training scripts share; returns ``(iterations done, epoch of the last one)``.

    Per epoch, ``loader.dataset.set_epoch(epoch)`` (where it exists: seeded augmentation) and one pass over
    ``loader`` calling ``train_step(batch, epoch) -> losses``. Every ``log_step`` iterations the losses go to
    tensorboard (``train/<name>``) and the log, every ``val_step`` ``validate(step, epoch)`` runs, every
    ``save_step`` ``save_last()``. A run that stops between validations (``max_iters``) is validated once more;
    ``save_last()`` always runs at the end. ``max_iters=None`` means no limit (``num_epoch`` epochs).
    """
    from tqdm import tqdm

    max_iters = math.inf if max_iters is None else max_iters
    total = min(max_iters, num_epoch * iters_per_epoch)
    progress = tqdm(total=None if math.isinf(total) else int(total), desc='train', dynamic_ncols=True)
    step, last_epoch = 0, 0
    last_val_step = 0 if validated_at_start else None
    for epoch in range(num_epoch):
        if step >= max_iters:
            break
        if hasattr(loader.dataset, 'set_epoch'):
            loader.dataset.set_epoch(epoch)
        for batch in loader:
            if step >= max_iters:
                break
            losses = train_step(batch, epoch)
            step, last_epoch = step + 1, epoch
            progress.update(1)
            progress.set_postfix(loss=f"{losses['loss']:.3f}")
            if step % log_step == 0:
                log_scalars(writer, 'train', losses, step)
                if logger is not None:
                    logger.info(f"[train] iter {step} (epoch {epoch}): {format_losses(losses)}")
            if step % val_step == 0:
                validate(step, epoch)
                last_val_step = step
            if step % save_step == 0:
                save_last()
    progress.close()
    if step > 0 and last_val_step != step:  # stopped between validations: evaluate the final weights too
        validate(step, last_epoch)
    save_last()
    return step, last_epoch


def format_table(rows, headers) -> str:
    """A plain-text (markdown-compatible) table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ['| ' + ' | '.join(c.ljust(w) for c, w in zip(cells[0], widths)) + ' |',
             '|' + '|'.join('-' * (w + 2) for w in widths) + '|']
    lines += ['| ' + ' | '.join(c.ljust(w) for c, w in zip(r, widths)) + ' |' for r in cells[1:]]
    return '\n'.join(lines)


def write_metrics(metrics: dict, json_path: str, title: str = 'metrics') -> str:
    """Save ``metrics`` as JSON (atomically) and return a printable table of them."""
    atomic_json_dump(metrics, json_path)
    rows = [(k, f'{v:.2f}' if isinstance(v, float) else v) for k, v in metrics.items()]
    return f'{title}\n' + format_table(rows, ('metric', 'value'))
