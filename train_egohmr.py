"""Train stage 2 (EgoHMR pose diffusion) on EgoBody. Flags and defaults follow the original script.

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
from utils.cli import (add_data_flags, add_scene_and_camera_flags, add_training_flags, new_parser,
                       positive_flags_error, run_training)
from utils.run import str2bool
from utils.tensors import PRECISIONS


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    add_data_flags(p)
    add_scene_and_camera_flags(p, scene_cano=True, scene_type='cube')
    add_training_flags(p, save_dir='runs_try_try', val_step=1000)
    p.add_argument('--load_pretrained_img_enc', type=str2bool, default=True,
                   help='initialise the image encoder from the ProHMR checkpoint (backbone.* only)')
    p.add_argument('--checkpoint_img_enc', default='checkpoints/checkpoints_prohmr/checkpoint.pt',
                   help="ProHMR's checkpoint.pt")
    for term, weight in DEFAULT_LOSS_WEIGHTS.items():
        p.add_argument(f'--{weight_flag(term)}', type=float, default=weight, help=f'weight of the {term} loss')
    p.add_argument('--precision', default='fp32', choices=PRECISIONS,
                   help="training forward precision: 'bf16' runs the encoders and the GCN under bfloat16 autocast "
                        "(decode, losses and optimiser stay fp32; see benchmarks/bench_speed.py for speed and effect)")
    p.add_argument('--start_coap_epoch', type=int, default=3, help='first (0-based) epoch of the COAP loss')
    p.add_argument('--coap_checkpoint', default=None,
                   help='COAP weights (.ckpt) for the penetration loss (the original downloads them)')
    p.add_argument('--num_diffusion_timesteps', type=int, default=50, help='diffusion steps T')
    p.add_argument('--timestep_respacing_eval', default='ddim5', choices=['ddim5', 'ddpm'],
                   help='sampler used for validation')
    p.add_argument('--eval_spacing', type=int, default=20, help='keep every n-th val frame')
    p.add_argument('--cond_mask_prob', type=float, default=0.01, help='per-sample image-condition dropout')
    p.add_argument('--only_mask_img_cond', type=str2bool, default=True,
                   help='condition dropout zeroes only the image features (False: the whole condition)')
    p.add_argument('--pelvis_vis_loosen', type=str2bool, default=False,
                   help='hips/neck visibility from knees/neck keypoints (the test-time map)')
    return p


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    from configs import egohmr_config
    from utils.run_state import explicit_flags
    try:   # configs/egohmr.yaml (+ --model_cfg), overridden by the flags given on the command line
        cfg = egohmr_config(args.model_cfg, args, explicit_flags(parser, argv))
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    error = positive_flags_error(args, ('batch_size', 'log_step', 'val_step', 'save_step', 'num_epoch', 'max_iters',
                                        'eval_spacing', 'num_diffusion_timesteps', 'scene_downsample_rate'))
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.batch_size < 2:
        print("error: --batch_size must be >= 2 (batch norm in the denoiser needs two samples)", file=sys.stderr)
        return 2
    if not 0.0 <= args.cond_mask_prob <= 1.0:
        print(f"error: --cond_mask_prob must lie in [0, 1], got {args.cond_mask_prob}", file=sys.stderr)
        return 2
    from egohmr.trainer import train
    return run_training(args, train, errors=(ValueError,), load_config=lambda _: cfg)


if __name__ == '__main__':
    sys.exit(main())
