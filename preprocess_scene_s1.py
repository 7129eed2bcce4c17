"""Stage-1 scene preprocessing: the scene points in front of each egocentric camera.

For one split, every 15th frame and the first frame of each recording run get a crop: the scene-mesh vertices
with z > 0 in that frame's PV camera, decimated to ``--scene_verts_num_target`` points and stored in the
master-Kinect frame. Writes to ``--save_root``:

* ``pcd_verts_dict_<split>.pkl``: ``{frame key: float64 [target, 3]}`` for the saved frames,
* ``map_dict_<split>.pkl``: ``{frame key: saved frame key}`` for every frame (a saved frame of its own recording),

where a frame key is ``egocentric_color/<rec>/<date>/PV/<file>.jpg`` whatever the data root's depth.

    python preprocess_scene_s1.py --split train --data_root /mnt/ssd/egobody_release/
"""
from __future__ import annotations

import logging
import os

from tqdm import tqdm

from dataloaders import scene_preprocess as sp
from utils import egobody
from utils.io import atomic_pickle_dump, load_npz_checked

log = logging.getLogger('preprocess_scene_s1')


def output_paths(save_root: str, split: str):
    return (os.path.join(save_root, f'pcd_verts_dict_{split}.pkl'),
            os.path.join(save_root, f'map_dict_{split}.pkl'))


def run(args) -> sp.Summary:
    save_root = sp.resolve_save_root(args, egobody.S1_FOLDER)
    pcd_path, map_path = output_paths(save_root, args.split)
    summary = sp.Summary()
    data = load_npz_checked(egobody.annotation_npz_path(args.data_root, args.split), ['imgname'],
                            what='annotation npz')
    imgnames = [str(name) for name in data['imgname']]
    if args.skip_existing and os.path.isfile(pcd_path) and os.path.isfile(map_path):
        summary.skipped = len(imgnames)
        log.info('--skip_existing: %s and %s exist, nothing to do', pcd_path, map_path)
        return summary

    recordings = [egobody.parse_imgname(name)[0] for name in imgnames]
    saved_of = sp.s1_saved_frames(recordings)
    keys = [egobody.frame_key(name) for name in imgnames]
    scenes = sp.SceneMeshCache(args.data_root)
    pcd_verts_dict = {}
    for i in tqdm(sorted(set(saved_of.tolist())), desc=f's1 {args.split} crops', unit='crop'):
        recording = recordings[i]
        scene = egobody.scene_of(args.data_root, recording)
        T_kinect2scene = egobody.load_kinect_to_scene(args.data_root, recording, scene)
        T_kinect2pv = egobody.kinect_to_pv(*egobody.frame_transforms(args.data_root, imgnames[i]))
        crop, available = sp.crop_in_front_of_camera(scenes.vertices(scene), T_kinect2scene, T_kinect2pv,
                                                     args.scene_verts_num_target, what=keys[i])
        pcd_verts_dict[keys[i]] = crop
        summary.padded += available < args.scene_verts_num_target
    map_dict = {key: keys[saved] for key, saved in zip(keys, saved_of)}

    atomic_pickle_dump(map_dict, map_path, protocol=2)
    atomic_pickle_dump(pcd_verts_dict, pcd_path, protocol=2)
    summary.frames, summary.written = len(imgnames), len(pcd_verts_dict)
    return summary


def main(argv=None) -> sp.Summary:
    parser = sp.base_parser(__doc__.split('\n')[0], split_default='train', save_folder=egobody.S1_FOLDER,
                            uses_body_model=False)
    return sp.run_script(parser, run, egobody.S1_FOLDER, argv)


if __name__ == '__main__':
    main()
