"""COAP: compositional articulated occupancy of a posed SMPL body (COAP's ``encode_body`` and ``query``).

The body is split into 16 rigid parts. For every part, points sampled on its posed surface are mapped into the
part's local bone frame and encoded by a ResNet-PointNet into a 128-d code. A query point is mapped into every
part frame; for the parts whose (padded) local bounding box contains it, two MLPs (``query_encoder`` and
``decoder``) predict that part's occupancy. The body occupancy is the maximum over parts.

State-dict names and shapes follow the original ``coap_smpl_*.ckpt`` files (manifest ``coap_smpl_neutral.tsv``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from egohmr.coap.partition import NUM_PARTS, NUM_SMPL_JOINTS, Partitioner, body_model_tables
from egohmr.coap.sampling import draw_face_samples, points_on_drawn_faces, sample_points_on_faces
from utils.geometry import aa_to_rotmat
from utils.tensors import autocast_is_on, fp32_under_autocast, map_row_chunks
from backbones.pointnet import ResnetPointnet

LATENT_DIM = 128
LEVEL_SET = 0.5
# Work sizes of the networks, in points per slice (utils.tensors.map_row_chunks; the same values, cache-sized
# activations): the part encoder's surface samples (4 parts of 1000), the query MLPs' (point, part) pairs.
ENCODER_CHUNK_POINTS = 4096
DECODER_CHUNK_POINTS = 2048
# bf16 runs: Softplus inputs below this / beta are clamped there (ImplicitNet.activate).
SOFTPLUS_TAIL = -15.0


class ImplicitNet(nn.Module):
    """IGR-style MLP ``lin0 .. lin{n}`` with Softplus(beta) between layers and input skip connections.

    At every layer index in ``skip_in`` the network input is concatenated to the hidden feature and the result is
    scaled by 1/sqrt(2); the layer before a skip outputs ``width - d_in`` features so the width stays constant.
    ``geometric_init`` (IGR) starts the output close to the signed distance of a sphere of ``radius_init``.
    """

    def __init__(self, d_in: int, d_out: int, hidden: Sequence[int], skip_in: Sequence[int] = (),
                 geometric_init: bool = True, radius_init: float = 1.0, beta: float = 100.0):
        super().__init__()
        widths = [d_in] + list(hidden) + [d_out]
        self.d_in, self.d_out = d_in, d_out
        self.skip_in = tuple(skip_in)
        self.num_linear = len(widths) - 1
        for i in range(self.num_linear):
            out_features = widths[i + 1] - d_in if (i + 1) in self.skip_in else widths[i + 1]
            self.add_module(f'lin{i}', nn.Linear(widths[i], out_features))
        if geometric_init:
            self.geometric_init_(radius_init)
        self.activation = nn.Softplus(beta=beta)

    @torch.no_grad()
    def geometric_init_(self, radius: float = 1.0) -> None:
        """IGR initialisation: the output starts near ``|x| - radius`` (a sphere's signed distance)."""
        for i in range(self.num_linear):
            layer = getattr(self, f'lin{i}')
            if i == self.num_linear - 1:
                nn.init.normal_(layer.weight, mean=math.sqrt(math.pi) / math.sqrt(layer.in_features), std=1e-5)
                nn.init.constant_(layer.bias, -radius)
            else:
                nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0) / math.sqrt(layer.out_features))
                nn.init.zeros_(layer.bias)

    @torch.no_grad()
    def scale_input_weights_(self, columns: Sequence[int], factor: float) -> None:
        """Multiply the weights that read the given input features (first layer and skip layers) by ``factor``.

        Equivalent at initialisation to feeding those features ``factor`` times larger; used to start training
        with metre-scale coordinates mattering as much as the other inputs.
        """
        columns = torch.as_tensor(list(columns))
        for i in (0,) + self.skip_in:
            layer = getattr(self, f'lin{i}')
            layer.weight[:, columns + (layer.in_features - self.d_in)] *= factor

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        for i in range(self.num_linear):
            if i in self.skip_in:
                x = torch.cat([x, inputs], dim=-1) / math.sqrt(2.0)
            x = getattr(self, f'lin{i}')(x)
            if i < self.num_linear - 1:
                x = self.activate(x)
        return x

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        """Softplus(beta). Under autocast (a bf16 run) in fp32 with the far negative tail clamped: below
        ``beta * x = -15`` the output, under 3.1e-7 / beta (3.1e-9 for COAP's beta = 100), takes its value at -15,
        because the CPU's log1p of those tiny exponentials takes a slow path (8x the layer's time measured). fp32
        runs use Softplus as it is."""
        if autocast_is_on(x):
            beta = self.activation.beta
            return F.softplus(x.float().clamp_min(SOFTPLUS_TAIL / beta), beta=beta,
                              threshold=self.activation.threshold)
        return self.activation(x)


