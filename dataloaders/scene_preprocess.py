"""Scene point-cloud preprocessing shared by the three ``preprocess_scene_*.py`` scripts.

Every crop is a *vertex decimation* of the scene mesh in vertex-index order (not surface sampling): the vertices
that pass a crop test are kept in file order, then every k-th one is taken with ``k = floor(n / target)`` and the
first ``target`` are stored (:func:`decimate_every_kth`).

* Stage 1 (:func:`crop_in_front_of_camera`): the scene vertices with ``z > 0`` in the frame's PV camera (OpenCV
  axes), stored in the master-Kinect frame.
* Stage 2 (:func:`cube_crop`): a prism with a ``cube_size`` x ``cube_size`` footprint, yawed by ``theta`` about the
  vertical (y) axis through a centre and shifted in the yawed frame, keeping points up to ``cube_size`` above the
  lowest selected point; stored in the scene-mesh frame.

Differences from the original scripts (also in the README): crops with fewer points than the target are padded by
repetition with a logged warning instead of crashing or ending the run; the yaw and shift come from a generator
seeded by ``(seed, frame index)`` (:func:`frame_rng`), so reruns and partial reruns give identical files.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from utils import egobody
from utils.cli import add_bool_flag
from utils.geometry import transform_points
from utils.checks import error_line, finite_float_flags_error, output_dir_error
from utils.io import DataError, atomic_np_save, require_file

log = logging.getLogger(__name__)

SCENE_VERTS_NUM_TARGET = 20000
S1_SAVE_EVERY = 15          # stage 1 stores one crop per 15 frames (and at every recording change)
CUBE_SIZE = 2.0             # metres; footprint side and height of the stage-2 prism
SMPL_CHUNK = 256            # frames per batched SMPL forward pass in stage-2 preprocessing
DEFAULT_DATA_ROOT = '/mnt/ssd/egobody_release/'

# An OBJ geometric-vertex record: "v x y z [w | r g b]" at the start of a line.
_OBJ_VERTEX = re.compile(rb'^v[ \t]+(\S+)[ \t]+(\S+)[ \t]+(\S+)', re.MULTILINE)
# An OBJ face record "f i[/t[/n]] j ... " and the (1-based, positive) vertex index of each of its corners.
_OBJ_FACE = re.compile(rb'^f[ \t]+([^\r\n]*)', re.MULTILINE)
_OBJ_INDEX = re.compile(rb'(?<=\s)(\d+)')


# --------------------------------------------------------------------------------------------------------------
# Scene meshes
# --------------------------------------------------------------------------------------------------------------
def read_obj_vertices(path: str) -> np.ndarray:
    """All ``v`` records of an OBJ file, in file order, as float64 ``[n, 3]`` (colours / w are ignored).

    This is the vertex list open3d's ``read_triangle_mesh`` returns. ``trimesh.load(process=False,
    maintain_order=True)`` keeps the order too, but drops trailing vertices no face references and returns no
    vertices for a face-less file, so the records are read directly.

    A file that does not end with a line break, or whose faces name vertices it lacks, was cut short (an
    interrupted download or copy) and is a :class:`DataError`.
    """
    require_file(path, 'scene mesh')
    with open(path, 'rb') as f:
        text = f.read()
    rows = _OBJ_VERTEX.findall(text)
    try:
        vertices = np.array(rows, dtype=np.float64).reshape(-1, 3)
    except ValueError as exc:
        raise DataError(f"scene mesh '{path}' has a vertex line that is not three numbers: {exc}") from exc
    if len(vertices) == 0:
        raise DataError(f"scene mesh '{path}' has no vertices ('v x y z' lines)")
    if text.strip() and not text.endswith((b'\n', b'\r')):
        raise DataError(f"scene mesh '{path}' ends in the middle of a line: the file is cut short (interrupted "
                        f"download or copy?); {len(vertices)} vertices were read")
    faces = b' '.join(_OBJ_FACE.findall(text))
    if faces:
        largest = max(int(i) for i in _OBJ_INDEX.findall(b' ' + faces))
        if largest > len(vertices):
            raise DataError(f"scene mesh '{path}' has faces using vertex {largest} but only {len(vertices)} "
                            "vertices: the file is cut short or damaged")
    return vertices


class SceneMeshCache:
    """Scene-mesh vertices (scene frame, float64, read-only) by scene name, each file read once."""

    def __init__(self, dataset_root: str):
        self.dataset_root = dataset_root
        self._vertices: Dict[str, np.ndarray] = {}

    def vertices(self, scene: str) -> np.ndarray:
        if scene not in self._vertices:
            path = egobody.scene_mesh_path(self.dataset_root, scene)
            vertices = read_obj_vertices(path)
            vertices.setflags(write=False)
            log.info('loaded scene mesh %s: %d vertices', path, len(vertices))
            self._vertices[scene] = vertices
        return self._vertices[scene]

    def __len__(self) -> int:
        return len(self._vertices)


# --------------------------------------------------------------------------------------------------------------
# Decimation
# --------------------------------------------------------------------------------------------------------------
def decimate_every_kth(points: np.ndarray, target: int, what: str = 'crop') -> np.ndarray:
    """Keep every k-th point (``k = floor(n / target)``) and the first ``target`` of those.

    With ``n < target`` points the crop is padded by cyclic repetition (``points[i % n]``) and a warning naming
    ``what`` is logged. No points at all is a :class:`DataError` (nothing to pad with).
    """
    points = np.asarray(points)
    n = len(points)
    if target < 1:
        raise ValueError(f"--scene_verts_num_target must be >= 1, got {target}")
    if n == 0:
        raise DataError(f"{what}: the crop holds no scene points (check the calibration / centre of this frame)")
    if n < target:
        log.warning('%s: only %d scene points in the crop, fewer than %d; padded by repetition', what, n, target)
        return points[np.arange(target) % n]
    k = n // target
    return points[::k][:target]


# --------------------------------------------------------------------------------------------------------------
# Stage 1: scene in front of the camera
# --------------------------------------------------------------------------------------------------------------
def crop_in_front_of_camera(scene_points: np.ndarray, T_kinect2scene: np.ndarray, T_kinect2pv: np.ndarray,
                            target: int = SCENE_VERTS_NUM_TARGET, what: str = 'crop') -> Tuple[np.ndarray, int]:
    """Stage-1 crop: scene vertices with ``z > 0`` in the PV (OpenCV) frame, decimated, in the Kinect frame.

    Args:
        scene_points: ``[n, 3]`` scene-mesh vertices (scene frame).
        T_kinect2scene: 4x4 ``kinect12_to_world['trans']`` of the recording.
        T_kinect2pv: 4x4 master Kinect -> PV (OpenCV) of the frame (:func:`utils.egobody.kinect_to_pv`).
    Returns:
        (``[target, 3]`` float64 points in the master-Kinect frame, number of points in front of the camera).
    """
    T_scene2kinect = np.linalg.inv(np.asarray(T_kinect2scene, dtype=np.float64))
    T_scene2pv = np.asarray(T_kinect2pv, dtype=np.float64) @ T_scene2kinect
    depth = scene_points @ T_scene2pv[2, :3] + T_scene2pv[2, 3]
    front = scene_points[depth > 0]
    chosen = decimate_every_kth(front, target, what)
    return transform_points(chosen.astype(np.float64), T_scene2kinect), len(front)


def s1_saved_frames(recordings: Sequence[str], every: int = S1_SAVE_EVERY) -> np.ndarray:
    """Index of the saved frame each frame maps to.

    A frame is saved when its index is a multiple of ``every`` or its recording differs from the previous
    frame's; every frame maps to the most recent saved frame, which is therefore always of its own recording.
    """
    saved = np.empty(len(recordings), dtype=np.int64)
    last = -1
    for i, recording in enumerate(recordings):
        if i % every == 0 or recording != recordings[i - 1]:
            last = i
        saved[i] = last
    return saved


# --------------------------------------------------------------------------------------------------------------
# Stage 2: yawed cube around a centre
# --------------------------------------------------------------------------------------------------------------
def frame_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of one frame: depends only on (seed, frame index), so partial reruns agree."""
    return np.random.default_rng([int(seed), int(index)])


