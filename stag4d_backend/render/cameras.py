"""Orbit cameras in the project's pinned convention (docs/architecture.md, "Conventions").

World space is Y-up with the object at the origin. A camera at elevation ``el`` (degrees ABOVE the horizontal
plane), azimuth ``az`` (degrees, from the front +Z toward +X) and radius ``r`` sits at
``(r cos el sin az, r sin el, r cos el cos az)`` and looks at the origin with up = +Y. ``az = el = 0`` is the
input (front) view.

View matrices are world-to-camera in the OpenCV convention used by gsplat (x right, y down, z forward).
Pure math (numpy, float64); no I/O.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_RADIUS = 2.0
DEFAULT_FOVY = 49.1  # degrees; matches Zero123's Objaverse renders
DEFAULT_SIZE = 512

# Zero123++ v1.1 views, k = 0..5 (3x2 grid, row-major, 320 px tiles). Elevation in degrees ABOVE the horizon.
ANCHOR_AZIMUTHS = (30.0, 90.0, 150.0, 210.0, 270.0, 330.0)
ANCHOR_ELEVATIONS = (30.0, -20.0, 30.0, -20.0, 30.0, -20.0)
ANCHOR_TILE = 320
ANCHOR_GRID_COLS = 2
ANCHOR_GRID_ROWS = 3

# Y-up (ours) -> Z-up (Blender): +90 degrees about X, i.e. p_blender = (x, -z, y).
Y_UP_TO_Z_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
# The same rotation as a (w, x, y, z) quaternion.
Y_UP_TO_Z_UP_QUAT = np.array([math.cos(math.pi / 4), math.sin(math.pi / 4), 0.0, 0.0])

# OpenCV camera (x right, y down, z forward) <-> OpenGL/Blender camera (x right, y up, z backward).
_CV_TO_GL = np.diag([1.0, -1.0, -1.0])


def orbit_position(elevation: float, azimuth: float, radius: float = DEFAULT_RADIUS) -> np.ndarray:
    """Camera centre for an orbit pose (degrees, elevation positive above)."""
    el, az = math.radians(elevation), math.radians(azimuth)
    return np.array(
        [radius * math.cos(el) * math.sin(az), radius * math.sin(el), radius * math.cos(el) * math.cos(az)]
    )


def look_at_c2w(position, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """Camera-to-world 4x4 in the OpenCV camera convention (columns: right, down, forward, centre).

    At the poles (forward parallel to ``up``) the azimuth is undefined; we then take right = +X so the
    result stays finite and deterministic.
    """
    position = np.asarray(position, dtype=np.float64)
    forward = np.asarray(target, dtype=np.float64) - position
    norm = np.linalg.norm(forward)
    if norm == 0:
        raise ValueError("camera position coincides with its target")
    forward /= norm
    right = np.cross(forward, np.asarray(up, dtype=np.float64))
    if np.linalg.norm(right) < 1e-9:
        right = np.array([1.0, 0.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, forward, position
    return c2w


def intrinsics(fovy: float, width: int, height: int | None = None) -> np.ndarray:
    """Pinhole K from the vertical field of view (degrees); square pixels, principal point at the centre."""
    height = width if height is None else height
    fy = (height / 2.0) / math.tan(math.radians(fovy) / 2.0)
    return np.array([[fy, 0.0, width / 2.0], [0.0, fy, height / 2.0], [0.0, 0.0, 1.0]])


def fovy_from_focal(focal: float, height: int) -> float:
    """Inverse of :func:`intrinsics`: vertical field of view (degrees) from a focal length in pixels."""
    return math.degrees(2.0 * math.atan((height / 2.0) / focal))


@dataclass(frozen=True)
class OrbitCamera:
    """A camera on a sphere around the origin, looking at it (see the module docstring)."""

    elevation: float = 0.0
    azimuth: float = 0.0
    radius: float = DEFAULT_RADIUS
    fovy: float = DEFAULT_FOVY
    size: int = DEFAULT_SIZE

    @property
    def position(self) -> np.ndarray:
        return orbit_position(self.elevation, self.azimuth, self.radius)

    @property
    def c2w(self) -> np.ndarray:
        """Camera-to-world, OpenCV camera axes."""
        return look_at_c2w(self.position)

    @property
    def viewmat(self) -> np.ndarray:
        """World-to-camera 4x4, OpenCV (x right, y down, z forward): the rasteriser's ``viewmat``."""
        return w2c_from_c2w(self.c2w)

    @property
    def K(self) -> np.ndarray:
        return intrinsics(self.fovy, self.size, self.size)

    def with_size(self, size: int) -> "OrbitCamera":
        return OrbitCamera(self.elevation, self.azimuth, self.radius, self.fovy, int(size))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "OrbitCamera":
        """Accepts a CAMERAS.json entry; keys other than the camera's own (index, frame) are ignored."""
        kw = {k: d[k] for k in ("elevation", "azimuth", "radius", "fovy", "size") if k in d}
        for k in ("elevation", "azimuth", "radius", "fovy"):
            if k in kw:
                kw[k] = float(kw[k])
        if "size" in kw:
            kw["size"] = int(kw["size"])
        return cls(**kw)


def w2c_from_c2w(c2w: np.ndarray) -> np.ndarray:
    """Rigid inverse (exact for rotation + translation)."""
    R, t = c2w[:3, :3], c2w[:3, 3]
    w2c = np.eye(4)
    w2c[:3, :3] = R.T
    w2c[:3, 3] = -R.T @ t
    return w2c


