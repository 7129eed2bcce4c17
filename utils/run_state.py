"""The state of a training run: what a checkpoint holds beyond the weights, exact resume, and stop signals.

A training checkpoint is ``{'state_dict': ...}`` with the original key names (the original scripts load it as they
load their own) plus ``format_version``, ``config`` (the run's flags and model config), ``optimizers``,
``iteration``, ``epoch``, ``best``, ``history``, ``rng`` (python, numpy, torch and CUDA generator states) and
whatever a stage adds (stage 2: the body-representation statistics ``body_rep_stats``).

Exact resume rests on three rules the training loop keeps:

* the data order of epoch ``e`` is a permutation drawn from ``(seed, e)`` alone (:class:`EpochSampler`), so a resumed
  run skips the batches already done without loading them;
* the global RNG streams (dropout, flow samples, diffusion timesteps and noise) are saved at the checkpoint and
  restored on resume;
* validation runs on saved-and-restored RNG streams (:func:`preserved_rng`), so where a run is stopped and
  validated does not change what the training steps draw.
"""
from __future__ import annotations

import contextlib
import glob
import os
import random
import shutil
import signal
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from utils.io import DataError

FORMAT_VERSION = 1
CHECKPOINT_NAMES = ('last_model.pt', 'best_model.pt', 'best_model_vis.pt')
RESUME_FILE = 'last_model.pt'
TRAINING_KEYS = ('state_dict', 'format_version', 'config', 'optimizers', 'iteration', 'epoch', 'best', 'rng')


# ---------------------------------------------------------------------------------------------------------- RNG
def rng_state() -> Dict:
    """The python, numpy, torch (CPU) and CUDA generator states."""
    state = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


