"""Headless rendering helpers built on pyrender (EGL offscreen by default).

Import this module only where something is rendered: it pulls in pyrender and an OpenGL platform. Cameras are
given in the OpenCV convention (x right, y down, z forward), like every PV-frame quantity of the project; the
conversion to pyrender's OpenGL camera (y up, z backward) happens here.
"""
from __future__ import annotations

import os

os.environ.setdefault('PYOPENGL_PLATFORM', 'egl')

from typing import Iterable, Optional, Sequence, Tuple, Union  # noqa: E402

import numpy as np  # noqa: E402

# The EgoBody renderer's body look: light pink, not metallic.
BODY_BASE_COLOR = (1.0, 193 / 255, 193 / 255, 1.0)
LIGHT_INTENSITY = 4.0
# OpenCV camera axes -> OpenGL camera axes (its own inverse).
OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])


def _pyrender():
    import pyrender
    return pyrender


def body_material(color=BODY_BASE_COLOR):
    """The MetallicRoughness material used for SMPL bodies (pink by default, as the original renders)."""
    return _pyrender().MetallicRoughnessMaterial(metallicFactor=0.0, alphaMode='OPAQUE', baseColorFactor=color)


def make_mesh(mesh, material=None, smooth: Optional[bool] = None):
    """``trimesh.Trimesh`` -> ``pyrender.Mesh``. Build it once and reuse it across frames for static geometry:
    the renderer keeps the GPU buffers of meshes that appear in consecutive renders.

    ``smooth=None`` shades smoothly unless the mesh carries per-face colours (which need flat shading).
    """
    if smooth is None:
        smooth = getattr(getattr(mesh, 'visual', None), 'kind', None) != 'face'
    return _pyrender().Mesh.from_trimesh(mesh, material=material, smooth=smooth)


MeshItem = Union[object, Tuple[object, object]]   # a pyrender.Mesh, or (trimesh mesh, material)


class Renderer:
    """One reusable ``pyrender.OffscreenRenderer`` of a fixed size.

    >>> r = Renderer(640, 480)
    >>> rgb, depth = r.render([(body_trimesh, body_material())], K=(500, 500, 320, 240))
    """

    def __init__(self, width: int, height: int):
        if int(width) <= 0 or int(height) <= 0:
            raise ValueError(f"render size must be positive, got {width}x{height}")
        self.width, self.height = int(width), int(height)
        try:
            self._renderer = _pyrender().OffscreenRenderer(viewport_width=self.width, viewport_height=self.height)
        except Exception as exc:  # missing libEGL / no display / driver failure
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RuntimeError(f"no OpenGL/EGL available: {message} (PYOPENGL_PLATFORM="
                               f"{os.environ.get('PYOPENGL_PLATFORM')})") from None

    def render(self, meshes: Iterable[MeshItem], K: Sequence[float],
               cam_pose_opencv_to_world: Optional[np.ndarray] = None,
               bg_color: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
               ambient: Sequence[float] = (0.3, 0.3, 0.3)) -> Tuple[np.ndarray, np.ndarray]:
        """Render ``meshes`` with pinhole intrinsics ``K = (fx, fy, cx, cy)``.

        ``meshes`` holds ``pyrender.Mesh`` objects or ``(trimesh.Trimesh, material_or_None)`` pairs.
        ``cam_pose_opencv_to_world`` is the 4x4 pose of the OpenCV camera in the meshes' frame (identity when the
        meshes are already in camera coordinates). A directional light shines along the viewing direction.
        Returns ``(rgb [H, W, 3] uint8, depth [H, W] float32, 0 where empty)``.
        """
        pyrender = _pyrender()
        fx, fy, cx, cy = (float(v) for v in K)
        cam_pose = np.eye(4) if cam_pose_opencv_to_world is None else np.asarray(cam_pose_opencv_to_world, float)
        if cam_pose.shape != (4, 4):
            raise ValueError(f"camera pose must be 4x4, got shape {cam_pose.shape}")
        gl_pose = cam_pose @ OPENCV_TO_OPENGL
        scene = pyrender.Scene(bg_color=list(bg_color), ambient_light=list(ambient))
        for item in meshes:
            if isinstance(item, tuple):
                item = make_mesh(item[0], material=item[1])
            scene.add(item)
        camera = pyrender.IntrinsicsCamera(fx=fx, fy=fy, cx=cx, cy=cy, znear=0.05, zfar=100.0)
        scene.add(camera, pose=gl_pose)
        scene.add(pyrender.DirectionalLight(color=np.ones(3), intensity=LIGHT_INTENSITY), pose=gl_pose)
        rgb, depth = self._renderer.render(scene)
        return np.ascontiguousarray(rgb[..., :3]), depth

    def close(self) -> None:
        if getattr(self, '_renderer', None) is not None:
            self._renderer.delete()
            self._renderer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open3d_available() -> bool:
    """Whether open3d imports here (it needs a system library a fresh machine may lack)."""
    try:
        import open3d  # noqa: F401
    except Exception:
        return False
    return True


def opengl_unavailable_reason() -> str:
    """'' when an offscreen OpenGL context can be created, else the one-line reason (checked before long runs)."""
    try:
        Renderer(8, 8).close()
    except (RuntimeError, ImportError) as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ''
