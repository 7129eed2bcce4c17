"""Evaluate a stage-1 (ProHMR-scene) checkpoint on the EgoBody test split; metrics, flags and defaults as the original.

Prints G-MPJPE, MPJPE, PA-MPJPE, G-V2V, V2V, PA-V2V (mm, mode sample, 24 joints), saves them to
``<save_root>/output_prohmr_scene_<id>/metrics.json`` and, with ``--save_pred_transl``, the mode translations to
``.../results.pkl`` (or to the path given as ``--save_pred_transl=PATH``). ``<id>`` is the checkpoint's folder name.

Large test sets can be split: ``--shard K/N`` evaluates share K of N (whole batches) into ``.../shards/``, and
``--merge True`` with the same flags writes the outputs of the whole split; ``torchrun --nproc_per_node=G`` does both
(each process its share, rank 0 the merge). The flow's random samples of frame f come from per-frame streams of
``--seed`` (``utils/frame_rng.py``), so outputs do not depend on the batch size or the split.
"""
from __future__ import annotations

import argparse
import os
import sys

from utils.cli import (add_data_flags, add_scene_and_camera_flags, add_test_flags, close_hook, new_parser,
                       parse_test_args, positive_flags_error, render_error, run_test, visual_hook)
from utils.checks import output_dir_error, output_file_error
from utils.io import DataError
from utils.run import str2bool
from utils.shards import add_shard_flags, share_flags_error

STAGE = 'prohmr_scene'
# Flags every share of a split must have been run with.
SHARE_SETTINGS = ('checkpoint', 'num_samples', 'seed', 'batch_size', 'shuffle', 'scene_type', 'scene_cano',
                  'scene_downsample_rate', 'add_bbox_scale', 'dataset_root')


def bool_or_path(value):
    """``--save_pred_transl``: True/False/1/0, or a path for results.pkl (README form ``--save_pred_transl=PATH``)."""
    try:
        return str2bool(value)
    except argparse.ArgumentTypeError:
        return str(value)


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    add_data_flags(p)
    add_scene_and_camera_flags(p, scene_cano=False, scene_type='whole_scene')
    add_test_flags(p, checkpoint='checkpoints/checkpoints_egohmr/53618/best_model.pt', batch_size=50, render_step=8)
    p.add_argument('--num_samples', type=int, default=5, help='samples per image (the mode plus num_samples-1)')
    p.add_argument('--save_pred_transl', type=bool_or_path, default=True,
                   help='save the mode translations (results.pkl); True/False or a file path')
    add_shard_flags(p)
    return p


def results_path(save_pred_transl, out_dir: str):
    """Where results.pkl goes: None (not saved), ``<out_dir>/results.pkl``, or the user's path."""
    if save_pred_transl is True:
        return os.path.join(out_dir, 'results.pkl')
    if save_pred_transl is False:
        return None
    path = str(save_pred_transl)
    return path if path.endswith('.pkl') else os.path.join(path, 'results.pkl')


def output_dir_of(args) -> str:
    """``<save_root>/output_prohmr_scene_<checkpoint folder name>``."""
    model_id = os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))
    return os.path.join(args.save_root, f'output_prohmr_scene_{model_id}')


def output_paths_error(args) -> str:
    """'' when metrics.json and results.pkl can be written, else the reason (checked before the evaluation)."""
    out_dir = output_dir_of(args)
    pkl = results_path(args.save_pred_transl, out_dir)
    return (output_dir_error(out_dir, '--save_root')
            or (output_file_error(pkl, '--save_pred_transl') if pkl else ''))


def share_settings(args) -> dict:
    return {name: (os.path.abspath(getattr(args, name)) if name in ('checkpoint', 'dataset_root')
                   else getattr(args, name)) for name in SHARE_SETTINGS}


def write_outputs(args, out_dir: str, result: dict, predictions) -> None:
    """metrics.json, predictions.npz (``predictions``: the arrays, or None) and results.pkl of the whole split."""
    from utils.io import atomic_pickle_dump
    from utils.predictions import write_predictions
    from utils.run import write_metrics
    print(write_metrics(result['metrics'], os.path.join(out_dir, 'metrics.json'),
                       title=f"stage-1 test, {result['num_frames']} frames, checkpoint {args.checkpoint}"))
    if predictions is not None:
        write_predictions(predictions, out_dir, title='stage 1')
    pkl = results_path(args.save_pred_transl, out_dir)
    if pkl:
        atomic_pickle_dump({'pred_cam_full_list': result['pred_cam_full']}, pkl)
        print(f"saved mode translations [{len(result['pred_cam_full'])}, 3] to {pkl}")


