"""``gaussians.usdc``: the animated Gaussians as one USD file (usd-core), for Blender and for splat-aware tools.

Stage: ``upAxis = "Y"``, ``metersPerUnit = 1``, time codes 0 .. T-1 (one per output frame),
``timeCodesPerSecond = framesPerSecond = fps``, default prim ``/STAG4D`` (an Xform). Two prims hold the same
Gaussians in the same order:

``/STAG4D/gaussians`` (UsdGeomPoints; what Blender's USD importer turns into an animated point cloud)
  ``points``                  point3f[]  time-sampled  centres (world units, Y-up)
  ``widths``                  float[]    time-sampled  2 x the largest 1-sigma scale of each Gaussian
  ``extent``                  float3[2]  time-sampled  (conservative: centres' box +- the largest radius)
  ``primvars:displayColor``   color3f[]  vertex, static   base colour, *linear* (sRGB-decoded SH-DC colour; over 1 where it is)
  ``primvars:displayOpacity`` float[]    vertex, static   opacity in [0, 1] (sigmoid of the logit)
  ``primvars:opacity``        float[]    vertex, static   the same values, under the name the add-on reads
  ``primvars:scales``         float3[]   vertex, time-sampled  linear 1-sigma scales along the Gaussian's own axes
  ``primvars:orientations``   quatf[]    vertex, time-sampled  unit rotation of the Gaussian (local -> parent)

``/STAG4D/splats`` (UsdVolParticleField3DGaussianSplat, OpenUSD 26.x)
  ``positions`` / ``orientations`` / ``scales``   time-sampled (same arrays as above)
  ``opacities``                                    static, [0, 1]
  ``radiance:sphericalHarmonicsDegree``            uniform int, the model's SH degree
  ``radiance:sphericalHarmonicsCoefficients``      float3[], static, per particle (d+1)^2 coefficients: f_dc then
                                                   f_rest in the standard 3DGS order (raw SH, colour =
                                                   0.5 + C0 * f_dc + ...)
  ``extent``                                       time-sampled (centres' box +- 3 x the largest sigma)

usdc's value deduplication stores an array once even when two attributes hold it, so the second prim costs almost
nothing. Never author a float4 primvar on the Points prim: Blender 5.0's importer stops reading the remaining
primvars when it meets one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..atomic import atomic_path
from .frames import SampledFrames, srgb_to_linear

ROOT = "/STAG4D"
POINTS_PRIM = "/STAG4D/gaussians"
SPLATS_PRIM = "/STAG4D/splats"


def import_pxr():
    """(Usd, UsdGeom, UsdVol, Vt, Sdf) or a clear error when usd-core is missing or too old."""
    try:
        from pxr import Sdf, Usd, UsdGeom, UsdVol, Vt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("USD export needs the usd-core package (pip install 'usd-core>=26.3,<27')") from exc
    return Usd, UsdGeom, UsdVol, Vt, Sdf


def _usd_value(v):
    """customLayerData values usdc can store: lists become typed Vt arrays, dicts recurse, None is dropped."""
    from pxr import Vt

    if isinstance(v, dict):
        return {str(k): _usd_value(x) for k, x in v.items() if x is not None}
    if isinstance(v, (list, tuple, np.ndarray)):
        arr = np.asarray(v)
        if arr.dtype.kind in "iub":
            return Vt.IntArray([int(x) for x in arr.reshape(-1)])
        if arr.dtype.kind == "f":
            return Vt.DoubleArray([float(x) for x in arr.reshape(-1)])
        return Vt.StringArray([str(x) for x in arr.reshape(-1)])
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def new_stage(path: str | os.PathLike, num_frames: int, fps: float, custom: dict | None = None):
    """A new Y-up, metre-unit stage at ``path`` with time codes 0 .. num_frames-1 at ``fps``."""
    Usd, UsdGeom, _, _, _ = import_pxr()
    stage = Usd.Stage.CreateNew(str(path))
    UsdGeom.SetStageUpAxis(stage, UsdGeom.Tokens.y)
    UsdGeom.SetStageMetersPerUnit(stage, 1.0)
    stage.SetStartTimeCode(0)
    stage.SetEndTimeCode(max(num_frames - 1, 0))
    stage.SetTimeCodesPerSecond(float(fps))
    stage.SetFramesPerSecond(float(fps))
    root = UsdGeom.Xform.Define(stage, ROOT)
    stage.SetDefaultPrim(root.GetPrim())
    if custom:
        stage.GetRootLayer().customLayerData = {"stag4d": _usd_value(custom)}
    return stage


def _extent(lo: np.ndarray, hi: np.ndarray):
    from pxr import Vt

    return Vt.Vec3fArray.FromNumpy(np.stack([lo, hi]).astype(np.float32))


def write_gaussians_usd(frames: SampledFrames, path: str | os.PathLike, fps: float, custom: dict | None = None,
                        splats: bool = True, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``frames`` to ``path`` (.usdc) atomically; see the module docstring for the layout."""
    Usd, UsdGeom, UsdVol, Vt, Sdf = import_pxr()
    path = Path(path)
    T, n = frames.num_frames, frames.num_gaussians
    scales = frames.scales().astype(np.float32)                      # [T, N, 3]
    quats = frames.quats()                                           # [T, N, 4] wxyz
    quats_xyzw = np.ascontiguousarray(quats[..., [1, 2, 3, 0]])      # Vt.QuatfArray memory order is (i, j, k, real)
    opac = frames.opacities()
    # Not clipped at 1: the rasteriser composites each Gaussian's colour unclamped (a fifth of a real fit's are
    # over 1 somewhere) and clamps only the pixel; clipping here darkened Blender's render by ~8/255 (issue 19).
    colour = srgb_to_linear(frames.base_colors(), above_one=True)
    radius = scales.max(axis=2)                                      # [T, N]
    meta = dict(custom or {})
    meta.update({"num_gaussians": n, "sh_degree": frames.sh_degree, "num_frames": T,
                 "times": [float(t) for t in frames.times],
                 "widths": "2 x largest 1-sigma scale", "displayColor": "linear (sRGB-decoded SH DC colour, may exceed 1)"})
    with atomic_path(path) as tmp:
        stage = new_stage(tmp, T, fps, meta)
        pts = UsdGeom.Points.Define(stage, POINTS_PRIM)
        pv = UsdGeom.PrimvarsAPI(pts)
        vertex = UsdGeom.Tokens.vertex
        pts.CreateDisplayColorPrimvar(vertex).Set(Vt.Vec3fArray.FromNumpy(colour))
        opac_vt = Vt.FloatArray.FromNumpy(opac)
        pts.CreateDisplayOpacityPrimvar(vertex).Set(opac_vt)
        pv.CreatePrimvar("opacity", Sdf.ValueTypeNames.FloatArray, vertex).Set(opac_vt)
        scales_pv = pv.CreatePrimvar("scales", Sdf.ValueTypeNames.Float3Array, vertex)
        orient_pv = pv.CreatePrimvar("orientations", Sdf.ValueTypeNames.QuatfArray, vertex)
        widths_attr = pts.CreateWidthsAttr()
        pts.SetWidthsInterpolation(vertex)
        points_attr, extent_attr = pts.CreatePointsAttr(), pts.CreateExtentAttr()
        if splats:
            sp = UsdVol.ParticleField3DGaussianSplat.Define(stage, SPLATS_PRIM)
            sp.CreateOpacitiesAttr().Set(opac_vt)
            sp.CreateRadianceSphericalHarmonicsDegreeAttr().Set(int(frames.sh_degree))
            sh = np.concatenate([frames.f_dc.reshape(n, 1, 3), frames.f_rest.reshape(n, -1, 3)], axis=1)
            sp.CreateRadianceSphericalHarmonicsCoefficientsAttr().Set(
                Vt.Vec3fArray.FromNumpy(np.ascontiguousarray(sh.reshape(-1, 3), dtype=np.float32)))
            sp.CreateProjectionModeHintAttr().Set("perspective")
            sp.CreateSortingModeHintAttr().Set("zDepth")
            sp_pos, sp_ori, sp_sc, sp_ext = (sp.CreatePositionsAttr(), sp.CreateOrientationsAttr(),
                                             sp.CreateScalesAttr(), sp.CreateExtentAttr())
        for k in range(T):
            xyz = np.ascontiguousarray(frames.xyz[k], dtype=np.float32)
            P = Vt.Vec3fArray.FromNumpy(xyz)
            S = Vt.Vec3fArray.FromNumpy(np.ascontiguousarray(scales[k]))
            Q = Vt.QuatfArray.FromNumpy(quats_xyzw[k])
            r = radius[k]
            lo, hi, r_max = xyz.min(0), xyz.max(0), float(r.max())  # extents: conservative, no temporaries
            points_attr.Set(P, k)
            widths_attr.Set(Vt.FloatArray.FromNumpy(2.0 * r), k)
            extent_attr.Set(_extent(lo - r_max, hi + r_max), k)
            scales_pv.Set(S, k)
            orient_pv.Set(Q, k)
            if splats:
                sp_pos.Set(P, k)
                sp_ori.Set(Q, k)
                sp_sc.Set(S, k)
                sp_ext.Set(_extent(lo - 3.0 * r_max, hi + 3.0 * r_max), k)
            if progress is not None:
                progress(k + 1, T)
        stage.GetRootLayer().Save()
        del stage
    return path


__all__ = ["write_gaussians_usd", "new_stage", "import_pxr", "ROOT", "POINTS_PRIM", "SPLATS_PRIM"]
