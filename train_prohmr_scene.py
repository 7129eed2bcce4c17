"""Train stage 1 (ProHMR-scene) on EgoBody. Flags and defaults follow the original script (spec D§6.4).

Example (synthetic world, CPU, a couple of minutes):
    python train_prohmr_scene.py --dataset_root demo/egobody --data_dir demo/data --load_pretrained False \
        --batch_size 4 --num_workers 0 --max_iters 150 --val_step 50 --log_step 10 --seed 0 --val_at_start True
"""
from __future__ import annotations

import argparse
import os
import sys

from utils.io import DataError
from utils.run import str2bool


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--gpu_id', type=int, default=0)
    p.add_argument('--load_pretrained', type=str2bool, default=True,
                   help='initialise the image backbone from ProHMR (--checkpoint)')
    p.add_argument('--load_only_backbone', type=str2bool, default=True,
                   help='load only backbone.* from --checkpoint (False: every entry of matching name and shape)')
    p.add_argument('--checkpoint', default='checkpoints/checkpoints_prohmr/checkpoint.pt',
                   help="ProHMR's checkpoint.pt (a PyTorch Lightning file)")
    p.add_argument('--model_cfg', default='configs/prohmr.yaml')
    p.add_argument('--save_dir', default='runs_try', help='run folders are created here')
    p.add_argument('--dataset_root', default='/mnt/ssd/egobody_release')
    p.add_argument('--batch_size', type=int, default=16)
    p.add_argument('--num_workers', type=int, default=4)
    p.add_argument('--num_epoch', type=int, default=100000)
    p.add_argument('--log_step', type=int, default=1000)
    p.add_argument('--val_step', type=int, default=2000)
    p.add_argument('--save_step', type=int, default=2000)
    p.add_argument('--scene_cano', type=str2bool, default=False)
    p.add_argument('--scene_type', default='whole_scene', choices=['whole_scene', 'cube'])
    p.add_argument('--with_focal_length', type=str2bool, default=True)
    p.add_argument('--with_cam_center', type=str2bool, default=True)
    p.add_argument('--with_bbox_info', type=str2bool, default=True)
    p.add_argument('--with_full_2d_loss', type=str2bool, default=True)
    p.add_argument('--with_global_3d_loss', type=str2bool, default=True)
    p.add_argument('--add_bbox_scale', type=float, default=1.2)
    p.add_argument('--do_augment', type=str2bool, default=True)
    p.add_argument('--shuffle', type=str2bool, default=True)
    # additions to the original flags
    p.add_argument('--data_dir', default='data',
                   help='folder with smpl/smpl/SMPL_*.pkl, smpl_mean_params.npz and datasets/cmu_mocap.npz')
    p.add_argument('--max_iters', type=int, default=None, help='stop after this many iterations (default: no limit)')
    p.add_argument('--seed', type=int, default=None, help='seed torch/numpy/augmentation (default: unseeded)')
    p.add_argument('--run_id', default=None, help='run folder name under --save_dir (default: random number)')
    p.add_argument('--scene_downsample_rate', type=int, default=1,
                   help='keep every k-th scene point (1 = all 20000, as the original; larger = faster on a CPU)')
    p.add_argument('--val_at_start', type=str2bool, default=False,
                   help='also validate before the first step (after the ActNorm data initialisation)')
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ('batch_size', 'log_step', 'val_step', 'save_step', 'num_epoch'):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.batch_size < 2:
        print("error: --batch_size must be >= 2 (batch norm in the flow needs two samples)", file=sys.stderr)
        return 2
    try:
        from configs import PROHMR_YAML, get_config
        from prohmr_scene.trainer import train
        if args.model_cfg == 'configs/prohmr.yaml' and not os.path.isfile(args.model_cfg):
            args.model_cfg = PROHMR_YAML          # the default, run from another working directory
        cfg = get_config(args.model_cfg)
        summary = train(args, cfg, cfg_path=args.model_cfg)
    except (DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"run folder: {summary['run_dir']}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
