"""Compiled CPU EWA projection (forward + hand-written backward), a drop-in for ``project_gaussians``.

``project_gaussians_cpp`` has the signature and the results of
:func:`stag4d_backend.render.projection.project_gaussians` for CPU tensors (same semantics and operation order:
bit-identical outputs on the development machine, within 1e-5 and with equal radii by the tests; see
``csrc/projection.cpp`` and ``docs/cpu_kernel.md``)::

    project_gaussians_cpp(means [N,3], quats [N,4], scales [N,3], opacities [N], viewmat [4,4], K [3,3],
                          width, height, near=0.01, far=1e10, eps2d=0.3) -> Projected

Gradients flow from ``means2d``, ``conics`` and ``depths`` to ``means``, ``quats`` and ``scales``, computed in
one compiled pass (instead of PyTorch's ~60 small ops and their autograd nodes). ``viewmat`` and ``K`` are
constants: a ``viewmat``/``K`` that requires grad raises (``rasterize`` uses the PyTorch projection then).
``opacities`` only decide the radii (no gradient, as in ``project_gaussians``); ``radii`` and ``cov2d`` are not
differentiable.

The kernel lives in the shared library of the compiled compositor (``composite_cpp.py`` builds and caches it;
``cpp_available()`` there answers for both); without it ``project_gaussians_cpp`` calls ``project_gaussians``.
float32 (what ``rasterize`` uses) runs 16/8/4 Gaussians at a time with AVX-512/AVX2/SSE2 and torch's intra-op
threads; float64 runs one Gaussian at a time (the tests use it to check the hand-written backward tightly
against autograd).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import composite_cpp as _cc
from .projection import Projected, project_gaussians

__all__ = ["project_gaussians_cpp", "projection_cpp_available"]


def projection_cpp_available() -> bool:
    """True when the compiled library is usable and holds the projection operators. Never raises."""
    try:
        if not _cc.cpp_available():
            return False
        return hasattr(torch.ops.stag4d_projection, "forward")
    except Exception:  # noqa: BLE001 - never raise from here
        return False


class _ProjectCppFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, quats, scales, opacities, viewmat, cam):
        fx, fy, cx, cy, width, height, near, far, eps2d = cam
        m2, conics, depths, radii, cov = torch.ops.stag4d_projection.forward(
            means, quats, scales, opacities, viewmat, fx, fy, cx, cy, width, height, near, far, eps2d
        )
        ctx.cam = cam
        ctx.save_for_backward(means, quats, scales, viewmat, radii)
        ctx.mark_non_differentiable(radii, cov)
        ctx.set_materialize_grads(False)  # unused outputs: None, not zero tensors (the kernel takes None)
        return m2, conics, depths, radii, cov

    @staticmethod
    @once_differentiable
    def backward(ctx, g_m2, g_conics, g_depths, _g_radii, _g_cov):
        need = ctx.needs_input_grad
        if not any(need[:3]):
            return None, None, None, None, None, None
        means, quats, scales, viewmat, radii = ctx.saved_tensors
        fx, fy, cx, cy, width, height, _near, _far, eps2d = ctx.cam
        dt = means.dtype

        def prep(g):
            return None if g is None else g.to(dt).contiguous()

        gm, gq, gs = torch.ops.stag4d_projection.backward(
            means, quats, scales, viewmat, radii, fx, fy, cx, cy, width, height, eps2d,
            prep(g_m2), prep(g_conics), prep(g_depths),
        )
        return (gm if need[0] else None, gq if need[1] else None, gs if need[2] else None, None, None, None)


def project_gaussians_cpp(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    near: float = 0.01,
    far: float = 1e10,
    eps2d: float = 0.3,
) -> Projected:
    """Compiled ``project_gaussians`` (see the module docstring) for CPU float32/float64 tensors. Falls back to
    ``project_gaussians`` when the compiled library is unavailable (``projection_cpp_available()`` is False)."""
    if not projection_cpp_available():
        return project_gaussians(means, quats, scales, opacities, viewmat, K, width, height, near=near, far=far,
                                 eps2d=eps2d)
    dtype = means.dtype
    if means.device.type != "cpu":
        raise ValueError(f"project_gaussians_cpp: CPU tensors expected (got {means.device})")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"project_gaussians_cpp: float32 or float64 expected (got {dtype})")
    if (isinstance(viewmat, Tensor) and viewmat.requires_grad) or (isinstance(K, Tensor) and K.requires_grad):
        raise ValueError("project_gaussians_cpp: viewmat and K are constants here; use project_gaussians to "
                         "differentiate with respect to the camera")
    if means.dim() != 2 or means.shape[1] != 3:
        raise ValueError(f"project_gaussians_cpp: means must have shape [N, 3] (got {list(means.shape)})")
    viewmat = torch.as_tensor(viewmat).detach().to(device="cpu", dtype=dtype).contiguous()
    fx, fy, cx, cy = (float(v) for v in (K[0, 0], K[1, 1], K[0, 2], K[1, 2]))
    cam = (fx, fy, cx, cy, int(width), int(height), float(near), float(far), float(eps2d))
    m2, conics, depths, radii, cov = _ProjectCppFn.apply(
        means.contiguous(), quats.to(dtype).contiguous(), scales.to(dtype).contiguous(),
        opacities.detach().to(dtype).contiguous(), viewmat, cam,
    )
    return Projected(means2d=m2, conics=conics, depths=depths, radii=radii, cov2d=cov)
