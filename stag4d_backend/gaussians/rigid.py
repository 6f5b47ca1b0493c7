"""Rotation helpers of the rigid-motion deformation (``DeformationConfig(motion="rigid")``). Pure torch.

Quaternions are w-first (w, x, y, z), like the Gaussians' rotations. Every function broadcasts over leading
dimensions, so [T, N, k] head outputs combine with [1, N, k] canonical values.
"""

from __future__ import annotations

import torch

#: Below this squared angle (|w| < 1e-2 rad) the half-angle terms use their Taylor series: the next term is
#: below 1e-16 relative there, and the series (in |w|^2, not |w|) keeps the gradient finite at w = 0.
SMALL_ANGLE_SQ = 1e-4


def rotvec_to_quat(rotvec: torch.Tensor) -> torch.Tensor:
    """Rotation vector (axis * angle, radians) [..., 3] -> unit quaternion (cos(a/2), sin(a/2) * axis) [..., 4].

    exp of the rotation vector, smooth everywhere: exact identity at 0 and finite gradients there; any angle
    (the map is periodic, |w| = 2 pi gives -1, the same rotation)."""
    theta_sq = (rotvec * rotvec).sum(-1, keepdim=True)
    small = theta_sq < SMALL_ANGLE_SQ
    # The "double where": the large-angle branch never sees a near-zero angle, so its unused gradient stays finite.
    theta = torch.sqrt(torch.where(small, torch.ones_like(theta_sq), theta_sq))
    half = 0.5 * theta
    cos_big, sinc_big = torch.cos(half), torch.sin(half) / theta
    # cos(a/2) and sin(a/2) / a as series in a^2
    cos_small = 1.0 - theta_sq / 8.0 + theta_sq * theta_sq / 384.0
    sinc_small = 0.5 - theta_sq / 48.0 + theta_sq * theta_sq / 3840.0
    cos_h = torch.where(small, cos_small, cos_big)
    sinc_h = torch.where(small, sinc_small, sinc_big)
    return torch.cat([cos_h, sinc_h * rotvec], dim=-1)


def quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product a ⊗ b of w-first quaternions [..., 4] (rotate by b, then by a); no normalisation."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], dim=-1)


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Written out so that it broadcasts like the other helpers.
    ax, ay, az = a.unbind(-1)
    bx, by, bz = b.unbind(-1)
    return torch.stack([ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx], dim=-1)


def quat_rotate(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotate points v [..., 3] by unit quaternions q [..., 4]: v + 2 w (u x v) + 2 u x (u x v), q = (w, u).

    Exact identity for q = (1, 0, 0, 0)."""
    w, u = q[..., :1], q[..., 1:]
    uv = _cross(u, v)
    return v + 2.0 * (w * uv + _cross(u, uv))


__all__ = ["SMALL_ANGLE_SQ", "rotvec_to_quat", "quat_multiply", "quat_rotate"]