@contextlib.contextmanager
def preserved_rng():
    """Run the block and put every global RNG stream back as it was before it."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


# ---------------------------------------------------------------------------------------------------- data order
class EpochSampler(torch.utils.data.Sampler):
    """Indices of one epoch: a permutation drawn from ``(seed, epoch)`` (or ``range(n)`` without shuffling), split
    over ``num_replicas`` processes as ``DistributedSampler`` does (rank ``r`` takes every ``num_replicas``-th
    index of the padded permutation). :meth:`set_start` skips the first indices of the next epoch (resume)."""

    def __init__(self, num_items: int, seed: int, shuffle: bool = True, rank: int = 0, num_replicas: int = 1):
        self.num_items, self.seed, self.shuffle = int(num_items), int(seed), bool(shuffle)
        self.rank, self.num_replicas = int(rank), int(num_replicas)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def epoch_indices(self) -> List[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_items, generator=generator).tolist()
        else:
            order = list(range(self.num_items))
        per_rank = -(-self.num_items // self.num_replicas)
        order += order[:per_rank * self.num_replicas - len(order)]        # pad so every rank gets as many
        return order[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices()[self.start:]
        self.start = 0
        return iter(indices)

    def __len__(self) -> int:
        return -(-self.num_items // self.num_replicas)


def endless_batches(loader, sampler: EpochSampler, start_batch: int = 0) -> Iterator:
    """Batches of ``loader`` forever, epoch after epoch of ``sampler``, starting at overall batch ``start_batch``."""
    per_epoch = len(loader)
    epoch, skip = divmod(int(start_batch), per_epoch) if per_epoch else (0, 0)
    while True:
        sampler.set_epoch(epoch)
        sampler.set_start(skip * loader.batch_size)
        yield from loader
        epoch, skip = epoch + 1, 0


# ------------------------------------------------------------------------------------------------- checkpoints
def training_checkpoint(model: torch.nn.Module, config: Dict, optimizers, iteration: int, epoch: int,
                        best: float, history: Optional[list] = None, rng_per_rank: Optional[list] = None,
                        **extra) -> Dict:
    """The dict a training checkpoint holds (module docstring); ``rng_per_rank``: every process's RNG states
    under torchrun (gathered by the caller on all ranks)."""
    state = {'state_dict': model.state_dict(), 'format_version': FORMAT_VERSION, 'config': config,
             'optimizers': [opt.state_dict() for opt in optimizers], 'iteration': int(iteration),
             'epoch': int(epoch), 'best': float(best), 'history': list(history or []), 'rng': rng_state()}
    if rng_per_rank is not None and len(rng_per_rank) > 1:
        state['rng_per_rank'] = rng_per_rank
    state.update(extra)
    return state


def resume_checkpoint_path(path: str) -> str:
    """``--resume`` takes a run folder (its ``last_model.pt``) or a checkpoint file."""
    candidate = os.path.join(path, RESUME_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(candidate):
        where = f"run folder '{path}' has no {RESUME_FILE}" if os.path.isdir(path) else f"no file at '{path}'"
        raise DataError(f"--resume: {where}")
    return candidate


def load_training_state(path: str) -> Dict:
    """Read a training checkpoint for ``--resume``; a weights-only file (released checkpoints) is refused."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as exc:
        raise DataError(f"--resume: cannot read '{path}': {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or 'state_dict' not in state:
        raise DataError(f"--resume: '{path}' is not a checkpoint (no 'state_dict')")
    missing = [k for k in TRAINING_KEYS if k not in state]
    if missing:
        raise DataError(f"--resume: '{path}' holds weights only (no {', '.join(missing)}): it can initialise a "
                        "model but not continue a run")
    if int(state['format_version']) > FORMAT_VERSION:
        raise DataError(f"--resume: '{path}' has checkpoint format {state['format_version']}, newer than this "
                        f"code's {FORMAT_VERSION}")
    return state


def restore_training_state(state: Dict, model: torch.nn.Module, optimizers) -> None:
    """Weights, optimizer states and RNG streams of a checkpoint read by :func:`load_training_state`."""
    model.load_state_dict(state['state_dict'])
    if len(state['optimizers']) != len(optimizers):
        raise DataError(f"--resume: the checkpoint has {len(state['optimizers'])} optimizer state(s), this run "
                        f"{len(optimizers)}")
    for optimizer, saved in zip(optimizers, state['optimizers']):
        optimizer.load_state_dict(saved)
    from utils import distributed
    per_rank = state.get('rng_per_rank')
    if distributed.world_size() > 1:
        if not per_rank or len(per_rank) != distributed.world_size():
            raise DataError(f"--resume: the checkpoint was written by {len(per_rank or [None])} process(es); resume "
                            f"it with as many (got {distributed.world_size()})")
        set_rng_state(per_rank[distributed.rank()])
    else:
        set_rng_state(state['rng'])


# ------------------------------------------------------------------------------------------------ run folders
def existing_checkpoints(run_dir: str) -> List[str]:
    return [name for name in CHECKPOINT_NAMES if os.path.isfile(os.path.join(run_dir, name))]


def check_run_dir(run_dir: str, resume: bool, overwrite: bool) -> None:
    """Refuse a run folder that already holds checkpoints unless the run resumes or may overwrite it."""
    found = existing_checkpoints(run_dir) if os.path.isdir(run_dir) else []
    if found and not (resume or overwrite):
        raise DataError(f"run folder '{run_dir}' already holds {', '.join(found)}: pass --resume {run_dir} to "
                        "continue that run, --overwrite True to replace it, or another --run_id")


def remove_stale_temp_files(run_dir: str) -> List[str]:
    """Delete what an interrupted atomic save left in ``run_dir``: hidden ``.<name>.<pid>.<random>.tmp`` folders of
    processes that no longer run (``utils.io.atomic_path``) and hidden ``.<name>.*.tmp`` files of older versions."""
    from utils.io import _process_alive
    removed = []
    for path in glob.glob(os.path.join(glob.escape(run_dir), '.*.tmp*')):
        if os.path.isdir(path):
            parts = os.path.basename(path).split('.')
            pid = parts[-3] if len(parts) >= 4 else ''
            if pid.isdigit() and _process_alive(int(pid)):
                continue
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
        removed.append(path)
    return removed


# ------------------------------------------------------------------------------------------------------ signals
class StopRequest:
    """While active, SIGTERM and SIGINT set :attr:`signal_name` instead of killing the process; the training loop
    then saves ``last_model.pt`` and ends the run."""

    SIGNALS = ('SIGTERM', 'SIGINT')

    def __init__(self):
        self.signal_name: Optional[str] = None
        self._previous = {}

    def __bool__(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def __enter__(self):
        for name in self.SIGNALS:
            signum = getattr(signal, name)
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:          # not the main thread: signals cannot be caught here
                pass
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class RunInterrupted(RuntimeError):
    """The run was stopped by a signal after saving ``last_model.pt``."""


# ------------------------------------------------------------------------------------------------ run config
def json_safe_args(args) -> Dict:
    """The parsed flags as plain JSON values (others become strings)."""
    out = {}
    for key, value in vars(args).items():
        out[key] = value if isinstance(value, (bool, int, float, str, type(None), list)) else str(value)
    return out


def run_config(args, cfg, data_seed: int, stage: str) -> Dict:
    """What a checkpoint records of its run: the stage, the flags, the model config (yacs dump) and the data seed."""
    return {'stage': stage, 'args': json_safe_args(args), 'model_cfg': cfg.dump() if cfg is not None else None,
            'data_seed': int(data_seed)}


def choose_data_seed(args, resumed: Optional[Dict]) -> int:
    """The seed of the data order: the resumed run's, else ``--seed``, else a fresh one (recorded in checkpoints)."""
    if resumed is not None:
        return int(resumed['config']['data_seed'])
    if getattr(args, 'seed', None) is not None:
        return int(args.seed)
    return int(np.random.SeedSequence().generate_state(1)[0] % (2 ** 31))


# ------------------------------------------------------------------------------ test-time settings from a run
# Flags of the training run that define the architecture or the data the network expects; a test run must use
# the same values.
STAGE1_RUN_SETTINGS = ('with_focal_length', 'with_bbox_info', 'with_cam_center', 'scene_cano', 'scene_type',
                       'scene_downsample_rate', 'add_bbox_scale')
STAGE2_RUN_SETTINGS = STAGE1_RUN_SETTINGS + ('only_mask_img_cond', 'num_diffusion_timesteps')
# Of these, safe to change at test time (with a warning): the PointNet max-pools over however many points it gets.
TEST_TIME_ADJUSTABLE = ('scene_downsample_rate',)


def checkpoint_config(path: str) -> Optional[Dict]:
    """The ``config`` a checkpoint of this code records, or None (a released, weights-only checkpoint or no file).

    Memory-mapped, so only the small config is read from a large file."""
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location='cpu', weights_only=False, mmap=True)
    except Exception:
        return None                     # unreadable here: the weight loader gives the one-line error
    return state.get('config') if isinstance(state, dict) else None


def explicit_flags(parser, argv) -> set:
    """Destinations of the flags written on the command line ``argv`` (``--flag value`` or ``--flag=value``)."""
    written = {token.split('=', 1)[0] for token in argv if token.startswith('--')}
    return {action.dest for action in parser._actions if written & set(action.option_strings)}


def apply_run_settings(args, parser, argv, checkpoint: str, names, log=print) -> None:
    """Take the training run's ``names`` settings from the checkpoint's config. A flag given on the command line
    that contradicts the checkpoint is a one-line :class:`DataError` naming both values (a warning for the
    settings of :data:`TEST_TIME_ADJUSTABLE`); a flag left at its default is replaced by the run's value (with a
    note). Nothing happens for a weights-only checkpoint."""
    config = checkpoint_config(checkpoint)
    if not config or 'args' not in config:
        return
    trained = config['args']
    given = explicit_flags(parser, argv)
    for name in names:
        if name not in trained or not hasattr(args, name):
            continue
        ours, theirs = getattr(args, name), trained[name]
        if ours == theirs:
            continue
        if name in given and name in TEST_TIME_ADJUSTABLE:
            log(f"warning: --{name} {ours} differs from the checkpoint's training run (--{name} {theirs}); "
                "using the given value")
            continue
        if name in given:
            raise DataError(f"--{name} {ours} contradicts the checkpoint '{checkpoint}', trained with --{name} "
                            f"{theirs}; drop the flag or pass --{name} {theirs}")
        setattr(args, name, theirs)
        log(f"note: --{name} {theirs} (from the checkpoint's training run; default {ours})")


# ------------------------------------------------------------------------------------------------- run record
class RunRecord:
    """What a training run keeps beside its model: the best validation value, the validation history, and the
    checkpoints it writes (``last_model.pt`` on every rank's call, the best one on rank 0). Both trainers use it.

    :param metric: the validation value that decides the best checkpoint (lower is better).
    :param best_name: its file name (stage 1 ``best_model.pt``, stage 2 ``best_model_vis.pt``).
    :param extra: further checkpoint entries (stage 2: ``body_rep_stats``).
    """

    def __init__(self, model, optimizers, config: Dict, run_dir: str, metric: str, best_name: str, **extra):
        self.model, self.optimizers, self.config, self.run_dir = model, tuple(optimizers), config, run_dir
        self.metric, self.best_name, self.extra = metric, best_name, extra
        self.best, self.history, self.start_step = float('inf'), [], 0

    def checkpoint(self, step: int, epoch: int, rng_per_rank=None) -> Dict:
        return training_checkpoint(self.model, self.config, self.optimizers, step, epoch, self.best, self.history,
                                   rng_per_rank, **self.extra)

    def save_last(self, step: int, epoch: int) -> None:
        """Write ``last_model.pt`` (every rank must call it: the RNG states of all ranks are gathered)."""
        from utils import distributed
        from utils.io import atomic_torch_save
        state = self.checkpoint(step, epoch, distributed.all_gather_objects(rng_state()))
        if distributed.is_main():
            atomic_torch_save(state, os.path.join(self.run_dir, RESUME_FILE))

    def record_validation(self, step: int, epoch: int, values: Dict, count_as_best: bool = True) -> bool:
        """Add a validation to the history; write the best checkpoint when it improves (rank 0 only)."""
        from utils.io import atomic_torch_save
        self.history.append({'iteration': step, **values})
        improved = count_as_best and values[self.metric] < self.best
        if improved:
            self.best = values[self.metric]
            atomic_torch_save(self.checkpoint(step, epoch), os.path.join(self.run_dir, self.best_name))
        return improved

    def restore(self, resumed: Dict, logger=None) -> None:
        """Weights, optimizers, RNG streams, iteration, best value and history of a ``--resume`` checkpoint."""
        restore_training_state(resumed, self.model, self.optimizers)
        self.start_step, self.best = int(resumed['iteration']), float(resumed['best'])
        self.history = list(resumed['history'])
        if logger is not None:
            logger.info(f"resumed from iteration {self.start_step} (best val {self.metric} {self.best:.4f})")


def resume_request(args):
    """``(training state, run folder)`` of ``--resume``, or ``(None, None)``."""
    if not getattr(args, 'resume', None):
        return None, None
    path = resume_checkpoint_path(args.resume)
    return load_training_state(path), os.path.dirname(path)


def training_loaders(args, train_set, val_set, data_seed: int):
    """``(train loader, its EpochSampler, val loader)`` both trainers use: the training order of epoch e from
    ``data_seed`` alone (this process's share under torchrun, ``drop_last``), worker seeds from ``data_seed``."""
    import torch.utils.data
    from utils import distributed
    sampler = EpochSampler(len(train_set), data_seed, shuffle=args.shuffle, rank=distributed.rank(),
                           num_replicas=distributed.world_size())
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                               num_workers=args.num_workers,
                                               generator=torch.Generator().manual_seed(data_seed))
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size, shuffle=False,
                                             num_workers=args.num_workers,
                                             generator=torch.Generator().manual_seed(data_seed))
    return train_loader, sampler, val_loader
