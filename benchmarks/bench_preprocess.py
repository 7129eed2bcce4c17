"""Scene preprocessing throughput: stage-1 crops and stage-2 cube crops per frame, on the bench world.

Per-frame figures call the functions the preprocessing scripts use (``dataloaders.scene_preprocess``) for every
frame of the three splits, with the scene meshes already in memory and no file output:

* ``stage1_crop``: the frame's Kinect -> PV transform and :func:`crop_in_front_of_camera` (the script crops only
  every 15th frame and the first of each recording; this times one crop per frame),
* ``stage2_cube_crop``: the frame's scene -> PV transform, the GT body moved to the scene frame, the seeded yaw and
  shift, and :func:`cube_crop` (the SMPL bodies are computed once beforehand; ``smpl_bodies`` times that batch).

``scripts`` times ``preprocess_scene_s1.run`` and ``preprocess_scene_s2_for_train.run`` end to end on the train
split (scene-mesh OBJ parsing, SMPL, ``.npy``/``.pkl`` writes into a temporary folder), and ``mesh_read`` the OBJ
parsing alone. The bench world's scene meshes have about 2e5 vertices; crop time grows linearly with that.

    python benchmarks/bench_preprocess.py [--scene_points 20000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from make_bench_world import SPLITS, ensure_world  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def build_parser():
    parser = common.base_parser(__doc__.splitlines()[0], cpu_calls=(3, 1), cuda_calls=(3, 1))
    parser.add_argument('--scene_points', type=common.positive_int, default=20000,
                        help='points stored per crop (--scene_verts_num_target of the scripts)')
    common.add_bool_flag(parser, '--no_scripts', False, 'skip the end-to-end script timings')
    return parser


def load_frames(dataset_root: str, data_dir: str, device):
    """Every frame of the world: names, recordings, scenes and GT SMPL vertices in the PV frame."""
    from dataloaders import scene_preprocess as sp
    from preprocess_scene_s2_for_train import SMPL_KEYS
    from utils import egobody
    from utils.body_model import create_smpl
    from utils.io import load_npz_checked

    names, genders, params = [], [], {name: [] for name in SMPL_KEYS.values()}
    for split in SPLITS:
        data = load_npz_checked(egobody.annotation_npz_path(dataset_root, split), ['imgname', 'gender', *SMPL_KEYS],
                                what='annotation npz')
        split_names = [str(n) for n in data['imgname']]
        names += split_names
        genders += sp.smpl_genders(data['gender'], split_names)
        for key, name in SMPL_KEYS.items():
            params[name].append(np.asarray(data[key]))
    params = {k: np.concatenate(v, axis=0) for k, v in params.items()}
    recordings = [egobody.parse_imgname(n)[0] for n in names]
    scenes = [egobody.scene_of(dataset_root, r) for r in recordings]
    models = {g: create_smpl(data_dir, g).to(device) for g in sorted(set(genders))}
    return names, recordings, scenes, genders, params, models


def run(args) -> dict:
    from dataloaders import scene_preprocess as sp
    from utils import egobody
    from utils.geometry import transform_points

    device = common.setup(args)
    world = ensure_world(args.world)
    root = world.dataset_root
    names, recordings, scenes, genders, params, models = load_frames(root, world.data_dir, device)
    mesh_cache = sp.SceneMeshCache(root)
    for scene in sorted(set(scenes)):
        mesh_cache.vertices(scene)
    frames = len(names)
    memory = common.PeakMemory(device)
    result = common.header(device)
    result.update(benchmark='preprocess', frames=frames, scene_points=args.scene_points,
                  scene_mesh_vertices={s: int(len(mesh_cache.vertices(s))) for s in sorted(set(scenes))})

    def stage1_crops():
        for name, recording, scene in zip(names, recordings, scenes):
            T_kinect2scene = egobody.load_kinect_to_scene(root, recording, scene)
            T_kinect2pv = egobody.kinect_to_pv(*egobody.frame_transforms(root, name))
            sp.crop_in_front_of_camera(mesh_cache.vertices(scene), T_kinect2scene, T_kinect2pv, args.scene_points,
                                       what=name)

    bodies_pv = None

    def smpl_bodies():
        nonlocal bodies_pv
        bodies_pv = sp.smpl_vertices(models, genders, params)

    def stage2_crops():
        for i, (name, scene) in enumerate(zip(names, scenes)):
            T_scene2pv = sp.scene_to_pv_of_frame(root, name)
            body = transform_points(bodies_pv[i], np.linalg.inv(T_scene2pv))
            centre = body.mean(axis=0)
            theta, shift = sp.draw_cube_yaw_and_shift(sp.frame_rng(0, i), body, centre)
            sp.cube_crop(mesh_cache.vertices(scene), centre, theta, shift, target=args.scene_points, what=name)

    for label, fn in (('stage1_crop', stage1_crops), ('smpl_bodies', smpl_bodies), ('stage2_cube_crop', stage2_crops)):
        common.log(f"{label}: {frames} frames x {args.repeats} repeat(s) (+{args.warmup} warm-up)")
        memory.reset()
        timing = common.time_call(fn, torch.device('cpu'), args.repeats, args.warmup)
        result[label] = {'frames_per_s': common.rate(timing, frames), 'ms_per_frame': 1000 * timing['mean_s'] / frames,
                         'repeats': timing['repeats'], 'warmup': timing['warmup'], **memory.report()}
    result['smpl_bodies']['device'] = str(device)

    scene = sorted(set(scenes))[0]
    mesh_path = egobody.scene_mesh_path(root, scene)
    timing = common.time_call(lambda: sp.read_obj_vertices(mesh_path), torch.device('cpu'), args.repeats, 0)
    result['mesh_read'] = {'s_per_mesh': timing['mean_s'], 'vertices': int(len(mesh_cache.vertices(scene))),
                           'megabytes': round(os.path.getsize(mesh_path) / common.MIB, 2)}
    if not args.no_scripts:
        result['scripts'] = time_scripts(root, world.data_dir, args)
    return result


def time_scripts(dataset_root: str, data_dir: str, args) -> dict:
    """End-to-end ``run()`` of the stage-1 and stage-2 (GT) preprocessing scripts on the train split."""
    import preprocess_scene_s1
    import preprocess_scene_s2_for_train

    figures = {}
    for label, module in (('preprocess_scene_s1', preprocess_scene_s1),
                          ('preprocess_scene_s2_for_train', preprocess_scene_s2_for_train)):
        with tempfile.TemporaryDirectory(prefix='bench_preprocess_') as save_root:
            flags = argparse.Namespace(split='train', data_root=dataset_root, save_root=save_root, data_dir=data_dir,
                                       skip_existing=False, scene_verts_num_target=args.scene_points, seed=0,
                                       cube_size=2.0)
            summary = None

            def call():
                nonlocal summary
                summary = module.run(flags)

            common.log(f"{label} (train split) x {args.repeats}")
            timing = common.time_call(call, torch.device('cpu'), args.repeats, 0)
        figures[label] = {'s_per_run': timing['mean_s'], 'frames': summary.frames, 'crops_written': summary.written,
                          'frames_per_s': common.rate(timing, summary.frames)}
    return figures


def main(argv=None) -> int:
    return common.bench_main(build_parser, run, argv)


if __name__ == '__main__':
    sys.exit(main())
