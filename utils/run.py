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
    """Seed Python, numpy and torch (all devices) and turn off cuDNN's benchmark autotuner (it picks kernels by
    timing them). That alone does not make CUDA runs bit-reproducible: some CUDA kernels stay nondeterministic
    unless ``torch.use_deterministic_algorithms(True)``. On the CPU the code avoids the one nondeterministic kernel it
    met (the backward of advanced indexing with repeated rows, ``index_put_`` with accumulate: ``index_select``
    instead), so CPU runs with a fixed thread count are bit-reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False


def get_device(gpu_id: int = 0, device: str = None) -> torch.device:
    """``device`` when given ('cpu', 'cuda', 'cuda:1'); else ``cuda:<gpu_id>`` when CUDA is available, else the CPU.

    A CUDA device asked for on a machine without CUDA is a one-line :class:`ValueError`.
    """
    if device:
        try:
            chosen = torch.device(device)
        except RuntimeError:
            raise ValueError(f"--device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
        if chosen.type == 'cuda' and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        return chosen
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
    """Logger printing to stdout and, with ``run_dir``, to ``run_<timestamp>.log`` there.

    With ``run_dir`` it (re)configures the logger; without, it returns the logger as already configured (so a
    library call that only wants to log keeps the run's log file), or a stdout logger if none was configured.
    """
    logger = logging.getLogger(name)
    if run_dir is None and logger.handlers:
        return logger
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
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


def start_run(args, cfg_path: str = None, run_dir: str = None):
    """Seed (when ``args.seed`` is set), pick the device, create the run folder with its config copy and logger.

    ``run_dir``: an existing folder to continue (``--resume``). Training scripts that check their inputs first
    call :func:`prepare_run` before reading them and :func:`open_run_dir` after, so a run that cannot start leaves
    no folder behind. Returns ``(device, run_dir, logger)``.
    """
    device = prepare_run(args)
    run_dir, logger = open_run_dir(args, cfg_path, device, run_dir)
    return device, run_dir, logger


def prepare_run(args) -> torch.device:
    """Join the process group when started by torchrun (:mod:`utils.distributed`; the device then comes from
    ``LOCAL_RANK``), seed (when ``args.seed`` is set; rank ``r`` with ``seed + r``) and pick the device.
    Writes nothing."""
    from utils import distributed
    device = distributed.init_distributed(getattr(args, 'device', None))
    if getattr(args, 'seed', None) is not None:
        seed_everything(args.seed + distributed.rank())
    if device is None:
        device = get_device(args.gpu_id, getattr(args, 'device', None))
    return device


def open_run_dir(args, cfg_path: str = None, device=None, run_dir: str = None):
    """Create the run folder with ``params.json``, the config copy and the log file; returns (run_dir, logger).

    ``run_dir``: an existing folder to continue (``--resume``); otherwise ``<save_dir>/<run_id>``, refused when it
    already holds checkpoints unless ``--overwrite``. Leftover temporary files of an interrupted save are removed.
    Under torchrun only rank 0 writes the folder and logs.
    """
    from utils import distributed
    from utils.run_state import check_run_dir, remove_stale_temp_files

    removed = []
    if distributed.is_main():
        if run_dir is None:
            if args.run_id is not None:
                check_run_dir(os.path.join(args.save_dir, str(args.run_id)), resume=False,
                              overwrite=bool(getattr(args, 'overwrite', False)))
            run_dir = make_run_dir(args.save_dir, args.run_id)
        removed = remove_stale_temp_files(run_dir)
        save_run_config(run_dir, args, cfg_path)
    run_dir = distributed.all_gather_objects(run_dir)[0]
    if distributed.is_main():
        logger = get_logger(run_dir)
    else:
        logger = logging.getLogger(f'egohmr.rank{distributed.rank()}')
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
    logger.info(f"run folder: {run_dir} (device {device}"
                + (f", {distributed.world_size()} processes" if distributed.world_size() > 1 else '') + ')')
    for path in removed:
        logger.info(f"removed the leftover temporary file of an interrupted save: {path}")
    return run_dir, logger


def check_run_paths(args, input_files=()) -> None:
    """Before a training run starts: ``--save_dir`` (and the run folder) can be folders, a run folder that holds
    checkpoints is only reused with ``--resume`` or ``--overwrite``, and each ``(flag, path, what, hint)`` of
    ``input_files`` is a file; a DataError naming the flag otherwise."""
    from utils.checks import require_output_dirs
    from utils.io import DataError
    from utils.run_state import check_run_dir
    run_dir = os.path.join(args.save_dir, str(args.run_id)) if args.run_id is not None else args.save_dir
    require_output_dirs([(args.save_dir, '--save_dir'), (run_dir, '--run_id')])
    if args.run_id is not None and not getattr(args, 'resume', None):
        check_run_dir(run_dir, resume=False, overwrite=bool(getattr(args, 'overwrite', False)))
    if getattr(args, 'sync_bn', False) and (getattr(args, 'device', None) == 'cpu' or not torch.cuda.is_available()):
        raise DataError("--sync_bn True needs CUDA devices (torch's SyncBatchNorm has no CPU kernel); on the CPU "
                        "each process normalises with its own batch and takes rank 0's running statistics")
    for flag, path, what, hint in input_files:
        if not os.path.isfile(path):
            raise DataError(f"{flag}: no {what} at '{path}'" + (f"; {hint}" if hint else ''))


def check_finite_losses(losses: dict) -> None:
    """A FloatingPointError naming the terms when a training loss is NaN or infinite (call before the step)."""
    values = {name: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for name, v in losses.items()}
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise FloatingPointError(f"non-finite training loss ({', '.join(bad)}); stopped before the optimizer step, "
                                 "the weights saved so far are kept (check the inputs or lower the learning rate)")


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
                  save_last: Callable[[int, int], None], writer=None, logger=None,
                  format_losses: Callable[[dict], str] = str, validated_at_start: bool = False,
                  start_step: int = 0, sampler=None, stop=None) -> Tuple[int, int]:
    """The iteration loop both training scripts share; returns ``(iterations done, epoch of the last one)``.

    Per epoch, ``loader.dataset.set_epoch(epoch)`` (where it exists: seeded augmentation), ``sampler.set_epoch``
    (an :class:`utils.run_state.EpochSampler`: the epoch's data order) and one pass over ``loader`` calling
    ``train_step(batch, epoch) -> losses``. Every ``log_step`` iterations the losses go to tensorboard
    (``train/<name>``) and the log, every ``val_step`` ``validate(step, epoch)`` runs (on preserved RNG streams, so
    validating does not change what training draws), every ``save_step`` ``save_last(step, epoch)``. A run that
    stops between validations (``max_iters``) is validated once more; ``save_last`` runs at the end unless the
    ``save_step`` save of the last iteration, after its validation, already wrote that state.
    ``max_iters=None`` means no limit (``num_epoch`` epochs). ``start_step`` > 0 resumes: the epochs and batches
    before it are skipped without loading them (``sampler`` needed). ``stop``: a :class:`utils.run_state.StopRequest`;
    when it fires, ``save_last`` runs and :class:`utils.run_state.RunInterrupted` is raised.
    """
    from tqdm import tqdm

    from utils.run_state import RunInterrupted, preserved_rng

    def run_validation(at_step: int, epoch: int) -> None:
        with preserved_rng():
            validate(at_step, epoch)

    max_iters = math.inf if max_iters is None else max_iters
    total = min(max_iters, num_epoch * iters_per_epoch)
    if start_step and (sampler is None or iters_per_epoch < 1):
        raise ValueError("resuming needs the run's EpochSampler")
    start_epoch, skip = divmod(start_step, iters_per_epoch) if start_step else (0, 0)
    progress = tqdm(total=None if math.isinf(total) else int(total), initial=start_step, desc='train',
                    dynamic_ncols=True)
    step, last_epoch = start_step, max(0, start_epoch - (1 if skip == 0 and start_step else 0))
    last_val_step = step if (validated_at_start or start_step) else None
    last_save_step = None
    for epoch in range(start_epoch, num_epoch):
        if step >= max_iters:
            break
        if hasattr(loader.dataset, 'set_epoch'):
            loader.dataset.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
            sampler.set_start(skip * loader.batch_size if epoch == start_epoch else 0)
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
                run_validation(step, epoch)
                last_val_step = step
            if step % save_step == 0:
                save_last(step, epoch)
                last_save_step = step
            if stop:
                progress.close()
                save_last(step, epoch)
                raise RunInterrupted(f"stopped by {stop.signal_name} after iteration {step}; last_model.pt saved "
                                     "(continue with --resume)")
    progress.close()
    if step > 0 and last_val_step != step:  # stopped between validations: evaluate the final weights too
        run_validation(step, last_epoch)
        last_save_step = None                  # the checkpoint must hold this validation too
    if last_save_step != step:                 # else the save_step checkpoint of this very iteration is the last
        save_last(step, last_epoch)
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


def run_training_loop(args, loader, sampler, step_fn, validate, record, writer, logger, format_losses,
                      validated_at_start: bool = False) -> int:
    """:func:`training_loop` with the flags of :func:`utils.cli.add_training_flags`, the run's
    :class:`utils.run_state.RunRecord` (resume point, ``last_model.pt``), SIGTERM/SIGINT handling, the
    identical-weights check of the ranks under torchrun and the closing of tensorboard and of the process group;
    returns the iterations done."""
    from utils import distributed
    from utils.run_state import StopRequest
    sync = distributed.SyncCheck(record.model, args.log_step, logger)

    def checked_step(batch, epoch):
        losses = step_fn(batch, epoch)
        sync.after_step()
        return losses

    with StopRequest() as stop:
        step, _ = training_loop(
            loader, num_epoch=args.num_epoch, max_iters=args.max_iters, iters_per_epoch=len(loader),
            log_step=args.log_step, val_step=args.val_step, save_step=args.save_step, train_step=checked_step,
            validate=validate, save_last=record.save_last, writer=writer, logger=logger,
            format_losses=format_losses, validated_at_start=validated_at_start, start_step=record.start_step,
            sampler=sampler, stop=stop)
    if writer is not None:
        writer.close()
    distributed.close_distributed()
    return step
