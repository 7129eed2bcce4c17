"""Command-line flags shared by the train/test scripts of both stages (names and defaults as the original)."""
from __future__ import annotations

import argparse
import sys

from utils.run import str2bool

SCENE_DOWNSAMPLE_HELP = ('keep every k-th scene point (1 = all 20000, as the original; larger is faster on a CPU; '
                         'use the same value for training and testing)')


def new_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the script docstring's first line and whose help shows the defaults."""
    return argparse.ArgumentParser(description=doc.splitlines()[0], epilog='\n'.join(doc.splitlines()[1:]),
                                   formatter_class=_HelpFormatter)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def add_bool_flag(p: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    """A boolean flag in the original scripts' style, ``--name True/False``; a bare ``--name`` means True."""
    p.add_argument(name, type=str2bool, nargs='?', const=True, default=default, metavar='True/False', help=help)


def add_device_flags(p: argparse.ArgumentParser) -> None:
    """``--gpu_id`` (the original's) and ``--device`` (explicit, wins over --gpu_id)."""
    p.add_argument('--gpu_id', type=int, default=0, help='CUDA device index (the CPU is used when CUDA is absent)')
    p.add_argument('--device', default=None,
                   help="torch device, e.g. 'cpu', 'cuda', 'cuda:1' (default: cuda:<gpu_id> if available, else cpu)")


def add_data_flags(p: argparse.ArgumentParser, needs_mocap: bool = False) -> None:
    p.add_argument('--dataset_root', default='/mnt/ssd/egobody_release',
                   help='EgoBody root (data_info_release.csv, annotation_egocentric_smpl_npz/, egocentric_color/, ...)')
    what = 'smpl/smpl/SMPL_*.pkl, smpl_mean_params.npz' + (' and datasets/cmu_mocap.npz' if needs_mocap else '')
    p.add_argument('--data_dir', default='data', help=f'folder with {what} (the original hard-codes data/)')
    p.add_argument('--model_cfg', default=None, help='model config yaml (default: configs/prohmr.yaml)')
    add_device_flags(p)
    p.add_argument('--batch_size', type=int, default=16, help='images per batch (per process under torchrun)')
    p.add_argument('--num_workers', type=int, default=4, help='DataLoader worker processes (0: load in-process)')
    p.add_argument('--scene_downsample_rate', type=int, default=1, help=SCENE_DOWNSAMPLE_HELP)


def add_scene_and_camera_flags(p: argparse.ArgumentParser, scene_cano: bool, scene_type: str) -> None:
    p.add_argument('--scene_cano', type=str2bool, default=scene_cano,
                   help='encode the scene relative to the input body translation')
    p.add_argument('--scene_type', default=scene_type, choices=['whole_scene', 'cube'],
                   help='whole_scene: stage-1 points in front of the camera; cube: 2x2 m crop around the body')
    p.add_argument('--with_focal_length', type=str2bool, default=True, help='condition on the focal length')
    p.add_argument('--with_cam_center', type=str2bool, default=True, help='condition on the principal point')
    p.add_argument('--with_bbox_info', type=str2bool, default=True, help='condition on the box centre and size')
    p.add_argument('--add_bbox_scale', type=float, default=1.2, help='box side = scale * add_bbox_scale * 200 px')


def add_training_flags(p: argparse.ArgumentParser, save_dir: str, val_step: int) -> None:
    p.add_argument('--save_dir', default=save_dir, help='run folders <save_dir>/<run_id> are created here')
    p.add_argument('--num_epoch', type=int, default=100000, help='epochs (the original run is stopped by hand)')
    p.add_argument('--log_step', type=int, default=1000, help='log the training losses every N iterations')
    p.add_argument('--val_step', type=int, default=val_step, help='validate every N iterations')
    p.add_argument('--save_step', type=int, default=2000, help='write last_model.pt every N iterations')
    p.add_argument('--do_augment', type=str2bool, default=True, help='crop/rotation/flip/colour augmentation')
    p.add_argument('--shuffle', type=str2bool, default=True, help='shuffle the training set')
    p.add_argument('--max_iters', type=int, default=None, help='stop after this many iterations (default: no limit)')
    p.add_argument('--seed', type=int, default=None, help='seed torch/numpy/augmentation (default: unseeded)')
    p.add_argument('--run_id', default=None, help='run folder name under --save_dir (default: a random number)')
    p.add_argument('--val_at_start', type=str2bool, default=False,
                   help='also validate the untrained model at iteration 0 (logged, never saved as best)')
    p.add_argument('--resume', default=None, metavar='PATH',
                   help='continue a run: its folder (uses last_model.pt) or a checkpoint written by this code; same '
                        'weights, optimizer, iteration, best value, data order and RNG streams (exact with --seed)')
    add_bool_flag(p, '--overwrite', False, 'allow a --run_id whose folder already holds checkpoints (replaced)')
    add_bool_flag(p, '--sync_bn', False, 'under torchrun on CUDA: batch-norm statistics over all processes\' batches')


def add_test_flags(p: argparse.ArgumentParser, checkpoint: str, batch_size: int, render_step: int) -> None:
    p.set_defaults(batch_size=batch_size)
    p.add_argument('--checkpoint', default=checkpoint, help='model checkpoint ({"state_dict": ...})')
    p.add_argument('--log_freq', type=int, default=100, help='print the running metrics every N batches')
    p.add_argument('--seed', type=int, default=0, help='seed for sampling')
    p.add_argument('--shuffle', type=str2bool, default=False, help='shuffle the test set (keep False for results)')
    p.add_argument('--save_root', default='output_results', help='metrics and results are written below this folder')
    p.add_argument('--render', type=str2bool, default=False, help='write JPG renders under --output_render_root')
    p.add_argument('--render_multi_sample', type=str2bool, default=True, help='render every sample, not only one')
    p.add_argument('--output_render_root', default='output_render', help='folder for --render output')
    p.add_argument('--render_step', type=int, default=render_step,
                   help='render every N batches (the first item with joints outside the image, else item 0)')
    p.add_argument('--save_predictions', type=str2bool, default=True,
                   help='write predictions.npz (every sample of every frame, ~40 KB per sample and frame: pass '
                        'False for large test sets) and per_joint_errors.png beside metrics.json')
    p.add_argument('--vis_o3d', type=str2bool, default=False,
                   help='open3d viewer (a PNG snapshot when there is no display)')
    p.add_argument('--vis_o3d_gt', type=str2bool, default=False, help='also show the GT body in the open3d view')
    p.add_argument('--vis_step', type=int, default=8, help='open3d view every N batches')


def positive_flags_error(args, names) -> str:
    """'--name must be >= 1, got v' for the first such flag that is below 1 (or the first NaN/inf float flag,
    any flag), else ''."""
    from utils.checks import finite_float_flags_error
    error = finite_float_flags_error(args)
    if error:
        return error
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name} must be >= 1, got {value}"
    return ''


