"""The public rasteriser: one camera, RGB + alpha + expected depth, differentiable.

``rasterize`` reproduces gsplat 1.5 ``rasterization(..., rasterize_mode="classic", render_mode="RGB+ED")``
for one pinhole camera, with the background composited as ``rgb + (1 - alpha) * background``. See
``docs/rasterizer.md`` for the semantics and the backends.

Backends (``backend=``):

* ``"auto"``: CUDA tensors -> ``"gsplat"`` when gsplat's CUDA code is usable here, otherwise ``"torch"`` on
  CUDA with one warning per process (gsplat absent, or its CUDA extension cannot be built); CPU -> ``"cpp"``
  when the compiled compositor is importable, available and the dtype is float32, otherwise ``"torch"``.
* ``"torch"``: EWA projection in PyTorch (``projection.py``) + tiled PyTorch compositor
  (``composite_torch.py``). Any device, float32 or float64.
* ``"cpp"``: the compiled CPU projection ``projection_cpp.project_gaussians_cpp`` (same results as
  ``projection.py``, hand-written backward) + the compiled CPU compositor ``composite_cpp.composite_cpp`` (same
  contract as ``composite_torch``), both from one shared library. float32 only (float64 inputs, or a
  ``viewmat``/``K`` that requires grad, use the PyTorch projection). RuntimeError if it is not available.
* ``"gsplat"``: gsplat's CUDA kernels (``gsplat_backend.py``).
* ``"reference"``: same projection + the dense reference compositor (``reference.py``); tests only, slow.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .composite_torch import composite_torch
from .projection import project_gaussians

BACKENDS = ("auto", "torch", "cpp", "gsplat", "reference")


@dataclass
class RasterResult:
    rgb: Tensor  # [H, W, 3] composited over the background
    alpha: Tensor  # [H, W] accumulated opacity
    depth: Tensor  # [H, W] expected depth (camera z), 0 where nothing was drawn
    means2d: Tensor  # [N, 2] pixel coordinates; .grad is populated by backward when it requires grad
    radii: Tensor  # [N] int32, max of the x/y radii in pixels, 0 = not drawn
    backend: str = "torch"  # the backend that actually ran
    # [H, W] spread of the blending weights w along each ray: sum w z^2 - (sum w z)^2 / alpha, i.e. alpha x the
    # weighted variance of camera z (0 for one thin layer); only with ``depth_spread=True``, else None.
    depth_spread: Optional[Tensor] = None


def _load_cpp() -> Union[Callable, None]:
    """The compiled compositor if importable and usable, else None."""
    try:
        from .composite_cpp import composite_cpp, cpp_available  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        if not cpp_available():
            return None
    except Exception:
        return None
    return composite_cpp


def cpp_compositor_available() -> bool:
    return _load_cpp() is not None


def _project_cpp() -> Union[Callable, None]:
    """The compiled projection (same shared library as the compiled compositor) if usable, else None."""
    try:
        from .projection_cpp import project_gaussians_cpp, projection_cpp_available
    except ImportError:
        return None
    return project_gaussians_cpp if projection_cpp_available() else None


def _cpp_projection_for(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, viewmat, K):
    """The compiled projection if backend "cpp" can use it for these inputs, else None (then projection.py runs):
    float32 CPU Gaussians, and a camera that does not require grad (the compiled projection treats viewmat and K
    as constants)."""
    for t in (means, quats, scales, opacities):
        if not isinstance(t, Tensor) or t.dtype != torch.float32 or t.device.type != "cpu":
            return None
    if any(isinstance(t, Tensor) and t.requires_grad for t in (viewmat, K)):
        return None
    return _project_cpp()


class GsplatFallbackWarning(RuntimeWarning):
    """gsplat cannot run on this CUDA machine; the PyTorch rasteriser runs on CUDA instead."""


_warned_fallback = False


def _cuda_auto_backend() -> str:
    """"gsplat" if its CUDA code is usable, else "torch" (on CUDA) with one warning per process."""
    global _warned_fallback
    from .gsplat_backend import gsplat_status

    st = gsplat_status()
    if st.usable:
        return "gsplat"
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"{st.reason}: rendering with the project's PyTorch rasteriser on CUDA instead (same "
                      f"results, slower; install gsplat>=1.5,<1.6 with a CUDA toolkit for speed, see `stag4d "
                      f"doctor`)", GsplatFallbackWarning, stacklevel=3)
    return "torch"


def available_backends() -> list[str]:
    """The backends that can run on this machine, best first for their device (for ``stag4d doctor``).
    May build the compiled CPU kernel on first use (see docs/cpu_kernel.md)."""
    from .gsplat_backend import gsplat_available

    names = []
    if gsplat_available():
        names.append("gsplat")
    if cpp_compositor_available():
        names.append("cpp")
    names.append("torch")
    return names


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Which backend ``rasterize`` would run for these tensors (raises for impossible requests)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown rasterizer backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cuda":
            return _cuda_auto_backend()
        if dtype == torch.float32 and _load_cpp() is not None:
            return "cpp"
        return "torch"
    if backend == "gsplat" and device.type == "cuda":
        from .gsplat_backend import gsplat_status

        st = gsplat_status()
        if not st.usable:
            raise RuntimeError(f"backend='gsplat' was requested but {st.reason}; use backend='auto' (the PyTorch "
                               f"rasteriser on CUDA) or install gsplat>=1.5,<1.6 with a CUDA toolkit")
    if backend == "cpp" and _load_cpp() is None:
        raise RuntimeError(
            "backend='cpp' was requested but the compiled CPU compositor is not available "
            "(stag4d_backend.render.composite_cpp is missing, failed to build, or cpp_available() is False); "
            "use backend='torch' or 'auto'"
        )
    return backend


def _as_tensor(x, device, dtype) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(device=device, dtype=dtype)
    return torch.as_tensor(x, device=device, dtype=dtype)


def rasterize(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    background: Union[Tensor, Sequence[float]],
    *,
    near: float = 0.01,
    far: float = 1e10,
    eps2d: float = 0.3,
    backend: str = "auto",
    depth_spread: bool = False,
) -> RasterResult:
    """Render N 3D Gaussians with one pinhole camera.

    Args:
        means [N, 3] world positions; quats [N, 4] (w, x, y, z), need not be normalised; scales [N, 3]
        linear; opacities [N] in 0..1; colors [N, 3] in 0..1; viewmat [4, 4] world->camera (OpenCV: x right,
        y down, z forward); K [3, 3] pinhole intrinsics; width, height in pixels; background [3].
    Returns:
        RasterResult(rgb [H, W, 3], alpha [H, W], depth [H, W], means2d [N, 2], radii [N] int32, backend,
        depth_spread [H, W] when ``depth_spread``: one more composited channel, camera z squared).
    """
    width, height = int(width), int(height)
    device, dtype = means.device, means.dtype
    which = resolve_backend(backend, device, dtype)
    bg = _as_tensor(background, device, dtype).reshape(3)

    if which == "gsplat":
        from .gsplat_backend import rasterize_gsplat

        image, alpha, means2d, radii_xy, _ = rasterize_gsplat(
            means, quats, scales, opacities, colors, viewmat, K, width, height, near, far, eps2d,
            depth_squared=depth_spread,
        )
    else:
        project = None
        if which == "cpp":
            project = _cpp_projection_for(means, quats, scales, opacities, viewmat, K)
        if project is None:  # "torch", "reference", and "cpp" with float64 inputs or a camera requiring grad
            project = project_gaussians
        proj = project(means, quats, scales, opacities, viewmat, K, width, height, near=near, far=far, eps2d=eps2d)
        means2d = proj.means2d
        if means2d.requires_grad:
            means2d.retain_grad()
        radii_xy = proj.radii
        z = proj.depths[:, None]
        features = torch.cat([colors.to(dtype), z] + ([z * z] if depth_spread else []), dim=-1)  # RGB, z (, z^2)
        if which == "torch":
            compositor = composite_torch
        elif which == "cpp":
            compositor = _load_cpp()
        else:  # reference
            from .reference import composite_reference as compositor
        image, alpha = compositor(means2d, proj.conics, features, opacities.to(dtype), proj.depths,
                                  radii_xy, width, height)

    rgb = image[..., :3] + (1.0 - alpha)[..., None] * bg
    depth = image[..., 3] / alpha.clamp_min(1e-10)
    radii = radii_xy.max(dim=-1).values.to(torch.int32)
    spread = (image[..., 4] - image[..., 3] * depth).clamp_min(0.0) if depth_spread else None
    return RasterResult(rgb=rgb, alpha=alpha, depth=depth, means2d=means2d, radii=radii, backend=which,
                        depth_spread=spread)


__all__ = ["rasterize", "RasterResult", "resolve_backend", "available_backends", "cpp_compositor_available",
           "GsplatFallbackWarning", "BACKENDS"]
