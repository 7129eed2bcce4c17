"""Stage-2 (EgoHMR) sampling latency per image: DDPM, DDIM-5 and DDPM + COAP collision guidance, 1 and 5 samples.

Each figure times :func:`egohmr.evaluate.sample_poses`, the function ``test_egohmr.py`` samples with: the image and
scene encoders run once per image (``EgoHMR.sampling_condition``) and all ``S`` samples go through ONE reverse chain
of batch ``S x frames``. The model is configured as at test time (``diffuse_fuse``, loosened pelvis visibility,
canonical scene) with random weights (latency does not depend on the weights; with guidance, the COAP work depends on
how many scene points fall in the predicted body's box, see the README). Inputs are real frames of the bench world
(test split, GT scene cubes) with ``--scene_points`` points per cloud.

Before the figures one untimed DDIM-5 chain with the largest sample count primes the allocator and kernels, so
that ``--warmup 0`` (the CPU default, keeping a no-argument run to a few minutes) still gives warm figures.
Besides the total per image, every figure reports ``encode_s`` (the encoders, timed alone) and
``per_step_s = (total - encode) / steps``, which scales to other step counts (``--steps``).

    python benchmarks/bench_sampling.py [--methods ddpm ddim5 ddpm+coap] [--num_samples 1 5] [--scene_points 20000]
"""
from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from make_bench_world import egobody_dataset, ensure_world, frame_batch, load_config, with_scene_points  # noqa: E402

import torch  # noqa: E402

METHOD_PATTERN = re.compile(r'^(ddpm|ddim\d+)(\+coap)?$')
GUIDANCE_WEIGHT = 2.0      # test_egohmr.py --cond_grad_weight default


def parse_method(name: str, steps: int):
    """``'ddpm' | 'ddimN'`` with an optional ``'+coap'`` -> (sampler 'ddpm'/'ddim', respacing, guided, chain steps)."""
    match = METHOD_PATTERN.match(name)
    if not match:
        raise SystemExit(f"--methods: '{name}' is not ddpm, ddimN (e.g. ddim5) or either with '+coap'")
    base, guided = match.group(1), bool(match.group(2))
    if base == 'ddpm':
        return 'ddpm', '', guided, steps
    count = int(base[4:])
    if not 1 <= count <= steps:
        raise SystemExit(f"--methods: '{name}' needs 1 <= N <= --steps ({steps})")
    return 'ddim', base, guided, count


def build_parser():
    parser = common.base_parser(__doc__.splitlines()[0], cpu_calls=(1, 0), cuda_calls=(5, 2))
    parser.add_argument('--methods', nargs='+', default=['ddpm', 'ddim5', 'ddpm+coap'],
                        help="samplers: ddpm, ddimN, optionally with '+coap' (collision guidance, weight 2)")
    parser.add_argument('--num_samples', nargs='+', type=common.positive_int, default=[1, 5],
                        help='samples per image (drawn in one chain)')
    parser.add_argument('--scene_points', type=common.positive_int, default=20000, help='scene points per image')
    parser.add_argument('--frames', type=common.positive_int, default=1,
                        help='images per call (latency is reported per image)')
    parser.add_argument('--steps', type=common.positive_int, default=50,
                        help='diffusion timesteps (the model is trained with 50; DDPM runs all of them)')
    return parser


def build_model(world, cfg, stats_set, with_coap: bool, device):
    """The stage-2 network configured as ``test_egohmr.py`` builds it (random weights)."""
    from egohmr.model import EgoHMR

    model = EgoHMR(cfg, data_dir=world.data_dir, body_rep_mean=stats_set.Xmean, body_rep_std=stats_set.Xstd,
                   scene_type='cube', scene_cano=True, cond_mask_prob=0.0, pelvis_vis_loosen=True,
                   diffuse_fuse=True, with_coap=True if with_coap else None)
    return model.to(device).eval()


def measure(model, batch, methods, sample_counts, args, device) -> dict:
    """Every (method, S) figure; see the module docstring."""
    from diffusion import create_gaussian_diffusion
    from egohmr.evaluate import sample_poses
    from egohmr.guidance import CollisionGuidance

    memory = common.PeakMemory(device)
    frames = batch['fx'].shape[0]
    common.log(f"priming: one untimed DDIM-5 chain with {max(sample_counts)} sample(s)")
    sample_poses(model, create_gaussian_diffusion(args.steps, 'ddim5' if args.steps >= 5 else ''), batch,
                 max(sample_counts), 'ddim')
    with torch.no_grad():
        encode = common.time_call(lambda: model.sampling_condition(batch), device, args.repeats, args.warmup)
    results = {'encode_s_per_image': encode['mean_s'] / frames}
    for name in methods:
        sampler, respacing, guided, chain_steps = parse_method(name, args.steps)
        diffusion = create_gaussian_diffusion(args.steps, respacing)
        guidance = CollisionGuidance(model, model.coap, GUIDANCE_WEIGHT) if guided else None
        for count in sample_counts:
            common.log(f"{name}, {count} sample(s): {chain_steps} steps x {args.repeats} repeat(s) "
                       f"(+{args.warmup} warm-up)")
            memory.reset()

            def run():
                return sample_poses(model, diffusion, batch, count, sampler, guidance=guidance)

            timing = common.time_call(run, device, args.repeats, args.warmup)
            per_image = timing['mean_s'] / frames
            results[f'{name}/S={count}'] = {
                'latency_s_per_image': per_image, 'min_s_per_image': timing['min_s'] / frames,
                'steps': chain_steps,
                'per_step_s': max(0.0, timing['mean_s'] - encode['mean_s']) / chain_steps / frames,
                'repeats': timing['repeats'], 'warmup': timing['warmup'], **memory.report()}
    add_guidance_overhead(results)
    return results


def add_guidance_overhead(results: dict) -> None:
    """``guidance_overhead_s_per_image`` of every ``<m>+coap/S=n`` figure whose unguided ``<m>/S=n`` was measured."""
    for key, figure in results.items():
        name, _, samples = key.partition('/')
        plain = results.get(f"{name[:-len('+coap')]}/{samples}") if name.endswith('+coap') else None
        if isinstance(plain, dict):
            figure['guidance_overhead_s_per_image'] = figure['latency_s_per_image'] - plain['latency_s_per_image']


def run(args) -> dict:
    device = common.setup(args)
    plans = [parse_method(name, args.steps) for name in args.methods]
    with_coap = any(plan[2] for plan in plans)
    world = ensure_world(args.world)
    cfg = load_config()
    stats_set = egobody_dataset(world, cfg, 'cube', split='train', stats=True)
    frames_set = egobody_dataset(world, cfg, 'cube', split='test')
    batch = with_scene_points(frame_batch(frames_set, args.frames, device), args.scene_points)
    model = build_model(world, cfg, stats_set, with_coap, device)
    if with_coap and model.coap is None:
        raise SystemExit("--methods ...+coap needs COAP (egohmr.coap), which is not importable here")
    result = common.header(device)
    result.update(benchmark='sampling', scene_points=args.scene_points, frames_per_call=args.frames,
                  diffusion_steps=args.steps, samples_in_one_chain=True, guidance_weight=GUIDANCE_WEIGHT,
                  weights='random (untrained)')
    result.update(measure(model, batch, args.methods, args.num_samples, args, device))
    return result


def main(argv=None) -> int:
    return common.bench_main(build_parser, run, argv)


if __name__ == '__main__':
    sys.exit(main())
