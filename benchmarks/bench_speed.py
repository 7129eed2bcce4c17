"""Issue 17's figures in one run: the paper's sampling setting, ddim5, a guided step, training steps and the stage-1
eval forward, beside a matmul floor measured in the same run.

* ``matmul_floor``: ``torch.matmul`` at the denoiser's own shapes (``[2 S F x 24, 1024] @ [1024, 1024]``, the
  hidden graph-conv projections with diffuse_fuse), fp32 and bf16, in GFLOP/s. The sampling floor of an image is the
  GCN's FLOPs over the chain (counted from the layer shapes) at the fp32 rate; ``achieved_over_peak`` divides the
  floor by the measured latency.
* ``paper_setting``: :func:`egohmr.evaluate.sample_poses` with ddpm-50, COAP guidance (w = 2) on the steps t <= 10,
  diffuse_fuse, ``--num_samples`` samples and the collision ratio; ``reference`` runs the same call on the dense
  formulation it replaced (COAP encodes all 16 parts of every body, every step decodes SMPL, autograd runs through
  the whole point encoders), so ``speedup_over_reference`` is a same-run ratio.
* ``guided_step``: one guidance gradient of ``S x F`` bodies posed with the frames' GT pose (+ small noise), lowered
  ``--lower_m`` into the scene (thousands of scene points in each body box, as with a trained model), sparse versus
  dense, with the COAP weights of ``--coap_weights``; with bf16 also under autocast (COAP's networks in bf16), its
  cosine and largest difference against the fp32 gradient, beside the cosine of two fp32 gradients whose COAP
  surface samples come from different seeds (the method's own variability).
* ``ddim5``: the same call with DDIM-5 and no guidance.
* ``training_step``: one ``egohmr.trainer.train_step`` at ``--train_batch`` with the COAP penetration loss off
  (epoch 0) and on (epoch 3), in every ``--precision``, after at least one warm-up step (the first step also
  allocates the optimiser's state); in fp32 also on the dense formulation (``reference_s_per_it``,
  ``speedup_over_reference``: the scene PointNet's backward through all its points, COAP's dense loss).
* ``stage1_eval_forward``: ``ProHMRScene.forward_step`` (eval, the config's test sample count) at ``--stage1_batch``.

With ``--precision fp32 bf16`` the sampling figures also run under autocast (``sample_poses(precision='bf16')``)
and report the change of the joints and of the collision ratio against fp32 on the same seed.

    python benchmarks/bench_speed.py [--frames 1] [--num_samples 5] [--skip training stage1] [--precision fp32 bf16]
"""
from __future__ import annotations

import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from make_bench_world import egobody_dataset, frame_batch, start_benchmark, with_scene_points  # noqa: E402

import torch  # noqa: E402

from utils.tensors import PRECISIONS  # noqa: E402

GUIDANCE_WEIGHT = 2.0
HIDDEN = 1024
COAP_WEIGHTS = os.path.join(common.ROOT, 'tests', 'assets', 'coap_synthetic_neutral.ckpt')
SECTIONS = ('paper', 'guided_step', 'ddim5', 'training', 'stage1')


def build_parser():
    parser = common.base_parser(__doc__.splitlines()[0], cpu_calls=(1, 0), cuda_calls=(3, 1))
    parser.add_argument('--frames', type=common.positive_int, default=1, help='images per sampling call')
    parser.add_argument('--num_samples', type=common.positive_int, default=5)
    parser.add_argument('--scene_points', type=common.positive_int, default=20000)
    parser.add_argument('--coap_weights', default=COAP_WEIGHTS, help="COAP checkpoint ('' for random weights)")
    parser.add_argument('--lower_m', type=float, default=0.3, help='guided_step: bodies lowered by this much')
    parser.add_argument('--train_batch', type=common.positive_int, default=4)
    parser.add_argument('--stage1_batch', type=common.positive_int, default=2)
    parser.add_argument('--skip', nargs='*', default=[], choices=SECTIONS + ('reference',),
                        help="sections to leave out ('reference': the dense runs)")
    parser.add_argument('--precision', nargs='+', default=['fp32'], choices=PRECISIONS,
                        help='sampling precisions to time (bf16: CPU/CUDA autocast)')
    return parser


