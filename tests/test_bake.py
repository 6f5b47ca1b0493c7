"""The bake stage and its exporters: batched evaluation, per-frame PLY, gaussians.usdc, mesh.usdc, cameras.json,
preview.mp4, retiming/fps, bad input, reruns. Every format is re-read (plyfile / pxr) and compared at several
frames with ``AnimatedGaussians.at_frame``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bake_fixtures import (SMALL_CFG, creature_model, make_fit_dir, mesh_fit,  # noqa: F401  (fixtures)
                           moving_rigid_deformation, small_fit)
from stag4d_backend.export.frames import FrameSampler, deform_points, sample_frames, srgb_to_linear
from stag4d_backend.fitted import FittedModelError, load_fitted
from stag4d_backend.gaussians.deformation import TIME_PLANES, DeformationConfig, DeformationNetwork
from stag4d_backend.gaussians.ply import load_ply, ply_attribute_names, save_model_ply
from stag4d_backend.stages.bake import CLI_ERRORS, BakeError, bake, bake_job, parse_formats

pxr = pytest.importorskip("pxr")
from pxr import Sdf, Usd, UsdGeom  # noqa: E402


def open_stage(path):
    """Open a USD file fresh from disk (the layer registry may still hold an earlier version)."""
    layer = Sdf.Layer.FindOrOpen(str(path))
    layer.Reload(force=True)
    return Usd.Stage.Open(layer)


def expected(fit_dir, frame_value):
    animated, _ = load_fitted(fit_dir)
    g = animated.at_frame(frame_value)
    return {k: v.detach().numpy() for k, v in g.raw.items()}, g


# --------------------------------------------------------------------------------------- batched evaluation

@pytest.mark.parametrize("cfg", [
    dict(resolution=(8, 8, 8, 4), multires=(1,), feature_dim=8, width=16),
    dict(resolution=(6, 7, 5, 5), multires=(1, 2), feature_dim=4, width=16, depth=2),
    dict(resolution=(8, 8, 8, 3), multires=(1,), feature_dim=8, width=16, time_mapping="symmetric",
         flip_aabb=False),
])
def test_frame_sampler_matches_network(cfg):
    net = DeformationNetwork(DeformationConfig(**cfg, head_init="authors"), seed=3)
    with torch.no_grad():
        for planes in net.grid.grids:
            for pi in TIME_PLANES:
                planes[pi].add_(torch.randn_like(planes[pi]))
    xyz = (torch.rand(700, 3, generator=torch.Generator().manual_seed(0)) - 0.5) * 4.0  # some outside the AABB
    times = [0.0, 0.13, 0.5, 0.999, 1.3]
    # Blocks both inside one frame and spanning frames.
    for mlp_rows in (256, 1000):
        d = FrameSampler(net, xyz, chunk_points=1500, mlp_rows=mlp_rows).deltas(times)
        with torch.no_grad():
            for k, t in enumerate(times):
                for name, ref in zip(("pos", "scale", "rot"), net.deltas(xyz, t)):
                    torch.testing.assert_close(d[name][k], ref, rtol=1e-5, atol=1e-5)
    pos_only = FrameSampler(net, xyz).deltas(times, heads=("pos",))
    torch.testing.assert_close(pos_only["pos"], d["pos"], rtol=1e-5, atol=1e-6)


def rigid_net(seed: int = 3) -> DeformationNetwork:
    return moving_rigid_deformation(DeformationConfig(**SMALL_CFG, head_init="authors", motion="rigid"), seed)


def test_frame_sampler_rigid_matches_deform():
    from stag4d_backend.gaussians.animated import AnimatedGaussians

    net = rigid_net()
    xyz = (torch.rand(700, 3, generator=torch.Generator().manual_seed(0)) - 0.5) * 4.0  # some outside the AABB
    times = [0.0, 0.13, 0.5, 0.999]
    d = FrameSampler(net, xyz, chunk_points=1500, mlp_rows=256).deltas(times)
    assert list(d) == ["pos", "scale", "rot", "rigid"] and d["rigid"].shape == (4, 700, 3)
    angles = d["rigid"].norm(dim=-1)
    assert float(angles.max()) > math.pi and float(angles.std()) > 0.1  # large, spatially varying rotations
    with torch.no_grad():
        for k, t in enumerate(times):
            for name, ref in zip(net.head_names, net.deltas(xyz, t)):
                torch.testing.assert_close(d[name][k], ref, rtol=1e-5, atol=1e-5)
    # Gaussians: sample_frames = deform (rotated centres and quaternions)
    model = creature_model(300)
    animated = AnimatedGaussians(model, net, 4)
    fv = [0.0, 1.5, 3.0]
    s = sample_frames(animated, fv)
    p = model.params
    for k, f in enumerate(fv):
        with torch.no_grad():
            want = net.deform(p["xyz"], p["scaling"], p["rotation"], f / 4)
        assert float((want[0] - p["xyz"].detach()).norm(dim=-1).max()) > 0.1  # the test really rotates
        for arr, ref in zip((s.xyz[k], s.scaling[k], s.rotation[k]), want):
            np.testing.assert_allclose(arr, ref.numpy(), rtol=0, atol=2e-5)
    # Arbitrary points (mesh vertices): R p + dx
    pts = xyz.numpy()
    moved = deform_points(net, pts, times)
    for k, t in enumerate(times):
        with torch.no_grad():
            want = net.deform(xyz, torch.zeros(700, 3), torch.zeros(700, 4), t)[0]
        np.testing.assert_allclose(moved[k], want.numpy(), rtol=0, atol=2e-5)


def test_rigid_fit_bakes_like_at_frame(tmp_path):
    from plyfile import PlyData

    fit = make_fit_dir(tmp_path / "fit", num_gaussians=300, num_frames=3, net=rigid_net(5))
    animated, _ = load_fitted(fit)
    assert animated.deformation.cfg.motion == "rigid"
    bake(fit, tmp_path / "bake", formats="ply")
    for f in range(3):
        v = PlyData.read(str(tmp_path / "bake" / "ply" / f"{f:04d}.ply"))["vertex"]
        raw, _ = expected(fit, f)
        np.testing.assert_allclose(np.stack([v["x"], v["y"], v["z"]], 1), raw["xyz"], atol=2e-5)
        np.testing.assert_allclose(np.stack([v[f"scale_{i}"] for i in range(3)], 1), raw["scaling"], atol=2e-5)
        np.testing.assert_allclose(np.stack([v[f"rot_{i}"] for i in range(4)], 1), raw["rotation"], atol=2e-5)


def test_sample_frames_equals_at_frame(small_fit):
    animated, _ = load_fitted(small_fit)
    fv = [0.0, 1.5, 3.0]
    s = sample_frames(animated, fv)
    assert s.xyz.shape == (3, 400, 3) and s.rotation.shape == (3, 400, 4)
    for k, f in enumerate(fv):
        raw = animated.at_frame(f).raw
        for key, arr in (("xyz", s.xyz[k]), ("scaling", s.scaling[k]), ("rotation", s.rotation[k])):
            np.testing.assert_allclose(arr, raw[key].numpy(), atol=2e-6)
    np.testing.assert_allclose(s.times, np.array(fv) / 4)


# --------------------------------------------------------------------------------------- PLY

def test_ply_sequence_round_trip(small_fit, tmp_path):
    from plyfile import PlyData

    res = bake(small_fit, tmp_path / "bake", formats="ply")
    files = sorted((tmp_path / "bake" / "ply").iterdir())
    assert [f.name for f in files] == ["0000.ply", "0001.ply", "0002.ply", "0003.ply"]
    assert res.files["ply"] == files
    for f in (0, 2, 3):
        ply = PlyData.read(str(files[f]))
        v = ply["vertex"]
        assert [p.name for p in v.properties] == ply_attribute_names(0)
        assert len(v.data) == 400 and ply.text is False and ply.byte_order == "<"
        raw, _ = expected(small_fit, f)
        np.testing.assert_allclose(np.stack([v["x"], v["y"], v["z"]], 1), raw["xyz"], atol=2e-6)
        np.testing.assert_allclose(np.stack([v[f"scale_{i}"] for i in range(3)], 1), raw["scaling"], atol=2e-6)
        np.testing.assert_allclose(np.stack([v[f"rot_{i}"] for i in range(4)], 1), raw["rotation"], atol=2e-6)
        np.testing.assert_array_equal(v["opacity"], raw["opacity"].reshape(-1))  # static: bit-exact
        np.testing.assert_array_equal(np.stack([v[f"f_dc_{i}"] for i in range(3)], 1), raw["f_dc"].reshape(-1, 3))
        assert not np.any(np.stack([v["nx"], v["ny"], v["nz"]]))


def test_ply_bytes_equal_the_reference_writer(tmp_path):
    """With SH degree 1 (f_rest channel-major), each file is byte-identical to gaussians.ply.save_model_ply."""
    fit = make_fit_dir(tmp_path / "fit", num_gaussians=150, num_frames=3, sh_degree=1)
    bake(fit, tmp_path / "bake", formats=["ply"])
    animated, _ = load_fitted(fit)
    s = sample_frames(animated, [0, 1, 2])
    for k in range(3):
        save_model_ply(tmp_path / f"ref{k}.ply", None, params=s.raw_frame(k))
        assert (tmp_path / "bake" / "ply" / f"{k:04d}.ply").read_bytes() == (tmp_path / f"ref{k}.ply").read_bytes()
        back = load_ply(tmp_path / "bake" / "ply" / f"{k:04d}.ply")
        assert back["f_rest"].shape == (150, 3, 3)
        np.testing.assert_array_equal(back["f_rest"], animated.model.params["f_rest"].detach().numpy())


# --------------------------------------------------------------------------------------- USD (Gaussians)

def test_gaussians_usd_round_trip(small_fit, tmp_path):
    res = bake(small_fit, tmp_path / "bake", formats="usd")
    path = tmp_path / "bake" / "gaussians.usdc"
    assert res.files["usd"] == [path] and path.read_bytes()[:8] == b"PXR-USDC"
    stage = open_stage(path)
    assert UsdGeom.GetStageUpAxis(stage) == "Y" and UsdGeom.GetStageMetersPerUnit(stage) == 1.0
    assert (stage.GetStartTimeCode(), stage.GetEndTimeCode()) == (0, 3)
    assert stage.GetTimeCodesPerSecond() == 12.0 and stage.GetFramesPerSecond() == 12.0
    assert stage.GetDefaultPrim().GetPath() == "/STAG4D"
    info = stage.GetRootLayer().customLayerData["stag4d"]
    assert info["num_gaussians"] == 400 and list(info["times"]) == [0.0, 0.25, 0.5, 0.75]

    pts = UsdGeom.Points(stage.GetPrimAtPath("/STAG4D/gaussians"))
    pv = UsdGeom.PrimvarsAPI(pts)
    for name in ("displayColor", "displayOpacity", "opacity", "scales", "orientations"):
        assert pv.GetPrimvar(name).GetInterpolation() == "vertex", name
    assert pts.GetWidthsInterpolation() == "vertex"
    assert pv.GetPrimvar("orientations").GetTypeName() == Sdf.ValueTypeNames.QuatfArray
    assert pv.GetPrimvar("scales").GetTypeName() == Sdf.ValueTypeNames.Float3Array
    # Only what changes per frame is time-sampled.
    assert pts.GetPointsAttr().GetNumTimeSamples() == 4
    assert pv.GetPrimvar("scales").GetAttr().GetNumTimeSamples() == 4
    assert pv.GetPrimvar("displayColor").GetAttr().GetNumTimeSamples() == 0
    assert pv.GetPrimvar("opacity").GetAttr().GetNumTimeSamples() == 0

    splat = stage.GetPrimAtPath("/STAG4D/splats")
    assert splat.GetTypeName() == "ParticleField3DGaussianSplat"
    from pxr import UsdVol

    sp = UsdVol.ParticleField3DGaussianSplat(splat)
    assert sp.GetRadianceSphericalHarmonicsDegreeAttr().Get() == 0

    _, g0 = expected(small_fit, 0)
    opac = g0.opacities.numpy()
    np.testing.assert_allclose(np.array(pv.GetPrimvar("opacity").Get()), opac, atol=1e-6)
    np.testing.assert_allclose(np.array(pv.GetPrimvar("displayOpacity").Get()), opac, atol=1e-6)
    np.testing.assert_allclose(np.array(sp.GetOpacitiesAttr().Get()), opac, atol=1e-6)
    colors = g0.colors.numpy()
    # not clipped at 1 (the rasteriser blends colours over 1 unclamped; Blender must get them too)
    np.testing.assert_allclose(np.array(pv.GetPrimvar("displayColor").Get()), srgb_to_linear(colors, above_one=True),
                               atol=1e-6)
    sh = np.array(sp.GetRadianceSphericalHarmonicsCoefficientsAttr().Get())
    np.testing.assert_allclose(0.5 + 0.28209479177387814 * sh, np.maximum(colors, 0), atol=1e-5)

    for f in (0, 1, 3):
        raw, g = expected(small_fit, f)
        means, scales, quats = g.means.numpy(), g.scales.numpy(), g.quats.numpy()
        p = np.array(pts.GetPointsAttr().Get(f))
        np.testing.assert_allclose(p, means, atol=2e-6)
        np.testing.assert_allclose(np.array(sp.GetPositionsAttr().Get(f)), means, atol=2e-6)
        np.testing.assert_allclose(np.array(pts.GetWidthsAttr().Get(f)), 2 * scales.max(1), rtol=1e-5)
        np.testing.assert_allclose(np.array(pv.GetPrimvar("scales").Get(f)), scales, rtol=1e-5)
        np.testing.assert_allclose(np.array(sp.GetScalesAttr().Get(f)), scales, rtol=1e-5)
        q_usd = pv.GetPrimvar("orientations").Get(f)
        wxyz = np.array([[q.GetReal(), *q.GetImaginary()] for q in q_usd])
        np.testing.assert_allclose(wxyz, quats, atol=1e-6)
        q_sp = sp.GetOrientationsAttr().Get(f)
        np.testing.assert_allclose(np.array([[q.GetReal(), *q.GetImaginary()] for q in q_sp]), quats, atol=1e-6)
        lo, hi = np.array(pts.GetExtentAttr().Get(f))
        assert np.all(lo <= means.min(0)) and np.all(hi >= means.max(0))
    # Frames really differ (the test model moves).
    assert np.abs(np.array(pts.GetPointsAttr().Get(3)) - np.array(pts.GetPointsAttr().Get(0))).max() > 0.005


def test_usd_display_color_keeps_colours_over_one(tmp_path):
    """A Gaussian whose colour exceeds 1 (a fifth of a real fit's do in some channel) keeps it in displayColor:
    the rasteriser blends colours unclamped and clamps only the pixel, and Blender's display must do the same
    (clipped, its render came out ~8/255 darker). The sRGB curve goes on past 1, so encoding it back is exact."""
    from bake_fixtures import creature_model, moving_deformation
    from stag4d_backend.fitted import save_fitted
    from stag4d_backend.gaussians.model import rgb_to_sh

    model = creature_model(50, 0)
    rgb = np.full((50, 3), 0.5, dtype=np.float32)
    rgb[:10] = [1.4, 1.1, 0.2]
    model.f_dc.data[:] = rgb_to_sh(torch.from_numpy(rgb)).reshape(model.f_dc.shape)
    fit = tmp_path / "fit"
    save_fitted(fit, model, moving_deformation(0, 0.05),
                {"num_frames": 2, "fps": 12.0, "time": "t = f / num_frames", "source_size": 64, "num_gaussians": 50})
    bake(fit, tmp_path / "bake", formats="usd")
    stage = Usd.Stage.Open(str(tmp_path / "bake" / "gaussians.usdc"))
    colour = np.array(UsdGeom.PrimvarsAPI(stage.GetPrimAtPath("/STAG4D/gaussians")).GetPrimvar("displayColor").Get())
    encoded = np.where(colour > 0.0031308, 1.055 * np.maximum(colour, 0) ** (1 / 2.4) - 0.055, 12.92 * colour)
    np.testing.assert_allclose(encoded, rgb, atol=1e-5)
    assert colour[:10, 0].min() > 1.5 and colour[:10, 1].min() > 1.0
    np.testing.assert_allclose(srgb_to_linear(np.array([0.5, 1.0, 1.5])), srgb_to_linear(np.array([0.5, 1.0, 1.5]),
                               above_one=True)[[0, 1, 1]], atol=1e-7)


def test_usd_sh_degree_and_size(tmp_path):
    """SH degree 1: (d+1)^2 coefficients per particle, f_dc first; the file stays within 1.5x the raw float32
    size of the per-frame attributes (positions, orientations, scales) thanks to usdc's value deduplication."""
    fit = make_fit_dir(tmp_path / "fit", num_gaussians=5000, num_frames=6, sh_degree=1)
    bake(fit, tmp_path / "bake", formats="usd")
    path = tmp_path / "bake" / "gaussians.usdc"
    stage = open_stage(path)
    from pxr import UsdVol

    sp = UsdVol.ParticleField3DGaussianSplat(stage.GetPrimAtPath("/STAG4D/splats"))
    assert sp.GetRadianceSphericalHarmonicsDegreeAttr().Get() == 1
    sh = np.array(sp.GetRadianceSphericalHarmonicsCoefficientsAttr().Get()).reshape(-1, 4, 3)
    animated, _ = load_fitted(fit)
    p = animated.model.params
    np.testing.assert_array_equal(sh[:, 0], p["f_dc"].detach().numpy().reshape(-1, 3))
    np.testing.assert_array_equal(sh[:, 1:], p["f_rest"].detach().numpy())
    n = animated.model.num_points
    raw = 6 * n * (3 + 4 + 3) * 4
    assert path.stat().st_size <= 1.5 * raw, (path.stat().st_size, raw)


# --------------------------------------------------------------------------------------- frames, fps, retiming

def test_retiming_and_fps(small_fit, tmp_path):
    res = bake(small_fit, tmp_path / "a", formats="usd,ply", frames=8)
    assert res.num_frames == 8 and res.fps == 24.0 and res.fps_source == "fit, retimed"  # 12 fps x 8/4
    manifest = json.loads((tmp_path / "a" / "bake.json").read_text())
    np.testing.assert_allclose(manifest["times"], np.arange(8) / 8)
    assert len(list((tmp_path / "a" / "ply").iterdir())) == 8
    stage = open_stage(tmp_path / "a" / "gaussians.usdc")
    assert stage.GetEndTimeCode() == 7 and stage.GetTimeCodesPerSecond() == 24.0
    raw, _ = expected(small_fit, 1.5)  # output frame 3 of 8 = source frame 1.5
    pts = UsdGeom.Points(stage.GetPrimAtPath("/STAG4D/gaussians"))
    np.testing.assert_allclose(np.array(pts.GetPointsAttr().Get(3)), raw["xyz"], atol=2e-6)

    res = bake(small_fit, tmp_path / "b", formats="ply", fps=30)
    assert (res.fps, res.fps_source, res.num_frames) == (30.0, "--fps", 4)

    fit = make_fit_dir(tmp_path / "nofps", num_gaussians=100, num_frames=2, fps=None)
    res = bake(fit, tmp_path / "c", formats="ply")
    assert res.fps == 24.0 and res.fps_source == "default" and any("24" in n for n in res.notes)


# --------------------------------------------------------------------------------------- mesh

def _edges(faces):
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), 1)
    return np.unique(e, axis=0, return_counts=True)


