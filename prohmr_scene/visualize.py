"""Stage-1 test renders: the shared views of :mod:`utils.render_views` fed with the flow's samples."""
from __future__ import annotations

import numpy as np

from utils.render_views import RenderContext, item_to_render, write_item_render
from utils.tensors import to_numpy


def make_render_hook(dataset_root: str, faces: np.ndarray, output_dir: str, render_step: int = 8,
                     num_samples: int = 1, log=print):
    """``on_batch`` callback writing a JPG every ``render_step`` batches of the batch's first item with a
    joint outside the image (item 0 when every joint is seen: :func:`item_to_render`)."""
    ctx = RenderContext(dataset_root)

    def hook(step, batch, output, pred, gt):
        if step % render_step:
            return
        k = item_to_render(batch, gt['joints'], 1500.0)
        shown = min(num_samples, output['pred_vertices'].shape[1])
        verts = to_numpy(output['pred_vertices'][k, :shown] + output['pred_cam_t_full'][k, :shown, None])
        write_item_render(ctx, batch, verts, faces, output_dir, 1500.0, log, index=k)

    hook.close = ctx.close
    return hook
