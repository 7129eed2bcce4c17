"""Stage-2 sampling and test metrics (as the original ``test_egohmr.py``).

Sampling: the image and scene encoders run once per batch (:meth:`EgoHMR.sampling_condition`); the condition, camera
and a ``[S*bs, 144]`` noise tensor then go through ONE reverse chain per chunk of samples. Row ``s*bs + i`` is sample
``s`` of frame ``i``. RNG semantics differ from the original (which ran S chains one after the other, each drawing
``[bs, 144]`` noise per step). With ``sample_seed`` (the test script's ``--seed``) every draw of sample ``s`` of frame
``f`` -- the starting noise, each step's noise, COAP's surface samples of each guided step and of the collision
ratio -- comes from its own stream seeded by ``(seed, f, s, purpose, step)`` (:mod:`utils.frame_rng`), so a frame's
samples do not depend on the batch size, ``--samples_per_chain``, the workers or the shard it runs in. Without it,
one ``randn`` per step covers all samples of the chunk (reproducible under a fixed global seed, batch-dependent).

Metrics keep the original definitions (so numbers compare with the paper), including its oddities; corrected
variants are reported under other names (``apd_joints_standard``, ``pa_mpjpe_vis_subset``, ``contact_ratio_euclid``).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from egohmr import collision
from egohmr.gcn import weights_cast_once
from egohmr.guidance import ROW_STREAMS_KEY, SAMPLES_IN_CHAIN_KEY, CollisionGuidance
from egohmr.model import POSE_ONLY_KEY
from egohmr.visibility import in_image_mask
from utils.frame_rng import RowStreams, frame_indices
from utils.tensors import full_precision, precision_context, to_numpy
from utils.metrics import masked_procrustes, similarity_procrustes

MM = 1000.0
CONTACT_SQ_THRESHOLD = 0.02        # the original compares a SQUARED distance (m^2) with 0.02 (~14 cm)
CONTACT_EUCLID_THRESHOLD = 0.02    # corrected variant: 2 cm Euclidean
SAMPLING_METHODS = ('ddpm', 'ddim')
# The arrays of the results pickle (``results_seed_<seed>.pkl``), one row per frame.
RESULT_KEYS = ('pred_betas_list', 'pred_global_orient_list', 'pred_body_pose_list', 'collision_ratio_list',
               'contact_ratio_list', 'pred_cam_full_list', 'gt_cam_full_list')


# ---------------------------------------------------------------------------------------------------- sampling
def tile(x: torch.Tensor, times: int) -> torch.Tensor:
    """Repeat along dim 0, sample-major: ``[bs, ...] -> [times*bs, ...]`` (row ``s*bs + i`` = item ``i``)."""
    return x.repeat(times, *([1] * (x.dim() - 1)))


def sampling_batch(batch: Dict, condition: Dict[str, torch.Tensor], times: int) -> Dict:
    """The minimal batch a cached-condition forward needs, tiled ``times`` along the batch dimension; it records
    that ``times`` samples share the chain (guidance averages over the images of one sample) and that the steps need
    only the pose prediction (:data:`egohmr.model.POSE_ONLY_KEY`; :func:`decoded_output` decodes the final one)."""
    return {'fx': tile(batch['fx'], times), 'cam_cx': tile(batch['cam_cx'], times),
            'cam_cy': tile(batch['cam_cy'], times),
            'condition': {k: tile(v, times) for k, v in condition.items()},
            SAMPLES_IN_CHAIN_KEY: times, POSE_ONLY_KEY: True}


def untile(x: torch.Tensor, times: int) -> torch.Tensor:
    """``[times*bs, ...] -> [bs, times, ...]``."""
    return x.reshape(times, -1, *x.shape[1:]).transpose(0, 1)


@torch.no_grad()
def sample_poses(model, diffusion, batch: Dict, num_samples: int, method: str = 'ddpm',
                 guidance: Optional[CollisionGuidance] = None, samples_per_chain: Optional[int] = None,
                 occupancy_model=None, guide_final_step: bool = False,
                 precision: str = 'fp32', sample_seed: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Draw ``num_samples`` poses per frame with full reverse chains; returns ``[bs, S, ...]`` tensors.

    Keys: ``global_orient [bs,S,1,3,3]``, ``body_pose [bs,S,23,3,3]``, ``betas [bs,S,10]``, ``rotmats``,
    ``joints [bs,S,45,3]`` and ``vertices [bs,S,V,3]`` (neutral SMPL, no translation), ``vis_mask_smpl [bs,24]``,
    and ``collision_ratio [bs,S]`` (numpy) when ``occupancy_model`` is given. The returned prediction is the model
    output of the last step (t = 0), as in the original, which computes the guided update of that step and then
    discards it; ``guide_final_step`` applies it instead (:meth:`CollisionGuidance.final_step`).
    ``guidance``: the collision guidance (DDPM and DDIM hooks), or None. ``samples_per_chain`` bounds the samples
    batched into one chain (memory); default all. Each body gets the guidance gradient of its own sample's chain
    however many samples share one chain. ``precision``: :func:`utils.tensors.precision_context` (outputs are float32).
    ``sample_seed``: draw from per-frame streams (module docstring; needs ``batch['frame_index']``), or None.
    """
    if method not in SAMPLING_METHODS:
        raise ValueError(f"sampling method must be one of {SAMPLING_METHODS}, got {method!r}")
    if num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {num_samples}")
    model.eval()
    with precision_context(precision, model.device), weights_cast_once(model):
        return _sample_poses(model, diffusion, batch, num_samples, method, guidance, samples_per_chain,
                             occupancy_model, guide_final_step, sample_seed)


