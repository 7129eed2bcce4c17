"""Interactive 3D viewer of test predictions (``visualize_results.py``), built on viser (imported lazily).

Everything is shown in the selected frame's PV camera frame (OpenCV axes, so "up" is -y): the scene (its mesh, or the
scene points within ``crop_radius`` of the GT pelvis), the ground-truth body, every sample in its own colour, the
joints the camera does not see (GT joint outside the image) as dots in a dark shade of the sample's colour (GT:
white), and the egocentric camera as a frustum at the origin showing the input image. A slider picks the frame;
checkboxes toggle each layer. :func:`write_recording` writes a self-contained HTML file in which viser's client
plays the frames back without Python.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional

import numpy as np

from utils import egobody

# Sample colours: saturated, far from the grey scene and the GT body's green (the browser test looks for them).
SAMPLE_COLOURS = ((230, 40, 40), (40, 90, 240), (250, 150, 0), (170, 40, 220), (0, 200, 220), (240, 60, 170),
                  (130, 90, 40), (120, 200, 40))
GT_COLOUR = (60, 190, 90)
SCENE_COLOUR = (185, 185, 180)
IMAGE_WIDTH_SHOWN = 480


def viser_missing() -> str:
    """'' when viser imports, else a one-line note on how to get it."""
    try:
        import viser  # noqa: F401
    except ImportError:
        return "the viewer needs viser (pip install viser==1.1.1, or pip install -r requirements.txt)"
    return ''


def _wxyz_position(T: np.ndarray):
    from scipy.spatial.transform import Rotation
    x, y, z, w = Rotation.from_matrix(T[:3, :3]).as_quat()
    return (float(w), float(x), float(y), float(z)), tuple(float(v) for v in T[:3, 3])


class FrameSource:
    """Per-frame geometry for the viewer from a predictions dict and the dataset (scene meshes, images)."""

    def __init__(self, pred: Dict[str, np.ndarray], dataset_root: Optional[str] = None):
        self.pred, self.root = pred, dataset_root
        self.num_frames, self.num_samples = pred['joints'].shape[:2]
        self._scenes: Dict[str, tuple] = {}

    def imgname(self, i: int) -> str:
        return str(self.pred['imgname'][i])

    def scene_to_pv(self, i: int) -> Optional[np.ndarray]:
        if not self.root:
            return None
        recording = egobody.parse_imgname(self.imgname(i))[0]
        scene = egobody.scene_of(self.root, recording)
        return egobody.scene_to_pv(egobody.load_kinect_to_scene(self.root, recording, scene),
                                   self.pred['transf_kinect2holo'][i].astype(np.float64),
                                   self.pred['transf_holo2pv'][i].astype(np.float64))

    def scene_mesh(self, i: int):
        """(scene name, vertices [V,3], faces [F,3]) in the scene frame, or None without a dataset root."""
        if not self.root:
            return None
        import trimesh
        scene = egobody.scene_of(self.root, egobody.parse_imgname(self.imgname(i))[0])
        if scene not in self._scenes:
            path = egobody.scene_mesh_path(self.root, scene)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--dataset_root: no scene mesh '{path}' for frame {self.imgname(i)}")
            mesh = trimesh.load(path, process=False, force='mesh')
            self._scenes = {scene: (np.asarray(mesh.vertices, np.float32), np.asarray(mesh.faces, np.int32))}
        return (scene,) + self._scenes[scene]

    def image(self, i: int) -> Optional[np.ndarray]:
        if not self.root:
            return None
        import cv2
        bgr = cv2.imread(os.path.join(self.root, self.imgname(i)))
        if bgr is None:
            return None
        scale = IMAGE_WIDTH_SHOWN / bgr.shape[1]
        return cv2.resize(bgr, (IMAGE_WIDTH_SHOWN, int(round(bgr.shape[0] * scale))))[:, :, ::-1].copy()

    def frame_errors(self, i: int) -> List[float]:
        """Pelvis-relative MPJPE (mm) of each sample of frame ``i``."""
        j, g = self.pred['joints'][i].astype(np.float64), self.pred['gt_joints'][i].astype(np.float64)
        rel = (j - j[:, :1]) - (g - g[:1])[None]
        return list(np.linalg.norm(rel, axis=-1).mean(axis=-1) * 1000.0)


class ResultsViewer:
    """The viser scene and GUI of :class:`FrameSource` frames on ``server`` (a ``viser.ViserServer``)."""

    def __init__(self, server, source: FrameSource, scene_mode: str = 'mesh', crop_radius: float = 2.0,
                 with_gui: bool = True):
        if scene_mode not in ('mesh', 'points', 'none'):
            raise ValueError(f"--scene must be mesh, points or none, got {scene_mode!r}")
        self.server, self.src, self.scene_mode, self.crop_radius = server, source, scene_mode, crop_radius
        self.faces = source.pred['faces'].astype(np.int32)
        self.layers = {'scene': True, 'gt': True, 'samples': True, 'invisible joints': True, 'camera': True}
        self.sample_on = [True] * source.num_samples
        self.frame = 0
        self._scene_name = None
        server.scene.set_up_direction('-y')
        self.info = None
        self._boxes: Dict[str, object] = {}
        if with_gui:
            self._build_gui()
        self.show_frame(0)

    # ---------------------------------------------------------------------------------------------- GUI
    def _build_gui(self):
        gui = self.server.gui
        slider = gui.add_slider('frame', min=0, max=max(0, self.src.num_frames - 1), step=1, initial_value=0,
                                disabled=self.src.num_frames < 2)
        slider.on_update(lambda event: self.show_frame(int(event.target.value)))
        self.info = gui.add_markdown('')
        with gui.add_folder('layers'):
            for name in self.layers:
                box = gui.add_checkbox(name, initial_value=True)
                box.on_update(lambda event, name=name: self.set_layer(name, bool(event.target.value)))
                self._boxes[name] = box
        with gui.add_folder('samples'):
            for k in range(self.src.num_samples):
                box = gui.add_checkbox(f'sample {k}', initial_value=True, hint=f'RGB {SAMPLE_COLOURS[k % 8]}')
                box.on_update(lambda event, k=k: self.set_sample(k, bool(event.target.value)))

    def set_layer(self, name: str, on: bool) -> None:
        """Show or hide a layer (also from Python: its checkbox follows)."""
        box = self._boxes.get(name)
        if box is not None and box.value != on:
            box.value = on
        if self.layers[name] == on:
            return
        self.layers[name] = on
        self.show_frame(self.frame)

    def set_sample(self, k: int, on: bool) -> None:
        self.sample_on[k] = on
        self.show_frame(self.frame)

    # ---------------------------------------------------------------------------------------------- scene
    def _show_scene(self, i: int, pelvis: np.ndarray) -> None:
        scene = self.server.scene
        T = self.src.scene_to_pv(i)
        mesh = self.src.scene_mesh(i) if self.scene_mode != 'none' else None
        if mesh is None or T is None:
            scene.remove_by_name('/scene')
            return
        name, verts, faces = mesh
        wxyz, position = _wxyz_position(T)
        if self.scene_mode == 'points':          # the scene points near the GT body, in PV
            pv = verts @ T[:3, :3].T.astype(np.float32) + T[:3, 3].astype(np.float32)
            near = np.linalg.norm(pv - pelvis, axis=1) <= self.crop_radius
            scene.add_point_cloud('/scene', pv[near], colors=SCENE_COLOUR, point_size=0.015,
                                  visible=self.layers['scene'])
            return
        if self._scene_name != name:
            scene.add_mesh_simple('/scene', verts, faces, color=SCENE_COLOUR, side='front',
                                  wxyz=wxyz, position=position, visible=self.layers['scene'])
            self._scene_name = name
        else:
            handle = scene.get_handle_by_name('/scene')
            handle.wxyz, handle.position, handle.visible = wxyz, position, self.layers['scene']

    def show_frame(self, i: int) -> None:
        """Draw frame ``i`` (every layer as toggled)."""
        i = int(np.clip(i, 0, self.src.num_frames - 1))
        self.frame = i
        pred, scene = self.src.pred, self.server.scene
        gt_joints = pred['gt_joints'][i].astype(np.float32)
        invisible = ~pred['vis_mask'][i].astype(bool)
        self._show_scene(i, gt_joints[0])
        scene.add_mesh_simple('/gt/body', pred['gt_vertices'][i].astype(np.float32), self.faces, color=GT_COLOUR,
                              visible=self.layers['gt'])
        gt_marks = gt_joints[invisible] if invisible.any() else np.zeros((0, 3), np.float32)
        scene.add_point_cloud('/gt/invisible_joints', gt_marks, colors=(255, 255, 255), point_size=0.05,
                              point_shape='circle', visible=self.layers['gt'] and self.layers['invisible joints'])
        for k in range(self.src.num_samples):
            colour = SAMPLE_COLOURS[k % len(SAMPLE_COLOURS)]
            on = self.layers['samples'] and self.sample_on[k]
            scene.add_mesh_simple(f'/samples/{k}/body', pred['vertices'][i, k].astype(np.float32), self.faces,
                                  color=colour, visible=on)
            marks = pred['joints'][i, k][invisible].astype(np.float32) if invisible.any() else np.zeros((0, 3))
            dark = tuple(int(0.45 * c) for c in colour)            # stands out on the sample's own body
            scene.add_point_cloud(f'/samples/{k}/invisible_joints', marks, colors=dark, point_size=0.06,
                                  point_shape='circle', visible=on and self.layers['invisible joints'])
        focal = float(pred['focal_px'][i])
        width, height = (int(v) for v in pred['image_size'])
        scene.add_camera_frustum('/camera', fov=2.0 * math.atan(height / 2.0 / focal), aspect=width / height,
                                 scale=0.25, image=self.src.image(i), color=(30, 30, 30),
                                 visible=self.layers['camera'])
        if self.info is not None:
            errors = ', '.join(f'{e:.0f}' for e in self.src.frame_errors(i))
            self.info.content = (f"**{i + 1}/{self.src.num_frames}** `{os.path.basename(self.src.imgname(i))}`  \n"
                                 f"{int(invisible.sum())} of 24 joints outside the image  \n"
                                 f"MPJPE per sample (mm): {errors}")


def set_initial_camera(server, pred: Dict[str, np.ndarray]) -> None:
    """Look at the first frame's GT body from behind and above the egocentric camera."""
    target = pred['gt_joints'][0].astype(np.float64).mean(axis=0)
    server.initial_camera.position = (0.0, -0.6, -1.2)
    server.initial_camera.look_at = tuple(float(v) for v in target)
    server.initial_camera.up = (0.0, -1.0, 0.0)


def start_server(host: str = '127.0.0.1', port: int = 8080, verbose: bool = False):
    import viser
    return viser.ViserServer(host=host, port=port, verbose=verbose)


def write_recording(server, viewer: ResultsViewer, path: str, frames: Optional[List[int]] = None,
                    seconds_per_frame: float = 1.5) -> str:
    """A self-contained HTML (viser's client with the scene embedded) playing ``frames`` in a loop."""
    from utils.io import atomic_text_write
    frames = list(range(viewer.src.num_frames)) if frames is None else frames
    serializer = server.get_scene_serializer()
    for i in frames:
        viewer.show_frame(i)
        serializer.insert_sleep(seconds_per_frame)
    atomic_text_write(path, serializer.as_html())
    return path
