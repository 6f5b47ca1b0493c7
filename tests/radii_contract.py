"""The radii contract between two projection backends (docs/rasterizer.md, "Radii").

A radius is ``ceil(extend * sqrt(cov2d))``. Two backends compute ``cov2d`` and ``log`` with different, equally
correct float rounding (the compiled kernel's scalar ``std::log`` and fixed operation order, PyTorch's
vectorised math, whose BLAS and SLEEF code paths depend on the CPU model), so the radii may differ by one
where the unrounded value lies within a few ulps of an integer, and only there. A Gaussian whose box then just
touches the image border may be drawn by one backend and culled by the other. Everything else (images, alphas,
depths, gradients) is still asserted to 1e-5 by the tests that use this.
"""

from __future__ import annotations

import torch

from stag4d_backend.render.projection import project_gaussians, unrounded_radii

# float32 cov2d comes from a chain of ~30 operations: a few ulps (1.2e-7 each) of relative error at most.
REL_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def exact_radii(means, quats, scales, opacities, viewmat, K, width, height, **kw) -> torch.Tensor:
    """[N, 2] unrounded radii in float64 (the value both backends round up)."""
    d = torch.float64
    p = project_gaussians(means.detach().to(d), quats.detach().to(d), scales.detach().to(d),
                          opacities.detach().to(d), viewmat.to(d), K.to(d), width, height, **kw)
    return unrounded_radii(opacities.detach().to(d), p.cov2d[:, 0], p.cov2d[:, 2])


def radii_disagreements(a, b, exact, means2d, width, height, dtype=torch.float32) -> list[str]:
    """Why radii ``a`` and ``b`` (both [N, 2], or both [N] = max of x/y) break the contract; [] if they keep it.

    ``exact``: [N, 2] from :func:`exact_radii`; ``means2d``: [N, 2] pixel centres (of either backend)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    tol = REL_TOL[dtype]
    near_int = (exact - exact.round()).abs() <= tol * exact.abs().clamp_min(1.0)  # [N, 2]
    rows_a = a if a.dim() == 2 else a[:, None]
    rows_b = b if b.dim() == 2 else b[:, None]
    problems = []
    for i in (rows_a != rows_b).any(-1).nonzero().flatten().tolist():
        ra, rb = rows_a[i].tolist(), rows_b[i].tolist()
        what = f"Gaussian {i}: {ra} vs {rb}, unrounded {exact[i].tolist()}"
        if not bool(near_int[i].any()):
            problems.append(f"{what}: not at an integer boundary")
            continue
        culled_a, culled_b = all(r == 0 for r in ra), all(r == 0 for r in rb)
        if culled_a != culled_b and float(exact[i].abs().max()) <= tol:
            continue  # both radii ~0: "culled when both radii are 0" flips with the rounding
        if culled_a != culled_b:
            # drawn by one side only: its box must be within one pixel of leaving the image
            rx, ry = (exact[i].ceil()).tolist()
            mx, my = means2d[i].tolist()
            edge = min(mx + rx, width - (mx - rx), my + ry, height - (my - ry))
            if edge > 1.0 + 1e-3:
                problems.append(f"{what}: drawn by one backend only, box {edge:.3f} px inside the image")
        elif any(abs(x - y) > 1 for x, y in zip(ra, rb)):
            problems.append(f"{what}: differ by more than one")
    return problems


def assert_radii_agree(a, b, exact, means2d, width, height, dtype=torch.float32):
    problems = radii_disagreements(a, b, exact, means2d, width, height, dtype)
    assert not problems, "radii differ beyond rounding at integer boundaries:\n" + "\n".join(problems[:10])


def same_culling(a, b) -> torch.Tensor:
    """[N] bool: Gaussians both backends drew, or both culled (compare their other outputs only there)."""
    ra = a if a.dim() == 2 else a[:, None]
    rb = b if b.dim() == 2 else b[:, None]
    return (ra == 0).all(-1) == (rb == 0).all(-1)
