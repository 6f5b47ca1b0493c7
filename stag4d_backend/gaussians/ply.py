"""3DGS (Inria) PLY read/write for Gaussians (the only file I/O of ``stag4d_backend.gaussians``).

Layout: one ``vertex`` element, binary little endian, every property float32, in this order::

    x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 f_rest_0 .. f_rest_{3K-1} opacity scale_0 scale_1 scale_2 rot_0 .. rot_3

- normals are written as 0 and ignored on load;
- ``f_rest`` is channel-major like 3DGS: f_rest_{c*K + k} = coefficient k+1 of channel c (our tensors are
  [N, K, 3], coefficient-major, so they are transposed on the way in and out);
- ``opacity`` is the logit, ``scale_*`` are log-scales, ``rot_*`` the raw quaternion (w, x, y, z).

Writes are atomic: a temporary file in the destination directory, fsync, then ``os.replace``.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Union

import numpy as np

from ..atomic import atomic_path

PathLike = Union[str, "os.PathLike[str]"]


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor (any device)
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def ply_attribute_names(num_rest_coeffs: int = 0) -> list:
    """Property names in file order for K = ``num_rest_coeffs`` rest coefficients per channel."""
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(3 * num_rest_coeffs)]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    return names


def save_ply(
    path: PathLike,
    xyz,
    f_dc,
    f_rest=None,
    opacity_logit=None,
    log_scales=None,
    quats=None,
) -> None:
    """Write Gaussians in the 3DGS layout. Arrays may be numpy or torch (any device); shapes:
    xyz [N, 3]; f_dc [N, 3] or [N, 1, 3]; f_rest [N, K, 3] or None/empty; opacity_logit [N] or [N, 1];
    log_scales [N, 3]; quats [N, 4] (wxyz). ``opacity_logit``, ``log_scales`` and ``quats`` are required."""
    if opacity_logit is None or log_scales is None or quats is None:
        raise ValueError("opacity_logit, log_scales and quats are required")
    from plyfile import PlyData, PlyElement

    xyz = _np(xyz).reshape(-1, 3)
    n = xyz.shape[0]
    f_dc = _np(f_dc).reshape(n, 3)
    if f_rest is None:
        rest = np.zeros((n, 0), np.float32)
        k = 0
    else:
        fr = _np(f_rest)
        fr = fr.reshape(n, -1, 3)
        k = fr.shape[1]
        rest = np.ascontiguousarray(fr.transpose(0, 2, 1)).reshape(n, 3 * k)  # channel-major
    columns = np.concatenate(
        [
            xyz,
            np.zeros((n, 3), np.float32),
            f_dc,
            rest,
            _np(opacity_logit).reshape(n, 1),
            _np(log_scales).reshape(n, 3),
            _np(quats).reshape(n, 4),
        ],
        axis=1,
    )
    names = ply_attribute_names(k)
    assert columns.shape[1] == len(names)
    vertex = np.empty(n, dtype=[(name, "<f4") for name in names])
    for i, name in enumerate(names):
        vertex[name] = columns[:, i]
    data = PlyData([PlyElement.describe(vertex, "vertex")], text=False, byte_order="<")

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            data.write(fh)
            fh.flush()
            os.fsync(fh.fileno())


def load_ply(path: PathLike) -> Dict[str, np.ndarray]:
    """Read a 3DGS PLY into float32 arrays keyed like ``GaussianModel.params``:
    xyz [N, 3], f_dc [N, 1, 3], f_rest [N, K, 3], opacity [N, 1], scaling [N, 3], rotation [N, 4]."""
    from plyfile import PlyData

    ply = PlyData.read(os.fspath(path))
    v = ply["vertex"]
    names = [p.name for p in v.properties]

    def col(name):
        return np.asarray(v[name], dtype=np.float32)

    def group(prefix):
        found = sorted((int(nm[len(prefix):]), nm) for nm in names
                       if nm.startswith(prefix) and nm[len(prefix):].isdigit())
        return [nm for _, nm in found]

    n = len(col("x"))
    xyz = np.stack([col("x"), col("y"), col("z")], axis=1)
    f_dc = np.stack([col(f"f_dc_{i}") for i in range(3)], axis=1).reshape(n, 1, 3)
    rest_names = group("f_rest_")
    if len(rest_names) % 3:
        raise ValueError(f"{path}: {len(rest_names)} f_rest properties is not a multiple of 3")
    k = len(rest_names) // 3
    if k:
        rest = np.stack([col(nm) for nm in rest_names], axis=1).reshape(n, 3, k).transpose(0, 2, 1)
    else:
        rest = np.zeros((n, 0, 3), np.float32)
    scale_names, rot_names = group("scale_"), group("rot_")
    if len(scale_names) != 3 or len(rot_names) != 4:
        raise ValueError(f"{path}: expected scale_0..2 and rot_0..3")
    return {
        "xyz": xyz,
        "f_dc": f_dc,
        "f_rest": np.ascontiguousarray(rest),
        "opacity": col("opacity").reshape(n, 1),
        "scaling": np.stack([col(nm) for nm in scale_names], axis=1),
        "rotation": np.stack([col(nm) for nm in rot_names], axis=1),
    }


def save_model_ply(path: PathLike, model, params: Optional[dict] = None) -> None:
    """``save_ply`` of a ``GaussianModel`` (or of ``params``, a mapping with the same keys, e.g. deformed values)."""
    p = params if params is not None else model.params
    save_ply(path, p["xyz"], p["f_dc"], p["f_rest"], p["opacity"], p["scaling"], p["rotation"])


def load_model_ply(path: PathLike, device=None):
    """A ``GaussianModel`` from a 3DGS PLY (SH degree from the number of f_rest properties)."""
    from .model import GaussianModel

    d = load_ply(path)
    return GaussianModel.from_arrays(d["xyz"], d["f_dc"], d["f_rest"], d["opacity"], d["scaling"], d["rotation"],
                                     device=device)


__all__ = ["save_ply", "load_ply", "save_model_ply", "load_model_ply", "ply_attribute_names"]
