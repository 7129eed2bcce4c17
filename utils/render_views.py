"""Render views both stages' test scripts use (the stages' hooks feed them their samples), and the open3d view.
Headless; renderers and open3d import lazily.

A render of one frame stacks one row per shown sample: ``[input + green box | body overlay | body in the scene
seen from the master Kinect]`` at half the image size (:data:`RENDER_SCALE`): the input is halved (INTER_AREA) and
the bodies and the scene are rendered at that size (a quarter of the pixels to rasterise and read back in
software OpenGL). Fixes of the original: the
overlay uses the render's depth as the mask (not the red channel), and the Kinect-frame scene mesh is cached per
recording (not rebuilt only on the first visit).
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import numpy as np

from utils import egobody
from utils.camera import IMAGE_SIZE
from utils.io import load_json
from utils.tensors import to_numpy

BOX_COLOR_BGR = (0, 255, 0)
BOX_THICKNESS = 3
KINECT_SIZE = IMAGE_SIZE   # the master Kinect colour images are 1920x1080 too
RENDER_SCALE = 0.5         # the figures' panels: half the 1920x1080 images


def scaled_intrinsics(intrinsics: Sequence[float], scale: float) -> tuple:
    """``(fx, fy, cx, cy)`` of the same camera for an image resized by ``scale``: pixel centres ``u`` map to
    ``(u + 0.5) * scale - 0.5`` (what cv2.resize does)."""
    fx, fy, cx, cy = (float(v) for v in intrinsics)
    return fx * scale, fy * scale, (cx + 0.5) * scale - 0.5, (cy + 0.5) * scale - 0.5


def scaled_size(size: Sequence[int], scale: float) -> tuple:
    """``(width, height)`` resized by ``scale`` (rounded, at least 1 pixel)."""
    return tuple(max(1, int(round(v * scale))) for v in size)


def draw_box(image: np.ndarray, center: Sequence[float], size: float) -> np.ndarray:
    """A copy of ``image`` with the square crop box drawn in green (3 px)."""
    import cv2
    out = image.copy()
    half = size / 2.0
    top_left = (int(round(center[0] - half)), int(round(center[1] - half)))
    bottom_right = (int(round(center[0] + half)), int(round(center[1] + half)))
    cv2.rectangle(out, top_left, bottom_right, BOX_COLOR_BGR, BOX_THICKNESS)
    return out


class RenderContext:
    """Renderers and per-recording scene meshes reused across frames."""

    def __init__(self, dataset_root: str):
        self.dataset_root = dataset_root
        self._renderers: Dict[tuple, object] = {}
        self._scenes: Dict[str, object] = {}
        self._kinect = None

    def renderer(self, width: int, height: int):
        from utils.renderer import Renderer
        key = (int(width), int(height))
        if key not in self._renderers:
            self._renderers[key] = Renderer(*key)
        return self._renderers[key]

    def kinect_intrinsics(self):
        if self._kinect is None:
            path = os.path.join(self.dataset_root, egobody.KINECT_COLOR_JSON)
            data = load_json(path, 'master Kinect intrinsics', keys=('f', 'c'))
            self._kinect = (data['f'][0], data['f'][1], data['c'][0], data['c'][1])
        return self._kinect

    def scene_in_kinect(self, recording: str):
        """The recording's scene mesh in its master-Kinect frame (trimesh), cached per recording."""
        if recording not in self._scenes:
            import trimesh
            scene = egobody.scene_of(self.dataset_root, recording)
            mesh = trimesh.load(egobody.scene_mesh_path(self.dataset_root, scene), process=False, force='mesh')
            kinect2scene = egobody.load_kinect_to_scene(self.dataset_root, recording, scene)
            mesh.apply_transform(np.linalg.inv(kinect2scene))
            self._scenes[recording] = mesh
        return self._scenes[recording]

    def close(self) -> None:
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers.clear()


def _body_mesh(vertices: np.ndarray, faces: np.ndarray):
    import trimesh
    return trimesh.Trimesh(vertices=vertices, faces=faces, process=False)


# Distinct colours for the multi-sample row (RGBA), so the spread of the samples is visible.
SAMPLE_COLORS = [(0.95, 0.35, 0.35, 1.0), (0.35, 0.75, 0.35, 1.0), (0.35, 0.45, 0.95, 1.0), (0.95, 0.75, 0.2, 1.0),
                 (0.75, 0.35, 0.85, 1.0), (0.2, 0.8, 0.8, 1.0)]


def _colored_bodies(vertices: Sequence[np.ndarray], faces: np.ndarray, colors=None) -> list:
    """``(pyrender-ready trimesh, material)`` per body: the default body material, or ``colors[i]`` cycled."""
    from utils.renderer import body_material
    if colors is None:
        return [(_body_mesh(v, faces), body_material()) for v in vertices]
    return [(_body_mesh(v, faces), body_material(colors[i % len(colors)])) for i, v in enumerate(vertices)]


