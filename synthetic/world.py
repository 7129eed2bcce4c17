"""Synthetic EgoBody-format world: recordings of one SMPL body seen from a moving egocentric camera.

:func:`make_world` writes ``<out>/data`` (synthetic SMPL files, mean parameters, MoCap poses) and
``<out>/egobody`` in the EgoBody release layout read by the dataset and the preprocessing:
``data_info_release.csv``, ``data_splits.csv``, ``transf_matrices_all_seqs.pkl``, ``calibrations/``,
``kinect_cam_params/``, ``scene_mesh/``, ``egocentric_color/`` (rendered PV jpgs and ``<date>_pv.txt``) and
``annotation_egocentric_smpl_npz/egocapture_{train,val,test}_smpl.npz``.

Generation happens in the scene frame (y up): the body is posed on the floor or on a seat, the camera wearer's
HoloLens looks at it from 1-3 m. Each recording then gets a random master-Kinect pose in the scene and a random
HoloLens world frame, and the per-frame ``trans_world2pv`` is solved from the original's scene -> PV chain so that
``ADD_TRANS @ world2pv @ kinect2holo @ inv(kinect2scene)`` is exactly the chosen scene -> PV(OpenCV) transform.
SMPL parameters in PV follow from the scene-frame ones: SMPL rotates about the pelvis rest joint ``J0(betas)``, so
``R_pv = R_s2pv R_scene`` and ``transl_pv = R_s2pv (transl_s + J0) + t_s2pv - J0``.

:func:`plan_world` does everything except writing files (deterministic in the seed), so tests can regenerate the
annotation of a world cheaply.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from synthetic.poses import POSE_KINDS, sample_betas, sample_poses
from synthetic.scenes import ROOM_STYLES, Room, make_room, write_obj
from utils.body_model import SMPL_TO_OPENPOSE, create_smpl
from utils.camera import IMAGE_SIZE
from utils.egobody import (DATA_INFO_CSV, KINECT_COLOR_JSON, NPZ_FOLDER, SPLITS, TRANSF_PKL, kinect_to_scene_path,
                           scene_mesh_path)
from utils.geometry import ADD_TRANS, transform_points
from utils.io import atomic_json_dump, atomic_np_savez, atomic_path, atomic_pickle_dump, atomic_text_write

DEFAULT_IMAGE_SIZE = IMAGE_SIZE   # EgoBody's PV image size
DEFAULT_SPLITS = (0.6, 0.2, 0.2)              # train / val / test share of the recordings
KIND_PROBS = {'stand': 0.2, 'walk': 0.15, 'sit': 0.35, 'reach': 0.15, 'bend': 0.15}
S1_MIN_VERTICES = 20000                       # the stage-1 preprocessing needs this many scene vertices with z > 0
S2_MIN_VERTICES = 21000                       # ... and stage 2 this many (20000) in a 2x2x2 m crop; keep a margin
MIN_VISIBLE_KEYPOINTS = 6                     # EgoBody's "valid frame": >= 6 detected OpenPose joints
KINECT_COLOR = {'f': [915.6, 915.4], 'c': [957.3, 551.2]}   # master Kinect colour camera, 1920x1080
FRAME_TICKS = 333333                          # HoloLens timestamps: 100 ns ticks, ~30 fps
SITTING_REGION_JOINTS = (0, 1, 2)             # vertices skinned mostly to the pelvis/hips rest on the seat
MAX_BODY_TRIES = 40           # bodies (pose kind + placement) per recording
MAX_PLACEMENT_TRIES = 20      # placements per body
MAX_CAMERA_TRIES = 25
CUT_SHARE = 0.35              # per split, at least this share of recordings (>= 1) are framed with joints cut off


# ----------------------------------------------------------------------------------------------------------------
# Small geometry helpers
# ----------------------------------------------------------------------------------------------------------------

def rigid(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return T


def invert_rigid(T: np.ndarray) -> np.ndarray:
    R, t = T[:3, :3], T[:3, 3]
    return rigid(R.T, -R.T @ t)


def look_rotation(forward: np.ndarray, roll: float = 0.0) -> np.ndarray:
    """OpenCV camera-to-scene rotation (columns: right, down, forward) for a y-up scene, rolled about forward."""
    fwd = forward / np.linalg.norm(forward)
    right = np.cross(fwd, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    c, s = math.cos(roll), math.sin(roll)
    return np.stack([c * right + s * down, -s * right + c * down, fwd], axis=1)


def yaw_matrix(yaw: float) -> np.ndarray:
    """Rotation about +y; SMPL's canonical body faces +z, so ``yaw`` turns it to face (sin yaw, 0, cos yaw)."""
    return Rotation.from_rotvec([0.0, yaw, 0.0]).as_matrix()


def smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def project(points: np.ndarray, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """Pinhole projection of camera-frame points ``[..., 3]`` to pixels ``[..., 2]``."""
    z = points[..., 2:3]
    return points[..., :2] / z * np.array([fx, fy]) + np.array([cx, cy])


# ----------------------------------------------------------------------------------------------------------------
# Body model wrapper
# ----------------------------------------------------------------------------------------------------------------

class BodyModels:
    """Gender-specific SMPL models in float64 (``'male'`` / ``'female'``), loaded on first use."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self._models = {}

    def model(self, gender: str):
        if gender not in self._models:
            self._models[gender] = create_smpl(self.data_dir, gender, dtype=torch.float64)
        return self._models[gender]

    def faces(self, gender: str) -> np.ndarray:
        return np.asarray(self.model(gender).faces, dtype=np.int64)

    def sitting_region(self, gender: str) -> np.ndarray:
        weights = self.model(gender).lbs_weights.detach().cpu().numpy()
        return np.isin(weights.argmax(axis=1), SITTING_REGION_JOINTS)

    def forward(self, gender: str, betas, body_pose, global_orient, transl) -> Tuple[np.ndarray, np.ndarray]:
        """Vertices ``[B, 6890, 3]`` and smplx's 45 joints ``[B, 45, 3]`` (float64 numpy)."""
        body_pose = np.atleast_2d(body_pose)
        n = len(body_pose)

        def batch(x):
            return torch.as_tensor(np.broadcast_to(np.asarray(x, np.float64), (n, np.shape(x)[-1])).copy())
        with torch.no_grad():
            out = self.model(gender)(betas=batch(betas), body_pose=batch(body_pose),
                                     global_orient=batch(global_orient), transl=batch(transl))
        return out.vertices.numpy(), out.joints.numpy()

    def rest_pelvis(self, gender: str, betas) -> np.ndarray:
        """``J0(betas)``: the pelvis joint at zero pose and zero translation (the SMPL rotation centre)."""
        _, joints = self.forward(gender, betas, np.zeros(69), np.zeros(3), np.zeros(3))
        return joints[0, 0]


# ----------------------------------------------------------------------------------------------------------------
# Plan data
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class BodyTrack:
    """One body over the frames of a recording, in the scene frame."""
    kind: str
    gender: str
    betas: np.ndarray            # [10]
    body_pose: np.ndarray        # [F, 69]
    orient_scene: np.ndarray     # [F, 3, 3]
    transl_scene: np.ndarray     # [F, 3]
    verts: np.ndarray            # [F, 6890, 3]
    joints: np.ndarray           # [F, 45, 3]
    facing: np.ndarray           # unit (x, 0, z)


@dataclass
class CameraTrack:
    pv_to_scene: np.ndarray      # [F, 4, 4] OpenCV PV camera -> scene
    fx: np.ndarray               # [F]
    fy: np.ndarray               # [F]
    cx: float
    cy: float


@dataclass
class Recording:
    name: str
    scene: str
    date: str                    # HoloLens folder name YYYY-MM-DD-HHMMSS
    split: str
    interactee_idx: int
    wearer_gender: str
    start_frame: int
    timestamps: List[str]
    kinect_to_scene: np.ndarray
    kinect_to_holo: np.ndarray
    body: BodyTrack
    camera: CameraTrack
    world_to_pv: np.ndarray      # [F, 4, 4] HoloLens world -> PV (OpenGL axes)
    annotation: Dict[str, np.ndarray] = field(default_factory=dict)

    def imgname(self, i: int) -> str:
        return f'egocentric_color/{self.name}/{self.date}/PV/{self.timestamps[i]}_frame_{self.start_frame + i:05d}.jpg'


@dataclass
class WorldPlan:
    rooms: Dict[str, Room]
    dense: Dict[str, Tuple[np.ndarray, np.ndarray]]
    recordings: List[Recording]
    image_size: Tuple[int, int]

    def split_frames(self) -> Dict[str, int]:
        return {s: sum(len(r.timestamps) for r in self.recordings if r.split == s) for s in SPLITS}


# ----------------------------------------------------------------------------------------------------------------
# Bodies
# ----------------------------------------------------------------------------------------------------------------

def _frame_poses(rng: np.random.Generator, kind: str, n_frames: int) -> np.ndarray:
    """Per-frame body poses blending smoothly between two poses of ``kind``."""
    keys, _ = sample_poses(rng, 2, kinds=(kind,))
    w = smoothstep(np.linspace(0.0, 1.0, n_frames))[:, None] if n_frames > 1 else np.zeros((1, 1))
    return (1.0 - w) * keys[0] + w * keys[1]


def _body_collides(room: Room, verts: np.ndarray, tol: float = 0.01) -> bool:
    """Any vertex outside the walls / below the ceiling, or more than ``tol`` inside a furniture box?"""
    flat = verts.reshape(-1, 3)
    if not room.inside(flat[:, [0, 2]], 0.02).all() or flat[:, 1].max() > room.floor_y + room.size[1] - 0.05:
        return True
    for item in room.furniture:
        if not item.footprint_contains(flat[:, [0, 2]], 0.0).any():
            continue
        for box in item.boxes:
            local = np.abs(box.to_local(flat))
            if np.all(local < box.size / 2 - tol, axis=1).any():
                return True
    return False


def _place_standing(room: Room, rng, models: BodyModels, gender, betas, kind, n_frames) -> Optional[BodyTrack]:
    """A standing / walking / reaching / bending body on free floor, lowest vertex on the floor in every frame."""
    start = room.sample_free_xz(rng, margin=0.6)
    if start is None:
        return None
    to_center = room.center[[0, 2]] - start          # face into the room, so the camera wearer has space
    yaw = math.atan2(to_center[0], to_center[1]) + rng.uniform(-1.2, 1.2)
    facing = np.array([math.sin(yaw), 0.0, math.cos(yaw)])
    step = rng.uniform(0.02, 0.035) if kind == 'walk' else rng.uniform(0.0, 0.003)
    drift = facing if kind == 'walk' else np.array([math.cos(yaw), 0.0, -math.sin(yaw)])
    pelvis_xz = start + np.arange(n_frames)[:, None] * step * drift[[0, 2]]
    poses = _frame_poses(rng, kind, n_frames)
    orient = np.tile(Rotation.from_matrix(yaw_matrix(yaw)).as_rotvec(), (n_frames, 1))
    verts, joints = models.forward(gender, betas, poses, orient, np.zeros(3))
    j0 = joints[0, 0]
    transl = np.zeros((n_frames, 3))
    transl[:, 0] = pelvis_xz[:, 0] - j0[0]
    transl[:, 2] = pelvis_xz[:, 1] - j0[2]
    transl[:, 1] = room.floor_y - verts[:, :, 1].min(axis=1)
    verts, joints = verts + transl[:, None], joints + transl[:, None]
    if _body_collides(room, verts):
        return None
    return BodyTrack(kind, gender, np.asarray(betas), poses, np.tile(yaw_matrix(yaw), (n_frames, 1, 1)), transl,
                     verts, joints, facing)


def _place_sitting(room: Room, rng, models: BodyModels, gender, betas, n_frames) -> Optional[BodyTrack]:
    """A seated body: knees just past the seat's front edge, pelvis region resting on the cushion, feet above the
    floor, back clear of the backrest."""
    seats = room.seats()
    if not seats:
        return None
    seat = seats[int(rng.integers(len(seats)))]
    lateral = np.cross([0.0, 1.0, 0.0], seat.facing)
    offset = rng.uniform(-seat.half_width, seat.half_width)
    yaw = math.atan2(seat.facing[0], seat.facing[2]) + rng.uniform(-0.15, 0.15)
    poses = _frame_poses(rng, 'sit', n_frames)
    orient = np.tile(Rotation.from_matrix(yaw_matrix(yaw)).as_rotvec(), (n_frames, 1))
    verts, joints = models.forward(gender, betas, poses, orient, np.zeros(3))
    region = models.sitting_region(gender)
    edge = seat.edge_center
    transl = np.zeros((n_frames, 3))
    for i in range(n_frames):
        knees = joints[i, [4, 5]].mean(axis=0)
        forward = 0.06 - (knees - edge) @ seat.facing
        side = offset - (joints[i, 0] - edge) @ lateral
        behind = -((verts[i] - edge) @ seat.facing) - forward     # distance behind the front edge
        for _ in range(4):
            on_seat = region & (behind > 0.02)
            if on_seat.sum() < 50:
                return None
            lift = seat.height + 0.005 - verts[i, on_seat, 1].min()
            height = verts[i, :, 1] + lift
            # slide forward until the back clears the backrest and the lower legs clear the seat's front
            overshoot = max(behind[height > seat.height + 0.02].max() - (seat.depth - 0.02),
                            behind[height < seat.height - 0.005].max() + 0.015)
            if overshoot <= 0:
                break
            forward, behind = forward + overshoot, behind - overshoot
        else:
            return None
        transl[i] = forward * seat.facing + side * lateral
        transl[i, 1] = lift
    verts, joints = verts + transl[:, None], joints + transl[:, None]
    if verts[:, :, 1].min() < room.floor_y - 0.01:        # feet through the floor: seat too low for this body
        return None
    pelvis_behind_edge = -((joints[:, 0] - edge) @ seat.facing)
    if np.any(joints[:, 0, 1] <= seat.height) or np.any(pelvis_behind_edge < 0.05) or _body_collides(room, verts):
        return None
    return BodyTrack('sit', gender, np.asarray(betas), poses, np.tile(yaw_matrix(yaw), (n_frames, 1, 1)), transl,
                     verts, joints, seat.facing.copy())


def place_body(room: Room, rng: np.random.Generator, models: BodyModels, gender: str, betas: np.ndarray,
               n_frames: int, scene_vertices: Optional[np.ndarray] = None,
               force_kind: Optional[str] = None) -> Optional[BodyTrack]:
    """Draw a pose kind and place the body; retries, then tries standing; None if nothing fits.

    With ``scene_vertices``, placements where a stage-2 crop around the body could keep fewer than
    ``S2_MIN_VERTICES`` scene vertices (checked on the first, middle and last frame) are redrawn. ``force_kind``
    replaces the drawn kind (the draw still happens, so the random stream stays aligned) and is never given up
    for standing."""
    kinds = [k for k in POSE_KINDS if k in KIND_PROBS and (k != 'sit' or room.seats())]
    probs = np.array([KIND_PROBS[k] for k in kinds])
    kind = kinds[int(rng.choice(len(kinds), p=probs / probs.sum()))]   # keep the kind: retries only move the body
    if force_kind is not None:
        kind = force_kind
    for attempt in range(MAX_PLACEMENT_TRIES):
        if attempt == MAX_PLACEMENT_TRIES // 2 and force_kind is None:
            kind = 'stand'
        track = (_place_sitting(room, rng, models, gender, betas, n_frames) if kind == 'sit'
                 else _place_standing(room, rng, models, gender, betas, kind, n_frames))
        if track is not None and scene_vertices is not None:
            frames = sorted({0, n_frames // 2, n_frames - 1})
            if min(cube_crop_min_count(scene_vertices, track.verts[i]) for i in frames) < S2_MIN_VERTICES:
                track = None
        if track is not None:
            return track
    return None


# ----------------------------------------------------------------------------------------------------------------
# Cameras
# ----------------------------------------------------------------------------------------------------------------

def _keypoints(joints_pv: np.ndarray, fx: float, cx: float, cy: float,
               size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """BODY_25 pixels ``[25, 2]`` (projected with fx for both axes, as the EgoHMR code does) and in-image mask."""
    pts = joints_pv[SMPL_TO_OPENPOSE]
    front = pts[:, 2] > 0.05
    uv = project(np.where(front[:, None], pts, 1.0), fx, fx, cx, cy)
    inside = front & (uv[:, 0] >= 0) & (uv[:, 0] < size[0]) & (uv[:, 1] >= 0) & (uv[:, 1] < size[1])
    return uv, inside


def plan_camera(room: Room, rng: np.random.Generator, body: BodyTrack, size: Tuple[int, int],
                scene_vertices: np.ndarray, cut: bool = False) -> Optional[CameraTrack]:
    """A smooth HoloLens PV trajectory looking at the body from 1-3 m at head height, or None if this draw
    breaks a constraint (camera in furniture, body hidden / too small / off-screen, too few scene vertices ahead).

    ``cut``: the EgoBody close-up framing -- the wearer stands 1-1.8 m away and looks at the upper body, and every
    frame must have at least one of the 24 SMPL joints outside the image (legs or arms cut by the border). The
    same random numbers are drawn either way, only mapped to other ranges."""
    n = len(body.transl_scene)
    width, height = size
    sx, sy = width / DEFAULT_IMAGE_SIZE[0], height / DEFAULT_IMAGE_SIZE[1]
    pelvis, head = body.joints[:, 0], body.joints[:, 15]
    # where the camera wearer stands: in front of the body, within +-40 deg of its facing direction
    dist = rng.uniform(1.4, 3.2)
    if cut:
        dist = 1.0 + (dist - 1.4) * 0.8 / 1.8
    angle = rng.uniform(-0.7, 0.7)
    c, s = math.cos(angle), math.sin(angle)
    direction = np.array([c * body.facing[0] + s * body.facing[2], 0.0, -s * body.facing[0] + c * body.facing[2]])
    start = pelvis[0] + dist * direction
    move = rng.normal(0.0, 0.12, 3) * np.array([1.0, 0.0, 1.0])
    t = smoothstep(np.linspace(0.0, 1.0, n))[:, None] if n > 1 else np.zeros((1, 1))
    eye = start + t * move + (pelvis - pelvis[0]) * np.array([1.0, 0.0, 1.0])   # follow a walking body
    eye[:, 1] = room.floor_y + rng.uniform(1.5, 1.8) + 0.015 * np.sin(np.arange(n) * rng.uniform(0.2, 0.6))
    if not room.free(eye[:, [0, 2]], 0.3).all():
        return None
    planar = np.linalg.norm((eye - pelvis)[:, [0, 2]], axis=1)
    if planar.min() < 0.9 or planar.max() > 3.2:
        return None
    # gaze: the middle of the body's joints, shifted up or down by up to a quarter of its height, plus slow jitter
    low, high = body.joints[:, :24, 1].min(axis=1), body.joints[:, :24, 1].max(axis=1)
    target = body.joints[:, :24].mean(axis=1)
    shift = rng.uniform(-0.25, 0.25)
    target[:, 1] = (low + high) / 2 + ((0.35 + shift / 2) if cut else shift) * (high - low)
    phase = rng.uniform(0, 2 * math.pi, 3)
    rate = rng.uniform(0.05, 0.25, 3)
    frames = np.arange(n)
    yaw = rng.uniform(-0.12, 0.12) + rng.uniform(0.0, 0.05) * np.sin(rate[0] * frames + phase[0])
    pitch = rng.uniform(-0.05, 0.05) + rng.uniform(0.0, 0.03) * np.sin(rate[1] * frames + phase[1])
    roll = rng.uniform(-0.06, 0.06) + rng.uniform(0.0, 0.03) * np.sin(rate[2] * frames + phase[2])
    fx0 = rng.uniform(1450.0, 1500.0) * sx
    fx = fx0 + rng.uniform(-3.0, 3.0) * sx * np.sin(rng.uniform(0.1, 0.3) * frames + rng.uniform(0, 6.3))
    fy = fx + rng.uniform(-0.3, 0.3) * sy
    cx, cy = rng.uniform(950.0, 970.0) * sx, rng.uniform(500.0, 520.0) * sy
    poses = np.zeros((n, 4, 4))
    for i in range(n):
        look = target[i] - eye[i]
        base = look_rotation(look)
        turn = Rotation.from_rotvec([0.0, yaw[i], 0.0]) * Rotation.from_rotvec(base[:, 0] * pitch[i])
        poses[i] = rigid(look_rotation(turn.apply(look), roll[i]), eye[i])
        if not room.line_of_sight(eye[i], pelvis[i]) or not room.line_of_sight(eye[i], head[i]):
            return None
        scene_to_pv = invert_rigid(poses[i])
        joints_pv = transform_points(body.joints[i], scene_to_pv)
        uv, inside = _keypoints(joints_pv, fx[i], cx, cy, size)
        if inside.sum() < MIN_VISIBLE_KEYPOINTS:
            return None
        if cut and joints_inside_image(joints_pv[:24], fx[i], cx, cy, size).all():
            return None
        box = uv[inside].max(axis=0) - uv[inside].min(axis=0)
        if box.max() < 0.1 * height:
            return None
        if (scene_vertices @ scene_to_pv[2, :3] + scene_to_pv[2, 3] > 0).sum() < S1_MIN_VERTICES:
            return None
    return CameraTrack(poses, fx, fy, float(cx), float(cy))


def joints_inside_image(joints_pv: np.ndarray, fx: float, cx: float, cy: float,
                        size: Tuple[int, int]) -> np.ndarray:
    """``[J]`` bool: in front of the camera and projecting inside the image (fx for both axes, as the evaluation)."""
    uv = project(joints_pv, fx, fx, cx, cy)
    return (joints_pv[:, 2] > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < size[0]) & (uv[:, 1] >= 0) & (uv[:, 1] < size[1])


def framing_plan(split_of: Sequence[str]) -> Tuple[List[bool], List[bool]]:
    """(cut, seated) flags per recording: in every split the first ``max(1, ceil(CUT_SHARE * n))`` recordings are
    framed with joints outside the image and the last one is seated (the same one when the split has one)."""
    cut, seated = [False] * len(split_of), [False] * len(split_of)
    for split in SPLITS:
        members = [r for r, s in enumerate(split_of) if s == split]
        for r in members[:max(1, math.ceil(CUT_SHARE * len(members)))]:
            cut[r] = True
        if members:
            seated[members[-1]] = True
    return cut, seated


def cube_crop_min_count(scene_vertices: np.ndarray, body_verts: np.ndarray, size: float = 2.0,
                        yaws: int = 4) -> int:
    """Fewest scene vertices a stage-2 crop of ``preprocess_scene_s2_for_train.py`` around this body can keep: a
    ``size`` x ``size`` square about the body's vertex centroid, turned by one of ``yaws`` angles and shifted to the
    extremes the script allows, holding the points up to 2 m above its lowest one."""
    center = body_verts.mean(axis=0)
    near = scene_vertices[np.linalg.norm((scene_vertices - center)[:, [0, 2]], axis=1) <= size * 0.75 + size / 4 + 0.05]
    fewest = len(scene_vertices)
    for theta in np.linspace(0.0, math.pi / 2, yaws, endpoint=False):
        c, s = math.cos(theta), math.sin(theta)
        rot = np.array([[c, -s], [s, c]])
        points = (near[:, [0, 2]] - center[[0, 2]]) @ rot.T
        body = (body_verts[:, [0, 2]] - center[[0, 2]]) @ rot.T
        lo = np.maximum(-size / 4, body.max(axis=0) - size / 2)
        hi = np.minimum(size / 4, size / 2 + body.min(axis=0))
        for sx in (lo[0], hi[0]):
            for sz in (lo[1], hi[1]):
                inside = np.all(np.abs(points - [sx, sz]) <= size / 2, axis=1)
                heights = near[inside, 1]
                kept = int((heights <= heights.min() + 2.0).sum()) if inside.any() else 0
                fewest = min(fewest, kept)
    return fewest


def kinect_pose(room: Room, rng: np.random.Generator) -> np.ndarray:
    """Master Kinect (OpenCV axes) -> scene: near a wall at 1.6-2.2 m, looking at the room centre."""
    corner = rng.integers(0, 2, 2)
    inset = rng.uniform(0.25, 0.8, 2)
    xz = room.origin[[0, 2]] + np.where(corner == 1, room.size[[0, 2]] - inset, inset)
    pos = np.array([xz[0], room.floor_y + rng.uniform(1.6, 2.2), xz[1]])
    target = room.center + np.array([rng.uniform(-0.5, 0.5), 1.0 - room.size[1] / 2, rng.uniform(-0.5, 0.5)])
    return rigid(look_rotation(target - pos, rng.uniform(-0.05, 0.05)), pos)


def holo_world_pose(rng: np.random.Generator) -> np.ndarray:
    """A random master Kinect -> HoloLens world transform (any rotation, a few metres of translation)."""
    return rigid(Rotation.random(random_state=rng).as_matrix(), rng.uniform(-3.0, 3.0, 3))


def world_to_pv_chain(kinect_to_scene: np.ndarray, kinect_to_holo: np.ndarray, pv_to_scene: np.ndarray) -> np.ndarray:
    """``trans_world2pv`` (HoloLens world -> OpenGL PV) such that ``ADD_TRANS @ world2pv @ kinect2holo @
    inv(kinect2scene)`` equals ``inv(pv_to_scene)`` (scene -> OpenCV PV)."""
    return ADD_TRANS @ invert_rigid(pv_to_scene) @ kinect_to_scene @ invert_rigid(kinect_to_holo)


# ----------------------------------------------------------------------------------------------------------------
# Annotation
# ----------------------------------------------------------------------------------------------------------------

def pv_smpl_params(rot_scene: np.ndarray, transl_scene: np.ndarray, scene_to_pv: np.ndarray,
                   rest_pelvis: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(global_orient_pv axis-angle [3], transl_pv [3]) giving the scene-frame body mapped into PV."""
    R, t = scene_to_pv[:3, :3], scene_to_pv[:3, 3]
    orient = Rotation.from_matrix(R @ rot_scene).as_rotvec()
    transl = R @ (transl_scene + rest_pelvis) + t - rest_pelvis
    return orient, transl


def annotate(rec: Recording, models: BodyModels, size: Tuple[int, int], rng: np.random.Generator) -> None:
    """Fill ``rec.annotation`` with the EgoBody npz fields of every frame (checking the PV SMPL parameters)."""
    body, cam = rec.body, rec.camera
    n = len(rec.timestamps)
    j0 = models.rest_pelvis(body.gender, body.betas)
    orient_pv, transl_pv = np.zeros((n, 3)), np.zeros((n, 3))
    for i in range(n):
        orient_pv[i], transl_pv[i] = pv_smpl_params(body.orient_scene[i], body.transl_scene[i],
                                                    invert_rigid(cam.pv_to_scene[i]), j0)
    verts_pv, joints_pv = models.forward(body.gender, body.betas, body.body_pose, orient_pv, transl_pv)
    expected = np.stack([transform_points(v, invert_rigid(T)) for v, T in zip(body.verts, cam.pv_to_scene)])
    error = np.abs(verts_pv - expected).max()
    if error > 1e-5:
        raise RuntimeError(f"recording {rec.name}: PV SMPL parameters reproduce the body only to {error:.2e} m")
    keypoints = np.zeros((n, 25, 3))
    center, scale = np.zeros((n, 2)), np.zeros(n)
    for i in range(n):
        uv, inside = _keypoints(joints_pv[i], cam.fx[i], cam.cx, cam.cy, size)
        keypoints[i, inside, :2] = uv[inside]
        keypoints[i, inside, 2] = rng.uniform(0.6, 0.95, inside.sum())
        detected = keypoints[i, keypoints[i, :, 2] > 0.2, :2]
        center[i] = detected.mean(axis=0)
        scale[i] = (detected.max(axis=0) - detected.min(axis=0)).max() / 200.0 * 1.2
    rec.annotation = {
        'imgname': np.array([rec.imgname(i) for i in range(n)]),
        'center': center,
        'scale': scale,
        'valid_keypoints': keypoints,
        '3d_joints_pv': joints_pv,
        'pose': body.body_pose.copy(),
        'shape': np.tile(body.betas, (n, 1)),
        'global_orient_pv': orient_pv,
        'transl_pv': transl_pv,
        'gender': np.array([body.gender[0]] * n),
        'fx': cam.fx.copy(),
        'fy': cam.fy.copy(),
        'cx': np.full(n, cam.cx),
        'cy': np.full(n, cam.cy),
    }


# ----------------------------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------------------------

def _check_args(num_recordings, frames_per_recording, image_size, splits) -> Tuple[int, int]:
    if int(frames_per_recording) < 1:
        raise ValueError(f"frames_per_recording must be >= 1, got {frames_per_recording}")
    if len(image_size) != 2 or min(int(v) for v in image_size) < 64:
        raise ValueError(f"image_size must be (width, height) with both >= 64, got {image_size}")
    if len(splits) != 3 or min(splits) < 0 or sum(splits) <= 0:
        raise ValueError(f"splits must be three non-negative (train, val, test) shares, got {splits}")
    if int(num_recordings) < 3:
        raise ValueError(f"num_recordings must be >= 3 so that train, val and test are non-empty, got {num_recordings}")
    return int(num_recordings), int(frames_per_recording)


def assign_splits(num_recordings: int, shares: Sequence[float], rng: np.random.Generator) -> List[str]:
    """Split name per recording: every split gets at least one recording, the rest follows ``shares``."""
    shares = np.asarray(shares, float) / np.sum(shares)
    counts = np.ones(3, int)
    for _ in range(num_recordings - 3):
        counts[np.argmax(shares * num_recordings - counts)] += 1
    names = np.repeat(np.array(SPLITS), counts)
    return [str(s) for s in names[rng.permutation(num_recordings)]]


def _recording_meta(rng: np.random.Generator, index: int) -> Tuple[str, str, int]:
    year, month, day = int(rng.integers(2021, 2023)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    hh, mm, ss = int(rng.integers(9, 19)), int(rng.integers(60)), int(rng.integers(60))
    wearer, interactee = rng.choice(np.arange(1, 40), 2, replace=False)
    name = f'recording_{year}{month:02d}{day:02d}_S{wearer:02d}_S{interactee:02d}_{index + 1:02d}'
    date = f'{year}-{month:02d}-{day:02d}-{hh:02d}{mm:02d}{ss:02d}'
    return name, date, int(rng.integers(100, 3000))


def plan_world(data_dir: str, num_recordings: int = 6, frames_per_recording: int = 20, seed: int = 0,
               image_size: Tuple[int, int] = DEFAULT_IMAGE_SIZE, splits: Sequence[float] = DEFAULT_SPLITS,
               scene_prefix: str = '') -> WorldPlan:
    """Rooms, bodies, cameras, frame transforms and npz annotation of a world, without writing anything.

    Needs the SMPL files under ``data_dir`` (see :func:`synthetic.body_model.write_body_model_files`).
    Deterministic in ``seed``.
    """
    num_recordings, n_frames = _check_args(num_recordings, frames_per_recording, image_size, splits)
    size = (int(image_size[0]), int(image_size[1]))
    num_scenes = min(4, max(2, (num_recordings + 1) // 2))
    styles = [ROOM_STYLES[i] for i in np.random.default_rng([seed, 0]).permutation(len(ROOM_STYLES))]
    rooms, dense = {}, {}
    for k in range(num_scenes):
        name = f'{scene_prefix}{styles[k]}_{chr(ord("a") + k)}'
        rooms[name] = make_room(name, np.random.default_rng([seed, 1, k]), styles[k])
        dense[name] = rooms[name].dense_mesh()
    scene_names = list(rooms)
    split_of = assign_splits(num_recordings, splits, np.random.default_rng([seed, 2]))
    cut_of, seated_of = framing_plan(split_of)
    models = BodyModels(data_dir)
    recordings = []
    for r in range(num_recordings):
        rng = np.random.default_rng([seed, 3, r])
        scene = scene_names[r % num_scenes]
        room = rooms[scene]
        name, date, start_frame = _recording_meta(rng, r)
        gender = ('male', 'female')[int(rng.integers(2))]
        betas = sample_betas(rng, 1)[0]
        for attempt in range(MAX_BODY_TRIES):
            force = 'sit' if seated_of[r] and attempt < MAX_BODY_TRIES // 2 else None
            body = place_body(room, rng, models, gender, betas, n_frames, dense[scene][0], force_kind=force)
            camera = None
            if body is None:
                continue
            for _ in range(MAX_CAMERA_TRIES):
                camera = plan_camera(room, rng, body, size, dense[scene][0], cut=cut_of[r])
                if camera is not None:
                    break
            if camera is not None:
                break
        else:
            raise RuntimeError(f"could not place a body and a camera path for recording {name} in scene '{scene}' "
                               f"after {MAX_BODY_TRIES} tries")
        k2s, k2h = kinect_pose(room, rng), holo_world_pose(rng)
        t0 = int(rng.integers(132600000000000000, 132900000000000000))
        ticks = t0 + np.cumsum(np.r_[0, FRAME_TICKS + rng.integers(-300, 300, n_frames - 1)])
        rec = Recording(name=name, scene=scene, date=date, split=split_of[r],
                        interactee_idx=int(rng.integers(2)), wearer_gender=('male', 'female')[int(rng.integers(2))],
                        start_frame=start_frame, timestamps=[str(int(t)) for t in ticks],
                        kinect_to_scene=k2s, kinect_to_holo=k2h, body=body, camera=camera,
                        world_to_pv=np.stack([world_to_pv_chain(k2s, k2h, T) for T in camera.pv_to_scene]))
        annotate(rec, models, size, rng)
        recordings.append(rec)
    return WorldPlan(rooms, dense, recordings, size)


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------

def split_annotation(plan: WorldPlan, split: str) -> Dict[str, np.ndarray]:
    """The concatenated npz arrays of one split (recordings in plan order)."""
    recs = [r for r in plan.recordings if r.split == split]
    return {key: np.concatenate([r.annotation[key] for r in recs]) for key in recs[0].annotation}


def _write_tables(plan: WorldPlan, root: str) -> None:
    import pandas as pd
    rows = []
    for rec in plan.recordings:
        genders = [rec.wearer_gender, rec.wearer_gender]
        genders[rec.interactee_idx] = rec.body.gender
        rows.append({'recording_name': rec.name, 'start_frame': rec.start_frame,
                     'end_frame': rec.start_frame + len(rec.timestamps) - 1,
                     'body_idx_0': genders[0], 'body_idx_1': genders[1],
                     'body_idx_fpv': f'{rec.interactee_idx} {rec.body.gender}', 'scene_name': rec.scene,
                     'gender_0': genders[0], 'gender_1': genders[1]})
    with atomic_path(os.path.join(root, DATA_INFO_CSV), suffix='.csv') as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    columns = {s: [r.name for r in plan.recordings if r.split == s] for s in SPLITS}
    longest = max(len(v) for v in columns.values())
    table = pd.DataFrame({s: v + [None] * (longest - len(v)) for s, v in columns.items()})
    with atomic_path(os.path.join(root, 'data_splits.csv'), suffix='.csv') as tmp:
        table.to_csv(tmp, index=False)


def _write_calibration(plan: WorldPlan, root: str) -> None:
    transf = {}
    for rec in plan.recordings:
        transf[rec.name] = {'trans_kinect2holo': rec.kinect_to_holo.copy(),
                            'trans_world2pv': {ts: T.copy() for ts, T in zip(rec.timestamps, rec.world_to_pv)}}
        atomic_json_dump({'trans': rec.kinect_to_scene.tolist()}, kinect_to_scene_path(root, rec.name, rec.scene))
        atomic_json_dump({'trans': invert_rigid(rec.kinect_to_holo).tolist()},
                         os.path.join(root, 'calibrations', rec.name, 'cal_trans', 'holo_to_kinect12.json'))
        lines = [f'{float(rec.camera.cx)!r},{float(rec.camera.cy)!r},{plan.image_size[0]},{plan.image_size[1]}']
        for i, ts in enumerate(rec.timestamps):
            pv_to_world = np.linalg.inv(rec.world_to_pv[i])
            values = ','.join(repr(float(v)) for v in pv_to_world.reshape(-1))
            lines.append(f'{ts},{float(rec.camera.fx[i])!r},{float(rec.camera.fy[i])!r},{values}')
        folder = os.path.join(root, 'egocentric_color', rec.name, rec.date)
        atomic_text_write(os.path.join(folder, f'{rec.date}_pv.txt'), '\n'.join(lines) + '\n')
    atomic_pickle_dump(transf, os.path.join(root, TRANSF_PKL))
    atomic_json_dump(KINECT_COLOR, os.path.join(root, KINECT_COLOR_JSON))


def _render_images(plan: WorldPlan, root: str, models: BodyModels, render_scale: float = 0.5,
                   jpeg_quality: int = 90) -> None:
    """Render every PV frame (scene + pink body) and save it as a jpg of ``plan.image_size``.

    With ``render_scale < 1`` the frame is rendered at that fraction of the size (intrinsics scaled with pixel
    centres kept aligned) and resized up with bilinear interpolation: software OpenGL cost grows with the pixel
    count, and the dataset only ever looks at downsampled 224x224 crops.
    """
    import cv2
    import trimesh
    from utils.renderer import Renderer, body_material, make_mesh

    width, height = plan.image_size
    small = (max(1, int(round(width * render_scale))), max(1, int(round(height * render_scale))))
    sx, sy = small[0] / width, small[1] / height
    # The people in the images wear clothes of a per-recording colour, so rendered predictions (pink) stand out.
    clothes = [(0.25, 0.35, 0.6, 1.0), (0.45, 0.5, 0.3, 1.0), (0.55, 0.3, 0.25, 1.0), (0.3, 0.3, 0.35, 1.0)]
    scene_meshes = {}
    with Renderer(*small) as renderer:
        for r, rec in enumerate(plan.recordings):
            material = body_material(clothes[r % len(clothes)])
            if rec.scene not in scene_meshes:
                scene_meshes.clear()  # keep one scene's buffers at a time
                scene_meshes[rec.scene] = make_mesh(plan.rooms[rec.scene].render_mesh(), smooth=False)
            faces = models.faces(rec.body.gender)
            cam = rec.camera
            for i in range(len(rec.timestamps)):
                body = trimesh.Trimesh(rec.body.verts[i], faces, process=False)
                K = (cam.fx[i] * sx, cam.fy[i] * sy, (cam.cx + 0.5) * sx - 0.5, (cam.cy + 0.5) * sy - 0.5)
                rgb, _ = renderer.render([scene_meshes[rec.scene], (body, material)], K=K,
                                         cam_pose_opencv_to_world=cam.pv_to_scene[i], ambient=(0.35, 0.35, 0.35))
                if small != (width, height):
                    rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)
                path = os.path.join(root, rec.imgname(i))
                with atomic_path(path, suffix='.jpg') as tmp:
                    if not cv2.imwrite(tmp, rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)]):
                        raise RuntimeError(f"could not write image '{path}'")


def write_world(plan: WorldPlan, root: str, models: BodyModels, render: bool = True,
                render_scale: float = 0.5) -> None:
    """Write the EgoBody-layout files of ``plan`` under ``root``."""
    for name, (verts, faces) in plan.dense.items():
        write_obj(scene_mesh_path(root, name), verts, faces)
    _write_tables(plan, root)
    _write_calibration(plan, root)
    for split in SPLITS:
        atomic_np_savez(os.path.join(root, NPZ_FOLDER, f'egocapture_{split}_smpl.npz'),
                        **split_annotation(plan, split))
    if render:
        _render_images(plan, root, models, render_scale)


def _outside_flags(plan: WorldPlan, recordings) -> List[bool]:
    flags = []
    for rec in recordings:
        a = rec.annotation
        for i in range(len(rec.timestamps)):
            inside = joints_inside_image(a['3d_joints_pv'][i, :24], a['fx'][i], a['cx'][i], a['cy'][i],
                                         plan.image_size)
            flags.append(not inside.all())
    return flags


def outside_share(plan: WorldPlan, split: Optional[str] = None) -> float:
    """Share of frames (of ``split``, or all) with at least one of the 24 SMPL joints projecting outside the image
    (fx for both axes)."""
    return float(np.mean(_outside_flags(plan, [r for r in plan.recordings if split in (None, r.split)])))


def seated_share(plan: WorldPlan, split: Optional[str] = None) -> float:
    """Share of frames (of ``split``, or all) whose body sits on a piece of furniture."""
    recs = [r for r in plan.recordings if split in (None, r.split)]
    return float(sum(len(r.timestamps) for r in recs if r.body.kind == 'sit') / sum(len(r.timestamps) for r in recs))


def make_world(out_dir: str, num_recordings: int = 6, frames_per_recording: int = 20, seed: int = 0,
               image_size: Tuple[int, int] = DEFAULT_IMAGE_SIZE, splits: Sequence[float] = DEFAULT_SPLITS,
               render: bool = True, render_scale: float = 0.5) -> dict:
    """Generate a synthetic world under ``out_dir`` (``data/`` and ``egobody/``) and return a summary dict.

    ``splits`` are the (train, val, test) shares of the recordings; each split gets at least one recording.
    ``render=False`` skips the jpgs (everything else is written); ``render_scale`` is the fraction of the image
    size rendered before resizing up (1.0: full-resolution rendering, about 4x slower with software OpenGL).
    """
    from synthetic.body_model import write_body_model_files

    started = time.time()
    _check_args(num_recordings, frames_per_recording, image_size, splits)
    if not 0.05 <= float(render_scale) <= 1.0:
        raise ValueError(f"render_scale must be in [0.05, 1], got {render_scale}")
    data_dir, root = os.path.join(out_dir, 'data'), os.path.join(out_dir, 'egobody')
    write_body_model_files(data_dir, seed=seed)
    plan = plan_world(data_dir, num_recordings, frames_per_recording, seed, image_size, splits)
    write_world(plan, root, BodyModels(data_dir), render=render, render_scale=render_scale)
    kinds = {}
    for rec in plan.recordings:
        kinds[rec.body.kind] = kinds.get(rec.body.kind, 0) + len(rec.timestamps)
    return {
        'out_dir': os.path.abspath(out_dir),
        'data_dir': os.path.abspath(data_dir),
        'dataset_root': os.path.abspath(root),
        'frames': plan.split_frames(),
        'recordings': {s: [r.name for r in plan.recordings if r.split == s] for s in SPLITS},
        'scenes': {name: int(len(plan.dense[name][0])) for name in plan.rooms},
        'frames_per_pose_kind': kinds,
        'share_frames_joints_outside': outside_share(plan),
        'share_frames_joints_outside_per_split': {s: outside_share(plan, s) for s in SPLITS},
        'share_frames_seated_per_split': {s: seated_share(plan, s) for s in SPLITS},
        'image_size': list(plan.image_size),
        'seed': int(seed),
        'elapsed_s': round(time.time() - started, 1),
    }