@contextlib.contextmanager
def dense_reference():
    """The formulation before issue 17: COAP's dense part encoding and SMPL decoding in every denoising step, and
    autograd through the whole point encoders (no backward on the points at a maximum only)."""
    from backbones.pointnet import ResnetPointnet
    from egohmr import collision, evaluate
    saved = collision._uses_sparse_path, evaluate.POSE_ONLY_KEY, ResnetPointnet._pooled_features_max_rows
    collision._uses_sparse_path = lambda occupancy_model, body: False
    evaluate.POSE_ONLY_KEY = '_decode_every_step'
    ResnetPointnet._pooled_features_max_rows = ResnetPointnet._pooled_features
    try:
        yield
    finally:
        collision._uses_sparse_path, evaluate.POSE_ONLY_KEY, ResnetPointnet._pooled_features_max_rows = saved


def gcn_flops_per_row(model) -> float:
    """Multiply-adds x 2 of one denoiser pass for one row (24 joints): projections and graph mixing."""
    flops = 0.0
    for module in model.diffusion_model.modules():
        if module.__class__.__name__ == 'ModulatedGraphConv':
            flops += 2 * 24 * module.in_features * module.out_features * 2      # self + neighbour projections
            flops += 2 * 24 * 24 * module.out_features * 2                      # the two adjacency products
    return flops


def matmul_floor(rows: int, device, repeats: int) -> dict:
    """GFLOP/s of ``torch.matmul`` at the hidden graph-conv shape ``[rows x 24, 1024] @ [1024, 1024]``."""
    result = {'shape': [rows * 24, HIDDEN, HIDDEN]}
    for name, dtype in (('fp32', torch.float32), ('bf16', torch.bfloat16)):
        a = torch.randn(rows * 24, HIDDEN, device=device).to(dtype)
        b = torch.randn(HIDDEN, HIDDEN, device=device).to(dtype)
        calls = 20

        def run():
            for _ in range(calls):
                torch.matmul(a, b)
        timing = common.time_call(run, device, max(3, repeats), 1)
        result[f'{name}_gflop_per_s'] = 2.0 * rows * 24 * HIDDEN * HIDDEN * calls / timing['min_s'] / 1e9
    return result


def sampling_model(world, cfg, stats_set, device, coap_weights):
    from bench_sampling import build_model
    from egohmr.coap import load_coap_checkpoint
    model = build_model(world, cfg, stats_set, True, device)
    if coap_weights:
        load_coap_checkpoint(model.coap, coap_weights)
    return model


def time_sampling(model, batch, args, device, method, guided, precision, reference=False):
    from diffusion import create_gaussian_diffusion
    from egohmr.evaluate import sample_poses
    from egohmr.guidance import CollisionGuidance

    diffusion = create_gaussian_diffusion(50, '' if method == 'ddpm' else method)
    guidance = CollisionGuidance(model, model.coap, GUIDANCE_WEIGHT) if guided else None
    out = {}

    def run():
        torch.manual_seed(args.seed)
        with dense_reference() if reference else contextlib.nullcontext():
            out['samples'] = sample_poses(model, diffusion, batch, args.num_samples,
                                          'ddpm' if method == 'ddpm' else 'ddim', guidance=guidance,
                                          occupancy_model=model.coap if guided else None, precision=precision)
    timing = common.time_call(run, device, args.repeats, args.warmup)
    return timing['mean_s'] / batch['fx'].shape[0], out['samples']


