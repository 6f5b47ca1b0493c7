"""The compiled CPU compositing kernel (stag4d_backend.render.composite_cpp) against a reference written here.

The reference is the contract spelled out as a loop over depth-sorted Gaussians (vectorised over pixels):

* a float32 pass that repeats the kernel's arithmetic (same operation order, the kernel's own exp) decides, per
  Gaussian and pixel, skip / composite / stop and where the 0.999 clamp is active;
* a float64 pass with those decisions fixed computes image and alpha, and autograd gives reference gradients
  (the contract: the backward is the exact gradient with the decisions and the clamp held fixed).

Fixing the decisions from a bit-exact float32 replay keeps the tests deterministic for any scene (a float64
pass deciding on its own could flip a pixel sitting exactly on the 1/255 or 1e-4 thresholds).
Everything is skipped, with the reason, when the kernel cannot be built here.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import stag4d_backend.render.composite_cpp as cc
from stag4d_backend.render.composite_cpp import composite_cpp, cpp_available

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not cpp_available(), reason=f"compiled compositor unavailable: {cc.cpp_unavailable_reason()}"
)

F32 = torch.float32
F64 = torch.float64
A_MIN = torch.tensor(1.0 / 255.0, dtype=F32)
A_MAX = torch.tensor(0.999, dtype=F32)
T_MIN = torch.tensor(1e-4, dtype=F32)


# ------------------------------------------------------------------------------------------------ scenes
def make_scene(seed: int, n: int, width: int, height: int, channels: int = 4, *, stack: int = 0,
               culled: float = 0.1, ties: bool = True, full_opacity: float = 0.1, max_scale: float = 6.0):
    """Random 2D splats: means partly off-image, random covariances, radii = ceil(3.33 sigma) per axis."""
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(n, 2, generator=g, dtype=F64) * torch.tensor([width + 16.0, height + 16.0]) - 8.0
    theta = torch.rand(n, generator=g, dtype=F64) * math.pi
    s = 0.5 + torch.rand(n, 2, generator=g, dtype=F64) * (max_scale - 0.5)
    opac = 0.05 + 0.95 * torch.rand(n, generator=g, dtype=F64)
    opac[torch.rand(n, generator=g) < full_opacity] = 1.0  # alpha clamped at 0.999 near the centre
    if stack:  # a pile of big opaque splats at one spot: pixels there terminate early
        c = torch.tensor([width * 0.4, height * 0.55], dtype=F64)
        means[:stack] = c + torch.randn(stack, 2, generator=g, dtype=F64)
        s[:stack] = 4.0 + 3.0 * torch.rand(stack, 2, generator=g, dtype=F64)
        opac[:stack] = 0.7 + 0.3 * torch.rand(stack, generator=g, dtype=F64)
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    cov = rot @ torch.diag_embed(s * s) @ rot.transpose(-1, -2)
    inv = torch.linalg.inv(cov)
    conics = torch.stack([inv[:, 0, 0], inv[:, 0, 1], inv[:, 1, 1]], -1)
    radii = torch.ceil(3.33 * torch.sqrt(torch.stack([cov[:, 0, 0], cov[:, 1, 1]], -1))).to(torch.int32)
    drop = torch.rand(n, generator=g) < culled
    radii[drop] = 0
    if n >= 3 and culled > 0:
        radii[-1, 0] = 0  # one radius zero is enough to cull
        radii[-2, 1] = 0
    feats = torch.rand(n, channels, generator=g, dtype=F64) * 2.0 - 0.5
    if ties:
        depths = torch.randint(0, max(2, n // 4), (n,), generator=g).to(F64) * 0.5  # many equal depths
    else:
        depths = torch.rand(n, generator=g, dtype=F64) * 10.0
    if full_opacity > 0 and n > stack + 8:  # opaque splats centred on pixel centres, in front: clamped alpha
        k = slice(stack, stack + 4)
        means[k] = torch.floor(means[k].clamp(1, min(width, height) - 2)) + 0.5
        opac[k] = 1.0
        depths[k] = -1.0
    return dict(means2d=means.to(F32), conics=conics.to(F32), features=feats.to(F32), opacities=opac.to(F32),
                depths=depths.to(F32), radii=radii, width=width, height=height)


def pixel_centres(width: int, height: int, dtype):
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return (xs.reshape(-1).to(dtype) + 0.5), (ys.reshape(-1).to(dtype) + 0.5)


# --------------------------------------------------------------------------------------------- reference
def kernel_exp_neg(s: torch.Tensor) -> torch.Tensor:
    return cc._ext.exp_neg(s.contiguous())


def replay_decisions(scene):
    """Float32 replay of the contract with the kernel's arithmetic: [(i, add_mask, clamp_mask)] front to back."""
    m, cn, o, d, r = (scene[k] for k in ("means2d", "conics", "opacities", "depths", "radii"))
    px, py = pixel_centres(scene["width"], scene["height"], F32)
    order = torch.sort(d, stable=True).indices.tolist()
    T = torch.ones_like(px)
    done = torch.zeros(px.shape, dtype=torch.bool)
    steps = []
    for i in order:
        if r[i, 0] <= 0 or r[i, 1] <= 0:
            continue
        dx = m[i, 0] - px
        dy = m[i, 1] - py
        a, b, c = cn[i, 0], cn[i, 1], cn[i, 2]
        sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
        raw = o[i] * kernel_exp_neg(sigma)
        alpha = torch.where(raw > A_MAX, A_MAX, raw)  # min(), NaN-propagating like torch.clamp_max
        valid = (sigma >= 0) & (alpha >= A_MIN) & ~done
        next_t = T * (1 - alpha)
        stop = valid & (next_t <= T_MIN)
        add = valid & ~stop
        T = torch.where(add, next_t, T)
        done = done | stop
        steps.append((i, add, raw > A_MAX))
    replay_decisions.stopped = int(done.sum())  # pixels that terminated early (for scene sanity checks)
    return steps


