"""Train stage 1 (ProHMR-scene) on EgoBody. Flags and defaults follow the original script.

Example (synthetic world, CPU, a couple of minutes):
    python train_prohmr_scene.py --dataset_root demo/egobody --data_dir demo/data --load_pretrained False \
        --batch_size 4 --num_workers 0 --max_iters 150 --val_step 50 --log_step 10 --seed 0 --val_at_start True
"""
from __future__ import annotations

import argparse
import sys

from utils.cli import (add_data_flags, add_scene_and_camera_flags, add_training_flags, new_parser,
                       positive_flags_error, run_training)
from utils.run import str2bool


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    add_data_flags(p, needs_mocap=True)
    add_scene_and_camera_flags(p, scene_cano=False, scene_type='whole_scene')
    add_training_flags(p, save_dir='runs_try', val_step=2000)
    p.add_argument('--load_pretrained', type=str2bool, default=True,
                   help='initialise the image backbone from ProHMR (--checkpoint)')
    p.add_argument('--load_only_backbone', type=str2bool, default=True,
                   help='load only backbone.* from --checkpoint (False: every entry of matching name and shape)')
    p.add_argument('--checkpoint', default='checkpoints/checkpoints_prohmr/checkpoint.pt',
                   help="ProHMR's checkpoint.pt (a PyTorch Lightning file)")
    p.add_argument('--with_full_2d_loss', type=str2bool, default=True,
                   help='2D keypoint loss on the full image (True) instead of the crop')
    p.add_argument('--with_global_3d_loss', type=str2bool, default=True, help='loss on the global 3D joints')
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    error = positive_flags_error(args, ('batch_size', 'log_step', 'val_step', 'save_step', 'num_epoch', 'max_iters',
                                        'scene_downsample_rate'))
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.batch_size < 2:
        print("error: --batch_size must be >= 2 (batch norm in the flow needs two samples)", file=sys.stderr)
        return 2
    from prohmr_scene.trainer import train
    return run_training(args, train)


if __name__ == '__main__':
    sys.exit(main())
