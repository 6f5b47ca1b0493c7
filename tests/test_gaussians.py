"""Canonical Gaussians (model.py) and the schedules (schedules.py): algorithm spec sections 3, 4, 5, 8 and 12."""

import math

import numpy as np
import pytest
import torch

from stag4d_backend.gaussians import schedules
from stag4d_backend.gaussians.model import (
    PARAM_NAMES,
    SH_C0,
    GaussianModel,
    covariance_matrices,
    eval_sh,
    inverse_sigmoid,
    knn_mean_sq_dist,
    quaternion_to_rotation_matrix,
    sh_degree_from_rest,
)


@pytest.fixture(scope="module")
def ball():
    return GaussianModel.init_random_ball(num_pts=10000, radius=0.5, seed=0)


# ------------------------------------------------------------------------------------------------ initialisation


def test_init_shapes_and_names(ball):
    assert list(ball.params.keys()) == list(PARAM_NAMES)
    n = 10000
    assert ball.xyz.shape == (n, 3)
    assert ball.f_dc.shape == (n, 1, 3)
    assert ball.f_rest.shape == (n, 0, 3)
    assert ball.opacity.shape == (n, 1)
    assert ball.scaling.shape == (n, 3)
    assert ball.rotation.shape == (n, 4)
    assert ball.sh_degree == 0 and len(ball) == n
    assert all(p.dtype == torch.float32 and p.requires_grad for p in ball.params.values())


def test_init_statistics(ball):
    r = ball.xyz.detach().norm(dim=1)
    assert float(r.max()) <= 0.5 + 1e-6
    # r = 0.5 * cbrt(u): the median radius is 0.5 * cbrt(0.5) = 0.397
    assert abs(float(r.median()) - 0.5 * 0.5 ** (1 / 3)) < 0.01
    # uniform directions: the mean position is near the origin
    assert float(ball.xyz.detach().mean(0).abs().max()) < 0.02
    assert torch.allclose(ball.opacities, torch.full((10000, 1), 0.1), atol=1e-6)
    assert torch.equal(ball.rotation.detach(), torch.tensor([1.0, 0, 0, 0]).expand(10000, 4))
    f = ball.f_dc.detach()
    assert float(f.min()) >= 0.0 and float(f.max()) <= 1.0 / 255.0
    assert abs(float(f.mean()) - 0.5 / 255.0) < 2e-4
    c = ball.colors().detach()
    assert float(c.min()) >= 0.5 and float(c.max()) <= 0.5 + SH_C0 / 255 + 1e-6  # mid-grey
    s = ball.scales.detach()
    assert bool((s > 0).all())
    assert torch.equal(s[:, 0], s[:, 1]) and torch.equal(s[:, 0], s[:, 2])  # isotropic
    # expected kNN spacing for 10k points in a ball of radius 0.5: a few hundredths
    assert 0.005 < float(s.median()) < 0.05


def test_init_knn_scales_match_brute_force(ball):
    xyz = ball.xyz.detach().double()
    sub = torch.arange(0, 10000, 97)
    d2 = torch.cdist(xyz[sub], xyz).square()
    d2[torch.arange(len(sub)), sub] = float("inf")  # exclude the point itself
    mean3 = d2.topk(3, largest=False).values.mean(1)
    expected = torch.log(torch.sqrt(torch.clamp_min(mean3, 1e-7))).float()
    assert torch.allclose(ball.scaling.detach()[sub, 0], expected, atol=1e-5)


def test_init_deterministic():
    a = GaussianModel.init_random_ball(500, seed=3)
    b = GaussianModel.init_random_ball(500, generator=torch.Generator().manual_seed(3))
    c = GaussianModel.init_random_ball(500, seed=4)
    for name in PARAM_NAMES:
        assert torch.equal(a.params[name], b.params[name])
    assert not torch.equal(a.xyz, c.xyz)


def test_knn_degenerate():
    assert knn_mean_sq_dist(torch.zeros(1, 3)).shape == (1,)
    assert knn_mean_sq_dist(torch.zeros(0, 3)).shape == (0,)
    # two points: one neighbour each
    d = knn_mean_sq_dist(torch.tensor([[0.0, 0, 0], [0.3, 0, 0]]))
    assert torch.allclose(d, torch.tensor([0.09, 0.09]))
    m = GaussianModel.init_random_ball(1, seed=0)  # clamp 1e-7 -> log(sqrt(1e-7))
    assert torch.allclose(m.scaling.detach(), torch.full((1, 3), 0.5 * math.log(1e-7)))


# ------------------------------------------------------------------------------------------------ activations, SH


