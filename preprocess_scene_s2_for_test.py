"""Stage-2 scene preprocessing for testing: a 2x2 m scene prism around each stage-1 translation.

Like ``preprocess_scene_s2_for_train.py``, but the prism is centred on the stage-1 prediction
``results.pkl['pred_cam_full_list'][i]`` (the SMPL translation in the PV frame, one row per frame of the split in
npz order), mapped to the scene frame, with no shift. The yaw of frame i comes from
``numpy.random.default_rng([seed, i])``. Output: ``<save_root>/<split>/<rec>/<date>/<frame>.npy`` (float64
[target, 3], scene-mesh frame).

    python preprocess_scene_s2_for_test.py --split test --data_root /mnt/ssd/egobody_release/ \\
        --stage1_result_path output_results_release/output_prohmr_scene_53618/results.pkl
"""
from __future__ import annotations


import numpy as np
from tqdm import tqdm

from dataloaders import scene_preprocess as sp
from utils import egobody
from utils.checks import check_finite
from utils.geometry import transform_points
from utils.io import DataError, load_npz_checked, load_pickle


STAGE1_RESULT_PATH = 'output_results_release/output_prohmr_scene_53618/results.pkl'


def load_stage1_translations(path: str, num_frames: int, npz_path: str, imgnames=None) -> np.ndarray:
    """``pred_cam_full_list`` of a stage-1 ``results.pkl`` as float64 ``[num_frames, 3]`` (PV frame)."""
    results = load_pickle(path, 'stage-1 results pkl', hint='written by test_prohmr_scene.py --save_pred_transl')
    if not isinstance(results, dict) or 'pred_cam_full_list' not in results:
        raise DataError(f"stage-1 results pkl '{path}' has no key 'pred_cam_full_list'")
    rows = results['pred_cam_full_list']
    try:
        if isinstance(rows, (list, tuple)):
            rows = np.concatenate([np.asarray(r, dtype=np.float64).reshape(-1, 3) for r in rows], axis=0)
        translations = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    except ValueError as exc:
        raise DataError(f"stage-1 results pkl '{path}': 'pred_cam_full_list' is not [N, 3] translations") from exc
    check_finite({'pred_cam_full_list': translations}, path, 'stage-1 results pkl', names=imgnames)
    if len(translations) != num_frames:
        raise DataError(f"stage-1 results pkl '{path}' has {len(translations)} translations but '{npz_path}' has "
                        f"{num_frames} frames; run stage 1 on this split with spacing 1 and no shuffling")
    return translations


def run(args) -> sp.Summary:
    save_root = sp.resolve_save_root(args, egobody.CUBE_FROM_PRED_FOLDER)
    summary = sp.Summary()
    npz_path = egobody.annotation_npz_path(args.data_root, args.split)
    imgnames = [str(n) for n in load_npz_checked(npz_path, ['imgname'], what='annotation npz')['imgname']]
    translations_pv = load_stage1_translations(args.stage1_result_path, len(imgnames), npz_path, imgnames)
    todo = sp.pending_cube_frames(imgnames, save_root, args.split, args.skip_existing, summary)
    scenes = sp.SceneMeshCache(args.data_root)
    for i in tqdm(todo, desc=f's2 {args.split} crops (stage 1)', unit='frame'):
        recording, _, _ = egobody.parse_imgname(imgnames[i])
        T_scene2pv = sp.scene_to_pv_of_frame(args.data_root, imgnames[i])
        centre = transform_points(translations_pv[i:i + 1], np.linalg.inv(T_scene2pv))[0]
        theta, shift = sp.draw_cube_yaw_and_shift(sp.frame_rng(args.seed, i), None, centre, args.cube_size)
        scene_points = scenes.vertices(egobody.scene_of(args.data_root, recording))
        sp.write_cube_crop(sp.cube_output_path(save_root, args.split, imgnames[i]), scene_points, centre, theta,
                           shift, args.cube_size, args.scene_verts_num_target, summary,
                           what=egobody.frame_key(imgnames[i]))
    return summary


def main(argv=None) -> sp.Summary:
    parser = sp.base_parser(__doc__.split('\n')[0], split_default='test',
                            save_folder=egobody.CUBE_FROM_PRED_FOLDER, uses_body_model=False)
    sp.add_cube_flags(parser)
    parser.add_argument('--stage1_result_path', default=STAGE1_RESULT_PATH,
                        help="stage-1 results.pkl whose 'pred_cam_full_list' rows (PV translations, npz order of "
                             "the split) centre the crops")
    return sp.run_script(parser, run, egobody.CUBE_FROM_PRED_FOLDER, argv)


if __name__ == '__main__':
    main()
