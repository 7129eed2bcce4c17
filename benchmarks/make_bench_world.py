"""The benchmarks' tiny synthetic world and real model inputs built from it.

:func:`ensure_world` builds (once) ``outputs/bench/world`` or ``--world DIR``: a synthetic EgoBody-format world of
3 recordings x 4 frames (``make_world(..., seed=0)``) with the stage-1 scene crops and the stage-2 GT cube crops of
every split, so the datasets of both stages load from it. The world is generated in a temporary sibling folder and
renamed into place when complete, so an interrupted build never leaves a half world behind.

:func:`frame_batch` collates dataset items (cycling through the split when it has fewer frames than the batch) and
:func:`with_scene_points` resizes the scene point clouds of a batch, so the figures use valid inputs of any size.

    python benchmarks/make_bench_world.py [--world DIR]     # prebuild it (the benchmarks do it on first use)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import types

if __package__ in (None, ''):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, log, stdout_to_stderr  # noqa: E402

import torch  # noqa: E402

DEFAULT_WORLD = os.path.join(ROOT, 'outputs', 'bench', 'world')
WORLD_SIZE = dict(num_recordings=3, frames_per_recording=4, seed=0)
MARKER = 'bench_world.json'
SPLITS = ('train', 'val', 'test')


def world_paths(world: str) -> types.SimpleNamespace:
    world = os.path.abspath(world)
    return types.SimpleNamespace(root=world, data_dir=os.path.join(world, 'data'),
                                 dataset_root=os.path.join(world, 'egobody'))


def preprocess_world(dataset_root: str, data_dir: str) -> None:
    """Stage-1 crops and stage-2 GT cube crops (seed 0) of every split, with the project's scripts."""
    import preprocess_scene_s1
    import preprocess_scene_s2_for_train

    for split in SPLITS:
        preprocess_scene_s1.main(['--split', split, '--data_root', dataset_root])
        preprocess_scene_s2_for_train.main(['--split', split, '--data_root', dataset_root, '--data_dir', data_dir,
                                            '--seed', '0'])


def ensure_world(world: str = None) -> types.SimpleNamespace:
    """The bench world at ``world`` (default ``outputs/bench/world``), built first if it is not complete.

    Returns ``.root``, ``.data_dir`` (SMPL files, mean parameters, MoCap) and ``.dataset_root`` (EgoBody layout).
    """
    paths = world_paths(world or DEFAULT_WORLD)
    if os.path.isfile(os.path.join(paths.root, MARKER)):
        return paths
    if os.path.exists(paths.root):
        raise SystemExit(f"--world: '{paths.root}' exists but holds no {MARKER} (not a complete bench world); "
                         f"delete it or pass another folder")
    from synthetic.world import make_world

    parent = os.path.dirname(paths.root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.' + os.path.basename(paths.root) + '.', dir=parent)
    log(f"building the bench world in {paths.root} (once; about a minute)")
    try:
        staged = world_paths(tmp)
        with stdout_to_stderr():
            summary = make_world(tmp, **WORLD_SIZE)
            preprocess_world(staged.dataset_root, staged.data_dir)
        summary.update(out_dir=paths.root, data_dir=paths.data_dir, dataset_root=paths.dataset_root)
        with open(os.path.join(tmp, MARKER), 'w') as f:
            json.dump(summary, f, indent=2)
        os.replace(tmp, paths.root)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return paths


def load_config(num_test_samples: int = None):
    """``configs/prohmr.yaml`` (optionally with ``TRAIN.NUM_TEST_SAMPLES`` overridden)."""
    from configs import get_config

    overrides = ['TRAIN.NUM_TEST_SAMPLES', int(num_test_samples)] if num_test_samples else None
    return get_config(overrides=overrides)


def start_benchmark(args, benchmark: str, **fields):
    """``(device, world, config, JSON header)`` of a benchmark run: the shared flags set up, the bench world built
    or found, and the header with ``benchmark`` and ``fields``."""
    import common
    device = common.setup(args)
    world = ensure_world(args.world)
    cfg = load_config()
    result = common.header(device)
    result.update(benchmark=benchmark, **fields)
    return device, world, cfg, result


def egobody_dataset(world, cfg, scene_type: str, split: str = 'train', stats: bool = False):
    """The split of the bench world in ``'whole_scene'`` (stage 1) or ``'cube'`` (stage 2, GT crops) mode.

    ``stats``: also compute the diffusion body-representation statistics (``.Xmean``, ``.Xstd``).
    """
    from dataloaders.egobody_dataset import EgoBodyDataset

    with stdout_to_stderr():
        return EgoBodyDataset(cfg, world.dataset_root, split=split, data_dir=world.data_dir, do_augment=False,
                              scene_type=scene_type, scene_cano=scene_type == 'cube', get_diffuse_feature=stats,
                              train=stats)


def frame_batch(dataset, batch_size: int, device) -> dict:
    """``batch_size`` items of ``dataset`` (index ``i % len``) collated and moved to ``device``."""
    from torch.utils.data import default_collate

    from utils.run import recursive_to

    if len(dataset) == 0:
        raise SystemExit(f"the bench dataset {type(dataset).__name__} '{getattr(dataset, 'split', '')}' is empty")
    return recursive_to(default_collate([dataset[i % len(dataset)] for i in range(batch_size)]), device)


def resize_points(points: torch.Tensor, count: int) -> torch.Tensor:
    """``[B, P, 3] -> [B, count, 3]``: evenly spaced points when shrinking, cyclic repetition when growing."""
    if count < 1:
        raise SystemExit(f"--scene_points must be >= 1, got {count}")
    have = points.shape[1]
    if count <= have:
        index = torch.linspace(0, have - 1, count, device=points.device).round().long()
    else:
        index = torch.arange(count, device=points.device) % have
    return points[:, index]


def with_scene_points(batch: dict, count: int) -> dict:
    """A shallow copy of ``batch`` whose ``scene_pcd_verts_full`` holds ``count`` points per frame."""
    out = dict(batch)
    out['scene_pcd_verts_full'] = resize_points(batch['scene_pcd_verts_full'], count)
    return out


def mocap_batch(data_dir: str, batch_size: int, device) -> dict:
    """``batch_size`` MoCap poses (``body_pose``, ``betas``) for the stage-1 discriminator step."""
    from dataloaders.mocap_dataset import MoCapDataset
    from prohmr_scene.trainer import mocap_path

    return frame_batch(MoCapDataset(mocap_path(data_dir)), batch_size, device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--world', default=None, help=f'world folder (default {DEFAULT_WORLD})')
    args = parser.parse_args(argv)
    paths = ensure_world(args.world)
    print(json.dumps(vars(paths)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