def chain_noise(diffusion, streams: RowStreams, width: int, device) -> Dict:
    """``diffusion.sample``'s ``noise`` (x_N from each row's ('diffusion_noise', N) stream) and ``noise_fn`` (step
    ``j``'s noise from its ('diffusion_noise', j) stream) for the rows of ``streams``."""
    def noise_fn(x, t):
        return streams.randn(x.shape[1], 'diffusion_noise', int(t[0]), x.device, x.dtype)
    return {'noise': streams.randn(width, 'diffusion_noise', diffusion.num_timesteps, device),
            'noise_fn': noise_fn}


def _sample_poses(model, diffusion, batch, num_samples, method, guidance, samples_per_chain, occupancy_model,
                  guide_final_step, sample_seed=None) -> Dict[str, torch.Tensor]:
    frames = None
    if sample_seed is not None:
        frames = frame_indices(batch)
        if frames is None:
            raise ValueError("per-frame sampling streams need the batch's 'frame_index' (EgoBodyDataset items)")
    condition = model.sampling_condition(batch)
    bs = batch['fx'].shape[0]
    chunk = max(1, min(num_samples, samples_per_chain or num_samples))
    pieces: List[Dict[str, torch.Tensor]] = []
    done = 0
    while done < num_samples:
        times = min(chunk, num_samples - done)
        chain_batch = sampling_batch(batch, condition, times)
        streams, draws = None, {}
        if frames is not None:
            streams = RowStreams.sample_major(sample_seed, frames, done, times)
            chain_batch[ROW_STREAMS_KEY] = streams
            draws = chain_noise(diffusion, streams, 6 * 24, model.device)
        result = diffusion.sample(model.denoise, (times * bs, 6 * 24), method=method,
                                  model_kwargs={'batch': chain_batch}, guidance=guidance, device=model.device,
                                  **draws)
        out = decoded_output(model, result, chain_batch)
        if guide_final_step and guidance is not None and method == 'ddpm':
            out = final_guided_prediction(model, guidance, chain_batch, result)
        piece = {'rotmats': out['pred_rotmats'].float(), 'betas': out['pred_smpl_params']['betas'].float(),
                 'joints': out['pred_keypoints_3d'].float(), 'vertices': out['pred_vertices'].float()}
        if occupancy_model is not None:
            with full_precision(out['pred_vertices']):          # the metric in fp32 (a bf16 run included)
                ratio = collision.collision_ratio(occupancy_model, chain_batch['condition']['scene_points'],
                                                  out['pred_vertices'], out['pred_keypoints_3d'],
                                                  out['pred_rotmats'],
                                                  generators=streams.generators('collision_ratio') if streams else None)
            piece['collision_ratio'] = torch.from_numpy(ratio)
        pieces.append({k: untile(v, times) for k, v in piece.items()})
        done += times
    samples = {k: torch.cat([p[k] for p in pieces], dim=1) for k in pieces[0]}
    samples['global_orient'] = samples['rotmats'][:, :, :1]
    samples['body_pose'] = samples['rotmats'][:, :, 1:]
    samples['vis_mask_smpl'] = condition['vis_mask_smpl']
    if 'collision_ratio' in samples:
        samples['collision_ratio'] = samples['collision_ratio'].numpy()
    return samples


