"""``mesh.usdc``: an animated triangle mesh with fixed topology (one UsdGeomMesh, time-sampled points).

Stage as in ``usd_points``: Y-up, metersPerUnit 1, time codes 0 .. T-1 at ``fps``, default prim ``/STAG4D``.

``/STAG4D/mesh`` (UsdGeomMesh)
  ``faceVertexCounts`` / ``faceVertexIndices``   static (all triangles, counter-clockwise seen from outside)
  ``points``                                     point3f[], time-sampled (one sample per frame)
  ``extent``                                     time-sampled
  ``subdivisionScheme = "none"``                 a polygon mesh, not a subdivision-surface cage
  ``primvars:displayColor``                      color3f[], vertex, static, linear (sRGB-decoded)

Blender imports it as a MESH object with a Mesh Sequence Cache modifier and a ``displayColor`` colour attribute.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from .frames import srgb_to_linear
from .usd_points import import_pxr, new_stage

MESH_PRIM = "/STAG4D/mesh"


def write_mesh_usd(path: str | os.PathLike, faces: np.ndarray, points: np.ndarray, colors: np.ndarray, fps: float,
                   custom: dict | None = None) -> Path:
    """``points`` [T, V, 3] per-frame vertex positions; ``faces`` [F, 3]; ``colors`` [V, 3] display (sRGB) colours."""
    Usd, UsdGeom, _, Vt, _ = import_pxr()
    path = Path(path)
    points = np.asarray(points, dtype=np.float32)
    T = points.shape[0]
    faces = np.ascontiguousarray(faces, dtype=np.int32)
    with atomic_path(path) as tmp:
        stage = new_stage(tmp, T, fps, dict(custom or {}, num_vertices=int(points.shape[1]),
                                            num_faces=int(faces.shape[0])))
        mesh = UsdGeom.Mesh.Define(stage, MESH_PRIM)
        mesh.CreateFaceVertexCountsAttr().Set(Vt.IntArray.FromNumpy(np.full(faces.shape[0], 3, np.int32)))
        mesh.CreateFaceVertexIndicesAttr().Set(Vt.IntArray.FromNumpy(faces.reshape(-1)))
        mesh.CreateSubdivisionSchemeAttr().Set(UsdGeom.Tokens.none)
        mesh.CreateDoubleSidedAttr().Set(False)
        mesh.CreateDisplayColorPrimvar(UsdGeom.Tokens.vertex).Set(
            Vt.Vec3fArray.FromNumpy(srgb_to_linear(np.clip(colors, 0.0, 1.0))))
        pts_attr, ext_attr = mesh.CreatePointsAttr(), mesh.CreateExtentAttr()
        for k in range(T):
            p = np.ascontiguousarray(points[k])
            pts_attr.Set(Vt.Vec3fArray.FromNumpy(p), k)
            ext_attr.Set(Vt.Vec3fArray.FromNumpy(np.stack([p.min(0), p.max(0)])), k)
        stage.GetRootLayer().Save()
        del stage
    return path


__all__ = ["write_mesh_usd", "MESH_PRIM"]
