"""Tests of the Gaussian rasteriser: tiled CPU compositors vs the dense reference, finite differences,
hand-checkable values, dispatch, and (on CUDA machines) gsplat parity.

The parity tests are parametrised over the CPU compositors: "torch" always, "cpp" when the compiled kernel
(stag4d_backend.render.composite_cpp) is importable and available, skipped otherwise.
"""

from __future__ import annotations

import math

import pytest
import torch

import importlib
import importlib.util

from stag4d_backend.render import RasterResult, rasterize
from stag4d_backend.render.composite_torch import composite_torch
from stag4d_backend.render.reference import composite_reference

from float_slack import assert_close_with_slack, render_slack
from radii_contract import assert_radii_agree, exact_radii, same_culling

# the module (the package attribute of the same name is the function)
raster_mod = importlib.import_module("stag4d_backend.render.rasterize")


# ----------------------------------------------------------------------------------------------- helpers
def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0), dtype=torch.float32) -> torch.Tensor:
    """World->camera matrix, OpenCV convention (x right, y down, z forward)."""
    eye = torch.tensor(eye, dtype=torch.float64)
    f = torch.tensor(target, dtype=torch.float64) - eye
    f = f / f.norm()
    r = torch.linalg.cross(f, torch.tensor(up, dtype=torch.float64))
    r = r / r.norm()
    d = torch.linalg.cross(f, r)
    R = torch.stack([r, d, f])
    V = torch.eye(4, dtype=torch.float64)
    V[:3, :3] = R
    V[:3, 3] = -R @ eye
    return V.to(dtype)


def intrinsics(width, height, fovy_deg=49.1, dtype=torch.float32, fx_scale=1.0, shift=(0.0, 0.0)):
    f = 0.5 * height / math.tan(math.radians(fovy_deg) / 2)
    return torch.tensor(
        [[f * fx_scale, 0, width / 2 + shift[0]], [0, f, height / 2 + shift[1]], [0, 0, 1]], dtype=dtype
    )


CAMERAS = [
    # (eye, image size (W, H), fx scale, principal point shift)
    ((0.0, 0.0, 2.0), (64, 48), 1.0, (0.0, 0.0)),
    ((1.2, 0.8, -1.4), (40, 56), 1.2, (3.5, -2.0)),
    ((-1.7, -0.6, 0.9), (37, 29), 0.9, (0.0, 0.0)),
]


