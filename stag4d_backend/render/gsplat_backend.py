"""CUDA path through gsplat (>= 1.5, < 1.6), classic mode, RGB + expected depth.

gsplat is imported lazily so this module can be imported (and the rest of the package used) on machines
without gsplat or CUDA. We call gsplat's lower-level ops instead of ``gsplat.rasterization`` so that the
``means2d`` tensor we return is the one the compositing consumes (``means2d.grad`` is then populated by
``backward``; gsplat's ``meta["means2d"]`` has a camera dimension, and a slice of it would not receive a
gradient). The sequence is exactly what ``gsplat.rasterization(..., packed=False, rasterize_mode="classic",
render_mode="RGB+ED")`` runs for one camera.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GsplatStatus:
    usable: bool
    version: str | None   # gsplat.__version__ when it imports
    reason: str           # why it is not usable ("" when it is)


_STATUS: GsplatStatus | None = None


def gsplat_status(refresh: bool = False) -> GsplatStatus:
    """Whether gsplat's CUDA rasteriser can run here: a CUDA device, gsplat importable, and its CUDA extension
    loaded (a prebuilt wheel, or gsplat's JIT build, which needs nvcc and takes minutes the first time).
    Computed once per process."""
    global _STATUS
    if _STATUS is not None and not refresh:
        return _STATUS
    version = None
    if not torch.cuda.is_available():
        _STATUS = GsplatStatus(False, None, "no CUDA device")
        return _STATUS
    try:
        import gsplat

        version = str(getattr(gsplat, "__version__", "unknown"))
    except Exception as exc:  # ImportError, or a broken install
        _STATUS = GsplatStatus(False, None, f"gsplat is not installed ({type(exc).__name__}: {exc})")
        return _STATUS
    try:
        from gsplat.cuda._backend import _C  # imports the prebuilt extension or JIT-builds it
    except Exception as exc:  # noqa: BLE001 - any build/load failure means the same fallback
        _C, why = None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    else:
        why = "the build returned nothing (no CUDA toolkit / nvcc?)"
    if _C is None:
        _STATUS = GsplatStatus(False, version, f"gsplat {version}'s CUDA code could not be built or loaded ({why})")
    else:
        _STATUS = GsplatStatus(True, version, "")
    return _STATUS


def gsplat_available() -> bool:
    """True when gsplat's CUDA rasteriser can run here (see gsplat_status)."""
    return gsplat_status().usable


def _import_gsplat_ops():
    try:
        from gsplat.cuda._wrapper import (
            fully_fused_projection,
            isect_offset_encode,
            isect_tiles,
            rasterize_to_pixels,
        )
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "backend='gsplat' needs the gsplat package (pip install 'gsplat>=1.5,<1.6', "
            "or `pip install stag4d-backend[cuda]`) and a CUDA build of torch"
        ) from exc
    return fully_fused_projection, isect_tiles, isect_offset_encode, rasterize_to_pixels


def rasterize_gsplat(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    near: float,
    far: float,
    eps2d: float,
    tile_size: int = 16,
    depth_squared: bool = False,
):
    """Returns (image [H, W, 4] = RGB + accumulated depth (+ accumulated depth squared with ``depth_squared``:
    [H, W, 5]), alpha [H, W], means2d [N, 2], radii [N, 2], depths [N]); no background, depth not yet normalised
    (same as ``composite_torch``'s output)."""
    if not means.is_cuda:
        raise RuntimeError("backend='gsplat' needs CUDA tensors (gsplat's rasteriser has no CPU kernel)")
    fully_fused_projection, isect_tiles, isect_offset_encode, rasterize_to_pixels = _import_gsplat_ops()
    if means.dtype != torch.float32:
        raise RuntimeError("backend='gsplat' supports float32 only")
    viewmats = viewmat.to(means)[None].contiguous()  # [1, 4, 4]
    Ks = K.to(means)[None].contiguous()  # [1, 3, 3]

    radii, means2d, depths, conics, _ = fully_fused_projection(
        means, None, quats, scales, viewmats, Ks, width, height,
        eps2d=eps2d, near_plane=near, far_plane=far, radius_clip=0.0, packed=False,
        sparse_grad=False, calc_compensations=False, camera_model="pinhole", opacities=opacities,
    )  # radii [1, N, 2], means2d [1, N, 2], depths [1, N], conics [1, N, 3]

    # The [N, 2] tensor we hand back is upstream of the view given to the rasteriser: its .grad fills in.
    means2d_n = means2d[0]
    if means2d_n.requires_grad:
        means2d_n.retain_grad()
    depths_n = depths[0]

    z = depths_n[:, None]
    features = torch.cat([colors, z] + ([z * z] if depth_squared else []), dim=-1)  # RGB + depth (+ depth^2)
    tile_width = math.ceil(width / float(tile_size))
    tile_height = math.ceil(height / float(tile_size))
    _, isect_ids, flatten_ids = isect_tiles(
        means2d_n[None], radii, depths, tile_size, tile_width, tile_height, packed=False
    )
    isect_offsets = isect_offset_encode(isect_ids, 1, tile_width, tile_height).reshape(1, tile_height, tile_width)
    image, alpha = rasterize_to_pixels(
        means2d_n[None], conics, features[None], opacities[None], width, height, tile_size,
        isect_offsets, flatten_ids, backgrounds=None, packed=False, absgrad=False,
    )  # [1, H, W, 4], [1, H, W, 1]
    return image[0], alpha[0, ..., 0], means2d_n, radii[0], depths_n
