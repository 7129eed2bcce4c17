"""Shared plumbing of the ``benchmarks/bench_*.py`` scripts: flags, the JSON header, timing and peak memory.

Every benchmark prints exactly one JSON object on stdout. It starts with :func:`header` (device, torch version,
thread count, CPU load) and adds its figures; progress and library chatter go to stderr.

Timing (:func:`time_call`): ``warmup`` untimed calls, then ``repeats`` timed calls, each ended by a CUDA
synchronisation on GPU. Peak memory (:class:`PeakMemory`): on CUDA ``torch.cuda.max_memory_allocated`` since the last
reset; on the CPU the resident-set high-water mark ``resource.getrusage(RUSAGE_SELF).ru_maxrss``. Linux lets a
process reset that mark (``/proc/self/clear_refs``); where the reset works the CPU figure covers only the measured
section, otherwise it is the process peak since start, and ``peak_memory_scope`` in the JSON says which.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable, Dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:   # the scripts run as ``python benchmarks/bench_x.py`` from anywhere
    sys.path.insert(0, ROOT)
os.environ.setdefault('PYOPENGL_PLATFORM', 'egl')

import torch  # noqa: E402

from utils.cli import add_bool_flag  # noqa: E402

MIB = 1024.0 * 1024.0


def default_device() -> str:
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def base_parser(description: str, cpu_calls=(1, 1), cuda_calls=(5, 2)) -> argparse.ArgumentParser:
    """The flags every benchmark shares (``--device --repeats --warmup --threads --world --seed --quick``).

    ``cpu_calls`` / ``cuda_calls``: the default (repeats, warm-up calls) on each kind of device; the CPU defaults
    keep a no-argument run short on a 2-core machine.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.set_defaults(default_calls={'cpu': tuple(cpu_calls), 'cuda': tuple(cuda_calls)})
    parser.add_argument('--device', default=default_device(), help="torch device, e.g. 'cpu', 'cuda', 'cuda:1'")
    parser.add_argument('--repeats', type=positive_int, default=None,
                        help=f'timed calls per figure (default {cpu_calls[0]} on CPU, {cuda_calls[0]} on CUDA)')
    parser.add_argument('--warmup', type=non_negative_int, default=None,
                        help=f'untimed calls before the timed ones (default {cpu_calls[1]} on CPU, '
                             f'{cuda_calls[1]} on CUDA)')
    parser.add_argument('--threads', type=positive_int, default=None,
                        help='torch CPU threads (default: min(2, number of cores))')
    parser.add_argument('--world', default=None,
                        help='synthetic world folder (default: outputs/bench/world, built on first use)')
    parser.add_argument('--seed', type=int, default=0, help='seed of torch/numpy before the measurements')
    add_bool_flag(parser, '--quick', False, 'fewest calls (warm-up 0, 1 repeat): a smoke run')
    return parser


def setup(args: argparse.Namespace) -> torch.device:
    """Resolve the device and the call counts (``--quick``, device defaults); apply ``--threads`` and ``--seed``."""
    import numpy as np

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise SystemExit(f"--device: '{args.device}' is not a torch device ({exc})")
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    repeats, warmup = args.default_calls.get(device.type, args.default_calls['cpu'])
    if args.quick:
        repeats, warmup = 1, 0
    args.repeats = args.repeats if args.repeats is not None else repeats
    args.warmup = args.warmup if args.warmup is not None else warmup
    threads = args.threads or max(1, min(2, os.cpu_count() or 1))
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    return device


def header(device: torch.device) -> Dict:
    """Machine facts opening every JSON result."""
    info = {'device': str(device), 'torch': torch.__version__, 'threads': torch.get_num_threads(),
            'python': platform.python_version(), 'cpu_count': os.cpu_count()}
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError, AttributeError):
        info['load_avg_1min'] = round(os.getloadavg()[0], 2)
    return info


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int = 1, warmup: int = 1) -> Dict:
    """Seconds per call of ``fn``: ``mean_s``, ``min_s``, ``max_s``, ``std_s`` over ``repeats`` timed calls."""
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {'mean_s': statistics.fmean(times), 'min_s': min(times), 'max_s': max(times),
            'std_s': statistics.stdev(times) if len(times) > 1 else 0.0, 'repeats': repeats, 'warmup': warmup}


def rate(timing: Dict, items_per_call: float = 1.0) -> float:
    """Items per second from a :func:`time_call` result (based on the mean time)."""
    return items_per_call / timing['mean_s'] if timing['mean_s'] > 0 else math.inf


def _reset_rss_high_water_mark() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs`` code 5); False where that is not possible."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _return_freed_heap_to_os() -> None:
    """glibc keeps freed heap memory resident; ``malloc_trim(0)`` hands it back (no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL('libc.so.6').malloc_trim(0)


def ru_maxrss_mib() -> float:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in MiB (kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == 'darwin' else peak / 1024.0


class PeakMemory:
    """Peak memory of a measured section: ``reset()`` before it, ``report()`` after it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.scope = 'since process start'

    def reset(self) -> None:
        """Start a new section: free what earlier sections left behind, then reset the high-water mark."""
        gc.collect()
        if self.device.type == 'cuda':
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.scope = 'since reset'
            return
        _return_freed_heap_to_os()
        if _reset_rss_high_water_mark():
            self.scope = 'since reset'

    def report(self) -> Dict:
        """``peak_memory_mib`` (and its kind / scope) of the section since the last :meth:`reset`."""
        if self.device.type == 'cuda':
            return {'peak_memory_mib': round(torch.cuda.max_memory_allocated(self.device) / MIB, 1),
                    'peak_memory_kind': 'torch.cuda.max_memory_allocated', 'peak_memory_scope': self.scope}
        return {'peak_memory_mib': round(ru_maxrss_mib(), 1), 'peak_memory_kind': 'ru_maxrss (process RSS)',
                'peak_memory_scope': self.scope}


def rounded(obj, digits: int = 4):
    """Round floats inside nested dicts/lists for printing (NaN/inf -> None: JSON has neither)."""
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def print_json(result: Dict) -> None:
    """The benchmark's one line of stdout."""
    sys.stdout.write(json.dumps(rounded(result), sort_keys=False) + '\n')
    sys.stdout.flush()


def log(message: str) -> None:
    """Progress for humans, on stderr (stdout carries only the JSON)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stdout_to_stderr():
    """Send library prints (preprocessing summaries, world generation) to stderr inside the block."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def bench_main(build_parser, run, argv=None) -> int:
    """Parse flags, run the benchmark with progress on stderr, and print its one JSON object on stdout."""
    args = build_parser().parse_args(argv)
    with stdout_to_stderr():
        result = run(args)
    print_json(result)
    return 0
