"""Tests for dataloaders/augmentation.py: sampling, 2D maps, flips, 3D transforms, whole-example consistency."""
import cv2
import numpy as np
import pytest

from configs import default_config
from dataloaders.augmentation import (NO_AUGMENTATION, AugParams, apply_affine, augment_example,
                                      augment_points_3d, crop_affine, crop_camera_translation, flip_image,
                                      flip_keypoints_2d, flip_smpl_pose, full_image_rotation, in_plane_rotation_3d,
                                      normalize_patch, rotate_global_orient, sample_aug_params, warp_patch)
from utils.body_model import BODY25_FLIP_PERM, SMPL_FLIP_PERM, SMPL_TO_OPENPOSE

AUG_CFG = default_config().DATASETS.CONFIG
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def aa_to_matrix(aa):
    return cv2.Rodrigues(np.asarray(aa, dtype=np.float64).reshape(3, 1))[0]


# --------------------------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------------------------

def test_sample_aug_params_ranges_rates_and_determinism():
    rng = np.random.default_rng(0)
    draws = [sample_aug_params(rng, AUG_CFG) for _ in range(4000)]
    scales = np.array([d.scale for d in draws])
    rots = np.array([d.rot for d in draws])
    shifts = np.array([[d.tx, d.ty] for d in draws])
    colors = np.array([d.color_scale for d in draws])
    assert scales.min() >= 0.7 - 1e-12 and scales.max() <= 1.3 + 1e-12
    assert np.abs(rots).max() <= 60 + 1e-9 and np.abs(shifts).max() <= 0.02 + 1e-12
    assert colors.min() >= 0.8 and colors.max() <= 1.2 and colors.std() > 0.05
    # clipping at +-1 sigma puts ~16% of the scale draws on each bound
    assert 0.12 < np.mean(scales > 1.3 - 1e-9) < 0.2
    assert abs(np.mean(rots != 0) - 0.6) < 0.04
    assert abs(np.mean([d.flip for d in draws]) - 0.5) < 0.04
    assert sample_aug_params(np.random.default_rng(0), AUG_CFG) == draws[0]
    assert sample_aug_params(np.random.default_rng(1), AUG_CFG) != draws[0]


def test_sample_aug_params_respects_do_flip():
    cfg = default_config()
    cfg.DATASETS.CONFIG.DO_FLIP = False
    rng = np.random.default_rng(3)
    assert not any(sample_aug_params(rng, cfg.DATASETS.CONFIG).flip for _ in range(200))


# --------------------------------------------------------------------------------------------------------------
# 2D maps and the image crop
# --------------------------------------------------------------------------------------------------------------

def test_crop_affine_maps_box_to_patch():
    center, box = (300.0, 200.0), 150.0
    affine = crop_affine(center, box, 224, scale=1.2, rot=0.0)
    half = 0.5 * box * 1.2
    src = np.array([center, [center[0] - half, center[1] - half], [center[0] + half, center[1] + half]])
    np.testing.assert_allclose(apply_affine(src, affine), [[112, 112], [0, 0], [224, 224]], atol=1e-3)


@pytest.mark.parametrize('rot', [-50.0, 17.0, 60.0])
def test_crop_affine_is_full_image_rotation_then_scaling(rot):
    """Crop = rotate the full image about the box centre (cv2.getRotationMatrix2D), then scale into the patch."""
    center, box, scale = np.array([500.0, 300.0]), 200.0, 0.9
    points = np.random.default_rng(0).uniform(0, 800, size=(20, 2))
    crop = apply_affine(points, crop_affine(center, box, 224, scale, rot))
    rotated = apply_affine(points, full_image_rotation(center, rot))
    np.testing.assert_allclose(crop, (rotated - center) * 224 / (box * scale) + 112, atol=1e-3)
    # a point straight right of the centre ends up above it in the patch for a positive angle (counter-clockwise)
    right = apply_affine(center[None] + [[50.0, 0.0]], crop_affine(center, box, 224, scale, 30.0))[0]
    assert right[0] > 112 and right[1] < 112


