"""A procedural animated object made of Gaussians, with exact ground truth from any camera.

Used by the quality benchmark (fit it from the front view plus the six exact anchor views, then compare held-out
views and frames) and by the embedded example (`stag4d generate --example`). The object is a little creature:
a striped body, a head with eyes, two arms that wave out of phase and a tail that swings, bobbing and twisting
over time, so that a fit must learn non-rigid motion shared across many Gaussians. It sits inside a sphere of
radius ~0.5 at the origin, Y-up, facing +Z (the front camera), filling about half the frame height.

Pure math (torch); writing images lives in :func:`write_stag4d_layout`, which renders with the project rasteriser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class GaussianFrame:
    """Activated Gaussian parameters at one instant."""

    means: torch.Tensor      # [N, 3]
    quats: torch.Tensor      # [N, 4] (w, x, y, z), normalised
    scales: torch.Tensor     # [N, 3] linear
    opacities: torch.Tensor  # [N]
    colors: torch.Tensor     # [N, 3] in [0, 1]


def _sphere_surface(n: int, g: torch.Generator) -> torch.Tensor:
    v = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True)


def _hsv(h: torch.Tensor, s: float, v: float) -> torch.Tensor:
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], -1)
    return v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _rot_z(angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    z, o = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack([torch.stack([c, -s, z], -1), torch.stack([s, c, z], -1), torch.stack([z, z, o], -1)], -2)


def _rot_y(angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    z, o = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack([torch.stack([c, z, s], -1), torch.stack([z, o, z], -1), torch.stack([-s, z, c], -1)], -2)


def _rot_x(angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    z, o = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack([torch.stack([o, z, z], -1), torch.stack([z, c, -s], -1), torch.stack([z, s, c], -1)], -2)


def _matrix_to_quat(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] -> (w, x, y, z), robust branch-free variant (Shepperd via max trace)."""
    m = R
    t = torch.stack([1 + m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2], 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2],
                     1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], 1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]],
                    -1)
    i = t.argmax(-1)
    q = torch.empty(R.shape[:-2] + (4,), dtype=R.dtype)
    r = torch.sqrt(t.clamp_min(1e-12))
    for k in range(4):
        sel = i == k
        if not sel.any():
            continue
        mm, rr = m[sel], r[sel][:, k]
        if k == 0:
            qs = [0.5 * rr, (mm[:, 2, 1] - mm[:, 1, 2]) / (2 * rr), (mm[:, 0, 2] - mm[:, 2, 0]) / (2 * rr),
                  (mm[:, 1, 0] - mm[:, 0, 1]) / (2 * rr)]
        elif k == 1:
            qs = [(mm[:, 2, 1] - mm[:, 1, 2]) / (2 * rr), 0.5 * rr, (mm[:, 0, 1] + mm[:, 1, 0]) / (2 * rr),
                  (mm[:, 0, 2] + mm[:, 2, 0]) / (2 * rr)]
        elif k == 2:
            qs = [(mm[:, 0, 2] - mm[:, 2, 0]) / (2 * rr), (mm[:, 0, 1] + mm[:, 1, 0]) / (2 * rr), 0.5 * rr,
                  (mm[:, 1, 2] + mm[:, 2, 1]) / (2 * rr)]
        else:
            qs = [(mm[:, 1, 0] - mm[:, 0, 1]) / (2 * rr), (mm[:, 0, 2] + mm[:, 2, 0]) / (2 * rr),
                  (mm[:, 1, 2] + mm[:, 2, 1]) / (2 * rr), 0.5 * rr]
        q[sel] = torch.stack(qs, -1)
    return q / q.norm(dim=-1, keepdim=True)


