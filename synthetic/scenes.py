"""Procedural y-up rooms for the synthetic EgoBody-format world.

A room is a list of flat rectangular :class:`Panel` s (floor, walls, ceiling, and the six sides of every furniture
box). The same panels give two meshes:

* :meth:`Room.dense_mesh` -- the ``scene_mesh/<scene>/<scene>.obj`` geometry. The preprocessing keeps every k-th
  *vertex*, so each panel is tessellated into a regular grid (floor about 1.3 cm, the rest 3-4 cm): a 2x2 m floor
  patch alone then holds more than 20000 vertices. Each OBJ stays under about 15 MB.
* :meth:`Room.render_mesh` -- a coarse, coloured copy of the same surfaces for fast rendering.

Furniture (chairs, tables, sofas, beds, shelves) stands on the floor; sittable pieces expose a :class:`Seat`.
The room's origin is shifted randomly so that nothing downstream can rely on a centred scene or a floor at y=0.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from utils.io import atomic_path

UP = np.array([0.0, 1.0, 0.0])

FLOOR_SPACING = 0.013     # m between floor grid vertices
SURFACE_SPACING = 0.04    # walls
CEILING_SPACING = 0.06    # above the 2 m stage-2 crops, so it can be coarser
FURNITURE_SPACING = 0.03

ROOM_STYLES = ('livingroom', 'bedroom', 'office', 'lounge')


@dataclass
class Panel:
    """The rectangle ``origin + a*u + b*v`` for a, b in [0, 1]; its front side faces ``u x v``."""
    origin: np.ndarray
    u: np.ndarray
    v: np.ndarray
    color: Tuple[int, int, int]
    spacing: float = SURFACE_SPACING
    tile: float = 0.0                      # > 0: checker tiles of this size in the render mesh
    tile_color: Tuple[int, int, int] = (0, 0, 0)

    @property
    def normal(self) -> np.ndarray:
        n = np.cross(self.u, self.v)
        return n / np.linalg.norm(n)

    def grid(self, spacing: float) -> Tuple[np.ndarray, np.ndarray]:
        """Vertices ``[(nu+1)(nv+1), 3]`` and faces ``[2 nu nv, 3]`` of a regular grid, front side outward."""
        nu = max(1, int(math.ceil(np.linalg.norm(self.u) / spacing)))
        nv = max(1, int(math.ceil(np.linalg.norm(self.v) / spacing)))
        a, b = np.meshgrid(np.linspace(0.0, 1.0, nu + 1), np.linspace(0.0, 1.0, nv + 1), indexing='ij')
        verts = self.origin + a.reshape(-1, 1) * self.u + b.reshape(-1, 1) * self.v
        i, j = np.meshgrid(np.arange(nu), np.arange(nv), indexing='ij')
        p00 = (i * (nv + 1) + j).reshape(-1)
        p10, p01 = p00 + (nv + 1), p00 + 1
        p11 = p10 + 1
        faces = np.concatenate([np.stack([p00, p10, p11], 1), np.stack([p00, p11, p01], 1)])
        return verts, faces


def box_panels(center, size, yaw: float, color, spacing: float = FURNITURE_SPACING,
               bottom: bool = False) -> List[Panel]:
    """The outward-facing sides of a box of ``size`` (x, y, z) centred at ``center``, turned by ``yaw`` about y."""
    c, s = math.cos(yaw), math.sin(yaw)
    ex = np.array([c, 0.0, -s]) * size[0]
    ey = UP * size[1]
    ez = np.array([s, 0.0, c]) * size[2]
    corner = np.asarray(center, float) - (ex + ey + ez) / 2
    sides = [
        (corner + ex, ey, ez),            # +x
        (corner, ez, ey),                 # -x
        (corner + ey, ez, ex),            # +y (top)
        (corner + ez, ex, ey),            # +z
        (corner, ey, ex),                 # -z
    ]
    if bottom:
        sides.append((corner, ex, ez))    # -y
    return [Panel(o, u, v, color, spacing) for o, u, v in sides]


@dataclass
class Box:
    """An oriented box (yaw about y) used for collision and line-of-sight queries."""
    center: np.ndarray
    size: np.ndarray
    yaw: float

    def to_local(self, points: np.ndarray) -> np.ndarray:
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        d = np.asarray(points, float) - self.center
        return np.stack([c * d[..., 0] - s * d[..., 2], d[..., 1], s * d[..., 0] + c * d[..., 2]], -1)

    def segment_hits(self, p: np.ndarray, q: np.ndarray) -> bool:
        """Does the segment p->q pass through the box (slab test in the box frame)?"""
        a, b = self.to_local(p), self.to_local(q)
        d = b - a
        half = self.size / 2
        t0, t1 = 0.0, 1.0
        for k in range(3):
            if abs(d[k]) < 1e-12:
                if abs(a[k]) > half[k]:
                    return False
                continue
            lo, hi = sorted(((-half[k] - a[k]) / d[k], (half[k] - a[k]) / d[k]))
            t0, t1 = max(t0, lo), min(t1, hi)
            if t0 > t1:
                return False
        return True


@dataclass
class Seat:
    """Where a body can sit: the middle of the seat's front edge at the top of the cushion."""
    edge_center: np.ndarray          # (x, y_top, z)
    facing: np.ndarray               # unit (x, 0, z), away from the seat
    half_width: float                # usable half length along the edge
    depth: float                     # seat depth behind the edge
    kind: str

    @property
    def height(self) -> float:
        return float(self.edge_center[1])


