"""EWA projection of 3D Gaussians to the image plane (pure PyTorch, differentiable).

Reproduces gsplat 1.5 ``fully_fused_projection`` (pinhole camera, classic mode, ``opacities`` given so the
radii use the opacity-aware bound) for a single camera:

* camera coordinates ``p_c = R p + t`` from the world->camera ``viewmat`` (OpenCV: x right, y down,
  z forward); culled when ``z < near`` or ``z > far``;
* ``Sigma = M M^T`` with ``M = R(q) diag(s)`` (``q`` = w,x,y,z, normalised here); ``Sigma_c = R Sigma R^T``;
* Jacobian of the perspective map with ``x/z`` and ``y/z`` clamped to 1.3x the frustum (``lim_*``);
  ``cov2d = J Sigma_c J^T + eps2d * I``; culled when ``det(cov2d) <= 0``; ``conic = inverse(cov2d)``;
* ``mean2d = (fx x/z + cx, fy y/z + cy)`` (not clamped);
* culled when ``opacity < 1/255``; ``extend = min(3.33, sqrt(2 ln(255 opacity)))``,
  ``radius_x = ceil(extend sqrt(cov2d_xx))``, ``radius_y = ceil(extend sqrt(cov2d_yy))``; culled when the box
  ``mean2d +- radius`` lies entirely outside the image.

Culled Gaussians get ``radii = (0, 0)`` and zero ``means2d``/``conics``/``depths`` (as gsplat's unpacked
outputs); their outputs carry no gradient. Radii are integers and carry no gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

ALPHA_THRESHOLD = 1.0 / 255.0


@dataclass
class Projected:
    means2d: Tensor  # [N, 2] pixel coordinates (pixel centres at +0.5)
    conics: Tensor  # [N, 3] (a, b, c) upper triangle of inverse(cov2d)
    depths: Tensor  # [N] camera-space z
    radii: Tensor  # [N, 2] int32, 0 = culled
    cov2d: Tensor  # [N, 3] (xx, xy, yy) after the low-pass filter


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """[N, 4] quaternions (w, x, y, z), any norm -> [N, 3, 3] rotation matrices."""
    q = quats / quats.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    r = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    )
    return r.reshape(quats.shape[:-1] + (3, 3))


def covariance_3d(quats: Tensor, scales: Tensor) -> Tensor:
    """World-space covariance ``R(q) diag(s)^2 R(q)^T``: [N, 3, 3]."""
    m = quat_to_rotmat(quats) * scales[..., None, :]
    return m @ m.transpose(-1, -2)


def unrounded_radii(opacities: Tensor, cov_xx: Tensor, cov_yy: Tensor) -> Tensor:
    """[N, 2] ``extend * sqrt(cov2d_xx | yy)`` before ``ceil``: the radii's one formula.

    The radii are ``ceil`` of this. Backends compute ``cov2d`` and ``log`` with different (equally correct)
    float rounding, so where this value lies within a few ulps of an integer, two backends may return radii
    that differ by one, and a Gaussian whose box then just touches the image border may be drawn by one and
    culled by the other. Such a Gaussian's alpha is below 1/255 outside its smaller box, so rendered values
    agree either way (docs/rasterizer.md, "Radii")."""
    extend = torch.sqrt(2.0 * torch.log(opacities.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD)).clamp_max(3.33)
    return torch.stack([extend * torch.sqrt(cov_xx.clamp_min(0)), extend * torch.sqrt(cov_yy.clamp_min(0))], -1)


def project_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    near: float = 0.01,
    far: float = 1e10,
    eps2d: float = 0.3,
) -> Projected:
    """Project N Gaussians with one pinhole camera. See the module docstring for the exact semantics."""
    dtype = means.dtype
    n = means.shape[0]
    viewmat = viewmat.to(device=means.device, dtype=dtype)
    fx, fy, cx, cy = (float(v) for v in (K[0, 0], K[1, 1], K[0, 2], K[1, 2]))

    rot = viewmat[:3, :3]
    trans = viewmat[:3, 3]
    p_c = means @ rot.T + trans  # [N, 3]
    x, y, z = p_c.unbind(-1)

    with torch.no_grad():
        valid = (z >= near) & (z <= far)
    # Culled Gaussians are evaluated at a harmless depth so nothing overflows into NaN gradients.
    z_safe = torch.where(valid, z, torch.ones_like(z))

    cov_c = rot @ covariance_3d(quats, scales) @ rot.T  # [N, 3, 3]

    tan_fovx = 0.5 * width / fx
    tan_fovy = 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    tx = z_safe * torch.clamp(x / z_safe, -lim_x_neg, lim_x_pos)
    ty = z_safe * torch.clamp(y / z_safe, -lim_y_neg, lim_y_pos)

    rz = 1.0 / z_safe
    zero = torch.zeros_like(z)
    j = torch.stack(
        [fx * rz, zero, -fx * tx * rz * rz, zero, fy * rz, -fy * ty * rz * rz], dim=-1
    ).reshape(n, 2, 3)
    cov2d = j @ cov_c @ j.transpose(-1, -2)  # [N, 2, 2]
    c_xx = cov2d[:, 0, 0] + eps2d
    c_xy = cov2d[:, 0, 1]
    c_yy = cov2d[:, 1, 1] + eps2d
    det = c_xx * c_yy - c_xy * c_xy

    mean2d = torch.stack([fx * x * rz + cx, fy * y * rz + cy], dim=-1)

    with torch.no_grad():
        valid = valid & (det > 0)
        op = opacities.detach()
        valid = valid & (op >= ALPHA_THRESHOLD)
        rx, ry = torch.ceil(unrounded_radii(op, c_xx.detach(), c_yy.detach())).unbind(-1)
        # radius_clip = 0: gsplat culls when both radii are <= 0
        valid = valid & ~((rx <= 0) & (ry <= 0))
        mx, my = mean2d.detach().unbind(-1)
        valid = valid & ~((mx + rx <= 0) | (mx - rx >= width) | (my + ry <= 0) | (my - ry >= height))
        valid = valid & torch.isfinite(rx) & torch.isfinite(ry)
        radii = torch.stack([rx, ry], dim=-1)
        radii = torch.where(valid[:, None], radii, torch.zeros_like(radii)).to(torch.int32)

    det_safe = torch.where(valid, det, torch.ones_like(det))
    inv_det = 1.0 / det_safe
    conics = torch.stack([c_yy * inv_det, -c_xy * inv_det, c_xx * inv_det], dim=-1)

    v = valid[:, None]
    means2d = torch.where(v, mean2d, torch.zeros_like(mean2d))
    conics = torch.where(v, conics, torch.zeros_like(conics))
    depths = torch.where(valid, z, torch.zeros_like(z))
    cov = torch.stack([c_xx, c_xy, c_yy], dim=-1)
    return Projected(means2d=means2d, conics=conics, depths=depths, radii=radii, cov2d=cov)


def intrinsics_from_fovy(fovy_deg: float, width: int, height: int, dtype=torch.float32) -> Tensor:
    """Pinhole K for a vertical field of view (square pixels, principal point at the image centre)."""
    f = 0.5 * height / math.tan(0.5 * math.radians(fovy_deg))
    return torch.tensor([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]], dtype=dtype)
