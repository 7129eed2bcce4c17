"""Image crop and train-time augmentation of one EgoBody example, as in the original ``DatasetEgobody``.

One augmentation is described by :class:`AugParams` (box scale, in-plane rotation, horizontal flip, colour gains,
box shift). :func:`sample_aug_params` draws it from a single ``np.random.Generator``; :func:`augment_example`
applies it consistently to the image crop, the 2D keypoints (crop and full image), the 3D joints, the scene points
and the SMPL parameters.

Conventions
-----------
* Image coordinates: x right, y down, pixels. ``rot`` is in degrees; the crop keeps the cv2 conventions of
  the original (``cv2.getAffineTransform`` on a box rotated by ``rot``; ``cv2.getRotationMatrix2D(.., rot, 1)``).
* 3D: the PV camera frame with OpenCV axes (x right, y down, z forward); points are rows.
* The image-space rotation by ``rot`` corresponds to the 3D rotation ``R_z(-rot)`` about an axis parallel to the
  camera z axis; flipping is the reflection ``x -> -x`` (plus left/right joint swaps).

Numbers kept from the original on purpose (parity, though odd): the vertical crop-camera offset divides by ``fx``
(not ``fy``), the flipped principal point is ``W - cx`` (no ``-1``; ``W`` = 1920 on EgoBody), the crop-camera
depth is ``s_aug * B / 224 * tz``, and keypoint confidences are never zeroed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import cv2
import numpy as np

from utils.body_model import BODY25_FLIP_PERM, SMPL_FLIP_PERM, SMPL_POSE_FLIP_PERM


@dataclass(frozen=True)
class AugParams:
    """One draw of the augmentation; the defaults are the identity (no augmentation)."""
    scale: float = 1.0                      # box side multiplier s_aug
    rot: float = 0.0                        # in-plane rotation, degrees
    flip: bool = False                      # horizontal flip
    color_scale: Tuple[float, float, float] = (1.0, 1.0, 1.0)  # per RGB channel gain
    tx: float = 0.0                         # box centre shift, fraction of the box side
    ty: float = 0.0


NO_AUGMENTATION = AugParams()


def sample_aug_params(rng: np.random.Generator, aug_cfg) -> AugParams:
    """Draw :class:`AugParams` from ``rng`` with the ``DATASETS.CONFIG`` factors, sampled as the original does.

    Every call consumes the same number of random values whatever the outcome, so a seeded stream stays aligned.
    """
    tx = float(np.clip(rng.standard_normal(), -1.0, 1.0)) * aug_cfg.TRANS_FACTOR
    ty = float(np.clip(rng.standard_normal(), -1.0, 1.0)) * aug_cfg.TRANS_FACTOR
    scale = 1.0 + float(np.clip(rng.standard_normal(), -1.0, 1.0)) * aug_cfg.SCALE_FACTOR
    rot_gate, rot_value = rng.random(), float(np.clip(rng.standard_normal(), -2.0, 2.0)) * aug_cfg.ROT_FACTOR
    rot = rot_value if rot_gate <= aug_cfg.ROT_AUG_RATE else 0.0
    flip_gate = rng.random()
    flip = bool(aug_cfg.DO_FLIP) and flip_gate <= aug_cfg.FLIP_AUG_RATE
    low, high = 1.0 - aug_cfg.COLOR_SCALE, 1.0 + aug_cfg.COLOR_SCALE
    color_scale = tuple(float(c) for c in rng.uniform(low, high, size=3))
    return AugParams(scale=scale, rot=rot, flip=flip, color_scale=color_scale, tx=tx, ty=ty)


# ----------------------------------------------------------------------------------------------------------------
# 2D: image crop, flips, affine maps
# ----------------------------------------------------------------------------------------------------------------

def rotation_2d(rot_deg: float) -> np.ndarray:
    """2x2 matrix rotating image vectors (x right, y down) by ``rot_deg`` degrees."""
    rad = np.deg2rad(rot_deg)
    c, s = np.cos(rad), np.sin(rad)
    return np.array([[c, -s], [s, c]])


def crop_affine(center: Sequence[float], box_size: float, out_size: int, scale: float = 1.0,
                rot: float = 0.0) -> np.ndarray:
    """2x3 affine map from full-image pixels to a square ``out_size`` patch.

    The source is the square of side ``box_size * scale`` centred at ``center`` and rotated by ``rot`` degrees;
    its centre, bottom-edge midpoint and right-edge midpoint go to the corresponding points of the patch.
    """
    center = np.asarray(center, dtype=np.float64)
    half = 0.5 * box_size * scale
    rotation = rotation_2d(rot)
    src = np.stack([center, center + rotation @ [0.0, half], center + rotation @ [half, 0.0]])
    mid = 0.5 * out_size
    dst = np.array([[mid, mid], [mid, 2 * mid], [2 * mid, mid]])
    return cv2.getAffineTransform(src.astype(np.float32), dst.astype(np.float32))


def full_image_rotation(center: Sequence[float], rot: float) -> np.ndarray:
    """2x3 rotation of the full image by ``rot`` degrees about ``center`` (no scaling), cv2 convention."""
    return cv2.getRotationMatrix2D((float(center[0]), float(center[1])), float(rot), 1.0)


def apply_affine(points_xy: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Map ``[N, 2]`` pixel positions through a 2x3 affine matrix."""
    affine = np.asarray(affine, dtype=np.float64)
    return np.asarray(points_xy, dtype=np.float64) @ affine[:, :2].T + affine[:, 2]