def reference_float64(scene, steps, leaves):
    """Float64 compositing with fixed decisions; differentiable in the four leaves."""
    means, conics, feats, opac = leaves
    width, height = scene["width"], scene["height"]
    px, py = pixel_centres(width, height, F64)
    img = torch.zeros(px.shape[0], feats.shape[1], dtype=F64)
    T = torch.ones_like(px)
    for i, add, clamp in steps:
        dx = means[i, 0] - px
        dy = means[i, 1] - py
        sigma = 0.5 * (conics[i, 0] * dx * dx + conics[i, 2] * dy * dy) + conics[i, 1] * dx * dy
        raw = opac[i] * torch.exp(-sigma)
        alpha = torch.where(clamp, torch.full_like(raw, 0.999), raw)
        a = torch.where(add, alpha, torch.zeros_like(alpha))
        img = img + (a * T)[:, None] * feats[i]
        T = T * (1 - a)
    return img.reshape(height, width, -1), (1 - T).reshape(height, width)


def loss_weights(scene, seed=123):
    g = torch.Generator().manual_seed(seed)
    c = scene["features"].shape[1]
    w_img = torch.rand(scene["height"], scene["width"], c, generator=g, dtype=F64) * 2 - 1
    w_alpha = torch.rand(scene["height"], scene["width"], generator=g, dtype=F64) * 2 - 1
    return w_img, w_alpha


LEAF_NAMES = ("means2d", "conics", "features", "opacities")


def run_kernel(scene, tile_size=16, with_grad=True, weights=None):
    leaves = [scene[k].clone().requires_grad_(with_grad) for k in LEAF_NAMES]
    img, alpha = composite_cpp(*leaves, scene["depths"], scene["radii"], scene["width"], scene["height"],
                               tile_size)
    grads = None
    if with_grad:
        w_img, w_alpha = weights if weights is not None else loss_weights(scene)
        loss = (img.double() * w_img).sum() + (alpha.double() * w_alpha).sum()
        grads = torch.autograd.grad(loss, leaves)
    return img.detach(), alpha.detach(), grads