@dataclass
class Furniture:
    kind: str
    center: np.ndarray               # footprint centre (x, floor_y, z)
    half_extent: np.ndarray          # footprint half sizes (local x, local z)
    yaw: float
    boxes: List[Box]
    panels: List[Panel]
    seat: Optional[Seat] = None

    def footprint_contains(self, xz: np.ndarray, margin: float = 0.0) -> np.ndarray:
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        d = np.atleast_2d(xz) - self.center[[0, 2]]
        lx = c * d[:, 0] - s * d[:, 1]
        lz = s * d[:, 0] + c * d[:, 1]
        return (np.abs(lx) <= self.half_extent[0] + margin) & (np.abs(lz) <= self.half_extent[1] + margin)

    def corners_xz(self, margin: float = 0.0) -> np.ndarray:
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        ax, az = np.array([c, -s]), np.array([s, c])
        hx, hz = self.half_extent + margin
        base = self.center[[0, 2]]
        return np.array([base + sx * hx * ax + sz * hz * az for sx, sz in ((-1, -1), (1, -1), (1, 1), (-1, 1))])


def _rects_overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Separating-axis test of two convex quads given by their 4 corners (xz)."""
    for quad in (a, b):
        for k in range(4):
            edge = quad[(k + 1) % 4] - quad[k]
            axis = np.array([-edge[1], edge[0]])
            pa, pb = a @ axis, b @ axis
            if pa.max() < pb.min() or pb.max() < pa.min():
                return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# Furniture builders: local frame has the seat / front facing +z, the footprint centred at the origin.
# ----------------------------------------------------------------------------------------------------------------

def _local_to_world(center_xz, floor_y, yaw):
    c, s = math.cos(yaw), math.sin(yaw)
    base = np.array([center_xz[0], floor_y, center_xz[1]])

    def apply(p):
        p = np.asarray(p, float)
        return base + np.array([c * p[0] + s * p[2], p[1], -s * p[0] + c * p[2]])
    return apply


def _assemble(kind, center_xz, floor_y, yaw, local_boxes, half_extent, seat_local=None) -> Furniture:
    """``local_boxes``: (centre, size, colour, bottom) in the local frame (y measured from the floor)."""
    to_world = _local_to_world(center_xz, floor_y, yaw)
    boxes, panels = [], []
    for center, size, color, bottom in local_boxes:
        wc = to_world(center)
        boxes.append(Box(wc, np.asarray(size, float), yaw))
        panels += box_panels(wc, size, yaw, color, bottom=bottom)
    seat = None
    if seat_local is not None:
        edge, half_width, depth = seat_local
        facing = to_world([0.0, 0.0, 1.0]) - to_world([0.0, 0.0, 0.0])
        seat = Seat(to_world(edge), facing / np.linalg.norm(facing), half_width, depth, kind)
    return Furniture(kind, np.array([center_xz[0], floor_y, center_xz[1]]), np.asarray(half_extent, float), yaw,
                     boxes, panels, seat)


def _legs(width, depth, height, thickness, color, inset=0.03):
    out = []
    for sx in (-1, 1):
        for sz in (-1, 1):
            centre = [sx * (width / 2 - inset - thickness / 2), height / 2, sz * (depth / 2 - inset - thickness / 2)]
            out.append((centre, [thickness, height, thickness], color, False))
    return out


def make_chair(rng, center_xz, floor_y, yaw) -> Furniture:
    w, d = rng.uniform(0.44, 0.5), rng.uniform(0.44, 0.5)
    seat_h, back_h = rng.uniform(0.46, 0.52), rng.uniform(0.4, 0.5)
    wood = tuple(int(v) for v in rng.integers(60, 120, 3))
    slab = 0.04
    parts = _legs(w, d, seat_h - slab, 0.04, wood)
    parts.append(([0, seat_h - slab / 2, 0], [w, slab, d], wood, True))
    parts.append(([0, seat_h + back_h / 2, -d / 2 + 0.02], [w, back_h, 0.04], wood, True))
    return _assemble('chair', center_xz, floor_y, yaw, parts, [w / 2, d / 2],
                     seat_local=([0, seat_h, d / 2], 0.02, d - 0.04))


def make_table(rng, center_xz, floor_y, yaw) -> Furniture:
    w, d, h = rng.uniform(1.0, 1.5), rng.uniform(0.7, 0.9), rng.uniform(0.72, 0.76)
    color = tuple(int(v) for v in rng.integers(110, 170, 3))
    parts = _legs(w, d, h - 0.04, 0.05, (80, 70, 60))
    parts.append(([0, h - 0.02, 0], [w, 0.04, d], color, True))
    return _assemble('table', center_xz, floor_y, yaw, parts, [w / 2, d / 2])


def make_sofa(rng, center_xz, floor_y, yaw) -> Furniture:
    w, d = rng.uniform(1.7, 2.2), rng.uniform(0.85, 0.95)
    seat_h, back_h, arm_w = rng.uniform(0.45, 0.5), rng.uniform(0.35, 0.45), 0.15
    color = [(60, 80, 130), (70, 110, 90), (90, 90, 95), (120, 100, 70)][int(rng.integers(4))]
    back_d = 0.2
    parts = [([0, seat_h / 2, back_d / 2], [w - 2 * arm_w, seat_h, d - back_d], color, False),
             ([0, (seat_h + back_h) / 2, -d / 2 + back_d / 2], [w, seat_h + back_h, back_d], color, False)]
    for sx in (-1, 1):
        parts.append(([sx * (w / 2 - arm_w / 2), (seat_h + 0.18) / 2, back_d / 2], [arm_w, seat_h + 0.18, d - back_d],
                      color, False))
    return _assemble('sofa', center_xz, floor_y, yaw, parts, [w / 2, d / 2],
                     seat_local=([0, seat_h, d / 2], w / 2 - arm_w - 0.3, d - back_d))


def make_bed(rng, center_xz, floor_y, yaw) -> Furniture:
    """A bed whose long side faces +z (people sit on that edge); the headboard is at local -x."""
    length, width, h = rng.uniform(1.95, 2.1), rng.uniform(1.4, 1.7), rng.uniform(0.5, 0.56)
    sheet = [(200, 205, 215), (170, 190, 210), (215, 210, 190)][int(rng.integers(3))]
    parts = [([0, h / 2, 0], [length, h, width], sheet, False),
             ([-length / 2 - 0.03, 0.5, 0], [0.06, 1.0, width], (90, 70, 55), False)]
    return _assemble('bed', center_xz, floor_y, yaw, parts, [length / 2 + 0.06, width / 2],
                     seat_local=([0.15, h, width / 2], length / 2 - 0.45, width))


def make_shelf(rng, center_xz, floor_y, yaw) -> Furniture:
    w, d, h = rng.uniform(0.8, 1.4), rng.uniform(0.35, 0.45), rng.uniform(1.6, 2.0)
    color = tuple(int(v) for v in rng.integers(140, 200, 3))
    parts = [([0, h / 2, 0], [w, h, d], color, False)]
    return _assemble('shelf', center_xz, floor_y, yaw, parts, [w / 2, d / 2])


BUILDERS = {'chair': make_chair, 'table': make_table, 'sofa': make_sofa, 'bed': make_bed, 'shelf': make_shelf}
# (kind, placed against a wall?) per style, in placement order (large pieces first).
STYLE_FURNITURE = {
    'livingroom': [('sofa', True), ('shelf', True), ('table', False), ('chair', False), ('chair', False)],
    'bedroom': [('bed', True), ('shelf', True), ('table', True), ('chair', False)],
    'office': [('table', False), ('shelf', True), ('chair', False), ('chair', False), ('chair', False)],
    'lounge': [('sofa', True), ('sofa', True), ('table', False), ('chair', False)],
}


# ----------------------------------------------------------------------------------------------------------------
# Rooms
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Room:
    name: str
    style: str
    origin: np.ndarray               # (x_min, floor_y, z_min) of the room box
    size: np.ndarray                 # (x, height, z)
    wall_colors: List[Tuple[int, int, int]]
    floor_colors: Tuple[Tuple[int, int, int], Tuple[int, int, int]]
    furniture: List[Furniture] = field(default_factory=list)

    @property
    def floor_y(self) -> float:
        return float(self.origin[1])

    @property
    def center(self) -> np.ndarray:
        return self.origin + self.size / 2

    def shell_panels(self) -> List[Panel]:
        """Floor (+y), ceiling (-y) and four walls, all facing into the room."""
        o, (sx, sy, sz) = self.origin, self.size
        ex, ey, ez = np.array([sx, 0, 0.0]), UP * sy, np.array([0, 0, sz])
        floor = Panel(o, ez, ex, self.floor_colors[0], FLOOR_SPACING, tile=0.3, tile_color=self.floor_colors[1])
        ceiling = Panel(o + ey, ex, ez, (235, 235, 230), CEILING_SPACING)
        walls = [Panel(o, ex, ey, self.wall_colors[0]),                 # z = z_min, faces +z
                 Panel(o + ez, ey, ex, self.wall_colors[1]),            # z = z_max, faces -z
                 Panel(o, ey, ez, self.wall_colors[2]),                 # x = x_min, faces +x
                 Panel(o + ex, ez, ey, self.wall_colors[3])]            # x = x_max, faces -x
        return [floor, ceiling] + walls

    def panels(self) -> List[Panel]:
        return self.shell_panels() + [p for f in self.furniture for p in f.panels]

    def dense_mesh(self) -> Tuple[np.ndarray, np.ndarray]:
        """Vertices float64 ``[V, 3]`` and faces int64 ``[F, 3]`` of the dense scene mesh.

        The vertex order is a fixed pseudo-random permutation (seeded by the room name), not panel by panel: the
        preprocessing keeps every k-th vertex and then the first 20000 in file order, which on a panel-ordered
        file would keep the floor and drop the furniture listed after it. Scanned meshes do not list their
        surfaces one after another either.
        """
        verts, faces, offset = [], [], 0
        for panel in self.panels():
            v, f = panel.grid(panel.spacing)
            verts.append(v)
            faces.append(f + offset)
            offset += len(v)
        verts, faces = np.concatenate(verts), np.concatenate(faces)
        order = np.random.default_rng(zlib.crc32(self.name.encode())).permutation(len(verts))
        new_index = np.empty_like(order)
        new_index[order] = np.arange(len(order))
        return verts[order], new_index[faces]

    def render_mesh(self):
        """A coarse ``trimesh.Trimesh`` with face colours (checker-tiled floor) for rendering."""
        import trimesh
        verts, faces, colors = [], [], []
        for panel in self.panels():
            if panel.tile > 0:
                nu = max(1, int(round(np.linalg.norm(panel.u) / panel.tile)))
                nv = max(1, int(round(np.linalg.norm(panel.v) / panel.tile)))
            else:
                nu = nv = 1
            v, f = _grid_counts(panel, nu, nv)
            checker = (np.add.outer(np.arange(nu), np.arange(nv)) % 2).reshape(-1)
            tile_rgb = np.where(checker[:, None] == 1, panel.tile_color, panel.color) if panel.tile > 0 else \
                np.tile(panel.color, (nu * nv, 1))
            faces.append(f + sum(len(x) for x in verts))
            verts.append(v)
            colors.append(np.concatenate([tile_rgb, tile_rgb]))
        rgba = np.concatenate(colors).astype(np.uint8)
        rgba = np.concatenate([rgba, np.full((len(rgba), 1), 255, np.uint8)], axis=1)
        return trimesh.Trimesh(np.concatenate(verts), np.concatenate(faces), face_colors=rgba, process=False)

    # -------------------------------------------------------------- free-space queries (xz plane)
    def inside(self, xz: np.ndarray, margin: float = 0.0) -> np.ndarray:
        xz = np.atleast_2d(xz)
        lo = self.origin[[0, 2]] + margin
        hi = self.origin[[0, 2]] + self.size[[0, 2]] - margin
        return np.all((xz >= lo) & (xz <= hi), axis=1)

    def free(self, xz: np.ndarray, margin: float = 0.0, ignore: Sequence[Furniture] = ()) -> np.ndarray:
        """Inside the walls by ``margin`` and outside every furniture footprint grown by ``margin``."""
        ok = self.inside(xz, margin)
        for item in self.furniture:
            if any(item is other for other in ignore):
                continue
            ok &= ~item.footprint_contains(xz, margin)
        return ok

    def sample_free_xz(self, rng: np.random.Generator, margin: float, tries: int = 200) -> Optional[np.ndarray]:
        lo, hi = self.origin[[0, 2]], self.origin[[0, 2]] + self.size[[0, 2]]
        for _ in range(tries):
            xz = rng.uniform(lo, hi)
            if self.free(xz, margin)[0]:
                return xz
        return None

    def seats(self) -> List[Seat]:
        return [f.seat for f in self.furniture if f.seat is not None]

    def furniture_of(self, seat: Seat) -> Furniture:
        return next(f for f in self.furniture if f.seat is seat)

    def line_of_sight(self, eye: np.ndarray, target: np.ndarray, shrink: float = 0.02) -> bool:
        """True when no furniture box (shrunk by ``shrink``) lies between ``eye`` and ``target``."""
        for item in self.furniture:
            for box in item.boxes:
                small = Box(box.center, np.maximum(box.size - 2 * shrink, 1e-3), box.yaw)
                if small.segment_hits(eye, target):
                    return False
        return True


def _grid_counts(panel: Panel, nu: int, nv: int) -> Tuple[np.ndarray, np.ndarray]:
    """Like :meth:`Panel.grid` but with explicit cell counts and unshared vertices per cell (flat colours)."""
    a0, b0 = np.meshgrid(np.arange(nu) / nu, np.arange(nv) / nv, indexing='ij')
    a0, b0 = a0.reshape(-1, 1), b0.reshape(-1, 1)
    du, dv = panel.u / nu, panel.v / nv
    p00 = panel.origin + a0 * panel.u + b0 * panel.v
    corners = np.stack([p00, p00 + du, p00 + du + dv, p00 + dv], axis=1).reshape(-1, 3)
    base = np.arange(nu * nv) * 4
    faces = np.concatenate([np.stack([base, base + 1, base + 2], 1), np.stack([base, base + 2, base + 3], 1)])
    return corners, faces


def _place(room: Room, rng: np.random.Generator, kind: str, against_wall: bool, tries: int = 100) -> bool:
    """Try to add one piece of ``kind`` without overlapping the walls or other furniture (0.35 m clearance)."""
    lo, hi = room.origin[[0, 2]], room.origin[[0, 2]] + room.size[[0, 2]]
    for _ in range(tries):
        probe = BUILDERS[kind](np.random.default_rng(rng.integers(2 ** 32)), (0.0, 0.0), room.floor_y, 0.0)
        hx, hz = probe.half_extent
        if against_wall:
            wall = int(rng.integers(4))
            # yaw turns local +z (the front) into the inward normal of the chosen wall
            yaw, normal = [(0.0, (0, 1)), (math.pi, (0, -1)), (math.pi / 2, (1, 0)), (-math.pi / 2, (-1, 0))][wall]
            along = 0 if wall < 2 else 1           # coordinate running along the wall
            extent_along = hx
            t = rng.uniform(lo[along] + extent_along + 0.05, hi[along] - extent_along - 0.05)
            xz = np.zeros(2)
            xz[along] = t
            across = 1 - along
            xz[across] = (lo[across] + hz + 0.02) if normal[across] > 0 else (hi[across] - hz - 0.02)
        else:
            xz = rng.uniform(lo + 0.9, hi - 0.9)
            to_center = room.center[[0, 2]] - xz
            yaw = math.atan2(to_center[0], to_center[1]) + rng.uniform(-0.5, 0.5)
        item = BUILDERS[kind](np.random.default_rng(rng.integers(2 ** 32)), xz, room.floor_y, yaw)
        if not room.inside(item.corners_xz(), 0.0).all():
            continue
        grown = item.corners_xz(0.35)
        if any(_rects_overlap(grown, other.corners_xz()) for other in room.furniture):
            continue
        room.furniture.append(item)
        return True
    return False


def make_room(name: str, rng: np.random.Generator, style: Optional[str] = None) -> Room:
    """A furnished room of ``style`` (one of ROOM_STYLES; random when None) with a random origin."""
    style = style or ROOM_STYLES[int(rng.integers(len(ROOM_STYLES)))]
    if style not in STYLE_FURNITURE:
        raise ValueError(f"room style must be one of {ROOM_STYLES}, got {style!r}")
    size = np.array([rng.uniform(4.6, 5.4), rng.uniform(2.6, 2.9), rng.uniform(4.2, 4.8)])
    origin = np.array([rng.uniform(-3.0, 0.0), rng.uniform(-0.1, 0.1), rng.uniform(-3.0, 0.0)])
    walls = [tuple(int(c) for c in rng.integers(170, 225, 3)) for _ in range(4)]
    base = rng.integers(100, 150, 3)
    floor = (tuple(int(c) for c in base), tuple(int(c) for c in np.clip(base - rng.integers(20, 40), 0, 255)))
    room = Room(name, style, origin, size, walls, floor)
    for kind, against_wall in STYLE_FURNITURE[style]:
        _place(room, rng, kind, against_wall)
    return room


def write_obj(path: str, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Write a triangle mesh as Wavefront OBJ (vertex order preserved, 1-based faces), atomically."""
    vert_lines = '\n'.join('v %.4f %.4f %.4f' % tuple(v) for v in np.asarray(vertices, float).tolist())
    face_lines = '\n'.join('f %d %d %d' % tuple(f) for f in (np.asarray(faces, np.int64) + 1).tolist())
    with atomic_path(path, suffix='.obj') as tmp, open(tmp, 'w') as out:
        out.write('# synthetic EgoBody-style scene (y up, metres)\n')
        out.write(vert_lines)
        out.write('\n')
        out.write(face_lines)
        out.write('\n')
