"""The static results page of a demo run: ``python -m utils.demo_page --demo outputs/demo``.

Writes ``<demo>/index.html`` (no server, no script: open it from disk) with the metrics table of
``utils.demo_report`` (``<demo>/metrics.json``), the per-joint error plots of the test runs, the training curves,
the renders and a link to the viewer recording, each with one line on what it shows. Every link is relative, so
the folder can be copied or zipped as a whole.
"""
from __future__ import annotations

import argparse
import glob
import html
import json
import math
import os
import sys

from utils.io import atomic_text_write

INVISIBLE_KEYS = ('mpjpe_invis', 'mpjpe_invis_min_of_n', 'g_mpjpe_invis', 'v2v_invis', 'std_joints_invis',
                  'apd_joints_invis')


def _rel(path: str, demo: str) -> str:
    return html.escape(os.path.relpath(path, demo).replace(os.sep, '/'), quote=True)


def _metrics_table(metrics_json: str) -> str:
    with open(metrics_json) as f:
        data = json.load(f)
    runs, rows = data['runs'], data['metrics']

    def cell(value):
        if value is None:
            return '-'
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
            return str(value)
        return f'{value:.5f}' if abs(value) < 1 and value != 0 else f'{value:.2f}'
    head = ''.join(f'<th>{html.escape(r)}</th>' for r in runs)
    body = []
    for key, values in rows.items():
        mark = ' class="invis"' if key in INVISIBLE_KEYS else ''
        body.append(f'<tr{mark}><td>{html.escape(key)}</td>' +
                    ''.join(f'<td>{cell(values.get(r))}</td>' for r in runs) + '</tr>')
    return f'<table><tr><th>metric</th>{head}</tr>{"".join(body)}</table>'


def _figure(path: str, demo: str, caption: str, width: str = '100%') -> str:
    src = _rel(path, demo)
    return (f'<figure><a href="{src}"><img src="{src}" style="max-width:{width}"></a>'
            f'<figcaption><code>{src}</code>: {html.escape(caption)}</figcaption></figure>')


def build_page(demo: str) -> str:
    parts = ['<!doctype html><html><head><meta charset="utf-8"><title>EgoHMR demo results</title><style>',
             'body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}',
             'table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #bbb;padding:3px 8px;'
             'text-align:right}td:first-child{text-align:left}tr.invis{background:#fde8e8}',
             'figure{margin:1.5em 0}figcaption{font-size:13px;color:#444}</style></head><body>',
             '<h1>EgoHMR demo results</h1>',
             '<p>Synthetic EgoBody-format world; every number and picture below was produced by <code>make demo'
             '</code> in this folder. Distances in mm, ratios in [0, 1].</p>']
    metrics_json = os.path.join(demo, 'metrics.json')
    if os.path.isfile(metrics_json):
        parts += ['<h2>Metrics</h2>', '<p>One column per test run. Red rows are the joints outside the image '
                  '(<code>*_invis</code>; <code>mpjpe_invis_min_of_n</code>: the best of the samples per frame): '
                  'what the sampling is for.</p>', _metrics_table(metrics_json)]
    sections = [  # (heading, files, caption of each figure, figure width)
        ('Per-joint error and sample spread', os.path.join('results', '**', 'per_joint_errors.png'),
         'per SMPL joint, the error of the samples where the joint is visible (blue) or outside the image (red; '
         'black tick: best sample), and below how far the samples spread: wide red bars = the model is unsure where '
         'the unseen limbs are.', '100%'),
        ('Training curves', os.path.join('runs_*', '*', 'curves.png'),
         'training losses (left) and validation losses (right) over iterations, log scale; thick black: the '
         'optimised total.', '100%'),
        ('Renders', os.path.join('render', '*', '*.jpg'),
         'one row per sample: input image with the crop box | the sample over the image | the sample in the 3D '
         'scene; frames with joints outside the image are chosen, so rows differ where the camera sees nothing.',
         '900px'),
    ]
    for heading, pattern, caption, width in sections:
        paths = sorted(glob.glob(os.path.join(demo, pattern), recursive=True))
        if paths:
            parts.append(f'<h2>{heading}</h2>')
            parts += [_figure(path, demo, caption, width) for path in paths]
    recording = os.path.join(demo, 'viewer_recording.html')
    if os.path.isfile(recording):
        parts += ['<h2>3D viewer</h2>', f'<p><a href="{_rel(recording, demo)}">viewer_recording.html</a>: a '
                  'self-contained 3D playback (drag to orbit) of the test frames with joints outside the image: '
                  'scene, GT body (green), every sample in its own colour, unseen joints as dots, the egocentric '
                  'camera with its image. For the live viewer run <code>python visualize_results.py --results '
                  '&lt;predictions.npz&gt; --dataset_root &lt;egobody&gt;</code>.</p>']
    parts.append('</body></html>')
    return '\n'.join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--demo', required=True, help='the demo output folder (demo.sh OUT)')
    args = parser.parse_args(argv)
    if not os.path.isdir(args.demo):
        print(f"error: --demo: no folder '{args.demo}'", file=sys.stderr)
        return 2
    path = os.path.join(args.demo, 'index.html')
    atomic_text_write(path, build_page(args.demo))
    print(f"results page written to {path}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