def decoded_output(model, result: Dict, batch: Dict) -> Dict:
    """The last step's model output, decoded to SMPL if the chain ran pose-only: the same tensors the step's full
    forward returns (it decodes the same ``pred_x_start`` with the same condition)."""
    out = result['model_output']
    if 'pred_vertices' in out:
        return out
    with torch.no_grad():
        decoded = model.decode(out['pred_x_start'], out['condition'], batch)
    decoded.update(vis_mask_smpl=out['vis_mask_smpl'], condition=out['condition'])
    return decoded


def final_guided_prediction(model, guidance: CollisionGuidance, batch: Dict, result: Dict) -> Dict:
    """``--guide_final_step`` (opt-in; departs from the original): the returned prediction gets the t = 0 guided
    update ``x̂0 + w·0.01·g``, with the gradient taken at ``x̂0`` itself rather than at the chain's noisy input.

    The original computes that update and returns the unguided ``x̂0``, so guidance reaches its output only through
    the denoiser's response to ``x_t`` -- close to none for a briefly trained denoiser.
    """
    out = result['model_output']
    guided_x0 = guidance.final_step(result['pred_xstart'], out, batch)
    with torch.no_grad():
        guided = model.decode(guided_x0, out['condition'], batch)
    guided['condition'] = out['condition']
    return guided


