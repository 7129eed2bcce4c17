"""A synthetic stand-in for the licensed SMPL body model files.

The body is a smooth union of capsules, tapered capsules and ellipsoids placed on SMPL-like rest joints (T-pose,
metres, y up, facing +z, the body's left on +x). Its signed distance is sampled on a grid, meshed with marching
cubes and decimated to exactly SMPL's 6890 vertices / 13776 faces (a closed genus-0 mesh has F = 2V - 4). The
vertex order is then permuted so that the landmark vertex ids smplx uses as extra joints (nose, eyes, ears, toes,
heels, finger tips) lie at those anatomical spots.

On top of the mesh we derive the other SMPL fields: smooth skinning weights from distances to the bones, a sparse
joint regressor that reproduces the rest joints, ten shape directions (height, girth, shoulder/hip width, ...),
small pose correctives, and male/female templates as fixed shape offsets of the neutral one.

:func:`build_body_models` returns the three dicts; :func:`write_body_model_files` writes them (plus the mean
parameters and the mocap pose file) in the layout ``smplx.create(<data_dir>/smpl, model_type='smpl')`` reads.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import scipy.sparse as sp
from scipy.optimize import lsq_linear
from scipy.spatial import cKDTree

from utils.body_model import NUM_SMPL_JOINTS, SMPL_PARENTS

NUM_VERTICES = 6890
NUM_FACES = 13776
NUM_BETAS = 10
ROOT_PARENT = 4294967295  # SMPL stores the root's parent as uint32(-1)

GRID_STEP = 0.008    # metres between SDF samples
GRID_MARGIN = 0.06   # space left around the body on every side of the grid
BLEND_K = 0.03       # smooth-min blending radius between body parts
TORSO_BLEND_K = 0.08  # softer blending inside the torso (pelvis, abdomen, chest)
TORSO_PARTS = ('pelvis', 'abdomen', 'chest')

# Left-side rest joints (x >= 0) of a ~1.75 m neutral body; right-side joints mirror them in x.
_HALF_JOINTS = {
    0: (0.0, -0.223, 0.028), 1: (0.069, -0.314, 0.023), 3: (0.0, -0.104, 0.012), 4: (0.104, -0.694, 0.016),
    6: (0.0, 0.027, 0.006), 7: (0.090, -1.091, -0.028), 9: (0.0, 0.081, 0.020), 10: (0.119, -1.145, 0.100),
    12: (0.0, 0.290, -0.013), 13: (0.075, 0.198, -0.005), 15: (0.0, 0.355, 0.035), 16: (0.172, 0.224, -0.017),
    18: (0.433, 0.214, -0.040), 20: (0.695, 0.222, -0.046), 22: (0.781, 0.210, -0.054),
}
LEFT_JOINTS = (1, 4, 7, 10, 13, 16, 18, 20, 22)


def _mirror(p):
    return np.array([-p[0], p[1], p[2]])


def rest_joints() -> np.ndarray:
    """The 24 neutral rest joints ``[24, 3]`` (T-pose, metres)."""
    joints = np.zeros((NUM_SMPL_JOINTS, 3))
    for j, p in _HALF_JOINTS.items():
        joints[j] = p
        if j in LEFT_JOINTS:
            joints[j + 1] = _mirror(p)
    return joints


# ----------------------------------------------------------------------------------------------------------------
# Shape primitives
# ----------------------------------------------------------------------------------------------------------------

class _Capsule:
    """A tapered capsule (radius r0 at a, r1 at b)."""

    def __init__(self, a, b, r0, r1=None):
        self.a, self.b = np.asarray(a, float), np.asarray(b, float)
        self.r0, self.r1 = float(r0), float(r0 if r1 is None else r1)

    def bounds(self):
        r = max(self.r0, self.r1)
        return np.minimum(self.a, self.b) - r, np.maximum(self.a, self.b) + r

    def distance(self, p):
        ab = self.b - self.a
        t = np.clip(((p - self.a) @ ab) / (ab @ ab), 0.0, 1.0)
        closest = self.a + t[..., None] * ab
        return np.linalg.norm(p - closest, axis=-1) - (self.r0 + t * (self.r1 - self.r0))


class _Ellipsoid:
    """An axis-aligned ellipsoid (bounded distance estimate, exact on the surface)."""

    def __init__(self, center, radii):
        self.c, self.r = np.asarray(center, float), np.asarray(radii, float)

    def bounds(self):
        return self.c - self.r, self.c + self.r

    def distance(self, p):
        q = p - self.c
        k0 = np.linalg.norm(q / self.r, axis=-1)
        k1 = np.linalg.norm(q / self.r ** 2, axis=-1)
        return k0 * (k0 - 1.0) / np.maximum(k1, 1e-9)

    def surface_point(self, direction):
        """The surface point hit by the ray from the centre along ``direction``."""
        d = np.asarray(direction, float)
        return self.c + d / np.linalg.norm(d / self.r)


def _smooth_min(a, b, k):
    """Polynomial smooth minimum: equals min(a, b) when |a - b| >= k."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _body_primitives(joints: np.ndarray, rng: np.random.Generator) -> dict:
    """Named primitives of the body, with a small seeded jitter of the thicknesses."""
    jit = lambda r: r * (1.0 + rng.uniform(-0.02, 0.02))  # noqa: E731  (one draw per call, in a fixed order)
    J = joints
    prims = {
        'pelvis': _Ellipsoid((0.0, -0.26, 0.0), (jit(0.165), 0.11, jit(0.115))),
        'abdomen': _Ellipsoid((0.0, -0.08, 0.015), (jit(0.145), 0.14, jit(0.105))),
        'chest': _Ellipsoid((0.0, 0.12, 0.0), (jit(0.165), 0.14, jit(0.11))),
        'neck': _Capsule((0.0, 0.25, -0.01), J[15], jit(0.052)),
        'head': _Ellipsoid((0.0, 0.465, 0.03), (jit(0.082), 0.115, 0.10)),
        'nose': _Capsule((0.0, 0.455, 0.11), (0.0, 0.445, 0.125), 0.016),
    }
    thigh, knee, ankle = jit(0.085), jit(0.055), jit(0.038)
    arm, elbow, wrist = jit(0.05), jit(0.04), jit(0.028)
    for side, sign in (('l', 1.0), ('r', -1.0)):
        o = 0 if sign > 0 else 1  # offset from the left joint index to this side's joint
        s = np.array([sign, 1.0, 1.0])
        prims[f'{side}_thigh'] = _Capsule(J[1 + o], J[4 + o], thigh, knee)
        prims[f'{side}_shin'] = _Capsule(J[4 + o], J[7 + o], knee, ankle)
        prims[f'{side}_foot'] = _Ellipsoid(s * (0.105, -1.145, 0.045), (0.048, 0.04, 0.125))
        prims[f'{side}_collar'] = _Capsule(s * (0.03, 0.21, -0.01), J[16 + o], 0.055)
        prims[f'{side}_upper_arm'] = _Capsule(J[16 + o], J[18 + o], arm, elbow)
        prims[f'{side}_forearm'] = _Capsule(J[18 + o], J[20 + o], elbow, wrist)
        wrist_pos = J[20 + o]
        prims[f'{side}_hand'] = _Ellipsoid(wrist_pos + s * (0.085, -0.005, 0.0), (0.095, 0.018, 0.045))
        prims[f'{side}_thumb'] = _Capsule(wrist_pos + s * (0.025, -0.008, 0.03),
                                          wrist_pos + s * (0.075, -0.012, 0.085), 0.011)
    return prims