def test_activations():
    m = GaussianModel.from_arrays(
        xyz=torch.zeros(2, 3),
        f_dc=torch.tensor([[1.0, -3.0, 0.0], [0.0, 0.0, 0.0]]),
        opacity=torch.tensor([0.0, inverse_sigmoid(torch.tensor(0.25)).item()]),
        scaling=torch.log(torch.tensor([[0.1, 0.2, 0.3], [1.0, 1.0, 1.0]])),
        rotation=torch.tensor([[2.0, 0, 0, 0], [0.0, 0, 0, 3.0]]),
    )
    assert torch.allclose(m.scales, torch.tensor([[0.1, 0.2, 0.3], [1.0, 1.0, 1.0]]))
    assert torch.allclose(m.opacities.ravel(), torch.tensor([0.5, 0.25]))
    assert torch.allclose(m.rotations, torch.tensor([[1.0, 0, 0, 0], [0.0, 0, 0, 1.0]]))
    c = m.colors()
    assert torch.allclose(c[0], torch.tensor([0.5 + SH_C0, 0.0, 0.5]))  # clamped at 0 like the authors
    assert torch.allclose(c[1], torch.full((3,), 0.5))


def _fibonacci_sphere(n):
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (3 - math.sqrt(5)) * i
    r = torch.sqrt(1 - z * z)
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], 1)


def test_sh_basis_orthonormal_up_to_degree_3():
    n = 20000
    dirs = _fibonacci_sphere(n)
    # basis values: coefficients = identity (channel c holds basis function c)
    basis = eval_sh(3, torch.eye(16, dtype=torch.float64).expand(n, 16, 16), dirs)  # [n, 16]
    gram = basis.T @ basis * (4 * math.pi / n)
    assert torch.allclose(gram, torch.eye(16, dtype=torch.float64), atol=2e-3)


def test_sh_known_values_and_signs():
    sh = torch.zeros(1, 16, 1)
    d = torch.tensor([[0.0, 1.0, 0.0]])
    sh[0, 1, 0] = 1.0  # the "y" coefficient has a minus sign in 3DGS
    assert torch.allclose(eval_sh(1, sh, d), torch.tensor([[-0.4886025119029199]]))
    sh = torch.zeros(1, 16, 1)
    sh[0, 6, 0] = 1.0  # C2[2] * (2z^2 - x^2 - y^2)
    assert torch.allclose(eval_sh(2, sh, torch.tensor([[0.0, 0.0, 1.0]])), torch.tensor([[2 * 0.31539156525252005]]))
    with pytest.raises(ValueError):
        eval_sh(2, torch.zeros(1, 4, 3), d)


def test_colors_view_dependent():
    torch.manual_seed(0)
    m = GaussianModel.from_arrays(torch.randn(5, 3), torch.randn(5, 3), f_rest=torch.randn(5, 15, 3) * 0.1)
    assert m.sh_degree == 3
    campos = torch.tensor([0.0, 0.0, 2.0])
    c = m.colors_from_camera(campos)
    dirs = torch.nn.functional.normalize(m.xyz.detach() - campos, dim=-1)
    expected = torch.clamp_min(eval_sh(3, m.features.detach(), dirs) + 0.5, 0.0)
    assert torch.allclose(c, expected)
    assert torch.allclose(m.colors(dirs, degree=0), torch.clamp_min(0.5 + SH_C0 * m.f_dc[:, 0], 0.0))
    with pytest.raises(ValueError):
        m.colors(None)


def test_rotation_matrix_and_covariance():
    q = torch.tensor([[1.0, 0, 0, 0], [math.cos(math.pi / 4), 0, 0, math.sin(math.pi / 4)], [3.0, 1.0, -2.0, 0.5]])
    r = quaternion_to_rotation_matrix(q)
    assert torch.allclose(r[0], torch.eye(3))
    assert torch.allclose(r[1] @ torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1.0, 0]), atol=1e-6)  # 90 deg about z
    assert torch.allclose(r[2] @ r[2].T, torch.eye(3), atol=1e-6)
    assert abs(float(torch.linalg.det(r[2])) - 1) < 1e-6
    cov = covariance_matrices(torch.tensor([[0.1, 0.2, 0.3]]), torch.tensor([[1.0, 0, 0, 0]]))
    assert torch.allclose(cov[0], torch.diag(torch.tensor([0.01, 0.04, 0.09])))


# ------------------------------------------------------------------------------------------------ arrays, state


