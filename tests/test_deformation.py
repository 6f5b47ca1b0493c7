"""HexPlane deformation field + heads + regularisers (deformation.py): algorithm spec sections 4, 5 and 12."""

import math

import pytest
import torch

from stag4d_backend.gaussians.deformation import (
    PLANE_PAIRS,
    SPATIAL_PLANES,
    TIME_PLANES,
    DeformationConfig,
    DeformationNetwork,
    HexPlaneField,
    num_grid_parameters,
    deformed_params,
    plane_shapes,
    plane_smoothness,
)

SMALL = DeformationConfig(resolution=(8, 8, 8, 5), multires=(1, 2), feature_dim=8, width=16)


def _inputs(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    xyz = (torch.rand(n, 3, generator=g) - 0.5) * 1.2
    ls = torch.randn(n, 3, generator=g) - 3
    q = torch.randn(n, 4, generator=g)
    return xyz, ls, q


# ------------------------------------------------------------------------------------------------ structure


def test_plane_order_and_shapes():
    assert PLANE_PAIRS == ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
    assert SPATIAL_PLANES == (0, 1, 3) and TIME_PLANES == (2, 4, 5)
    shapes = plane_shapes(DeformationConfig())
    for s, m in enumerate((1, 2, 4, 8)):
        r = 64 * m
        assert shapes[s] == [(1, 32, r, r), (1, 32, r, r), (1, 32, 25, r), (1, 32, r, r), (1, 32, 25, r),
                             (1, 32, 25, r)]


def test_full_grid_parameter_count_and_feature_dim():
    cfg = DeformationConfig()
    assert num_grid_parameters(cfg) == 35_727_360
    field = HexPlaneField(cfg)  # really allocates the 143 MB grid
    assert sum(p.numel() for p in field.parameters()) == 35_727_360
    assert field.feat_dim == 128
    for s, planes in enumerate(field.grids):
        for p, plane in enumerate(planes):
            assert tuple(plane.shape) == plane_shapes(cfg)[s][p]
            plane = plane.detach()
            if p in TIME_PLANES:
                assert bool((plane == 1).all())
            else:
                assert 0.1 <= float(plane.min()) and float(plane.max()) <= 0.5
    xyz, _, _ = _inputs(10)
    assert field(xyz, torch.full((10, 1), 0.25)).shape == (10, 128)


def test_state_dict_names_match_the_authors():
    net = DeformationNetwork(SMALL, seed=0)
    keys = set(net.state_dict().keys())
    expected = {f"deformation_net.grid.grids.{s}.{p}" for s in range(2) for p in range(6)}
    expected |= {"deformation_net.feature_out.0.weight", "deformation_net.feature_out.0.bias"}
    for head in ("pos_deform", "scales_deform", "rotations_deform"):
        for i in (1, 3):
            expected |= {f"deformation_net.{head}.{i}.weight", f"deformation_net.{head}.{i}.bias"}
    assert keys == expected
    full_mlp = DeformationNetwork(DeformationConfig(resolution=(2, 2, 2, 2), multires=(1, 2, 4, 8)))
    n_mlp = sum(p.numel() for p in full_mlp.mlp_parameters())
    assert n_mlp == (128 * 64 + 64) + 3 * (64 * 64 + 64) + (64 * 3 + 3) * 2 + (64 * 4 + 4)
    groups = net.param_groups()
    assert [g["name"] for g in groups] == ["deformation", "grid"]
    assert len(groups[1]["params"]) == 12
    assert groups[0]["lr"] == pytest.approx(1.6e-3) and groups[1]["lr"] == pytest.approx(1.6e-2)


# ------------------------------------------------------------------------------------------------ coordinates


def test_aabb_sign_quirk_and_time_mapping():
    field = HexPlaneField(SMALL)
    p = torch.tensor([[0.8, -1.6, 0.4]])
    assert torch.allclose(field.normalize_xyz(p), -p / 1.6)
    plain = HexPlaneField(DeformationConfig(resolution=(8, 8, 8, 5), multires=(1,), flip_aabb=False))
    assert torch.allclose(plain.normalize_xyz(p), p / 1.6)
    t = torch.tensor([[0.0], [0.5]])
    assert torch.equal(field.map_time(t), t)
    sym = HexPlaneField(DeformationConfig(resolution=(8, 8, 8, 5), time_mapping="symmetric"))
    assert torch.equal(sym.map_time(t), 2 * t - 1)


def _ramp_field(plane_index, axis, cfg_kwargs=None):
    """One scale, one channel: every plane is 1 except ``plane_index`` = its pixel index along ``axis``."""
    cfg = DeformationConfig(resolution=(9, 7, 5, 25), multires=(1,), feature_dim=1, **(cfg_kwargs or {}))
    field = HexPlaneField(cfg)
    with torch.no_grad():
        for p in field.grids[0]:
            p.fill_(1.0)
        plane = field.grids[0][plane_index]
        h, w = plane.shape[-2:]
        ramp = torch.arange(w if axis == "w" else h, dtype=torch.float32)
        plane.copy_(ramp.view(1, 1, 1, w).expand_as(plane) if axis == "w" else ramp.view(1, 1, h, 1).expand_as(plane))
    return field


def test_sampling_coordinates_follow_the_pair_order():
    # plane 0 = (x, y): x indexes the width (res_x = 9), y the height (res_y = 7); align_corners=True
    xyz = torch.tensor([[0.8, -0.4, 0.0], [-1.6, 1.6, 0.3], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    t = torch.zeros(4, 1)
    f = _ramp_field(0, "w")(xyz, t)[:, 0]
    expected_x = ((-xyz[:, 0] / 1.6).clamp(-1, 1) + 1) / 2 * (9 - 1)  # border padding clamps outside the box
    assert torch.allclose(f, expected_x, atol=1e-5)
    f = _ramp_field(0, "h")(xyz, t)[:, 0]
    assert torch.allclose(f, ((-xyz[:, 1] / 1.6).clamp(-1, 1) + 1) / 2 * (7 - 1), atol=1e-5)
    # plane 5 = (z, t): time indexes the height; faithful t = 0 lands on cell 12 of 25
    times = torch.tensor([[0.0], [0.5], [29 / 30], [1.0]])
    f = _ramp_field(5, "h")(xyz, times)[:, 0]
    assert torch.allclose(f, (times[:, 0] + 1) / 2 * 24, atol=1e-5)
    assert f[0].item() == pytest.approx(12.0)
    f = _ramp_field(5, "h", {"time_mapping": "symmetric"})(xyz, times)[:, 0]
    assert torch.allclose(f, times[:, 0] * 24, atol=1e-5)


def test_feature_is_product_over_planes_and_concat_over_scales():
    torch.manual_seed(0)
    cfg = DeformationConfig(resolution=(6, 6, 6, 4), multires=(1, 2), feature_dim=3)
    field = HexPlaneField(cfg)
    with torch.no_grad():
        for planes in field.grids:
            for p in planes:
                p.uniform_(0.5, 1.5)
    xyz, _, _ = _inputs(5)
    t = torch.rand(5, 1)
    q = torch.cat([field.normalize_xyz(xyz), t], 1)
    feats = []
    for planes in field.grids:
        prod = torch.ones(5, 3)
        for (a, b), plane in zip(PLANE_PAIRS, planes):
            s = torch.nn.functional.grid_sample(plane, q[:, [a, b]].view(1, 1, 5, 2), align_corners=True,
                                                padding_mode="border")
            prod = prod * s.view(3, 5).T
        feats.append(prod)
    assert torch.allclose(field(xyz, t), torch.cat(feats, 1), atol=1e-6)


# ------------------------------------------------------------------------------------------------ network


def test_zero_head_init_is_exact_identity():
    net = DeformationNetwork(SMALL, seed=0)  # head_init="zero" is the default
    xyz, ls, q = _inputs()
    x2, s2, q2 = net.deform(xyz, ls, q, 0.3)
    assert torch.equal(x2, xyz) and torch.equal(s2, ls) and torch.equal(q2, q)
    assert x2.shape == (64, 3) and s2.shape == (64, 3) and q2.shape == (64, 4)


def test_authors_init_is_not_identity():
    net = DeformationNetwork(SMALL, seed=0, head_init="authors")
    xyz, ls, q = _inputs()
    with torch.no_grad():
        dx, ds, dq = net.deltas(xyz, 0.3)
    assert dx.shape == (64, 3) and ds.shape == (64, 3) and dq.shape == (64, 4)
    assert float(dx.abs().max()) > 1e-3 and float(dq.abs().max()) > 1e-3
    # biases keep PyTorch's default range U(+-1/sqrt(fan_in))
    b = net.deformation_net.pos_deform[3].bias.detach()
    assert float(b.abs().max()) <= 1 / math.sqrt(16) and float(b.abs().max()) > 0


def test_fused_heads_equal_the_modules():
    net = DeformationNetwork(SMALL, seed=1, head_init="authors")
    xyz, _, _ = _inputs()
    t = torch.full((64, 1), 0.7)
    fused = net.deformation_net(xyz, t)
    ref = net.deformation_net.forward_unfused(xyz, t)
    for a, b in zip(fused, ref):
        assert torch.allclose(a, b, atol=1e-6)


def test_time_forms_and_mask():
    net = DeformationNetwork(SMALL, seed=2, head_init="authors")
    xyz, ls, q = _inputs()
    ref = net.deform(xyz, ls, q, 0.4)
    for t in (torch.tensor(0.4), torch.full((64,), 0.4), torch.full((64, 1), 0.4)):
        for a, b in zip(net.deform(xyz, ls, q, t), ref):
            assert torch.allclose(a, b)
    per_point = torch.linspace(0, 1, 64)
    out = net.deform(xyz, ls, q, per_point)
    single = net.deform(xyz[10:11], ls[10:11], q[10:11], float(per_point[10]))
    assert torch.allclose(out[0][10:11], single[0], atol=1e-6)
    mask = torch.arange(64) % 3 == 0
    masked = net.deform(xyz, ls, q, 0.4, mask=mask)
    for a, b, raw in zip(masked, ref, (xyz, ls, q)):
        assert torch.allclose(a[mask], b[mask], atol=1e-6)
        assert torch.equal(a[~mask], raw[~mask])
    assert net(xyz, ls, q, 0.4)[0].shape == (64, 3)  # forward = deform


def test_gradients_flow_to_grids_mlp_and_inputs():
    net = DeformationNetwork(SMALL, seed=0, head_init="authors")
    xyz, ls, q = _inputs()
    xyz.requires_grad_(True)
    x2, s2, q2 = net.deform(xyz, ls, q, 0.6)
    (x2.square().sum() + s2.sum() + q2.square().sum()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    assert float(xyz.grad.abs().sum()) > 0


def test_zero_init_learns():
    net = DeformationNetwork(SMALL, seed=0)
    xyz, ls, q = _inputs()
    opt = torch.optim.Adam(net.param_groups(), eps=1e-15)
    for it in range(2):
        opt.zero_grad()
        x2, _, _ = net.deform(xyz, ls, q, 0.2)
        (x2 - xyz - 0.1).square().sum().backward()
        last = net.deformation_net.pos_deform[3].weight.grad
        assert float(last.abs().sum()) > 0
        if it == 1:  # after one step the gradient reaches the planes
            assert float(net.grid.grids[0][0].grad.abs().sum()) > 0
        opt.step()
    assert not torch.equal(net.deform(xyz, ls, q, 0.2)[0], xyz)


def test_empty_input():
    net = DeformationNetwork(SMALL, seed=0)
    x2, s2, q2 = net.deform(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 4), 0.5)
    assert x2.shape == (0, 3) and q2.shape == (0, 4)


def test_seeded_init_is_deterministic():
    a = DeformationNetwork(SMALL, seed=5, head_init="authors").state_dict()
    b = DeformationNetwork(SMALL, seed=5, head_init="authors").state_dict()
    c = DeformationNetwork(SMALL, seed=6, head_init="authors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# ------------------------------------------------------------------------------------------------ regularisers


def test_regularisers():
    net = DeformationNetwork(SMALL, seed=0)
    reg = net.regularization()
    assert set(reg) == {"plane_smoothness", "time_smoothness", "l1_time", "total"}
    assert reg["time_smoothness"].item() == 0.0 and reg["l1_time"].item() == 0.0  # time planes start at 1
    assert reg["plane_smoothness"].detach() > 0
    torch.manual_seed(0)
    with torch.no_grad():
        for planes in net.grid.grids:
            for p in planes:
                p.copy_(torch.rand_like(p))
    reg = net.regularization()

    def smooth(p):  # mean squared second difference along the height axis
        d2 = p[..., 2:, :] - 2 * p[..., 1:-1, :] + p[..., :-2, :]
        return d2.square().mean()

    grids = net.grid.grids
    spatial = sum(smooth(planes[i]) for planes in grids for i in (0, 1, 3))
    temporal = sum(smooth(planes[i]) for planes in grids for i in (2, 4, 5))
    l1 = sum((1 - planes[i]).abs().mean() for planes in grids for i in (2, 4, 5))
    assert torch.allclose(reg["plane_smoothness"], spatial, atol=1e-6)
    assert torch.allclose(reg["time_smoothness"], temporal, atol=1e-6)
    assert torch.allclose(reg["l1_time"], l1, atol=1e-6)
    assert torch.allclose(reg["total"], 0.05 * spatial + 5 * temporal + 0.05 * l1, atol=1e-5)
    custom = net.regularization({"time_smoothness": 0.0})
    assert torch.allclose(custom["total"], 0.05 * spatial + 0.05 * l1, atol=1e-5)
    reg["total"].backward()
    assert all(p.grad is not None for p in net.grid_parameters())
    assert float(plane_smoothness(torch.ones(1, 2, 2, 5))) == 0.0  # height < 3 guard


# ------------------------------------------------------------------------------------------------ authors' checkpoint


def test_load_authors_state_dict():
    cfg = DeformationConfig.authors(resolution=(8, 8, 8, 5), multires=(1, 2), feature_dim=8, width=16)
    src = DeformationNetwork(cfg, seed=11)
    theirs = dict(src.state_dict())
    theirs.update({
        "timenet.0.weight": torch.zeros(64, 9), "timenet.0.bias": torch.zeros(64),
        "time_poc": torch.ones(4), "pos_poc": torch.ones(10), "rotation_scaling_poc": torch.ones(2),
        "opacity_poc": torch.ones(2), "deformation_net.opacity_deform.3.weight": torch.zeros(1, 16),
        "deformation_net.grid.aabb": torch.tensor([[1.6] * 3, [-1.6] * 3]),
    })
    dst = DeformationNetwork(cfg, seed=12)
    ignored = dst.load_authors_state_dict(theirs)
    assert len(ignored) == 8
    xyz, ls, q = _inputs()
    for a, b in zip(dst.deform(xyz, ls, q, 0.5), src.deform(xyz, ls, q, 0.5)):
        assert torch.equal(a, b)
    missing = {k: v for k, v in theirs.items() if k != "deformation_net.feature_out.0.bias"}
    with pytest.raises(KeyError):
        dst.load_authors_state_dict(missing)
    wrong = dict(theirs)
    wrong["deformation_net.grid.grids.0.0"] = torch.zeros(1, 8, 4, 4)
    with pytest.raises(ValueError):
        dst.load_authors_state_dict(wrong)


def test_small_config_preset():
    cfg = DeformationConfig.small()
    assert num_grid_parameters(cfg) < 1_000_000
    net = DeformationNetwork(cfg, seed=0)
    assert net.grid.feat_dim == 64
    with pytest.raises(ValueError):
        DeformationConfig(head_init="nope")


def test_deformed_params_for_a_frame():
    from stag4d_backend.gaussians.model import GaussianModel

    model = GaussianModel.init_random_ball(50, seed=0)
    net = DeformationNetwork(SMALL, seed=0, head_init="authors")
    with torch.no_grad():
        frame = deformed_params(model.params, net, 3 / 30)
        dx, ds, dq = net.deltas(model.xyz, 0.1)
    assert torch.allclose(frame["xyz"], model.xyz + dx)
    assert torch.allclose(frame["scaling"], model.scaling + ds)
    assert torch.allclose(frame["rotation"], model.rotation + dq)
    assert frame["opacity"] is model.opacity and frame["f_dc"] is model.f_dc
    assert deformed_params(model.params, None, 0.5)["xyz"] is model.xyz  # coarse stage: no deformation


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    src = DeformationNetwork(SMALL, seed=3, head_init="authors")
    save_file(src.state_dict(), str(tmp_path / "deformation.safetensors"))
    dst = DeformationNetwork(SMALL, seed=4)
    dst.load_state_dict(load_file(str(tmp_path / "deformation.safetensors")))
    xyz, ls, q = _inputs()
    with torch.no_grad():
        for a, b in zip(dst.deform(xyz, ls, q, 0.5), src.deform(xyz, ls, q, 0.5)):
            assert torch.equal(a, b)
