"""The rasteriser's per-pixel stop depth (render/ray_stop.py): equal to a dense per-pixel reference, and nothing
behind it shows in the real rasteriser's image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stag4d_backend.render import rasterize
from stag4d_backend.render.projection import project_gaussians
from stag4d_backend.render.ray_stop import dilate_max, stop_depths
from stag4d_backend.render.reference import ALPHA_THRESHOLD, MAX_ALPHA, T_THRESHOLD

from test_rasterize import intrinsics, look_at


def dense_scene(seed: int, n: int = 400):
    """Overlapping, mostly opaque Gaussians (most pixels saturate), some faint ones and some needles."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * torch.tensor([0.9, 0.7, 0.9],
                                                                                     dtype=torch.float64)
    quats = torch.randn(n, 4, generator=g, dtype=torch.float64)
    scales = torch.rand(n, 3, generator=g, dtype=torch.float64) * 0.15 + 0.06
    scales[::9, 1] *= 0.05
    opacities = torch.rand(n, generator=g, dtype=torch.float64) * 0.2 + 0.79
    opacities[::5] = torch.rand(len(opacities[::5]), generator=g, dtype=torch.float64) * 0.05 + 0.002
    colors = torch.rand(n, 3, generator=g, dtype=torch.float64)
    return means, quats, scales, opacities, colors


def brute_force_stop(p, opacities, width, height, t_stop: float = T_THRESHOLD) -> np.ndarray:
    """Every drawn Gaussian at every pixel centre, in depth order (render/reference.py's loop)."""
    ys, xs = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    T = np.ones((height, width))
    done = np.zeros((height, width), bool)
    stop = np.full((height, width), np.inf)
    drawn = (p.radii > 0).all(-1).numpy()
    for g in np.argsort(p.depths.numpy(), kind="stable"):
        if not drawn[g]:
            continue
        (mx, my), (a, b, c) = p.means2d[g].numpy(), p.conics[g].numpy()
        dx, dy = mx - xs, my - ys
        sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
        alpha = np.minimum(float(opacities[g]) * np.exp(-sigma), MAX_ALPHA)
        live = (sigma >= 0) & (alpha >= ALPHA_THRESHOLD) & ~done
        nxt = T * (1 - alpha)
        ends = live & (nxt <= t_stop)
        T = np.where(live & ~ends, nxt, T)
        stop = np.where(ends, float(p.depths[g]), stop)
        done |= ends
    return stop


def _project(params, w, h):
    means, quats, scales, opacities, _ = params
    V, K = look_at((0.3, 0.2, 2.0), dtype=torch.float64), intrinsics(w, h, dtype=torch.float64)
    return V, K, project_gaussians(means, quats, scales, opacities, V, K, w, h)


def _stop(p, opacities, w, h, t_stop=T_THRESHOLD):
    return stop_depths(p.means2d.numpy(), p.conics.numpy(), opacities.numpy(), p.depths.numpy(), p.cov2d.numpy(),
                       (p.radii > 0).all(-1).numpy(), w, h, t_stop=t_stop)


@pytest.mark.parametrize("seed,t_stop", [(0, T_THRESHOLD), (1, T_THRESHOLD), (2, T_THRESHOLD), (0, 0.01)])
def test_stop_depths_equal_the_dense_reference(seed, t_stop):
    w, h = 56, 44
    params = dense_scene(seed)
    _, _, p = _project(params, w, h)
    stop = _stop(p, params[3], w, h, t_stop)
    ref = brute_force_stop(p, params[3], w, h, t_stop)
    assert np.isfinite(ref).mean() > 0.15 and not np.isfinite(ref).all()  # pixels that stop and pixels that don't
    np.testing.assert_array_equal(stop, ref)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_nothing_behind_the_stop_shows(backend):
    """The real rasteriser: Gaussians deeper than a cut are dropped; every pixel whose stop depth is at or before
    the cut keeps its colour, alpha and depth; pixels that stop later (or never) do change. With a stop
    transmittance of 0.01 the kept pixels change by at most 0.01 (what lay behind, at most that much of it)."""
    if backend == "cpp":
        from stag4d_backend.render.rasterize import cpp_compositor_available

        if not cpp_compositor_available():
            pytest.skip("the compiled compositor is not available here")
    w, h = 56, 44
    params = dense_scene(4)
    V, K, p = _project(params, w, h)
    stop = _stop(p, params[3], w, h)
    cut = float(np.median(p.depths.numpy()[(p.radii > 0).all(-1).numpy()]))
    keep = p.depths <= cut
    f32 = [t.float() for t in params]
    full = rasterize(*f32, V.float(), K.float(), w, h, (0.0, 0.0, 0.0), backend=backend)
    front = rasterize(*[t[keep] for t in f32], V.float(), K.float(), w, h, (0.0, 0.0, 0.0), backend=backend)
    same = torch.from_numpy(stop <= cut)
    assert 0.1 < float(same.float().mean()) < 0.9
    for a, b in ((full.rgb, front.rgb), (full.alpha, front.alpha), (full.depth, front.depth)):
        torch.testing.assert_close(a[same], b[same], rtol=1e-5, atol=1e-5)
    assert float((full.rgb - front.rgb).abs().amax(-1)[~same].max()) > 0.05
    early = torch.from_numpy(_stop(p, params[3], w, h, 0.01) <= cut)
    assert float(early.float().mean()) > float(same.float().mean())  # more pixels stop before the cut
    assert float((full.rgb - front.rgb).abs()[early].max()) <= 0.01 + 1e-5
    assert float((full.alpha - front.alpha).abs()[early].max()) <= 0.01 + 1e-5