def test_from_arrays_state_roundtrip():
    torch.manual_seed(1)
    n = 7
    arrays = {
        "xyz": torch.randn(n, 3),
        "f_dc": torch.randn(n, 1, 3),
        "f_rest": torch.randn(n, 8, 3),
        "opacity": torch.randn(n, 1),
        "scaling": torch.randn(n, 3),
        "rotation": torch.randn(n, 4),
    }
    m = GaussianModel.from_arrays(**{k: v.numpy() for k, v in arrays.items()})
    assert m.sh_degree == 2
    st = m.state()
    for k in PARAM_NAMES:
        assert torch.equal(st[k], arrays[k])
        assert not st[k].requires_grad
    st["xyz"] += 1  # a copy: the model is untouched
    assert torch.equal(m.xyz.detach(), arrays["xyz"])
    m2 = GaussianModel().load_state(m.state())
    assert m2.sh_degree == 2 and all(torch.equal(m2.params[k], m.params[k]) for k in PARAM_NAMES)
    # flat f_rest = PLY channel-major layout
    flat = arrays["f_rest"].transpose(1, 2).reshape(n, 24)
    m3 = GaussianModel.from_arrays(arrays["xyz"], arrays["f_dc"], flat, arrays["opacity"], arrays["scaling"],
                                   arrays["rotation"])
    assert torch.equal(m3.f_rest.detach(), arrays["f_rest"])
    with pytest.raises(ValueError):
        GaussianModel().load_state({**m.state(), "scaling": torch.zeros(n, 2)})
    with pytest.raises(KeyError):
        GaussianModel().load_state({"xyz": torch.zeros(1, 3)})
    assert sh_degree_from_rest(0) == 0 and sh_degree_from_rest(15) == 3
    with pytest.raises(ValueError):
        sh_degree_from_rest(5)


def test_from_arrays_defaults():
    m = GaussianModel.from_arrays(torch.rand(20, 3), torch.zeros(20, 3))
    assert torch.allclose(m.opacities, torch.full((20, 1), 0.1))
    assert torch.equal(m.rotations, torch.tensor([1.0, 0, 0, 0]).expand(20, 4))
    assert m.f_rest.shape == (20, 0, 3)
    assert bool(torch.isfinite(m.scaling).all())


def test_param_groups_and_optimizer(ball):
    groups = ball.param_groups()
    assert [g["name"] for g in groups] == list(PARAM_NAMES)
    assert all(len(g["params"]) == 1 and g["params"][0] is ball.params[g["name"]] for g in groups)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["xyz"] == pytest.approx(2e-3) and lrs["opacity"] == pytest.approx(2e-2)
    opt = ball.make_optimizer()
    assert opt.defaults["eps"] == 1e-15
    assert isinstance(opt, torch.optim.Adam)


# ------------------------------------------------------------------------------------------------ schedules


def test_learning_rates_section_12():
    lr = schedules.learning_rates
    assert lr(0)["xyz"] == pytest.approx(2e-3, rel=1e-12)
    assert lr(1000)["xyz"] == pytest.approx(2e-4, rel=1e-12)
    assert lr(2000)["xyz"] == pytest.approx(2e-5, rel=1e-12)
    assert lr(5000)["xyz"] == pytest.approx(2e-5, rel=1e-12)
    assert lr(0)["grid"] == pytest.approx(1.6e-2) and lr(2000)["grid"] == pytest.approx(1.6e-3)
    assert lr(1000)["grid"] == pytest.approx(math.sqrt(1.6e-2 * 1.6e-3))
    assert lr(0)["deformation"] == pytest.approx(1.6e-3) and lr(4000)["deformation"] == pytest.approx(1.6e-4)
    for name, value in [("f_dc", 5e-3), ("f_rest", 2.5e-4), ("opacity", 2e-2), ("scaling", 1e-2),
                        ("rotation", 2e-3)]:
        assert lr(0)[name] == value and lr(3333)[name] == value
    assert schedules.log_linear_lr(-1, 1e-3, 1e-4) == 0.0
    assert schedules.log_linear_lr(500, 0.0, 0.0) == 0.0


def test_apply_learning_rates(ball):
    opt = ball.make_optimizer()
    schedules.apply_learning_rates(opt, 1000)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["xyz"] == pytest.approx(2e-4) and lrs["f_dc"] == 5e-3
    opts = {"xyz": torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.0)}
    schedules.apply_learning_rates(opts, 2000)
    assert opts["xyz"].param_groups[0]["lr"] == pytest.approx(2e-5)


def test_sds_t_range_and_resolution():
    assert schedules.sds_t_range(0) == (500, 950)
    assert schedules.sds_t_range(1500) == (260, 725)
    assert schedules.sds_t_range(3000) == (20, 500)
    assert schedules.sds_t_range(8000) == (20, 500)
    assert [schedules.render_resolution(i) for i in (1, 599, 600, 1199, 1200, 8000)] == [128, 128, 256, 256, 512, 512]
    assert schedules.step_ratio(1000) == 0.5 and schedules.step_ratio(4000) == 1.0
    assert not schedules.is_fine_stage(700) and schedules.is_fine_stage(701)
    assert schedules.frame_time(15, 30) == 0.5
