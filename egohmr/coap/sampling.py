"""Area-weighted random points on sets of mesh faces, in plain torch.

This replaces pytorch3d's ``sample_points_from_meshes`` for COAP: each face set (one per body part) is a
``[F, 3]`` index array padded with ``-1`` rows. Faces are drawn with probability proportional to their area
(padding rows have zero area), then a uniform point is drawn on each chosen triangle. The points are
differentiable with respect to the vertices; the random choices are not.
"""
from __future__ import annotations

from typing import Optional

import torch


def face_areas(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Areas ``[B, K, F]`` of ``faces [K, F, 3]`` (``-1`` rows give 0) on ``vertices [B, V, 3]``."""
    return corner_areas(gather_face_corners(vertices, faces), faces)


def corner_areas(corners: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """:func:`face_areas` from the faces' gathered corners ``[B, K, F, 3, 3]`` (:func:`gather_face_corners`)."""
    cross = torch.cross(corners[..., 1, :] - corners[..., 0, :], corners[..., 2, :] - corners[..., 0, :], dim=-1)
    return 0.5 * cross.norm(dim=-1) * (faces[..., 0] >= 0)


class FaceSetIndex:
    """The distinct faces of several padded face sets ``[K, F, 3]`` and, per set row, its face's slot.

    COAP's 16 tight and 16 extended part face sets repeat the same mesh faces (a face is in its part's tight set
    and in up to a few extended sets). :meth:`areas` computes every distinct face's area once and reads each set
    row's from it: the same values, bit for bit, as :func:`face_areas` of each set (each area is the same
    elementwise arithmetic on the same three corners; padding rows read an exact 0), with a fraction of the
    corner gathers.
    """

    def __init__(self, face_sets):
        rows = torch.cat([f.reshape(-1, 3) for f in face_sets]).long()
        real = rows[:, 0] >= 0
        unique, inverse = torch.unique(rows[real], dim=0, return_inverse=True)
        slots = torch.full((rows.shape[0],), unique.shape[0], dtype=torch.long, device=rows.device)
        slots[real] = inverse
        self.faces = unique                                                            # [U, 3]
        self.slots = list(slots.split([f.shape[0] * f.shape[1] for f in face_sets]))   # per set [K*F] in [0, U]
        self.shapes = [tuple(f.shape[:2]) for f in face_sets]

    def areas(self, vertices: torch.Tensor) -> list:
        """``[face_areas(vertices, faces) for faces in face_sets]`` (``[B, K, F]`` each)."""
        distinct = face_areas(vertices, self.faces[None])[:, 0]                       # [B, U]
        padded = torch.cat([distinct, distinct.new_zeros(distinct.shape[0], 1)], dim=1)
        return [padded[:, slots].reshape(vertices.shape[0], *shape)
                for slots, shape in zip(self.slots, self.shapes)]


def gather_face_corners(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Corner positions ``[B, K, F, 3, 3]`` of ``faces [K, F, 3]``; padding rows read vertex 0."""
    batch = vertices.shape[0]
    index = faces.clamp_min(0).long().reshape(-1)
    corners = vertices.index_select(1, index)
    return corners.reshape(batch, *faces.shape, 3)


def sample_points_on_faces(vertices: torch.Tensor, faces: torch.Tensor, num_samples: int,
                           generator=None) -> torch.Tensor:
    """Draw ``num_samples`` area-weighted random points on each face set.

    Args:
        vertices: ``[B, V, 3]`` posed vertices.
        faces: ``[K, F, 3]`` integer face sets, padded with ``-1`` rows; every set needs a face of positive area.
        num_samples: points per face set.
        generator: optional torch RNG (default: the global one), or a list of ``B`` generators, one per body
            (:func:`draw_face_samples`).

    Returns:
        ``[B, K, num_samples, 3]``.
    """
    batch, num_sets = vertices.shape[0], faces.shape[0]
    corners = gather_face_corners(vertices, faces)                       # [B, K, F, 3, 3]
    with torch.no_grad():
        areas = corner_areas(corners, faces)
    chosen, weights = draw_face_samples(vertices, faces, num_samples, generator, areas=areas)
    corners = corners.reshape(batch * num_sets, -1, 3, 3)
    chosen = chosen.reshape(batch * num_sets, num_samples)
    picked = torch.gather(corners, 1, chosen[..., None, None].expand(-1, -1, 3, 3))  # [B*K, n, 3, 3]
    points = (weights.reshape(batch * num_sets, num_samples, 3)[..., None] * picked).sum(dim=2)
    return points.reshape(batch, num_sets, num_samples, 3)


def _draw(areas: torch.Tensor, num_samples: int, generator, device, dtype):
    """Faces ``[R, n]`` by area and uniform barycentric weights ``[R, n, 3]`` (square-root warping) for the ``R``
    rows of ``areas``: one multinomial, then two uniform draws, from ``generator``."""
    chosen = torch.multinomial(areas, num_samples, replacement=True, generator=generator)
    u = torch.rand(areas.shape[0], num_samples, 1, generator=generator, device=device, dtype=dtype)
    v = torch.rand(areas.shape[0], num_samples, 1, generator=generator, device=device, dtype=dtype)
    root = u.sqrt()
    return chosen, torch.cat([1.0 - root, root * (1.0 - v), root * v], dim=-1)


def draw_face_samples(vertices: torch.Tensor, faces: torch.Tensor, num_samples: int, generator=None,
                      areas: Optional[torch.Tensor] = None):
    """The random draws of :func:`sample_points_on_faces`, without the points.

    ``generator``: None (the global RNG) or one generator for the whole batch -- one multinomial over all ``B*K``
    (body, set) rows, then the uniform draws -- or a list of ``B`` generators, one per body, each making those calls
    for its body's ``K`` rows alone (on the CPU: a body's draws then do not depend on the other bodies of the batch,
    nor on the device). Returns ``chosen [B, K, n]`` face indices and barycentric ``weights [B, K, n, 3]``; turn them
    into points of selected (body, set) pairs with :func:`points_on_drawn_faces`. ``areas``: the sets' face areas
    ``[B, K, F]`` if already computed (:func:`face_areas`, :class:`FaceSetIndex`).
    """
    batch, num_sets = vertices.shape[0], faces.shape[0]
    with torch.no_grad():
        areas = (face_areas(vertices, faces) if areas is None else areas).reshape(batch * num_sets, -1)
        if not bool((areas.sum(dim=1) > 0).all()):
            raise ValueError("draw_face_samples: a face set has no face of positive area")
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch:
                raise ValueError(f"draw_face_samples: {len(generator)} generators for {batch} bodies")
            host = areas.float().cpu().reshape(batch, num_sets, -1)
            parts = [_draw(host[b], num_samples, g, 'cpu', vertices.dtype) for b, g in enumerate(generator)]
            chosen = torch.cat([c for c, _ in parts]).to(vertices.device)
            weights = torch.cat([w for _, w in parts]).to(vertices.device)
        else:
            chosen, weights = _draw(areas, num_samples, generator, vertices.device, vertices.dtype)
    return chosen.reshape(batch, num_sets, num_samples), weights.reshape(batch, num_sets, num_samples, 3)


def points_on_drawn_faces(vertices: torch.Tensor, faces: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor,
                          body_idx: torch.Tensor, set_idx: torch.Tensor) -> torch.Tensor:
    """Points ``[N, n, 3]`` of :func:`draw_face_samples`'s draws for the ``N`` pairs ``(body_idx, set_idx)``.

    For every pair the same values as the matching ``[b, k]`` slice of :func:`sample_points_on_faces` with those
    draws; differentiable with respect to ``vertices``. Only the chosen faces' corners are gathered.
    """
    corner_ids = faces.clamp_min(0).long()[set_idx[:, None], chosen[body_idx, set_idx]]     # [N, n, 3]
    # index_select on the flattened vertices, not vertices[body_idx, corner_ids]: corners repeat, and the backward of
    # advanced indexing (index_put_ with accumulate) adds repeated float rows with parallel atomics on the CPU, in a
    # varying order; index_select's backward adds them in index order (bit-reproducible gradients).
    flat = (body_idx[:, None, None] * vertices.shape[1] + corner_ids).reshape(-1)
    picked = vertices.reshape(-1, 3).index_select(0, flat).reshape(*corner_ids.shape, 3)    # [N, n, 3, 3]
    return (weights[body_idx, set_idx][..., None] * picked).sum(dim=2)
