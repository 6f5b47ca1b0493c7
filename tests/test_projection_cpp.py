"""The compiled CPU EWA projection (stag4d_backend.render.projection_cpp) against the PyTorch projection.

* forward: means2d, conics, depths, cov2d within 1e-5 of ``project_gaussians`` and radii equal up to the rounding
  contract of tests/radii_contract.py (off by one only where the unrounded radius is at an integer), in float32
  (what rasterize uses) and float64, on scenes with Gaussians behind the camera, at the near and far planes, far
  off screen (the Jacobian clamp on both sides), needles, unnormalised quaternions, tiny and huge scales and
  opacities below, at and just above 1/255;
* backward: gradients w.r.t. means, quats and scales of a random linear functional of all outputs against
  autograd through ``project_gaussians`` (float32 to 1e-4 of the largest gradient, float64 to 1e-10);
* rasterize(backend="cpp") (compiled projection + compiled compositor) against rasterize(backend="torch"):
  images, input gradients and means2d.grad; the dispatch rules; the fallback.

Everything is skipped, with the reason, when the compiled library cannot be built here.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import stag4d_backend.render.composite_cpp as cc
import stag4d_backend.render.projection_cpp as pc
from stag4d_backend.render import rasterize
from stag4d_backend.render.projection import project_gaussians
from stag4d_backend.render.projection_cpp import project_gaussians_cpp, projection_cpp_available

from float_slack import OUTPUTS, assert_close_with_slack, projection_slack, render_slack
from radii_contract import assert_radii_agree, exact_radii, same_culling

raster_mod = importlib.import_module("stag4d_backend.render.rasterize")
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not projection_cpp_available(), reason=f"compiled CPU kernels unavailable: {cc.cpp_unavailable_reason()}"
)

F32, F64 = torch.float32, torch.float64


# ------------------------------------------------------------------------------------------------ scenes
def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0), dtype=F32) -> torch.Tensor:
    """World->camera matrix, OpenCV convention (x right, y down, z forward)."""
    eye = torch.tensor(eye, dtype=F64)
    f = torch.tensor(target, dtype=F64) - eye
    f = f / f.norm()
    r = torch.linalg.cross(f, torch.tensor(up, dtype=F64))
    r = r / r.norm()
    d = torch.linalg.cross(f, r)
    R = torch.stack([r, d, f])
    V = torch.eye(4, dtype=F64)
    V[:3, :3] = R
    V[:3, 3] = -R @ eye
    return V.to(dtype)


def intrinsics(width, height, fovy_deg=49.1, fx_scale=1.0, shift=(0.0, 0.0), dtype=F32):
    f = 0.5 * height / math.tan(math.radians(fovy_deg) / 2)
    return torch.tensor([[f * fx_scale, 0, width / 2 + shift[0]], [0, f, height / 2 + shift[1]], [0, 0, 1]],
                        dtype=dtype)


CAMERAS = [
    # (eye, (W, H), fx scale, principal point shift)
    ((0.0, 0.0, 2.0), (64, 48), 1.0, (0.0, 0.0)),
    ((1.2, 0.8, -1.4), (40, 56), 1.2, (3.5, -2.0)),
    ((-1.7, -0.6, 0.9), (37, 29), 0.9, (0.0, 0.0)),
    ((0.3, 2.1, 0.2), (128, 96), 0.7, (-9.0, 6.0)),  # looking down (up vector nearly along the view)
]


def scene(seed: int, n: int, viewmat: torch.Tensor, dtype=F32):
    """Means, quats, scales, opacities with every special case of the projection represented."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=g, dtype=F64)  # noqa: E731
    means = (rand(n, 3) * 2 - 1) * 0.9
    c2w = torch.linalg.inv(viewmat.to(F64))
    k = n // 12

    def place(i0, pcam):  # put Gaussians i0.. at the given camera-space positions
        means[i0:i0 + pcam.shape[0]] = pcam @ c2w[:3, :3].T + c2w[:3, 3]

    place(0, torch.stack([rand(k) - 0.5, rand(k) - 0.5, -0.001 - rand(k)], -1))  # behind the camera
    place(k, torch.stack([(rand(k) - 0.5) * 0.02, (rand(k) - 0.5) * 0.02, 0.003 + 0.047 * rand(k)], -1))  # near
    zs = 0.5 + 2 * rand(k)  # beyond the 1.3x frustum in x and/or y, both sides: the Jacobian clamp
    place(2 * k, torch.stack([(rand(k) - 0.5) * 4 * zs, (rand(k) - 0.5) * 4 * zs, zs], -1))
    means[3 * k:4 * k] *= 3.0  # far off to the side (partly culled by the image box)
    quats = torch.randn(n, 4, generator=g, dtype=F64) * torch.exp((rand(n, 1) - 0.5) * 2 * math.log(10.0))
    scales = torch.exp(rand(n, 3) * math.log(20) + math.log(0.005))  # anisotropic 0.005 .. 0.1
    scales[4 * k:4 * k + k // 2, 0] *= 0.01  # needles
    scales[4 * k + k // 2:5 * k, 1:] *= 0.001  # flat discs / needles
    scales[5 * k:5 * k + k // 3] = 1e-5 * (1 + rand(k // 3, 3))  # tiny: eps2d dominates
    scales[5 * k + k // 3:6 * k] = 0.5 + 5 * rand(k - k // 3, 3)  # huge: larger than the image
    opac = 0.03 + 0.95 * rand(n)
    opac[6 * k:6 * k + 4] = 0.002  # below 1/255: culled
    opac[6 * k + 4:6 * k + 8] = float(torch.tensor(1.0 / 255.0, dtype=dtype))  # exactly 1/255: extend 0, culled
    opac[6 * k + 8:6 * k + 12] = 1.0 / 255.0 * 1.001  # just above: tiny radii
    opac[6 * k + 12:6 * k + 16] = 1.0
    return [t.to(dtype) for t in (means, quats, scales, opac)]


def clamped(means, V, K, w, h):
    """Which Gaussians have x/z or y/z beyond the Jacobian clamp limits."""
    p = means @ V[:3, :3].T + V[:3, 3]
    fx, fy, cx, cy = (float(v) for v in (K[0, 0], K[1, 1], K[0, 2], K[1, 2]))
    vx, vy = p[:, 0] / p[:, 2], p[:, 1] / p[:, 2]
    lx, ly = 0.3 * 0.5 * w / fx, 0.3 * 0.5 * h / fy
    return (vx > (w - cx) / fx + lx) | (vx < -cx / fx - lx) | (vy > (h - cy) / fy + ly) | (vy < -cy / fy - ly)


def camera(i, dtype=F32):
    eye, (w, h), fxs, shift = CAMERAS[i]
    return look_at(eye, dtype=dtype), intrinsics(w, h, fx_scale=fxs, shift=shift, dtype=dtype), w, h


def project_both(params, V, K, w, h, weights=None, **kw):
    """Both projections; with weights (for means2d, conics, depths) also the gradients of sum(w * out).
    Each result carries ``exact`` (float64 unrounded radii) and ``size`` for the radii contract."""
    out = []
    exact = exact_radii(*params, V, K, w, h, **kw)
    slack = projection_slack(*params, V, K, w, h, params[0].dtype, **kw)
    for fn in (project_gaussians, project_gaussians_cpp):
        leaves = [p.detach().clone().requires_grad_(weights is not None) for p in params[:3]]
        pr = fn(*leaves, params[3], V, K, w, h, **kw)
        grads = None
        if weights is not None:
            loss = sum((o * wt).sum() for o, wt in zip((pr.means2d, pr.conics, pr.depths), weights))
            grads = torch.autograd.grad(loss, leaves)
        pr.exact, pr.slack, pr.size = exact, slack, (w, h)
        out.append((pr, grads))
    return out


def random_weights(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=F64).to(dtype) for shape in ((n, 2), (n, 3), (n,))]


def assert_outputs_close(a, b, tol):
    """Radii by the contract; the other outputs of every Gaussian both sides drew (or both culled) within tol,
    plus twice its float rounding slack (tests/float_slack.py: large only close to the camera plane)."""
    assert b.radii.dtype == torch.int32 and b.radii.shape == a.radii.shape
    assert_radii_agree(a.radii, b.radii, a.exact, a.means2d + b.means2d, *a.size, a.means2d.dtype)
    same = same_culling(a.radii, b.radii)
    for name in OUTPUTS:
        x, y = getattr(a, name)[same], getattr(b, name)[same]
        assert_close_with_slack(y, x, tol, a.slack[name][same], name)


def assert_grads_close(ga, gb, rtol, names=("means", "quats", "scales")):
    """Max error within rtol of the largest gradient of that input, elementwise within 10 rtol relative."""
    for name, a, b in zip(names, ga, gb):
        scale = a.abs().max().item() + 1e-30
        err = (a - b).abs().max().item()
        assert err <= rtol * scale, f"grad {name}: max err {err:.3g} vs max |grad| {scale:.3g}"
        torch.testing.assert_close(b, a, rtol=10 * rtol, atol=rtol * scale, msg=lambda m: f"grad {name}: {m}")


# ------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("cam", range(len(CAMERAS)))
def test_forward_matches_pytorch_projection(cam, dtype):
    V, K, w, h = camera(cam, dtype)
    params = scene(cam, 3000, V, dtype)
    (ref, _), (out, _) = project_both(params, V, K, w, h)
    drawn = (ref.radii > 0).any(-1)
    assert 0 < int(drawn.sum()) < drawn.numel()
    assert int(ref.radii.max()) > max(w, h)  # some Gaussians larger than the image
    assert_outputs_close(ref, out, 1e-5 if dtype == F32 else 1e-12)
    # culled Gaussians: zero outputs
    for t in (out.means2d, out.conics, out.depths):
        assert float(t[~drawn].abs().max()) == 0.0


def test_forward_culling_edges_in_camera_space():
    """Identity view: depths exactly at near/far, just outside, behind; x/z exactly at the clamp limits."""
    w, h = 32, 24
    K = torch.tensor([[30.0, 0, 16.0], [0, 30.0, 12.0], [0, 0, 1]])
    near, far = 0.25, 4.0
    lim = (w - 16.0) / 30.0 + 0.3 * (0.5 * w / 30.0)
    zs = [near, far, near * 0.999, far * 1.001, -1.0, 1.0, 2.0, 2.0, 3.0]
    xs = [0.0, 0.0, 0.0, 0.0, 0.0, lim, -2.0 * lim * 2, 3.0 * lim * 2, 0.1]
    means = torch.tensor([[x, 0.05, z] for x, z in zip(xs, zs)])
    n = means.shape[0]
    quats = torch.tensor([[1.0, 0.3, -0.2, 0.1]]).repeat(n, 1)
    scales = torch.tensor([[0.3, 0.1, 0.05]]).repeat(n, 1)  # anisotropic: the quaternions get a gradient
    opac = torch.full((n,), 0.9)
    params = [means, quats, scales, opac]
    weights = random_weights(n, F32, 0)
    (ref, g_ref), (out, g_out) = project_both(params, torch.eye(4), K, w, h, weights, near=near, far=far)
    assert_outputs_close(ref, out, 1e-5)
    assert ref.radii[:2].gt(0).all() and ref.radii[2:5].eq(0).all()  # near/far inclusive
    assert_grads_close(g_ref, g_out, 1e-4)


def test_non_finite_inputs_are_culled_like_pytorch():
    V, K, w, h = camera(0)
    params = scene(5, 60, V)
    params[0][0, 1] = float("nan")
    params[1][1] = 0.0  # zero quaternion: NaN rotation
    params[2][2, 0] = float("inf")
    params[3][3] = float("nan")
    params[0][4, 2] = float("inf")
    (ref, _), (out, _) = project_both(params, V, K, w, h)
    assert ref.radii[:5].eq(0).all()
    assert_outputs_close(ref, out, 1e-5)


def test_empty_input():
    V, K, w, h = camera(0)
    params = [torch.zeros(0, 3), torch.zeros(0, 4), torch.zeros(0, 3), torch.zeros(0)]
    weights = random_weights(0, F32, 0)
    (ref, _), (out, g_out) = project_both(params, V, K, w, h, weights)
    assert out.means2d.shape == (0, 2) and out.radii.shape == (0, 2) and out.conics.shape == (0, 3)
    assert [tuple(g.shape) for g in g_out] == [(0, 3), (0, 4), (0, 3)]


# ----------------------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("cam", range(len(CAMERAS)))
def test_gradients_match_autograd(cam, dtype):
    V, K, w, h = camera(cam, dtype)
    params = scene(10 + cam, 3000, V, dtype)
    weights = random_weights(3000, dtype, cam)
    (ref, g_ref), (out, g_out) = project_both(params, V, K, w, h, weights)
    assert_outputs_close(ref, out, 1e-5 if dtype == F32 else 1e-12)
    same = same_culling(ref.radii, out.radii)  # a Gaussian drawn by one side only has a gradient there only
    assert_grads_close([g[same] for g in g_ref], [g[same] for g in g_out], 1e-4 if dtype == F32 else 1e-10)
    culled = (out.radii == 0).all(-1)
    assert int(clamped(params[0], V, K, w, h)[~culled].sum()) > 0  # the clamp's gradient path is exercised
    for g in g_out:  # culled Gaussians get exactly zero gradient
        assert float(g[culled].abs().max()) == 0.0


def test_gradients_of_single_outputs_and_partial_requires_grad():
    """Each output alone (the others get no gradient: None in backward), and only some inputs requiring grad."""
    V, K, w, h = camera(1, F64)
    params = scene(3, 400, V, F64)
    weights = random_weights(400, F64, 9)
    for which in range(3):
        grads = []
        for fn in (project_gaussians, project_gaussians_cpp):
            leaves = [p.clone().requires_grad_(True) for p in params[:3]]
            pr = fn(*leaves, params[3], V, K, w, h)
            out = (pr.means2d, pr.conics, pr.depths)[which]
            grads.append(torch.autograd.grad((out * weights[which]).sum(), leaves, allow_unused=True))
        for name, a, b in zip(("means", "quats", "scales"), *grads):
            a = torch.zeros_like(b) if a is None else a  # autograd: None where the output does not depend on it
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10 * (a.abs().max().item() + 1),
                                       msg=lambda m: f"output {which}, grad {name}: {m}")
    q = params[1].clone().requires_grad_(True)
    pr = project_gaussians_cpp(params[0], q, params[2], params[3], V, K, w, h)
    (pr.conics * weights[1]).sum().backward()
    ref_q = params[1].clone().requires_grad_(True)
    (project_gaussians(params[0], ref_q, params[2], params[3], V, K, w, h).conics * weights[1]).sum().backward()
    torch.testing.assert_close(q.grad, ref_q.grad, rtol=1e-10, atol=1e-12)
    # no input requires grad: plain tensors, no graph
    pr = project_gaussians_cpp(*params, V, K, w, h)
    assert not pr.means2d.requires_grad and not pr.conics.requires_grad


def test_gradient_is_finite_difference_of_the_kernel_forward():
    """float64: the compiled backward against central differences of the compiled forward (a few entries)."""
    V, K, w, h = camera(0, F64)
    params = scene(4, 48, V, F64)
    weights = random_weights(48, F64, 4)

    def f(ps):
        pr = project_gaussians_cpp(*ps, V, K, w, h)
        return sum((o * wt).sum() for o, wt in zip((pr.means2d, pr.conics, pr.depths), weights))

    leaves = [p.clone().requires_grad_(True) for p in params[:3]]
    grads = torch.autograd.grad(f(leaves + [params[3]]), leaves)
    radii = project_gaussians_cpp(*params, V, K, w, h).radii
    drawn = (radii > 0).any(-1).nonzero().flatten().tolist()[:6]
    eps = 1e-6
    for i, g in enumerate(grads):
        for gi in drawn:
            for j in range(params[i].shape[1]):
                plus = [p.clone() for p in params]
                minus = [p.clone() for p in params]
                plus[i][gi, j] += eps
                minus[i][gi, j] -= eps
                num = (f(plus) - f(minus)).item() / (2 * eps)
                assert g[gi, j].item() == pytest.approx(num, rel=1e-5, abs=1e-6 * max(1.0, abs(num)))


def test_results_do_not_depend_on_the_thread_count():
    V, K, w, h = camera(2)
    params = scene(7, 20000, V)
    weights = random_weights(20000, F32, 7)
    old = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            leaves = [p.clone().requires_grad_(True) for p in params[:3]]
            pr = project_gaussians_cpp(*leaves, params[3], V, K, w, h)
            loss = sum((o * wt).sum() for o, wt in zip((pr.means2d, pr.conics, pr.depths), weights))
            runs.append([pr.means2d, pr.conics, pr.depths, pr.radii, *torch.autograd.grad(loss, leaves)])
    finally:
        torch.set_num_threads(old)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_simd_levels_and_the_scalar_path_give_identical_bits(monkeypatch):
    """float32 runs L Gaussians per SIMD step (AVX-512 16, AVX2 8, SSE2 4 lanes, picked from the CPU like the
    compositor) with the same operations as the one-at-a-time path: all must agree bit for bit, also on the
    partial last step (N not a multiple of the lanes) and with culled lanes mixed in."""
    V, K, w, h = camera(1)
    params = scene(8, 1001, V)
    weights = random_weights(1001, F32, 8)
    runs = {}
    for isa in ("scalar", "base", "avx2", "avx512"):
        monkeypatch.setenv("STAG4D_KERNEL_ISA", isa)  # a level the CPU lacks falls back to the best it has
        leaves = [p.clone().requires_grad_(True) for p in params[:3]]
        pr = project_gaussians_cpp(*leaves, params[3], V, K, w, h)
        loss = sum((o * wt).sum() for o, wt in zip((pr.means2d, pr.conics, pr.depths), weights))
        runs[isa] = [pr.means2d, pr.conics, pr.depths, pr.radii, pr.cov2d, *torch.autograd.grad(loss, leaves)]
    for isa, res in runs.items():
        for i, (a, b) in enumerate(zip(runs["scalar"], res)):
            assert torch.equal(a, b), f"{isa}: output {i} differs from the scalar path"


def test_camera_is_a_constant():
    V, K, w, h = camera(0)
    params = scene(1, 50, V)
    with pytest.raises(ValueError, match="constant"):
        project_gaussians_cpp(*params, V.clone().requires_grad_(True), K, w, h)
    # non-contiguous inputs and a float64 camera with float32 Gaussians are fine
    means = torch.cat([params[0], params[0]], 1)[:, ::2]
    a = project_gaussians(means, *params[1:], V.double(), K.double(), w, h)
    b = project_gaussians_cpp(means, *params[1:], V.double(), K.double(), w, h)
    a.exact, a.size = exact_radii(means, *params[1:], V, K, w, h), (w, h)
    a.slack = projection_slack(means, *params[1:], V, K, w, h, F32)
    assert_outputs_close(a, b, 1e-5)


# ---------------------------------------------------------------------------------------------- rasterize
def _render(params, colors, V, K, w, h, backend, loss_seed=0):
    leaves = [p.detach().clone().requires_grad_(True) for p in [*params, colors]]
    res = rasterize(*leaves, V, K, w, h, [0.2, 0.5, 0.9], backend=backend)
    g = torch.Generator().manual_seed(loss_seed)
    rnd = lambda t: torch.randn(t.shape, generator=g)  # noqa: E731
    loss = ((res.rgb * rnd(res.rgb)).sum() + (res.alpha * rnd(res.alpha)).sum()
            + 0.3 * (res.depth * rnd(res.depth)).sum() + 0.01 * (res.means2d * rnd(res.means2d)).sum())
    loss.backward()
    return res, [p.grad for p in leaves]


@pytest.mark.parametrize("cam", range(len(CAMERAS)))
def test_rasterize_cpp_matches_torch(cam):
    V, K, w, h = camera(cam)
    params = scene(20 + cam, 600, V)
    colors = torch.rand(600, 3, generator=torch.Generator().manual_seed(cam))
    ref, g_ref = _render(params, colors, V, K, w, h, "torch", cam)
    out, g_out = _render(params, colors, V, K, w, h, "cpp", cam)
    assert out.backend == "cpp" and ref.backend == "torch"
    exact = exact_radii(*params, V, K, w, h)
    assert_radii_agree(out.radii, ref.radii, exact, out.means2d + ref.means2d, w, h)
    slack = render_slack(*params, colors, V, K, w, h, [0.2, 0.5, 0.9], F32)
    for name in ("rgb", "alpha", "depth"):  # images: to 1e-5 (plus the float slack) whatever the radii did
        assert_close_with_slack(getattr(out, name).detach(), getattr(ref, name).detach(), 1e-5, slack[name], name)
    same = same_culling(out.radii, ref.radii)
    assert_close_with_slack(out.means2d[same].detach(), ref.means2d[same].detach(), 1e-5, slack["means2d"][same],
                            "means2d")
    assert out.means2d.grad is not None and out.means2d.grad.shape == (600, 2)
    assert float(out.means2d.grad.abs().max()) > 0
    assert_grads_close([ref.means2d.grad[same]], [out.means2d.grad[same]], 1e-4, names=("means2d.grad",))
    assert_grads_close(g_ref, g_out, 1e-4, names=("means", "quats", "scales", "opacities", "colors"))


def test_rasterize_dispatch_uses_the_compiled_projection(monkeypatch):
    V, K, w, h = camera(0)
    params = scene(2, 200, V)
    colors = torch.rand(200, 3)
    calls = []
    real = raster_mod.project_gaussians

    def spy(*a, **kw):
        calls.append(a[0].dtype)
        return real(*a, **kw)

    monkeypatch.setattr(raster_mod, "project_gaussians", spy)
    for backend in ("cpp", "auto"):
        assert rasterize(*params, colors, V, K, w, h, [0, 0, 0], backend=backend).backend == "cpp"
    assert calls == []  # float32 on the CPU: the compiled projection
    rasterize(*params, colors, V, K, w, h, [0, 0, 0], backend="torch")
    assert calls == [F32]  # "torch" stays pure PyTorch
    res64 = rasterize(*[p.double() for p in params], colors.double(), V.double(), K.double(), w, h, [0, 0, 0])
    assert res64.backend == "torch" and calls[-1] == F64
    # a camera that requires grad: the PyTorch projection (with the compiled compositor), and it gets a gradient
    Vg = V.clone().requires_grad_(True)
    res = rasterize(*params, colors, Vg, K, w, h, [0, 0, 0], backend="cpp")
    assert res.backend == "cpp" and calls[-1] == F32 and len(calls) == 3
    res.rgb.sum().backward()
    assert Vg.grad is not None and float(Vg.grad.abs().max()) > 0


def test_falls_back_to_pytorch_when_unavailable(monkeypatch):
    V, K, w, h = camera(0)
    params = scene(6, 100, V)
    monkeypatch.setattr(pc, "projection_cpp_available", lambda: False)
    a = project_gaussians_cpp(*params, V, K, w, h)
    b = project_gaussians(*params, V, K, w, h)
    for name in OUTPUTS:
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert raster_mod._project_cpp() is None
    res = rasterize(*params, torch.rand(100, 3), V, K, w, h, [0, 0, 0], backend="cpp")  # compiled compositor only
    assert res.backend == "cpp"


def test_disabled_library_in_a_fresh_process():
    code = ("import torch; from stag4d_backend.render import projection_cpp as pc, rasterize; "
            "from stag4d_backend.render.projection import intrinsics_from_fovy; "
            "p = pc.project_gaussians_cpp(torch.tensor([[0., 0., 2.]]), torch.tensor([[1., 0, 0, 0]]), "
            "torch.full((1, 3), .1), torch.tensor([.5]), torch.eye(4), intrinsics_from_fovy(50, 16, 16), 16, 16); "
            "r = rasterize(torch.tensor([[0., 0., 2.]]), torch.tensor([[1., 0, 0, 0]]), torch.full((1, 3), .1), "
            "torch.tensor([.5]), torch.rand(1, 3), torch.eye(4), intrinsics_from_fovy(50, 16, 16), 16, 16, [0, 0, 0]); "
            "print('RESULT', pc.projection_cpp_available(), p.radii.tolist(), r.backend)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=REPO,
                         env=dict(os.environ, STAG4D_DISABLE_CPP_KERNEL="1"))
    assert "RESULT False [[" in out.stdout and out.stdout.strip().endswith("torch"), out.stdout + out.stderr


# ------------------------------------------------------------------------------------------- radii contract
def test_radii_at_integer_boundaries_keep_the_contract():
    """Gaussians whose unrounded radius is an integer (in float64): the backends' float32 rounding may put them
    on either side, so radii may differ by one there, and images must still agree to 1e-5."""
    w, h, f = 96, 96, 30.0
    K = torch.tensor([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]])
    g = torch.Generator().manual_seed(3)
    ks = torch.arange(1, 41, dtype=F64).repeat(5)  # target radii 1..40, five times
    n = ks.numel()
    op = (0.2 + 0.8 * torch.rand(n, generator=g, dtype=F64))
    extend = torch.sqrt(2 * torch.log(op * 255)).clamp_max(3.33)
    z = 1.5 + torch.rand(n, generator=g, dtype=F64)
    s = z / f * torch.sqrt(((ks / extend) ** 2 - 0.3).clamp_min(1e-8))  # isotropic: cov2d = (f s / z)^2 + 0.3
    means = torch.stack([torch.zeros(n, dtype=F64), torch.zeros(n, dtype=F64), z], -1)
    params = [means.float(), torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1), s[:, None].repeat(1, 3).float(),
              op.float()]
    (ref, _), (out, _) = project_both(params, torch.eye(4), K, w, h)
    assert_outputs_close(ref, out, 1e-5)
    on_boundary = ((ref.exact - ref.exact.round()).abs() < 1e-4).all(-1)
    assert int(on_boundary.sum()) > n // 2  # the scene does sit on the boundaries
    colors = torch.rand(n, 3, generator=g)
    a = rasterize(*params, colors, torch.eye(4), K, w, h, [1.0, 1.0, 1.0], backend="torch")
    b = rasterize(*params, colors, torch.eye(4), K, w, h, [1.0, 1.0, 1.0], backend="cpp")
    torch.testing.assert_close(b.rgb, a.rgb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.alpha, a.alpha, rtol=1e-5, atol=1e-5)


