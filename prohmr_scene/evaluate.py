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
    """Collects per-frame errors and reports dataset means."""

    def __init__(self, names=STAGE1_METRICS):
        self.names = tuple(names)
        self.values: Dict[str, List[np.ndarray]] = defaultdict(list)

    def add(self, frame_errors: Dict[str, np.ndarray]) -> None:
        for name in self.names:
            self.values[name].append(np.asarray(frame_errors[name], dtype=np.float64))

    @property
    def count(self) -> int:
        return int(sum(len(v) for v in self.values[self.names[0]])) if self.values else 0

    def means(self) -> Dict[str, float]:
        return {name: float(np.concatenate(self.values[name]).mean()) for name in self.names if self.values[name]}

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
             progress: bool = True, log=print) -> Dict:
    """Run the model over ``loader``; returns ``{'metrics': {name: mm}, 'num_frames': N,
    'pred_cam_full': float32 [N, 3]}`` (rows in loader order).

    ``on_batch(step, batch, output, pred, gt)`` is called after every batch (renders, viewers).
    """
    from tqdm import tqdm

    model.eval()
    acc = MetricAccumulator()
    transl = []
    iterator = tqdm(loader, desc='test', dynamic_ncols=True) if progress else loader
    for step, batch in enumerate(iterator):
        batch = recursive_to(batch, device)
        output = model.forward_step(batch, train=False)
        pred = mode_prediction(output)
        gt_joints, gt_vertices = model.gt_smpl_output(batch)
        gt = {'joints': gt_joints[:, :NUM_SMPL_JOINTS], 'vertices': gt_vertices}
        acc.add(stage1_frame_errors(pred['joints'], pred['vertices'], gt['joints'], gt['vertices']))
        transl.append(pred['transl'].float().cpu().numpy())
        if on_batch is not None:
            on_batch(step, batch, output, pred, gt)
        if log_freq and step % log_freq == 0:
            log(f"after {acc.count} frames:\n{acc.table()}")
    if acc.count == 0:
        raise ValueError("the test split is empty: nothing to evaluate")
    return {'metrics': acc.means(), 'num_frames': acc.count, 'table': acc.table(),
            'pred_cam_full': np.concatenate(transl, axis=0).astype(np.float32)}