def test_stop_depths_refuse_a_transmittance_outside_the_range():
    args = (np.zeros((1, 2)), np.ones((1, 3)), np.ones(1), np.ones(1), np.ones((1, 3)), np.ones(1, bool), 4, 4)
    for bad in (0.0, 1e-5, 1.0):
        with pytest.raises(ValueError, match="t_stop"):
            stop_depths(*args, t_stop=bad)


def test_dilate_max_takes_the_neighbourhood_maximum():
    stop = np.full((5, 6), np.inf)
    stop[1:4, 1:5] = np.arange(12, dtype=float).reshape(3, 4)
    out = dilate_max(stop)
    assert out[2, 2] == 10.0 and out[2, 3] == 11.0  # the largest of the 3x3 around each
    assert np.isinf(out[2, 1])  # next to the never-stopping border column
    assert np.isinf(out[1, 1])  # a neighbour never stops: neither does the pixel
    assert np.isinf(out[0]).all() and np.isinf(out[:, 0]).all()
    assert math.isinf(dilate_max(np.array([[1.0]]))[0, 0])  # the border's outside never stops


def test_render_views_writes_stop_maps_behind_the_depth(tmp_path):
    """``stag4d render --views --stop-depth``: stop_NNNN.png next to rgba/depth; wherever a pixel stops, its stop
    depth lies at or behind the expected depth of what it shows (the depth is a mean over the Gaussians before
    the stop); pixels that stop and pixels that do not both exist; without the flag no stop map is written."""
    import json

    from PIL import Image

    from bake_fixtures import make_fit_dir
    from stag4d_backend.export.camera_views import render_views
    from stag4d_backend.render.cameras import OrbitCamera, blender_camera_matrix

    fit = make_fit_dir(tmp_path / "fit", num_gaussians=3000, num_frames=2)
    cam = OrbitCamera(elevation=10.0, azimuth=30.0, size=64)
    obj = np.eye(4)
    obj[:3, :3] = [[1, 0, 0], [0, 0, -1], [0, 1, 0]]  # the importer's +90 degrees about X
    cam_in_obj = np.linalg.inv(obj) @ blender_camera_matrix(cam)
    views = [{"index": f, "frame": f, "camera_in_object": cam_in_obj.tolist(), "K": cam.K.tolist(),
              "width": cam.size, "height": cam.size} for f in range(2)]
    (tmp_path / "views.json").write_text(json.dumps(views))
    render_views(fit, tmp_path / "views.json", tmp_path / "with", stop_depth=True)
    render_views(fit, tmp_path / "views.json", tmp_path / "without")
    assert not list((tmp_path / "without").glob("stop_*.png"))
    for f in range(2):
        stop = np.array(Image.open(tmp_path / "with" / f"stop_{f:04d}.png")).astype(np.int64)
        depth = np.array(Image.open(tmp_path / "with" / f"depth_{f:04d}.png")).astype(np.int64)
        stops = stop < 65535
        assert 0.02 < stops.mean() < 0.9
        assert (stop[stops] >= depth[stops]).all()
        assert np.median(stop[stops] - depth[stops]) < 300  # within 0.3 units: the creature's front surface
