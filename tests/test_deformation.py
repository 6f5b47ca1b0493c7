"""HexPlane deformation field + heads + regularisers (deformation.py): algorithm spec sections 4, 5 and 12."""

import json
import math
from dataclasses import replace

import numpy as np
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
    apply_deltas,
    deformed_params,
    plane_shapes,
    plane_smoothness,
)
from bake_fixtures import moving_rigid_deformation, quat_to_matrix
from stag4d_backend.gaussians.rigid import SMALL_ANGLE_SQ, quat_multiply, quat_rotate, rotvec_to_quat

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


# ------------------------------------------------------------------------------------------------ rigid motion

RIGID = replace(SMALL, motion="rigid")


def _rodrigues(w) -> np.ndarray:
    """Independent reference: rotation matrix of the rotation vector w (axis * angle)."""
    w = np.asarray(w, dtype=np.float64)
    theta = np.linalg.norm(w)
    if theta == 0:
        return np.eye(3)
    x, y, z = w / theta
    k = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * (k @ k)


def _quat_matrices(q) -> np.ndarray:
    """Rotation matrices [N, 3, 3] of (w, x, y, z) quaternions [N, 4], normalised first."""
    q = np.asarray(q, dtype=np.float64)
    return quat_to_matrix(q / np.linalg.norm(q, axis=-1, keepdims=True))


def _moving_rigid(seed=0):
    return moving_rigid_deformation(replace(RIGID, head_init="authors"), seed)


def test_rigid_config_heads_and_state_dict():
    with pytest.raises(ValueError):
        DeformationConfig(motion="spin")
    assert DeformationConfig().motion == "offset"
    offset = DeformationNetwork(SMALL, seed=5, head_init="authors")
    rigid = DeformationNetwork(RIGID, seed=5, head_init="authors")
    assert offset.head_names == ("pos", "scale", "rot") and len(offset.deformation_net.heads()) == 3
    assert rigid.head_names == ("pos", "scale", "rot", "rigid") and len(rigid.deformation_net.heads()) == 4
    a, b = offset.state_dict(), rigid.state_dict()
    extra = {f"deformation_net.rotvec_deform.{i}.{k}" for i in (1, 3) for k in ("weight", "bias")}
    assert set(b) == set(a) | extra
    assert all(torch.equal(a[k], b[k]) for k in a)  # the extra head is built last: same seeded init elsewhere
    assert tuple(b["deformation_net.rotvec_deform.3.weight"].shape) == (3, 16)
    assert float(b["deformation_net.rotvec_deform.3.weight"].abs().max()) > 0  # authors: xavier like the others
    zero = DeformationNetwork(RIGID, seed=5)
    for k in ("weight", "bias"):
        assert not bool(getattr(zero.deformation_net.rotvec_deform[3], k).any())
    xyz, _, _ = _inputs()
    t = torch.full((64, 1), 0.7)
    fused = rigid.deformation_net(xyz, t)
    ref = rigid.deformation_net.forward_unfused(xyz, t)
    assert [tuple(x.shape) for x in fused] == [(64, 3), (64, 3), (64, 4), (64, 3)]
    for x, y in zip(fused, ref):
        assert torch.allclose(x, y, atol=1e-6)
    with torch.no_grad():
        d = rigid.deltas(xyz, 0.7)
    assert len(d) == 4 and all(torch.allclose(x, y, atol=1e-6) for x, y in zip(d, fused))


def test_rigid_zero_heads_is_exact_identity():
    net = DeformationNetwork(RIGID, seed=0)
    xyz, ls, q = _inputs()
    x2, s2, q2 = net.deform(xyz, ls, q, 0.3)
    assert torch.equal(x2, xyz) and torch.equal(s2, ls) and torch.equal(q2, q)
    assert torch.equal(rotvec_to_quat(torch.zeros(2, 3)), torch.tensor([[1.0, 0, 0, 0]] * 2))