def test_warp_patch_copies_pixels_and_pads_with_zeros():
    image = np.random.default_rng(0).integers(1, 256, size=(120, 160, 3), dtype=np.uint8)
    patch = warp_patch(image, crop_affine((80.0, 60.0), 32.0, 32), 32)   # 1:1 crop, integer offsets
    np.testing.assert_array_equal(patch, image[44:76, 64:96])
    corner = warp_patch(image, crop_affine((2.0, 3.0), 40.0, 40), 40)    # box mostly outside the image
    assert corner.shape == (40, 40, 3)
    # patch pixel (r, c) samples image pixel (r - 17, c - 18)
    assert not corner[:17].any() and not corner[:, :18].any()
    np.testing.assert_array_equal(corner[17:, 18:], image[:23, :22])
    far = warp_patch(image, crop_affine((-500.0, -500.0), 50.0, 224), 224)
    assert far.shape == (224, 224, 3) and not far.any()


def test_normalize_patch_channel_order_gain_and_clip():
    patch = np.zeros((2, 2, 3), dtype=np.uint8)
    patch[..., 0], patch[..., 1], patch[..., 2] = 10, 100, 250          # B, G, R
    out = normalize_patch(patch, (1.0, 1.1, 1.2), MEAN, STD)
    assert out.shape == (3, 2, 2) and out.dtype == np.float32
    expected = [(250 * 1.0 - 255 * MEAN[0]) / (255 * STD[0]),              # R (stored last) comes first
                (min(100 * 1.1, 255) - 255 * MEAN[1]) / (255 * STD[1]),
                (min(10 * 1.2, 255) - 255 * MEAN[2]) / (255 * STD[2])]
    np.testing.assert_allclose(out[:, 0, 0], expected, rtol=1e-6)
    clipped = normalize_patch(patch, (1.2, 1.0, 1.0), MEAN, STD)[0, 0, 0]   # 250 * 1.2 is clipped to 255
    assert clipped == pytest.approx((255 - 255 * MEAN[0]) / (255 * STD[0]), rel=1e-6)


# --------------------------------------------------------------------------------------------------------------
# flips
# --------------------------------------------------------------------------------------------------------------

def test_flips_applied_twice_are_identity():
    rng = np.random.default_rng(1)
    keypoints = np.concatenate([rng.uniform(0, 640, (25, 2)), rng.uniform(0, 1, (25, 1))], axis=1)
    np.testing.assert_allclose(flip_keypoints_2d(flip_keypoints_2d(keypoints, 640), 640), keypoints)
    once = flip_keypoints_2d(keypoints, 640)
    np.testing.assert_allclose(once[:, 0], 639 - keypoints[BODY25_FLIP_PERM, 0])
    np.testing.assert_allclose(once[:, 2], keypoints[BODY25_FLIP_PERM, 2])

    global_orient, body_pose = rng.normal(size=3), rng.normal(size=69)
    flipped = flip_smpl_pose(global_orient, body_pose)
    np.testing.assert_allclose(flipped[0], global_orient * [1, -1, -1])
    # left hip (joint 1, dims 0-2) takes the mirrored right hip (joint 2, dims 3-5)
    np.testing.assert_allclose(flipped[1][0:3], body_pose[3:6] * [1, -1, -1])
    back = flip_smpl_pose(*flipped)
    np.testing.assert_allclose(back[0], global_orient)
    np.testing.assert_allclose(back[1], body_pose)

    image = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(flip_image(image)[:, 0], image[:, -1])
    np.testing.assert_array_equal(flip_image(flip_image(image)), image)

    points = rng.normal(size=(24, 3)) + [0, 0, 3]
    t_full, t_crop = np.array([0.1, 0.2, 3.0]), np.array([0.3, -0.1, 2.0])
    _, mirrored = augment_points_3d(points, t_full, t_crop, 0.0, True, SMPL_FLIP_PERM)
    np.testing.assert_allclose(mirrored, (points * [-1, 1, 1])[SMPL_FLIP_PERM], atol=1e-12)
    _, twice = augment_points_3d(mirrored, t_full, t_crop, 0.0, True, SMPL_FLIP_PERM)
    np.testing.assert_allclose(twice, points, atol=1e-12)