def test_mesh_closed_single_piece_and_animated(mesh_fit, tmp_path):
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    res = bake(mesh_fit, tmp_path / "bake", formats="mesh", mesh_resolution=64)
    stage = open_stage(tmp_path / "bake" / "mesh.usdc")
    assert UsdGeom.GetStageUpAxis(stage) == "Y" and stage.GetEndTimeCode() == 2
    mesh = UsdGeom.Mesh(stage.GetPrimAtPath("/STAG4D/mesh"))
    counts = np.array(mesh.GetFaceVertexCountsAttr().Get())
    faces = np.array(mesh.GetFaceVertexIndicesAttr().Get()).reshape(-1, 3)
    assert np.all(counts == 3) and mesh.GetSubdivisionSchemeAttr().Get() == "none"
    assert mesh.GetPointsAttr().GetNumTimeSamples() == 3
    assert mesh.GetFaceVertexIndicesAttr().GetNumTimeSamples() == 0  # fixed topology
    v0 = np.array(mesh.GetPointsAttr().Get(0))
    assert res.mesh["vertices"] == len(v0) and res.mesh["faces"] == len(faces) and len(v0) > 1000
    # Closed (every edge in exactly two triangles: no holes), one piece (no fragments), outward orientation.
    _, cnt = _edges(faces)
    assert np.all(cnt == 2)
    e, _ = _edges(faces)
    n_comp, _ = connected_components(coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(len(v0),) * 2),
                                     directed=False)
    assert n_comp == 1
    a, b, c = v0[faces[:, 0]], v0[faces[:, 1]], v0[faces[:, 2]]
    volume = np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6
    assert volume > 0.005  # the creature's body alone is ~0.05 m^3; a sliver shell would be near 0
    for f in (1, 2):  # same vertex count every frame, and the vertices move (exact values: next test)
        vf = np.array(mesh.GetPointsAttr().Get(f))
        assert vf.shape == v0.shape and np.abs(vf - v0).max() > 1e-3
    colors = np.array(UsdGeom.PrimvarsAPI(mesh).GetPrimvar("displayColor").Get())
    assert colors.shape == v0.shape and colors.min() >= 0 and colors.max() <= 1 and colors.std() > 0.05