def sampling_figures(world, cfg, args, device) -> dict:
    import numpy as np
    stats_set = egobody_dataset(world, cfg, 'cube', split='train', stats=True)
    frames_set = egobody_dataset(world, cfg, 'cube', split='test')
    batch = with_scene_points(frame_batch(frames_set, args.frames, device), args.scene_points)
    model = sampling_model(world, cfg, stats_set, device, args.coap_weights)
    rows = args.num_samples * args.frames
    floor = matmul_floor(2 * rows, device, args.repeats)
    chain_flops = gcn_flops_per_row(model) * 2 * args.num_samples * 50        # diffuse_fuse: two passes
    floor_s = chain_flops / (floor['fp32_gflop_per_s'] * 1e9)
    results = {'matmul_floor': {**floor, 'gcn_gflop_per_image_ddpm50': chain_flops / 1e9,
                                'floor_s_per_image_ddpm50_fp32': floor_s}}
    common.log('priming: one DDIM-5 chain')
    time_sampling(model, batch, args, device, 'ddim5', False, 'fp32')
    base = {}
    for precision in args.precision:
        if 'paper' not in args.skip:
            common.log(f'paper setting ({precision})')
            latency, samples = time_sampling(model, batch, args, device, 'ddpm', True, precision)
            figure = {'latency_s_per_image': latency, 'floor_s_per_image': floor_s,
                      'achieved_over_peak': floor_s / latency,
                      'mean_collision_ratio': float(np.mean(samples['collision_ratio']))}
            if precision == 'fp32':
                base['paper'] = samples
                if 'reference' not in args.skip:
                    common.log('paper setting, dense reference')
                    ref_latency, ref = time_sampling(model, batch, args, device, 'ddpm', True, precision, True)
                    figure.update(reference_latency_s_per_image=ref_latency,
                                  speedup_over_reference=ref_latency / latency,
                                  max_joint_diff_vs_reference_mm=1000 * float(
                                      (ref['joints'] - samples['joints']).abs().max()))
            elif 'paper' in base:
                figure.update(speedup_over_fp32=results['paper_setting/fp32']['latency_s_per_image'] / latency,
                              **precision_change(base['paper'], samples))
            results[f'paper_setting/{precision}'] = figure
        if 'ddim5' not in args.skip:
            common.log(f'ddim5 ({precision})')
            latency, samples = time_sampling(model, batch, args, device, 'ddim5', False, precision)
            figure = {'latency_s_per_image': latency}
            if precision == 'fp32':
                base['ddim5'] = samples
            elif 'ddim5' in base:
                figure.update(speedup_over_fp32=results['ddim5/fp32']['latency_s_per_image'] / latency,
                              **precision_change(base['ddim5'], samples))
            results[f'ddim5/{precision}'] = figure
    if 'guided_step' not in args.skip:
        results['guided_step'] = guided_step(model, batch, args, device)
    return results


def precision_change(fp32, other) -> dict:
    """Change of the sampled joints (mm, pelvis-relative MPJPE between the two runs) and of the collision ratio."""
    joints = lambda s: s['joints'][:, :, :24] - s['joints'][:, :, :1]   # noqa: E731
    change = {'mpjpe_change_mm': 1000 * float((joints(fp32) - joints(other)).norm(dim=-1).mean())}
    if 'collision_ratio' in fp32:
        change['collision_ratio_change'] = float(abs(fp32['collision_ratio'] - other['collision_ratio']).mean())
    return change


def guided_step(model, batch, args, device) -> dict:
    """One guidance gradient of S x F GT-posed bodies lowered into the scene: sparse versus dense."""
    from egohmr.evaluate import sampling_batch
    from egohmr.guidance import CollisionGuidance

    lowered = dict(batch, smpl_params=dict(batch['smpl_params']))
    lowered['smpl_params']['transl'] = batch['smpl_params']['transl'] + torch.tensor([0.0, args.lower_m, 0.0],
                                                                                     device=device)
    guidance = CollisionGuidance(model, model.coap, GUIDANCE_WEIGHT)
    with torch.no_grad():
        chain = sampling_batch(lowered, model.sampling_condition(lowered), args.num_samples)
        rows = args.num_samples * args.frames
        g = torch.Generator().manual_seed(args.seed)
        x = model.x_start_from_smpl_params(batch['smpl_params']).repeat(args.num_samples, 1)
        x = x + 0.05 * torch.randn(rows, 144, generator=g).to(device)
        out = model.denoise(x, torch.full((rows,), 5, device=device), chain)
    grads = {}
    figure = {'rows': rows}
    for name in ('sparse', 'reference'):
        if name == 'reference' and 'reference' in args.skip:
            continue

        def run():
            with dense_reference() if name == 'reference' else contextlib.nullcontext():
                grads[name] = guidance.gradient(x, out, chain)
        figure[f'{name}_s'] = common.time_call(run, device, args.repeats, args.warmup)['mean_s']
    if 'bf16' in args.precision:
        from utils.tensors import precision_context

        def run_bf16():
            with precision_context('bf16', device):
                grads['bf16'] = guidance.gradient(x, out, chain)
        figure['bf16_s'] = common.time_call(run_bf16, device, args.repeats, args.warmup)['mean_s']
        figure['bf16_speedup_over_fp32'] = figure['sparse_s'] / figure['bf16_s']
        if grads['bf16'] is not None and grads['sparse'] is not None:
            a, b = grads['sparse'].flatten(), grads['bf16'].flatten()
            figure['bf16_gradient_cosine'] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
            figure['bf16_max_rel_gradient_diff'] = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
            # For scale: COAP draws new surface samples at every call, so fp32 itself moves the gradient this much
            # when those samples come from another seed.
            reseeded = CollisionGuidance(model, model.coap, GUIDANCE_WEIGHT, seed=1).gradient(x, out, chain)
            if reseeded is not None:
                figure['fp32_reseeded_gradient_cosine'] = float(torch.nn.functional.cosine_similarity(
                    a, reseeded.flatten(), dim=0))
    if 'reference' in grads:
        figure['speedup_over_reference'] = figure['reference_s'] / figure['sparse_s']
        if grads['reference'] is not None and grads['sparse'] is not None:
            figure['max_rel_gradient_diff'] = float((grads['reference'] - grads['sparse']).abs().max()
                                                    / grads['reference'].abs().max().clamp_min(1e-30))
    return figure