def _landmark_targets(prims: dict) -> dict:
    """Anatomical points (on the primitives' surfaces) for smplx's landmark vertex names."""
    head = prims['head']
    nose = prims['nose']
    targets = {'nose': nose.b + np.array([0.0, 0.0, nose.r0])}
    for side, sign in (('l', 1.0), ('r', -1.0)):
        targets[f'{side}eye'] = head.surface_point((sign * 0.35, 0.2, 1.0))
        targets[f'{side}ear'] = head.surface_point((sign * 1.0, -0.05, -0.05))
        foot = prims[f'{side}_foot']
        big = 'LBigToe' if sign > 0 else 'RBigToe'
        small = 'LSmallToe' if sign > 0 else 'RSmallToe'
        heel = 'LHeel' if sign > 0 else 'RHeel'
        # The big toe is on the inner (medial) side of the foot front, the small toe on the outer side.
        targets[big] = foot.surface_point((-sign * 0.3, -0.1, 1.0))
        targets[small] = foot.surface_point((sign * 0.6, -0.1, 0.8))
        targets[heel] = foot.surface_point((0.0, -0.15, -1.0))
        hand = prims[f'{side}_hand']
        # Palm faces down in the T-pose; the index finger is towards the front (+z), the pinky towards the back.
        for name, z in (('index', 0.6), ('middle', 0.2), ('ring', -0.2), ('pinky', -0.6)):
            targets[f'{side}{name}'] = hand.surface_point((sign * 1.0, 0.0, z))
        thumb = prims[f'{side}_thumb']
        axis = (thumb.b - thumb.a) / np.linalg.norm(thumb.b - thumb.a)
        targets[f'{side}thumb'] = thumb.b + axis * thumb.r1
    return targets


