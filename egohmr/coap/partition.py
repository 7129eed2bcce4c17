"""Split an SMPL-format body into COAP's 16 rigid parts (as COAP's partitioner).

Every vertex takes the joint with its largest skinning weight. Eight small joints are then merged into their
parents, which leaves 16 parts. For each part we keep

* its own faces ("tight" faces),
* its faces plus those of its parent and children in the merged tree ("extended" faces),
* its vertices (used for the part bounding boxes).

All of this is a deterministic function of the body model's faces, skinning weights and kinematic parents, so the
buffers can always be recomputed from the body model instead of being trusted from a checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import torch
import torch.nn as nn

from egohmr.coap.sampling import FaceSetIndex
from utils.body_model import NUM_SMPL_JOINTS
from utils.tensors import to_numpy

# Joints merged into their parent, in the order the merges are applied (descending joint index):
# hands -> wrists, head -> neck, collars -> spine3, toes -> ankles, spine1 -> pelvis.
MERGED_JOINTS = (23, 22, 15, 14, 13, 11, 10, 3)
# The joints that keep a part of their own; part k belongs to PART_JOINTS[k].
PART_JOINTS = tuple(j for j in range(NUM_SMPL_JOINTS) if j not in MERGED_JOINTS)
NUM_PARTS = len(PART_JOINTS)  # 16
# Buffers whose sizes depend on the body mesh (and so differ between the real SMPL and a synthetic stand-in).
PART_TABLE_NAMES = ('tight_face_tensor', 'extended_face_tensor', 'tight_vert_selector')


@dataclass
class BodyPartition:
    """The outcome of :func:`partition_body` (numpy arrays, unpadded lists per part)."""

    vertex_labels: np.ndarray          # [V] joint label of every vertex after merging
    face_labels: np.ndarray            # [F] majority label of every face
    merged_parents: np.ndarray         # [24] kinematic parents after re-parenting the merged joints' children
    tight_faces: List[np.ndarray]      # 16 arrays [Ft_k, 3]
    extended_faces: List[np.ndarray]   # 16 arrays [Fe_k, 3]
    part_vertices: List[np.ndarray]    # 16 arrays [V_k] of vertex indices


def merge_labels(labels: np.ndarray, parents: Sequence[int]):
    """Merge :data:`MERGED_JOINTS` into their parents.

    Returns ``(labels, merged_parents, label_of_joint)``: the relabelled array, the kinematic table with the
    children of every merged joint re-parented, and for each joint the label its vertices carry after merging.
    """
    labels = np.array(labels, dtype=np.int64, copy=True)
    merged_parents = np.array(parents, dtype=np.int64, copy=True)[:NUM_SMPL_JOINTS]
    label_of_joint = np.arange(NUM_SMPL_JOINTS)
    for joint in MERGED_JOINTS:
        target = merged_parents[joint]
        labels[labels == joint] = target
        label_of_joint[joint] = target
        merged_parents[merged_parents == joint] = target
    return labels, merged_parents, label_of_joint


def majority_face_labels(faces: np.ndarray, vertex_labels: np.ndarray) -> np.ndarray:
    """Label each face by the most common label of its UNIQUE vertex ids; ties take the smallest label.

    As the original, which takes a face's vertex ids, applies ``np.unique`` and then ``bincount(...).argmax()``:
    a degenerate face that repeats a vertex counts that vertex once (``[a, a, b]`` with labels 3 and 1 is a 1-1
    tie, so label 1), not twice.
    """
    faces = np.asarray(faces)
    a, b, c = (vertex_labels[faces[:, i]] for i in range(3))
    smallest = np.minimum(np.minimum(a, b), c)
    majority = np.where((a == b) | (a == c), a, np.where(b == c, b, smallest))
    # With a repeated vertex id there are at most two distinct vertices, each counted once: equal labels give that
    # label, different ones a 1-1 tie -- the smaller label either way.
    distinct = (faces[:, 0] != faces[:, 1]) & (faces[:, 0] != faces[:, 2]) & (faces[:, 1] != faces[:, 2])
    return np.where(distinct, majority, smallest)


def partition_body(faces: np.ndarray, lbs_weights: np.ndarray, parents: Sequence[int]) -> BodyPartition:
    """Compute the 16-part partition of a mesh from its faces ``[F, 3]`` and skinning weights ``[V, 24]``."""
    faces = np.asarray(faces, dtype=np.int64)
    lbs_weights = np.asarray(lbs_weights)
    if lbs_weights.ndim != 2 or lbs_weights.shape[1] < NUM_SMPL_JOINTS:
        raise ValueError(f"COAP partition: skinning weights must be [V, 24], got {list(lbs_weights.shape)}")
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.min() < 0 or faces.max() >= len(lbs_weights):
        raise ValueError(f"COAP partition: faces must be [F, 3] indices into {len(lbs_weights)} vertices")
    raw_labels = lbs_weights[:, :NUM_SMPL_JOINTS].argmax(axis=1)
    vertex_labels, merged_parents, label_of_joint = merge_labels(raw_labels, parents)
    face_labels = majority_face_labels(faces, vertex_labels)

    tight_faces, extended_faces, part_vertices = [], [], []
    for joint in PART_JOINTS:
        parent = merged_parents[joint]
        neighbour_labels = {label_of_joint[child] for child in range(NUM_SMPL_JOINTS)
                            if merged_parents[child] == joint}
        neighbour_labels.add(joint)
        if parent >= 0:
            neighbour_labels.add(label_of_joint[parent])
        own = face_labels == joint
        extended = np.isin(face_labels, sorted(neighbour_labels))
        verts = np.flatnonzero(vertex_labels == joint)
        if not own.any() or verts.size == 0:
            raise ValueError(f"COAP partition: body part of joint {joint} has no faces or vertices "
                             "(the skinning weights never favour it)")
        tight_faces.append(faces[own])
        extended_faces.append(faces[extended])
        part_vertices.append(verts)
    return BodyPartition(vertex_labels, face_labels, merged_parents, tight_faces, extended_faces, part_vertices)


def pad_stack(arrays: Sequence[np.ndarray], fill=None, dtype=None) -> np.ndarray:
    """Stack arrays of different lengths along a new first axis, padding the ends.

    ``fill=None`` repeats each array's first element; otherwise the constant ``fill`` is used.
    """
    length = max(len(a) for a in arrays)
    out = np.empty((len(arrays), length) + arrays[0].shape[1:], dtype=dtype or arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, :len(a)] = a
        out[i, len(a):] = a[0] if fill is None else fill
    return out


class Partitioner(nn.Module):
    """COAP's part tables as buffers (state_dict names ``parents``, ``joint_mapper``, ``tight_face_tensor``,
    ``extended_face_tensor``, ``tight_vert_selector``), built from a body model's faces and skinning weights.

    ``parents`` holds the original SMPL kinematic parents (used to chain bone rotations);
    the re-parented table exists only while partitioning.
    """

    def __init__(self, faces, lbs_weights, parents):
        super().__init__()
        parents = np.asarray(parents, dtype=np.int64)[:NUM_SMPL_JOINTS]
        partition = partition_body(np.asarray(faces), np.asarray(lbs_weights), parents)
        joint_mapper = np.zeros(NUM_SMPL_JOINTS, dtype=bool)
        joint_mapper[list(PART_JOINTS)] = True
        self.register_buffer('parents', torch.from_numpy(parents.copy()))
        self.register_buffer('joint_mapper', torch.from_numpy(joint_mapper))
        self.register_buffer('tight_face_tensor',
                             torch.from_numpy(pad_stack(partition.tight_faces, fill=-1, dtype=np.int32)))
        self.register_buffer('extended_face_tensor',
                             torch.from_numpy(pad_stack(partition.extended_faces, fill=-1, dtype=np.int32)))
        self.register_buffer('tight_vert_selector',
                             torch.from_numpy(pad_stack(partition.part_vertices, dtype=np.int64)))
        self.num_parts = NUM_PARTS
        self._face_set_index = None

    def face_set_index(self) -> FaceSetIndex:
        """:class:`~egohmr.coap.sampling.FaceSetIndex` of ``(tight_face_tensor, extended_face_tensor)``, rebuilt
        whenever either buffer is replaced or written to (``.to(device)``, ``load_state_dict``)."""
        tables = (self.tight_face_tensor, self.extended_face_tensor)
        key = tuple((t.data_ptr(), t._version, t.device) for t in tables)
        if self._face_set_index is None or self._face_set_index[0] != key:
            self._face_set_index = (key, FaceSetIndex(tables))
        return self._face_set_index[1]

    @classmethod
    def from_body_model(cls, body_model) -> 'Partitioner':
        """Build from an smplx SMPL module (uses ``faces``, ``lbs_weights`` and ``parents``)."""
        return cls(*body_model_tables(body_model))


def body_model_tables(body_model):
    """``(faces [F,3], lbs_weights [V,24], parents [24])`` as numpy arrays from an smplx-style body model."""
    for name in ('faces', 'lbs_weights', 'parents'):
        if not hasattr(body_model, name):
            raise ValueError(f"COAP needs a body model with '{name}' (an smplx SMPL module), "
                             f"got {type(body_model).__name__}")
    faces = body_model.faces_tensor if hasattr(body_model, 'faces_tensor') else body_model.faces
    return to_numpy(faces).astype(np.int64), to_numpy(body_model.lbs_weights), to_numpy(body_model.parents)