@pytest.mark.parametrize("w", [
    (0.3, -0.2, 0.5),
    (0.0, 0.0, 4.0),                                    # angle > pi
    tuple(np.array([1.0, 2.0, -2.0]) / 3 * (2 * math.pi + 0.7)),  # more than a full turn
    (0.0, 0.0, math.pi),
    (6e-4, -3e-4, 2e-4),                                # small-angle (series) branch
    (0.0, 1e-2, 0.0),                                   # at the branch switch
])
def test_rigid_deform_matches_rodrigues(w):
    net = DeformationNetwork(RIGID, seed=1).double()  # zero heads; biases set below, so the motion is constant
    shift = torch.tensor([0.1, -0.25, 0.4], dtype=torch.float64)
    with torch.no_grad():
        net.deformation_net.rotvec_deform[3].bias.copy_(torch.tensor(w, dtype=torch.float64))
        net.deformation_net.pos_deform[3].bias.copy_(shift)
    xyz, ls, q = (x.double() for x in _inputs())
    with torch.no_grad():
        x2, s2, q2 = net.deform(xyz, ls, q, 0.45)
    R = _rodrigues(w)
    np.testing.assert_allclose(x2.numpy(), xyz.numpy() @ R.T + shift.numpy(), rtol=0, atol=1e-12)
    assert torch.equal(s2, ls)
    np.testing.assert_allclose(q2.norm(dim=-1).numpy(), q.norm(dim=-1).numpy(), rtol=1e-12)  # still raw
    np.testing.assert_allclose(_quat_matrices(q2.numpy()), R @ _quat_matrices(q.numpy()), rtol=0, atol=1e-12)


def test_rigid_part_rotating_about_a_centre():
    """A spatially constant (w, c - R c) turns every point about c: distances to c are kept."""
    w = torch.tensor([0.2, 1.1, -0.4], dtype=torch.float64)
    c = torch.tensor([0.3, -0.1, 0.2], dtype=torch.float64)
    qw = rotvec_to_quat(w)
    xyz, ls, q = (x.double() for x in _inputs())
    n = xyz.shape[0]
    dx = (c - quat_rotate(qw, c)).expand(n, 3)
    x2, _, _ = apply_deltas(xyz, ls, q, (dx, torch.zeros(n, 3), torch.zeros(n, 4), w.expand(n, 3)))
    np.testing.assert_allclose((x2 - c).norm(dim=-1).numpy(), (xyz - c).norm(dim=-1).numpy(), atol=1e-12)
    np.testing.assert_allclose((x2 - c).numpy(), (xyz - c).numpy() @ _rodrigues(w.numpy()).T, atol=1e-12)


def test_rotvec_to_quat_is_periodic_and_smooth():
    axis = torch.tensor([2.0, -1.0, 2.0], dtype=torch.float64) / 3
    for a in (0.3, 2.0, 3.5):
        np.testing.assert_allclose(rotvec_to_quat(axis * (a + 2 * math.pi)).numpy(),
                                   -rotvec_to_quat(axis * a).numpy(), atol=1e-12)
    np.testing.assert_allclose(rotvec_to_quat(axis * 2 * math.pi).numpy(), [-1, 0, 0, 0], atol=1e-12)
    # Both sides of the small-angle switch agree to float64 rounding.
    edge = math.sqrt(SMALL_ANGLE_SQ)
    below, above = rotvec_to_quat(axis * edge * (1 - 1e-9)), rotvec_to_quat(axis * edge * (1 + 1e-9))
    np.testing.assert_allclose(below.numpy(), above.numpy(), atol=1e-11)
    for a in (0.0, 3e-3, edge * 0.999, edge * 1.001, 1.0, 4.0):
        w = (axis * a + torch.tensor([1e-4, 2e-4, -1e-4], dtype=torch.float64) * (a > 0)).requires_grad_(True)
        assert torch.autograd.gradcheck(rotvec_to_quat, (w,))
    # d q / d w at 0 = (0, I / 2)
    jac = torch.autograd.functional.jacobian(rotvec_to_quat, torch.zeros(3, dtype=torch.float64))
    np.testing.assert_allclose(jac.numpy(), np.vstack([np.zeros((1, 3)), 0.5 * np.eye(3)]), atol=1e-15)