class ExampleCreature:
    """The procedural animated object. ``at(t)`` gives its Gaussians at time t in [0, 1)."""

    def __init__(self, num_gaussians: int = 12000, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        parts, n = [], num_gaussians
        # Share of Gaussians per part: body, head, two arms, tail, two eyes.
        counts = [int(n * 0.42), int(n * 0.26), int(n * 0.09), int(n * 0.09), int(n * 0.08)]
        counts.append((n - sum(counts)) // 2)
        counts.append(n - sum(counts))

        # Body: an egg-shaped ellipsoid; horizontal stripes whose hue also turns with azimuth (views differ).
        d = _sphere_surface(counts[0], g)
        body = d * torch.tensor([0.26, 0.24, 0.22], dtype=torch.float64) + torch.tensor([0.0, -0.12, 0.0],
                                                                                          dtype=torch.float64)
        az = torch.atan2(d[:, 0], d[:, 2]) / (2 * math.pi) + 0.5
        stripe = (torch.floor((body[:, 1] + 0.5) * 14) % 2)
        body_col = _hsv((0.08 + 0.5 * az) % 1.0, 0.75, 0.95) * (0.65 + 0.35 * stripe[:, None])
        parts.append(("body", body, body_col))

        # Head: a sphere above the body, two-tone (face lighter than the back of the head).
        d = _sphere_surface(counts[1], g)
        head = d * 0.15 + torch.tensor([0.0, 0.25, 0.0], dtype=torch.float64)
        face = (d[:, 2] > 0.2).double()[:, None]
        head_col = face * torch.tensor([0.98, 0.82, 0.55], dtype=torch.float64) + (1 - face) * torch.tensor(
            [0.35, 0.22, 0.55], dtype=torch.float64)
        parts.append(("head", head, head_col))

        # Arms: capsules from the shoulders, pointing sideways and down.
        for side, count in ((1.0, counts[2]), (-1.0, counts[3])):
            u = torch.rand(count, generator=g, dtype=torch.float64)
            ring = _sphere_surface(count, g) * 0.045
            arm = torch.stack([side * (0.02 + 0.24 * u), -0.10 * u, torch.zeros_like(u)], -1) + ring
            arm = arm + torch.tensor([side * 0.22, 0.02, 0.0], dtype=torch.float64)
            col = torch.tensor([0.15, 0.55, 0.85] if side > 0 else [0.85, 0.25, 0.25],
                               dtype=torch.float64).expand(count, 3) * (0.8 + 0.2 * u[:, None])
            parts.append(("arm_r" if side > 0 else "arm_l", arm, col))

        # Tail: a tapering tube behind the body.
        u = torch.rand(counts[4], generator=g, dtype=torch.float64)
        ring = _sphere_surface(counts[4], g) * (0.05 * (1 - 0.6 * u))[:, None]
        tail = torch.stack([torch.zeros_like(u), -0.22 + 0.12 * u, -0.2 - 0.2 * u], -1) + ring
        parts.append(("tail", tail, torch.tensor([0.2, 0.7, 0.3], dtype=torch.float64).expand(counts[4], 3)
                      * (0.7 + 0.3 * u[:, None])))

        # Eyes: small dark discs on the face.
        for side, count in ((1.0, counts[5]), (-1.0, counts[6])):
            d = _sphere_surface(count, g) * 0.035
            eye = d + torch.tensor([side * 0.055, 0.28, 0.135], dtype=torch.float64)
            parts.append(("eye", eye, torch.tensor([0.05, 0.05, 0.1], dtype=torch.float64).expand(count, 3)))

        self.part_names = [p[0] for p in parts]
        self.part_index = torch.cat([torch.full((p[1].shape[0],), i) for i, p in enumerate(parts)])
        self.means = torch.cat([p[1] for p in parts])
        self.colors = torch.cat([p[2] for p in parts]).clamp(0, 1)
        self.num_gaussians = self.means.shape[0]
        # Small, slightly flattened Gaussians with random orientation: a dense, closed surface.
        self.scales = torch.full((self.num_gaussians, 3), 0.014, dtype=torch.float64)
        self.scales[:, 2] *= 0.5
        self.quats = _matrix_to_quat(_rot_x(torch.rand(self.num_gaussians, generator=g, dtype=torch.float64) * 6.3)
                                     @ _rot_y(torch.rand(self.num_gaussians, generator=g, dtype=torch.float64) * 6.3))
        self.opacities = torch.full((self.num_gaussians,), 0.95, dtype=torch.float64)

    def _part(self, name: str) -> torch.Tensor:
        return self.part_index == self.part_names.index(name)

    def at(self, t: float, dtype=torch.float32) -> GaussianFrame:
        """Gaussians at time t (one period over t in [0, 1)): arms wave, tail swings, body bobs and twists."""
        n = self.num_gaussians
        R = torch.eye(3, dtype=torch.float64).expand(n, 3, 3).clone()
        p = self.means.clone()
        w = 2 * math.pi * t

        for name, shoulder, sign in (("arm_r", (0.22, 0.02, 0.0), 1.0), ("arm_l", (-0.22, 0.02, 0.0), -1.0)):
            m = self._part(name)
            angle = torch.tensor(sign * (0.9 * math.sin(w + (0.0 if sign > 0 else math.pi)) + 0.3), dtype=torch.float64)
            Rz = _rot_z(angle)
            s = torch.tensor(shoulder, dtype=torch.float64)
            p[m] = (p[m] - s) @ Rz.T + s
            R[m] = Rz @ R[m]

        m = self._part("tail")
        Ry = _rot_y(torch.tensor(0.7 * math.sin(w), dtype=torch.float64))
        root = torch.tensor([0.0, -0.22, -0.2], dtype=torch.float64)
        p[m] = (p[m] - root) @ Ry.T + root
        R[m] = Ry @ R[m]

        # Head nods a little relative to the body.
        m = self._part("head") | self._part("eye")
        Rx = _rot_x(torch.tensor(0.25 * math.sin(w + 1.0), dtype=torch.float64))
        neck = torch.tensor([0.0, 0.12, 0.0], dtype=torch.float64)
        p[m] = (p[m] - neck) @ Rx.T + neck
        R[m] = Rx @ R[m]

        # Whole-body twist about Y growing with height, plus a bob.
        twist = 0.35 * math.sin(w) * (p[:, 1] + 0.4)
        Rt = _rot_y(twist)
        p = torch.einsum("nij,nj->ni", Rt, p)
        R = Rt @ R
        p[:, 1] += 0.04 * math.sin(2 * w)

        q = _quat_multiply(_matrix_to_quat(R), self.quats)
        return GaussianFrame(p.to(dtype), q.to(dtype), self.scales.to(dtype), self.opacities.to(dtype),
                             self.colors.to(dtype))


def _quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], -1)


