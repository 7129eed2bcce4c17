"""Training iterations per second of stage 1 (ProHMR-scene) and stage 2 (EgoHMR) at batch 16.

One iteration is one call of the real step function: ``prohmr_scene.trainer.train_step`` (generator forward with
``NUM_TRAIN_SAMPLES`` flow samples, losses, AdamW step, discriminator step against a MoCap batch) and
``egohmr.trainer.train_step`` (draw t, noise the GT pose, one denoiser forward, SMPL-space losses, AdamW step).
Models come from the trainers' own ``build_model`` with the training scripts' default flags (no pretrained weights);
batches are real frames of the bench world (train split; repeated to fill the batch) with ``--scene_points`` points.
Data loading is not included (the batch is built once).

Stage 2 runs at epoch 0 by default, before the COAP penetration loss starts (``--start_coap_epoch 3``);
``--stage2_epoch 3`` times the iterations with that loss (random COAP weights).

    python benchmarks/bench_training.py [--stages 1 2] [--batch_size 16] [--scene_points 20000] [--quick]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from make_bench_world import (egobody_dataset, frame_batch, mocap_batch,  # noqa: E402
                              start_benchmark, with_scene_points)


def build_parser():
    parser = common.base_parser(__doc__.splitlines()[0], cpu_calls=(1, 0), cuda_calls=(5, 2))
    parser.add_argument('--stages', nargs='+', type=int, choices=[1, 2], default=[1, 2], help='stages to time')
    parser.add_argument('--batch_size', type=common.positive_int, default=16)
    parser.add_argument('--scene_points', type=common.positive_int, default=20000, help='scene points per frame')
    parser.add_argument('--stage2_epoch', type=common.non_negative_int, default=0,
                        help='epoch passed to the stage-2 step (>= 3 adds the COAP penetration loss)')
    return parser


def script_args(parser, world):
    """The training script's flags with their defaults (no pretrained weights), as its ``main`` would see them."""
    return parser.parse_args(['--dataset_root', world.dataset_root, '--data_dir', world.data_dir])


def stage1_step(world, cfg, args, device):
    """(a no-argument callable running one stage-1 iteration, its description)."""
    import train_prohmr_scene
    from prohmr_scene import trainer

    flags = script_args(train_prohmr_scene.build_parser(), world)
    flags.load_pretrained = False
    dataset = egobody_dataset(world, cfg, flags.scene_type, split='train')
    batch = with_scene_points(frame_batch(dataset, args.batch_size, device), args.scene_points)
    mocap = mocap_batch(world.data_dir, args.batch_size, device)
    model = trainer.build_model(flags, cfg, device)
    optimizer, optimizer_disc = trainer.make_optimizers(model, cfg)

    def step():
        trainer.train_step(model, batch, mocap, optimizer, optimizer_disc)

    return step, {'flow_samples': int(cfg.TRAIN.NUM_TRAIN_SAMPLES), 'scene_type': flags.scene_type}


def stage2_step(world, cfg, args, device):
    """(a no-argument callable running one stage-2 iteration, its description)."""
    import train_egohmr
    from diffusion import UniformSampler, create_gaussian_diffusion
    from egohmr import trainer
    from utils.optim import adamw

    from configs import egohmr_config

    flags = script_args(train_egohmr.build_parser(), world)
    flags.load_pretrained_img_enc = False
    cfg = egohmr_config(args=flags)   # stage 2 reads cfg.EGOHMR (the shared config is stage 1's prohmr.yaml)
    dataset = egobody_dataset(world, cfg, flags.scene_type, split='train', stats=True)
    batch = with_scene_points(frame_batch(dataset, args.batch_size, device), args.scene_points)
    model = trainer.build_model(flags, cfg, dataset.Xmean, dataset.Xstd, device)
    # the optimiser egohmr.trainer.train builds
    optimizer = adamw(model.trainable_parameters(), lr=float(cfg.TRAIN.LR), weight_decay=float(cfg.TRAIN.WEIGHT_DECAY))
    diffusion = create_gaussian_diffusion(flags.num_diffusion_timesteps, '')
    sampler = UniformSampler(diffusion)
    coap_loss = model.coap is not None and model.loss_weights['coap_penetration'] > 0 \
        and args.stage2_epoch >= model.start_coap_epoch

    def step():
        trainer.train_step(model, diffusion, sampler, dict(batch), optimizer, args.stage2_epoch,
                           getattr(args, 'train_precision', 'fp32'))

    return step, {'epoch': args.stage2_epoch, 'coap_penetration_loss': bool(coap_loss),
                  'scene_type': flags.scene_type}


STAGES = {1: ('stage1_prohmr_scene', stage1_step), 2: ('stage2_egohmr', stage2_step)}


def run(args) -> dict:
    device, world, cfg, result = start_benchmark(args, 'training', batch_size=args.batch_size,
                                                 scene_points=args.scene_points, data_loading_included=False)
    memory = common.PeakMemory(device)
    for stage in args.stages:
        name, make_step = STAGES[stage]
        memory.reset()
        step, info = make_step(world, cfg, args, device)
        common.log(f"{name}: {args.repeats} timed iteration(s) (+{args.warmup} warm-up) at batch {args.batch_size}")
        timing = common.time_call(step, device, args.repeats, args.warmup)
        result[name] = {'it_per_s': common.rate(timing), 'samples_per_s': common.rate(timing, args.batch_size),
                        's_per_it': timing['mean_s'], 'min_s_per_it': timing['min_s'], 'repeats': timing['repeats'],
                        'warmup': timing['warmup'], **info, **memory.report()}
        del step
    return result


def main(argv=None) -> int:
    return common.bench_main(build_parser, run, argv)


if __name__ == '__main__':
    sys.exit(main())