def test_quaternion_product_and_rotation_agree():
    g = torch.Generator().manual_seed(3)
    a = torch.nn.functional.normalize(torch.randn(10, 4, generator=g, dtype=torch.float64), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(10, 4, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(10, 3, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(quat_rotate(quat_multiply(a, b), v).numpy(), quat_rotate(a, quat_rotate(b, v)).numpy(),
                               atol=1e-12)
    np.testing.assert_allclose(_quat_matrices(a.numpy()) @ v.numpy()[..., None], quat_rotate(a, v).numpy()[..., None],
                               atol=1e-12)


def test_rigid_gradients_finite_at_zero_rotation():
    net = DeformationNetwork(RIGID, seed=0)  # zero heads: w = 0 exactly
    xyz, ls, q = _inputs()
    xyz.requires_grad_(True)
    x2, s2, q2 = net.deform(xyz, ls, q, 0.6)
    target = torch.roll(xyz.detach(), 1, dims=1)  # not reachable by a translation alone
    ((x2 - target).square().sum() + s2.sum() + (q2 - 1).square().sum()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert bool(torch.isfinite(xyz.grad).all())
    assert float(net.deformation_net.rotvec_deform[3].weight.grad.abs().sum()) > 0  # the rotation head learns
    assert float(net.deformation_net.rotvec_deform[3].bias.grad.abs().sum()) > 0


def test_rigid_mask_and_deformed_params():
    net = _moving_rigid(seed=2)
    xyz, ls, q = _inputs()
    with torch.no_grad():
        ref = net.deform(xyz, ls, q, 0.4)
        mask = torch.arange(64) % 3 == 0
        masked = net.deform(xyz, ls, q, 0.4, mask=mask)
        frame = deformed_params({"xyz": xyz, "scaling": ls, "rotation": q, "opacity": ls[:, :1]}, net, 0.4, mask)
    assert float((ref[0] - xyz).abs().max()) > 0.1 and float((ref[2] - q).abs().max()) > 0.1  # really moves
    for a, b, raw, key in zip(masked, ref, (xyz, ls, q), ("xyz", "scaling", "rotation")):
        assert torch.allclose(a[mask], b[mask], atol=1e-6)
        assert torch.equal(a[~mask], raw[~mask])
        assert torch.equal(frame[key], a)
    # deform = apply_deltas of deltas
    with torch.no_grad():
        again = apply_deltas(xyz, ls, q, net.deltas(xyz, 0.4))
    assert all(torch.equal(a, b) for a, b in zip(again, ref))


def test_rigid_fitted_round_trip_and_old_configs(tmp_path):
    from safetensors.torch import load_file, save_file

    from stag4d_backend.fitted import DEFORMATION, load_fitted, save_fitted
    from stag4d_backend.gaussians.model import GaussianModel

    model = GaussianModel.init_random_ball(80, seed=0)
    meta = {"num_frames": 4, "fps": 12.0}
    net = _moving_rigid(seed=4)
    save_fitted(tmp_path / "rigid", model, net, meta)
    animated, _ = load_fitted(tmp_path / "rigid")
    assert animated.deformation.cfg == net.cfg and animated.deformation.cfg.motion == "rigid"
    p = model.params
    for f in (0, 1.5, 3):
        with torch.no_grad():
            want = net.deform(p["xyz"], p["scaling"], p["rotation"], f / 4)
        raw = animated.at_frame(f).raw
        for key, b in zip(("xyz", "scaling", "rotation"), want):
            assert torch.equal(raw[key], b)
    # A file written before the option existed (no "motion" in its config) loads as the offset motion.
    offset = DeformationNetwork(SMALL, seed=6, head_init="authors")
    save_fitted(tmp_path / "old", model, offset, meta)
    path = tmp_path / "old" / DEFORMATION
    cfg = offset.cfg.to_dict()
    del cfg["motion"]
    save_file(load_file(str(path)), str(path), metadata={"deformation_config": json.dumps(cfg),
                                                        "format_version": "1"})
    old, _ = load_fitted(tmp_path / "old")
    assert old.deformation.cfg.motion == "offset" and old.deformation.cfg == offset.cfg
    with torch.no_grad():
        want = offset.deform(p["xyz"], p["scaling"], p["rotation"], 0.25)
    assert all(torch.equal(a, b) for a, b in zip(old.deformation.deform(p["xyz"], p["scaling"], p["rotation"], 0.25),
                                                 want))
