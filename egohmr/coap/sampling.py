"""Area-weighted random points on sets of mesh faces, in plain torch.

This replaces pytorch3d's ``sample_points_from_meshes`` for COAP: each face set (one per body part) is a
``[F, 3]`` index array padded with ``-1`` rows. Faces are drawn with probability proportional to their area
(padding rows have zero area), then a uniform point is drawn on each chosen triangle. The points are
differentiable with respect to the vertices; the random choices are not.
"""
from __future__ import annotations

import torch


def face_areas(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Areas ``[B, K, F]`` of ``faces [K, F, 3]`` (``-1`` rows give 0) on ``vertices [B, V, 3]``."""
    corners = gather_face_corners(vertices, faces)
    cross = torch.cross(corners[..., 1, :] - corners[..., 0, :], corners[..., 2, :] - corners[..., 0, :], dim=-1)
    return 0.5 * cross.norm(dim=-1) * (faces[..., 0] >= 0)


def gather_face_corners(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Corner positions ``[B, K, F, 3, 3]`` of ``faces [K, F, 3]``; padding rows read vertex 0."""
    batch = vertices.shape[0]
    index = faces.clamp_min(0).long().reshape(-1)
    corners = vertices.index_select(1, index)
    return corners.reshape(batch, *faces.shape, 3)


def sample_points_on_faces(vertices: torch.Tensor, faces: torch.Tensor, num_samples: int,
                           generator: torch.Generator = None) -> torch.Tensor:
    """Draw ``num_samples`` area-weighted random points on each face set.

    Args:
        vertices: ``[B, V, 3]`` posed vertices.
        faces: ``[K, F, 3]`` integer face sets, padded with ``-1`` rows; every set needs a face of positive area.
        num_samples: points per face set.
        generator: optional torch RNG (default: the global one).

    Returns:
        ``[B, K, num_samples, 3]``.
    """
    batch, num_sets = vertices.shape[0], faces.shape[0]
    corners = gather_face_corners(vertices, faces)                       # [B, K, F, 3, 3]
    with torch.no_grad():
        areas = face_areas(vertices, faces).reshape(batch * num_sets, -1)
        if not bool((areas.sum(dim=1) > 0).all()):
            raise ValueError("sample_points_on_faces: a face set has no face of positive area")
        chosen = torch.multinomial(areas, num_samples, replacement=True, generator=generator)  # [B*K, n]
        u = torch.rand(batch * num_sets, num_samples, 1, generator=generator, device=vertices.device,
                       dtype=vertices.dtype)
        v = torch.rand(batch * num_sets, num_samples, 1, generator=generator, device=vertices.device,
                       dtype=vertices.dtype)
        # Uniform barycentric coordinates on a triangle (square-root warping).
        root = u.sqrt()
        weights = torch.cat([1.0 - root, root * (1.0 - v), root * v], dim=-1)   # [B*K, n, 3]
    corners = corners.reshape(batch * num_sets, -1, 3, 3)
    picked = torch.gather(corners, 1, chosen[..., None, None].expand(-1, -1, 3, 3))  # [B*K, n, 3, 3]
    points = (weights[..., None] * picked).sum(dim=2)
    return points.reshape(batch, num_sets, num_samples, 3)


def draw_face_samples(vertices: torch.Tensor, faces: torch.Tensor, num_samples: int,
                      generator: torch.Generator = None):
    """The random draws of :func:`sample_points_on_faces` (the same RNG calls in the same order), without the points.

    Returns ``chosen [B, K, n]`` face indices and barycentric ``weights [B, K, n, 3]``; turn them into points of
    selected (body, set) pairs with :func:`points_on_drawn_faces`.
    """
    batch, num_sets = vertices.shape[0], faces.shape[0]
    with torch.no_grad():
        areas = face_areas(vertices, faces).reshape(batch * num_sets, -1)
        if not bool((areas.sum(dim=1) > 0).all()):
            raise ValueError("draw_face_samples: a face set has no face of positive area")
        chosen = torch.multinomial(areas, num_samples, replacement=True, generator=generator)
        u = torch.rand(batch * num_sets, num_samples, 1, generator=generator, device=vertices.device,
                       dtype=vertices.dtype)
        v = torch.rand(batch * num_sets, num_samples, 1, generator=generator, device=vertices.device,
                       dtype=vertices.dtype)
        root = u.sqrt()
        weights = torch.cat([1.0 - root, root * (1.0 - v), root * v], dim=-1)
    return chosen.reshape(batch, num_sets, num_samples), weights.reshape(batch, num_sets, num_samples, 3)


def points_on_drawn_faces(vertices: torch.Tensor, faces: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor,
                          body_idx: torch.Tensor, set_idx: torch.Tensor) -> torch.Tensor:
    """Points ``[N, n, 3]`` of :func:`draw_face_samples`'s draws for the ``N`` pairs ``(body_idx, set_idx)``.

    For every pair the same values as the matching ``[b, k]`` slice of :func:`sample_points_on_faces` with those
    draws; differentiable with respect to ``vertices``. Only the chosen faces' corners are gathered.
    """
    corner_ids = faces.clamp_min(0).long()[set_idx[:, None], chosen[body_idx, set_idx]]     # [N, n, 3]
    picked = vertices[body_idx[:, None, None], corner_ids]                                  # [N, n, 3, 3]
    return (weights[body_idx, set_idx][..., None] * picked).sum(dim=2)