def training_figures(world, cfg, args, device) -> dict:
    """Stage-2 training steps per precision; unless ``--skip reference``, also fp32 steps of the dense formulation
    (:func:`dense_reference`: autograd through the whole point encoders, COAP's dense loss), a same-run ratio."""
    from bench_training import stage2_step
    results = {}
    runs = [(precision, False) for precision in args.precision]
    if 'reference' not in args.skip and 'fp32' in args.precision:
        runs.append(('fp32', True))
    for precision, reference in runs:
        for epoch, name in ((0, 'coap_off'), (3, 'coap_on')):
            step_args = type(args)(**vars(args))
            step_args.batch_size, step_args.stage2_epoch, step_args.train_precision = args.train_batch, epoch, precision
            step, info = stage2_step(world, cfg, step_args, device)
            label = 'dense reference' if reference else precision
            common.log(f'training step, batch {args.train_batch}, {name} ({label})')

            def timed(step=step, reference=reference):
                with dense_reference() if reference else contextlib.nullcontext():
                    step()
            # one warm-up step at least: the first one also allocates the optimiser's state
            timing = common.time_call(timed, device, args.repeats, max(args.warmup, 1))
            key = f'training_step/{name}' + ('' if precision == 'fp32' else f'/{precision}')
            if reference:
                results[key].update(reference_s_per_it=timing['mean_s'],
                                    speedup_over_reference=timing['mean_s'] / results[key]['s_per_it'])
            else:
                results[key] = {'s_per_it': timing['mean_s'], 'batch': args.train_batch, 'precision': precision,
                                **info}
    return results


def stage1_figures(world, cfg, args, device) -> dict:
    import train_prohmr_scene
    from bench_training import script_args
    from prohmr_scene import trainer

    flags = script_args(train_prohmr_scene.build_parser(), world)
    flags.load_pretrained = False
    dataset = egobody_dataset(world, cfg, flags.scene_type, split='test')
    batch = with_scene_points(frame_batch(dataset, args.stage1_batch, device), args.scene_points)
    model = trainer.build_model(flags, cfg, device).eval()

    def run():
        with torch.no_grad():
            model.forward_step(batch, train=False)
    common.log(f'stage-1 eval forward, batch {args.stage1_batch}')
    timing = common.time_call(run, device, args.repeats, max(args.warmup, 1))
    return {'stage1_eval_forward': {'s_per_call': timing['mean_s'], 'batch': args.stage1_batch,
                                    'samples': int(cfg.TRAIN.NUM_TEST_SAMPLES)}}


def run(args) -> dict:
    device, world, cfg, result = start_benchmark(
        args, 'speed', frames_per_call=args.frames, num_samples=args.num_samples, scene_points=args.scene_points,
        coap_weights=os.path.basename(args.coap_weights) or 'random', denoiser_weights='random (untrained)')
    result.update(sampling_figures(world, cfg, args, device))
    if 'training' not in args.skip:
        result.update(training_figures(world, cfg, args, device))
    if 'stage1' not in args.skip:
        result.update(stage1_figures(world, cfg, args, device))
    result['load_avg_1min_end'] = round(os.getloadavg()[0], 2)
    return result


def main(argv=None) -> int:
    return common.bench_main(build_parser, run, argv)


if __name__ == '__main__':
    sys.exit(main())