@pytest.mark.parametrize("motion", ["gaussians", "field"])
def test_mesh_vertices_follow_the_field(tmp_path, motion):
    """Exact check of the vertex motion: re-extract the canonical mesh, compare every frame with
    'vertex + dx(vertex, t)' (field) or 'vertex + kernel-weighted dx of its nearest Gaussians' (gaussians)."""
    from stag4d_backend.export.mesh_extract import extract_mesh

    fit = make_fit_dir(tmp_path / "fit", num_gaussians=1500, num_frames=3, seed=2)
    res = bake(fit, tmp_path / "bake", formats="mesh", mesh_resolution=40, mesh_motion=motion)
    assert res.mesh["motion"] == motion
    animated, _ = load_fitted(fit)
    m = animated.model
    with torch.no_grad():
        mu = m.params["xyz"].numpy()
        canon = extract_mesh(mu, m.scales.numpy(), m.rotations.numpy(), m.opacities.numpy().reshape(-1),
                             m.colors(degree=0).numpy(), resolution=40)
    assert np.allclose(canon.weights.sum(1), 1.0, atol=1e-5) and canon.neighbors.max() < m.num_points
    stage = open_stage(tmp_path / "bake" / "mesh.usdc")
    mesh = UsdGeom.Mesh(stage.GetPrimAtPath("/STAG4D/mesh"))
    np.testing.assert_array_equal(np.array(mesh.GetFaceVertexIndicesAttr().Get()).reshape(-1, 3), canon.faces)
    for f in range(3):
        with torch.no_grad():
            if motion == "field":
                dx = animated.deformation.deltas(torch.as_tensor(canon.vertices), f / 3)[0].numpy()
            else:
                g = animated.deformation.deltas(torch.as_tensor(mu), f / 3)[0].numpy()
                dx = np.einsum("vk,vkc->vc", canon.weights, g[canon.neighbors])
        np.testing.assert_allclose(np.array(mesh.GetPointsAttr().Get(f)), canon.vertices + dx, atol=2e-6)