# ----------------------------------------------------------------------------------------------------------------
# Meshing
# ----------------------------------------------------------------------------------------------------------------

def _sample_sdf(prims: dict):
    """Smooth-union signed distance on a regular grid; returns (values [X,Y,Z], grid origin)."""
    lows, highs = zip(*(p.bounds() for p in prims.values()))
    lo = np.min(lows, axis=0) - GRID_MARGIN
    hi = np.max(highs, axis=0) + GRID_MARGIN
    shape = np.ceil((hi - lo) / GRID_STEP).astype(int) + 1
    axes = [lo[i] + GRID_STEP * np.arange(shape[i]) for i in range(3)]

    def blend_into(field, prim, k):
        reach = 2 * k + 2 * GRID_STEP  # beyond this a primitive cannot change the sign near the surface
        p_lo, p_hi = prim.bounds()
        block = tuple(slice(max(0, int(np.floor((p_lo[i] - reach - lo[i]) / GRID_STEP))),
                            min(shape[i], int(np.ceil((p_hi[i] + reach - lo[i]) / GRID_STEP)) + 1))
                      for i in range(3))
        pts = np.stack(np.meshgrid(axes[0][block[0]], axes[1][block[1]], axes[2][block[2]], indexing='ij'), -1)
        field[block] = _smooth_min(field[block], prim.distance(pts), k)

    field = np.full(tuple(shape), 1.0)
    for name in TORSO_PARTS:
        blend_into(field, prims[name], TORSO_BLEND_K)
    for name, prim in prims.items():
        if name not in TORSO_PARTS:
            blend_into(field, prim, BLEND_K)
    return field, lo


def _mesh_body(prims: dict):
    """Watertight genus-0 mesh with exactly NUM_VERTICES vertices and NUM_FACES faces."""
    import fast_simplification
    from skimage.measure import marching_cubes

    field, origin = _sample_sdf(prims)
    if min(field[0].min(), field[-1].min(), field[:, 0].min(), field[:, -1].min(),
           field[:, :, 0].min(), field[:, :, -1].min()) <= 0:
        raise RuntimeError("synthetic body: the SDF grid border cuts the surface")
    verts, faces, _, _ = marching_cubes(field, level=0.0, spacing=(GRID_STEP,) * 3)
    verts = verts + origin
    # With the inside negative, skimage's default winding is already counter-clockwise seen from outside.
    # The decimator visits faces in order and would thin out the first-listed (-x) side; a fixed shuffle keeps the
    # vertex density even over the body. Another shuffle is tried if a decimation ever misses the exact count.
    for attempt in range(5):
        order = np.random.default_rng([12345, attempt]).permutation(len(faces))
        out_verts, out_faces = fast_simplification.simplify(verts, faces[order], target_count=NUM_FACES)
        out_faces = np.asarray(out_faces, dtype=np.int64)
        if len(out_verts) == NUM_VERTICES and _is_closed_manifold(out_faces):
            return np.asarray(out_verts, dtype=np.float64), out_faces
    raise RuntimeError(f"synthetic body: decimation gave {len(out_verts)} vertices / {len(out_faces)} faces, "
                       f"expected a closed mesh with {NUM_VERTICES} / {NUM_FACES}")


def _is_closed_manifold(faces: np.ndarray) -> bool:
    """Every edge is shared by exactly two faces, once in each direction (closed, consistently wound)."""
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    if len(np.unique(directed, axis=0)) != len(directed):
        return False
    _, counts = np.unique(np.sort(directed, axis=1), axis=0, return_counts=True)
    return bool(np.all(counts == 2)) and len(faces) == NUM_FACES