def render_frame(frame: GaussianFrame, camera, background=(1.0, 1.0, 1.0)):
    """Ground-truth RGB [H,W,3] and alpha [H,W] of a frame from an OrbitCamera (white background by default)."""
    from .render.view import render_view

    with torch.no_grad():
        res = render_view(frame, camera, background)
    return res.rgb, res.alpha


def write_stag4d_layout(creature: ExampleCreature, out_dir: str | Path, num_frames: int = 16, size: int = 256,
                        anchor_size: int = 256, on_frame=None) -> Path:
    """Write ref/{f}_rgba.png (front view) and zero123/{f}_rgba/{k}.png (the six exact anchor views)."""
    import numpy as np
    from PIL import Image

    from .render.cameras import anchor_cameras, front_camera

    out_dir = Path(out_dir)

    def save(rgb, alpha, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        # Un-composite from white so that the RGBA PNG composites back to exactly the render.
        a = alpha.clamp(0, 1)[..., None]
        fg = torch.where(a > 1e-6, (rgb - (1 - a)) / a.clamp_min(1e-6), torch.ones_like(rgb)).clamp(0, 1)
        rgba = torch.cat([fg, a], -1)
        arr = (rgba.numpy() * 255.0 + 0.5).astype(np.uint8)
        tmp = path.with_suffix(".tmp.png")
        Image.fromarray(arr, "RGBA").save(tmp)
        tmp.replace(path)

    for f in range(num_frames):
        frame = creature.at(f / num_frames)
        save(*render_frame(frame, front_camera(size)), out_dir / "ref" / f"{f}_rgba.png")
        for k, cam in enumerate(anchor_cameras(anchor_size)):
            save(*render_frame(frame, cam), out_dir / "zero123" / f"{f}_rgba" / f"{k}.png")
        if on_frame is not None:
            on_frame(f)
    return out_dir