def front_camera(size: int = DEFAULT_SIZE) -> OrbitCamera:
    """The input (reference) view: elevation 0, azimuth 0, radius 2."""
    return OrbitCamera(0.0, 0.0, DEFAULT_RADIUS, DEFAULT_FOVY, size)


def anchor_cameras(size: int = ANCHOR_TILE, radius: float = DEFAULT_RADIUS, fovy: float = DEFAULT_FOVY,
                   input_elevation: float = 0.0) -> list[OrbitCamera]:
    """The six Zero123++ v1.1 views, k = 0..5. Their elevations are relative to the input view's elevation."""
    return [OrbitCamera(input_elevation + el, az, radius, fovy, size)
            for az, el in zip(ANCHOR_AZIMUTHS, ANCHOR_ELEVATIONS)]


def anchor_tile_box(k: int, tile: int = ANCHOR_TILE) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of view k in the Zero123++ 3x2 output grid (2 columns, 3 rows, row-major)."""
    if not 0 <= k < ANCHOR_GRID_COLS * ANCHOR_GRID_ROWS:
        raise ValueError(f"anchor index must be 0..5, got {k}")
    x0, y0 = (k % ANCHOR_GRID_COLS) * tile, (k // ANCHOR_GRID_COLS) * tile
    return x0, y0, x0 + tile, y0 + tile


def anchor_index_for_azimuth(azimuth: float) -> int:
    """The anchor the STAG4D code picks for a random view at this azimuth (nearest in azimuth only).

    Anchor k covers azimuths [60k, 60k + 60); negative azimuths wrap around (the code's floor((360 + hor)/60)).
    """
    a = azimuth % 360.0
    return int(a // 60.0) % 6


# --- The STAG4D (DreamGaussian) code's orbit convention: elevation sign flipped. Convert at its boundary only.

def to_stag4d_elevation(elevation: float) -> float:
    """Our 'degrees above' -> the STAG4D code's elevation (negative = camera above)."""
    return -elevation


def from_stag4d_elevation(dg_elevation: float) -> float:
    return -dg_elevation


def stag4d_orbit_position(dg_elevation: float, azimuth: float, radius: float = DEFAULT_RADIUS) -> np.ndarray:
    """The STAG4D/DreamGaussian ``orbit_camera`` centre: (r cos e sin a, -r sin e, r cos e cos a)."""
    return orbit_position(from_stag4d_elevation(dg_elevation), azimuth, radius)


# --- Blender (Z-up) conversion.

def y_up_to_z_up_points(points) -> np.ndarray:
    """p_blender = (x, -z, y) for an [..., 3] array."""
    p = np.asarray(points, dtype=np.float64)
    return np.stack([p[..., 0], -p[..., 2], p[..., 1]], axis=-1)


def z_up_to_y_up_points(points) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    return np.stack([p[..., 0], p[..., 2], -p[..., 1]], axis=-1)


def quat_multiply(a, b) -> np.ndarray:
    """Hamilton product of (w, x, y, z) quaternions, broadcasting over leading axes."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], axis=-1)


def y_up_to_z_up_quats(quats) -> np.ndarray:
    """Orientations (w, x, y, z) in Y-up world -> Blender Z-up world: q_b = q_(+90 deg about X) * q."""
    return quat_multiply(Y_UP_TO_Z_UP_QUAT, quats)


def blender_camera_matrix(camera: OrbitCamera) -> np.ndarray:
    """World matrix (Z-up) of a Blender camera matching ``camera``: Blender cameras look down their local -Z
    with local +Y up, so the OpenCV axes are flipped in y and z before the world conversion."""
    c2w = camera.c2w
    m = np.eye(4)
    m[:3, :3] = Y_UP_TO_Z_UP @ c2w[:3, :3] @ _CV_TO_GL
    m[:3, 3] = Y_UP_TO_Z_UP @ c2w[:3, 3]
    return m


def to_torch(array: np.ndarray, dtype=None, device=None):
    """Convenience: a camera matrix as a torch tensor (float32 by default)."""
    import torch

    return torch.as_tensor(np.asarray(array), dtype=dtype or torch.float32, device=device)


# --- An arbitrary camera given by Blender (the add-on's exact display path).

def viewmat_from_blender_local(camera_in_object: np.ndarray) -> tuple[np.ndarray, float]:
    """World-to-camera (OpenCV) 4x4 and the depth scale (object units -> Blender units) from a Blender camera's matrix expressed in the splat
    object's own space (``object.matrix_world.inverted() @ camera.matrix_world``). That space is the fit's own
    Y-up world (the USD importer puts the file's coordinates in the object's local space), so no axis swap is
    needed; Blender cameras look down local -Z with +Y up, hence the flip to OpenCV axes. A uniformly scaled
    object (scale s) gives rotation axes of length 1 / s: the rotation is normalised and s returned (depths in the
    object's units times s are Blender units)."""
    m = np.asarray(camera_in_object, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise ValueError("camera matrix must be a finite 4x4")
    lengths = np.linalg.norm(m[:3, :3], axis=0)
    if np.any(lengths < 1e-12) or np.ptp(lengths) > 1e-4 * lengths.max():
        raise ValueError(f"camera matrix in the object's space must be a rotation times a uniform scale "
                         f"(axis lengths {lengths.round(6).tolist()}): scale the splat object uniformly")
    scale = 1.0 / float(lengths.mean())
    c2w = np.eye(4)
    c2w[:3, :3] = (m[:3, :3] / lengths) @ _CV_TO_GL
    c2w[:3, 3] = m[:3, 3]
    return w2c_from_c2w(c2w), scale