def _place_landmarks(verts: np.ndarray, faces: np.ndarray, targets: dict):
    """Permute vertices so that smplx's landmark ids are the vertices nearest their anatomical targets."""
    from smplx.vertex_ids import vertex_ids

    landmark_ids = vertex_ids['smplh']
    tree = cKDTree(verts)
    new_to_old = np.full(len(verts), -1, dtype=np.int64)
    taken = np.zeros(len(verts), dtype=bool)
    for name in sorted(landmark_ids):
        _, candidates = tree.query(targets[name], k=8)
        old = next(int(c) for c in candidates if not taken[c])
        new_to_old[landmark_ids[name]] = old
        taken[old] = True
    new_to_old[new_to_old < 0] = np.flatnonzero(~taken)
    old_to_new = np.empty_like(new_to_old)
    old_to_new[new_to_old] = np.arange(len(verts))
    return verts[new_to_old], old_to_new[faces]


# ----------------------------------------------------------------------------------------------------------------
# Skinning, joint regressor, shape and pose blend shapes
# ----------------------------------------------------------------------------------------------------------------

def _bone_segments(joints: np.ndarray):
    """For each joint, the segment (start, end) it moves and a nominal thickness; used for skinning."""
    J = joints
    starts, ends, radii = np.zeros((NUM_SMPL_JOINTS, 3)), np.zeros((NUM_SMPL_JOINTS, 3)), np.zeros(NUM_SMPL_JOINTS)

    def bone(j, a, b, r):
        starts[j], ends[j], radii[j] = a, b, r

    bone(0, J[0] + (0.0, -0.08, 0.0), J[3], 0.13)
    bone(3, J[3], J[6], 0.13)
    bone(6, J[6], J[9], 0.13)
    bone(9, J[9], J[12], 0.12)
    bone(12, J[12], J[15], 0.05)
    bone(15, J[15], (0.0, 0.56, 0.03), 0.09)
    for o, sign in ((0, 1.0), (1, -1.0)):
        s = np.array([sign, 1.0, 1.0])
        bone(1 + o, J[1 + o], J[4 + o], 0.07)
        bone(4 + o, J[4 + o], J[7 + o], 0.045)
        bone(7 + o, J[7 + o], J[10 + o], 0.04)
        bone(10 + o, J[10 + o], J[10 + o] + (0.0, -0.01, 0.07), 0.035)
        bone(13 + o, J[13 + o], J[16 + o], 0.05)
        bone(16 + o, J[16 + o], J[18 + o], 0.045)
        bone(18 + o, J[18 + o], J[20 + o], 0.033)
        bone(20 + o, J[20 + o], J[22 + o], 0.025)
        bone(22 + o, J[22 + o], J[22 + o] + s * (0.09, 0.0, 0.0), 0.02)
    return starts, ends, radii


def _segment_distances(points: np.ndarray, starts: np.ndarray, ends: np.ndarray):
    """Distances [N, B] from points to segments and the closest points [N, B, 3]."""
    ab = ends - starts                                               # [B, 3]
    t = np.einsum('nbk,bk->nb', points[:, None] - starts[None], ab) / np.sum(ab * ab, axis=1)
    closest = starts[None] + np.clip(t, 0.0, 1.0)[..., None] * ab[None]
    return np.linalg.norm(points[:, None] - closest, axis=-1), closest


def _cylinder_distances(points: np.ndarray, starts: np.ndarray, ends: np.ndarray, radii: np.ndarray):
    """Signed distances [N, B] from points to flat-capped cylinders around the segments."""
    ab = ends - starts
    length = np.linalg.norm(ab, axis=1)
    axial = np.einsum('nbk,bk->nb', points[:, None] - starts[None], ab / length[:, None])
    foot = starts[None] + axial[..., None] * (ab / length[:, None])[None]
    radial = np.linalg.norm(points[:, None] - foot, axis=-1) - radii[None]
    beyond = np.abs(axial - 0.5 * length[None]) - 0.5 * length[None]
    outside = np.sqrt(np.maximum(radial, 0.0) ** 2 + np.maximum(beyond, 0.0) ** 2)
    return outside + np.minimum(np.maximum(radial, beyond), 0.0)


def _vertex_adjacency(faces: np.ndarray, n: int) -> sp.csr_matrix:
    """Row-normalised vertex adjacency (mean over the 1-ring)."""
    i = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2], faces[:, 1], faces[:, 2], faces[:, 0]])
    j = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0], faces[:, 0], faces[:, 1], faces[:, 2]])
    adj = sp.csr_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    adj.data[:] = 1.0
    return sp.diags(1.0 / np.asarray(adj.sum(axis=1)).ravel()) @ adj


