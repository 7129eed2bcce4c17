"""Stage-1 test loop and metric accumulation (as the original ``test_prohmr_scene.py``).

Metrics use the mode sample (index 0) only: the neutral-SMPL joints (24) and vertices plus the full-image
translation of the mode's crop camera, against the gender-matched GT SMPL (with GT translation).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from utils.body_model import NUM_SMPL_JOINTS
from utils.metrics import STAGE1_METRICS, stage1_frame_errors
from utils.run import format_table, recursive_to



class MetricAccumulator:
    """Collects per-frame errors and reports dataset means (in frame order where the frame indices are given, so
    the accumulators of several shares of a split, :meth:`state` / :meth:`merged`, give the means of one run)."""

    def __init__(self, names=STAGE1_METRICS):
        self.names = tuple(names)
        self.values: Dict[str, List[np.ndarray]] = defaultdict(list)
        self.frames: List[np.ndarray] = []

    def add(self, frame_errors: Dict[str, np.ndarray], frame_index=None) -> None:
        for name in self.names:
            self.values[name].append(np.asarray(frame_errors[name], dtype=np.float64))
        if frame_index is not None:
            self.frames.append(np.asarray(frame_index, dtype=np.int64).reshape(-1))

    @property
    def count(self) -> int:
        return int(sum(len(v) for v in self.values[self.names[0]])) if self.values else 0

    def frame_order(self) -> Optional[np.ndarray]:
        """The permutation sorting the frames by index (None unless every batch came with its indices)."""
        if not self.frames or sum(len(f) for f in self.frames) != self.count:
            return None
        frames = np.concatenate(self.frames)
        if len(np.unique(frames)) != len(frames):
            raise ValueError("MetricAccumulator: a frame was evaluated twice (repeated frame_index)")
        return np.argsort(frames, kind='stable')

    def column(self, name: str) -> np.ndarray:
        values = np.concatenate(self.values[name])
        order = self.frame_order()
        return values if order is None else values[order]

    def means(self) -> Dict[str, float]:
        return {name: float(self.column(name).mean()) for name in self.names if self.values[name]}

    def state(self) -> Dict:
        """Per-frame errors and frame indices of this share, for :meth:`merged`."""
        order = self.frame_order()
        if order is None:
            raise ValueError("MetricAccumulator.state: the frames' indices were not recorded")
        return {'names': self.names, 'values': {n: self.column(n) for n in self.names},
                'frames': np.concatenate(self.frames)[order]}

    @classmethod
    def merged(cls, states) -> 'MetricAccumulator':
        states = list(states)
        if not states:
            raise ValueError("MetricAccumulator.merged: no shares given")
        out = cls(states[0]['names'])
        for state in states:
            if tuple(state['names']) != out.names:
                raise ValueError("MetricAccumulator.merged: the shares hold different metrics")
            for name in out.names:
                out.values[name].append(state['values'][name])
            out.frames.append(state['frames'])
        return out

    def table(self) -> str:
        means = self.means()
        return format_table([[f'{means[n]:.2f}' for n in self.names if n in means]],
                            [f'{n} (mm)' for n in self.names if n in means])


def mode_prediction(output: Dict) -> Dict[str, torch.Tensor]:
    """Global mode-sample joints ``[B,24,3]``, vertices ``[B,V,3]`` and translation ``[B,3]``.

    The model's neutral SMPL has a zero translation parameter, so its joints equal those of a
    ``create_transl=False`` SMPL (as the original test recomputes); the mode translation is then added.
    """
    transl = output['pred_cam_t_full'][:, 0]
    return {'joints': output['pred_keypoints_3d'][:, 0, :NUM_SMPL_JOINTS] + transl[:, None],
            'vertices': output['pred_vertices'][:, 0] + transl[:, None], 'transl': transl}


@torch.no_grad()
def evaluate(model, loader, device, log_freq: int = 100, on_batch: Optional[Callable] = None,
             progress: bool = True, log=print, sample_seed: Optional[int] = None) -> Dict:
    """Run the model over ``loader``; returns ``{'metrics': {name: mm}, 'num_frames': N,
    'pred_cam_full': float32 [N, 3], 'frame_index': [N], 'metrics_state'}`` (rows in frame order where the items
    carry ``frame_index``, else in loader order). ``sample_seed``: per-frame flow samples
    (:meth:`ProHMRScene.forward_step`); the metrics use the mode and do not depend on it.

    ``on_batch(step, batch, output, pred, gt)`` is called after every batch (renders, viewers).
    """
    from tqdm import tqdm

    model.eval()
    acc = MetricAccumulator()
    transl = []
    iterator = tqdm(loader, desc='test', dynamic_ncols=True) if progress else loader
    for step, batch in enumerate(iterator):
        batch = recursive_to(batch, device)
        output = model.forward_step(batch, train=False, sample_seed=sample_seed)
        pred = mode_prediction(output)
        gt_joints, gt_vertices = model.gt_smpl_output(batch)
        gt = {'joints': gt_joints[:, :NUM_SMPL_JOINTS], 'vertices': gt_vertices}
        acc.add(stage1_frame_errors(pred['joints'], pred['vertices'], gt['joints'], gt['vertices']),
                frame_index=batch['frame_index'].cpu().numpy() if 'frame_index' in batch else None)
        transl.append(pred['transl'].float().cpu().numpy())
        if on_batch is not None:
            on_batch(step, batch, output, pred, gt)
        if log_freq and step % log_freq == 0:
            log(f"after {acc.count} frames:\n{acc.table()}")
    if acc.count == 0:
        raise ValueError("the test split is empty: nothing to evaluate")
    return summarize(acc, [np.concatenate(transl, axis=0).astype(np.float32)])


def summarize(acc: MetricAccumulator, transl_parts) -> Dict:
    """The result dict of :func:`evaluate` from an accumulator and the translations of its frames (in the order
    they were added)."""
    order = acc.frame_order()
    pred_cam_full = np.concatenate(transl_parts, axis=0)
    frames = np.concatenate(acc.frames) if order is not None else None
    if order is not None:
        pred_cam_full, frames = pred_cam_full[order], frames[order]
    return {'metrics': acc.means(), 'num_frames': acc.count, 'table': acc.table(), 'pred_cam_full': pred_cam_full,
            'frame_index': frames, 'metrics_state': acc.state() if order is not None else None}
