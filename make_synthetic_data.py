"""Generate a synthetic EgoBody-format world (SMPL stand-ins, scenes, recordings, rendered PV images).

Example::

    python make_synthetic_data.py --out synthetic --num_recordings 6 --frames_per_recording 20 --seed 0

writes ``synthetic/data`` (SMPL files, mean parameters, MoCap poses: pass it where ``data/`` is expected) and
``synthetic/egobody`` (the ``--dataset_root`` / ``--data_root`` of the other scripts), prints a summary table and
saves it as ``synthetic/summary.json``.
"""
from __future__ import annotations

import argparse
import os
import sys

from utils.cli import add_bool_flag

os.environ.setdefault('PYOPENGL_PLATFORM', 'egl')


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(description=__doc__.split('\n')[0],
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--out', required=True, help='output folder (created; existing files are overwritten)')
    parser.add_argument('--num_recordings', type=int, default=6, help='recordings (>= 3: train/val/test non-empty)')
    parser.add_argument('--frames_per_recording', type=int, default=20, help='consecutive PV frames per recording')
    parser.add_argument('--seed', type=int, default=0, help='random seed (same seed -> same annotation)')
    parser.add_argument('--image_width', type=int, default=1920, help='PV image width in pixels')
    parser.add_argument('--image_height', type=int, default=1080, help='PV image height in pixels')
    parser.add_argument('--render_scale', type=float, default=0.5,
                        help='render at this fraction of the image size, then resize up (1 = full resolution)')
    add_bool_flag(parser, '--no_render', False, 'skip rendering the jpg images')
    args = parser.parse_args(argv)
    if args.num_recordings < 3:
        parser.error(f"--num_recordings must be >= 3 (one recording per split at least), got {args.num_recordings}")
    if args.frames_per_recording < 1:
        parser.error(f"--frames_per_recording must be >= 1, got {args.frames_per_recording}")
    if args.image_width < 64 or args.image_height < 64:
        parser.error(f"--image_width/--image_height must be >= 64, got {args.image_width}x{args.image_height}")
    if not 0.05 <= args.render_scale <= 1.0:
        parser.error(f"--render_scale must be in [0.05, 1], got {args.render_scale}")
    return args


def format_summary(summary: dict) -> str:
    """A small human-readable table of a :func:`make_world` summary."""
    rows = [('split', 'recordings', 'frames', 'joints outside image', 'seated')]
    for split, frames in summary['frames'].items():
        rows.append((split, str(len(summary['recordings'][split])), str(frames),
                     f"{100 * summary['share_frames_joints_outside_per_split'][split]:.0f}% of frames",
                     f"{100 * summary['share_frames_seated_per_split'][split]:.0f}%"))
    width = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    lines = ['  '.join(cell.ljust(w) for cell, w in zip(row, width)) for row in rows]
    lines.insert(1, '  '.join('-' * w for w in width))
    scenes = ', '.join(f"{name} ({count} verts)" for name, count in summary['scenes'].items())
    kinds = ', '.join(f"{kind}: {count}" for kind, count in summary['frames_per_pose_kind'].items())
    lines += ['',
              f"scenes: {scenes}",
              f"frames per pose kind: {kinds}",
              f"frames with >= 1 of the 24 SMPL joints outside the image: "
              f"{100 * summary['share_frames_joints_outside']:.0f}%",
              f"image size: {summary['image_size'][0]}x{summary['image_size'][1]}",
              f"dataset root: {summary['dataset_root']}",
              f"body model data dir: {summary['data_dir']}",
              f"elapsed: {summary['elapsed_s']:.1f} s"]
    return '\n'.join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    torch.set_num_threads(1)
    from synthetic.world import make_world
    from utils.io import atomic_json_dump

    try:
        summary = make_world(args.out, num_recordings=args.num_recordings,
                             frames_per_recording=args.frames_per_recording, seed=args.seed,
                             image_size=(args.image_width, args.image_height), render=not args.no_render,
                             render_scale=args.render_scale)
    except (ValueError, RuntimeError) as exc:
        print(f"make_synthetic_data.py: error: {exc}", file=sys.stderr)
        return 1
    atomic_json_dump(summary, os.path.join(args.out, 'summary.json'))
    print(format_summary(summary))
    return 0


if __name__ == '__main__':
    sys.exit(main())