SKIN_TEMPERATURE = 0.012  # metres; softmax temperature of the distance-to-bone-surface scores
SKIN_SMOOTHING = 8        # Laplacian smoothing iterations of the skinning weights


def _skinning_weights(verts, faces, joints) -> np.ndarray:
    """Smooth LBS weights [V, 24] from distances to each joint's bone surface, Laplacian-smoothed."""
    starts, ends, radii = _bone_segments(joints)
    score = -_cylinder_distances(verts, starts, ends, radii) / SKIN_TEMPERATURE
    weights = np.exp(score - score.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    mean_ring = _vertex_adjacency(faces, len(verts))
    for _ in range(SKIN_SMOOTHING):
        weights = 0.5 * weights + 0.5 * (mean_ring @ weights)
    weights[weights < 1e-6] = 0.0
    return weights / weights.sum(axis=1, keepdims=True)


def _joint_regressor(verts: np.ndarray, joints: np.ndarray) -> sp.csc_matrix:
    """Sparse [24, V] regressor with non-negative rows summing to 1 and ``R @ verts == joints``.

    Each joint is a convex combination of the vertices around it: a ball around the joint grows until the joint
    lies inside the hull of the vertices it holds, then a bounded least-squares fit close to uniform weights
    matches the joint exactly.
    """
    tree = cKDTree(verts)
    rows, cols, vals = [], [], []
    for j, joint in enumerate(joints):
        nearest, _ = tree.query(joint)
        for factor in (1.6, 2.0, 2.5, 3.0, 4.0, 6.0):
            idx = np.array(sorted(tree.query_ball_point(joint, nearest * factor + 0.005)))
            k = len(idx)
            # Constraint rows (weighted strongly): position and partition of unity; regulariser: stay near uniform.
            A = np.vstack([100.0 * np.vstack([verts[idx].T, np.ones((1, k))]), 0.05 * np.eye(k)])
            b = np.concatenate([100.0 * np.append(joint, 1.0), 0.05 * np.full(k, 1.0 / k)])
            w = lsq_linear(A, b, bounds=(0.0, 1.0), method='bvls').x
            w = w / w.sum()
            if np.linalg.norm(w @ verts[idx] - joint) < 2e-4:
                break
        else:
            raise RuntimeError(f"synthetic body: cannot regress joint {j} from the vertices around it")
        keep = w > 1e-6
        rows.append(np.full(keep.sum(), j))
        cols.append(idx[keep])
        vals.append(w[keep] / w[keep].sum())
    reg = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                        shape=(NUM_SMPL_JOINTS, len(verts)))
    return reg


def _ramp(x, lo, hi):
    """0 below lo, 1 above hi, linear in between."""
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def _shape_directions(verts: np.ndarray, weights: np.ndarray, joints: np.ndarray) -> np.ndarray:
    """Ten displacement fields [V, 3, 10] (metres per unit of beta), smooth over the body.

    0 height, 1 girth, 2 shoulder width, 3 hip width, 4 leg length, 5 arm length, 6 head size,
    7 torso length, 8 belly/chest depth, 9 neck length.
    """
    x, y, z = verts.T
    J = joints
    part = lambda *js: weights[:, list(js)].sum(axis=1)  # noqa: E731
    arms = part(16, 17, 18, 19, 20, 21, 22, 23) + 0.5 * part(13, 14)
    torso = part(0, 3, 6, 9)
    head = part(15) + 0.5 * part(12)
    starts, ends, _ = _bone_segments(joints)
    dist, closest = _segment_distances(verts, starts, ends)
    radial = np.einsum('vj,vjk->vk', weights, verts[:, None] - closest)   # outward from the own bones
    zeros = np.zeros_like(x)

    dirs = np.zeros((len(verts), 3, NUM_BETAS))
    dirs[..., 0] = 0.025 * (verts - J[0]) * np.array([0.35, 1.0, 0.35])
    girth = 0.18 * torso + 0.12 * (1.0 - torso - head) + 0.03 * head
    dirs[..., 1] = radial * girth[:, None]
    dirs[..., 2] = np.stack([0.02 * np.sign(x) * arms, 0.005 * arms, zeros], axis=1)
    hips = np.exp(-((y - J[1, 1]) / 0.12) ** 2) * (1.0 - arms)
    dirs[..., 3] = np.stack([0.12 * x * hips, zeros, 0.05 * (z - J[0, 2]) * hips], axis=1)
    dirs[..., 4] = np.stack([zeros, -0.03 * _ramp(J[1, 1] - y, 0.0, J[1, 1] + 1.18), zeros], axis=1)
    dirs[..., 5] = np.stack([0.025 * np.sign(x) * _ramp(np.abs(x), J[16, 0], 0.87) * arms, zeros, zeros], axis=1)
    dirs[..., 6] = 0.08 * (verts - (0.0, 0.465, 0.03)) * head[:, None]
    dirs[..., 7] = np.stack([zeros, 0.025 * _ramp(y, J[0, 1], J[12, 1]), zeros], axis=1)
    belly = np.exp(-((y - J[3, 1]) / 0.15) ** 2) * torso
    dirs[..., 8] = np.stack([zeros, zeros, 0.12 * np.maximum(z - J[3, 2], 0.0) * belly], axis=1)
    dirs[..., 9] = np.stack([zeros, 0.015 * _ramp(y, J[12, 1] - 0.04, J[15, 1]), zeros], axis=1)
    return dirs


