"""Train COAP occupancy weights for any SMPL-format body model (beyond the original repo's scope).

Data: bodies posed with MoCap poses (``cmu_mocap.npz``: ``body_pose`` [M,72], root first) and random shapes.

The recipe is built for a CPU budget of a few minutes:

* **A fixed pool of posed training bodies** is prepared once: their pooled part-surface features (the point
  encoder's per-point layers keep their random initial weights, so every body is encoded once), and labelled query
  points -- uniform in every part box, near the surface (Gaussian offsets of a few mm to a few cm) and uniform in
  the body's bounding box. Labels are exact inside/outside tests of the posed closed mesh (generalised winding
  number), so self-intersecting poses are labelled correctly. A training step is then the encoder's output layer
  ``fc_c`` on the pool's features and the two small MLPs on a random batch of (point, part) pairs.
* **Codes that differ between bodies.** Random point-encoder weights give part codes that differ between bodies
  by ~1e-3 of their size, which the query encoder cannot use (one shared shape for all bodies: IoU 0.84 on the
  training bodies themselves). ``fc_c`` is therefore initialised from the pool so that every code dimension has zero
  mean and unit within-part spread (:func:`standardise_codes_`), and trained. Many bodies (128) with fewer points
  each generalise better than few bodies with many points.
* **Dense part-wise supervision**, consistent with the max over parts: a point outside the body must get occupancy 0
  from every part whose box contains it; a point inside the body must get 1 from the part that owns it (the part of
  its nearest mesh vertex). Every (point, part) pair thus carries a label, instead of only the part with the largest
  occupancy receiving gradient.
* Steps run under bfloat16 autocast on CPUs with native bf16 kernels (about 1.5x faster; same held-out IoU in our
  runs); evaluation and use stay float32.
* The first layer of each MLP splits into a per-point term (the local coordinates) and a per-(body, part) term (the
  part one-hot and code), computed once per step: the same function, fewer multiplications.

A fixed held-out set (poses never used for training) gives the occupancy IoU (see :class:`HeldOutSet`).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree

from egohmr.coap.exact import inside_mesh
from egohmr.coap.model import COAPBodyModel, apply_transform, rigid_inverse
from egohmr.coap.partition import NUM_PARTS
from egohmr.coap.sampling import sample_points_on_faces
from utils.io import load_npz_checked
from utils.optim import fused_optimizer
from utils.tensors import to_numpy


@dataclass
class TrainSettings:
    iters: int = 2000                # optimiser steps
    batch_size: int = 2048           # (query point, part) pairs per step
    lr: float = 3e-3                 # Adam, cosine-decayed to lr/50
    pool_bodies: int = 128           # posed training bodies prepared up front
    box_points: int = 256            # per part and body: uniform in the part's padded box
    surface_points: int = 2048       # per body: on the surface plus a Gaussian offset of one of surface_sigmas
    volume_points: int = 1024        # per body: uniform in its bounding box grown by 5 cm
    surface_sigmas: Tuple[float, ...] = (0.005, 0.015, 0.04)   # metres
    beta_std: float = 0.7            # random shape coefficients ~ N(0, beta_std^2), clipped to +-2 beta_std
    decoder_radius: float = 0.1      # metres; IGR initial sphere of the decoder
    coord_gain: float = 10.0         # initial gain of the weights reading local coordinates (metres are small)
    heldout_fraction: float = 0.1    # share of the MoCap poses kept for evaluation
    eval_bodies: int = 16
    eval_points: int = 8192          # volume points per held-out body
    eval_surface_points: int = 4096  # near-surface points per held-out body (secondary metric)
    eval_sigma: float = 0.01         # metres; offset of the held-out near-surface points
    bf16: Optional[bool] = None      # CPU: train under bfloat16 autocast (None: where the CPU supports it)
    seed: int = 0


def load_mocap(path: str):
    """Poses ``[M,72]`` float32 from a MoCap npz (``body_pose`` with the root first)."""
    data = load_npz_checked(path, ['body_pose'], what='MoCap pose file', shapes={'body_pose': (None, 72)})
    pose = data['body_pose'].astype(np.float32)
    if len(pose) < 2:
        raise ValueError(f"MoCap pose file '{path}' needs at least 2 poses (train + held-out), has {len(pose)}")
    return pose


def split_poses(pose: np.ndarray, heldout_fraction: float, seed: int):
    """Seeded split into (train poses, held-out poses); the held-out set has at least one pose."""
    order = np.random.default_rng(seed).permutation(len(pose))
    num_heldout = min(len(pose) - 1, max(1, int(round(heldout_fraction * len(pose)))))
    return pose[order[num_heldout:]], pose[order[:num_heldout]]


def pose_bodies(body_model, pose: torch.Tensor, betas: torch.Tensor):
    """Run the SMPL model (no translation, zero root rotation: COAP works in part frames) without gradients."""
    with torch.no_grad():
        out = body_model(global_orient=torch.zeros_like(pose[:, :3]), body_pose=pose[:, 3:], betas=betas,
                         transl=torch.zeros_like(pose[:, :3]), return_full_pose=True)
    return SimpleNamespace(vertices=out.vertices, joints=out.joints, full_pose=out.full_pose)


def shape_samples(n: int, num_betas: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """Random shape coefficients ``[n, num_betas]`` ~ N(0, std^2), clipped to +-2 std."""
    betas = torch.randn(n, num_betas, generator=generator, device=generator.device) * std
    return betas.clamp(-2 * std, 2 * std)


def sample_part_box_points(frames: dict, num_per_part: int,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Points ``[B, 16*n, 3]`` (posed space) uniform in every part's padded local box, from the bodies'
    :meth:`COAPBodyModel.part_frames`."""
    with torch.no_grad():
        lo, hi = frames['bbox_min'], frames['bbox_max']
        size = frames['bbox_size'] * 0.999   # strictly inside, so box tests keep every point
        unit = torch.rand(lo.shape[0], NUM_PARTS, num_per_part, 3, generator=generator, device=lo.device)
        local = 0.5 * (lo + hi) + (unit - 0.5) * size
        return apply_transform(rigid_inverse(frames['bone_trans']), local).reshape(lo.shape[0], -1, 3)


