"""Weight-free occupancy of a posed body from its own closed mesh.

Inside/outside comes from the generalised winding number (libigl's fast winding number): about 1 inside a closed
mesh, 0 outside, and still above 1/2 where the posed mesh overlaps itself, so the labels stay correct for
self-intersecting poses where ray parity fails.

:class:`ExactOccupancy` offers COAP's ``query`` / ``collision_loss`` interface. Its occupancy is a soft step of the
signed distance to the surface, ``sigmoid(±d / temperature)`` with the sign from the winding number, so
``occupancy > 0.5`` is exactly the inside test while the value is differentiable in the body's vertices: ``d`` is
recomputed in torch from the closest point's barycentric coordinates (found by libigl without gradients), which
gives the exact gradient of the point-to-mesh distance.
"""
from __future__ import annotations

import igl
import numpy as np
import torch
import torch.nn as nn

from egohmr.coap.model import LEVEL_SET
from utils.tensors import to_numpy


def _as_numpy(x, dtype) -> np.ndarray:
    return np.ascontiguousarray(to_numpy(x, dtype))


def winding_numbers(vertices, faces, points) -> np.ndarray:
    """Generalised winding numbers ``[N]`` of ``points [N,3]`` with respect to the mesh ``(vertices, faces)``."""
    points = _as_numpy(points, np.float64).reshape(-1, 3)
    if len(points) == 0:
        return np.zeros(0)
    return igl.fast_winding_number(_as_numpy(vertices, np.float64), _as_numpy(faces, np.int64), points)


def inside_mesh(vertices, faces, points) -> np.ndarray:
    """Boolean ``[N]``: is each point inside the (possibly self-intersecting) closed mesh."""
    return winding_numbers(vertices, faces, points) > 0.5


def triangle_barycentrics(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Barycentric coordinates ``[N,3]`` of points ``[N,3]`` lying on triangles ``[N,3,3]`` (clamped, sum 1)."""
    a, b, c = triangles[:, 0], triangles[:, 1], triangles[:, 2]
    v0, v1, v2 = b - a, c - a, points - a
    d00, d01, d11 = (v0 * v0).sum(1), (v0 * v1).sum(1), (v1 * v1).sum(1)
    d20, d21 = (v2 * v0).sum(1), (v2 * v1).sum(1)
    denom = d00 * d11 - d01 * d01
    safe = np.where(np.abs(denom) > 1e-20, denom, 1.0)
    w1 = np.where(np.abs(denom) > 1e-20, (d11 * d20 - d01 * d21) / safe, 0.0)
    w2 = np.where(np.abs(denom) > 1e-20, (d00 * d21 - d01 * d20) / safe, 0.0)
    weights = np.clip(np.stack([1.0 - w1 - w2, w1, w2], axis=1), 0.0, 1.0)
    return weights / weights.sum(axis=1, keepdims=True)


class ExactOccupancy(nn.Module):
    """Occupancy from the posed mesh itself; same ``query``/``collision_loss`` calls as :class:`COAPBodyModel`.

    ``temperature`` (metres) sets how soft the occupancy step is around the surface; it changes gradients and
    values but never which points count as inside (``occupancy > 0.5``).
    """

    def __init__(self, body_model_or_faces, temperature: float = 0.01):
        """``body_model_or_faces``: an smplx body model (its ``faces``) or a ``[F, 3]`` face array."""
        super().__init__()
        faces = body_model_or_faces
        if hasattr(faces, 'faces_tensor') or hasattr(faces, 'faces'):
            faces = getattr(faces, 'faces_tensor', None) if hasattr(faces, 'faces_tensor') else faces.faces
        faces = _as_numpy(faces, np.int64)
        if faces.ndim != 2 or faces.shape[1] != 3:
            raise ValueError(f"ExactOccupancy needs triangle faces [F,3], got shape {list(faces.shape)}")
        self.register_buffer('faces', torch.as_tensor(faces), persistent=False)
        self.temperature = float(temperature)
        self.level_set = LEVEL_SET

    def signed_distance(self, points: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
        """Distance ``[T]`` of ``points [T,3]`` to the mesh on ``vertices [V,3]``, positive inside."""
        faces_np = _as_numpy(self.faces, np.int64)
        verts_np = _as_numpy(vertices, np.float64)
        pts_np = _as_numpy(points, np.float64)
        if len(pts_np) == 0:
            return points.new_zeros(0)
        inside = winding_numbers(verts_np, faces_np, pts_np) > 0.5
        _, face_index, closest = igl.point_mesh_squared_distance(pts_np, verts_np, faces_np)
        bary = triangle_barycentrics(closest, verts_np[faces_np[face_index]])
        corners = vertices[self.faces[torch.as_tensor(face_index, device=vertices.device)]]   # [T, 3, 3]
        weights = torch.as_tensor(bary, dtype=vertices.dtype, device=vertices.device)
        closest_t = (weights[..., None] * corners).sum(dim=1)
        distance = ((points.to(vertices.dtype) - closest_t).pow(2).sum(dim=-1) + 1e-12).sqrt()
        sign = torch.as_tensor(np.where(inside, 1.0, -1.0), dtype=vertices.dtype, device=vertices.device)
        return sign * distance

    def query(self, points: torch.Tensor, smpl_output, ret_intermediate: bool = False):
        """Occupancy ``[B, T]`` of ``points [B, T, 3]`` for the posed bodies ``smpl_output.vertices [B, V, 3]``."""
        vertices = smpl_output.vertices
        if points.dim() != 3 or points.shape[-1] != 3 or points.shape[0] != vertices.shape[0]:
            raise ValueError(f"ExactOccupancy.query: points must be [B,T,3] with B={vertices.shape[0]}, "
                             f"got {list(points.shape)}")
        signed = torch.stack([self.signed_distance(points[b], vertices[b]) for b in range(points.shape[0])])
        occupancy = torch.sigmoid(signed / self.temperature)
        if ret_intermediate:
            return occupancy, {'signed_distance': signed}
        return occupancy

    def collision_loss(self, points: torch.Tensor, smpl_output, ret_collision_mask=None):
        """Per-body penetration ``[B]``: the sum over points of ``relu(occupancy - 0.5)``."""
        excess = torch.relu(self.query(points, smpl_output) - self.level_set)
        if ret_collision_mask:
            return excess.sum(dim=-1), excess > 0
        return excess.sum(dim=-1)