def yawed_offsets(points: np.ndarray, centre: np.ndarray, theta: float) -> Tuple[np.ndarray, np.ndarray]:
    """x and z offsets from ``centre`` after rotating ``points`` by ``theta`` about the y axis through it.

    Uses :func:`utils.geometry.rotation_about_y`: ``x' = cos(t) dx + sin(t) dz``, ``z' = -sin(t) dx + cos(t) dz``.
    """
    c, s = np.cos(theta), np.sin(theta)
    dx = points[:, 0] - centre[0]
    dz = points[:, 2] - centre[2]
    return c * dx + s * dz, c * dz - s * dx


def cube_shift_bounds(body_points: np.ndarray, centre: np.ndarray, theta: float,
                      cube_size: float = CUBE_SIZE) -> Tuple[Tuple[float, float], Tuple[float, float]]:
    """Allowed (low, high) of the footprint shift along the yawed x and z axes (as the original train script draws it).

    Each shift lies within ``±cube_size / 4`` and keeps the yawed body extent inside the footprint:
    ``low = max(-cube/4, (max_body - c) - cube/2)``, ``high = min(cube/4, cube/2 - (c - min_body))``.
    """
    bx, bz = yawed_offsets(body_points, centre, theta)
    half, quarter = cube_size / 2.0, cube_size / 4.0
    bounds = []
    for offsets in (bx, bz):
        bounds.append((max(-quarter, float(offsets.max()) - half), min(quarter, half + float(offsets.min()))))
    return bounds[0], bounds[1]