def sample_near_surface(vertices: torch.Tensor, faces: torch.Tensor, num: int, sigmas,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Points ``[B, num, 3]``: area-uniform on the mesh plus N(0, s^2) offsets, s drawn from ``sigmas`` per point."""
    with torch.no_grad():
        points = sample_points_on_faces(vertices, faces[None], num, generator=generator)[:, 0]
        sigmas = torch.as_tensor(sigmas, dtype=points.dtype, device=points.device)
        pick = torch.randint(len(sigmas), points.shape[:2] + (1,), generator=generator, device=points.device)
        return points + sigmas[pick] * torch.randn(points.shape, generator=generator, device=points.device)


def sample_box_points(vertices: torch.Tensor, num: int, margin: float,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Uniform points ``[B, num, 3]`` in each body's axis-aligned vertex box grown by ``margin`` on every side."""
    lo = vertices.min(dim=1, keepdim=True).values - margin
    hi = vertices.max(dim=1, keepdim=True).values + margin
    unit = torch.rand(vertices.shape[0], num, 3, generator=generator, device=vertices.device)
    return lo + unit * (hi - lo)


def inside_labels(vertices: torch.Tensor, faces: np.ndarray, points: torch.Tensor) -> torch.Tensor:
    """Exact inside/outside labels ``[B, N]`` (float) of ``points [B, N, 3]`` for posed meshes ``[B, V, 3]``."""
    labels = [inside_mesh(vertices[b], faces, points[b]) for b in range(points.shape[0])]
    return torch.from_numpy(np.stack(labels)).float().to(points.device)


def vertex_parts(coap: COAPBodyModel) -> torch.Tensor:
    """Part index ``[V]`` of every mesh vertex (from the partitioner's per-part vertex lists)."""
    selector = coap.partitioner.tight_vert_selector
    parts = torch.full((int(selector.max()) + 1,), -1, dtype=torch.long)
    for k in range(selector.shape[0]):
        parts[selector[k]] = k
    return parts


def owner_parts(vertices: torch.Tensor, points: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """The part ``[B, N]`` owning each point: the part of its nearest mesh vertex."""
    owners = []
    for b in range(points.shape[0]):
        _, nearest = cKDTree(vertices[b].cpu().numpy()).query(points[b].cpu().numpy())
        owners.append(parts[torch.from_numpy(nearest)])
    return torch.stack(owners).to(points.device)


def iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    pred, target = pred.bool(), target.bool()
    union = (pred | target).sum().item()
    return 1.0 if union == 0 else (pred & target).sum().item() / union


@dataclass
class PairPool:
    """Labelled (query point, part) pairs of a pool of encoded training bodies.

    ``features [B,16,128]`` pooled part-surface features (the part codes are ``encoder.fc_c`` of them); per pair
    ``body``, ``part`` (indices), ``local [P,3]`` (point in the part frame, inside its box) and ``target`` (1: the
    point is inside the body and the part owns it; 0: outside).
    """

    features: torch.Tensor
    body: torch.Tensor
    part: torch.Tensor
    local: torch.Tensor
    target: torch.Tensor

    def __len__(self) -> int:
        return len(self.target)


def build_pair_pool(coap: COAPBodyModel, body, faces: np.ndarray, settings: TrainSettings,
                    generator: torch.Generator) -> PairPool:
    """Encode the posed bodies ``body`` and label their query points as (point, part) pairs (see :class:`PairPool`)."""
    with torch.no_grad():
        code = coap.part_frames(body)   # the codes come from fc_c(features) during training
        features = coap.part_surface_features(body.vertices, code['bone_trans'])
        faces_t = torch.as_tensor(faces, device=body.vertices.device)
        points = torch.cat([
            sample_part_box_points(code, settings.box_points, generator),
            sample_near_surface(body.vertices, faces_t, settings.surface_points, settings.surface_sigmas,
                                generator),
            sample_box_points(body.vertices, settings.volume_points, 0.05, generator),
        ], dim=1)
        inside_body = inside_labels(body.vertices, faces, points)                           # [B, N]
        owners = owner_parts(body.vertices, points, vertex_parts(coap).to(points.device))   # [B, N]
        local = apply_transform(code['bone_trans'], points[:, None])                      # [B, 16, N, 3]
        in_box = ((local - code['bbox_center']).abs() < 0.5 * code['bbox_size']).all(dim=-1)
        b_idx, k_idx, n_idx = in_box.nonzero(as_tuple=True)
        target = inside_body[b_idx, n_idx]
        labelled = (target == 0) | (owners[b_idx, n_idx] == k_idx)
        b_idx, k_idx, n_idx = b_idx[labelled], k_idx[labelled], n_idx[labelled]
        return PairPool(features=features, body=b_idx, part=k_idx, local=local[b_idx, k_idx, n_idx],
                        target=target[labelled])


def pair_logits(coap: COAPBodyModel, latent: torch.Tensor, body: torch.Tensor, part: torch.Tensor,
                local: torch.Tensor) -> torch.Tensor:
    """Decoder logits ``[P]`` of (point, part) pairs; the same function as :meth:`COAPBodyModel.query` uses.

    The query encoder's input is ``[local (3), 1, one-hot part (16), code (128)]``. Its first layer and its skip
    layer are split into ``W_local @ local`` (per pair) and the rest (per body and part, ``[B, 16, width]``,
    gathered), which saves most of their multiplications.
    """
    net = coap.query_encoder
    d_in = net.d_in
    row = body * NUM_PARTS + part   # the pair's row of the flattened [B*16, width] term

    def per_part_term(layer: torch.nn.Linear) -> torch.Tensor:
        weight = layer.weight[:, layer.in_features - d_in:]                    # columns reading the net input
        term = latent @ weight[:, 4 + NUM_PARTS:].t() + weight[:, 4:4 + NUM_PARTS].t() + weight[:, 3]
        # index_select, not term[body, part]: the backward of advanced indexing is index_put_ with accumulate,
        # which on CPU adds float rows with parallel atomics (>1 thread, large tensors) in a varying order; the
        # backward of index_select is index_add_, which adds them in index order (bit-reproducible).
        return term.reshape(-1, term.shape[-1]).index_select(0, row)

    def first_input_layer(layer: torch.nn.Linear, x: Optional[torch.Tensor]) -> torch.Tensor:
        weight = layer.weight[:, layer.in_features - d_in:]
        out = local @ weight[:, :3].t() + per_part_term(layer)
        if x is not None:
            out = out + x @ layer.weight[:, :layer.in_features - d_in].t()
        return out

    x = None
    for i in range(net.num_linear):
        layer = getattr(net, f'lin{i}')
        if i == 0:
            x = first_input_layer(layer, None) + layer.bias
        elif i in net.skip_in:
            x = first_input_layer(layer, x) / math.sqrt(2.0) + layer.bias
        else:
            x = layer(x)
        if i < net.num_linear - 1:
            x = net.activate(x)
    return coap.decoder(torch.cat([local, x], dim=-1))[:, 0]


class HeldOutSet:
    """Fixed held-out bodies, query points and labels.

    * volume points: uniform in the body's bounding box (5 cm margin); their IoU is the reported ``iou``
      (the volumetric IoU of predicted and true body occupancy, as in Occupancy Networks);
    * near-surface points: on the surface plus N(0, sigma^2) noise (``iou_surface``, a much stricter number that
      measures the surface position to within a few millimetres).
    """

    def __init__(self, coap: COAPBodyModel, body_model, faces: np.ndarray, pose: np.ndarray,
                 settings: TrainSettings):
        gen = torch.Generator().manual_seed(settings.seed + 1)
        pose = torch.from_numpy(pose[:settings.eval_bodies])
        betas = shape_samples(len(pose), body_model.num_betas, settings.beta_std, gen)
        self.body = pose_bodies(body_model, pose, betas)
        self.volume = sample_box_points(self.body.vertices, settings.eval_points, 0.05, gen)
        self.surface = sample_near_surface(self.body.vertices, torch.as_tensor(faces),
                                           settings.eval_surface_points, (settings.eval_sigma,), gen)
        self.volume_labels = inside_labels(self.body.vertices, faces, self.volume)
        self.surface_labels = inside_labels(self.body.vertices, faces, self.surface)
        self.seed = settings.seed + 2
        self.num_surface_samples = coap.num_surface_samples

    def evaluate(self, coap: COAPBodyModel, chunk: int = 4) -> dict:
        """IoU of ``occupancy > 0.5`` on the volume points (``iou``) and the near-surface points."""
        pred_volume, pred_surface = [], []
        state = torch.random.get_rng_state()
        train_samples, coap.num_surface_samples = coap.num_surface_samples, self.num_surface_samples
        torch.manual_seed(self.seed)  # the encoder's surface samples are random: fix them for comparable numbers
        try:
            with torch.no_grad():
                for start in range(0, self.volume.shape[0], chunk):
                    part = slice(start, start + chunk)
                    body = SimpleNamespace(vertices=self.body.vertices[part], joints=self.body.joints[part],
                                           full_pose=self.body.full_pose[part])
                    coap.encode_body(body)
                    pred_volume.append(coap.query(self.volume[part], body) > coap.level_set)
                    pred_surface.append(coap.query(self.surface[part], body) > coap.level_set)
        finally:
            torch.random.set_rng_state(state)
            coap.num_surface_samples = train_samples
            coap.detach_cache()
        return {'iou': iou(torch.cat(pred_volume), self.volume_labels),
                'iou_surface': iou(torch.cat(pred_surface), self.surface_labels)}


def initialise_for_training(coap: COAPBodyModel, settings: TrainSettings) -> None:
    """Start-up initialisation: IGR sphere of ``decoder_radius`` and amplified coordinate inputs."""
    coap.decoder.geometric_init_(settings.decoder_radius)
    coap.query_encoder.scale_input_weights_(range(3), settings.coord_gain)
    coap.decoder.scale_input_weights_(range(3), settings.coord_gain)


def train_coap(body_model, pose: np.ndarray, settings: TrainSettings,
               progress: Optional[Callable[[int, float], None]] = None, device: str = 'cpu',
               log: Optional[Callable[[str], None]] = None):
    """Train a fresh :class:`COAPBodyModel` for ``body_model`` on MoCap poses.

    Returns ``(coap, metrics)`` with the held-out IoUs, the final training loss and the wall time.
    ``progress(step, loss)`` is called after every step, ``log(message)`` after each preparation stage.
    """
    start_time = time.time()
    log = log or (lambda message: None)
    torch.manual_seed(settings.seed)
    coap = COAPBodyModel(body_model)
    initialise_for_training(coap, settings)
    faces = _body_faces(body_model)
    train_pose, heldout_pose = split_poses(pose, settings.heldout_fraction, settings.seed)
    heldout = HeldOutSet(coap, body_model, faces, heldout_pose, settings)

    coap.to(device)
    body_model = body_model.to(device)
    gen = torch.Generator(device=device).manual_seed(settings.seed + 3)
    index = torch.randint(len(train_pose), (settings.pool_bodies,), generator=gen, device=device)
    betas = shape_samples(settings.pool_bodies, body_model.num_betas, settings.beta_std, gen)
    bodies = pose_bodies(body_model, torch.from_numpy(train_pose[index.cpu().numpy()]).to(device), betas)
    pool = build_pair_pool(coap, bodies, faces, settings, gen)
    log(f"{settings.pool_bodies} training bodies, {len(pool)} labelled (point, part) pairs "
        f"({time.time() - start_time:.0f} s)")

    standardise_codes_(coap.encoder.fc_c, pool.features)
    params = (list(coap.encoder.fc_c.parameters()) + list(coap.query_encoder.parameters())
              + list(coap.decoder.parameters()))
    optimizer = fused_optimizer(torch.optim.Adam, params, lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(step, settings.iters)
                                                                      / max(1, settings.iters))))
    use_bf16 = str(device).startswith('cpu') and (cpu_supports_bf16() if settings.bf16 is None else settings.bf16)
    loss_value = float('nan')
    coap.train()
    for step in range(settings.iters):
        pick = torch.randint(len(pool), (settings.batch_size,), generator=gen, device=device)
        latent = coap.encoder.fc_c(pool.features)   # float32: bodies differ by ~1e-3 of the feature values
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=use_bf16):
            logits = pair_logits(coap, latent, pool.body[pick], pool.part[pick], pool.local[pick])
        logits = logits.float()
        loss = F.binary_cross_entropy_with_logits(-logits, pool.target[pick])   # occupancy = sigmoid(-logit)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_value = float(loss.item())
        if progress is not None:
            progress(step, loss_value)
    coap.eval()
    metrics = heldout.evaluate(coap.cpu())
    metrics.update(final_loss=loss_value, seconds=time.time() - start_time, bf16=use_bf16,
                   settings=asdict(settings))
    return coap, metrics


