"""Collect the metrics JSON files of a pipeline run into one side-by-side table (markdown + JSON).

``python -m utils.demo_report --out outputs/demo/metrics --run "stage 1=path/metrics.json" --run "..."``
writes ``<out>.md`` and ``<out>.json`` and prints the table. Rows are the union of the metric names, in a fixed
preferred order first; a metric a run does not report shows as ``-``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from utils.io import atomic_json_dump, atomic_text_write
from utils.run import format_table

PREFERRED_ORDER = [
    'g_mpjpe', 'g_mpjpe_vis', 'g_mpjpe_invis', 'mpjpe', 'mpjpe_vis', 'mpjpe_invis', 'mpjpe_invis_min_of_n',
    'pa_mpjpe', 'pa_mpjpe_vis', 'pa_mpjpe_invis', 'g_v2v', 'v2v', 'v2v_vis', 'v2v_invis', 'pa_v2v',
    'collision_ratio', 'contact_ratio', 'std_joints', 'std_joints_vis', 'std_joints_invis',
    'apd_joints', 'apd_joints_vis', 'apd_joints_invis',
]


def canonical_name(name: str) -> str:
    """``'G-MPJPE'`` / ``'g_mpjpe'`` / ``'G MPJPE'`` -> ``'g_mpjpe'``, so both stages' names line up."""
    return name.strip().lower().replace('-', '_').replace(' ', '_')


def _flatten(metrics: dict, prefix: str = '') -> dict:
    flat = {}
    for key, value in metrics.items():
        name = canonical_name(f'{prefix}{key}')
        if isinstance(value, dict):
            flat.update(_flatten(value, name + '.'))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def build_table(runs: dict) -> tuple:
    """``runs``: name -> flat metric dict. Returns (markdown table, rows as a dict)."""
    names = list(runs)
    keys = [k for k in PREFERRED_ORDER if any(k in m for m in runs.values())]
    keys += sorted({k for m in runs.values() for k in m} - set(keys))

    def cell(value):
        if value is None:
            return '-'
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f'{value:.5f}' if abs(value) < 1 and value != 0 else f'{value:.2f}'

    rows = [[key] + [cell(runs[n].get(key)) for n in names] for key in keys]
    return format_table(rows, ['metric'] + names), {k: {n: runs[n].get(k) for n in names} for k in keys}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', required=True, help='output path without extension (.md and .json are written)')
    parser.add_argument('--run', action='append', default=[], metavar='NAME=JSON',
                        help='a run name and its metrics.json; repeat for each column')
    parser.add_argument('--title', default='EgoHMR pipeline metrics (mm unless stated; ratios in [0, 1])')
    args = parser.parse_args(argv)
    runs = {}
    for spec in args.run:
        name, sep, path = spec.partition('=')
        if not sep:
            parser.error(f"--run expects NAME=PATH, got {spec!r}")
        if not os.path.isfile(path):
            parser.error(f"--run {name}: no metrics file at '{path}'")
        with open(path) as f:
            runs[name] = _flatten(json.load(f))
    table, rows = build_table(runs)
    text = f'# {args.title}\n\n{table}\n'
    atomic_text_write(args.out + '.md', text)
    atomic_json_dump({'runs': list(runs), 'metrics': rows}, args.out + '.json')
    print(text)
    print(f'written {args.out}.md and {args.out}.json')
    return 0


if __name__ == '__main__':
    sys.exit(main())