POSE_BULGE = 0.004  # metres of outward bulge per unit of (3 - trace R) next to a bent joint


def _pose_directions(verts, faces, weights) -> np.ndarray:
    """Pose correctives [V, 3, 207]: a small outward bulge around each bent joint.

    smplx multiplies them with the flattened (R_j - I) of joints 1..23; using only the diagonal entries makes the
    offset proportional to 3 - trace(R_j) = 2 (1 - cos angle), i.e. zero at rest and growing with the bend.
    """
    import trimesh

    normals = trimesh.Trimesh(verts, faces, process=False).vertex_normals
    dirs = np.zeros((len(verts), 3, 9 * (NUM_SMPL_JOINTS - 1)))
    for j in range(1, NUM_SMPL_JOINTS):
        around = np.clip(4.0 * weights[:, j] * weights[:, SMPL_PARENTS[j]], 0.0, 1.0)
        for d in (0, 4, 8):
            dirs[:, :, 9 * (j - 1) + d] = -POSE_BULGE * around[:, None] * normals
    return dirs


# Fixed shape offsets of the gendered templates from the neutral one (in units of the shape directions).
GENDER_BETAS = {
    'NEUTRAL': np.zeros(NUM_BETAS),
    'MALE': np.array([0.9, 0.3, 0.9, -0.6, 0.3, 0.4, 0.1, 0.2, 0.0, 0.2]),
    'FEMALE': np.array([-0.9, -0.3, -0.9, 1.0, -0.3, -0.4, -0.1, -0.2, 0.0, -0.2]),
}


@functools.lru_cache(maxsize=2)
def _neutral_model(seed: int) -> dict:
    """The expensive part, shared by the three genders (cached in memory per seed)."""
    rng = np.random.default_rng(seed)
    joints = rest_joints()
    prims = _body_primitives(joints, rng)
    verts, faces = _mesh_body(prims)
    verts, faces = _place_landmarks(verts, faces, _landmark_targets(prims))
    weights = _skinning_weights(verts, faces, joints)
    regressor = _joint_regressor(verts, joints)
    # Freeze the arrays: the cache hands out the same objects.
    model = dict(v_template=verts, f=faces, weights=weights, J_regressor=regressor,
                 shapedirs=_shape_directions(verts, weights, joints),
                 posedirs=_pose_directions(verts, faces, weights))
    for value in model.values():
        if isinstance(value, np.ndarray):
            value.setflags(write=False)
    return model


def _mirror_indices(verts: np.ndarray) -> np.ndarray:
    """For each vertex, the vertex nearest its mirror image across x = 0 (SMPL's ``vert_sym_idxs``)."""
    return cKDTree(verts).query(verts * np.array([-1.0, 1.0, 1.0]))[1].astype(np.int64)