def random_scene(seed: int, n: int, viewmat: torch.Tensor, dtype=torch.float32):
    """Gaussians in a ball of radius ~1 plus some behind the camera, some at the near plane, some far off
    screen; anisotropic, rotated, unnormalised quaternions, a few below the opacity threshold."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g, dtype=torch.float64) * 2 - 1) * 0.9
    cam_to_world = torch.linalg.inv(viewmat.to(torch.float64))
    k = n // 10
    # behind the camera (camera z in [-1, -0.05])
    pc = torch.stack([torch.rand(k, generator=g) - 0.5, torch.rand(k, generator=g) - 0.5,
                      -0.05 - torch.rand(k, generator=g)], -1).to(torch.float64)
    means[:k] = pc @ cam_to_world[:3, :3].T + cam_to_world[:3, 3]
    # close to the near plane (camera z in [0.003, 0.05]): some culled, some huge on screen
    pc = torch.stack([(torch.rand(k, generator=g) - 0.5) * 0.02, (torch.rand(k, generator=g) - 0.5) * 0.02,
                      0.003 + 0.047 * torch.rand(k, generator=g)], -1).to(torch.float64)
    means[k:2 * k] = pc @ cam_to_world[:3, :3].T + cam_to_world[:3, 3]
    # far off to the side (partly off-screen or culled by the image box)
    means[2 * k:3 * k] *= 2.5
    quats = torch.randn(n, 4, generator=g, dtype=torch.float64) * (0.5 + torch.rand(n, 1, generator=g))
    log_s = torch.rand(n, 3, generator=g, dtype=torch.float64) * math.log(20) + math.log(0.005)
    scales = torch.exp(log_s)  # 0.005 .. 0.1, anisotropic
    scales[2 * k:2 * k + k // 2, 0] *= 0.05  # needle-like
    opacities = torch.rand(n, generator=g, dtype=torch.float64) * 0.95 + 0.03
    opacities[3 * k:3 * k + 3] = 0.002  # below 1/255: culled
    colors = torch.rand(n, 3, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (means, quats, scales, opacities, colors)]


def linear_functional(res: RasterResult, seed: int) -> torch.Tensor:
    """Random weights drawn on the CPU (the same on every device) times all outputs."""
    g = torch.Generator().manual_seed(seed)

    def rnd(t):
        return torch.randn(t.shape, generator=g, dtype=torch.float64).to(device=t.device, dtype=t.dtype)

    loss = (res.rgb * rnd(res.rgb)).sum()
    loss = loss + (res.alpha * rnd(res.alpha)).sum()
    loss = loss + 0.3 * (res.depth * rnd(res.depth)).sum()
    loss = loss + 0.01 * (res.means2d * rnd(res.means2d)).sum()
    return loss


def run(params, viewmat, K, w, h, bg, backend, loss_seed=None, **kw):
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    res = rasterize(*leaves, viewmat, K, w, h, bg, backend=backend, **kw)
    grads = None
    if loss_seed is not None:
        linear_functional(res, loss_seed).backward()
        grads = [p.grad for p in leaves]
    return res, grads, leaves


def cpp_status():
    try:
        from stag4d_backend.render.composite_cpp import cpp_available  # type: ignore[import-not-found]
    except ImportError:
        return False, "stag4d_backend.render.composite_cpp is not importable"
    try:
        ok = bool(cpp_available())
    except Exception as exc:  # pragma: no cover
        return False, f"cpp_available() raised {exc!r}"
    return ok, "" if ok else "compiled compositor not available on this machine"


@pytest.fixture(params=["torch", "cpp"])
def cpu_backend(request):
    """The CPU compositors under test; "cpp" skips cleanly when the compiled kernel is unavailable."""
    if request.param == "cpp":
        ok, why = cpp_status()
        if not ok:
            pytest.skip(why)
    return request.param


def assert_grads_close(ga, gb, names=("means", "quats", "scales", "opacities", "colors"), rtol=1e-4):
    for name, a, b in zip(names, ga, gb):
        assert a is not None and b is not None, name
        scale = b.abs().max().item() + 1e-12
        err = (a - b).abs().max().item()
        assert err <= rtol * scale, f"grad {name}: max err {err:.3g} vs max |grad| {scale:.3g}"
        torch.testing.assert_close(a, b, rtol=10 * rtol, atol=rtol * scale, msg=lambda m: f"grad {name}: {m}")


# ------------------------------------------------------------------------------- tiled vs dense reference
@pytest.mark.parametrize("cam", range(len(CAMERAS)))
def test_tiled_matches_reference(cpu_backend, cam):
    eye, (w, h), fxs, shift = CAMERAS[cam]
    V = look_at(eye)
    K = intrinsics(w, h, fx_scale=fxs, shift=shift)
    params = random_scene(10 + cam, 240, V)
    bg = [0.2, 0.5, 0.9]
    ref, g_ref, _ = run(params, V, K, w, h, bg, "reference", loss_seed=cam)
    out, g_out, _ = run(params, V, K, w, h, bg, cpu_backend, loss_seed=cam)
    assert out.backend == cpu_backend
    radii = ref.radii
    n_drawn = int((radii > 0).sum())
    assert 0 < n_drawn < radii.numel(), "scene should have both drawn and culled Gaussians"
    assert int(radii.max()) > max(w, h), "scene should contain a Gaussian larger than the image"
    # radii: equal, or off by one where the unrounded radius is at an integer (tests/radii_contract.py)
    assert_radii_agree(out.radii, ref.radii, exact_radii(*params[:4], V, K, w, h), out.means2d + ref.means2d, w, h)
    same = same_culling(out.radii, ref.radii)
    # to 1e-5 plus the float slack of Gaussians close to the camera plane (tests/float_slack.py): the compiled
    # projection sums in another order than PyTorch's CPU-dependent BLAS
    slack = render_slack(*params, V, K, w, h, bg, torch.float32)
    assert_close_with_slack(out.means2d[same].detach(), ref.means2d[same].detach(), 1e-5, slack["means2d"][same],
                            "means2d")
    for name in ("rgb", "alpha", "depth"):
        assert_close_with_slack(getattr(out, name).detach(), getattr(ref, name).detach(), 1e-5, slack[name], name)
    assert_grads_close(g_out, g_ref)


def test_tiled_matches_reference_with_early_termination(cpu_backend):
    """Dense opaque layers so that most pixels stop at T <= 1e-4; outputs and gradients still match."""
    w, h = 48, 40
    V = look_at((0.0, 0.0, 2.0))
    K = intrinsics(w, h)
    g = torch.Generator().manual_seed(3)
    n = 150
    means = (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([0.8, 0.6, 0.8])
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.15 + 0.05
    opacities = torch.rand(n, generator=g) * 0.15 + 0.84
    opacities[::7] = 1.0  # alpha capped at 0.999 near their centres: no gradient through the cap
    colors = torch.rand(n, 3, generator=g)
    params = [means, quats, scales, opacities, colors]
    ref, g_ref, _ = run(params, V, K, w, h, [0, 0, 0], "reference", loss_seed=5)
    out, g_out, _ = run(params, V, K, w, h, [0, 0, 0], cpu_backend, loss_seed=5)
    assert float((1 - ref.alpha.detach()).min()) < 1e-3  # saturated pixels exist
    torch.testing.assert_close(out.rgb, ref.rgb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.alpha, ref.alpha, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.depth, ref.depth, rtol=1e-5, atol=1e-5)
    assert_grads_close(g_out, g_ref)


def test_compositor_contract_direct(cpu_backend):
    """The compositor alone on random 2D inputs (C=5 features, a skipped radius, ties in depth)."""
    if cpu_backend == "cpp":
        from stag4d_backend.render.composite_cpp import composite_cpp as comp  # type: ignore[import-not-found]
    else:
        comp = composite_torch
    g = torch.Generator().manual_seed(7)
    n, w, h = 120, 45, 35
    means2d = torch.rand(n, 2, generator=g) * torch.tensor([w + 20.0, h + 20.0]) - 10
    L = torch.randn(n, 2, 2, generator=g) * 3
    cov = L @ L.transpose(1, 2) + 0.3 * torch.eye(2)
    inv = torch.linalg.inv(cov)
    conics = torch.stack([inv[:, 0, 0], inv[:, 0, 1], inv[:, 1, 1]], -1)
    feats = torch.rand(n, 5, generator=g)
    opac = torch.rand(n, generator=g) * 0.9 + 0.05
    depths = torch.rand(n, generator=g)
    depths[10:20] = depths[5]  # ties: stable order
    rad = torch.ceil(3.33 * torch.sqrt(torch.stack([cov[:, 0, 0], cov[:, 1, 1]], -1))).to(torch.int32)
    rad[3] = 0
    rad[4, 1] = 0
    inputs = [means2d, conics, feats, opac]
    leaves_a = [t.clone().requires_grad_() for t in inputs]
    leaves_b = [t.clone().requires_grad_() for t in inputs]
    img_a, al_a = comp(*leaves_a, depths, rad, w, h)
    img_b, al_b = composite_reference(*leaves_b, depths, rad, w, h)
    assert img_a.shape == (h, w, 5) and al_a.shape == (h, w)
    torch.testing.assert_close(img_a, img_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(al_a, al_b, rtol=1e-5, atol=1e-5)
    gi = torch.randn(h, w, 5, generator=g)
    gal = torch.randn(h, w, generator=g)
    ((img_a * gi).sum() + (al_a * gal).sum()).backward()
    ((img_b * gi).sum() + (al_b * gal).sum()).backward()
    assert_grads_close([t.grad for t in leaves_a], [t.grad for t in leaves_b],
                       names=("means2d", "conics", "features", "opacities"))
    for i in (3, 4):  # skipped Gaussians get no gradient
        assert float(leaves_a[0].grad[i].abs().sum()) == 0.0


def test_torch_compositor_chunking_and_tile_size_invariance():
    w, h = 50, 38
    V = look_at((0.4, -0.3, 2.0))
    K = intrinsics(w, h)
    params = random_scene(21, 200, V)
    from stag4d_backend.render.projection import project_gaussians

    proj = project_gaussians(params[0], params[1], params[2], params[3], V, K, w, h)
    feats = torch.cat([params[4], proj.depths[:, None]], -1)
    args = (proj.means2d, proj.conics, feats, params[3], proj.depths, proj.radii, w, h)
    base_img, base_a = composite_torch(*args)
    for kw in ({"chunk_elements": 1}, {"chunk_elements": 5000}, {"tile_size": 8}, {"tile_size": 5}):
        tile = kw.pop("tile_size", 16)
        img, a = composite_torch(*args, tile_size=tile, **kw)
        torch.testing.assert_close(img, base_img, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a, base_a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block", [1, 7, 64])
def test_torch_forward_blocks_and_early_exit(monkeypatch, block):
    """The forward walks Gaussians in runs of FORWARD_BLOCK with a carried transmittance and stops early
    when a chunk is saturated: results and gradients must not depend on the run length."""
    import stag4d_backend.render.composite_torch as ct

    w, h = 40, 32
    V = look_at((0.0, 0.0, 2.0))
    K = intrinsics(w, h)
    g = torch.Generator().manual_seed(9)
    n = 160
    params = [
        (torch.rand(n, 3, generator=g) - 0.5) * 0.6,
        torch.randn(n, 4, generator=g),
        torch.rand(n, 3, generator=g) * 0.1 + 0.03,
        torch.rand(n, generator=g) * 0.5 + 0.5,
        torch.rand(n, 3, generator=g),
    ]
    ref, g_ref, _ = run(params, V, K, w, h, [0, 0, 0], "reference", loss_seed=2)
    base, g_base, _ = run(params, V, K, w, h, [0, 0, 0], "torch", loss_seed=2)
    monkeypatch.setattr(ct, "FORWARD_BLOCK", block)
    out, g_out, _ = run(params, V, K, w, h, [0, 0, 0], "torch", loss_seed=2)
    assert float((1 - ref.alpha.detach()).min()) < 1e-3  # saturated pixels: the early exit is exercised
    for r in (ref, base):
        torch.testing.assert_close(out.rgb, r.rgb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.alpha, r.alpha, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.depth, r.depth, rtol=1e-5, atol=1e-5)
    assert_grads_close(g_out, g_ref)
    assert_grads_close(g_out, g_base)


# --------------------------------------------------------------------------------- finite differences
def _fd_scene():
    """Tiny float64 scene, away from the thresholds: opacities <= 0.6 so T never reaches 1e-4."""
    g = torch.Generator().manual_seed(11)
    n = 9
    means = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * torch.tensor([0.5, 0.4, 0.6],
                                                                                     dtype=torch.float64)
    quats = torch.randn(n, 4, generator=g, dtype=torch.float64)
    scales = torch.rand(n, 3, generator=g, dtype=torch.float64) * 0.08 + 0.04
    opac = torch.rand(n, generator=g, dtype=torch.float64) * 0.45 + 0.15
    colors = torch.rand(n, 3, generator=g, dtype=torch.float64)
    return [means, quats, scales, opac, colors]


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_finite_differences_float64(backend):
    w, h = 22, 18
    V = look_at((0.2, 0.1, 1.6), dtype=torch.float64)
    K = intrinsics(w, h, dtype=torch.float64)
    params = _fd_scene()
    bg = torch.tensor([0.3, 0.6, 0.1], dtype=torch.float64)

    def f(ps):
        res = rasterize(*ps, V, K, w, h, bg, backend=backend)
        return linear_functional(res, 123)

    res, grads, _ = run(params, V, K, w, h, bg, backend, loss_seed=123)
    assert res.rgb.dtype == torch.float64
    assert bool((res.radii > 0).all())
    eps = 1e-6
    for i, name in enumerate(["means", "quats", "scales", "opacities", "colors"]):
        num = torch.zeros_like(params[i])
        flat = num.view(-1)
        for j in range(flat.numel()):
            plus = [p.clone() for p in params]
            minus = [p.clone() for p in params]
            plus[i].view(-1)[j] += eps
            minus[i].view(-1)[j] -= eps
            with torch.no_grad():
                flat[j] = (f(plus) - f(minus)) / (2 * eps)
        scale = num.abs().max().item()
        torch.testing.assert_close(grads[i], num, rtol=1e-3, atol=1e-5 * max(scale, 1.0),
                                   msg=lambda m: f"{backend} grad {name}: {m}")


# ----------------------------------------------------------------------------------- hand-checkable values
@pytest.fixture(params=["torch", "reference", "cpp"])
def any_cpu_backend(request):
    if request.param == "cpp":
        ok, why = cpp_status()
        if not ok:
            pytest.skip(why)
    return request.param


def _one(means, scale, opacity, color, quat=(1.0, 0.0, 0.0, 0.0)):
    """Isotropic Gaussians (all with the same scale)."""
    n = len(means)
    return [
        torch.tensor(means, dtype=torch.float32).reshape(n, 3),
        torch.tensor([quat] * n, dtype=torch.float32),
        torch.full((n, 3), float(scale)),
        torch.tensor(opacity, dtype=torch.float32).reshape(n),
        torch.tensor(color, dtype=torch.float32).reshape(n, 3),
    ]


def test_isotropic_gaussian_on_axis(any_cpu_backend):
    w, h = 32, 24
    V = torch.eye(4)  # camera at origin looking down +z
    f = 30.0
    K = torch.tensor([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1.0]])
    z, s, o = 2.0, 0.05, 0.8
    params = _one([[0.0, 0.0, z]], s, [o], [[1.0, 0.5, 0.25]])
    bg = [0.0, 0.0, 1.0]
    res = rasterize(*params, V, K, w, h, bg, backend=any_cpu_backend)
    var = (f * s / z) ** 2 + 0.3
    # pixel (w/2, h/2) has centre (w/2 + .5, h/2 + .5): dx = dy = -0.5
    sigma = 0.5 * (0.25 + 0.25) / var
    alpha = min(0.999, o * math.exp(-sigma))
    assert res.alpha[h // 2, w // 2].item() == pytest.approx(alpha, abs=1e-6)
    exp_rgb = [alpha * c + (1 - alpha) * b for c, b in zip([1.0, 0.5, 0.25], bg)]
    assert res.rgb[h // 2, w // 2].tolist() == pytest.approx(exp_rgb, abs=1e-6)
    assert res.depth[h // 2, w // 2].item() == pytest.approx(z, rel=1e-6)
    assert res.means2d[0].tolist() == pytest.approx([w / 2, h / 2], abs=1e-6)
    extend = min(3.33, math.sqrt(2 * math.log(o * 255)))
    assert int(res.radii[0]) == math.ceil(extend * math.sqrt(var))
    # symmetric about the mean (a pixel corner): the four pixels around it are equal
    block = res.alpha[h // 2 - 1:h // 2 + 1, w // 2 - 1:w // 2 + 1]
    torch.testing.assert_close(block, torch.full_like(block, alpha), rtol=0, atol=1e-6)
    # far corners are background
    assert res.rgb[0, 0].tolist() == pytest.approx(bg, abs=0)
    assert res.alpha[0, 0].item() == 0.0 and res.depth[0, 0].item() == 0.0


def test_opacity_one_is_capped_at_0999(any_cpu_backend):
    V = torch.eye(4)
    K = torch.tensor([[30.0, 0, 8], [0, 30.0, 8], [0, 0, 1]])
    params = _one([[0.0, 0.0, 2.0]], 5.0, [1.0], [[1.0, 1.0, 1.0]])  # huge: sigma ~ 4e-5 at the centre
    res = rasterize(*params, V, K, 16, 16, [0, 0, 0], backend=any_cpu_backend)
    assert res.alpha[8, 8].item() == pytest.approx(0.999, abs=1e-6)


def test_behind_camera_is_culled(any_cpu_backend):
    V = torch.eye(4)
    K = torch.tensor([[30.0, 0, 8], [0, 30.0, 8], [0, 0, 1]])
    params = _one([[0.0, 0.0, -2.0], [0.0, 0.0, 0.005]], 0.5, [0.9, 0.9], [[1.0, 0.0, 0.0]] * 2)
    params = [p.requires_grad_() for p in params]
    bg = torch.tensor([0.1, 0.2, 0.3])
    res = rasterize(*params, V, K, 16, 16, bg, backend=any_cpu_backend)
    assert res.radii.tolist() == [0, 0]
    torch.testing.assert_close(res.rgb, bg.expand(16, 16, 3), rtol=0, atol=0)
    assert res.alpha.detach().abs().max().item() == 0.0 and res.depth.detach().abs().max().item() == 0.0
    linear_functional(res, 0).backward()
    for p in params:
        assert p.grad is None or float(p.grad.abs().max()) == 0.0


def test_front_gaussian_wins(any_cpu_backend):
    V = torch.eye(4)
    K = torch.tensor([[30.0, 0, 8], [0, 30.0, 8], [0, 0, 1]])
    # back (green) listed first, front (red) second: sorting must put red in front
    params = _one([[0.0, 0.0, 2.5], [0.0, 0.0, 1.5]], 0.6, [0.99, 0.99], [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    res = rasterize(*params, V, K, 16, 16, [0, 0, 1], backend=any_cpu_backend)
    c = res.rgb[8, 8]
    assert c[0] > 0.95 and c[1] < 0.02 and c[2] < 0.001
    # exact: a_front * red + (1 - a_front) * a_back * green + T * blue
    def a_at(z, s=0.6, f=30.0):
        var = (f * s / z) ** 2 + 0.3
        return min(0.999, 0.99 * math.exp(-0.25 / var))
    af, ab = a_at(1.5), a_at(2.5)
    assert c.tolist() == pytest.approx([af, (1 - af) * ab, (1 - af) * (1 - ab)], abs=1e-6)
    assert res.depth[8, 8].item() == pytest.approx((af * 1.5 + (1 - af) * ab * 2.5) / (af + (1 - af) * ab),
                                                   rel=1e-6)


def test_depth_spread_two_layers(any_cpu_backend):
    """Two Gaussians on the axis: the spread is the blending weights' alpha x variance of depth, by hand; one
    Gaussian alone has none; without the flag the field is None."""
    V = torch.eye(4)
    K = torch.tensor([[30.0, 0, 8], [0, 30.0, 8], [0, 0, 1]])
    params = _one([[0.0, 0.0, 2.5], [0.0, 0.0, 1.5]], 0.6, [0.7, 0.5], [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    res = rasterize(*params, V, K, 16, 16, [1, 1, 1], backend=any_cpu_backend, depth_spread=True)

    def a_at(z, o, s=0.6, f=30.0):
        return o * math.exp(-0.25 / ((f * s / z) ** 2 + 0.3))
    af, ab = a_at(1.5, 0.5), a_at(2.5, 0.7)
    w = [af, (1 - af) * ab]
    alpha = sum(w)
    mean = (w[0] * 1.5 + w[1] * 2.5) / alpha
    expected = w[0] * (1.5 - mean) ** 2 + w[1] * (2.5 - mean) ** 2
    assert res.depth_spread[8, 8].item() == pytest.approx(expected, rel=1e-4)
    assert expected > 0.05
    one = rasterize(*[p[1:] for p in params], V, K, 16, 16, [1, 1, 1], backend=any_cpu_backend, depth_spread=True)
    assert one.depth_spread.abs().max().item() < 1e-5
    assert rasterize(*params, V, K, 16, 16, [1, 1, 1], backend=any_cpu_backend).depth_spread is None


def test_depth_spread_matches_composited_depth_moments(cpu_backend):
    """On a random scene, the spread and its gradients equal those built from two plain renders whose colours
    are camera z and z^2 (black background: the image is then the weighted sums)."""
    viewmat = look_at((1.2, 0.8, -1.4))
    K = intrinsics(40, 32)
    g = torch.Generator().manual_seed(3)
    n = 150  # a cloud of overlapping layers in front of the camera (no near-plane giants hiding them)
    params = [(torch.rand(n, 3, generator=g) * 2 - 1) * 0.6, torch.randn(n, 4, generator=g),
              torch.rand(n, 3, generator=g) * 0.08 + 0.02, torch.rand(n, generator=g) * 0.6 + 0.3,
              torch.rand(n, 3, generator=g)]
    res, _, leaves = run(params, viewmat, K, 40, 32, [1, 1, 1], cpu_backend, depth_spread=True)
    weights = torch.rand(res.depth_spread.shape, generator=torch.Generator().manual_seed(5))
    (res.depth_spread * weights).sum().backward()
    grads = [p.grad for p in leaves]

    ref_leaves = [p.detach().clone().requires_grad_(True) for p in params]
    means = ref_leaves[0]
    z = (torch.cat([means, torch.ones(len(means), 1)], -1) @ viewmat.T)[:, 2:3]
    moments = rasterize(*ref_leaves[:4], torch.cat([z, z * z, torch.zeros_like(z)], -1), viewmat, K, 40, 32,
                        [0, 0, 0], backend=cpu_backend)
    ez, ez2 = moments.rgb[..., 0], moments.rgb[..., 1]
    ref = (ez2 - ez * ez / moments.alpha.clamp_min(1e-10)).clamp_min(0.0)
    assert torch.allclose(res.depth_spread, ref, atol=1e-5)
    assert res.depth_spread.max().item() > 1e-2  # overlapping layers exist
    (ref * weights).sum().backward()
    for g, r in zip(grads[:4], ref_leaves[:4]):
        assert torch.allclose(g, r.grad, atol=1e-4, rtol=1e-3)


def test_early_termination(any_cpu_backend):
    """Stack of large 0.85-opacity layers: T = 0.15^k hits <= 1e-4 at the 5th layer, which is NOT added."""
    V = torch.eye(4)
    K = torch.tensor([[30.0, 0, 8], [0, 30.0, 8], [0, 0, 1]])
    n = 7
    zs = [1.0 + 0.25 * i for i in range(n)]
    cols = [[1.0 if j == i % 3 else 0.0 for j in range(3)] for i in range(n)]
    cols[4] = [5.0, 5.0, 5.0]  # would be visible if the stopping layer were added
    params = _one([[0.0, 0.0, z] for z in zs[::-1]], 2.0, [0.85] * n, cols[::-1])  # given back to front
    res = rasterize(*params, V, K, 16, 16, [0, 0, 0], backend=any_cpu_backend)
    T, rgb, stop = 1.0, [0.0, 0.0, 0.0], None
    for i, z in enumerate(zs):
        var = (30.0 * 2.0 / z) ** 2 + 0.3
        a = min(0.999, 0.85 * math.exp(-0.25 / var))
        if T * (1 - a) <= 1e-4:
            stop = i
            break
        rgb = [r + a * T * c for r, c in zip(rgb, cols[i])]
        T *= 1 - a
    assert stop == 4
    assert res.alpha[8, 8].item() == pytest.approx(1 - T, abs=1e-6)
    assert res.rgb[8, 8].tolist() == pytest.approx(rgb, abs=1e-5)


def test_empty_scene_returns_background(any_cpu_backend):
    params = [torch.zeros(0, 3), torch.zeros(0, 4), torch.zeros(0, 3), torch.zeros(0), torch.zeros(0, 3)]
    params = [p.requires_grad_() for p in params]
    V = look_at((0.0, 0.0, 2.0))
    K = intrinsics(20, 12)
    res = rasterize(*params, V, K, 20, 12, (0.25, 0.5, 0.75), backend=any_cpu_backend)
    assert res.rgb.shape == (12, 20, 3) and res.alpha.shape == (12, 20) and res.depth.shape == (12, 20)
    assert res.means2d.shape == (0, 2) and res.radii.shape == (0,)
    torch.testing.assert_close(res.rgb, torch.tensor([0.25, 0.5, 0.75]).expand(12, 20, 3))
    assert res.alpha.detach().abs().max().item() == 0.0 and res.depth.detach().abs().max().item() == 0.0
    if res.rgb.requires_grad:
        res.rgb.sum().backward()


def test_unnormalised_quaternions(cpu_backend):
    w, h = 40, 30
    V = look_at((0.5, 0.5, 2.0))
    K = intrinsics(w, h)
    params = random_scene(4, 120, V)
    q = params[1] / params[1].norm(dim=-1, keepdim=True)
    a = rasterize(params[0], q, *params[2:], V, K, w, h, [0, 0, 0], backend=cpu_backend)
    b = rasterize(params[0], q * (torch.rand(q.shape[0], 1) * 5 + 0.1), *params[2:], V, K, w, h, [0, 0, 0],
                  backend=cpu_backend)
    torch.testing.assert_close(a.rgb, b.rgb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.alpha, b.alpha, rtol=1e-5, atol=1e-5)
    # the normalisation rounds differently: radii by the contract (tests/radii_contract.py)
    assert_radii_agree(a.radii, b.radii, exact_radii(params[0], q, *params[2:4], V, K, w, h),
                       a.means2d + b.means2d, w, h)


def test_means2d_grad_populated_and_zero_for_culled(cpu_backend):
    w, h = 40, 30
    V = look_at((0.0, 0.3, 2.0))
    K = intrinsics(w, h)
    params = random_scene(8, 150, V)
    res, _, leaves = run(params, V, K, w, h, [1, 1, 1], cpu_backend)
    assert res.means2d.requires_grad
    (res.rgb.mean() + res.alpha.mean()).backward()
    grad = res.means2d.grad
    assert grad is not None and grad.shape == (150, 2)
    culled = res.radii == 0
    assert bool(culled.any()) and bool((~culled).any())
    assert float(grad[culled].abs().max()) == 0.0
    assert float(grad[~culled].abs().max()) > 0.0
    # culled Gaussians get no gradient at all
    for p in leaves:
        assert float(p.grad[culled].abs().max()) == 0.0


# ------------------------------------------------------------------------------------------------ dispatch
def test_dispatch_rules(monkeypatch):
    cpu = torch.device("cpu")
    assert raster_mod.resolve_backend("torch", cpu, torch.float32) == "torch"
    assert raster_mod.resolve_backend("auto", cpu, torch.float64) == "torch"
    from stag4d_backend.render import gsplat_backend

    # CUDA -> gsplat where it is usable (the fallback without it: tests/test_gsplat_fallback.py)
    monkeypatch.setattr(gsplat_backend, "_STATUS", gsplat_backend.GsplatStatus(True, "1.5.3", ""))
    assert raster_mod.resolve_backend("auto", torch.device("cuda"), torch.float32) == "gsplat"
    monkeypatch.setattr(gsplat_backend, "_STATUS", None)
    with pytest.raises(ValueError):
        raster_mod.resolve_backend("vulkan", cpu, torch.float32)
    monkeypatch.setattr(raster_mod, "_load_cpp", lambda: None)
    assert raster_mod.resolve_backend("auto", cpu, torch.float32) == "torch"
    with pytest.raises(RuntimeError, match="cpp"):
        raster_mod.resolve_backend("cpp", cpu, torch.float32)
    sentinel = object()
    monkeypatch.setattr(raster_mod, "_load_cpp", lambda: sentinel)
    assert raster_mod.resolve_backend("auto", cpu, torch.float32) == "cpp"
    assert raster_mod.resolve_backend("auto", cpu, torch.float64) == "torch"


def test_available_backends():
    names = raster_mod.available_backends()
    assert "torch" in names and "reference" not in names
    assert ("cpp" in names) == cpp_status()[0]
    assert ("gsplat" in names) == (torch.cuda.is_available() and importlib.util.find_spec("gsplat") is not None)


def test_auto_on_cpu_runs_and_gsplat_needs_cuda():
    params = _one([[0.0, 0.0, 2.0]], 0.1, [0.5], [[1.0, 0.0, 0.0]])
    V, K = torch.eye(4), torch.tensor([[20.0, 0, 8], [0, 20.0, 8], [0, 0, 1]])
    res = rasterize(*params, V, K, 16, 16, [0, 0, 0])
    assert res.backend in ("torch", "cpp")
    res64 = rasterize(*[p.double() for p in params], V.double(), K.double(), 16, 16, [0, 0, 0])
    assert res64.backend == "torch" and res64.rgb.dtype == torch.float64
    with pytest.raises(RuntimeError):
        rasterize(*params, V, K, 16, 16, [0, 0, 0], backend="gsplat")


# --------------------------------------------------------------------------------------------- gsplat/CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gsplat_matches_cpu_torch():
    pytest.importorskip("gsplat")
    for cam in range(len(CAMERAS)):
        eye, (w, h), fxs, shift = CAMERAS[cam]
        V = look_at(eye)
        K = intrinsics(w, h, fx_scale=fxs, shift=shift)
        params = random_scene(30 + cam, 240, V)
        bg = [0.2, 0.5, 0.9]
        cpu, g_cpu, _ = run(params, V, K, w, h, bg, "torch", loss_seed=cam)
        gpu, g_gpu, _ = run([p.cuda() for p in params], V.cuda(), K.cuda(), w, h, bg, "gsplat", loss_seed=cam)
        assert gpu.backend == "gsplat"
        assert gpu.means2d.grad is not None
        torch.testing.assert_close(gpu.radii.cpu(), cpu.radii, rtol=0, atol=1)  # ceil may flip by one ulp
        drawn = cpu.radii > 0
        torch.testing.assert_close(gpu.means2d.detach().cpu()[drawn], cpu.means2d.detach()[drawn],
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gpu.rgb.detach().cpu(), cpu.rgb.detach(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gpu.alpha.detach().cpu(), cpu.alpha.detach(), rtol=1e-4, atol=1e-4)
        mask = cpu.alpha.detach() > 0.05
        torch.testing.assert_close(gpu.depth.detach().cpu()[mask], cpu.depth.detach()[mask], rtol=1e-3, atol=1e-3)
        for name, a, b in zip(["means", "quats", "scales", "opacities", "colors"],
                              [g.cpu() for g in g_gpu], g_cpu):
            scale = b.abs().max().item() + 1e-12
            assert (a - b).abs().max().item() <= 1e-2 * scale, name
