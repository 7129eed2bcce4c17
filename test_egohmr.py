"""Evaluate a stage-2 (EgoHMR) checkpoint on the EgoBody test split; metrics, flags and defaults as the original.

Prints the original's metric lines (G-MPJPE, MPJPE, PA-MPJPE, V2V as all/vis/invis; collision and contact ratios;
min-of-N invisible MPJPE; std/APD diversity) plus corrected variants, and writes them to
``<save_root>/output_egohmr_<id>/metrics.json``; with ``--save_results`` also ``results_seed_<seed>.pkl`` there.
``<id>`` is the checkpoint's folder name. The body statistics are read from
``<checkpoint dir>/preprocess_stats/preprocess_stats.npz`` (or ``--stats_path``).

All ``--num_samples`` samples of a batch are drawn in one reverse chain of batch ``S x bs`` (``--samples_per_chain``
bounds it); the image and scene encoders run once per batch. Every random draw of sample s of frame f (noise, COAP
surface samples) comes from its own stream of ``--seed`` (``utils/frame_rng.py``), so the results do not depend on the
batch size, the chain layout or the split.

Large test sets can be split: ``--shard K/N`` evaluates share K of N (whole batches) into ``.../shards/``, and
``--merge True`` with the same flags writes the outputs of the whole split; ``torchrun --nproc_per_node=G`` does both
(each process its share, rank 0 the merge).
"""
from __future__ import annotations

import argparse
import os
import sys

from utils.cli import (add_data_flags, add_scene_and_camera_flags, add_test_flags, close_hook, new_parser,
                       parse_test_args, positive_flags_error, render_error, run_test, visual_hook)
from utils.checks import output_dir_error
from utils.run import str2bool
from utils.shards import add_shard_flags, share_flags_error
from utils.tensors import PRECISIONS

STAGE = 'egohmr'
# Flags every share of a split must have been run with.
SHARE_SETTINGS = ('checkpoint', 'num_samples', 'seed', 'batch_size', 'shuffle', 'eval_spacing', 'two_stage',
                  'scene_crop_by_stage1_transl', 'stage1_result_path', 'num_diffusion_timesteps',
                  'timestep_respacing_eval', 'diffuse_fuse', 'with_coap_grad', 'cond_grad_weight', 'guide_final_step',
                  'only_mask_img_cond', 'pelvis_vis_loosen', 'eval_coll_loss', 'eval_contact_score',
                  'eval_with_vis_mask_pa', 'stats_path', 'collision_model', 'coap_checkpoint', 'precision',
                  'scene_type', 'scene_cano', 'scene_downsample_rate', 'add_bbox_scale', 'dataset_root')


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    add_data_flags(p)
    add_scene_and_camera_flags(p, scene_cano=True, scene_type='cube')
    add_test_flags(p, checkpoint='checkpoints/checkpoints_egohmr/91453/best_model_mpjpe_vis.pt', batch_size=5,
                   render_step=80)
    p.add_argument('--two_stage', type=str2bool, default=True,
                   help='use the stage-1 translation as the model input (GT is kept for the metrics)')
    p.add_argument('--scene_crop_by_stage1_transl', type=str2bool, default=True,
                   help='scene cubes cropped around the stage-1 translation (from_pred) instead of GT (from_gt)')
    p.add_argument('--stage1_result_path', default='output_results_release/output_prohmr_scene_53618/results.pkl',
                   help='results.pkl of test_prohmr_scene.py (stage-1 translations in test-npz order)')
    p.add_argument('--save_results', type=str2bool, default=False, help='write results_seed_<seed>.pkl')
    p.add_argument('--num_diffusion_timesteps', type=int, default=50, help='diffusion steps T')
    p.add_argument('--timestep_respacing_eval', default='ddpm', choices=['ddim5', 'ddpm'],
                   help='sampler: ddpm (all 50 steps) or ddim5 (5 deterministic steps)')
    p.add_argument('--diffuse_fuse', type=str2bool, default=True,
                   help='image-conditioned output at visible joints, scene-only output elsewhere')
    p.add_argument('--with_coap_grad', type=str2bool, default=True, help='collision-guided DDPM sampling')
    p.add_argument('--cond_grad_weight', type=float, default=2.0, help='collision guidance weight')
    p.add_argument('--guide_final_step', type=str2bool, default=False,
                   help="with --with_coap_grad True: apply the guided update of the last DDPM step to the returned "
                        "prediction (the original computes it and returns the unguided prediction; True departs "
                        "from the paper's numbers)")
    p.add_argument('--only_mask_img_cond', type=str2bool, default=True,
                   help='the scene-only pass zeroes only the image features')
    p.add_argument('--pelvis_vis_loosen', type=str2bool, default=True,
                   help='hips/neck visibility from knees/neck keypoints (the original test-time map)')
    p.add_argument('--eval_spacing', type=int, default=1, help='keep every n-th test frame')
    p.add_argument('--num_samples', type=int, default=1, help='independent samples per image (the paper uses 5)')
    p.add_argument('--eval_coll_loss', type=str2bool, default=True, help='report the collision ratio')
    p.add_argument('--eval_contact_score', type=str2bool, default=True, help='report the contact ratio')
    p.add_argument('--eval_with_vis_mask_pa', type=str2bool, default=True,
                   help="PA-MPJPE with the original's visible-joint alignment")
    p.add_argument('--stats_path', default=None,
                   help='preprocess_stats.npz (or its folder); default: beside the checkpoint')
    p.add_argument('--collision_model', default='coap', choices=['coap', 'exact'],
                   help='occupancy model for guidance and the collision ratio')
    p.add_argument('--coap_checkpoint', default=None,
                   help="COAP weights (.ckpt); default: the stage-2 checkpoint's smpl.coap.* entries")
    p.add_argument('--samples_per_chain', type=int, default=0,
                   help='at most this many samples per reverse chain (0: all --num_samples at once)')
    p.add_argument('--precision', default='fp32', choices=PRECISIONS,
                   help='sampling precision (bf16: autocast; see benchmarks/bench_speed.py for its effect)')
    p.add_argument('--save_pred_transl', default=None,
                   help='accepted for README compatibility and ignored (stage-2 test has no such output)')
    add_shard_flags(p)
    return p