def test_mesh_drops_flying_fragments():
    from stag4d_backend.export.mesh_extract import extract_mesh
    from stag4d_backend.example_scene import ExampleCreature

    c = ExampleCreature(2500, seed=1).at(0.0)
    rng = np.random.default_rng(0)
    floater = np.array([0.45, 0.4, 0.3]) + rng.normal(0, 0.01, (12, 3))  # a small opaque cluster, far away
    means = np.concatenate([c.means.numpy(), floater]).astype(np.float32)
    scales = np.concatenate([c.scales.numpy(), np.full((12, 3), 0.015)]).astype(np.float32)
    quats = np.concatenate([c.quats.numpy(), np.tile([1.0, 0, 0, 0], (12, 1))]).astype(np.float32)
    opac = np.concatenate([c.opacities.numpy(), np.full(12, 0.99)]).astype(np.float32)
    cols = np.concatenate([c.colors.numpy(), np.zeros((12, 3))]).astype(np.float32)
    m = extract_mesh(means, scales, quats, opac, cols, resolution=64)
    assert m.stats["components_total"] >= 2 and m.stats["components_kept"] == 1
    assert np.linalg.norm(m.vertices - floater.mean(0), axis=1).min() > 0.05
    _, cnt = _edges(m.faces)
    assert np.all(cnt == 2)


