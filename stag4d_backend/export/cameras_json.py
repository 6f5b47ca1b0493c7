"""``cameras.json``: the input view and the six anchor views, so a DCC can add matching cameras.

A JSON list (so the file is also a valid ``stag4d render --cameras`` input: every entry has the keys ``index frame
elevation azimuth radius fovy size``). Each entry:

``index``, ``frame`` (0), ``name`` ("input", "anchor_0" .. "anchor_5"), ``kind`` ("input" | "anchor"), ``anchor``
(k or null), ``elevation`` / ``azimuth`` (degrees, the project's orbit convention), ``radius``, ``fovy`` (degrees,
vertical), ``size`` (pixels, square), and

- ``position``: camera centre, Y-up world;
- ``viewmat``: 4x4 world-to-camera, OpenCV axes (x right, y down, z forward), Y-up world (the rasteriser's matrix);
- ``c2w``: its inverse (camera-to-world, OpenCV axes, Y-up world);
- ``K``: 3x3 pinhole intrinsics in pixels for ``size``;
- ``blender``: ``matrix_world`` (4x4, row-major, Blender's Z-up world with p_blender = (x, -z, y); the camera looks
  down its local -Z with +Y up, i.e. ``obj.matrix_world = Matrix(m)``), ``sensor_fit`` "VERTICAL", ``lens_unit``
  "FOV", ``angle`` (radians, = fovy), ``sensor_height`` 24 mm and the matching ``lens`` in mm, ``resolution``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..render.cameras import ANCHOR_TILE, OrbitCamera, anchor_cameras, blender_camera_matrix, front_camera
from ..atomic import write_json

SENSOR_HEIGHT_MM = 24.0


def _m(a) -> list:
    return [[round(float(v), 12) for v in row] for row in a]


def camera_entry(cam: OrbitCamera, index: int, name: str, kind: str, anchor: int | None) -> dict:
    half = math.radians(cam.fovy) / 2.0
    return {
        "index": index, "frame": 0, "name": name, "kind": kind, "anchor": anchor,
        "elevation": cam.elevation, "azimuth": cam.azimuth, "radius": cam.radius, "fovy": cam.fovy,
        "size": cam.size,
        "position": [round(float(v), 12) for v in cam.position],
        "viewmat": _m(cam.viewmat), "c2w": _m(cam.c2w), "K": _m(cam.K),
        "blender": {
            "matrix_world": _m(blender_camera_matrix(cam)),
            "sensor_fit": "VERTICAL", "lens_unit": "FOV", "angle": math.radians(cam.fovy),
            "sensor_height": SENSOR_HEIGHT_MM, "lens": (SENSOR_HEIGHT_MM / 2.0) / math.tan(half),
            "resolution": [cam.size, cam.size],
        },
    }


def job_cameras(input_size: int = 512, anchor_size: int = ANCHOR_TILE, input_elevation: float = 0.0
                ) -> list[dict]:
    """The input (front) view, then anchors k = 0..5 (elevations relative to the input's)."""
    base = front_camera(int(input_size))
    if input_elevation:
        base = OrbitCamera(float(input_elevation), 0.0, base.radius, base.fovy, base.size)
    out = [camera_entry(base, 0, "input", "input", None)]
    for k, cam in enumerate(anchor_cameras(int(anchor_size), input_elevation=float(input_elevation))):
        out.append(camera_entry(cam, k + 1, f"anchor_{k}", "anchor", k))
    return out


def write_cameras_json(path: str | os.PathLike, input_size: int = 512, anchor_size: int = ANCHOR_TILE,
                       input_elevation: float = 0.0) -> Path:
    return write_json(path, job_cameras(input_size, anchor_size, input_elevation))


__all__ = ["write_cameras_json", "job_cameras", "camera_entry"]
