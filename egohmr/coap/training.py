"""Train COAP occupancy weights for any SMPL-format body model (beyond the original repo's scope).

Data: bodies posed with MoCap poses (``cmu_mocap.npz``: ``body_pose`` [M,72], root first) and random shapes.
For each body, query points are drawn per part, as in COAP's own training data:
half uniformly inside the part's padded local box (mapped to posed space), half on the part's surface plus
Gaussian noise. Labels are exact inside/outside tests of the posed closed mesh (generalised winding number), so
self-intersecting poses are labelled correctly. Points outside every part box are ignored by the loss (their
occupancy is 0 by construction).

A fixed held-out set (poses never used for training) gives the occupancy IoU (see :class:`HeldOutSet`).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from egohmr.coap.exact import inside_mesh
from egohmr.coap.model import COAPBodyModel, apply_transform, rigid_inverse
from egohmr.coap.partition import NUM_PARTS
from egohmr.coap.sampling import sample_points_on_faces
from utils.io import load_npz_checked


@dataclass
class TrainSettings:
    iters: int = 1500                # optimiser steps
    batch_size: int = 1              # bodies per step
    num_points: int = 64             # query points per part and body (half uniform in the box, half near surface)
    lr: float = 2e-3                 # Adam, cosine-decayed to lr/20
    surface_sigma: float = 0.01      # metres; Gaussian offset of the near-surface points
    train_encoder: bool = False      # False: keep the random point encoder (its codes still describe each part)
    train_surface_samples: int = 1000  # encoder points per part while training (1000 at evaluation / use)
    steps_per_body: int = 4          # with a frozen encoder, each posed batch is encoded once and used this often
    beta_std: float = 0.7            # random shape coefficients ~ N(0, beta_std^2), clipped to +-2 beta_std
    decoder_radius: float = 0.1      # metres; IGR initial sphere of the decoder
    coord_gain: float = 10.0         # initial gain of the weights reading local coordinates (metres are small)
    part_gain: float = 1.0           # initial gain of the weights reading the part one-hot
    heldout_fraction: float = 0.1    # share of the MoCap poses kept for evaluation
    eval_bodies: int = 16
    eval_points: int = 8192          # volume points per held-out body (and half as many near-surface points)
    seed: int = 0


def load_mocap(path: str):
    """``(pose [M,72], betas [M,10])`` float32 from a MoCap npz (``body_pose`` with the root first)."""
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


def sample_query_points(coap: COAPBodyModel, body, num_per_part: int, sigma: float,
                        generator: Optional[torch.Generator] = None):
    """Per-part query points ``(uniform [B, 16*nu, 3], surface [B, 16*ns, 3])`` in posed space."""
    with torch.no_grad():
        batch = body.vertices.shape[0]
        num_uniform = num_per_part // 2
        num_surface = num_per_part - num_uniform
        bone_trans = coap.compute_bone_trans(body.full_pose, body.joints)
        lo, hi = coap.part_bounds(body.vertices, bone_trans)
        # Slightly inside the padded box so box tests at query time keep every point.
        size = (hi - lo) * coap.bbox_padding * 0.999
        center = 0.5 * (lo + hi)
        device = body.vertices.device
        unit = torch.rand(batch, NUM_PARTS, num_uniform, 3, generator=generator, device=device)
        local = center + (unit - 0.5) * size
        uniform = apply_transform(rigid_inverse(bone_trans), local)
        surface = sample_points_on_faces(body.vertices, coap.partitioner.tight_face_tensor, num_surface,
                                         generator=generator)
        surface = surface + sigma * torch.randn(surface.shape, generator=generator, device=device)
    return uniform.reshape(batch, -1, 3), surface.reshape(batch, -1, 3)


def inside_labels(vertices: torch.Tensor, faces: np.ndarray, points: torch.Tensor) -> torch.Tensor:
    """Exact inside/outside labels ``[B, N]`` (float) of ``points [B, N, 3]`` for posed meshes ``[B, V, 3]``."""
    labels = [inside_mesh(vertices[b], faces, points[b]) for b in range(points.shape[0])]
    return torch.from_numpy(np.stack(labels)).float().to(points.device)


def iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    pred, target = pred.bool(), target.bool()
    union = (pred | target).sum().item()
    return 1.0 if union == 0 else (pred & target).sum().item() / union


def sample_box_points(vertices: torch.Tensor, num: int, margin: float,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Uniform points ``[B, num, 3]`` in each body's axis-aligned vertex box grown by ``margin`` on every side."""
    lo = vertices.min(dim=1, keepdim=True).values - margin
    hi = vertices.max(dim=1, keepdim=True).values + margin
    unit = torch.rand(vertices.shape[0], num, 3, generator=generator, device=vertices.device)
    return lo + unit * (hi - lo)


