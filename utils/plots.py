"""Matplotlib figures (PNG) of test predictions and training curves; matplotlib is imported only when drawing.

* :func:`per_joint_figure`: from a ``predictions.npz`` (:mod:`utils.predictions`), per SMPL joint, the pelvis-relative
  error of the samples on frames where the joint is visible vs outside the image, and the spread of the samples
  (how far they scatter about their mean): the picture of what sampling adds where the camera sees nothing.
* :func:`curves_figure`: training loss and validation curves from the run's ``curves.json``.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np

from utils.io import atomic_path

SMPL_JOINT_NAMES = ('pelvis', 'l_hip', 'r_hip', 'spine1', 'l_knee', 'r_knee', 'spine2', 'l_ankle', 'r_ankle',
                    'spine3', 'l_foot', 'r_foot', 'neck', 'l_collar', 'r_collar', 'head', 'l_shoulder',
                    'r_shoulder', 'l_elbow', 'r_elbow', 'l_wrist', 'r_wrist', 'l_hand', 'r_hand')


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')            # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> str:
    with atomic_path(path, suffix='.png') as tmp:
        fig.savefig(tmp, format='png', dpi=110, bbox_inches='tight')
    return path


def per_joint_stats(pred: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Per joint (``[24]``, mm, NaN where no frame qualifies): mean sample error on frames where the joint is
    visible / invisible, the same for the best sample of each frame (min-of-N), and the mean sample spread
    (RMS distance of the samples to their mean) on visible / invisible frames. Pelvis-relative joints."""
    joints = pred['joints'].astype(np.float64)
    gt = pred['gt_joints'].astype(np.float64)
    rel = joints - joints[:, :, :1]
    rel_gt = (gt - gt[:, :1])[:, None]
    error = np.linalg.norm(rel - rel_gt, axis=-1) * 1000.0                      # [N, S, 24]
    spread = np.sqrt((np.linalg.norm(rel - rel.mean(axis=1, keepdims=True), axis=-1) ** 2).mean(axis=1)) * 1000.0
    vis = pred['vis_mask'].astype(bool)

    def masked_mean(values, mask):
        count = mask.sum(axis=0)
        total = np.where(mask, values, 0.0).sum(axis=0)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return {'error_vis': masked_mean(error.mean(axis=1), vis), 'error_invis': masked_mean(error.mean(axis=1), ~vis),
            'min_error_vis': masked_mean(error.min(axis=1), vis),
            'min_error_invis': masked_mean(error.min(axis=1), ~vis),
            'spread_vis': masked_mean(spread, vis), 'spread_invis': masked_mean(spread, ~vis),
            'invisible_frames': (~vis).sum(axis=0)}


def per_joint_figure(pred: Dict[str, np.ndarray], path: str, title: str = '') -> str:
    """Two panels (error, spread) of :func:`per_joint_stats` as grouped bars; writes ``path`` (PNG)."""
    plt = _pyplot()
    stats = per_joint_stats(pred)
    x = np.arange(len(SMPL_JOINT_NAMES))
    n, s = pred['joints'].shape[:2]
    fig, axes = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    width = 0.38
    axes[0].bar(x - width / 2, stats['error_vis'], width, color='tab:blue', label='visible (mean of samples)')
    axes[0].bar(x + width / 2, stats['error_invis'], width, color='tab:red', label='outside the image (mean)')
    axes[0].scatter(x + width / 2, stats['min_error_invis'], marker='_', s=160, color='black', zorder=3,
                    label='outside the image, best of the samples')
    axes[0].set_ylabel('pelvis-relative error (mm)')
    axes[0].legend(loc='upper left', fontsize=8)
    axes[1].bar(x - width / 2, stats['spread_vis'], width, color='tab:blue', label='visible')
    axes[1].bar(x + width / 2, stats['spread_invis'], width, color='tab:red', label='outside the image')
    axes[1].set_ylabel('sample spread (mm, RMS to mean)')
    axes[1].legend(loc='upper left', fontsize=8)
    for k, count in enumerate(stats['invisible_frames']):
        axes[1].annotate(str(int(count)), (x[k] + width / 2, 0), textcoords='offset points', xytext=(0, -10),
                         ha='center', fontsize=6, color='tab:red')
    axes[1].set_xticks(x)
    axes[1].set_xticklabels(SMPL_JOINT_NAMES, rotation=60, ha='right', fontsize=8)
    fig.suptitle(f"{title} per-joint error and spread: {n} frames x {s} samples "
                 f"(red numbers: frames with the joint outside the image)".strip(), fontsize=10)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def curves_figure(curves: Dict[str, Dict[str, list]], path: str, title: str = '') -> Optional[str]:
    """``{'train': {name: [[iter, value], ...]}, 'val': {...}}`` -> one log-y panel per group; None if empty.

    Series with a value <= 0 (e.g. a negative log-likelihood) cannot go on a log axis and are named in the panel
    title instead."""
    groups = [(g, series) for g, series in curves.items() if any(series.values())]
    if not groups:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(8.5 * len(groups), 4.5), squeeze=False)
    for ax, (group, series) in zip(axes[0], groups):
        left_out = []
        for name, points in sorted(series.items()):
            pts = np.asarray(points, dtype=float).reshape(-1, 2)
            if not len(pts):
                continue
            if np.any(pts[:, 1] <= 0) or not np.all(np.isfinite(pts[:, 1])):
                left_out.append(name)
                continue
            total = name == 'loss'                                  # the optimised total: thick and black
            ax.plot(pts[:, 0], pts[:, 1], marker='o' if len(pts) < 30 else None, ms=3, label=name,
                    lw=2.5 if total else 1.0, color='black' if total else None, zorder=3 if total else 2)
        ax.set_xlabel('iteration')
        ax.set_yscale('log')
        ax.set_title(group + (f" (not shown, <= 0: {', '.join(left_out)})" if left_out else ''), fontsize=9)
        if ax.lines:
            ax.legend(fontsize=6, loc='upper left', bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.suptitle(f"{title}: training losses and validation (log scale)", fontsize=10)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def matplotlib_missing() -> str:
    """'' when matplotlib imports, else a one-line note."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot written"
    return ''


def write_per_joint_plot(pred: Dict[str, np.ndarray], out_dir: str, title: str = '', log=print) -> Optional[str]:
    missing = matplotlib_missing()
    if missing:
        log(f"note: {missing}")
        return None
    path = per_joint_figure(pred, os.path.join(out_dir, 'per_joint_errors.png'), title)
    log(f"per-joint error / spread plot written to {path}")
    return path