def test_flipped_pose_mirrors_rotation_matrices():
    """Negating y and z of an axis-angle conjugates its matrix by the x-reflection: R' = F R F."""
    aa = np.array([0.3, -1.1, 0.7])
    mirror = np.diag([-1.0, 1.0, 1.0])
    flipped, _ = flip_smpl_pose(aa, np.zeros(69))
    np.testing.assert_allclose(aa_to_matrix(flipped), mirror @ aa_to_matrix(aa) @ mirror, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# 3D transforms
# --------------------------------------------------------------------------------------------------------------

def test_rotate_global_orient_premultiplies_rz():
    aa = np.array([2.9, 0.2, -0.4])
    out = rotate_global_orient(aa, 35.0)
    c, s = np.cos(np.deg2rad(-35.0)), np.sin(np.deg2rad(-35.0))
    rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    np.testing.assert_allclose(aa_to_matrix(out), rz @ aa_to_matrix(aa), atol=1e-10)
    np.testing.assert_allclose(in_plane_rotation_3d(35.0), rz, atol=1e-15)
    np.testing.assert_allclose(rotate_global_orient(aa, 0.0), aa, atol=1e-10)


@pytest.mark.parametrize('flip', [False, True])
def test_augment_points_3d_net_effect(flip):
    """PV-frame effect: optional x -> -x, then rotation by -rot about the z-parallel axis through (+-dx, dy)."""
    rng = np.random.default_rng(2)
    points = rng.normal(size=(50, 3)) + [0, 0, 4]
    t_full = np.array([0.2, -0.1, 3.0])
    t_crop = crop_camera_translation(t_full, (1100.0, 400.0), (950.0, 530.0), 1400.0, 300.0, 224)
    delta = t_full[:2] - t_crop[:2]
    np.testing.assert_allclose(delta, np.array([150.0, -130.0]) * 3.0 / 1400.0)
    assert t_crop[2] == pytest.approx(300.0 / 224 * 3.0)
    crop, full = augment_points_3d(points, t_full, t_crop, 40.0, flip)
    mirror = np.array([-1.0, 1.0, 1.0]) if flip else np.ones(3)
    pivot = np.array([delta[0], delta[1], 0.0]) * mirror
    expected = ((points * mirror) - pivot) @ in_plane_rotation_3d(40.0).T + pivot
    np.testing.assert_allclose(full, expected, atol=1e-12)
    np.testing.assert_allclose(full[:, 2], points[:, 2], atol=1e-12)
    np.testing.assert_allclose(full - crop, np.tile((t_full - t_crop) * mirror, (50, 1)), atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# the whole example
# --------------------------------------------------------------------------------------------------------------

W, H, FX, CX, CY = 640, 480, 500.0, 320.3, 241.0


# (BODY_25 index, SMPL joint) pairs of the joints both skeletons share
SHARED = [(b, j) for b, j in enumerate(SMPL_TO_OPENPOSE) if j < 24]
BODY25_IDX, SMPL_IDX = [b for b, _ in SHARED], [j for _, j in SHARED]


def planar_example(rng):
    """Joints on the plane z = tz (there the crop-camera rotation is exact) and their projections as keypoints."""
    transl = np.array([rng.uniform(-0.4, 0.4), rng.uniform(-0.3, 0.3), 3.0])
    joints = np.concatenate([rng.uniform(-0.4, 0.4, (24, 2)) + transl[:2], np.full((24, 1), transl[2])], axis=1)
    uv = joints[:, :2] / joints[:, 2:] * FX + [CX, CY]
    keypoints = np.ones((25, 3))
    keypoints[:, :2] = uv.mean(axis=0)
    keypoints[BODY25_IDX, :2] = uv[SMPL_IDX]
    image = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    smpl_params = {'global_orient': rng.normal(size=3), 'body_pose': rng.normal(size=69) * 0.2,
                   'betas': rng.normal(size=10), 'transl': transl}
    return image, uv.mean(axis=0), joints, keypoints, smpl_params


@pytest.mark.parametrize('seed', range(6))
def test_augmented_joints_reproject_onto_augmented_keypoints(seed):
    rng = np.random.default_rng(seed)
    image, center, joints, keypoints, smpl_params = planar_example(rng)
    params = sample_aug_params(rng, AUG_CFG)
    params = AugParams(params.scale, rot=[0.0, 25.0, -48.0][seed % 3], flip=seed % 2 == 1,
                       color_scale=params.color_scale, tx=params.tx, ty=params.ty)
    box = 300.0
    out = augment_example(image, center, box, keypoints, joints, smpl_params, FX, CX, CY, joints[:5], params,
                          image_size=224, image_mean=MEAN, image_std=STD)
    full = out['keypoints_3d_full'].astype(np.float64)
    uv = full[:, :2] / full[:, 2:] * FX + [float(out['cam_cx']), CY]
    crop_px = (uv - out['box_center']) * 224 / out['box_size'] + 112
    kp_crop_px = (out['keypoints_2d'][BODY25_IDX, :2].astype(np.float64) + 0.5) * 224
    # flipping uses W - x - 1 for pixels but W - cx for the principal point: a 1 px full-image offset
    tol = 224 / float(out['box_size']) + 1e-3 if params.flip else 1e-3
    np.testing.assert_allclose(crop_px[SMPL_IDX], kp_crop_px, atol=tol)
    kp_full_px = (out['orig_keypoints_2d'][BODY25_IDX, :2].astype(np.float64) + 0.5) * [W, H]
    np.testing.assert_allclose(uv[SMPL_IDX], kp_full_px, atol=(1.0 if params.flip else 0.0) + 1e-3)
    assert out['box_size'] == pytest.approx(box * params.scale)
    assert out['cam_cx'] == pytest.approx(W - CX if params.flip else CX)
    # scene points move like the joints but are not reordered by the left/right swap
    expected_scene = full[SMPL_FLIP_PERM][:5] if params.flip else full[:5]
    np.testing.assert_allclose(out['scene_points'], expected_scene, atol=1e-5)


def test_identity_augmentation_keeps_everything():
    rng = np.random.default_rng(7)
    image, center, joints, keypoints, smpl_params = planar_example(rng)
    scene = rng.normal(size=(30, 3)) + [0, 0, 3]
    out = augment_example(image, center, 200.0, keypoints, joints, smpl_params, FX, CX, CY, scene,
                          NO_AUGMENTATION, image_size=224, image_mean=MEAN, image_std=STD)
    np.testing.assert_allclose(out['keypoints_3d_full'], joints, atol=1e-5)
    np.testing.assert_allclose(out['scene_points'], scene, atol=1e-5)
    for key in ('global_orient', 'body_pose', 'betas', 'transl'):
        np.testing.assert_allclose(out['smpl_params'][key], smpl_params[key], atol=1e-6)
        assert out['smpl_params'][key].dtype == np.float32
    np.testing.assert_allclose(out['box_center'], center, rtol=1e-6)
    expected_img = normalize_patch(warp_patch(image, crop_affine(center, 200.0, 224), 224), (1, 1, 1), MEAN, STD)
    np.testing.assert_array_equal(out['img'], expected_img)
    np.testing.assert_allclose(out['orig_keypoints_2d'][:, :2], keypoints[:, :2] / [W, H] - 0.5, atol=1e-6)
    # the crop-camera joints differ from the PV ones by the constant crop offset
    offset = joints - out['keypoints_3d']
    np.testing.assert_allclose(offset, np.broadcast_to(offset[0], offset.shape), atol=1e-5)


def test_visibility_mask_and_confidences():
    rng = np.random.default_rng(8)
    image, center, joints, keypoints, smpl_params = planar_example(rng)
    keypoints[3, 2] = 0.0                    # undetected
    keypoints[6, :2] = center + [900, 0]     # far outside the crop (and the image)
    out = augment_example(image, center, 300.0, keypoints, joints, smpl_params, FX, CX, CY, joints,
                          AugParams(rot=30.0), image_size=224, image_mean=MEAN, image_std=STD)
    mask = out['keypoints_2d_vis_mask']
    assert mask.dtype == np.bool_ and mask.shape == (25,)
    assert not mask[3] and not mask[6] and mask[0]
    # confidences are carried over unchanged, even for the point that left the image
    np.testing.assert_allclose(out['orig_keypoints_2d'][:, 2], keypoints[:, 2])
    np.testing.assert_allclose(out['keypoints_2d'][:, 2], keypoints[:, 2])


def test_transl_rederived_from_pelvis_and_crop_near_border():
    rng = np.random.default_rng(9)
    image, center, joints, keypoints, smpl_params = planar_example(rng)
    pelvis = np.array([0.01, -0.2, 0.02])
    out = augment_example(image, (3.0, 4.0), 500.0, keypoints, joints, smpl_params, FX, CX, CY, joints,
                          AugParams(scale=1.3, rot=-45.0, flip=True), image_size=224, image_mean=MEAN,
                          image_std=STD, pelvis_at_rest=lambda betas: pelvis + 0 * betas[:3])
    np.testing.assert_allclose(out['smpl_params']['transl'], out['keypoints_3d_full'][0] - pelvis, atol=1e-6)
    assert out['img'].shape == (3, 224, 224) and np.isfinite(out['img']).all()
    # much of the box lies outside the image: those pixels are the normalised value of black
    black = (0.0 - 255 * MEAN[0]) / (255 * STD[0])
    assert np.mean(np.isclose(out['img'][0], black)) > 0.3