def flip_image(image: np.ndarray) -> np.ndarray:
    """Mirror an ``[H, W, C]`` image left-right (contiguous copy)."""
    return np.ascontiguousarray(image[:, ::-1])


def flip_keypoints_2d(keypoints: np.ndarray, width: float,
                      permutation: Sequence[int] = BODY25_FLIP_PERM) -> np.ndarray:
    """Mirror ``[J, 2+]`` pixel keypoints (``x -> width - x - 1``) and swap left/right joints."""
    flipped = np.array(keypoints, dtype=np.float64, copy=True)
    flipped[:, 0] = width - flipped[:, 0] - 1
    return flipped[list(permutation)]


def warp_patch(image: np.ndarray, affine: np.ndarray, out_size: int) -> np.ndarray:
    """Bilinear ``cv2.warpAffine`` to ``out_size x out_size``; outside the image is filled with zeros."""
    return cv2.warpAffine(image, np.asarray(affine, dtype=np.float64), (int(out_size), int(out_size)),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def normalize_patch(patch_bgr: np.ndarray, color_scale: Sequence[float], mean: Sequence[float],
                    std: Sequence[float]) -> np.ndarray:
    """BGR ``[H, W, 3]`` patch -> normalised RGB ``[3, H, W]`` float32.

    Per channel: multiply by the colour gain, clip to [0, 255], then ``(x - 255 mean) / (255 std)`` with ``mean``
    and ``std`` given on the [0, 1] scale (``MODEL.IMAGE_MEAN/STD``).
    """
    rgb = patch_bgr[:, :, ::-1].transpose(2, 0, 1).astype(np.float32)
    gains = np.asarray(color_scale, dtype=np.float32)[:, None, None]
    mean255 = 255.0 * np.asarray(mean, dtype=np.float32)[:, None, None]
    std255 = 255.0 * np.asarray(std, dtype=np.float32)[:, None, None]
    return ((np.clip(rgb * gains, 0.0, 255.0) - mean255) / std255).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# 3D: SMPL parameters, joints and scene points
# ----------------------------------------------------------------------------------------------------------------

def flip_smpl_pose(global_orient: np.ndarray, body_pose: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mirror axis-angle SMPL pose: swap left/right body joints, negate the y and z of every axis-angle."""
    global_orient = np.array(global_orient, dtype=np.float64, copy=True)
    body_pose = np.array(body_pose, dtype=np.float64, copy=True)[SMPL_POSE_FLIP_PERM]
    for aa in (global_orient, body_pose):
        aa[1::3] *= -1
        aa[2::3] *= -1
    return global_orient, body_pose


def in_plane_rotation_3d(rot: float) -> np.ndarray:
    """``R_z(-rot)``: the camera-frame rotation matching an image rotation by ``rot`` degrees."""
    rotation = np.eye(3)
    rotation[:2, :2] = rotation_2d(-rot)
    return rotation


def rotate_global_orient(global_orient: np.ndarray, rot: float) -> np.ndarray:
    """Axis-angle global orientation pre-multiplied by ``R_z(-rot)`` (Rodrigues both ways)."""
    rotmat, _ = cv2.Rodrigues(np.asarray(global_orient, dtype=np.float64).reshape(3, 1))
    aa, _ = cv2.Rodrigues(in_plane_rotation_3d(rot) @ rotmat)
    return aa.reshape(3)


def crop_camera_translation(transl: np.ndarray, box_center: Sequence[float], cam_center: Sequence[float],
                            fx: float, box_size: float, out_size: int) -> np.ndarray:
    """SMPL translation expressed in the intermediate "crop camera" (the original's 3D augmentation works in it).

    ``delta = (box_center - cam_center) * tz / fx`` (``fx`` for both axes, as the original), depth
    ``box_size / out_size * tz`` where ``box_size`` already includes the scale augmentation.
    """
    transl = np.asarray(transl, dtype=np.float64)
    tz = transl[2]
    delta = (np.asarray(box_center, dtype=np.float64) - np.asarray(cam_center, dtype=np.float64)) * tz / fx
    return np.array([transl[0] - delta[0], transl[1] - delta[1], box_size / out_size * tz])


def augment_points_3d(points: np.ndarray, transl_full: np.ndarray, transl_crop: np.ndarray, rot: float,
                      flip: bool, flip_permutation: Optional[Sequence[int]] = None
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """Flip/rotate ``[N, 3]`` PV-frame points through the crop camera.

    The points are moved into the crop camera (``p - transl_full + transl_crop``), mirrored in x (and reordered by
    ``flip_permutation``) when flipping, rotated by ``R_z(-rot)``, and moved back with the x-mirrored translations.
    Net effect in the PV frame: optional ``x -> -x``, then a rotation by ``-rot`` about the camera-z-parallel axis
    through the (mirrored) crop offset; z is unchanged. Returns ``(points_crop_frame, points_pv_frame)``.
    """
    transl_full = np.asarray(transl_full, dtype=np.float64)
    transl_crop = np.asarray(transl_crop, dtype=np.float64)
    crop = np.asarray(points, dtype=np.float64) - transl_full + transl_crop
    mirror = np.array([-1.0, 1.0, 1.0]) if flip else np.ones(3)
    if flip:
        crop = crop * mirror
        if flip_permutation is not None:
            crop = crop[list(flip_permutation)]
    crop = crop @ in_plane_rotation_3d(rot).T
    full = crop - transl_crop * mirror + transl_full * mirror
    return crop, full


# ----------------------------------------------------------------------------------------------------------------
# The whole example
# ----------------------------------------------------------------------------------------------------------------

def augment_example(image_bgr: np.ndarray, center: Sequence[float], box_size: float, keypoints_2d: np.ndarray,
                    joints_3d: np.ndarray, smpl_params: Dict[str, np.ndarray], fx: float, cam_cx: float,
                    cam_cy: float, scene_points: np.ndarray, params: AugParams = NO_AUGMENTATION, *,
                    image_size: int = 224, image_mean: Sequence[float] = (0.485, 0.456, 0.406),
                    image_std: Sequence[float] = (0.229, 0.224, 0.225),
                    pelvis_at_rest: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> Dict:
    """Crop and augment one example as the original dataset does.

    Args:
        image_bgr: full image ``[H, W, 3]`` uint8 as read by cv2.
        center, box_size: box centre (pixels) and side ``B`` (pixels, before the scale augmentation).
        keypoints_2d: ``[25, 3]`` BODY_25 (x, y, confidence) in full-image pixels.
        joints_3d: ``[24, 3]`` SMPL joints in the PV frame.
        smpl_params: ``global_orient [3]``, ``body_pose [69]``, ``betas [10]``, ``transl [3]`` (PV frame).
        fx, cam_cx, cam_cy: PV intrinsics in pixels.
        scene_points: ``[P, 3]`` in the PV frame.
        params: the augmentation draw (identity by default).
        pelvis_at_rest: ``betas -> [3]`` pelvis of the gender's SMPL with zero translation. When given, ``transl``
            is re-derived as ``joints_3d_full_aug[0] - pelvis_at_rest(betas)`` (the dataset passes it whenever it
            augments, even if no flip/rotation was drawn).

    Returns a dict with ``img [3,S,S]``, ``keypoints_2d [25,3]`` (crop, normalised to about [-0.5, 0.5]),
    ``keypoints_2d_vis_mask [25]``, ``orig_keypoints_2d [25,3]`` (full image normalised), ``keypoints_3d [24,3]``
    (crop frame), ``keypoints_3d_full [24,3]``, ``scene_points [P,3]``, ``smpl_params`` (float32), ``box_center [2]``,
    ``box_size``, ``cam_cx`` and the 2x3 maps ``crop_affine`` (augmented full image -> patch pixels) and
    ``image_rotation`` (flipped full image -> rotated full image).
    """
    img_height, img_width = image_bgr.shape[:2]
    center_x = float(center[0]) + box_size * params.tx
    center_y = float(center[1]) + box_size * params.ty
    box_size_aug = box_size * params.scale

    # image: mirror the whole frame first, then crop the rotated, scaled box around the mirrored centre
    image = flip_image(image_bgr) if params.flip else image_bgr
    center_x_aug = img_width - center_x - 1 if params.flip else center_x
    affine = crop_affine((center_x_aug, center_y), box_size, image_size, params.scale, params.rot)
    patch = warp_patch(image, affine, image_size)
    img = normalize_patch(patch, params.color_scale, image_mean, image_std)

    # 2D keypoints: crop (normalised by the patch size) and full image (rotated about the box centre)
    keypoints = np.asarray(keypoints_2d, dtype=np.float64)
    if params.flip:
        keypoints = flip_keypoints_2d(keypoints, img_width)
    crop_xy = apply_affine(keypoints[:, :2], affine)
    inside = np.all((crop_xy >= 0) & (crop_xy <= image_size), axis=1)
    vis_mask = (keypoints[:, 2] > 0) & inside
    keypoints_crop = np.concatenate([crop_xy / image_size - 0.5, keypoints[:, 2:3]], axis=1)
    rotation_full = full_image_rotation((center_x_aug, center_y), params.rot)
    full_xy = apply_affine(keypoints[:, :2], rotation_full) / [img_width, img_height] - 0.5
    keypoints_full = np.concatenate([full_xy, keypoints[:, 2:3]], axis=1)

    # SMPL pose
    global_orient = np.asarray(smpl_params['global_orient'], dtype=np.float64)
    body_pose = np.asarray(smpl_params['body_pose'], dtype=np.float64)
    if params.flip:
        global_orient, body_pose = flip_smpl_pose(global_orient, body_pose)
    global_orient = rotate_global_orient(global_orient, params.rot)

    # 3D joints and scene points through the crop camera (pre-flip box centre and principal point)
    transl = np.asarray(smpl_params['transl'], dtype=np.float64)
    transl_crop = crop_camera_translation(transl, (center_x, center_y), (cam_cx, cam_cy), fx, box_size_aug,
                                          image_size)
    joints_crop, joints_full = augment_points_3d(joints_3d, transl, transl_crop, params.rot, params.flip,
                                                 SMPL_FLIP_PERM)
    _, scene_full = augment_points_3d(scene_points, transl, transl_crop, params.rot, params.flip)

    betas = np.asarray(smpl_params['betas'], dtype=np.float64)
    if pelvis_at_rest is not None:
        transl = joints_full[0] - np.asarray(pelvis_at_rest(betas), dtype=np.float64)

    return {
        'img': img,
        'keypoints_2d': keypoints_crop.astype(np.float32),
        'keypoints_2d_vis_mask': vis_mask,
        'orig_keypoints_2d': keypoints_full.astype(np.float32),
        'keypoints_3d': joints_crop.astype(np.float32),
        'keypoints_3d_full': joints_full.astype(np.float32),
        'scene_points': scene_full.astype(np.float32),
        'smpl_params': {'global_orient': global_orient.astype(np.float32),
                        'body_pose': body_pose.astype(np.float32),
                        'betas': betas.astype(np.float32),
                        'transl': transl.astype(np.float32)},
        'box_center': np.array([center_x_aug, center_y], dtype=np.float32),
        'box_size': np.float32(box_size_aug),
        'cam_cx': np.float32(img_width - cam_cx if params.flip else cam_cx),
        'crop_affine': affine,
        'image_rotation': rotation_full,
    }
