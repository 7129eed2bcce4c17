"""Stage-2 test renders and open3d snapshots, built on the shared views of ``utils.render_views``.

A render shows, every ``render_step`` batches, the batch's first item with a joint outside the image (item 0
when none): one row ``[input + box | overlay | body in the scene]`` per
shown sample (all samples with ``--render_multi_sample``), stacked and halved, written as
``<output_dir>/<recording>_<frame>.jpg``. Nothing here imports a renderer until a frame is rendered.
"""
from __future__ import annotations

import numpy as np

from utils.render_views import RenderContext, item_to_render, write_item_render
from utils.render_views import make_open3d_hook as _views_open3d_hook
from utils.tensors import to_numpy


def posed_vertices_full(samples: dict, batch: dict, index: int, count: int) -> np.ndarray:
    """PV-frame vertices ``[count, V, 3]`` of item ``index``: SMPL vertices plus the model's input translation."""
    verts = samples['vertices'][index, :count]
    return to_numpy(verts + batch['smpl_params']['transl'][index][None, None, :])


def make_render_hook(dataset_root: str, faces: np.ndarray, output_dir: str, render_step: int = 80,
                     num_samples: int = 1, focal_coeff: float = 1500.0, log=print):
    """``on_batch(step, batch, samples, gt)`` callback writing a JPG every ``render_step`` batches of the batch's
    first item with a joint outside the image (item 0 when none)."""
    ctx = RenderContext(dataset_root)

    def hook(step, batch, samples, gt):
        if step % render_step:
            return
        k = item_to_render(batch, gt['joints'], focal_coeff)
        shown = min(num_samples, samples['vertices'].shape[1])
        write_item_render(ctx, batch, posed_vertices_full(samples, batch, k, shown), faces, output_dir,
                          focal_coeff, log, index=k)

    hook.close = ctx.close
    return hook


def make_open3d_hook(dataset_root: str, faces: np.ndarray, snapshot_dir: str, vis_step: int = 8,
                     show_gt: bool = False, log=print):
    """``on_batch`` callback showing item 0 (first sample, PV frame) with the scene in open3d (PNG when headless)."""
    stage1_hook = _views_open3d_hook(dataset_root, faces, snapshot_dir, vis_step, show_gt, log)

    def hook(step, batch, samples, gt):
        pred = {'vertices': posed_vertices_full(samples, batch, 0, 1)[None, 0]}
        stage1_hook(step, batch, None, pred, gt)

    return hook