def run_reference(scene, weights=None):
    steps = replay_decisions(scene)
    leaves = [scene[k].to(F64).requires_grad_(True) for k in LEAF_NAMES]
    img, alpha = reference_float64(scene, steps, leaves)
    w_img, w_alpha = weights if weights is not None else loss_weights(scene)
    loss = (img * w_img).sum() + (alpha * w_alpha).sum()
    grads = torch.autograd.grad(loss, leaves)
    return img.detach(), alpha.detach(), grads, steps


def assert_grads_close(grads, ref_grads, rel=1e-4):
    for name, g, r in zip(LEAF_NAMES, grads, ref_grads):
        scale = float(r.abs().max()) if r.numel() else 0.0
        err = float((g.double() - r).abs().max()) if r.numel() else 0.0
        assert err <= rel * max(scale, 1e-6), f"grad {name}: max err {err:.3g} vs scale {scale:.3g}"


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_forward_and_gradients_match_float64_reference(channels):
    scene = make_scene(seed=channels, n=200, width=45, height=38, channels=channels, stack=25, max_scale=4.0)
    img, alpha, grads = run_kernel(scene)
    ref_img, ref_alpha, ref_grads, steps = run_reference(scene)
    # the scene exercises what it should: culled splats, clamped alpha, early termination, partial coverage
    assert (scene["radii"] <= 0).any(dim=1).sum() > 10
    assert any(bool((cl & add).any()) for _, add, cl in steps)
    assert replay_decisions.stopped > 20 and float(ref_alpha.min()) < 0.5
    assert img.shape == (38, 45, channels) and alpha.shape == (38, 45)
    assert img.dtype == F32 and alpha.dtype == F32
    assert float((img.double() - ref_img).abs().max()) < 1e-5
    assert float((alpha.double() - ref_alpha).abs().max()) < 1e-5
    assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("tile_size,channels", [(8, 3), (5, 2), (32, 17), (1, 3)])
def test_other_tile_sizes(tile_size, channels):
    scene = make_scene(seed=10 + tile_size, n=150, width=37, height=29, channels=channels, stack=10)
    img, alpha, grads = run_kernel(scene, tile_size=tile_size)
    ref_img, ref_alpha, ref_grads, _ = run_reference(scene)
    assert float((img.double() - ref_img).abs().max()) < 1e-5
    assert float((alpha.double() - ref_alpha).abs().max()) < 1e-5
    assert_grads_close(grads, ref_grads)
    # and the same image as with 16x16 tiles
    img16, alpha16, _ = run_kernel(scene, tile_size=16, with_grad=False)
    assert float((img - img16).abs().max()) < 1e-6 and float((alpha - alpha16).abs().max()) < 1e-6


def per_pixel_loop(scene):
    """The contract word for word: per pixel, plain Python floats, depth-sorted splats (no tiles, no SIMD)."""
    m, cn, f, o, d, r = (scene[k].double().tolist() for k in ("means2d", "conics", "features", "opacities",
                                                              "depths", "radii"))
    order = sorted(range(len(d)), key=lambda i: (d[i], i))
    width, height = scene["width"], scene["height"]
    img = [[[0.0] * len(f[0]) for _ in range(width)] for _ in range(height)]
    alpha = [[0.0] * width for _ in range(height)]
    for py in range(height):
        for px in range(width):
            T = 1.0
            for i in order:
                if r[i][0] <= 0 or r[i][1] <= 0:
                    continue
                dx, dy = m[i][0] - (px + 0.5), m[i][1] - (py + 0.5)
                sigma = 0.5 * (cn[i][0] * dx * dx + cn[i][2] * dy * dy) + cn[i][1] * dx * dy
                if sigma < 0:
                    continue
                a = min(0.999, o[i] * math.exp(-sigma))
                if a < 1 / 255:
                    continue
                if T * (1 - a) <= 1e-4:
                    break
                for c in range(len(f[i])):
                    img[py][px][c] += a * T * f[i][c]
                T *= 1 - a
            alpha[py][px] = 1 - T
    return torch.tensor(img, dtype=F64), torch.tensor(alpha, dtype=F64)


