"""The saved-predictions format: every sample of every test frame, for viewers and plots.

``test_prohmr_scene.py`` and ``test_egohmr.py`` write ``predictions.npz`` beside their ``metrics.json``. One npz,
written atomically, N frames in test order, S samples per frame, all positions in metres in the frame's PV camera
(OpenCV axes: x right, y down, z forward):

===================  ======================  =================================================================
key                  shape / dtype           meaning
===================  ======================  =================================================================
``format``           str                     ``'egohmr-predictions-1'``
``stage``            str                     ``'prohmr_scene'`` (stage 1) or ``'egohmr'`` (stage 2)
``imgname``          [N] str                 the frame's image, relative to ``--dataset_root``
``frame_index``      [N] int64               the frame's row in the split's annotation npz (frames are sorted
                                             by it; shares of a split merge by it)
``transl``           [N, S, 3] float32       translation of each sample (stage 2: the model input, same for all S)
``global_orient``    [N, S, 3, 3] float32    SMPL global rotation of each sample
``body_pose``        [N, S, 23, 3, 3] f32    SMPL body joint rotations
``betas``            [N, S, 10] float32      SMPL shape
``joints``           [N, S, 24, 3] float32   SMPL joints of each sample, translation included
``vertices``         [N, S, V, 3] float16    SMPL vertices of each sample, translation included (mm precision)
``gt_joints``        [N, 24, 3] float32      ground-truth joints
``gt_vertices``      [N, V, 3] float16       ground-truth vertices
``vis_mask``         [N, 24] bool            GT joint projects inside the image (the evaluation's "visible")
``focal_px``         [N] float32             focal length in pixels (used for both axes, as the evaluation)
``cam_center``       [N, 2] float32          principal point in pixels
``image_size``       [2] int                 (width, height) of the full image
``transf_kinect2holo``, ``transf_holo2pv``   [N, 4, 4] float32: the frame chain (scene -> PV with the
                                             recording's ``kinect -> scene`` from the dataset;
                                             :func:`utils.egobody.scene_to_pv`)
``faces``            [F, 3] int32            SMPL triangles
===================  ======================  =================================================================

The SMPL vertices of the predictions use the model's neutral body; the GT ones its gendered body. Sample 0 of stage
1 is the flow's mode.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import numpy as np

from utils.io import DataError, atomic_np_savez

FORMAT = 'egohmr-predictions-1'
FILE_NAME = 'predictions.npz'
NUM_JOINTS = 24
PER_FRAME = {'frame_index': 0, 'transl': 2, 'global_orient': 3, 'body_pose': 4, 'betas': 2, 'joints': 3, 'vertices': 3,
             'gt_joints': 2, 'gt_vertices': 2, 'vis_mask': 1, 'focal_px': 0, 'cam_center': 1,
             'transf_kinect2holo': 2, 'transf_holo2pv': 2}    # key -> number of dimensions after N
DTYPES = {'vertices': np.float16, 'gt_vertices': np.float16, 'vis_mask': bool, 'frame_index': np.int64}


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if hasattr(x, 'detach') else np.asarray(x)


def in_image(points: np.ndarray, focal_px: np.ndarray, cam_center: np.ndarray, image_size) -> np.ndarray:
    """``[B, J, 3]`` camera-frame points -> ``[B, J]`` bool: projects inside ``image_size`` (focal for both axes)."""
    z = np.where(np.abs(points[..., 2]) < 1e-9, 1e-9, points[..., 2])
    u = points[..., 0] / z * focal_px[:, None] + cam_center[:, None, 0]
    v = points[..., 1] / z * focal_px[:, None] + cam_center[:, None, 1]
    return (u >= 0) & (u < image_size[0]) & (v >= 0) & (v < image_size[1])


def relative_imgname(path: str) -> str:
    """The dataset-relative ``egocentric_color/...`` part of an image path (the dataset hands out absolute ones)."""
    path = str(path).replace(os.sep, '/')
    at = path.rfind('egocentric_color/')
    return path[at:] if at >= 0 else path


class PredictionRecorder:
    """Collects batches of predictions in test order and writes them as one ``predictions.npz``."""

    def __init__(self, stage: str, faces: np.ndarray, image_size=(1920, 1080)):
        if stage not in ('prohmr_scene', 'egohmr'):
            raise ValueError(f"stage must be 'prohmr_scene' or 'egohmr', got {stage!r}")
        self.stage, self.faces, self.image_size = stage, np.asarray(faces, np.int32), tuple(int(v) for v in image_size)
        self.parts: Dict[str, list] = {k: [] for k in ('imgname',) + tuple(PER_FRAME)}

    @property
    def num_frames(self) -> int:
        return sum(len(v) for v in self.parts['imgname'])

    def add(self, batch: dict, rotmats_orient, rotmats_pose, betas, joints, vertices, transl, gt_joints,
            gt_vertices, focal_coeff: float) -> None:
        """One batch: sample tensors ``[B, S, ...]`` (joints/vertices with translation), GT ``[B, ...]``."""
        focal = _np(batch['fx']).reshape(-1) * float(focal_coeff)
        center = np.stack([_np(batch['cam_cx']).reshape(-1), _np(batch['cam_cy']).reshape(-1)], axis=-1)
        gt_j = _np(gt_joints)[:, :NUM_JOINTS]
        count = len(_np(betas))
        if 'frame_index' in batch:
            index = batch['frame_index']
            frames = np.asarray(index.cpu() if hasattr(index, 'cpu') else index, dtype=np.int64).reshape(-1)
        else:
            frames = np.arange(self.num_frames, self.num_frames + count)
        values = {'frame_index': frames, 'transl': _np(transl),
                  'global_orient': _np(rotmats_orient).reshape(*_np(betas).shape[:2], 3, 3),
                  'body_pose': _np(rotmats_pose), 'betas': _np(betas), 'joints': _np(joints)[:, :, :NUM_JOINTS],
                  'vertices': _np(vertices), 'gt_joints': gt_j, 'gt_vertices': _np(gt_vertices),
                  'vis_mask': in_image(gt_j, focal, center, self.image_size), 'focal_px': focal, 'cam_center': center,
                  'transf_kinect2holo': _np(batch['transf_kinect2holo']),
                  'transf_holo2pv': _np(batch['transf_holo2pv'])}
        for key, value in values.items():
            self.parts[key].append(value.astype(DTYPES.get(key, np.float32)))
        self.parts['imgname'].append(np.array([relative_imgname(n) for n in batch['imgname']]))

    def arrays(self) -> Dict[str, np.ndarray]:
        """Everything recorded, frames sorted by ``frame_index`` (the file's arrays, format keys included)."""
        if not self.num_frames:
            raise ValueError("no predictions recorded: nothing to save")
        per_frame = merge_prediction_arrays([{k: np.concatenate(v) for k, v in self.parts.items()}])
        return dict(per_frame, format=np.array(FORMAT), stage=np.array(self.stage), faces=self.faces,
                    image_size=np.array(self.image_size))

    def save(self, path: str) -> str:
        return save_prediction_arrays(self.arrays(), path)


def save_prediction_arrays(arrays: Dict[str, np.ndarray], path: str) -> str:
    """Write :meth:`PredictionRecorder.arrays` (or :func:`merge_prediction_arrays` of them) atomically."""
    atomic_np_savez(path, **arrays)
    return path


def merge_prediction_arrays(parts) -> Dict[str, np.ndarray]:
    """Several sets of prediction arrays (disjoint frames) as one, frames sorted by ``frame_index``; the
    per-file keys (format, stage, faces, image size) are taken from the first set."""
    parts = list(parts)
    frames = np.concatenate([p['frame_index'] for p in parts])
    if len(np.unique(frames)) != len(frames):
        raise ValueError("predictions: a frame appears in two of the sets being merged")
    order = np.argsort(frames, kind='stable')
    out = {k: np.concatenate([p[k] for p in parts])[order] for k in ('imgname',) + tuple(PER_FRAME)}
    out.update({k: v for k, v in parts[0].items() if k not in out})
    return out


def stage1_hook(recorder: PredictionRecorder, focal_coeff: float) -> Callable:
    """``on_batch(step, batch, output, pred, gt)`` of ``prohmr_scene.evaluate`` recording every flow sample."""
    def hook(step, batch, output, pred, gt):
        params = output['pred_smpl_params']
        transl = output['pred_cam_t_full']                                           # [B, S, 3]
        recorder.add(batch, params['global_orient'], params['body_pose'], params['betas'],
                     output['pred_keypoints_3d'][:, :, :NUM_JOINTS] + transl[:, :, None],
                     output['pred_vertices'] + transl[:, :, None], transl, gt['joints'], gt['vertices'], focal_coeff)
    return hook


def stage2_hook(recorder: PredictionRecorder, focal_coeff: float) -> Callable:
    """``on_batch(step, batch, samples, gt)`` of ``egohmr.evaluate`` recording every diffusion sample."""
    def hook(step, batch, samples, gt):
        transl = batch['smpl_params']['transl'][:, None].expand(-1, samples['betas'].shape[1], -1)
        recorder.add(batch, samples['global_orient'], samples['body_pose'], samples['betas'],
                     samples['joints'][:, :, :NUM_JOINTS] + transl[:, :, None],
                     samples['vertices'] + transl[:, :, None], transl, gt['joints'], gt['vertices'], focal_coeff)
    return hook


def chain_hooks(*hooks: Optional[Callable]) -> Optional[Callable]:
    """One ``on_batch`` calling every non-None hook in order; ``close()`` closes those that have it."""
    hooks = [h for h in hooks if h is not None]
    if not hooks:
        return None

    def hook(*args):
        for h in hooks:
            h(*args)

    def close():
        for h in hooks:
            if hasattr(h, 'close'):
                h.close()
    hook.close = close
    return hook


def load_predictions(path: str) -> Dict[str, np.ndarray]:
    """Read and check a ``predictions.npz``; one-line :class:`DataError` naming the file on any problem."""
    if os.path.isdir(path):
        path = os.path.join(path, FILE_NAME)
    if not os.path.isfile(path):
        raise DataError(f"--results: no predictions file '{path}' (written by test_egohmr.py / test_prohmr_scene.py "
                        f"as {FILE_NAME} beside metrics.json)")
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"'{path}' is not a readable npz file ({exc})") from None
    if str(out.get('format', '')) != FORMAT:
        raise DataError(f"'{path}': expected a predictions file of format '{FORMAT}', got {out.get('format')!r}")
    missing = [k for k in ('imgname', 'faces', 'image_size') + tuple(PER_FRAME) if k not in out]
    if missing:
        raise DataError(f"'{path}': missing keys {missing}")
    n = len(out['imgname'])
    s = out['joints'].shape[1] if out['joints'].ndim == 4 else -1
    for key, dims in PER_FRAME.items():
        if out[key].shape[:1] != (n,) or out[key].ndim != dims + 1:
            raise DataError(f"'{path}': key '{key}' has shape {list(out[key].shape)}, expected {n} frames and "
                            f"{dims} more dimensions")
    for key in ('transl', 'global_orient', 'body_pose', 'betas', 'vertices'):
        if out[key].shape[1] != s:
            raise DataError(f"'{path}': key '{key}' has {out[key].shape[1]} samples, 'joints' has {s}")
    return out


def write_predictions(recorder, out_dir: str, title: str = '', log=print) -> str:
    """Write ``<out_dir>/predictions.npz`` and, where matplotlib is installed, ``per_joint_errors.png``;
    ``recorder``: a :class:`PredictionRecorder` or its (merged) arrays."""
    from utils.plots import write_per_joint_plot
    arrays = recorder.arrays() if isinstance(recorder, PredictionRecorder) else recorder
    path = save_prediction_arrays(arrays, os.path.join(out_dir, FILE_NAME))
    log(f"per-frame predictions ({len(arrays['imgname'])} frames, all samples) written to {path}")
    write_per_joint_plot(load_predictions(path), out_dir, title, log)
    return path