# ---------------------------------------------------------------------------------------------------- metrics
def diversity_std(points: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """``points [S, J, 3]``: unbiased std over samples, mean over the (masked) joints and xyz.

    NaN when the mask selects no joint (as the original); 0 for a single sample (the original gives NaN).
    """
    pts = points if mask is None else points[:, mask]
    if pts.shape[1] == 0:
        return math.nan
    if pts.shape[0] < 2:
        return 0.0
    return float(pts.std(axis=0, ddof=1).mean())


def diversity_apd(points: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """The original's APD: sum over ORDERED sample pairs and joints of distances / (J N (N-1) 2).

    That is half the usual average pairwise distance. NaN when the mask selects no joint; 0 for one sample.
    """
    pts = points if mask is None else points[:, mask]
    n, joints = pts.shape[0], pts.shape[1]
    if joints == 0:
        return math.nan
    if n < 2:
        return 0.0
    dist = np.linalg.norm(pts[None] - pts[:, None], axis=-1)
    return float(dist.sum() / joints / n / (n - 1) / 2)


def procrustes_on_subset(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Similarity-align ``pred [N,3]`` to ``gt`` using only the ``mask`` joints (all if fewer than 3); apply to all."""
    idx = np.flatnonzero(mask) if mask.sum() >= 3 else np.arange(len(pred))
    p, g = pred[idx], gt[idx]
    mu_p, mu_g = p.mean(0), g.mean(0)
    xp, xg = p - mu_p, g - mu_g
    u, s, vt = np.linalg.svd(xg.T @ xp)
    fix = np.ones(3)
    fix[-1] = np.sign(np.linalg.det(u @ vt))
    rot = u @ np.diag(fix) @ vt
    scale = (s * fix).sum() / max((xp ** 2).sum(), 1e-12)
    return scale * (pred - mu_p) @ rot.T + mu_g


def min_squared_distance_to_scene(vertices: np.ndarray, scene: np.ndarray) -> float:
    """Smallest squared distance between any vertex ``[V,3]`` and any scene point ``[P,3]``."""
    from scipy.spatial import cKDTree
    dist, _ = cKDTree(scene).query(vertices, k=1)
    return float(np.min(dist) ** 2)


class Stage2Metrics:
    """Accumulates per-frame, per-sample errors and reduces them as ``test_egohmr.py`` does.

    ``update`` takes one batch (pelvis alignment, visibility and Procrustes happen here); ``summary`` returns the
    final numbers (mm, ratios unscaled) plus notes. Given the frames' indices, the per-frame rows are reduced in
    frame order, so the accumulators of several shares (:meth:`state`, :meth:`merged`) give the numbers of one run.
    """

    def __init__(self, num_samples: int, eval_with_vis_mask_pa: bool = True):
        self.num_samples = int(num_samples)
        self.eval_with_vis_mask_pa = eval_with_vis_mask_pa
        self.rows: Dict[str, list] = {}
        self.joint_vis_num = 0
        self.joint_invis_num = 0
        self.vertex_vis_num = 0
        self.vertex_invis_num = 0

    def _add(self, name: str, values) -> None:
        self.rows.setdefault(name, []).append(np.asarray(values, dtype=np.float64))

    def update(self, pred_joints, pred_vertices, input_transl, gt_joints, gt_vertices, focal_px, cam_center,
               scene_points_full=None, collision_ratio=None, frame_index=None) -> None:
        """One batch.

        pred_joints ``[bs,S,>=24,3]`` / pred_vertices ``[bs,S,V,3]``: neutral SMPL without translation;
        input_transl ``[bs,3]``: the translation given to the model (stage 1 or GT); gt_joints ``[bs,>=24,3]`` /
        gt_vertices ``[bs,V,3]``: gender SMPL with the GT translation (PV frame); focal_px ``[bs]``;
        cam_center ``[bs,2]``; scene_points_full ``[bs,P,3]`` (PV frame) for the contact score;
        collision_ratio ``[bs,S]``; frame_index ``[bs]`` (the frames' rows in the split).
        """
        joint_vis = to_numpy(in_image_mask(gt_joints[:, :24], focal_px, cam_center), bool)     # [bs,24]
        vert_vis = to_numpy(in_image_mask(gt_vertices, focal_px, cam_center), bool)            # [bs,V]
        pj, pv = to_numpy(pred_joints, np.float64)[:, :, :24], to_numpy(pred_vertices, np.float64)
        gj, gv = to_numpy(gt_joints, np.float64)[:, :24], to_numpy(gt_vertices, np.float64)
        transl = to_numpy(input_transl, np.float64)
        bs, n = pj.shape[:2]
        if n != self.num_samples:
            raise ValueError(f"expected {self.num_samples} samples per frame, got {n}")
        if frame_index is not None:
            self.rows.setdefault('frame_index', []).append(to_numpy(frame_index, np.int64).reshape(bs))
        self.joint_vis_num += int(joint_vis.sum())
        self.joint_invis_num += int((~joint_vis).sum())
        self.vertex_vis_num += int(vert_vis.sum())
        self.vertex_invis_num += int((~vert_vis).sum())

        pred_pelvis = pj[:, :, :1]
        pj_al, pv_al = pj - pred_pelvis, pv - pred_pelvis
        gj_al, gv_al = gj - gj[:, None, 0], gv - gj[:, None, 0]
        self._per_point('g_mpjpe', np.linalg.norm(pj + transl[:, None, None] - gj[:, None], axis=-1), joint_vis)
        mpjpe_err = np.linalg.norm(pj_al - gj_al[:, None], axis=-1)
        self._per_point('mpjpe', mpjpe_err, joint_vis)
        self._per_point('v2v', np.linalg.norm(pv_al - gv_al[:, None], axis=-1), vert_vis)

        flat_pred = pj_al.reshape(bs * n, 24, 3)
        flat_gt = np.repeat(gj_al[:, None], n, axis=1).reshape(bs * n, 24, 3)
        flat_vis = np.repeat(joint_vis[:, None], n, axis=1).reshape(bs * n, 24)
        aligned = (masked_procrustes(flat_pred, flat_gt, flat_vis) if self.eval_with_vis_mask_pa
                   else similarity_procrustes(flat_pred, flat_gt))
        self._per_point('pa_mpjpe', np.linalg.norm(aligned - flat_gt, axis=-1).reshape(bs, n, 24), joint_vis)
        subset = np.stack([procrustes_on_subset(p, g, m) for p, g, m in zip(flat_pred, flat_gt, flat_vis)])
        self._add('pa_mpjpe_vis_subset', np.linalg.norm(subset - flat_gt, axis=-1).mean(-1).reshape(bs, n))
        plain = similarity_procrustes(flat_pred, flat_gt)
        self._add('pa_mpjpe_all_joints', np.linalg.norm(plain - flat_gt, axis=-1).mean(-1).reshape(bs, n))

        for name, mask_of in (('', lambda k: None), ('_vis', lambda k: joint_vis[k]),
                              ('_invis', lambda k: ~joint_vis[k])):
            self._add('std_joints' + name, [diversity_std(pj_al[k], mask_of(k)) for k in range(bs)])
            self._add('apd_joints' + name, [diversity_apd(pj_al[k], mask_of(k)) for k in range(bs)])

        if scene_points_full is not None:
            scene = to_numpy(scene_points_full, np.float64)
            full_vertices = pv + transl[:, None, None]
            min_sq = np.array([[min_squared_distance_to_scene(full_vertices[k, s], scene[k]) for s in range(n)]
                               for k in range(bs)])
            self._add('contact_min_sq_dist', min_sq)
        if collision_ratio is not None:
            self._add('collision_ratio', to_numpy(collision_ratio, np.float64).reshape(bs, n))

    def _per_point(self, name: str, err: np.ndarray, vis: np.ndarray) -> None:
        """Store per-frame mean ``[bs,S]`` and the visible / invisible sums ``[bs,S]`` of ``err [bs,S,N]``."""
        self._add(name, err.mean(-1))
        self._add(name + '_vis_sum', (err * vis[:, None]).sum(-1))
        self._add(name + '_invis_sum', (err * ~vis[:, None]).sum(-1))

    def _cat(self, name: str) -> np.ndarray:
        """All frames' rows of ``name``, in frame order where the frame indices are known."""
        values = np.concatenate(self.rows[name], axis=0)
        order = self.frame_order()
        return values if order is None else values[order]

    def frame_order(self) -> Optional[np.ndarray]:
        """The permutation that sorts the rows by frame index (None without frame indices)."""
        if 'frame_index' not in self.rows:
            return None
        frames = np.concatenate(self.rows['frame_index'])
        if len(np.unique(frames)) != len(frames):
            raise ValueError("Stage2Metrics: a frame was evaluated twice (repeated frame_index)")
        return np.argsort(frames, kind='stable')

    COUNTS = ('joint_vis_num', 'joint_invis_num', 'vertex_vis_num', 'vertex_invis_num')

    def state(self) -> Dict:
        """What :meth:`merged` needs of this share: per-frame rows (one array per name) and the counts."""
        return {'num_samples': self.num_samples, 'eval_with_vis_mask_pa': self.eval_with_vis_mask_pa,
                'rows': {name: np.concatenate(parts, axis=0) for name, parts in self.rows.items()},
                'counts': {name: getattr(self, name) for name in self.COUNTS}}

    @classmethod
    def merged(cls, states) -> 'Stage2Metrics':
        """One accumulator holding the frames of all ``states`` (:meth:`state`), which must not overlap."""
        states = list(states)
        if not states:
            raise ValueError("Stage2Metrics.merged: no shares given")
        first = states[0]
        out = cls(first['num_samples'], first['eval_with_vis_mask_pa'])
        for state in states:
            if (state['num_samples'], state['eval_with_vis_mask_pa']) != (out.num_samples, out.eval_with_vis_mask_pa):
                raise ValueError("Stage2Metrics.merged: the shares were evaluated with different settings")
            if set(state['rows']) != set(first['rows']):
                raise ValueError("Stage2Metrics.merged: the shares hold different metrics")
            for name, values in state['rows'].items():
                out.rows.setdefault(name, []).append(values)
            for name in cls.COUNTS:
                setattr(out, name, getattr(out, name) + int(state['counts'][name]))
        return out

    @property
    def num_frames(self) -> int:
        return sum(len(r) for r in self.rows.get('mpjpe', []))

    def summary(self) -> Dict:
        """Final metrics: ``{'metrics': {...}, 'notes': [...]}`` with mm values (x1000) and raw ratios."""
        if not self.num_frames:
            raise ValueError("no frames were evaluated")
        n = self.num_samples
        m, notes = {}, []

        def ratio(num, den):
            return float(num / den) if den else math.nan

        for name, vis_den, invis_den in (('g_mpjpe', self.joint_vis_num, self.joint_invis_num),
                                         ('mpjpe', self.joint_vis_num, self.joint_invis_num),
                                         ('pa_mpjpe', self.joint_vis_num, self.joint_invis_num),
                                         ('v2v', self.vertex_vis_num, self.vertex_invis_num)):
            m[name] = MM * float(self._cat(name).mean())
            m[name + '_vis'] = MM * ratio(self._cat(name + '_vis_sum').sum(), vis_den * n)
            m[name + '_invis'] = MM * ratio(self._cat(name + '_invis_sum').sum(), invis_den * n)
        invis = self._cat('mpjpe_invis_sum')
        m['mpjpe_invis_min_of_n'] = MM * ratio(invis.min(axis=1).sum(), self.joint_invis_num)
        m['pa_mpjpe_vis_subset'] = MM * float(self._cat('pa_mpjpe_vis_subset').mean())
        m['pa_mpjpe_all_joints'] = MM * float(self._cat('pa_mpjpe_all_joints').mean())
        if 'collision_ratio' in self.rows:
            m['collision_ratio'] = float(self._cat('collision_ratio').mean())
        if 'contact_min_sq_dist' in self.rows:
            min_sq = self._cat('contact_min_sq_dist')
            m['contact_ratio'] = float((min_sq < CONTACT_SQ_THRESHOLD).mean())
            m['contact_ratio_euclid'] = float((np.sqrt(min_sq) < CONTACT_EUCLID_THRESHOLD).mean())
        for name in ('std_joints', 'apd_joints'):
            m[name] = MM * float(self._cat(name).mean())
            m[name + '_vis'] = MM * float(self._cat(name + '_vis').mean())
            values = self._cat(name + '_invis')
            m[name + '_invis'] = MM * float(values[~np.isnan(values)].mean()) if (~np.isnan(values)).any() else math.nan
        m['apd_joints_standard'] = 2 * m['apd_joints']
        if n == 1:
            notes.append('num_samples=1: std/apd diversity reported as 0 (undefined for one sample; '
                         'the original prints NaN)')
        if not self.joint_invis_num:
            notes.append('no invisible joints in the evaluated frames: *_invis and min-of-N are NaN')
        notes.append('apd_joints follows the original (half the mean pairwise distance); apd_joints_standard = 2x')
        notes.append('pa_mpjpe uses the original visible-joint alignment (invisible joints zeroed)'
                     if self.eval_with_vis_mask_pa else 'pa_mpjpe aligns on all 24 joints')
        notes.append('pa_mpjpe_vis_subset: Procrustes fitted on the visible joints only (>= 3, else all)')
        notes.append('contact_ratio: squared NN distance < 0.02 (original, ~14 cm); contact_ratio_euclid: < 2 cm')
        notes.append('collision_ratio: colliding points / all scene points of the frame (original)')
        return {'metrics': m, 'num_frames': self.num_frames, 'num_samples': n, 'notes': notes}


def format_report(summary: Dict) -> str:
    """The original's printed lines (2 decimals; collision 5 decimals) plus the extra metrics."""
    m = summary['metrics']

    def triple(name):
        return ' / '.join(f'{m.get(name + s, math.nan):0.2f}' for s in ('', '_vis', '_invis'))

    lines = [f"--------- mode: compute mean from {summary['num_samples']} random samples "
             f"({summary['num_frames']} frames) ---------",
             f"G-MPJPE all/vis/invis: {triple('g_mpjpe')}",
             f"MPJPE all/vis/invis: {triple('mpjpe')}",
             f"PA-MPJPE all/vis/invis: {triple('pa_mpjpe')}",
             f"V2V all/vis/invis: {triple('v2v')}",
             f"collision / contact ratio: {m.get('collision_ratio', -1):0.5f} / {m.get('contact_ratio', -1):0.2f}",
             f"--------- mode: compute with smallest-error-sample-invis from {summary['num_samples']} samples "
             "---------",
             f"MPJPE-invis: {m['mpjpe_invis_min_of_n']:0.2f}",
             '--------- diversity ---------',
             f"std-joints all/vis/invis: {triple('std_joints')}",
             f"apd-joints all/vis/invis: {triple('apd_joints')}",
             '--------- corrected variants ---------',
             f"apd-joints (standard) all: {m['apd_joints_standard']:0.2f}",
             f"PA-MPJPE (visible-subset fit / all-joint fit): {m['pa_mpjpe_vis_subset']:0.2f} / "
             f"{m['pa_mpjpe_all_joints']:0.2f}"]
    if 'contact_ratio_euclid' in m:
        lines.append(f"contact ratio (Euclidean < 2 cm): {m['contact_ratio_euclid']:0.2f}")
    lines += [f'note: {note}' for note in summary['notes']]
    return '\n'.join(lines)


def json_safe(value):
    """NaN/inf -> None, recursively (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


# ---------------------------------------------------------------------------------------------------- test loop
def evaluate(model, diffusion, loader, device, num_samples: int = 1, method: str = 'ddpm',
             guidance: Optional[CollisionGuidance] = None, two_stage: bool = True,
             occupancy_model=None, eval_contact: bool = True, eval_with_vis_mask_pa: bool = True,
             samples_per_chain: Optional[int] = None, log_freq: int = 100, on_batch: Optional[Callable] = None,
             progress: bool = True, log=print, guide_final_step: bool = False, precision: str = 'fp32',
             sample_seed: Optional[int] = None) -> Dict:
    """The stage-2 test loop (the original's procedure).

    With ``two_stage`` the model's input translation is the stage-1 one (``batch['stage1_transl_full']``); the GT
    translation is kept for the metrics. Returns ``summary`` (see :meth:`Stage2Metrics.summary`), ``results``
    (the arrays of the results pickle, in frame order), ``metrics_state`` (:meth:`Stage2Metrics.state`, to merge
    shares of a split) and ``frame_index``. ``sample_seed``: per-frame sampling streams (:func:`sample_poses`).
    ``on_batch(step, batch, samples, gt)`` is called after every batch (renders, viewers).
    """
    from tqdm import tqdm
    from utils.run import recursive_to

    metrics = Stage2Metrics(num_samples, eval_with_vis_mask_pa)
    saved = {k: [] for k in RESULT_KEYS}
    frames = []
    iterator = tqdm(loader, desc='test', dynamic_ncols=True) if progress else loader
    for step, batch in enumerate(iterator):
        batch = recursive_to(batch, device)
        gt_transl = batch['smpl_params']['transl'].clone()
        if two_stage:
            if 'stage1_transl_full' not in batch:
                raise ValueError("--two_stage needs the stage-1 translations (dataset built with load_stage1_transl)")
            batch['smpl_params']['transl'] = batch['stage1_transl_full'].float()
        batch['gt_transl'] = gt_transl
        samples = sample_poses(model, diffusion, batch, num_samples, method, guidance, samples_per_chain,
                               occupancy_model, guide_final_step, precision, sample_seed)
        if 'frame_index' in batch:
            frames.append(to_numpy(batch['frame_index'], np.int64).reshape(-1))
        with torch.no_grad():
            gt_params = dict(batch['smpl_params'], transl=gt_transl)
            gt_vertices, gt_joints = model.gt_smpl_output(gt_params, batch['gender'])
        focal_px = batch['fx'].float() * float(model.cfg.CAM.FX_NORM_COEFF)
        center = torch.stack([batch['cam_cx'], batch['cam_cy']], dim=-1).float()
        bs = gt_transl.shape[0]
        collision_ratio = samples.get('collision_ratio')
        metrics.update(samples['joints'], samples['vertices'], batch['smpl_params']['transl'], gt_joints,
                       gt_vertices, focal_px, center,
                       scene_points_full=batch['scene_pcd_verts_full'] if eval_contact else None,
                       collision_ratio=collision_ratio, frame_index=batch.get('frame_index'))
        saved['pred_betas_list'].append(to_numpy(samples['betas'], np.float64).astype(np.float32))
        saved['pred_global_orient_list'].append(to_numpy(samples['global_orient'], np.float64).astype(np.float32))
        saved['pred_body_pose_list'].append(to_numpy(samples['body_pose'], np.float64).astype(np.float32))
        saved['collision_ratio_list'].append(collision_ratio if collision_ratio is not None
                                             else np.zeros((bs, num_samples)))
        if eval_contact:
            contact = (metrics.rows['contact_min_sq_dist'][-1] < CONTACT_SQ_THRESHOLD).astype(np.float64)
        else:
            contact = np.zeros((bs, num_samples))
        saved['contact_ratio_list'].append(contact)
        if two_stage:
            saved['pred_cam_full_list'].append(to_numpy(batch['smpl_params']['transl'], np.float64).astype(np.float32))
        saved['gt_cam_full_list'].append(to_numpy(gt_transl, np.float64).astype(np.float32))
        if on_batch is not None:
            on_batch(step, batch, samples, {'vertices': gt_vertices, 'joints': gt_joints})
        if log_freq and step % log_freq == 0 and step > 0:
            log(format_report(metrics.summary()))
    if metrics.num_frames == 0:
        raise ValueError("the test split is empty: nothing to evaluate")
    results = {k: np.concatenate(v, axis=0) for k, v in saved.items() if v}
    frame_index = np.concatenate(frames) if frames else None
    if frame_index is not None:
        order = metrics.frame_order()
        results, frame_index = {k: v[order] for k, v in results.items()}, frame_index[order]
    return {'summary': metrics.summary(), 'results': results, 'metrics_state': metrics.state(),
            'frame_index': frame_index}


def merge_results(parts) -> Dict[str, np.ndarray]:
    """The results-pickle arrays of several shares ``[(frame_index, results)]``, in frame order."""
    frames = np.concatenate([f for f, _ in parts])
    order = np.argsort(frames, kind='stable')
    keys = parts[0][1].keys()
    return {k: np.concatenate([r[k] for _, r in parts], axis=0)[order] for k in keys}
