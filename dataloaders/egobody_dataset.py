"""The EgoBody dataset: image crop, keypoints, SMPL annotation and scene points per frame.

Everything that does not change per item is read once in the constructor: the annotation npz, the
transformation pkl (turned into per-frame matrices), the stage-1 scene pickles or the per-recording
Kinect-to-scene calibrations, the stage-1 translations and the pelvis regressors of the male/female SMPL.
Per item only the image and, in ``'cube'`` mode, that frame's ``.npy`` crop are read.

Random augmentation (train) uses one ``np.random.Generator`` per item. With ``seed=None`` it is seeded from
fresh OS entropy. With an integer ``seed`` it is seeded from ``(seed, epoch, index, visit)``: ``epoch`` is set
by :meth:`EgoBodyDataset.set_epoch` (default 0) and ``visit`` counts how often this dataset object has produced
item ``index`` in the current epoch (``set_epoch`` starts the count again). Two datasets built with the same seed
and read in the same order therefore return identical items, and re-reading an item draws a new augmentation. An
item's augmentation in epoch e does not depend on earlier epochs, nor on whether DataLoader workers (which hold
their own copies of the counters) or the main process read it, so a resumed run draws what an uninterrupted one
draws.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from dataloaders.augmentation import NO_AUGMENTATION, AugParams, augment_example, sample_aug_params
from dataloaders.body_rep_stats import compute_body_rep_stats, save_body_rep_stats
from utils import egobody
from utils.body_model import NUM_SMPL_JOINTS, create_smpl, gender_to_index
from utils.checks import check_finite, check_jpeg_complete, check_rows
from utils.geometry import transform_points
from utils.io import DataError, load_npz_checked, load_pickle, require_file

SCENE_TYPES = ('whole_scene', 'cube')
HAS_SMPL_PARAMS = {'global_orient': True, 'body_pose': True, 'betas': True, 'transl': True}
SMPL_PARAMS_IS_AXIS_ANGLE = {'global_orient': True, 'body_pose': True, 'betas': False, 'transl': False}


class PelvisRegressor:
    """Rest-pose pelvis of an SMPL model as a linear function of the betas.

    SMPL rotates the body about the pelvis, so the posed pelvis (with zero ``transl``) equals the rest-pose one:
    ``J_regressor[0] @ (v_template + shapedirs @ betas)``; no forward pass is needed.
    """

    def __init__(self, smpl_model):
        regressor = smpl_model.J_regressor[0].detach().double()                     # [V]
        self.offset = (regressor @ smpl_model.v_template.detach().double()).numpy()  # [3]
        shapedirs = smpl_model.shapedirs.detach().double()                         # [V, 3, B]
        self.basis = torch.einsum('v,vcb->cb', regressor, shapedirs).numpy()        # [3, B]

    def __call__(self, betas: np.ndarray) -> np.ndarray:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.shape != (self.basis.shape[1],):
            raise ValueError(f"expected {self.basis.shape[1]} betas, got shape {list(betas.shape)}")
        return self.offset + self.basis @ betas


class EgoBodyDataset(Dataset):
    """Frames of one EgoBody split (``annotation_egocentric_smpl_npz/egocapture_<split>_smpl.npz``).

    Args:
        cfg: yacs config with ``MODEL.IMAGE_SIZE/IMAGE_MEAN/IMAGE_STD``, ``CAM.FX_NORM_COEFF/FY_NORM_COEFF`` and
            ``DATASETS.CONFIG`` (augmentation factors).
        dataset_root: the EgoBody release folder.
        split: ``'train'``, ``'val'`` or ``'test'``.
        data_dir: folder with ``smpl/smpl/SMPL_{MALE,FEMALE}.pkl`` (only read when ``do_augment``).
        spacing: keep every ``spacing``-th frame.
        add_scale: box side = ``scale * add_scale * 200`` pixels.
        do_augment: random crop/flip/rotation/colour augmentation (``dataloaders.augmentation``).
        scene_type: ``'whole_scene'`` (stage-1 pickles) or ``'cube'`` (stage-2 per-frame crops).
        scene_crop_by_stage1_transl: cube mode reads the ``from_pred`` crops instead of ``from_gt``.
        load_stage1_transl / stage1_result_path: add ``stage1_transl_full`` from a stage-1 ``results.pkl``.
        get_diffuse_feature / train / body_rep_stats_dir: with ``split='train'`` and ``train``, compute the
            diffusion statistics (``self.Xmean``, ``self.Xstd``) and, if a folder is given, write
            ``<body_rep_stats_dir>/preprocess_stats.npz``.
        body_rep_stats_dir: see above.
        scene_cano: stored only (the models canonicalise the scene).
        scene_downsample_rate: keep every k-th scene point.
        s1_root / cube_root: override the default ``<dataset_root>/Egohmr_scene_preprocess_*_release`` folders.
        seed: augmentation seed (see the module docstring); None = fresh entropy.
    """

    def __init__(self, cfg, dataset_root: str, split: str = 'train', data_dir: str = 'data', spacing: int = 1,
                 add_scale: float = 1.2, do_augment: bool = False, scene_type: str = 'whole_scene',
                 scene_crop_by_stage1_transl: bool = False, load_stage1_transl: bool = False,
                 stage1_result_path: Optional[str] = None, get_diffuse_feature: bool = False,
                 body_rep_stats_dir: Optional[str] = None, scene_cano: bool = False, train: bool = False,
                 scene_downsample_rate: int = 1, s1_root: Optional[str] = None, cube_root: Optional[str] = None,
                 seed: Optional[int] = None):
        super().__init__()
        if scene_type not in SCENE_TYPES:
            raise ValueError(f"scene_type must be one of {SCENE_TYPES}, got {scene_type!r}")
        for name, value in (('spacing', spacing), ('scene_downsample_rate', scene_downsample_rate)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.cfg = cfg
        self.dataset_root = dataset_root
        self.split = split
        self.spacing = int(spacing)
        self.do_augment = bool(do_augment)
        self.scene_type = scene_type
        self.scene_cano = scene_cano
        self.scene_downsample_rate = int(scene_downsample_rate)
        self.train = train
        self.seed = seed
        self.epoch = 0
        self._visits: Dict[int, int] = {}

        self.image_size = int(cfg.MODEL.IMAGE_SIZE)
        self.image_mean = tuple(cfg.MODEL.IMAGE_MEAN)
        self.image_std = tuple(cfg.MODEL.IMAGE_STD)
        self.fx_norm = float(cfg.CAM.FX_NORM_COEFF)
        self.fy_norm = float(cfg.CAM.FY_NORM_COEFF)
        self.aug_cfg = cfg.DATASETS.CONFIG

        self._load_annotations(egobody.annotation_npz_path(dataset_root, split), add_scale)
        self._load_frame_transforms()
        if scene_type == 'whole_scene':
            self._load_whole_scene(s1_root or os.path.join(dataset_root, egobody.S1_FOLDER))
        else:
            folder = egobody.CUBE_FROM_PRED_FOLDER if scene_crop_by_stage1_transl else egobody.CUBE_FROM_GT_FOLDER
            self._setup_cubes(cube_root or os.path.join(dataset_root, folder))

        self.load_stage1_transl = load_stage1_transl
        if load_stage1_transl:
            self.stage1_transl_full = self._load_stage1_transl(stage1_result_path)

        self.Xmean = self.Xstd = None
        if get_diffuse_feature and split == 'train' and train:
            self.Xmean, self.Xstd = compute_body_rep_stats(self.global_orient_pv, self.body_pose)
            if body_rep_stats_dir:
                save_body_rep_stats(body_rep_stats_dir, self.Xmean, self.Xstd)

        # pelvis of the gender-specific SMPL, for re-deriving transl after augmentation (index = gender code)
        self.pelvis_regressors = None
        if self.do_augment:
            self.pelvis_regressors = [PelvisRegressor(create_smpl(data_dir, g)) for g in ('male', 'female')]

    # ------------------------------------------------------------------------------------------------------------
    # constructor helpers
    # ------------------------------------------------------------------------------------------------------------

    def _load_annotations(self, npz_path: str, add_scale: float) -> None:
        data = load_npz_checked(npz_path, egobody.NPZ_KEYS, what='EgoBody annotation npz',
                                        shapes=egobody.NPZ_SHAPES)
        self.npz_path = npz_path
        num_frames = len(data['imgname'])
        check_rows(data, npz_path, 'EgoBody annotation npz')
        check_finite(data, npz_path, 'EgoBody annotation npz', names=[str(n) for n in data['imgname']])
        joints = data['3d_joints_pv']
        if joints.ndim != 3 or joints.shape[1] < NUM_SMPL_JOINTS or joints.shape[2] != 3:
            raise DataError(f"EgoBody annotation npz '{npz_path}' key '3d_joints_pv' has shape "
                            f"{list(joints.shape)}, expected [N,J>=24,3]")
        self.num_frames_unspaced = num_frames
        keep = slice(None, None, self.spacing)
        self.imgname = [str(name) for name in data['imgname'][keep]]
        self.center = data['center'][keep].astype(np.float64)
        self.box_size = data['scale'][keep].astype(np.float64) * add_scale * 200.0
        self.keypoints_2d = data['valid_keypoints'][keep].astype(np.float64)
        self.joints_3d = joints[keep, :NUM_SMPL_JOINTS].astype(np.float64)
        self.body_pose = data['pose'][keep].astype(np.float64)
        self.betas = data['shape'][keep].astype(np.float64)
        self.global_orient_pv = data['global_orient_pv'][keep].astype(np.float64)
        self.transl_pv = data['transl_pv'][keep].astype(np.float64)
        self.gender = np.array([self._gender_index(g, name, npz_path)
                                for g, name in zip(data['gender'][keep], self.imgname)], dtype=np.int32)
        self.fx, self.fy = data['fx'][keep].astype(np.float64), data['fy'][keep].astype(np.float64)
        self.cx, self.cy = data['cx'][keep].astype(np.float64), data['cy'][keep].astype(np.float64)
        self.recordings = [egobody.parse_imgname(name)[0] for name in self.imgname]
        missing = [name for name in self.imgname if not os.path.isfile(os.path.join(self.dataset_root, name))]
        if missing:
            raise DataError(f"missing image '{os.path.join(self.dataset_root, missing[0])}' (frame of "
                            f"'{npz_path}'; {len(missing)} of {len(self.imgname)} images of the split are missing)")

    @staticmethod
    def _gender_index(code, imgname: str, npz_path: str) -> int:
        try:
            return gender_to_index(code)
        except ValueError as exc:
            raise DataError(f"EgoBody annotation npz '{npz_path}' key 'gender' of frame '{imgname}': {exc}") from None

    def _load_frame_transforms(self) -> None:
        pairs = [egobody.frame_transforms(self.dataset_root, name) for name in self.imgname]
        self.kinect2holo = np.stack([p[0] for p in pairs]) if pairs else np.zeros((0, 4, 4), np.float32)
        self.holo2pv = np.stack([p[1] for p in pairs]) if pairs else np.zeros((0, 4, 4), np.float32)

    def _load_whole_scene(self, s1_root: str) -> None:
        map_path = os.path.join(s1_root, f'map_dict_{self.split}.pkl')
        verts_path = os.path.join(s1_root, f'pcd_verts_dict_{self.split}.pkl')
        hint = 'run the stage-1 scene preprocessing or pass s1_root'
        map_dict = load_pickle(map_path, 'stage-1 scene map pickle', hint=hint)
        verts_dict = load_pickle(verts_path, 'stage-1 scene points pickle', hint=hint)
        self.scene_keys = []
        for name in self.imgname:
            key = egobody.frame_key(name)
            if key not in map_dict:
                raise DataError(f"stage-1 scene map pickle '{map_path}' has no key '{key}'")
            if map_dict[key] not in verts_dict:
                raise DataError(f"stage-1 scene points pickle '{verts_path}' has no key '{map_dict[key]}'")
            self.scene_keys.append(map_dict[key])
        self.scene_verts_kinect = verts_dict

    def _setup_cubes(self, cube_root: str) -> None:
        self.cube_root = cube_root
        if not os.path.isdir(cube_root):
            raise DataError(f"missing scene cube folder '{cube_root}' (run the stage-2 scene preprocessing "
                            f"or pass cube_root)")
        # scene -> Kinect calibration, read once per recording
        self.kinect2scene = {}
        for recording in sorted(set(self.recordings)):
            scene = egobody.scene_of(self.dataset_root, recording)
            self.kinect2scene[recording] = egobody.load_kinect_to_scene(self.dataset_root, recording, scene)

    def _load_stage1_transl(self, path: Optional[str]) -> np.ndarray:
        if not path:
            raise ValueError("load_stage1_transl=True needs stage1_result_path (the stage-1 results.pkl)")
        results = load_pickle(path, 'stage-1 results pickle')
        if not isinstance(results, dict) or 'pred_cam_full_list' not in results:
            raise DataError(f"stage-1 results pickle '{path}' has no key 'pred_cam_full_list'")
        transl = np.asarray(results['pred_cam_full_list'], dtype=np.float64)
        if transl.ndim != 2 or transl.shape[1] != 3:
            raise DataError(f"stage-1 results pickle '{path}' key 'pred_cam_full_list' has shape "
                            f"{list(transl.shape)}, expected [N,3]")
        check_finite({'pred_cam_full_list': transl}, path, 'stage-1 results pickle', names=None)
        if len(transl) != self.num_frames_unspaced:
            raise DataError(f"stage-1 results pickle '{path}' has {len(transl)} rows in 'pred_cam_full_list' but "
                            f"'{self.npz_path}' has {self.num_frames_unspaced} frames (stage 1 must be run on the "
                            f"same split, unshuffled, with spacing 1)")
        return transl[::self.spacing]

    # ------------------------------------------------------------------------------------------------------------
    # per item
    # ------------------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.imgname)

    def set_epoch(self, epoch: int) -> None:
        """Mix ``epoch`` into the seeded augmentation streams and restart the visit counts (module docstring)."""
        self.epoch = int(epoch)
        self._visits = {}

    def image_path(self, index: int) -> str:
        return os.path.join(self.dataset_root, self.imgname[index])

    def transforms(self, index: int):
        """(``T_kinect2holo``, ``T_holo2pv``) float32 4x4 of frame ``index``."""
        return self.kinect2holo[index], self.holo2pv[index]

    def scene_points_pv(self, index: int) -> np.ndarray:
        """Scene points ``[P, 3]`` float64 of frame ``index`` in the (un-augmented) PV OpenCV frame."""
        kinect2holo, holo2pv = self.transforms(index)
        if self.scene_type == 'whole_scene':
            points = np.asarray(self.scene_verts_kinect[self.scene_keys[index]], dtype=np.float64)
            return transform_points(points, egobody.kinect_to_pv(kinect2holo, holo2pv))
        recording, date, frame = egobody.parse_imgname(self.imgname[index])
        path = require_file(os.path.join(self.cube_root, self.split, recording, date, frame + '.npy'),
                            'scene cube crop')
        try:
            points = np.load(path).astype(np.float64)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"cannot read scene cube crop '{path}' (truncated or not an .npy file): {exc}") from exc
        if points.ndim != 2 or points.shape[1] != 3:
            raise DataError(f"scene cube crop '{path}' has shape {list(points.shape)}, expected [P,3]")
        return transform_points(points, egobody.scene_to_pv(self.kinect2scene[recording], kinect2holo, holo2pv))

    def item_rng(self, index: int) -> np.random.Generator:
        """The generator of the next augmentation draw for item ``index`` (advances its visit counter)."""
        if self.seed is None:
            return np.random.default_rng()
        visit = self._visits.get(index, 0)
        self._visits[index] = visit + 1
        return np.random.default_rng(np.random.SeedSequence([int(self.seed), self.epoch, int(index), visit]))

    def __getitem__(self, index: int) -> Dict:
        params = sample_aug_params(self.item_rng(index), self.aug_cfg) if self.do_augment else NO_AUGMENTATION
        return self.get_item(index, params)

    def get_item(self, index: int, params: AugParams = NO_AUGMENTATION) -> Dict:
        """Item ``index`` with the given augmentation (the keys of the original's ``__getitem__``, plus
        ``frame_index``: the frame's row in the split's annotation npz, which per-frame sampling streams use).

        ``transl`` is re-derived from the augmented pelvis whenever the dataset was built with ``do_augment``.
        """
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} frames")
        index = index % len(self)
        path = self.image_path(index)
        if os.path.isfile(path):
            check_jpeg_complete(path)
        image = cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if image is None:
            raise DataError(f"cannot read image '{path}' (missing or not an image)")

        gender = int(self.gender[index])
        smpl_params = {'global_orient': self.global_orient_pv[index], 'body_pose': self.body_pose[index],
                       'betas': self.betas[index], 'transl': self.transl_pv[index]}
        pelvis = self.pelvis_regressors[gender] if self.pelvis_regressors is not None else None
        out = augment_example(image, self.center[index], float(self.box_size[index]), self.keypoints_2d[index],
                              self.joints_3d[index], smpl_params, float(self.fx[index]), float(self.cx[index]),
                              float(self.cy[index]), self.scene_points_pv(index), params,
                              image_size=self.image_size, image_mean=self.image_mean, image_std=self.image_std,
                              pelvis_at_rest=pelvis)

        kinect2holo, holo2pv = self.transforms(index)
        item = {
            'img': out['img'],
            'imgname': path,
            'orig_img': 0,
            'keypoints_2d': out['keypoints_2d'],
            'orig_keypoints_2d': out['orig_keypoints_2d'],
            'keypoints_2d_vis_mask': out['keypoints_2d_vis_mask'],
            'keypoints_3d': out['keypoints_3d'],
            'keypoints_3d_full': out['keypoints_3d_full'],
            'smpl_params': out['smpl_params'],
            'has_smpl_params': dict(HAS_SMPL_PARAMS),
            'smpl_params_is_axis_angle': dict(SMPL_PARAMS_IS_AXIS_ANGLE),
            'gender': np.int32(gender),
            'fx': np.float32(self.fx[index] / self.fx_norm),
            'fy': np.float32(self.fy[index] / self.fy_norm),
            'cam_cx': out['cam_cx'],
            'cam_cy': np.float32(self.cy[index]),
            'box_center': out['box_center'],
            'box_size': out['box_size'],
            'transf_kinect2holo': kinect2holo.copy(),
            'transf_holo2pv': holo2pv.copy(),
            'scene_pcd_verts_full': np.ascontiguousarray(out['scene_points'][::self.scene_downsample_rate]),
            'frame_index': np.int64(index * self.spacing),     # the frame's row in the split's annotation npz
        }
        if self.load_stage1_transl:
            item['stage1_transl_full'] = self.stage1_transl_full[index].astype(np.float32)
        return item