# --------------------------------------------------------------------------------------- cameras, preview

def test_cameras_json(small_fit, tmp_path):
    from stag4d_backend.render.cameras import ANCHOR_AZIMUTHS, ANCHOR_ELEVATIONS, OrbitCamera, blender_camera_matrix
    from stag4d_backend.export.turntable import read_cameras

    bake(small_fit, tmp_path / "bake", formats="cameras")
    path = tmp_path / "bake" / "cameras.json"
    cams = json.loads(path.read_text())
    assert [c["name"] for c in cams] == ["input"] + [f"anchor_{k}" for k in range(6)]
    assert [c["azimuth"] for c in cams[1:]] == list(ANCHOR_AZIMUTHS)
    assert [c["elevation"] for c in cams[1:]] == list(ANCHOR_ELEVATIONS)
    assert cams[0]["size"] == 64 and cams[1]["size"] == 320  # source_size from meta.json; Zero123++ tiles
    assert len(read_cameras(path)) == 7  # also a valid `stag4d render --cameras` file
    for c in cams:
        cam = OrbitCamera.from_dict(c)
        np.testing.assert_allclose(np.array(c["viewmat"]) @ np.array(c["c2w"]), np.eye(4), atol=1e-9)
        np.testing.assert_allclose(c["blender"]["matrix_world"], blender_camera_matrix(cam), atol=1e-9)
        assert c["blender"]["sensor_fit"] == "VERTICAL" and math.isclose(c["blender"]["angle"],
                                                                          math.radians(c["fovy"]))
        uvw = np.array(c["K"]) @ (np.array(c["viewmat"]) @ np.array([0, 0, 0, 1.0]))[:3]
        np.testing.assert_allclose(uvw[:2] / uvw[2], [c["size"] / 2] * 2, atol=1e-6)  # looks at the origin


