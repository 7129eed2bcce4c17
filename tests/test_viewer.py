"""The results viewer (utils/viewer.py, visualize_results.py) in a real browser: headless Chromium, screenshots.

The predictions are made from the synthetic world's GT: sample k is the GT body moved sideways, so the test knows
where every sample is. Chromium renders WebGL in software (SwiftShader); .ci/run installs Debian's chromium.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess

import numpy as np
import pytest

viser = pytest.importorskip('viser', reason='viser not installed (pip install -r requirements.txt)')

from utils import egobody  # noqa: E402
from utils.predictions import PredictionRecorder, load_predictions  # noqa: E402
from utils.viewer import SAMPLE_COLOURS  # noqa: E402

WINDOW = (900, 650)
BROWSER_TIMEOUT_S = 120          # an upper bound for one screenshot; the test does not measure time


def _browser():
    for name in ('chromium', 'chromium-browser', 'google-chrome'):
        path = shutil.which(name)
        if path:
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def screenshot(url: str, path: str) -> np.ndarray:
    """RGB screenshot ``[H, W, 3]`` of ``url`` taken by headless Chromium with software WebGL (10 s of virtual time:
    with 6 s the samples were once caught half-drawn while other renders loaded the 2 cores)."""
    import cv2
    cmd = [_browser(), '--headless=new', '--no-sandbox', '--disable-gpu-sandbox', '--use-angle=swiftshader',
           '--enable-unsafe-swiftshader', '--hide-scrollbars', f'--window-size={WINDOW[0]},{WINDOW[1]}',
           '--virtual-time-budget=10000', f'--screenshot={path}', url]
    subprocess.run(cmd, check=True, timeout=BROWSER_TIMEOUT_S, capture_output=True,
                   env=dict(os.environ, HOME=os.path.dirname(path)))
    return cv2.imread(path)[:, :, ::-1]


def colour_pixels(rgb: np.ndarray, colour) -> int:
    """Pixels of the 3D view whose chroma points the way of ``colour`` (any shading), the GUI panel and the
    software-rendering notice left out."""
    view = rgb[:, : int(0.6 * rgb.shape[1])].astype(np.float64).copy()
    view[:170, :330] = 128                                           # the notice in the top-left corner
    chroma = view - view.mean(axis=-1, keepdims=True)
    target = np.asarray(colour, float) - np.mean(colour)
    cos = (chroma @ target) / (np.linalg.norm(chroma, axis=-1) * np.linalg.norm(target) + 1e-9)
    return int(((cos > 0.95) & (np.ptp(view, axis=-1) > 50)).sum())


@pytest.fixture(scope='module')
def predictions(synthetic_world, tmp_path_factory):
    """A predictions.npz of the test split with 2 samples: the GT body shifted 0.35 m left / right (PV x)."""
    import torch

    from utils.body_model import create_smpl
    root = synthetic_world.dataset_root
    npz = np.load(egobody.annotation_npz_path(root, 'test'))
    n = len(npz['imgname'])
    verts, joints = [], []
    for i in range(n):
        gender = {'m': 'male', 'f': 'female'}[str(npz['gender'][i])]
        model = create_smpl(synthetic_world.data_dir, gender)
        with torch.no_grad():
            out = model(betas=torch.tensor(npz['shape'][i:i + 1]).float(),
                        body_pose=torch.tensor(npz['pose'][i:i + 1]).float(),
                        global_orient=torch.tensor(npz['global_orient_pv'][i:i + 1]).float(),
                        transl=torch.tensor(npz['transl_pv'][i:i + 1]).float())
        verts.append(out.vertices[0].numpy())
        joints.append(out.joints[0, :24].numpy())
    verts, joints = np.stack(verts), np.stack(joints)
    shift = np.array([[-0.35, 0.0, 0.0], [0.35, 0.0, 0.0]], np.float32)
    chain = [egobody.frame_transforms(root, str(name)) for name in npz['imgname']]
    batch = {'fx': npz['fx'] / 1500.0, 'cam_cx': npz['cx'], 'cam_cy': npz['cy'],
             'transf_kinect2holo': np.stack([c[0] for c in chain]), 'transf_holo2pv': np.stack([c[1] for c in chain]),
             'imgname': [os.path.join(root, str(name)) for name in npz['imgname']]}
    eye = np.broadcast_to(np.eye(3, dtype=np.float32), (n, 2, 1, 3, 3))
    recorder = PredictionRecorder('egohmr', model.faces)
    recorder.add(batch, eye, np.broadcast_to(np.eye(3, dtype=np.float32), (n, 2, 23, 3, 3)),
                 np.zeros((n, 2, 10)), joints[:, None] + shift[None, :, None], verts[:, None] + shift[None, :, None],
                 np.zeros((n, 2, 3)) + shift, joints, verts, focal_coeff=1500.0)
    path = recorder.save(str(tmp_path_factory.mktemp('viewer') / 'predictions.npz'))
    return load_predictions(path), root


def test_predictions_format_round_trip(predictions):
    pred, root = predictions
    assert pred['vertices'].dtype == np.float16 and pred['vis_mask'].dtype == bool
    assert pred['imgname'][0].startswith('egocentric_color/')           # dataset-relative names
    assert (~pred['vis_mask']).any()                                      # the test split has cut frames
    np.testing.assert_allclose(pred['joints'][:, 1, :, 0] - pred['joints'][:, 0, :, 0], 0.7, atol=1e-5)


def test_predictions_errors_name_the_file(tmp_path):
    from utils.io import DataError
    with pytest.raises(DataError, match='no predictions file'):
        load_predictions(str(tmp_path))
    bad = tmp_path / 'predictions.npz'
    np.savez(bad, format=np.array('something-else'))
    with pytest.raises(DataError, match="predictions.npz.*expected a predictions file"):
        load_predictions(str(bad))


@pytest.mark.skipif(_browser() is None, reason='no headless Chromium found (apt-get install chromium; .ci/run '
                                               'installs it): the browser test cannot run here')
def test_viewer_draws_every_sample_in_headless_chromium(predictions, tmp_path):
    from utils.viewer import FrameSource, ResultsViewer, set_initial_camera, start_server, write_recording
    pred, root = predictions
    frame = int(np.flatnonzero((~pred['vis_mask']).any(axis=1))[0])       # a frame with unseen joints
    server = start_server('127.0.0.1', _free_port())
    try:
        set_initial_camera(server, pred)
        viewer = ResultsViewer(server, FrameSource(pred, root), 'mesh')
        viewer.show_frame(frame)
        viewer.set_layer('camera', False)        # the input image in the frustum has the people's clothes colours
        url = f'http://127.0.0.1:{server.get_port()}'
        shown = screenshot(url, str(tmp_path / 'viewer.png'))
        on = [colour_pixels(shown, SAMPLE_COLOURS[k]) for k in range(2)]
        viewer.set_layer('samples', False)                              # the same view without the samples
        hidden = screenshot(url, str(tmp_path / 'viewer_no_samples.png'))
        off = [colour_pixels(hidden, SAMPLE_COLOURS[k]) for k in range(2)]
        viewer.set_layer('samples', True)
        html = write_recording(server, viewer, str(tmp_path / 'recording.html'), frames=[frame])
    finally:
        server.stop()
    assert min(on) > 300, f"sample colours barely drawn: {on} pixels"
    assert max(off) < 0.1 * min(on), f"sample colours without samples: {off} (with: {on})"
    assert np.ptp(hidden.reshape(-1, 3), axis=0).max() > 50                # the scene is drawn, not a blank canvas
    # the recording plays back with no server at all (viser's client and the scene in one file)
    played = screenshot('file://' + html, str(tmp_path / 'recording.png'))
    assert min(colour_pixels(played, SAMPLE_COLOURS[k]) for k in range(2)) > 300


def test_visualize_results_bad_input_is_one_line(tmp_path, capsys):
    import visualize_results as script
    assert script.main(['--results', str(tmp_path), '--port', '0']) == 2
    assert capsys.readouterr().err.strip() == "error: --port must be in 1..65535, got 0"
    assert script.main(['--results', str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --results: no predictions file")


def test_layer_toggle_from_python_moves_its_checkbox_and_hides_the_nodes(predictions):
    from utils.viewer import FrameSource, ResultsViewer, start_server
    pred, root = predictions
    server = start_server('127.0.0.1', _free_port())
    try:
        viewer = ResultsViewer(server, FrameSource(pred, root), 'points')
        viewer.set_layer('samples', False)
        assert viewer._boxes['samples'].value is False
        assert not server.scene.get_handle_by_name('/samples/0/body').visible
        assert server.scene.get_handle_by_name('/gt/body').visible
        viewer.set_layer('samples', True)
        assert viewer._boxes['samples'].value is True and server.scene.get_handle_by_name('/samples/1/body').visible
    finally:
        server.stop()
