"""How far two correct float implementations of the EWA projection may differ, Gaussian by Gaussian.

The first step of the projection, ``p = R @ mean + t``, loses up to a few ulps of ``|R| @ |mean| + |t|`` in each
camera-space coordinate. For a Gaussian close to the camera plane that is a large *relative* error of ``p.z``
(a world point 2 units away at z = 0.003: cancellation), and the outputs divide by z and z^2, so two backends
that sum the product in a different order (PyTorch's BLAS picks its kernels by CPU model, the compiled kernel
has one fixed order) can differ by 1e-3 px in float32 without either being wrong. Asserting 1e-5 there tests
the CPU, not the code.

:func:`projection_slack` measures that conditioning instead of guessing it: the float64 projection is run with
the camera-space point moved by its rounding bound in each of the 8 sign patterns, and the largest change of
each output is the slack of that Gaussian. It is tiny (far below 1e-5) for every well-conditioned Gaussian, so
the tests stay as strict as before everywhere the float arithmetic allows it.
"""

from __future__ import annotations

import itertools

import torch

from stag4d_backend.render.projection import project_gaussians

OUTPUTS = ("means2d", "conics", "depths", "cov2d")
# p = R @ mean + t is 3 products and 3 sums per coordinate: ~3 ulps worst case; 4 for the conversion of R, t.
ULPS = 4.0


def _slack(run, means, viewmat, dtype, names) -> dict:
    """{name: the largest |change| of ``getattr(run(means64), name)``} over the 8 sign patterns of moving every
    Gaussian's camera-space position by ``ULPS`` ulps of ``dtype`` of its summands (float64 throughout)."""
    m, V = means.detach().to(torch.float64), viewmat.detach().to(torch.float64)
    R, t = V[:3, :3], V[:3, 3]
    bound = ULPS * torch.finfo(dtype).eps * (m.abs() @ R.abs().T + t.abs())  # [N, 3] camera-space rounding bound
    base = run(m)
    slack = {name: torch.zeros_like(getattr(base, name)) for name in names}
    for signs in itertools.product((-1.0, 1.0), repeat=3):
        moved = run(m + (bound * torch.tensor(signs, dtype=torch.float64)) @ R)  # R orthonormal: R^T dp
        for name in names:
            diff = (getattr(moved, name) - getattr(base, name)).abs()
            slack[name] = torch.maximum(slack[name], torch.nan_to_num(diff, nan=0.0, posinf=0.0))
    return slack


def projection_slack(means, quats, scales, opacities, viewmat, K, width, height, dtype, **kw) -> dict:
    """{output name: tensor shaped like that output}: the change of each output (float64) when the camera-space
    position of each Gaussian moves by ``ULPS`` ulps of ``dtype`` of its summands, worst of the 8 sign patterns."""
    q, s, o, V, K = (x.detach().to(torch.float64) for x in (quats, scales, opacities, viewmat, K))
    return _slack(lambda m: project_gaussians(m, q, s, o, V, K, width, height, **kw), means, viewmat, dtype, OUTPUTS)


def render_slack(means, quats, scales, opacities, colors, viewmat, K, width, height, background, dtype,
                 **kw) -> dict:
    """The same for a whole render: {"rgb", "alpha", "depth", "means2d": the largest change of each pixel / centre
    (float64, PyTorch rasteriser) when every Gaussian's camera-space position moves by its rounding bound}."""
    from stag4d_backend.render import rasterize

    q, s, o, c, V, K = (x.detach().to(torch.float64) for x in (quats, scales, opacities, colors, viewmat, K))
    return _slack(lambda m: rasterize(m, q, s, o, c, V, K, width, height, background, backend="torch", **kw),
                  means, viewmat, dtype, ("rgb", "alpha", "depth", "means2d"))


def assert_close_with_slack(actual, expected, tol, slack, name=""):
    """Elementwise ``|actual - expected| <= tol + tol * |expected| + 2 * slack`` (each side may be off by the
    slack); NaN only where both are NaN."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
    a, e, sl = actual.to(torch.float64), expected.to(torch.float64), slack.to(torch.float64)
    both_nan = a.isnan() & e.isnan()
    err = (a - e).abs()
    allowed = tol + tol * e.abs() + 2.0 * sl
    bad = ~both_nan & ~(err <= allowed)
    if bool(bad.any()):
        over = torch.where(bad, err - allowed, torch.full_like(err, -1.0)).flatten()
        i = int(over.argmax())
        raise AssertionError(
            f"{name}: {int(bad.sum())} / {bad.numel()} elements off; worst flat index {i}: "
            f"{a.flatten()[i].item()!r} vs {e.flatten()[i].item()!r} (allowed {allowed.flatten()[i].item():.3g}, "
            f"slack {sl.flatten()[i].item():.3g})")
