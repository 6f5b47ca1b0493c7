"""glTF 2.0 binary files (.glb) with the Khronos ``KHR_gaussian_splatting`` extension (pygltflib), one per frame.

The extension defines no animation, so a 4D asset is a sequence: ``gltf/{k:04d}.glb`` holds output frame k (same
Gaussians in the same order in every frame, as the PLYs), and ``canonical.glb`` the fit's canonical Gaussians.

Each file: one scene, one node ("STAG4D"), one mesh with one primitive, ``mode`` POINTS (0), no indices, no
material. Coordinates: the project's world as it is, which is glTF's: Y up, metres, right-handed, the asset's
front (the input view's side) facing +Z. Attributes, one tightly packed bufferView each (4-byte aligned):

=========================================== ====== ================= ==========================================
attribute                                   type   component         value
=========================================== ====== ================= ==========================================
``POSITION``                                VEC3   float             centre (min / max given, as glTF requires)
``KHR_gaussian_splatting:ROTATION``         VEC4   float             unit quaternion, (x, y, z, w) order
``KHR_gaussian_splatting:SCALE``            VEC3   float             linear 1-sigma scales (exp of the PLY's)
``KHR_gaussian_splatting:OPACITY``          SCALAR float             sigmoid of the PLY's logit, in [0, 1]
``KHR_gaussian_splatting:SH_DEGREE_0_COEF_0`` VEC3 float             f_dc (r, g, b) as in the PLY
``KHR_gaussian_splatting:SH_DEGREE_l_COEF_n`` VEC3 float             f_rest coefficient l^2 - 1 + n, for every
                                                                     n of every degree 1..d (none partial)
``COLOR_0``                                 VEC4   unsigned short    fallback for plain viewers: linear RGB of
                                                   normalized        clamp(0.5 + C0 f_dc, 0, 1) (sRGB-decoded),
                                                                     alpha = opacity
=========================================== ====== ================= ==========================================

The primitive's extension object: ``kernel`` "ellipse", ``colorSpace`` "srgb_rec709_display" (the fit is trained
against sRGB-encoded images: display-referred sRGB), ``projection`` "perspective", ``sortingMethod``
"cameraDistance". The extension is listed in ``extensionsUsed`` only, never in ``extensionsRequired``: a viewer
without it still loads the file and draws coloured points. SH order within a degree is m = -l .. l, which is the
3DGS order of ``f_rest`` (the spec's basis carries the Condon-Shortley phase, as 3DGS's constants do).
``asset.extras`` records the frame, its time t = k / num_frames, fps and the Blender mapping.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..atomic import atomic_dir, atomic_path
from .frames import SH_C0, SampledFrames, srgb_to_linear

EXTENSION = "KHR_gaussian_splatting"
FLOAT, UNSIGNED_SHORT = 5126, 5123
ARRAY_BUFFER = 34962
POINTS = 0
COLOR_SPACE = "srgb_rec709_display"


def sh_attribute_names(sh_degree: int) -> list[str]:
    """Attribute semantics of the SH coefficients in f_dc + f_rest order (degree 0 first, m = -l .. l)."""
    return [f"{EXTENSION}:SH_DEGREE_{l}_COEF_{n}" for l in range(sh_degree + 1) for n in range(2 * l + 1)]


def _unit_quats_xyzw(rotation_wxyz: np.ndarray) -> np.ndarray:
    """Raw (w, x, y, z) quaternions -> unit (x, y, z, w) float32 (a zero quaternion becomes the identity)."""
    q = np.asarray(rotation_wxyz, dtype=np.float32)
    n = np.linalg.norm(q, axis=-1, keepdims=True)
    q = q / np.maximum(n, 1e-12)
    q[..., 0] = np.where(n[..., 0] < 1e-12, 1.0, q[..., 0])
    return np.ascontiguousarray(q[..., [1, 2, 3, 0]], dtype=np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))).astype(np.float32)


class SplatGlbWriter:
    """Encodes frames of one fit: the static attributes (opacity, SH, COLOR_0) are packed once, per frame only
    POSITION, ROTATION and SCALE change. ``glb(xyz, rotation, scaling, extras)`` -> the .glb bytes."""

    def __init__(self, f_dc: np.ndarray, f_rest: np.ndarray, opacity_logit: np.ndarray):
        n = int(np.asarray(f_dc).reshape(-1, 3).shape[0])
        f_dc = np.asarray(f_dc, dtype=np.float32).reshape(n, 1, 3)
        f_rest = np.asarray(f_rest, dtype=np.float32).reshape(n, -1, 3)
        sh = np.concatenate([f_dc, f_rest], axis=1)  # [N, (d+1)^2, 3]
        self.n = n
        self.sh_degree = int(round(np.sqrt(sh.shape[1]))) - 1
        if (self.sh_degree + 1) ** 2 != sh.shape[1] or self.sh_degree > 3:
            raise ValueError(f"{sh.shape[1]} SH coefficients per colour: not a complete degree 0..3")
        opacity = _sigmoid(opacity_logit).reshape(n)
        rgb = srgb_to_linear(np.clip(0.5 + SH_C0 * f_dc.reshape(n, 3), 0.0, 1.0))
        color = np.round(np.concatenate([rgb, opacity[:, None]], axis=1).astype(np.float64) * 65535.0)
        # (semantic, type, component type, normalized, bytes) of the static attributes, in buffer order
        self.static = [(f"{EXTENSION}:OPACITY", "SCALAR", FLOAT, False, opacity.tobytes())]
        self.static += [(name, "VEC3", FLOAT, False, np.ascontiguousarray(sh[:, i]).tobytes())
                        for i, name in enumerate(sh_attribute_names(self.sh_degree))]
        self.static.append(("COLOR_0", "VEC4", UNSIGNED_SHORT, True, color.astype("<u2").tobytes()))
        self._static_blob = b"".join(s[4] for s in self.static)

    def document(self, position_min, position_max, extras: dict | None = None):
        """The pygltflib document (no binary blob yet) for one frame."""
        import pygltflib as g

        n = self.n
        layout = [("POSITION", "VEC3", FLOAT, False, 12 * n), (f"{EXTENSION}:ROTATION", "VEC4", FLOAT, False, 16 * n),
                  (f"{EXTENSION}:SCALE", "VEC3", FLOAT, False, 12 * n)]
        layout += [(name, typ, comp, norm, len(data)) for name, typ, comp, norm, data in self.static]
        views, accessors, attributes, offset = [], [], {}, 0
        for i, (name, typ, comp, norm, size) in enumerate(layout):
            views.append(g.BufferView(buffer=0, byteOffset=offset, byteLength=size, target=ARRAY_BUFFER))
            acc = g.Accessor(bufferView=i, componentType=comp, count=n, type=typ, normalized=True if norm else None)
            if name == "POSITION":
                acc.min = [float(v) for v in position_min]
                acc.max = [float(v) for v in position_max]
            accessors.append(acc)
            attributes[name] = i
            offset += size  # every size is a multiple of 4: views stay 4-byte aligned
        prim = g.Primitive(attributes=g.Attributes(**attributes), mode=POINTS, extensions={EXTENSION: {
            "kernel": "ellipse", "colorSpace": COLOR_SPACE, "projection": "perspective",
            "sortingMethod": "cameraDistance"}})
        return g.GLTF2(
            asset=g.Asset(version="2.0", generator=f"STAG4D for Blender {__version__}", extras=extras or None),
            extensionsUsed=[EXTENSION], scene=0, scenes=[g.Scene(nodes=[0])],
            nodes=[g.Node(name="STAG4D", mesh=0)], meshes=[g.Mesh(name="gaussians", primitives=[prim])],
            accessors=accessors, bufferViews=views, buffers=[g.Buffer(byteLength=offset)])

    def glb(self, xyz: np.ndarray, rotation: np.ndarray, scaling: np.ndarray, extras: dict | None = None) -> bytes:
        """One frame: ``xyz`` [N, 3], raw ``rotation`` [N, 4] (w, x, y, z), log-``scaling`` [N, 3] (PLY layout)."""
        xyz = np.ascontiguousarray(xyz, dtype=np.float32).reshape(self.n, 3)
        if not np.isfinite(xyz).all():
            raise ValueError("non-finite Gaussian centres; the fit is broken")
        quats = _unit_quats_xyzw(np.asarray(rotation).reshape(self.n, 4))
        scales = np.exp(np.asarray(scaling, dtype=np.float32).reshape(self.n, 3))
        doc = self.document(xyz.min(axis=0), xyz.max(axis=0), extras)
        doc.set_binary_blob(xyz.tobytes() + quats.tobytes() + scales.tobytes() + self._static_blob)
        return b"".join(doc.save_to_bytes())  # pygltflib lays out the GLB container (header, JSON, BIN chunks)


def frame_file_name(k: int) -> str:
    return f"{k:04d}.glb"


def _extras(custom: dict | None, **more) -> dict:
    out = {k: v for k, v in (custom or {}).items() if isinstance(v, (str, int, float, bool))}
    out.update(more)
    return out


def write_gltf_sequence(frames: SampledFrames, out_dir: str | os.PathLike, fps: float, custom: dict | None = None,
                        progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """``out_dir/{k:04d}.glb`` for every output frame (the folder is replaced as a whole). Returns the paths."""
    out_dir = Path(out_dir)
    writer = SplatGlbWriter(frames.f_dc, frames.f_rest, frames.opacity)
    T = frames.num_frames
    with atomic_dir(out_dir) as tmp:
        for k in range(T):
            extras = _extras(custom, frame=k, num_frames=T, time=float(frames.times[k]), fps=float(fps))
            (tmp / frame_file_name(k)).write_bytes(writer.glb(frames.xyz[k], frames.rotation[k], frames.scaling[k],
                                                              extras))
            if progress is not None:
                progress(k + 1, T)
    return [out_dir / frame_file_name(k) for k in range(T)]


def write_canonical_glb(params: dict, path: str | os.PathLike, custom: dict | None = None) -> Path:
    """The canonical (undeformed) Gaussians, ``params`` in the raw PLY layout (keys of ``GaussianModel.params``)."""
    def np32(x):
        return np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float32)

    writer = SplatGlbWriter(np32(params["f_dc"]), np32(params["f_rest"]), np32(params["opacity"]))
    data = writer.glb(np32(params["xyz"]), np32(params["rotation"]), np32(params["scaling"]),
                      _extras(custom, frame="canonical"))
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


__all__ = ["SplatGlbWriter", "write_gltf_sequence", "write_canonical_glb", "sh_attribute_names", "EXTENSION",
           "frame_file_name"]