def rigid_inverse(transforms: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid 4x4 transforms ``[..., 4, 4]`` (``[R|t]`` -> ``[R^T | -R^T t]``)."""
    rot_t = transforms[..., :3, :3].transpose(-1, -2)
    trans = -rot_t @ transforms[..., :3, 3:]
    top = torch.cat([rot_t, trans], dim=-1)
    bottom = torch.zeros_like(transforms[..., 3:, :])
    bottom[..., 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


@fp32_under_autocast
def apply_transform(transforms: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Map points ``[..., N, 3]`` by transforms ``[..., 4, 4]`` (broadcast over the leading dims); in fp32 under
    autocast too (only COAP's networks follow autocast: its geometry and box tests stay exact)."""
    return points @ transforms[..., :3, :3].transpose(-1, -2) + transforms[..., None, :3, 3]


def check_smpl_output(smpl_output) -> None:
    """Raise a one-line ValueError unless ``smpl_output`` has vertices [B,V,3], joints [B,>=24,3], full_pose [B,72]."""
    for name in ('vertices', 'joints', 'full_pose'):
        if getattr(smpl_output, name, None) is None:
            raise ValueError(f"COAP needs smpl_output.{name} (call the SMPL model with return_full_pose=True)")
    batch = smpl_output.vertices.shape[0]
    pose = smpl_output.full_pose
    if pose.shape[0] != batch or pose.reshape(batch, -1).shape[1] != 3 * NUM_SMPL_JOINTS:
        raise ValueError(f"COAP needs smpl_output.full_pose as axis-angle [B,72], got {list(pose.shape)} "
                         "(convert rotation matrices with utils.geometry.rotmat_to_aa)")
    if smpl_output.joints.shape[1] < NUM_SMPL_JOINTS:
        raise ValueError(f"COAP needs at least 24 joints, got smpl_output.joints {list(smpl_output.joints.shape)}")


class COAPBodyModel(nn.Module):
    """Occupancy of a posed SMPL-format body.

    Build it from an smplx SMPL module (``COAPBodyModel(smpl)``) or from raw tables
    (``COAPBodyModel(faces=..., lbs_weights=..., parents=...)``). Inputs are smplx outputs (or any object with
    ``vertices [B,V,3]``, ``joints [B,>=24,3]`` and axis-angle ``full_pose [B,72]``) in the body's own frame.
    """

    def __init__(self, body_model=None, *, faces=None, lbs_weights=None, parents=None,
                 num_surface_samples: int = 1000, bbox_padding: float = 1.125):
        super().__init__()
        if body_model is not None:
            faces, lbs_weights, parents = body_model_tables(body_model)
        if faces is None or lbs_weights is None or parents is None:
            raise ValueError("COAPBodyModel needs a body model or faces, lbs_weights and parents")
        self.num_surface_samples = num_surface_samples
        self.bbox_padding = bbox_padding
        self.level_set = LEVEL_SET
        self.register_buffer('k_one_hot', torch.eye(NUM_PARTS))
        self.partitioner = Partitioner(faces, lbs_weights, parents)
        self.encoder = ResnetPointnet(out_dim=LATENT_DIM, hidden_dim=128, block_ids=(0, 1, 3, 4), pooled_once=False,
                                      chunk_points=ENCODER_CHUNK_POINTS)
        query_in = 3 + 1 + NUM_PARTS + LATENT_DIM  # local point, inside-box flag, part one-hot, part code
        self.query_encoder = ImplicitNet(query_in, LATENT_DIM, [256, 256, 256], skip_in=(2,), geometric_init=False)
        self.decoder = ImplicitNet(3 + LATENT_DIM, 1, [256] * 6, skip_in=(3,), geometric_init=True)
        self.impl_code: Optional[dict] = None

    @property
    def num_parts(self) -> int:
        return NUM_PARTS

    # ------------------------------------------------------------------------------------------------------
    # Body encoding
    # ------------------------------------------------------------------------------------------------------

    def part_transforms(self, full_pose: torch.Tensor, joints: torch.Tensor) -> torch.Tensor:
        """Posed bone transforms ``[B, 16, 4, 4]`` (local part frame -> posed space) of the 16 parts."""
        batch = full_pose.shape[0]
        rotations = aa_to_rotmat(full_pose.reshape(batch, NUM_SMPL_JOINTS, 3))
        parents = self.partitioner.parents.tolist()
        chain = [rotations[:, 0]]
        for joint in range(1, NUM_SMPL_JOINTS):
            chain.append(chain[parents[joint]] @ rotations[:, joint])
        global_rot = torch.stack(chain, dim=1)                                   # [B, 24, 3, 3]
        top = torch.cat([global_rot, joints[:, :NUM_SMPL_JOINTS, :, None]], dim=-1)
        bottom = torch.zeros_like(top[..., :1, :])
        bottom[..., 3] = 1.0
        transforms = torch.cat([top, bottom], dim=-2)
        return transforms[:, self.partitioner.joint_mapper]

    @fp32_under_autocast
    def compute_bone_trans(self, full_pose: torch.Tensor, joints: torch.Tensor) -> torch.Tensor:
        """``bone_trans`` ``[B, 16, 4, 4]``: posed space -> local part frame (fp32 under autocast too)."""
        return rigid_inverse(self.part_transforms(full_pose, joints))

    def part_bounds(self, vertices: torch.Tensor, bone_trans: torch.Tensor):
        """Local-frame min/max ``[B, 16, 1, 3]`` of each part's own vertices."""
        selector = self.partitioner.tight_vert_selector                          # [16, Vmax]
        part_verts = vertices[:, selector.reshape(-1)].reshape(vertices.shape[0], *selector.shape, 3)
        local = apply_transform(bone_trans, part_verts)
        return local.min(dim=-2, keepdim=True).values, local.max(dim=-2, keepdim=True).values

    def sample_part_surfaces(self, vertices: torch.Tensor, num_samples: Optional[int] = None) -> torch.Tensor:
        """Random posed surface points ``[B, 16, n, 3]``: half on each part's faces, half on its extended faces."""
        num_samples = num_samples or self.num_surface_samples
        tight = num_samples // 2
        return torch.cat([
            sample_points_on_faces(vertices, self.partitioner.tight_face_tensor, tight),
            sample_points_on_faces(vertices, self.partitioner.extended_face_tensor, num_samples - tight),
        ], dim=2)

    def part_surface_features(self, vertices: torch.Tensor, bone_trans: torch.Tensor) -> torch.Tensor:
        """Pooled point-encoder features ``[B, 16, hidden]`` of random part surface samples in the part frames
        (the part code is ``encoder.fc_c`` of them)."""
        local_surface = apply_transform(bone_trans, self.sample_part_surfaces(vertices))   # [B, 16, n, 3]
        batch = vertices.shape[0]
        return self.encoder.pooled_features(local_surface.reshape(batch * NUM_PARTS, -1, 3)).reshape(
            batch, NUM_PARTS, -1)

    def part_frames(self, smpl_output) -> dict:
        """The geometric half of :meth:`encode_body` (no point encoder, no random draws): ``bone_trans`` and the
        part boxes ``bbox_min/max/size/center``, with ``full_pose`` and ``joints``."""
        check_smpl_output(smpl_output)
        vertices, joints, full_pose = smpl_output.vertices, smpl_output.joints, smpl_output.full_pose
        bone_trans = self.compute_bone_trans(full_pose.reshape(vertices.shape[0], -1), joints)
        bbox_min, bbox_max = self.part_bounds(vertices, bone_trans)
        return dict(full_pose=full_pose, joints=joints, bone_trans=bone_trans, bbox_min=bbox_min, bbox_max=bbox_max,
                    bbox_size=(bbox_max - bbox_min).abs() * self.bbox_padding, bbox_center=0.5 * (bbox_min + bbox_max))

    def encode_body(self, smpl_output) -> dict:
        """Encode a posed body; the result is cached in ``impl_code`` and returned."""
        code = self.part_frames(smpl_output)
        code['latent_code'] = self.encoder.fc_c(self.part_surface_features(smpl_output.vertices, code['bone_trans']))
        self.impl_code = code
        return self.impl_code

    def _cache_is_valid(self, smpl_output) -> bool:
        code = self.impl_code
        if code is None:
            return False
        pose, joints = smpl_output.full_pose, smpl_output.joints
        if pose.shape != code['full_pose'].shape or joints.shape != code['joints'].shape:
            return False
        if pose.device != code['full_pose'].device:
            return False
        # A different tensor that needs gradients must get its own graph, even with equal values.
        if torch.is_grad_enabled() and (pose.requires_grad or joints.requires_grad or
                                        smpl_output.vertices.requires_grad) and pose is not code['full_pose']:
            return False
        return bool(torch.allclose(pose, code['full_pose']) and torch.allclose(joints, code['joints']))

    def attach_body(self, smpl_output=None) -> dict:
        """Return the body code for ``smpl_output``, re-encoding unless the cached pose and joints match."""
        if smpl_output is None:
            if self.impl_code is None:
                raise ValueError("COAP query without smpl_output before any body was encoded")
            return self.impl_code
        if not self._cache_is_valid(smpl_output):
            self.encode_body(smpl_output)
        return self.impl_code

    def detach_cache(self) -> None:
        self.impl_code = None

    # ------------------------------------------------------------------------------------------------------
    # Queries
    # ------------------------------------------------------------------------------------------------------

    def query(self, points: torch.Tensor, smpl_output=None, ret_intermediate: bool = False):
        """Occupancy ``[B, T]`` in [0, 1] of query points ``[B, T, 3]`` (posed space of ``smpl_output``).

        With ``ret_intermediate`` also returns ``{'part_occupancy': [B,16,T], 'all_out': [B,T] bool}``
        (``all_out``: outside every part box). Only (point, part) pairs inside the part's box are evaluated;
        the others are exactly 0, as in the original, which multiplies them by the box mask.
        """
        code = self.attach_body(smpl_output)
        if points.dim() != 3 or points.shape[-1] != 3 or points.shape[0] != code['latent_code'].shape[0]:
            raise ValueError(f"COAP query points must be [B,T,3] with B={code['latent_code'].shape[0]}, "
                             f"got {list(points.shape)}")
        batch, num_points = points.shape[:2]
        local = apply_transform(code['bone_trans'], points[:, None].to(code['bone_trans'].dtype))  # [B,16,T,3]
        inside = ((local - code['bbox_center']).abs() < 0.5 * code['bbox_size']).all(dim=-1)   # [B,16,T]
        b_idx, k_idx, t_idx = inside.nonzero(as_tuple=True)
        local_in = local[b_idx, k_idx, t_idx]                                    # [N, 3]
        # index_select: a bit-reproducible backward over the repeated (body, part) rows (see sparse_collision_loss)
        logits = self._part_logits(local_in, k_idx,
                                   code['latent_code'].flatten(0, 1).index_select(0, b_idx * NUM_PARTS + k_idx))
        part_occupancy = local.new_zeros(batch, NUM_PARTS, num_points)
        part_occupancy = part_occupancy.index_put((b_idx, k_idx, t_idx),
                                                  torch.sigmoid(-logits).to(part_occupancy.dtype))
        occupancy = part_occupancy.max(dim=1).values
        if ret_intermediate:
            return occupancy, {'part_occupancy': part_occupancy, 'all_out': ~inside.any(dim=1)}
        return occupancy

    def collision_loss(self, points: torch.Tensor, smpl_output=None, ret_collision_mask=None):
        """Per-body penetration ``[B]``: the sum over points of ``relu(occupancy - 0.5)``.

        With a truthy ``ret_collision_mask`` also returns the ``[B, T]`` mask of colliding points.
        """
        excess = torch.relu(self.query(points, smpl_output) - self.level_set)
        if ret_collision_mask:
            return excess.sum(dim=-1), excess > 0
        return excess.sum(dim=-1)

    # ------------------------------------------------------------------------------------------------------
    # Sparse evaluation: encode only the parts a query needs (guidance, penetration loss, collision metric)
    # ------------------------------------------------------------------------------------------------------

    def draw_surface_samples(self, vertices: torch.Tensor, num_samples: Optional[int] = None,
                             generators: Optional[list] = None) -> list:
        """The random draws of :meth:`sample_part_surfaces` (same RNG calls, same order): ``[(faces, chosen,
        weights)]`` for the tight and the extended face sets. ``generators``: None (the global RNG) or one
        generator per body (:func:`egohmr.coap.sampling.draw_face_samples`)."""
        num_samples = num_samples or self.num_surface_samples
        tight = num_samples // 2
        with torch.no_grad():       # each distinct face's area once (the same values, egohmr.coap.sampling)
            areas = self.partitioner.face_set_index().areas(vertices)
        return [(faces, *draw_face_samples(vertices, faces, count, generators, areas=set_areas))
                for faces, count, set_areas in ((self.partitioner.tight_face_tensor, tight, areas[0]),
                                                (self.partitioner.extended_face_tensor, num_samples - tight,
                                                 areas[1]))]

    def encode_parts(self, vertices: torch.Tensor, bone_trans: torch.Tensor, draws: list,
                     body_idx: torch.Tensor, part_idx: torch.Tensor, rows_at_max: Optional[torch.Tensor] = None,
                     return_rows_at_max: bool = False):
        """Part codes ``[N, 128]`` of the ``N`` (body, part) pairs from the surface samples ``draws``
        (:meth:`draw_surface_samples`): the matching rows of :meth:`encode_body`'s ``latent_code``.

        The point encoder runs on the pairs' samples only; its output layer runs on the ``[B, 16]`` grid of
        :meth:`encode_body` (the other rows zero), so that small GEMM sees the shape it sees there.
        ``return_rows_at_max`` (no gradients): also return ``[N, n]`` bool, the samples that reach a maximum in the
        encoder (:meth:`ResnetPointnet.pooled_features_and_rows_at_max`). ``rows_at_max``: that mask from an earlier
        call for the same pairs, bodies and draws; the encoder then runs on those samples alone
        (:meth:`ResnetPointnet.pooled_features_on_rows`: for the gradient; the value up to float rounding).
        """
        surface = torch.cat([points_on_drawn_faces(vertices, faces, chosen, weights, body_idx, part_idx)
                             for faces, chosen, weights in draws], dim=1)                   # [N, n, 3]
        local = apply_transform(bone_trans[body_idx, part_idx], surface)
        at_max = None
        if rows_at_max is not None:
            pooled = self.encoder.pooled_features_on_rows(local, rows_at_max)
        elif return_rows_at_max:
            pooled, at_max = self.encoder.pooled_features_and_rows_at_max(local)
        else:
            pooled = self.encoder.pooled_features(local)
        grid = pooled.new_zeros(vertices.shape[0], NUM_PARTS, pooled.shape[-1]).index_put((body_idx, part_idx),
                                                                                         pooled)
        latent = self.encoder.fc_c(grid)[body_idx, part_idx]
        return (latent, at_max) if return_rows_at_max else latent

    def _part_logits(self, local_in: torch.Tensor, part_idx: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Decoder logits ``[N]`` of local points ``[N, 3]`` in the boxes of parts ``part_idx`` (codes ``latent``),
        :data:`DECODER_CHUNK_POINTS` rows at a time."""
        return map_row_chunks(self._pair_logits, (local_in, part_idx, latent), DECODER_CHUNK_POINTS)

    def _pair_logits(self, local_in: torch.Tensor, part_idx: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        features = torch.cat([local_in, torch.ones_like(local_in[:, :1]), self.k_one_hot[part_idx], latent], dim=-1)
        return self.decoder(torch.cat([local_in, self.query_encoder(features)], dim=-1))[:, 0]

    def sparse_query(self, points: torch.Tensor, smpl_output, generators: Optional[list] = None,
                     mark_rows_at_max: bool = False):
        """:meth:`query`'s occupancy ``[B, T]`` (same values, no gradient), encoding only the parts whose box holds
        a query point; the others are never read by :meth:`query`.

        The surface samples of every part are drawn as :meth:`encode_body` draws them (same RNG use). Returns
        ``(occupancy, state)``; ``state`` holds the draws, the part each point's occupancy comes from
        (``part [B, T]``, the max's index), each encoded pair's row (``slot [B, 16]``, -1 where not encoded) and,
        with ``mark_rows_at_max``, its surface samples at a maximum in the encoder (``rows_at_max``, else None) for
        :meth:`sparse_collision_loss`'s gradient. Does not touch the body-code cache. ``generators``: one per body
        for the surface samples (:meth:`draw_surface_samples`), or None.
        """
        check_smpl_output(smpl_output)
        with torch.no_grad():
            vertices, joints = smpl_output.vertices.detach(), smpl_output.joints.detach()
            batch, num_points = points.shape[:2]
            bone_trans = self.compute_bone_trans(smpl_output.full_pose.detach().reshape(batch, -1), joints)
            bbox_min, bbox_max = self.part_bounds(vertices, bone_trans)
            bbox_size = (bbox_max - bbox_min).abs() * self.bbox_padding
            bbox_center = 0.5 * (bbox_min + bbox_max)
            draws = self.draw_surface_samples(vertices, generators=generators)
            local = apply_transform(bone_trans, points[:, None].to(bone_trans.dtype))       # [B,16,T,3]
            inside = ((local - bbox_center).abs() < 0.5 * bbox_size).all(dim=-1)            # [B,16,T]
            b_idx, k_idx, t_idx = inside.nonzero(as_tuple=True)
            used_b, used_k = inside.any(dim=2).nonzero(as_tuple=True)
            slot = torch.full((batch, NUM_PARTS), -1, dtype=torch.long, device=points.device)
            slot[used_b, used_k] = torch.arange(used_b.shape[0], device=points.device)
            part_occupancy = local.new_zeros(batch, NUM_PARTS, num_points)
            at_max = None
            if used_b.numel():
                latent = self.encode_parts(vertices, bone_trans, draws, used_b, used_k,
                                           return_rows_at_max=mark_rows_at_max)
                if mark_rows_at_max:
                    latent, at_max = latent
                logits = self._part_logits(local[b_idx, k_idx, t_idx], k_idx, latent[slot[b_idx, k_idx]])
                part_occupancy = part_occupancy.index_put((b_idx, k_idx, t_idx),
                                                          torch.sigmoid(-logits).to(part_occupancy.dtype))
            occupancy, part = part_occupancy.max(dim=1)
        return occupancy, {'draws': draws, 'part': part, 'slot': slot, 'rows_at_max': at_max}

    def sparse_collision_loss(self, points: torch.Tensor, smpl_output, generators: Optional[list] = None
                              ) -> torch.Tensor:
        """:meth:`collision_loss` ``[B]``: the same value (:meth:`sparse_query`) and the same gradient w.r.t. the body.

        The gradient of ``sum relu(occupancy - 0.5)`` flows only through the colliding points (occupancy > 0.5),
        each through the part its max comes from, so only those points and parts are evaluated again with autograd.
        Equal to the dense gradient up to float rounding (the sums over points run in another order).
        """
        vertices, joints, full_pose = smpl_output.vertices, smpl_output.joints, smpl_output.full_pose
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (vertices, joints, full_pose))
        occupancy, state = self.sparse_query(points, smpl_output, generators, mark_rows_at_max=needs_grad)
        excess = torch.relu(occupancy - self.level_set).sum(dim=-1)
        if not needs_grad:
            return excess
        b_c, t_c = (occupancy > self.level_set).nonzero(as_tuple=True)
        if b_c.numel() == 0:
            return excess + 0.0 * vertices.sum()
        k_c = state['part'][b_c, t_c]
        pairs, slot = torch.unique(b_c * NUM_PARTS + k_c, return_inverse=True)
        batch = vertices.shape[0]
        bone_trans = self.compute_bone_trans(full_pose.reshape(batch, -1), joints)
        pair_b, pair_k = pairs // NUM_PARTS, pairs % NUM_PARTS
        # The encoder's backward needs only the surface samples at a maximum, as marked by sparse_query's encoding.
        latent = self.encode_parts(vertices, bone_trans, state['draws'], pair_b, pair_k,
                                   rows_at_max=state['rows_at_max'][state['slot'][pair_b, pair_k]])
        # index_select, not bone_trans[b_c, k_c] / latent[slot]: rows repeat (one per colliding point), and the
        # backward of advanced indexing (index_put_ with accumulate) adds repeated float rows with parallel atomics
        # on CPU, in a varying order; index_select's backward (index_add_) adds them in index order.
        frames = bone_trans.reshape(-1, 4, 4).index_select(0, b_c * NUM_PARTS + k_c)
        local_c = apply_transform(frames, points[b_c, t_c][:, None].to(bone_trans.dtype))[:, 0]
        part_occ = torch.sigmoid(-self._part_logits(local_c, k_c, latent.index_select(0, slot)))
        differentiable = part_occ.new_zeros(batch).index_add(0, b_c, part_occ - self.level_set)
        # The value of the dense loss, the gradient of the colliding points (x - x is exactly 0).
        return excess + (differentiable - differentiable.detach())


def attach_coap(body_model, checkpoint: Optional[str] = None, frozen: bool = False, pretrained: bool = False,
                **kwargs):
    """Build a :class:`COAPBodyModel` for ``body_model`` and attach it as ``body_model.coap`` (returns the body model).

    ``checkpoint``: a ``coap_smpl_*.ckpt`` (official or written by ``train_coap.py``) to load strictly.
    ``pretrained=True`` without a checkpoint is refused: the original downloads the weights, which we cannot.
    ``frozen``: disable gradients of the COAP weights (as inside the stage-2 model).
    """
    if pretrained and checkpoint is None:
        raise ValueError("attach_coap(pretrained=True) needs checkpoint=<path to coap_smpl_<gender>.ckpt> "
                         "(official file, or train one with train_coap.py)")
    coap = COAPBodyModel(body_model, **kwargs)
    if checkpoint is not None:
        from egohmr.coap.checkpoint import load_coap_checkpoint
        load_coap_checkpoint(coap, checkpoint)
    if frozen:
        coap.requires_grad_(False)
    try:
        device = next(body_model.buffers()).device
        coap.to(device)
    except (StopIteration, AttributeError):
        pass
    body_model.coap = coap
    return body_model