def standardise_codes_(fc_c: torch.nn.Linear, features: torch.Tensor, eps: float = 1e-6) -> None:
    """Data initialisation of the encoder's output layer: codes ``fc_c(features)`` of zero mean and unit
    within-part standard deviation per dimension over the pool ``features [B, 16, C]``.

    With random point-encoder weights the pooled features of different bodies differ by ~1e-3, far too little
    for the query encoder to notice; rescaling them lets the codes carry the body's shape and pose from step 0.
    """
    if fc_c.in_features != fc_c.out_features or features.shape[-1] != fc_c.in_features:
        raise ValueError(f"standardise_codes_ needs a square output layer matching the features, got "
                         f"{fc_c.in_features}->{fc_c.out_features} for features of size {features.shape[-1]}")
    with torch.no_grad():
        flat = features.reshape(-1, features.shape[-1])
        within = (features - features.mean(dim=0, keepdim=True)).reshape(-1, features.shape[-1]).std(dim=0)
        scale = 1.0 / within.clamp_min(max(eps, 1e-2 * float(within.max())))   # nearly constant dims stay small
        weight = torch.diag(scale)
        fc_c.weight.copy_(weight)
        fc_c.bias.copy_(-(weight @ flat.mean(dim=0)))


def cpu_supports_bf16() -> bool:
    """Whether oneDNN has native bfloat16 kernels on this CPU (AVX512-BF16 / AMX); elsewhere bf16 is emulated."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _body_faces(body_model) -> np.ndarray:
    faces = body_model.faces_tensor if hasattr(body_model, 'faces_tensor') else body_model.faces
    return to_numpy(faces, np.int64)
