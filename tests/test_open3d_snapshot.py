"""``--vis_o3d`` without a display: open3d (where installed) renders off-screen to a PNG and says so."""
from __future__ import annotations

import numpy as np
import pytest

o3d = pytest.importorskip('open3d', reason='open3d not installed (optional: pip install open3d==0.20.0)')


def test_headless_snapshot_shows_the_body(tmp_path, monkeypatch):
    import cv2
    import trimesh

    from utils.render_views import show_open3d
    monkeypatch.delenv('DISPLAY', raising=False)
    monkeypatch.delenv('WAYLAND_DISPLAY', raising=False)
    body = trimesh.creation.icosphere(3, 0.3)
    body.apply_translation([0.0, 0.0, 2.0])
    scene = np.random.default_rng(0).uniform([-2, -1, 0.5], [2, 1.5, 4], (3000, 3))
    path = str(tmp_path / 'snap.png')
    try:
        done = show_open3d(scene, body.vertices, body.faces, snapshot_path=path)
    except RuntimeError as exc:               # open3d installed but no EGL / OSMesa here
        pytest.skip(str(exc))
    assert done == f'no display: rendered off-screen to {path}'
    rgb = cv2.imread(path)[:, :, ::-1].astype(int)
    red = (rgb[..., 0] > 150) & (rgb[..., 1] < 110) & (rgb[..., 2] < 110)   # the predicted body's colour
    assert red.sum() > 2000
    h, w = red.shape
    assert red[h // 2 - 20:h // 2 + 20, w // 2 - 20:w // 2 + 20].mean() > 0.5   # centred: the view looks at it