def check_args(args) -> str:
    """An error message for an invalid flag combination, or ''."""
    if args.render and args.vis_o3d:
        return "--render and --vis_o3d cannot be used together"
    error = positive_flags_error(args, ('batch_size', 'num_samples', 'render_step', 'vis_step', 'eval_spacing',
                                        'num_diffusion_timesteps', 'scene_downsample_rate')) or share_flags_error(args)
    if error:
        return error
    if args.samples_per_chain < 0:
        return f"--samples_per_chain must be >= 0 (0: all samples in one chain), got {args.samples_per_chain}"
    if args.with_coap_grad and args.timestep_respacing_eval == 'ddim5':
        return ("--with_coap_grad True works with --timestep_respacing_eval ddpm only (the original states DDIM is "
                "not meant for guidance); add --with_coap_grad False for ddim5")
    if args.render:
        error = render_error()
        if error:
            return error
    if not os.path.isfile(args.checkpoint):
        return f"--checkpoint: no stage-2 checkpoint at '{args.checkpoint}'"
    error = output_dir_error(output_dir_of(args), '--save_root') or output_conflict_error(args)
    if error or args.merge:
        return error
    if args.two_stage and not os.path.isfile(args.stage1_result_path):
        return (f"--two_stage: no stage-1 results at --stage1_result_path '{args.stage1_result_path}' "
                "(run test_prohmr_scene.py first, or pass --two_stage False)")
    return ''


def output_dir_of(args) -> str:
    """``<save_root>/output_egohmr_<checkpoint folder name>``."""
    from egohmr.checkpoints import checkpoint_run_dir
    return os.path.join(args.save_root, f'output_egohmr_{os.path.basename(checkpoint_run_dir(args.checkpoint))}')


def output_conflict_error(args) -> str:
    """A reason to refuse when the output folder holds the metrics of a run with another sampler / guidance."""
    import json
    path = os.path.join(output_dir_of(args), 'metrics.json')
    try:
        with open(path) as f:
            earlier = json.load(f)
    except (OSError, ValueError):
        return ''
    if not isinstance(earlier, dict):
        return ''
    ours = {'sampling': args.timestep_respacing_eval, 'guidance': bool(args.with_coap_grad)}
    theirs = {key: earlier.get(key, value) for key, value in ours.items()}
    if theirs == ours:
        return ''
    return (f"--save_root: '{path}' holds the metrics of a {theirs['sampling']} run with guidance "
            f"{'on' if theirs['guidance'] else 'off'}; this {ours['sampling']} run (guidance "
            f"{'on' if ours['guidance'] else 'off'}) would overwrite them: pass another --save_root")