def overlay_body(ctx: RenderContext, image: np.ndarray, vertices: np.ndarray, faces: np.ndarray,
                 intrinsics: Sequence[float], colors=None) -> np.ndarray:
    """Render the body (PV/OpenCV frame) over the BGR ``image`` with intrinsics ``(fx, fy, cx, cy)``.

    ``vertices`` is ``[V, 3]`` or, with ``colors``, a stack ``[S, V, 3]`` of bodies drawn in those colours.
    """
    bodies = [vertices] if colors is None else list(vertices)
    height, width = image.shape[:2]
    rgb, depth = ctx.renderer(width, height).render(_colored_bodies(bodies, faces, colors), intrinsics)
    mask = (depth > 0)[..., None]
    return np.where(mask, rgb[..., ::-1], image)


def render_in_scene(ctx: RenderContext, recording: str, vertices_pv: np.ndarray, faces: np.ndarray,
                    kinect2pv: np.ndarray, colors=None, scale: float = 1.0) -> np.ndarray:
    """The body (or, with ``colors``, the bodies ``[S, V, 3]``) in the scene mesh, seen by the master Kinect
    colour camera (BGR, 1920x1080 times ``scale``)."""
    from utils.geometry import transform_points
    bodies = [vertices_pv] if colors is None else list(vertices_pv)
    to_kinect = np.linalg.inv(kinect2pv)
    bodies = [transform_points(v.astype(np.float64), to_kinect) for v in bodies]
    meshes = [(ctx.scene_in_kinect(recording), None)] + _colored_bodies(bodies, faces, colors)
    rgb, _ = ctx.renderer(*scaled_size(KINECT_SIZE, scale)).render(
        meshes, scaled_intrinsics(ctx.kinect_intrinsics(), scale), bg_color=(1.0, 1.0, 1.0, 1.0),
        ambient=(0.0, 0.0, 0.0))
    return rgb[..., ::-1]


def render_prohmr_rows(ctx: RenderContext, imgname: str, vertices: np.ndarray, faces: np.ndarray,
                       intrinsics: Sequence[float], box_center: Sequence[float], box_size: float,
                       kinect2holo: np.ndarray, holo2pv: np.ndarray) -> np.ndarray:
    """One frame's figure: for each sample in ``vertices [S, V, 3]`` (PV frame) a row
    ``[input + box | overlay | scene render]``, plus (S > 1) a last row with all samples overlaid, one colour each;
    rows stacked, every panel at :data:`RENDER_SCALE` of the image size (the input resized with INTER_AREA, the
    renders made at that size). Returns BGR uint8."""
    import cv2
    image = cv2.imread(imgname)
    if image is None:
        raise FileNotFoundError(f"cannot read image '{imgname}' for rendering")
    recording = egobody.parse_imgname(imgname)[0]
    kinect2pv = egobody.kinect_to_pv(kinect2holo, holo2pv)
    size = scaled_size(image.shape[1::-1], RENDER_SCALE)

    def to_panel(picture):
        return cv2.resize(picture, size, interpolation=cv2.INTER_AREA)
    boxed = to_panel(draw_box(image, box_center, box_size))
    small, small_intrinsics = to_panel(image), scaled_intrinsics(intrinsics, RENDER_SCALE)
    rows = []

    def row(overlay, scene):
        if scene.shape[:2] != small.shape[:2]:       # a Kinect image size other than the PV one
            scene = to_panel(scene)
        return np.concatenate([boxed, overlay, scene], axis=1)

    for verts in vertices:
        rows.append(row(overlay_body(ctx, small, verts, faces, small_intrinsics),
                        render_in_scene(ctx, recording, verts, faces, kinect2pv, scale=RENDER_SCALE)))
    if len(vertices) > 1:  # all samples at once, one colour each
        rows.append(row(overlay_body(ctx, small, vertices, faces, small_intrinsics, colors=SAMPLE_COLORS),
                        render_in_scene(ctx, recording, vertices, faces, kinect2pv, colors=SAMPLE_COLORS,
                                        scale=RENDER_SCALE)))
    return np.concatenate(rows, axis=0)


def render_file_name(imgname: str, ext: str = '.jpg') -> str:
    """``<recording>_<frame file name><ext>`` (the original's render names)."""
    recording, _, frame = egobody.parse_imgname(imgname)
    return f'{recording}_{frame}{ext}'


