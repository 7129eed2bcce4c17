"""Stage-2 scene preprocessing for training: a 2x2 m scene prism around each ground-truth body.

For every frame of the split, the GT body (gender-specific SMPL with the npz ``shape``, ``pose``,
``global_orient_pv``, ``transl_pv``) is mapped to the scene frame; a prism with a ``--cube_size`` square footprint,
yawed by theta ~ U[0, 2 pi) about the vertical through the body's vertex mean and shifted by up to cube_size/4 (the
body staying inside), keeps the scene points up to cube_size above its lowest point. They are decimated to
``--scene_verts_num_target`` points and saved in the scene-mesh frame as
``<save_root>/<split>/<rec>/<date>/<frame>.npy`` (float64 [target, 3]). The yaw and shift of frame i come from
``numpy.random.default_rng([seed, i])``, so reruns give identical files.

    python preprocess_scene_s2_for_train.py --split train --data_root /mnt/ssd/egobody_release/
"""
from __future__ import annotations


import numpy as np
from tqdm import tqdm

from dataloaders import scene_preprocess as sp
from utils import egobody
from utils.body_model import create_smpl
from utils.checks import check_finite, check_rows
from utils.geometry import transform_points
from utils.io import load_npz_checked
from utils.run import get_device


SMPL_KEYS = {'shape': 'betas', 'global_orient_pv': 'global_orient', 'pose': 'body_pose', 'transl_pv': 'transl'}


def run(args) -> sp.Summary:
    save_root = sp.resolve_save_root(args, egobody.CUBE_FROM_GT_FOLDER)
    summary = sp.Summary()
    npz_path = egobody.annotation_npz_path(args.data_root, args.split)
    data = load_npz_checked(npz_path, ['imgname', 'gender', *SMPL_KEYS], what='annotation npz',
                            shapes={k: egobody.NPZ_SHAPES[k] for k in SMPL_KEYS})
    imgnames = [str(name) for name in data['imgname']]
    check_rows(data, npz_path, 'annotation npz')
    check_finite(data, npz_path, 'annotation npz', names=imgnames)
    genders = sp.smpl_genders(data['gender'], imgnames)
    todo = sp.pending_cube_frames(imgnames, save_root, args.split, args.skip_existing, summary)
    device = get_device()
    models = {g: create_smpl(args.data_dir, g).to(device) for g in sorted({genders[i] for i in todo})}
    scenes = sp.SceneMeshCache(args.data_root)

    with tqdm(total=len(todo), desc=f's2 {args.split} crops (GT)', unit='frame') as bar:
        for chunk in sp.chunks(todo, sp.SMPL_CHUNK):
            params = {name: data[key][chunk] for key, name in SMPL_KEYS.items()}
            bodies_pv = sp.smpl_vertices(models, [genders[i] for i in chunk], params)
            for i, body_pv in zip(chunk, bodies_pv):
                recording, _, _ = egobody.parse_imgname(imgnames[i])
                T_scene2pv = sp.scene_to_pv_of_frame(args.data_root, imgnames[i])
                body = transform_points(body_pv, np.linalg.inv(T_scene2pv))
                centre = body.mean(axis=0)
                theta, shift = sp.draw_cube_yaw_and_shift(sp.frame_rng(args.seed, i), body, centre, args.cube_size,
                                                          what=egobody.frame_key(imgnames[i]))
                scene_points = scenes.vertices(egobody.scene_of(args.data_root, recording))
                sp.write_cube_crop(sp.cube_output_path(save_root, args.split, imgnames[i]), scene_points, centre,
                                   theta, shift, args.cube_size, args.scene_verts_num_target, summary,
                                   what=egobody.frame_key(imgnames[i]))
                bar.update()
    return summary


def main(argv=None) -> sp.Summary:
    parser = sp.base_parser(__doc__.split('\n')[0], split_default='train',
                            save_folder=egobody.CUBE_FROM_GT_FOLDER, uses_body_model=True)
    sp.add_cube_flags(parser)
    return sp.run_script(parser, run, egobody.CUBE_FROM_GT_FOLDER, argv)


if __name__ == '__main__':
    main()