def draw_cube_yaw_and_shift(rng: np.random.Generator, body_points: Optional[np.ndarray], centre: np.ndarray,
                            cube_size: float = CUBE_SIZE, what: str = 'crop') -> Tuple[float, Tuple[float, float]]:
    """Draw the yaw ``theta ~ U[0, 2 pi)``, then (with ``body_points``) the shift ``(sx, sz)``; else no shift.

    The shift draws ``U[low, high]`` from :func:`cube_shift_bounds`; should a body be wider than the footprint
    (low > high along an axis) the footprint is centred between the two bounds on that axis (the same random
    number is consumed, so the following draws do not change) and a warning naming ``what`` is logged.
    """
    theta = float(rng.uniform(0.0, 2.0 * np.pi))
    if body_points is None:
        return theta, (0.0, 0.0)
    shift = []
    for axis, (low, high) in zip('xz', cube_shift_bounds(body_points, centre, theta, cube_size)):
        if low <= high:
            shift.append(float(rng.uniform(low, high)))
        else:
            rng.uniform()
            shift.append(0.5 * (low + high))
            log.warning('%s: the body is wider than --cube_size %g along the yawed %s axis; the crop is centred on it',
                        what, cube_size, axis)
    return theta, (shift[0], shift[1])


def cube_mask(scene_points: np.ndarray, centre: np.ndarray, theta: float, shift: Sequence[float] = (0.0, 0.0),
              cube_size: float = CUBE_SIZE) -> np.ndarray:
    """Boolean mask of the scene points inside the yawed, shifted prism (see :func:`cube_crop`)."""
    half = cube_size / 2.0
    x, z = yawed_offsets(scene_points, centre, theta)
    mask = (np.abs(x - shift[0]) <= half) & (np.abs(z - shift[1]) <= half)
    if mask.any():
        heights = scene_points[:, 1]
        mask &= heights <= heights[mask].min() + cube_size
    return mask


