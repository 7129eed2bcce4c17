"""Train stage 2 (EgoHMR pose diffusion) on EgoBody. Flags and defaults follow the original script (spec D§6.5).

The run folder ``<save_dir>/<run_id>`` receives ``preprocess_stats/preprocess_stats.npz`` (from the train split),
``best_model_vis.pt``, ``last_model.pt``, TensorBoard events, ``params.json`` and a copy of the model config.

Example (synthetic world, CPU, a few minutes):
    python train_egohmr.py --dataset_root demo/egobody --data_dir demo/data --load_pretrained_img_enc False \
        --batch_size 4 --num_workers 0 --max_iters 150 --val_step 50 --log_step 10 --eval_spacing 1 --seed 0
"""
from __future__ import annotations

import argparse
import sys

from egohmr.losses import DEFAULT_LOSS_WEIGHTS
from egohmr.trainer import weight_flag
from utils.io import DataError
from utils.run import str2bool


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--gpu_id', type=int, default=0)
    p.add_argument('--load_pretrained_img_enc', type=str2bool, default=True,
                   help='initialise the image encoder from the ProHMR checkpoint (backbone.* only)')
    p.add_argument('--checkpoint_img_enc', default='checkpoints/checkpoints_prohmr/checkpoint.pt',
                   help="ProHMR's checkpoint.pt")
    p.add_argument('--model_cfg', default='configs/prohmr.yaml')
    p.add_argument('--save_dir', default='runs_try_try', help='run folders are created here')
    p.add_argument('--dataset_root', default='/mnt/ssd/egobody_release')
    p.add_argument('--batch_size', type=int, default=16)
    p.add_argument('--num_workers', type=int, default=4)
    p.add_argument('--num_epoch', type=int, default=100000)
    p.add_argument('--log_step', type=int, default=1000)
    p.add_argument('--val_step', type=int, default=1000)
    p.add_argument('--save_step', type=int, default=2000)
    p.add_argument('--scene_cano', type=str2bool, default=True, help='encode the scene relative to the body')
    p.add_argument('--scene_type', default='cube', choices=['whole_scene', 'cube'])
    for term, weight in DEFAULT_LOSS_WEIGHTS.items():
        p.add_argument(f'--{weight_flag(term)}', type=float, default=weight)
    p.add_argument('--start_coap_epoch', type=int, default=3, help='first (0-based) epoch of the COAP loss')
    p.add_argument('--num_diffusion_timesteps', type=int, default=50)
    p.add_argument('--timestep_respacing_eval', default='ddim5', choices=['ddim5', 'ddpm'],
                   help='sampler used for validation')
    p.add_argument('--eval_spacing', type=int, default=20, help='keep every n-th val frame')
    p.add_argument('--cond_mask_prob', type=float, default=0.01, help='per-sample image-condition dropout')
    p.add_argument('--only_mask_img_cond', type=str2bool, default=True,
                   help='condition dropout zeroes only the image features (False: the whole condition)')
    p.add_argument('--pelvis_vis_loosen', type=str2bool, default=False,
                   help='hips/neck visibility from knees/neck keypoints (the test-time map)')
    p.add_argument('--with_focal_length', type=str2bool, default=True)
    p.add_argument('--with_cam_center', type=str2bool, default=True)
    p.add_argument('--with_bbox_info', type=str2bool, default=True)
    p.add_argument('--add_bbox_scale', type=float, default=1.2)
    p.add_argument('--do_augment', type=str2bool, default=True)
    p.add_argument('--shuffle', type=str2bool, default=True)
    # additions to the original flags
    p.add_argument('--data_dir', default='data', help='folder with smpl/smpl/SMPL_*.pkl and smpl_mean_params.npz')
    p.add_argument('--max_iters', type=int, default=None, help='stop after this many iterations (default: no limit)')
    p.add_argument('--seed', type=int, default=None, help='seed torch/numpy/augmentation (default: unseeded)')
    p.add_argument('--run_id', default=None, help='run folder name under --save_dir (default: random number)')
    p.add_argument('--coap_checkpoint', default=None,
                   help='COAP weights (.ckpt) for the penetration loss (the original downloads them)')
    p.add_argument('--scene_downsample_rate', type=int, default=1,
                   help='keep every k-th scene point (1 = all 20000, as the original; larger is faster on CPU)')
    p.add_argument('--val_at_start', type=str2bool, default=False,
                   help='also validate the untrained model (logged, never saved as best)')
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ('batch_size', 'log_step', 'val_step', 'save_step', 'num_epoch', 'eval_spacing',
                 'num_diffusion_timesteps', 'scene_downsample_rate'):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.batch_size < 2:
        print("error: --batch_size must be >= 2 (batch norm in the denoiser needs two samples)", file=sys.stderr)
        return 2
    if not 0.0 <= args.cond_mask_prob <= 1.0:
        print(f"error: --cond_mask_prob must lie in [0, 1], got {args.cond_mask_prob}", file=sys.stderr)
        return 2
    try:
        from configs import get_config
        from egohmr.trainer import train
        cfg = get_config(args.model_cfg)
        summary = train(args, cfg, cfg_path=args.model_cfg)
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"run folder: {summary['run_dir']}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