def build_body_models(seed: int = 0) -> dict:
    """``{'NEUTRAL': d, 'MALE': d, 'FEMALE': d}``: SMPL pickle dicts sharing one mesh topology.

    The gendered templates are the neutral one moved along the shape directions (male taller with broader
    shoulders, female shorter with wider hips); their joints are regressed from their own templates.
    """
    base = _neutral_model(int(seed))
    kintree = np.stack([np.array(SMPL_PARENTS, dtype=np.int64), np.arange(NUM_SMPL_JOINTS, dtype=np.int64)])
    kintree[0, 0] = ROOT_PARENT
    sym = _mirror_indices(base['v_template'])
    models = {}
    for gender, betas in GENDER_BETAS.items():
        v_template = base['v_template'] + base['shapedirs'] @ betas
        regressor = base['J_regressor'].copy()
        models[gender] = {
            'v_template': v_template,
            'f': base['f'].astype(np.uint32),
            'J_regressor': regressor,
            'J_regressor_prior': regressor.copy(),
            'weights': base['weights'].copy(),
            'weights_prior': base['weights'].copy(),
            'kintree_table': kintree.copy(),
            'shapedirs': base['shapedirs'].copy(),
            'posedirs': base['posedirs'].copy(),
            'J': np.asarray(regressor @ v_template),
            'vert_sym_idxs': sym.copy(),
            'bs_style': 'lbs',
            'bs_type': 'lrotmin',
        }
    return models


def build_body_model(seed: int = 0) -> dict:
    """The neutral SMPL pickle dict (see :func:`build_body_models`)."""
    return build_body_models(seed)['NEUTRAL']


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------

MEAN_CAM = np.array([0.9, 0.0, 0.2], dtype=np.float32)  # weak-perspective (s, tx, ty), like ProHMR's mean
NUM_MOCAP = 2000


def mean_pose_rotmats() -> np.ndarray:
    """Mean pose ``[24, 3, 3]``: identity root, arms a little lowered, elbows and knees slightly bent."""
    from scipy.spatial.transform import Rotation

    rots = np.tile(np.eye(3), (NUM_SMPL_JOINTS, 1, 1))
    rest = {16: ('z', -10.0), 17: ('z', 10.0), 18: ('y', -10.0), 19: ('y', 10.0), 4: ('x', 5.0), 5: ('x', 5.0)}
    for joint, (axis, degrees) in rest.items():
        rots[joint] = Rotation.from_euler(axis, degrees, degrees=True).as_matrix()
    return rots


def mean_params() -> dict:
    """``smpl_mean_params.npz`` content: ``pose`` [144] (ProHMR 6D: per joint the first two rotation-matrix
    columns, [R00, R10, R20, R01, R11, R21]), ``shape`` [10], ``cam`` [3], all float32."""
    rots = mean_pose_rotmats()
    pose6d = np.concatenate([rots[:, :, 0], rots[:, :, 1]], axis=1).reshape(-1)
    return {'pose': pose6d.astype(np.float32), 'shape': np.zeros(NUM_BETAS, dtype=np.float32),
            'cam': MEAN_CAM.copy()}


def write_body_model_files(data_dir: str, seed: int = 0, num_mocap: int = NUM_MOCAP) -> dict:
    """Write the synthetic SMPL files, mean parameters and MoCap poses under ``data_dir``.

    - ``smpl/smpl/SMPL_{NEUTRAL,MALE,FEMALE}.pkl`` (plain pickles, protocol 2; ``smplx.create(data_dir/smpl,
      model_type='smpl', gender=...)`` loads them without chumpy);
    - ``smpl_mean_params.npz`` (``pose`` [144], ``shape`` [10], ``cam`` [3]);
    - ``datasets/cmu_mocap.npz`` (``body_pose`` [num_mocap, 72] with the global orient first, ``betas``).

    Deterministic in ``seed``; every file is written atomically, so reruns are safe. Returns the paths.
    """
    from synthetic.poses import sample_mocap
    from utils.io import atomic_np_savez, atomic_pickle_dump

    if int(num_mocap) < 1:
        raise ValueError(f"write_body_model_files: num_mocap must be >= 1, got {num_mocap}")
    paths = {}
    for gender, model in build_body_models(seed).items():
        paths[gender] = os.path.join(data_dir, 'smpl', 'smpl', f'SMPL_{gender}.pkl')
        atomic_pickle_dump(model, paths[gender], protocol=2)
    paths['mean_params'] = os.path.join(data_dir, 'smpl_mean_params.npz')
    atomic_np_savez(paths['mean_params'], **mean_params())
    body_pose, betas = sample_mocap(np.random.default_rng([int(seed), 1]), int(num_mocap))
    paths['mocap'] = os.path.join(data_dir, 'datasets', 'cmu_mocap.npz')
    atomic_np_savez(paths['mocap'], body_pose=body_pose.astype(np.float64), betas=betas.astype(np.float64))
    return paths