def cube_crop(scene_points: np.ndarray, centre: np.ndarray, theta: float, shift: Sequence[float] = (0.0, 0.0),
              cube_size: float = CUBE_SIZE, target: int = SCENE_VERTS_NUM_TARGET,
              what: str = 'crop') -> Tuple[np.ndarray, int]:
    """Stage-2 crop around ``centre`` (scene frame, y up).

    The points are yawed by ``theta`` about the vertical axis through ``centre``; those whose yawed x and z lie
    within ``cube_size / 2`` of ``centre + shift`` are kept, then those at most ``cube_size`` above the lowest kept
    point. The survivors are decimated in vertex order and returned in the scene frame (undoing the yaw returns
    the original coordinates, so they are taken from ``scene_points`` directly).

    Returns:
        (``[target, 3]`` float64 scene-frame points, number of points inside the prism).
    """
    centre = np.asarray(centre, dtype=np.float64).reshape(3)
    inside = scene_points[cube_mask(scene_points, centre, theta, shift, cube_size)]
    return decimate_every_kth(inside, target, what).astype(np.float64), len(inside)


# --------------------------------------------------------------------------------------------------------------
# Frames, body model, outputs
# --------------------------------------------------------------------------------------------------------------
def cube_output_path(save_root: str, split: str, imgname: str) -> str:
    """``<save_root>/<split>/<rec>/<date>/<frame>.npy``, the layout the cube-mode dataset reads."""
    recording, date, frame = egobody.parse_imgname(imgname)
    return os.path.join(save_root, split, recording, date, frame + '.npy')


def scene_to_pv_of_frame(dataset_root: str, imgname: str) -> np.ndarray:
    """Scene mesh frame -> PV (OpenCV) 4x4 of the frame named ``imgname``."""
    recording, _, _ = egobody.parse_imgname(imgname)
    scene = egobody.scene_of(dataset_root, recording)
    T_kinect2holo, T_holo2pv = egobody.frame_transforms(dataset_root, imgname)
    return egobody.scene_to_pv(egobody.load_kinect_to_scene(dataset_root, recording, scene), T_kinect2holo, T_holo2pv)


def smpl_genders(genders: Iterable, imgnames: Sequence[str]) -> List[str]:
    """npz ``gender`` values -> ``'male'`` / ``'female'``; any other value is an error naming the frame."""
    names = []
    for value, imgname in zip(genders, imgnames):
        text = value.decode() if isinstance(value, bytes) else str(value)
        if text.strip() == 'm':
            names.append('male')
        elif text.strip() == 'f':
            names.append('female')
        else:
            raise DataError(f"npz key 'gender' of frame '{imgname}' is {text!r}, expected 'm' or 'f'")
    return names


def smpl_vertices(models: dict, genders: Sequence[str], params: Dict[str, np.ndarray]) -> np.ndarray:
    """Posed SMPL vertices ``[B, 6890, 3]`` (float64), one batched forward pass per gender present.

    ``params`` holds ``betas [B,10]``, ``global_orient [B,3]``, ``body_pose [B,69]``, ``transl [B,3]``;
    ``models`` maps each gender name to an ``smplx.SMPL``.
    """
    import torch

    genders = np.asarray(genders)
    out = None
    for gender in np.unique(genders):
        rows = np.flatnonzero(genders == gender)
        model = models[str(gender)]
        device = next(model.buffers()).device
        inputs = {k: torch.as_tensor(np.asarray(v)[rows], dtype=torch.float32, device=device)
                  for k, v in params.items()}
        with torch.no_grad():
            vertices = model(**inputs).vertices.cpu().numpy().astype(np.float64)
        if out is None:
            out = np.empty((len(genders),) + vertices.shape[1:], dtype=np.float64)
        out[rows] = vertices
    return out


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# --------------------------------------------------------------------------------------------------------------
# Command-line plumbing shared by the scripts
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Summary:
    """Counts reported by every preprocessing script on its last line."""
    frames: int = 0
    written: int = 0
    padded: int = 0
    skipped: int = 0

    def line(self, save_root: str) -> str:
        return (f'done: {self.frames} frames processed, {self.written} crops written, {self.padded} padded crops, '
                f'{self.skipped} frames skipped (existing); outputs in {save_root}')