def share_settings(args) -> dict:
    paths = ('checkpoint', 'dataset_root', 'stage1_result_path', 'stats_path', 'coap_checkpoint')
    return {name: (os.path.abspath(getattr(args, name)) if name in paths and getattr(args, name) else
                   getattr(args, name)) for name in SHARE_SETTINGS}


def write_outputs(args, out_dir: str, summary: dict, results: dict, predictions) -> None:
    """The report, metrics.json, predictions.npz (``predictions``: the arrays, or None) and, with
    ``--save_results``, the results pickle of the whole split."""
    from egohmr.evaluate import format_report, json_safe
    from utils.io import atomic_json_dump, atomic_pickle_dump
    from utils.predictions import write_predictions
    print('*** Final Results ***')
    print(format_report(summary))
    record = dict(summary['metrics'], num_frames=summary['num_frames'], num_samples=summary['num_samples'],
                  notes=summary['notes'], checkpoint=args.checkpoint, sampling=args.timestep_respacing_eval,
                  guidance=bool(args.with_coap_grad), seed=args.seed)
    metrics_path = os.path.join(out_dir, 'metrics.json')
    atomic_json_dump(json_safe(record), metrics_path)
    print(f"metrics written to {metrics_path}")
    if predictions is not None:
        write_predictions(predictions, out_dir, title=f'stage 2 ({args.timestep_respacing_eval})')
    if args.save_results:
        path = os.path.join(out_dir, f'results_seed_{args.seed}.pkl')
        atomic_pickle_dump(results, path, protocol=2)
        print(f"sampled results written to {path}")


def merge_shares(args, out_dir: str) -> dict:
    """``--merge``: the outputs of the whole split from the shares in ``<out_dir>/shards``."""
    from egohmr.evaluate import Stage2Metrics, merge_results
    from utils.shards import load_shards, merged_predictions
    shares = load_shards(out_dir, STAGE, share_settings(args))
    summary = Stage2Metrics.merged([s['metrics_state'] for s in shares]).summary()
    results = merge_results([(s['frame_index'], s['results']) for s in shares])
    print(f"merged {len(shares)} shares ({summary['num_frames']} frames) from {out_dir}/shards")
    write_outputs(args, out_dir, summary, results, merged_predictions(shares))
    return {'summary': summary, 'results': results}