def merge_shares(args, out_dir: str) -> dict:
    """``--merge``: the outputs of the whole split from the shares in ``<out_dir>/shards``."""
    from prohmr_scene.evaluate import MetricAccumulator, summarize
    from utils.shards import load_shards, merged_predictions
    shares = load_shards(out_dir, STAGE, share_settings(args))
    result = summarize(MetricAccumulator.merged([s['metrics_state'] for s in shares]),
                       [s['pred_cam_full'] for s in shares])
    print(f"merged {len(shares)} shares ({result['num_frames']} frames) from {out_dir}/shards")
    write_outputs(args, out_dir, result, merged_predictions(shares))
    return result


def run(args) -> dict:
    from torch.utils.data import DataLoader

    from configs import get_config
    from dataloaders.egobody_dataset import EgoBodyDataset
    from prohmr_scene.checkpoints import load_stage1_checkpoint
    from prohmr_scene.evaluate import evaluate
    from prohmr_scene.model import ProHMRScene
    from prohmr_scene.visualize import make_render_hook
    from utils import distributed
    from utils.render_views import make_open3d_hook
    from utils.predictions import PredictionRecorder, chain_hooks, stage1_hook
    from utils.run import get_device, seed_everything
    from utils.shards import finish_test_run, process_share, split_dataset

    out_dir = output_dir_of(args)
    if args.merge:
        return merge_shares(args, out_dir)
    seed_everything(args.seed)
    device = distributed.init_distributed(args.device) or get_device(args.gpu_id, args.device)
    share = process_share(args)
    cfg = get_config(args.model_cfg, overrides=['TRAIN.NUM_TEST_SAMPLES', args.num_samples])
    model = ProHMRScene(cfg, data_dir=args.data_dir, with_focal_length=args.with_focal_length,
                        with_bbox_info=args.with_bbox_info, with_cam_center=args.with_cam_center,
                        scene_feat_dim=512, scene_cano=args.scene_cano)
    load_stage1_checkpoint(model, args.checkpoint)
    model.to(device).eval()

    dataset = EgoBodyDataset(cfg, args.dataset_root, split='test', data_dir=args.data_dir, spacing=1,
                             add_scale=args.add_bbox_scale, do_augment=False, scene_type=args.scene_type,
                             scene_cano=args.scene_cano, scene_downsample_rate=args.scene_downsample_rate)
    if len(dataset) == 0:
        raise DataError(f"the test split is empty: '{dataset.npz_path}' has no frames")
    loader = DataLoader(split_dataset(dataset, args.batch_size, share), batch_size=args.batch_size,
                        shuffle=args.shuffle, num_workers=args.num_workers)

    folder = os.path.basename(out_dir)
    faces = model.smpl.faces.astype('int64')
    render_dir = os.path.join(args.output_render_root, folder)
    hook = visual_hook(
        args, render_dir,
        lambda out: make_render_hook(args.dataset_root, faces, out, args.render_step,
                                     args.num_samples if args.render_multi_sample else 1),
        lambda out: make_open3d_hook(args.dataset_root, faces, out, args.vis_step, args.vis_o3d_gt))
    recorder = PredictionRecorder('prohmr_scene', faces) if args.save_predictions else None
    if recorder is not None:
        hook = chain_hooks(hook, stage1_hook(recorder, float(cfg.CAM.FX_NORM_COEFF)))
    try:
        result = evaluate(model, loader, device, log_freq=args.log_freq, on_batch=hook, sample_seed=args.seed)
    finally:
        close_hook(hook)
    predictions = recorder.arrays() if recorder is not None else None
    if share is not None:
        print(f"share {share[0]}/{share[1]}:\n{result['table']}")
    return finish_test_run(
        out_dir, share, STAGE, share_settings(args), result,
        lambda: {'frame_index': result['frame_index'], 'num_frames_split': len(dataset),
                 'pred_cam_full': result['pred_cam_full'], 'metrics_state': result['metrics_state'],
                 'predictions': predictions},
        lambda: write_outputs(args, out_dir, result, predictions),
        lambda: merge_shares(args, out_dir))


def main(argv=None) -> int:
    from utils.run_state import STAGE1_RUN_SETTINGS
    args = parse_test_args(build_parser(), argv, STAGE1_RUN_SETTINGS)
    if args is None:
        return 2
    if args.render and args.vis_o3d:
        print("error: --render and --vis_o3d cannot be used together", file=sys.stderr)
        return 2
    error = positive_flags_error(args, ('batch_size', 'num_samples', 'render_step', 'vis_step',
                                        'scene_downsample_rate'))
    if not error and args.render:
        error = render_error()
    error = error or share_flags_error(args) or output_paths_error(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return run_test(run, args)


if __name__ == '__main__':
    sys.exit(main())