def test_preview_mp4(small_fit, tmp_path):
    import imageio.v2 as imageio

    res = bake(small_fit, tmp_path / "bake", formats="preview", preview_size=32)
    path = tmp_path / "bake" / "preview.mp4"
    assert res.files["preview"] == [path]
    frames = [f for f in imageio.get_reader(path)]
    assert len(frames) == 4 and frames[0].shape[:2] == (32, 32)
    assert frames[0].min() < 200  # something is drawn on the white background


# --------------------------------------------------------------------------------------- errors, reruns, CLI helper

def test_bad_input_is_one_line_and_writes_nothing(small_fit, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [
        (dict(fit_dir=tmp_path / "empty"), FittedModelError, "meta.json"),
        (dict(fit_dir=tmp_path / "missing"), BakeError, "no such directory"),
        (dict(formats="usd,gltf2"), BakeError, "unknown format 'gltf2'"),
        (dict(formats=""), BakeError, "no format"),
        (dict(fps=0), BakeError, "--fps"),
        (dict(fps=float("nan")), BakeError, "--fps"),
        (dict(frames=0), BakeError, "--frames"),
        (dict(frames=2.5), BakeError, "--frames"),
        (dict(mesh_motion="bones"), BakeError, "mesh motion"),
    ]
    for kw, exc, text in cases:
        args = dict(fit_dir=small_fit, bake_dir=tmp_path / "out", **{"formats": "usd,ply"})
        args.update(kw)
        with pytest.raises(exc) as info:
            bake(**args)
        assert isinstance(info.value, CLI_ERRORS)
        msg = str(info.value)
        assert text in msg and "\n" not in msg, msg
        assert not (tmp_path / "out").exists()
    # A corrupt deformation file is a clear error too.
    bad = make_fit_dir(tmp_path / "bad", num_gaussians=50, num_frames=2)
    (bad / "deformation.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BakeError, match="cannot read the fitted model"):
        bake(bad, tmp_path / "out2")
    assert parse_formats("PLY, usd") == ("usd", "ply") and parse_formats("all")[-1] == "cameras"


def test_rerun_overwrites_consistently(small_fit, tmp_path):
    out = tmp_path / "bake"
    bake(small_fit, out, formats="usd,ply,mesh", mesh_resolution=32)
    assert len(list((out / "ply").iterdir())) == 4 and (out / "mesh.usdc").exists()
    # Same frames and fps: the mesh from the first run is still valid and kept.
    res = bake(small_fit, out, formats="ply")
    assert (out / "mesh.usdc").exists() and not res.removed
    assert set(json.loads((out / "bake.json").read_text())["formats"]) == {"usd", "ply", "mesh", "cameras"}
    # Fewer frames: no stale PLY files; the old USD files (4 frames) are removed as stale.
    res = bake(small_fit, out, formats="ply", frames=2)
    assert sorted(p.name for p in (out / "ply").iterdir()) == ["0000.ply", "0001.ply"]
    assert not (out / "mesh.usdc").exists() and not (out / "gaussians.usdc").exists()
    assert {p.name for p in res.removed} == {"mesh.usdc", "gaussians.usdc"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp leftovers
    manifest = json.loads((out / "bake.json").read_text())
    assert manifest["num_frames"] == 2 and set(manifest["formats"]) == {"ply", "cameras"}


def test_bake_job_and_progress(small_fit, tmp_path):
    import shutil

    job = tmp_path / "job"
    shutil.copytree(small_fit, job / "model")
    events = []
    res = bake_job(job, formats="ply", progress=events.append)
    assert res.bake_dir == job / "bake" and (job / "bake" / "ply" / "0003.ply").exists()
    assert events[-1]["step"] == events[-1]["total"] and all(e["stage"] == "bake" for e in events)
    assert any("files" in e for e in events)


def test_bake_a_real_fit(tmp_path):
    """End to end with the fit stage's own output (tiny preset, a few seconds)."""
    from stag4d_backend.config import get_preset
    from stag4d_backend.example_scene import ExampleCreature, write_stag4d_layout
    from stag4d_backend.stages.fit import fit

    data = write_stag4d_layout(ExampleCreature(1500, seed=3), tmp_path / "data", num_frames=2, size=32,
                               anchor_size=32)
    fit(data, tmp_path / "fit", get_preset("tiny"))
    res = bake(tmp_path / "fit", tmp_path / "fit" / "bake", formats="usd,ply")
    animated, _ = load_fitted(tmp_path / "fit")
    assert res.num_gaussians == animated.model.num_points and res.num_frames == 2
    back = load_ply(tmp_path / "fit" / "bake" / "ply" / "0001.ply")
    np.testing.assert_allclose(back["xyz"], animated.at_frame(1).raw["xyz"].numpy(), atol=2e-6)