def test_forward_matches_a_literal_per_pixel_loop():
    scene = make_scene(seed=4, n=40, width=19, height=14, channels=3, stack=8, max_scale=3.0)
    img, alpha, _ = run_kernel(scene, with_grad=False)
    ref_img, ref_alpha = per_pixel_loop(scene)
    assert float((img.double() - ref_img).abs().max()) < 1e-5
    assert float((alpha.double() - ref_alpha).abs().max()) < 1e-5
    assert float(ref_alpha.max()) > 0.999  # some pixels terminated early


def test_gradient_is_float64_finite_difference_of_the_contract():
    """Directional derivatives of the float64 reference (decisions fixed) by central differences."""
    scene = make_scene(seed=7, n=40, width=24, height=20, channels=4, stack=6)
    weights = loss_weights(scene)
    _, _, grads = run_kernel(scene, weights=weights)
    steps = replay_decisions(scene)
    base = [scene[k].to(F64) for k in LEAF_NAMES]
    g = torch.Generator().manual_seed(3)
    for trial in range(3):
        dirs = [torch.randn(b.shape, generator=g, dtype=F64) * (b.abs().mean() + 1e-3) for b in base]

        def f(t):
            img, alpha = reference_float64(scene, steps, [b + t * d for b, d in zip(base, dirs)])
            return float((img * weights[0]).sum() + (alpha * weights[1]).sum())

        eps = 1e-6
        fd = (f(eps) - f(-eps)) / (2 * eps)
        analytic = sum(float((gr.double() * d).sum()) for gr, d in zip(grads, dirs))
        assert abs(fd - analytic) <= 1e-4 * max(1.0, abs(fd)), (trial, fd, analytic)


def test_kernel_backward_matches_its_own_forward_by_finite_differences():
    """gradcheck-style: a tiny smooth scene (no threshold near any pixel), float32 kernel only, loose tolerance."""
    n, width, height = 6, 12, 10
    g = torch.Generator().manual_seed(11)
    means = (torch.rand(n, 2, generator=g) * torch.tensor([width, height])).to(F32)
    sig = 12.0 + 8.0 * torch.rand(n, generator=g)
    conics = torch.stack([1 / sig**2, 0.2 / sig**2 * (torch.rand(n, generator=g) - 0.5), 1 / sig**2], -1).to(F32)
    scene = dict(means2d=means, conics=conics, features=torch.rand(n, 3, generator=g).to(F32),
                 opacities=(0.2 + 0.4 * torch.rand(n, generator=g)).to(F32),
                 depths=torch.rand(n, generator=g).to(F32),
                 radii=torch.full((n, 2), 80, dtype=torch.int32), width=width, height=height)
    weights = loss_weights(scene)
    _, _, grads = run_kernel(scene, weights=weights)
    base = [scene[k] for k in LEAF_NAMES]

    def f(xs):
        with torch.no_grad():
            img, alpha = composite_cpp(*xs, scene["depths"], scene["radii"], width, height)
        return float((img.double() * weights[0]).sum() + (alpha.double() * weights[1]).sum())

    for trial in range(4):
        dirs = [torch.randn(b.shape, generator=g) * b.abs().mean() for b in base]
        eps = 1e-2
        fd = (f([b + eps * d for b, d in zip(base, dirs)]) - f([b - eps * d for b, d in zip(base, dirs)])) / (2 * eps)
        analytic = sum(float((gr.double() * d.double()).sum()) for gr, d in zip(grads, dirs))
        assert abs(fd - analytic) <= 2e-2 * max(1.0, abs(analytic)), (trial, fd, analytic)


