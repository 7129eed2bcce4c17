"""Train COAP occupancy weights for an SMPL-format body model (the real SMPL files or the synthetic stand-in).

    python train_coap.py --data_dir DATA --gender neutral --out coap_smpl_neutral.ckpt

Bodies are posed with the MoCap poses (``<data_dir>/datasets/cmu_mocap.npz``) and random shapes; labels are exact
inside/outside tests of the posed mesh (generalised winding number). The held-out occupancy IoU (points uniform in
each held-out body's bounding box grown by 5 cm) is printed on the last line as ``IoU 0.93`` and the weights are
saved in the official ``coap_smpl_<gender>.ckpt`` layout, loadable with
``egohmr.coap.attach_coap(smpl, checkpoint=...)``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from tqdm import tqdm

from egohmr.coap.checkpoint import save_coap_checkpoint
from egohmr.coap.training import TrainSettings, load_mocap, train_coap
from utils.body_model import SMPL_GENDERS, create_smpl
from utils.checks import finite_float_flags_error, output_file_error
from utils.cli import add_bool_flag, add_device_flags
from utils.io import DataError
from utils.run import get_device


def parse_args(argv=None) -> argparse.Namespace:
    defaults = TrainSettings()
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data_dir', required=True, help='folder with smpl/smpl/SMPL_<GENDER>.pkl and datasets/')
    p.add_argument('--gender', default='neutral', choices=SMPL_GENDERS)
    p.add_argument('--out', required=True, help='checkpoint to write (.ckpt)')
    p.add_argument('--mocap', default=None, help='pose file (default: <data_dir>/datasets/cmu_mocap.npz)')
    p.add_argument('--iters', type=int, default=defaults.iters, help='optimisation steps')
    p.add_argument('--batch_size', type=int, default=defaults.batch_size,
                   help='(query point, body part) pairs per step')
    p.add_argument('--lr', type=float, default=defaults.lr, help='Adam learning rate (cosine-decayed)')
    p.add_argument('--pool_bodies', type=int, default=defaults.pool_bodies,
                   help='posed training bodies prepared (encoded and labelled) before training')
    p.add_argument('--bf16', default='auto', choices=('auto', 'on', 'off'),
                   help='train under bfloat16 autocast (auto: on CPUs with native bf16 kernels)')
    add_bool_flag(p, '--half_precision', False, 'store the weights as float16 (half the size)')
    p.add_argument('--eval_bodies', type=int, default=defaults.eval_bodies, help='held-out bodies for the IoU')
    p.add_argument('--seed', type=int, default=defaults.seed)
    add_device_flags(p)
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: torch default)')
    args = p.parse_args(argv)
    error = next((f"--{name} must be >= 1, got {getattr(args, name)}"
                  for name in ('iters', 'batch_size', 'pool_bodies', 'eval_bodies') if getattr(args, name) < 1), '')
    error = error or finite_float_flags_error(args) or ('' if args.lr > 0 else f"--lr must be > 0, got {args.lr}")
    error = error or output_file_error(args.out, '--out')
    if error:  # one line, before any data is read or any training is done
        print(f"train_coap.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    mocap = args.mocap or os.path.join(args.data_dir, 'datasets', 'cmu_mocap.npz')
    try:
        device = get_device(args.gpu_id, args.device)
        body_model = create_smpl(args.data_dir, args.gender)
        pose = load_mocap(mocap)
    except (DataError, ValueError) as exc:
        print(f"train_coap.py: {exc}", file=sys.stderr)
        return 2
    settings = TrainSettings(iters=args.iters, batch_size=args.batch_size, lr=args.lr,
                             pool_bodies=args.pool_bodies, eval_bodies=args.eval_bodies, seed=args.seed,
                             bf16={'auto': None, 'on': True, 'off': False}[args.bf16])
    bar = tqdm(total=settings.iters, desc='train COAP', dynamic_ncols=True, mininterval=2.0)

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f'{loss:.4f}', refresh=False)

    coap, metrics = train_coap(body_model, pose, settings, progress=progress, device=device, log=bar.write)
    bar.close()
    save_coap_checkpoint(coap, args.out, epoch=0, global_step=settings.iters,
                         hyper_parameters=dict(vars(args), mocap=mocap, **metrics['settings']),
                         metrics={k: v for k, v in metrics.items() if k != 'settings'},
                         half_precision=args.half_precision)
    print(f"held-out near-surface IoU {metrics['iou_surface']:.3f} ({settings.eval_bodies} bodies, "
          f"{metrics['seconds']:.0f} s in all); weights saved to {args.out}")
    print(f"IoU {metrics['iou']:.2f}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