def run(args) -> dict:
    from torch.utils.data import DataLoader

    from configs import egohmr_config
    from dataloaders.body_rep_stats import load_body_rep_stats
    from dataloaders.egobody_dataset import EgoBodyDataset
    from diffusion import create_gaussian_diffusion
    from egohmr import collision
    from egohmr.checkpoints import checkpoint_run_dir, load_egohmr_weights
    from egohmr.evaluate import evaluate
    from egohmr.guidance import CollisionGuidance
    from egohmr.model import EgoHMR
    from egohmr.trainer import respacing_of, sampling_method_of
    from egohmr.visualize import make_open3d_hook, make_render_hook
    from utils import distributed
    from utils.predictions import PredictionRecorder, chain_hooks, stage2_hook
    from utils.run import get_device, seed_everything
    from utils.shards import finish_test_run, process_share, split_dataset

    out_dir = output_dir_of(args)
    if args.merge:
        return merge_shares(args, out_dir)
    if args.save_pred_transl is not None:
        print("note: --save_pred_transl is a stage-1 option; test_egohmr.py ignores it (use --save_results)")
    seed_everything(args.seed)
    device = distributed.init_distributed(args.device) or get_device(args.gpu_id, args.device)
    share = process_share(args)
    # the stage-2 config with this run's flags (which already agree with the checkpoint's recorded run)
    cfg = egohmr_config(args.model_cfg, args, explicit=set(vars(args)))
    x_mean, x_std = load_body_rep_stats(args.stats_path or checkpoint_run_dir(args.checkpoint))
    need_collision = args.eval_coll_loss or args.with_coap_grad
    model = EgoHMR.from_config(cfg, data_dir=args.data_dir, body_rep_mean=x_mean, body_rep_std=x_std, training=False,
                               pelvis_vis_loosen=args.pelvis_vis_loosen, diffuse_fuse=args.diffuse_fuse,
                               with_coap=True if (need_collision and args.collision_model == 'coap') else None)
    missing, unexpected = load_egohmr_weights(model, args.checkpoint)
    if missing or unexpected:
        print(f"checkpoint '{args.checkpoint}': {len(missing)} missing keys {missing[:3]}, "
              f"{len(unexpected)} unexpected keys {unexpected[:3]}")
    model.to(device).eval()
    occupancy = (collision.build_occupancy_model(model, args.collision_model, args.coap_checkpoint)
                 if need_collision else None)
    guidance = CollisionGuidance(model, occupancy, args.cond_grad_weight) if args.with_coap_grad else None
    diffusion = create_gaussian_diffusion(args.num_diffusion_timesteps, respacing_of(args.timestep_respacing_eval))
    print(f"loaded '{args.checkpoint}'; sampling {args.timestep_respacing_eval}, {args.num_samples} sample(s), "
          f"guidance {'on (w=%g)' % args.cond_grad_weight if guidance else 'off'}")

    dataset = EgoBodyDataset(cfg, args.dataset_root, split='test', data_dir=args.data_dir, spacing=args.eval_spacing,
                             add_scale=args.add_bbox_scale, do_augment=False, scene_type=args.scene_type,
                             scene_crop_by_stage1_transl=args.scene_crop_by_stage1_transl,
                             load_stage1_transl=args.two_stage, stage1_result_path=args.stage1_result_path,
                             scene_cano=args.scene_cano, scene_downsample_rate=args.scene_downsample_rate)
    loader = DataLoader(split_dataset(dataset, args.batch_size, share), batch_size=args.batch_size,
                        shuffle=args.shuffle, num_workers=args.num_workers)

    folder = os.path.basename(out_dir)
    faces = model.smpl.faces.astype('int64')
    hook = visual_hook(
        args, os.path.join(args.output_render_root, folder),
        lambda out: make_render_hook(args.dataset_root, faces, out, args.render_step,
                                     args.num_samples if args.render_multi_sample else 1,
                                     focal_coeff=float(cfg.CAM.FX_NORM_COEFF)),
        lambda out: make_open3d_hook(args.dataset_root, faces, out, args.vis_step, args.vis_o3d_gt))
    recorder = PredictionRecorder('egohmr', faces) if args.save_predictions else None
    if recorder is not None:
        hook = chain_hooks(hook, stage2_hook(recorder, float(cfg.CAM.FX_NORM_COEFF)))
    try:
        result = evaluate(model, diffusion, loader, device, num_samples=args.num_samples,
                          method=sampling_method_of(args.timestep_respacing_eval), guidance=guidance,
                          two_stage=args.two_stage,
                          occupancy_model=occupancy if args.eval_coll_loss else None,
                          eval_contact=args.eval_contact_score, eval_with_vis_mask_pa=args.eval_with_vis_mask_pa,
                          samples_per_chain=args.samples_per_chain or None, log_freq=args.log_freq, on_batch=hook,
                          guide_final_step=args.guide_final_step, precision=args.precision,
                          sample_seed=args.seed)
    finally:
        close_hook(hook)
    predictions = recorder.arrays() if recorder is not None else None
    return finish_test_run(
        out_dir, share, STAGE, share_settings(args), result,
        lambda: {'frame_index': result['frame_index'], 'num_frames_split': len(dataset), 'results': result['results'],
                 'metrics_state': result['metrics_state'], 'predictions': predictions},
        lambda: write_outputs(args, out_dir, result['summary'], result['results'], predictions),
        lambda: merge_shares(args, out_dir))


def main(argv=None) -> int:
    from utils.run_state import STAGE2_RUN_SETTINGS
    args = parse_test_args(build_parser(), argv, STAGE2_RUN_SETTINGS)
    if args is None:
        return 2
    message = check_args(args)
    if message:
        print(f"error: {message}", file=sys.stderr)
        return 2
    return run_test(run, args, errors=(ValueError,))


if __name__ == '__main__':
    sys.exit(main())