class HeldOutSet:
    """Fixed held-out bodies, query points and labels.

    * volume points: uniform in the body's bounding box (5 cm margin); their IoU is the reported ``iou``
      (the volumetric IoU of predicted and true body occupancy, as in Occupancy Networks);
    * near-surface points: per part, on its surface plus N(0, sigma^2) noise (COAP's ``iou_surf``, a much
      stricter number that measures the surface position to within a few millimetres).
    """

    def __init__(self, coap: COAPBodyModel, body_model, faces: np.ndarray, pose: np.ndarray,
                 settings: TrainSettings):
        gen = torch.Generator().manual_seed(settings.seed + 1)
        pose = torch.from_numpy(pose[:settings.eval_bodies])
        betas = shape_samples(len(pose), body_model.num_betas, settings.beta_std, gen)
        self.body = pose_bodies(body_model, pose, betas)
        self.volume = sample_box_points(self.body.vertices, settings.eval_points, 0.05, gen)
        _, self.surface = sample_query_points(coap, self.body, 2 * settings.eval_points // NUM_PARTS,
                                              settings.surface_sigma, gen)
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


def shape_samples(n: int, num_betas: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """Random shape coefficients ``[n, num_betas]`` ~ N(0, std^2), clipped to +-2 std."""
    betas = torch.randn(n, num_betas, generator=generator, device=generator.device) * std
    return betas.clamp(-2 * std, 2 * std)


def occupancy_loss(coap: COAPBodyModel, body, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the body occupancy on the points inside at least one part box."""
    occupancy, extra = coap.query(points, body, ret_intermediate=True)
    keep = ~extra['all_out']
    if not bool(keep.any()):
        return occupancy.sum() * 0.0
    occupancy = occupancy[keep].clamp(1e-6, 1.0 - 1e-6)
    return F.binary_cross_entropy(occupancy, labels[keep])


def initialise_for_training(coap: COAPBodyModel, settings: TrainSettings) -> None:
    """Start-up initialisation: IGR sphere of ``decoder_radius`` and amplified coordinate / part inputs."""
    coap.decoder.geometric_init_(settings.decoder_radius)
    coap.query_encoder.scale_input_weights_(range(3), settings.coord_gain)
    coap.query_encoder.scale_input_weights_(range(4, 4 + NUM_PARTS), settings.part_gain)
    coap.decoder.scale_input_weights_(range(3), settings.coord_gain)


def train_coap(body_model, pose: np.ndarray, settings: TrainSettings,
               progress: Optional[Callable[[int, float], None]] = None, device: str = 'cpu',
               eval_every: int = 0):
    """Train a fresh :class:`COAPBodyModel` for ``body_model`` on MoCap poses.

    Returns ``(coap, metrics)`` with the held-out IoUs, the final training loss and the wall time.
    ``progress(step, loss)`` is called after every step.
    """
    start_time = time.time()
    torch.manual_seed(settings.seed)
    coap = COAPBodyModel(body_model)
    initialise_for_training(coap, settings)
    faces = _body_faces(body_model)
    train_pose, heldout_pose = split_poses(pose, settings.heldout_fraction, settings.seed)
    heldout = HeldOutSet(coap, body_model, faces, heldout_pose, settings)

    coap.to(device)
    body_model = body_model.to(device)
    coap.encoder.requires_grad_(settings.train_encoder)
    optimizer = torch.optim.Adam([p for p in coap.parameters() if p.requires_grad], lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(step, settings.iters)
                                                                      / max(1, settings.iters))))
    gen = torch.Generator(device=device).manual_seed(settings.seed + 3)
    loss_value = float('nan')
    eval_samples = coap.num_surface_samples
    coap.num_surface_samples = settings.train_surface_samples
    coap.train()
    try:
        reuse = 1 if settings.train_encoder else max(1, settings.steps_per_body)
        body = None
        for step in range(settings.iters):
            if step % reuse == 0:
                coap.detach_cache()
                index = torch.randint(len(train_pose), (settings.batch_size,), generator=gen, device=device)
                pose_b = torch.from_numpy(train_pose[index.cpu().numpy()]).to(device)
                betas = shape_samples(settings.batch_size, body_model.num_betas, settings.beta_std, gen)
                body = pose_bodies(body_model, pose_b, betas)
            uniform, surface = sample_query_points(coap, body, settings.num_points, settings.surface_sigma, gen)
            points = torch.cat([uniform, surface], dim=1)
            loss = occupancy_loss(coap, body, points, inside_labels(body.vertices, faces, points))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_value = float(loss.item())
            if progress is not None:
                progress(step, loss_value)
            if eval_every and (step + 1) % eval_every == 0 and step + 1 < settings.iters:
                print(f"step {step + 1}: held-out {heldout.evaluate(coap)}", flush=True)
                coap.detach_cache()
    finally:
        coap.num_surface_samples = eval_samples
        coap.encoder.requires_grad_(True)
    coap.eval()
    metrics = heldout.evaluate(coap.cpu())
    metrics.update(final_loss=loss_value, seconds=time.time() - start_time, settings=asdict(settings))
    return coap, metrics


def _body_faces(body_model) -> np.ndarray:
    faces = body_model.faces_tensor if hasattr(body_model, 'faces_tensor') else body_model.faces
    return (faces.detach().cpu().numpy() if torch.is_tensor(faces) else np.asarray(faces)).astype(np.int64)