def test_no_gaussians_and_all_culled():
    for n in (0, 5):
        scene = make_scene(seed=1, n=max(n, 1), width=20, height=17, channels=4, culled=0.0)
        scene = {k: (v[:n] if isinstance(v, torch.Tensor) else v) for k, v in scene.items()}
        if n:
            scene["radii"] = torch.zeros(n, 2, dtype=torch.int32)
        img, alpha, grads = run_kernel(scene)
        assert img.shape == (17, 20, 4) and alpha.shape == (17, 20)
        assert not img.any() and not alpha.any()
        for name, gr in zip(LEAF_NAMES, grads):
            assert gr.shape == scene[name].shape and not gr.any()


def test_depth_order_and_stable_ties():
    """Two opaque splats at one spot: the nearer wins; on equal depth the lower index is in front."""
    means = torch.tensor([[8.0, 8.0], [8.0, 8.0]])
    conics = torch.tensor([[0.05, 0.0, 0.05]] * 2)
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    op = torch.tensor([0.9, 0.9])
    radii = torch.full((2, 2), 20, dtype=torch.int32)
    for depths, front in (([2.0, 1.0], 1), ([1.0, 2.0], 0), ([1.0, 1.0], 0)):
        img, alpha = composite_cpp(means, conics, feats, op, torch.tensor(depths), radii, 16, 16)
        centre = img[7, 7]
        assert centre[front] > centre[1 - front] * 5, (depths, centre)
        assert math.isclose(float(alpha[7, 7]), 1 - (1 - 0.9 * math.exp(-0.05 * 0.25)) ** 2, rel_tol=1e-5)


def test_early_termination_is_exact():
    """A stack of nearly opaque splats: pixels stop once T would fall to 1e-4, as the contract says."""
    n = 12
    means = torch.full((n, 2), 6.5)
    conics = torch.tensor([[0.01, 0.0, 0.01]] * n)
    feats = torch.arange(1.0, n + 1.0)[:, None]
    op = torch.full((n,), 0.95)
    depths = torch.arange(float(n))
    radii = torch.full((n, 2), 40, dtype=torch.int32)
    img, alpha = composite_cpp(means, conics, feats, op, depths, radii, 13, 13)
    a = 0.95  # alpha at the centre pixel (sigma = 0)
    T, expect = 1.0, 0.0
    for k in range(n):
        if T * (1 - a) <= 1e-4:
            break
        expect += a * T * (k + 1)
        T *= 1 - a
    assert math.isclose(float(img[6, 6, 0]), expect, rel_tol=1e-5)
    assert math.isclose(float(alpha[6, 6]), 1 - T, rel_tol=1e-6)
    assert T > 1e-4 and T * (1 - a) <= 1e-4  # the pixel really did stop early (3 splats, not 12)


def test_far_off_image_and_huge_radii():
    scene = make_scene(seed=5, n=60, width=30, height=20, channels=3, culled=0.0)
    # far off the image with a small box; boxes far larger than the image; a splat covering everything
    scene["means2d"][:4] = torch.tensor([[-1e4, 5.0], [1e4, 1e4], [15.0, -300.0], [5.0, 5.0]])
    scene["radii"][:4] = torch.tensor([[2, 2], [10**6, 10**6], [500, 500], [2**30, 2**30]], dtype=torch.int32)
    scene["conics"][3] = torch.tensor([1e-6, 0.0, 1e-6])
    img, alpha, grads = run_kernel(scene)
    ref_img, ref_alpha, ref_grads, _ = run_reference(scene)
    assert float((img.double() - ref_img).abs().max()) < 1e-5
    assert float((alpha.double() - ref_alpha).abs().max()) < 1e-5
    assert_grads_close(grads, ref_grads)