def test_the_radii_contract_rejects_real_disagreements():
    from radii_contract import radii_disagreements

    exact = torch.tensor([[3.0, 2.5], [4.4, 4.4], [7.0, 7.0], [5.0, 5.0], [5.0, 5.0]], dtype=F64)
    means2d = torch.tensor([[50.0, 50.0], [50.0, 50.0], [50.0, 50.0], [-4.5, 50.0], [30.0, 50.0]])
    base = torch.tensor([[3, 3], [5, 5], [7, 7], [5, 5], [5, 5]], dtype=torch.int32)
    args = (exact, means2d, 100, 100)
    assert radii_disagreements(base, base.clone(), *args) == []
    ok = base.clone()
    ok[0, 0] = 4  # ceil(3.0 +- ulps): 3 or 4
    ok[3] = 0  # box 0.5 px inside the left border: culled with radius 4
    assert radii_disagreements(base, ok, *args) == []
    for row, new, why in [(1, [6, 5], "not at an integer boundary"), (2, [9, 7], "more than one"),
                          (4, [0, 0], "inside the image")]:
        bad = base.clone()
        bad[row] = torch.tensor(new, dtype=torch.int32)
        problems = radii_disagreements(base, bad, *args)
        assert len(problems) == 1 and why in problems[0], (row, problems)
    # [N] radii (rasterize's max of x/y) follow the same rules
    assert radii_disagreements(base.amax(-1), ok.amax(-1), *args) == []