def render_error() -> str:
    """'' if ``--render`` can work here, else a one-line reason (no OpenGL/EGL), checked before a long run."""
    from utils.renderer import opengl_unavailable_reason
    reason = opengl_unavailable_reason()
    return f"--render needs OpenGL: {reason}" if reason else ''


def visual_hook(args, output_dir: str, make_render_hook, make_open3d_hook):
    """The test scripts' ``on_batch`` hook: renders (``--render``, JPGs under ``output_dir``), the open3d viewer
    (``--vis_o3d``, PNG snapshots under ``output_dir + '_o3d'`` without a display), or None.

    ``make_render_hook(output_dir)`` / ``make_open3d_hook(snapshot_dir)`` build the stage's hook; without open3d
    the viewer is skipped with a note.
    """
    if args.render:
        return make_render_hook(output_dir)
    if args.vis_o3d:
        from utils.renderer import open3d_available
        if open3d_available():
            return make_open3d_hook(output_dir + '_o3d')
        print("--vis_o3d: open3d is not installed (pip install open3d); continuing without the viewer")
    return None


def close_hook(hook) -> None:
    """Close a hook from :func:`visual_hook` (renderers hold an OpenGL context)."""
    if hook is not None and hasattr(hook, 'close'):
        hook.close()


def run_training(args, train, errors=(), load_config=None) -> int:
    """Load the config (``load_config(args)``; default: ``--model_cfg``, else configs/prohmr.yaml) and run
    ``train(args, cfg, cfg_path)``.

    Data problems (and the extra ``errors`` types) end with one ``error:`` line and exit code 1.
    """
    from configs import PROHMR_YAML, get_config
    from utils.checks import error_line
    from utils.io import DataError
    from utils.run_state import RunInterrupted
    try:
        args.model_cfg = args.model_cfg or PROHMR_YAML
        cfg = load_config(args) if load_config is not None else get_config(args.model_cfg)
        summary = train(args, cfg, cfg_path=args.model_cfg)
    except RunInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 130
    except (DataError, FileNotFoundError, FloatingPointError) + tuple(errors) as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 1
    print(f"run folder: {summary['run_dir']}")
    return 0


def run_test(run, args, errors=()) -> int:
    """``run(args)`` of a test script: data problems (and the extra ``errors`` types) end with one ``error:`` line and
    exit code 1; under torchrun the process group is closed however it ends."""
    from utils import distributed
    from utils.checks import error_line
    from utils.io import DataError
    try:
        run(args)
    except (DataError, FileNotFoundError) + tuple(errors) as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 1
    finally:
        distributed.close_distributed()
    return 0


def parse_test_args(parser: argparse.ArgumentParser, argv, run_settings):
    """Parse a test script's flags and take the checkpoint's training settings ``run_settings`` from its recorded
    run (:func:`utils.run_state.apply_run_settings`); None after printing the one-line error of a contradiction."""
    from utils.io import DataError
    from utils.run_state import apply_run_settings
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        apply_run_settings(args, parser, argv, args.checkpoint, run_settings)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    return args