def test_nan_inputs_are_skipped_like_pytorch_does():
    """A NaN mean, opacity or conic makes that splat invisible (alpha NaN fails the 1/255 test) and poisons
    nothing else."""
    scene = make_scene(seed=6, n=20, width=16, height=16, channels=3, culled=0.0)
    clean = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in scene.items()}
    clean["radii"][:3] = 0
    scene["means2d"][0] = float("nan")
    scene["opacities"][1] = float("nan")
    scene["conics"][2] = float("nan")
    img, alpha, grads = run_kernel(scene)
    c_img, c_alpha, c_grads = run_kernel(clean)
    assert torch.equal(img, c_img) and torch.equal(alpha, c_alpha)
    for gr, cg in zip(grads, c_grads):
        assert torch.equal(gr[3:], cg[3:])


def test_simd_levels_threads_and_grad_modes_give_identical_results(monkeypatch):
    scene = make_scene(seed=21, n=400, width=70, height=50, channels=4, stack=20)
    base_img, base_alpha, base_grads = run_kernel(scene)
    variants = [("STAG4D_KERNEL_ISA", "avx2"), ("STAG4D_KERNEL_ISA", "base")]
    for var, value in variants:  # every SIMD level computes the same bits (levels the CPU lacks fall back)
        monkeypatch.setenv(var, value)
        img, alpha, grads = run_kernel(scene)
        monkeypatch.delenv(var)
        assert torch.equal(img, base_img) and torch.equal(alpha, base_alpha), value
        for gr, b in zip(grads, base_grads):
            assert torch.equal(gr, b), value
    threads = torch.get_num_threads()
    try:  # the default (per pair) gradient accumulation is deterministic for any thread count
        for t in (1, 3):
            torch.set_num_threads(t)
            img, alpha, grads = run_kernel(scene)
            assert torch.equal(img, base_img)
            assert all(torch.equal(gr, b) for gr, b in zip(grads, base_grads)), t
    finally:
        torch.set_num_threads(threads)
    for mode in ("threads", "atomics"):  # fallbacks for huge pair counts: other summation order only
        monkeypatch.setenv("STAG4D_KERNEL_GRAD_MODE", mode)
        _, _, grads = run_kernel(scene)
        monkeypatch.delenv("STAG4D_KERNEL_GRAD_MODE")
        for gr, b in zip(grads, base_grads):
            assert float((gr - b).abs().max()) <= 1e-5 * float(b.abs().max()), mode


def test_exp_matches_torch_within_a_few_ulp():
    s = torch.cat([torch.linspace(0, 60, 200001), torch.tensor([0.0, 1e-30, 5.54, 87.0, 1e4, float("inf")])])
    got = kernel_exp_neg(s.to(F32)).double()
    want = torch.exp(-s.to(F32).double().clamp(max=60.0))
    rel = ((got - want).abs() / want).max()
    assert float(rel) < 3 * 2.0**-23
    assert float(kernel_exp_neg(torch.tensor([-1.0, float("nan")]))[0]) == 1.0  # s < 0 is skipped by callers


def test_inputs_are_checked_and_views_are_accepted():
    scene = make_scene(seed=2, n=30, width=16, height=12, channels=3)
    args = [scene[k] for k in ("means2d", "conics", "features", "opacities", "depths", "radii")]
    ref_img, ref_alpha = composite_cpp(*args, 16, 12)
    # non-contiguous views, int64 radii and 1-D radii [N] (= same radius on both axes) are accepted
    m_t = scene["means2d"].t().contiguous().t()
    f_wide = torch.cat([scene["features"], scene["features"]], 1)[:, ::2]
    assert not m_t.is_contiguous() and not f_wide.is_contiguous()
    img, alpha = composite_cpp(m_t, scene["conics"], f_wide, *args[3:5], scene["radii"].long(), 16, 12)
    assert torch.equal(alpha, ref_alpha)
    img1, _ = composite_cpp(*args[:5], scene["radii"].amax(1), 16, 12)
    assert img1.shape == ref_img.shape
    with pytest.raises(TypeError, match="float32"):
        composite_cpp(scene["means2d"].double(), *args[1:], 16, 12)
    with pytest.raises(TypeError, match="integer"):
        composite_cpp(*args[:5], scene["radii"].float(), 16, 12)
    with pytest.raises(ValueError, match="shape"):
        composite_cpp(scene["means2d"], scene["conics"][:, :2], *args[2:], 16, 12)
    with pytest.raises(ValueError, match="tile_size"):
        composite_cpp(*args, 16, 12, tile_size=0)
    with pytest.raises(RuntimeError, match="float32"):  # the C++ entry point checks too
        cc._ext.forward(scene["means2d"].double(), *args[1:], 16, 12, 16)


