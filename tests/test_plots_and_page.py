"""Per-joint statistics and figures (utils/plots.py), training curves, and the demo's static page."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from utils import demo_page
from utils.plots import curves_figure, per_joint_figure, per_joint_stats

PNG = b'\x89PNG\r\n\x1a\n'


def _predictions():
    """2 frames x 2 samples; joint 5 off by 10 / 30 mm (x) in the samples, outside the image in frame 0 only."""
    gt = np.random.default_rng(0).normal(size=(2, 24, 3)).astype(np.float32)
    joints = np.repeat(gt[:, None], 2, axis=1)
    joints[:, 0, 5, 0] += 0.010
    joints[:, 1, 5, 0] += 0.030
    vis = np.ones((2, 24), bool)
    vis[0, 5] = False
    return {'joints': joints, 'gt_joints': gt, 'vis_mask': vis}


def test_per_joint_stats_hand_values():
    stats = per_joint_stats(_predictions())
    assert stats['error_invis'][5] == pytest.approx(20.0, abs=1e-3)          # mean of 10 and 30 mm, frame 0
    assert stats['min_error_invis'][5] == pytest.approx(10.0, abs=1e-3)
    assert stats['error_vis'][5] == pytest.approx(20.0, abs=1e-3)            # frame 1
    assert stats['spread_invis'][5] == pytest.approx(10.0, abs=1e-3)         # each sample 10 mm from the mean
    assert stats['error_vis'][4] == pytest.approx(0.0, abs=1e-3) and stats['spread_vis'][4] == pytest.approx(0.0)
    assert np.isnan(stats['error_invis'][4])                                  # never outside the image
    assert stats['invisible_frames'][5] == 1 and stats['invisible_frames'].sum() == 1


def test_figures_are_pngs(tmp_path):
    pytest.importorskip('matplotlib')
    path = per_joint_figure(_predictions(), str(tmp_path / 'joints.png'), 'test')
    assert open(path, 'rb').read(8) == PNG
    curves = {'train': {'loss': [[1, 2.0], [2, 1.0]], 'loss_nll': [[1, -3.0], [2, -4.0]]}, 'val': {'loss': [[2, 1.5]]}}
    path = curves_figure(curves, str(tmp_path / 'curves.png'), 'run')
    assert open(path, 'rb').read(8) == PNG
    assert curves_figure({'train': {}}, str(tmp_path / 'none.png')) is None
    assert not os.path.exists(tmp_path / 'none.png')


def test_demo_page_links_and_marks_unseen_joint_rows(tmp_path):
    demo = tmp_path / 'demo'
    files = ['results/s1/output_prohmr_scene_demo/per_joint_errors.png', 'runs_stage1/demo/curves.png',
             'render/output_egohmr_demo/recording_a_00001.jpg', 'viewer_recording.html']
    for name in files:
        (demo / name).parent.mkdir(parents=True, exist_ok=True)
        (demo / name).write_bytes(PNG)
    (demo / 'metrics.json').write_text(json.dumps({'runs': ['stage 1', 'stage 2'], 'metrics': {
        'mpjpe': {'stage 1': 80.0, 'stage 2': 70.0}, 'mpjpe_invis': {'stage 1': None, 'stage 2': 95.5}}}))
    assert demo_page.main(['--demo', str(demo)]) == 0
    page = (demo / 'index.html').read_text()
    links = set(re.findall(r'(?:src|href)="([^"]+)"', page))
    assert set(files) <= links and all(not os.path.isabs(link) for link in links)
    assert re.search(r'<tr class="invis"><td>mpjpe_invis</td><td>-</td><td>95.50</td></tr>', page)
    assert '<tr><td>mpjpe</td><td>80.00</td><td>70.00</td></tr>' in page


def test_demo_page_missing_folder_is_one_line(tmp_path, capsys):
    assert demo_page.main(['--demo', str(tmp_path / 'nothing')]) == 2
    assert "--demo: no folder" in capsys.readouterr().err


def test_renders_pick_the_first_frame_with_unseen_joints():
    from utils.render_views import item_to_render
    joints = np.zeros((3, 24, 3))
    joints[..., 2] = 2.0                                     # 2 m ahead, on the optical axis: inside the image
    batch = {'fx': np.full(3, 1.0), 'cam_cx': np.full(3, 960.0), 'cam_cy': np.full(3, 540.0)}
    assert item_to_render(batch, joints, 1500.0) == 0        # every joint seen: item 0
    joints[2, 7, 1] = 1.0                                    # an ankle of item 2 at v = 540 + 750 px: below the image
    joints[1, 20, 0] = -1.5                                  # a wrist of item 1 at u = 960 - 1125 px: left of it
    assert item_to_render(batch, joints, 1500.0) == 1
