"""Procedural human body poses and shapes in SMPL's parameterisation.

Poses are built joint by joint from anatomical angles (flexion, abduction, ...) in SMPL's local frames: in the rest
T-pose every frame is aligned with the body's axes, y up, x to the body's left, z forward. Signs, checked by posing
the body model:

- hip flexion (thigh forward) is a negative rotation about x; knee flexion (shin backward) a positive one;
- spine / neck forward bend is positive about x;
- arms hang down from the T-pose by rotating the left shoulder by about -70 deg about z and the right by +70 deg;
- the elbows flex (forearm forward) about y: negative for the left arm, positive for the right.

Each kind ('stand', 'walk', 'sit', 'reach', 'bend') draws its angles from ranges a person can hold, plus a little
noise on every joint.
"""
from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

POSE_KINDS = ('stand', 'walk', 'sit', 'reach', 'bend')
SIT_KINDS = ('sit',)
NUM_BODY_JOINTS = 23
NUM_BETAS = 10

# SMPL joint indices used below.
PELVIS, L_HIP, R_HIP, SPINE1, L_KNEE, R_KNEE, SPINE2, L_ANKLE, R_ANKLE, SPINE3 = range(10)
NECK, L_COLLAR, R_COLLAR, HEAD, L_SHOULDER, R_SHOULDER, L_ELBOW, R_ELBOW, L_WRIST, R_WRIST = range(12, 22)

NOISE_DEG = 3.0  # per-axis noise added to every joint


def is_sitting(kind) -> bool:
    """Whether a pose kind (a label returned by :func:`sample_poses`) is a seated pose."""
    return str(kind) in SIT_KINDS


def sitting_mask(kinds) -> np.ndarray:
    """Boolean mask over an array of kind labels: True for seated poses."""
    return np.array([is_sitting(k) for k in kinds], dtype=bool)


class _Pose:
    """Local joint rotations being assembled; angles in degrees about the joint's local axes."""

    def __init__(self):
        self.rot = [Rotation.identity() for _ in range(NUM_BODY_JOINTS + 1)]

    def turn(self, joint: int, axis: str, degrees: float) -> '_Pose':
        """Apply a rotation about a world-aligned axis after the joint's current rotation."""
        self.rot[joint] = Rotation.from_euler(axis, degrees, degrees=True) * self.rot[joint]
        return self

    def body_pose(self) -> np.ndarray:
        return np.concatenate([r.as_rotvec() for r in self.rot[1:]])


def _legs(pose: _Pose, rng, hip_flex=(0.0, 0.0), knee_flex=(0.0, 0.0), spread=0.0):
    """Hip flexion, knee flexion and outward spread (degrees) for the (left, right) legs."""
    for side, (hip, knee, ankle, sign) in enumerate(((L_HIP, L_KNEE, L_ANKLE, 1.0), (R_HIP, R_KNEE, R_ANKLE, -1.0))):
        pose.turn(hip, 'z', sign * spread)
        pose.turn(hip, 'x', -hip_flex[side])
        pose.turn(knee, 'x', knee_flex[side])
        # Keep the foot roughly level: the ankle undoes part of the shin's tilt.
        pose.turn(ankle, 'x', -0.5 * (knee_flex[side] - hip_flex[side]) * rng.uniform(0.0, 0.6))


def _arms(pose: _Pose, lower=(70.0, 70.0), swing=(0.0, 0.0), elbow=(10.0, 10.0)):
    """Arms from the T-pose: lowered by ``lower`` deg (90 = hanging), then swung forward by ``swing`` deg (shoulder
    flexion about the body's left-right axis), elbows flexed by ``elbow`` deg."""
    for side, (shoulder, elb, sign) in enumerate(((L_SHOULDER, L_ELBOW, 1.0), (R_SHOULDER, R_ELBOW, -1.0))):
        pose.turn(shoulder, 'z', -sign * lower[side])
        pose.turn(shoulder, 'x', -swing[side])
        pose.turn(elb, 'y', -sign * elbow[side])


def _spine(pose: _Pose, forward: float, side: float = 0.0, twist: float = 0.0):
    """Spread a forward bend / side bend / twist (degrees) over the three spine joints."""
    for joint, share in ((SPINE1, 0.4), (SPINE2, 0.3), (SPINE3, 0.3)):
        pose.turn(joint, 'z', share * side)
        pose.turn(joint, 'y', share * twist)
        pose.turn(joint, 'x', share * forward)


def _stand(pose, rng):
    _legs(pose, rng, hip_flex=rng.uniform(-5, 8, 2), knee_flex=rng.uniform(0, 10, 2), spread=rng.uniform(0, 6))
    _arms(pose, lower=rng.uniform(60, 80, 2), swing=rng.uniform(-10, 15, 2), elbow=rng.uniform(5, 25, 2))
    _spine(pose, rng.uniform(-5, 8), rng.uniform(-4, 4), rng.uniform(-10, 10))