def test_matches_the_pytorch_compositor_when_present():
    composite_torch = pytest.importorskip("stag4d_backend.render.composite_torch").composite_torch
    scene = make_scene(seed=31, n=500, width=64, height=48, channels=4, stack=30)
    weights = loss_weights(scene)
    img, alpha, grads = run_kernel(scene, weights=weights)
    leaves = [scene[k].clone().requires_grad_(True) for k in LEAF_NAMES]
    t_img, t_alpha = composite_torch(*leaves, scene["depths"], scene["radii"], 64, 48)
    loss = (t_img.double() * weights[0]).sum() + (t_alpha.double() * weights[1]).sum()
    t_grads = torch.autograd.grad(loss, leaves)
    assert float((img - t_img.detach()).abs().max()) < 1e-5
    assert float((alpha - t_alpha.detach()).abs().max()) < 1e-5
    assert_grads_close(grads, [t.double() for t in t_grads], rel=1e-4)


def _run_py(code: str, env_extra: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240,
                          cwd=REPO)


def test_failed_build_warns_once_and_falls_back(tmp_path):
    """A broken compiler: cpp_available() is False (no exception), one warning, composite_cpp still works."""
    code = """
import warnings, torch
warnings.simplefilter("always")
from stag4d_backend.render import composite_cpp as cc
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    a = cc.cpp_available(); b = cc.cpp_available()
    try:
        from stag4d_backend.render.composite_torch import composite_torch  # noqa: F401
        img, alpha = cc.composite_cpp(torch.zeros(1, 2), torch.tensor([[1.0, 0.0, 1.0]]), torch.ones(1, 3),
                                      torch.ones(1) * 0.5, torch.ones(1), torch.ones(1, 2, dtype=torch.int32), 4, 4)
        fell_back = tuple(img.shape) == (4, 4, 3)
    except ImportError:
        fell_back = True
print("RESULT", a, b, len([x for x in w if "could not be built" in str(x.message)]), fell_back)
"""
    out = _run_py(code, {"STAG4D_EXT_DIR": str(tmp_path / "ext"), "CXX": str(tmp_path / "no-such-compiler")})
    assert out.returncode == 0, out.stderr
    assert "RESULT False False 1 True" in out.stdout, out.stdout + out.stderr
    # the install-time entry point never fails the install
    cli = subprocess.run([sys.executable, "-m", "stag4d_backend.render.composite_cpp", "--build"], capture_output=True,
                         text=True, timeout=240, cwd=REPO,
                         env=dict(os.environ, STAG4D_EXT_DIR=str(tmp_path / "ext2"),
                                  CXX=str(tmp_path / "no-such-compiler")))
    assert cli.returncode == 0 and "WARNING" in cli.stderr


def test_build_entry_point_reports_the_cache():
    out = subprocess.run([sys.executable, "-m", "stag4d_backend.render.composite_cpp", "--build"],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert str(cc.build_directory()) in out.stdout and "simd=" in out.stdout


def test_disable_switch():
    out = _run_py("from stag4d_backend.render import composite_cpp as cc; print('RESULT', cc.cpp_available(), "
                  "cc.cpp_unavailable_reason())", {"STAG4D_DISABLE_CPP_KERNEL": "1"})
    assert "RESULT False disabled" in out.stdout, out.stdout + out.stderr

