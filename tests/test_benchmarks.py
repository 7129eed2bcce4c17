"""The benchmarks' helpers (no timing assertions): call counts, point resizing, method parsing, JSON output."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks')
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import bench_sampling  # noqa: E402
import common  # noqa: E402
from make_bench_world import resize_points  # noqa: E402


def test_time_call_runs_warmup_plus_repeats():
    calls = []
    timing = common.time_call(lambda: calls.append(1), torch.device('cpu'), repeats=3, warmup=2)
    assert len(calls) == 5
    assert timing['repeats'] == 3 and timing['warmup'] == 2
    assert 0 <= timing['min_s'] <= timing['mean_s'] <= timing['max_s']
    with pytest.raises(ValueError, match='repeats'):
        common.time_call(lambda: None, torch.device('cpu'), repeats=0)


def test_rate_is_items_over_mean_time():
    assert common.rate({'mean_s': 0.5}, 16) == pytest.approx(32.0)


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_setup_resolves_device_defaults_and_quick(keep_threads):
    parser = common.base_parser('x', cpu_calls=(2, 1), cuda_calls=(7, 3))
    args = parser.parse_args(['--device', 'cpu', '--threads', '1'])
    assert common.setup(args).type == 'cpu'
    assert (args.repeats, args.warmup) == (2, 1)
    assert torch.get_num_threads() == 1
    args = parser.parse_args(['--device', 'cpu', '--threads', '1', '--quick'])
    common.setup(args)
    assert (args.repeats, args.warmup) == (1, 0)
    args = parser.parse_args(['--device', 'cpu', '--threads', '1', '--repeats', '4', '--warmup', '0'])
    common.setup(args)
    assert (args.repeats, args.warmup) == (4, 0)


def test_resize_points_shrinks_evenly_and_grows_cyclically():
    points = torch.arange(10, dtype=torch.float32).reshape(1, 10, 1).expand(2, 10, 3)
    small = resize_points(points, 4)
    assert small.shape == (2, 4, 3)
    assert small[0, :, 0].tolist() == [0.0, 3.0, 6.0, 9.0]    # first and last kept, evenly spaced
    big = resize_points(points, 23)
    assert big.shape == (2, 23, 3)
    assert big[1, :, 0].tolist() == [float(i % 10) for i in range(23)]
    assert torch.equal(resize_points(points, 10), points)


def test_parse_method():
    assert bench_sampling.parse_method('ddpm', 50) == ('ddpm', '', False, 50)
    assert bench_sampling.parse_method('ddim5', 50) == ('ddim', 'ddim5', False, 5)
    assert bench_sampling.parse_method('ddpm+coap', 50) == ('ddpm', '', True, 50)
    for bad in ('ddim', 'ddim0', 'ddim60', 'coap', 'ddpm+x'):
        with pytest.raises(SystemExit):
            bench_sampling.parse_method(bad, 50)


def test_guidance_overhead_pairs_guided_with_unguided_figure():
    results = {'ddpm/S=1': {'latency_s_per_image': 2.0}, 'ddpm+coap/S=1': {'latency_s_per_image': 3.5},
               'ddpm+coap/S=5': {'latency_s_per_image': 9.0}, 'encode_s_per_image': 0.3}
    bench_sampling.add_guidance_overhead(results)
    assert results['ddpm+coap/S=1']['guidance_overhead_s_per_image'] == pytest.approx(1.5)
    assert 'guidance_overhead_s_per_image' not in results['ddpm+coap/S=5']   # no unguided S=5 figure


def test_print_json_is_one_line_without_nan(capsys):
    common.print_json({'device': 'cpu', 'a': float('nan'), 'b': {'c': 1.234567891}, 'd': [float('inf'), 2]})
    out = capsys.readouterr().out
    assert out.count('\n') == 1
    assert json.loads(out) == {'device': 'cpu', 'a': None, 'b': {'c': 1.2346}, 'd': [None, 2]}


def test_peak_memory_report_names_its_source():
    memory = common.PeakMemory(torch.device('cpu'))
    memory.reset()
    block = bytearray(64 * 1024 * 1024)
    block[::4096] = b'\x01' * len(block[::4096])    # touch every page so it is resident
    report = memory.report()
    assert report['peak_memory_kind'].startswith('ru_maxrss')
    assert report['peak_memory_mib'] >= 64
    assert report['peak_memory_scope'] in ('since reset', 'since process start')
