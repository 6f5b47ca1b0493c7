"""EWA projection vs an independent scalar NumPy transcription of gsplat 1.5's projection kernel."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stag4d_backend.render.projection import covariance_3d, project_gaussians, quat_to_rotmat


def project_one(mean, quat, scale, opacity, viewmat, K, width, height, near=0.01, far=1e10, eps2d=0.3):
    """One Gaussian, float64, written from the gsplat kernel (fully_fused_projection + persp_proj)."""
    R, t = viewmat[:3, :3], viewmat[:3, 3]
    x, y, z = R @ mean + t
    if z < near or z > far:
        return None
    w_, x_, y_, z_ = quat / np.linalg.norm(quat)
    rot = np.array([
        [1 - 2 * (y_ * y_ + z_ * z_), 2 * (x_ * y_ - w_ * z_), 2 * (x_ * z_ + w_ * y_)],
        [2 * (x_ * y_ + w_ * z_), 1 - 2 * (x_ * x_ + z_ * z_), 2 * (y_ * z_ - w_ * x_)],
        [2 * (x_ * z_ - w_ * y_), 2 * (y_ * z_ + w_ * x_), 1 - 2 * (x_ * x_ + y_ * y_)],
    ])
    M = rot @ np.diag(scale)
    cov_c = R @ (M @ M.T) @ R.T
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    tx = z * min(lim_x_pos, max(-lim_x_neg, x / z))
    ty = z * min(lim_y_pos, max(-lim_y_neg, y / z))
    J = np.array([[fx / z, 0, -fx * tx / z ** 2], [0, fy / z, -fy * ty / z ** 2]])
    cov2d = J @ cov_c @ J.T + eps2d * np.eye(2)
    det = np.linalg.det(cov2d)
    if det <= 0:
        return None
    conic = np.linalg.inv(cov2d)
    if opacity < 1 / 255:
        return None
    extend = min(3.33, math.sqrt(2 * math.log(opacity * 255)))
    rx = math.ceil(extend * math.sqrt(cov2d[0, 0]))
    ry = math.ceil(extend * math.sqrt(cov2d[1, 1]))
    mx, my = fx * x / z + cx, fy * y / z + cy
    if mx + rx <= 0 or mx - rx >= width or my + ry <= 0 or my - ry >= height:
        return None
    return (mx, my), (conic[0, 0], conic[0, 1], conic[1, 1]), z, (rx, ry)


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)):
    eye = np.asarray(eye, float)
    f = np.asarray(target, float) - eye
    f /= np.linalg.norm(f)
    r = np.cross(f, up)
    r /= np.linalg.norm(r)
    d = np.cross(f, r)
    V = np.eye(4)
    V[:3, :3] = np.stack([r, d, f])
    V[:3, 3] = -V[:3, :3] @ eye
    return V


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_projection_matches_scalar_transcription(dtype):
    rng = np.random.default_rng(0)
    n, w, h = 400, 60, 44
    V = look_at((0.7, 0.4, 1.8))
    K = np.array([[55.0, 0, 27.0], [0, 50.0, 25.0], [0, 0, 1]])
    means = rng.uniform(-2.0, 2.0, (n, 3))  # many off-screen: exercises the Jacobian clamp and culling
    quats = rng.normal(size=(n, 4)) * rng.uniform(0.2, 3.0, (n, 1))
    scales = np.exp(rng.uniform(math.log(0.002), math.log(0.3), (n, 3)))
    opac = rng.uniform(0.0, 1.0, n)
    proj = project_gaussians(*(torch.tensor(a, dtype=dtype) for a in (means, quats, scales, opac, V, K)), w, h)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    n_drawn = n_clamped = 0
    for i in range(n):
        ref = project_one(means[i], quats[i], scales[i], opac[i], V, K, w, h)
        if ref is None:
            assert proj.radii[i].tolist() == [0, 0], i
            assert proj.means2d[i].tolist() == [0.0, 0.0]
            continue
        n_drawn += 1
        (mx, my), conic, z, (rx, ry) = ref
        pc = V[:3, :3] @ means[i] + V[:3, 3]
        if abs(pc[0] / pc[2]) > 0.8 or abs(pc[1] / pc[2]) > 0.8:
            n_clamped += 1
        if dtype == torch.float64:
            assert proj.radii[i].tolist() == [rx, ry], i
        else:  # a float32 ceil may land one pixel off right at an integer
            assert abs(int(proj.radii[i, 0]) - rx) <= 1 and abs(int(proj.radii[i, 1]) - ry) <= 1, i
        np.testing.assert_allclose(proj.means2d[i].numpy(), [mx, my], rtol=tol, atol=tol * 10)
        np.testing.assert_allclose(proj.conics[i].numpy(), conic, rtol=10 * tol, atol=tol)
        assert proj.depths[i].item() == pytest.approx(z, rel=tol)
    assert n_drawn > 50 and n_clamped > 5


def test_rotation_and_covariance():
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0], [3.0, 1.0, -2.0, 0.5]], dtype=torch.float64)
    R = quat_to_rotmat(q)
    torch.testing.assert_close(R[0], torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(R[1], torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)))  # 180 deg about z
    torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(3, 3, 3))
    assert torch.allclose(torch.linalg.det(R), torch.ones(3, dtype=torch.float64))
    s = torch.tensor([[1.0, 2.0, 3.0]] * 3, dtype=torch.float64)
    cov = covariance_3d(q, s)
    torch.testing.assert_close(torch.linalg.eigvalsh(cov), torch.tensor([[1.0, 4.0, 9.0]] * 3, dtype=torch.float64))


def test_projection_gradients_finite_and_zero_when_culled():
    means = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, -1.0], [0.0, 0.0, 0.0]], dtype=torch.float64,
                         requires_grad=True)
    quats = torch.tensor([[1.0, 0.2, 0.0, 0.1]] * 3, dtype=torch.float64, requires_grad=True)
    scales = torch.full((3, 3), 0.05, dtype=torch.float64, requires_grad=True)
    opac = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    K = torch.tensor([[30.0, 0, 16], [0, 30.0, 16], [0, 0, 1]], dtype=torch.float64)
    proj = project_gaussians(means, quats, scales, opac, torch.eye(4, dtype=torch.float64), K, 32, 32)
    assert proj.radii[:, 0].tolist()[1:] == [0, 0] and int(proj.radii[0, 0]) > 0
    (proj.means2d.sum() + proj.conics.sum() + proj.depths.sum()).backward()
    for p in (means, quats, scales):
        assert torch.isfinite(p.grad).all()
        assert float(p.grad[1:].abs().max()) == 0.0