def show_open3d(scene_points: np.ndarray, pred_vertices: np.ndarray, faces: np.ndarray,
                gt_vertices: Optional[np.ndarray] = None, scene_mesh_pv=None, snapshot_path: str = None) -> str:
    """Open an open3d window (with a display) or save a PNG snapshot (headless; open3d falls back to EGL) of the
    scene points, the predicted mesh (red), the GT mesh (blue) and a 1 m frame, all in the PV frame. Returns one
    line saying what was done."""
    import open3d as o3d
    geoms = [o3d.geometry.TriangleMesh.create_coordinate_frame(size=1.0)]
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(scene_points, np.float64)))
    pcd.paint_uniform_color((0.55, 0.55, 0.55))
    geoms.append(pcd)
    if scene_mesh_pv is not None:
        geoms.append(scene_mesh_pv)
    for verts, color in ((pred_vertices, (0.9, 0.25, 0.2)), (gt_vertices, (0.0, 0.0, 1.0))):
        if verts is None:
            continue
        mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(np.asarray(verts, np.float64)),
                                         o3d.utility.Vector3iVector(np.asarray(faces, np.int32)))
        mesh.compute_vertex_normals()
        if color is not None:
            mesh.paint_uniform_color(color)
        geoms.append(mesh)
    if os.environ.get('DISPLAY') or os.environ.get('WAYLAND_DISPLAY'):
        o3d.visualization.draw_geometries(geoms)
        return 'shown in an open3d window (closed by the user)'
    vis = o3d.visualization.Visualizer()
    if not vis.create_window(visible=False, width=960, height=540):
        raise RuntimeError("open3d could not open an offscreen window (no display and no EGL/OSMesa support)")
    for geom in geoms:
        vis.add_geometry(geom)
    view = vis.get_view_control()             # from behind the egocentric camera (PV origin), looking at the body
    view.set_lookat(np.asarray(pred_vertices, np.float64).mean(axis=0))
    view.set_front([0.0, -0.35, -1.0])
    view.set_up([0.0, -1.0, 0.0])
    view.set_zoom(0.35)
    vis.poll_events()
    vis.update_renderer()
    os.makedirs(os.path.dirname(os.path.abspath(snapshot_path)), exist_ok=True)
    vis.capture_screen_image(snapshot_path, do_render=True)
    vis.destroy_window()
    return f'no display: rendered off-screen to {snapshot_path}'





def item_to_render(batch, gt_joints, focal_coeff: float) -> int:
    """Index of the first batch item with a GT joint (of 24) projecting outside the image, else 0: the renders show
    what sampling does for the unseen body parts."""
    from utils.predictions import in_image
    focal = to_numpy(batch['fx']).reshape(-1) * focal_coeff
    center = np.stack([to_numpy(batch['cam_cx']).reshape(-1), to_numpy(batch['cam_cy']).reshape(-1)], axis=-1)
    inside = in_image(to_numpy(gt_joints)[:, :24], focal, center, IMAGE_SIZE)
    cut = np.flatnonzero(~inside.all(axis=1))
    return int(cut[0]) if len(cut) else 0


def write_item_render(ctx, batch, verts: np.ndarray, faces: np.ndarray, output_dir: str, focal_coeff: float,
                      log=print, index: int = 0) -> str:
    """Render batch item ``index`` with its samples' PV-frame ``verts [S, V, 3]`` as rows and write the JPG;
    returns the path."""
    import cv2
    from utils.io import atomic_path
    k = int(index)
    imgname = batch['imgname'][k]
    focal = float(batch['fx'][k]) * focal_coeff
    intrinsics = (focal, focal, float(batch['cam_cx'][k]), float(batch['cam_cy'][k]))
    figure = render_prohmr_rows(ctx, imgname, verts, faces, intrinsics, to_numpy(batch['box_center'][k]),
                                float(batch['box_size'][k]), to_numpy(batch['transf_kinect2holo'][k]),
                                to_numpy(batch['transf_holo2pv'][k]))
    path = os.path.join(output_dir, render_file_name(imgname))
    with atomic_path(path, suffix='.jpg') as tmp:
        if not cv2.imwrite(tmp, figure):
            raise RuntimeError(f"could not write render '{path}'")
    log(f"render: {path}")
    return path


def make_open3d_hook(dataset_root: str, faces: np.ndarray, snapshot_dir: str, vis_step: int = 8,
                     show_gt: bool = False, log=print):
    """``on_batch`` callback showing batch item 0 in open3d every ``vis_step`` batches (PNG when headless)."""
    def hook(step, batch, output, pred, gt):
        if step % vis_step:
            return
        import open3d as o3d
        imgname = batch['imgname'][0]
        recording = egobody.parse_imgname(imgname)[0]
        scene = egobody.scene_of(dataset_root, recording)
        mesh = o3d.io.read_triangle_mesh(egobody.scene_mesh_path(dataset_root, scene))
        kinect2scene = egobody.load_kinect_to_scene(dataset_root, recording, scene)
        mesh.transform(egobody.scene_to_pv(kinect2scene, to_numpy(batch['transf_kinect2holo'][0]),
                                           to_numpy(batch['transf_holo2pv'][0])))
        snapshot = os.path.join(snapshot_dir, render_file_name(imgname, '.png'))
        done = show_open3d(to_numpy(batch['scene_pcd_verts_full'][0]), to_numpy(pred['vertices'][0]), faces,
                           to_numpy(gt['vertices'][0]) if show_gt else None, mesh, snapshot_path=snapshot)
        log(f"--vis_o3d: {os.path.basename(imgname)}: {done}")

    return hook