def base_parser(description: str, split_default: str, save_folder: str,
                uses_body_model: bool) -> argparse.ArgumentParser:
    """The flags all three scripts share (the original scripts' names and defaults)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--scene_verts_num_target', type=int, default=SCENE_VERTS_NUM_TARGET,
                        help='number of scene points stored per crop (every-k-th-vertex decimation)')
    parser.add_argument('--split', default=split_default, choices=egobody.SPLITS,
                        help='EgoBody split: reads annotation_egocentric_smpl_npz/egocapture_<split>_smpl.npz')
    parser.add_argument('--data_root', default=DEFAULT_DATA_ROOT,
                        help='EgoBody root (data_info_release.csv, transf_matrices_all_seqs.pkl, calibrations/, '
                             'scene_mesh/, annotation_egocentric_smpl_npz/); any depth works')
    parser.add_argument('--save_root', default=None,
                        help=f'output folder; default <data_root>/{save_folder}, where the dataset reads it')
    parser.add_argument('--data_dir', default='data',
                        help='folder holding smpl/smpl/SMPL_{MALE,FEMALE}.pkl' if uses_body_model else
                        'body-model folder; not used by this script (accepted so all preprocessing scripts share '
                        'one command line)')
    add_bool_flag(parser, '--skip_existing', False, 'keep outputs that already exist instead of recomputing them')
    return parser


def add_cube_flags(parser: argparse.ArgumentParser) -> None:
    """Flags the two stage-2 scripts add to the shared ones."""
    parser.add_argument('--cube_size', type=float, default=CUBE_SIZE,
                        help='side of the square footprint and height above the floor of the crop, metres')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the per-frame yaw (and, for the GT crops, shift); frame i uses numpy '
                             'default_rng([seed, i]), so reruns give identical files')


def pending_cube_frames(imgnames: Sequence[str], save_root: str, split: str, skip_existing: bool,
                        summary: Summary) -> List[int]:
    """Indices of the frames to crop: all, or with ``skip_existing`` those without an output file yet."""
    todo = []
    for i, name in enumerate(imgnames):
        if skip_existing and os.path.isfile(cube_output_path(save_root, split, name)):
            summary.skipped += 1
        else:
            todo.append(i)
    return todo


def write_cube_crop(path: str, scene_points: np.ndarray, centre: np.ndarray, theta: float, shift: Sequence[float],
                    cube_size: float, target: int, summary: Summary, what: str) -> None:
    """:func:`cube_crop` one frame, save it atomically to ``path`` and count it in ``summary``."""
    crop, available = cube_crop(scene_points, centre, theta, shift, cube_size, target, what=what)
    atomic_np_save(path, crop)
    summary.frames += 1
    summary.written += 1
    summary.padded += available < target


def flags_error(args: argparse.Namespace) -> str:
    """A one-line reason when a flag value cannot work (checked before any data is read), else ''."""
    error = finite_float_flags_error(args)
    if error:
        return error
    if args.scene_verts_num_target < 1:
        return f"--scene_verts_num_target must be >= 1, got {args.scene_verts_num_target}"
    if getattr(args, 'cube_size', 1.0) <= 0:
        return f"--cube_size must be > 0 (metres), got {args.cube_size}"
    return ''


def resolve_save_root(args: argparse.Namespace, save_folder: str) -> str:
    return args.save_root if args.save_root else os.path.join(args.data_root, save_folder)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')


def run_script(parser: argparse.ArgumentParser, run, save_folder: str, argv=None) -> 'Summary':
    """Parse flags, run ``run(args)``, print the summary line; a DataError ends the script with one line."""
    args = parser.parse_args(argv)
    error = flags_error(args) or output_dir_error(resolve_save_root(args, save_folder), '--save_root')
    if error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(2)
    setup_logging()
    try:
        summary = run(args)
    except DataError as exc:
        sys.exit(f'error: {error_line(exc)}')
    print(summary.line(resolve_save_root(args, save_folder)))
    return summary