def _walk(pose, rng):
    phase, stride = rng.uniform(0, 2 * np.pi), rng.uniform(15, 30)
    swing = stride * np.sin(phase)
    # The leg swinging forward bends its knee; the stance leg stays nearly straight.
    knees = (5 + 35 * max(0.0, np.cos(phase - 0.5)), 5 + 35 * max(0.0, -np.cos(phase - 0.5)))
    _legs(pose, rng, hip_flex=(swing, -swing), knee_flex=knees, spread=rng.uniform(0, 4))
    arm_swing = 0.8 * swing
    _arms(pose, lower=rng.uniform(65, 80, 2), swing=(-arm_swing, arm_swing), elbow=rng.uniform(10, 35, 2))
    _spine(pose, rng.uniform(0, 8), 0.0, 0.3 * swing)


def _sit(pose, rng):
    _legs(pose, rng, hip_flex=rng.uniform(80, 100, 2), knee_flex=rng.uniform(80, 100, 2),
          spread=rng.uniform(3, 15))
    # Hands resting on the thighs: arms lowered, swung slightly forward, elbows bent.
    _arms(pose, lower=rng.uniform(65, 80, 2), swing=rng.uniform(10, 30, 2), elbow=rng.uniform(40, 80, 2))
    _spine(pose, rng.uniform(-5, 15), rng.uniform(-4, 4), rng.uniform(-10, 10))


def _reach(pose, rng):
    _legs(pose, rng, hip_flex=rng.uniform(-5, 10, 2), knee_flex=rng.uniform(0, 15, 2), spread=rng.uniform(0, 8))
    both = rng.random() < 0.4
    reaching = rng.random() < 0.5  # which arm reaches when only one does
    lower, swing, elbow = rng.uniform(60, 80, 2), rng.uniform(-5, 15, 2), rng.uniform(5, 25, 2)
    for side in range(2):
        if both or side == reaching:
            lower[side] = rng.uniform(60, 90)     # close to the body's side (90 = hanging) ...
            swing[side] = rng.uniform(60, 110)    # ... then raised forward towards the target
            elbow[side] = rng.uniform(0, 30)
    _arms(pose, lower=lower, swing=swing, elbow=elbow)
    _spine(pose, rng.uniform(0, 20), rng.uniform(-8, 8), rng.uniform(-20, 20))


def _bend(pose, rng):
    forward = rng.uniform(30, 75)
    _legs(pose, rng, hip_flex=rng.uniform(0, 10, 2), knee_flex=rng.uniform(0, 15, 2), spread=rng.uniform(0, 8))
    # Arms hang towards the ground: swing them forward by the bend of the spine.
    _arms(pose, lower=rng.uniform(65, 85, 2), swing=forward + rng.uniform(-10, 10, 2), elbow=rng.uniform(5, 30, 2))
    _spine(pose, forward, rng.uniform(-5, 5), rng.uniform(-10, 10))
    pose.turn(NECK, 'x', -rng.uniform(0, 0.4) * forward)  # look up a little


_BUILDERS = {'stand': _stand, 'walk': _walk, 'sit': _sit, 'reach': _reach, 'bend': _bend}


def sample_poses(rng: np.random.Generator, n: int, kinds=POSE_KINDS):
    """``n`` body poses ``[n, 69]`` (axis-angle of joints 1..23) and their kind labels ``[n]`` (str).

    Kinds are drawn uniformly from ``kinds``; each pose gets the kind's angles plus ``NOISE_DEG`` of noise.
    """
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in _BUILDERS]
    if not kinds or unknown:
        raise ValueError(f"sample_poses: kinds must be a non-empty subset of {POSE_KINDS}, got {kinds!r}")
    labels = np.array([kinds[i] for i in rng.integers(0, len(kinds), size=n)], dtype=f'<U{max(map(len, kinds))}')
    poses = np.zeros((n, 3 * NUM_BODY_JOINTS))
    for i, kind in enumerate(labels):
        pose = _Pose()
        for joint in range(1, NUM_BODY_JOINTS + 1):
            pose.rot[joint] = Rotation.from_rotvec(np.radians(rng.normal(0.0, NOISE_DEG, 3)))
        _BUILDERS[str(kind)](pose, rng)
        poses[i] = pose.body_pose()
    return poses, labels


def sample_betas(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` shape vectors ``[n, 10]``: N(0, 0.7^2) clipped to [-2, 2]."""
    return np.clip(rng.normal(0.0, 0.7, size=(n, NUM_BETAS)), -2.0, 2.0)


def sample_global_orient(rng: np.random.Generator, n: int, max_tilt_deg: float = 5.0) -> np.ndarray:
    """Upright root orientations ``[n, 3]`` (axis-angle): a uniform heading about y and a small tilt."""
    yaw = Rotation.from_euler('y', rng.uniform(-180.0, 180.0, (n, 1)), degrees=True)
    tilt = Rotation.from_rotvec(np.radians(rng.uniform(-max_tilt_deg, max_tilt_deg, (n, 3)) * (1.0, 0.0, 1.0)))
    return (yaw * tilt).as_rotvec()


def sample_mocap(rng: np.random.Generator, n: int):
    """A MoCap-like set: ``body_pose [n, 72]`` (global orient then 23 joints, axis-angle), ``betas [n, 10]``."""
    orient = sample_global_orient(rng, n)
    poses, _ = sample_poses(rng, n)
    return np.concatenate([orient, poses], axis=1), sample_betas(rng, n)
