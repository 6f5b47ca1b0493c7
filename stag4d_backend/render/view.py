"""Rasterise a set of activated Gaussians from an OrbitCamera (the common case of `rasterize`). Pure math."""

from __future__ import annotations

import torch

from .cameras import OrbitCamera, to_torch
from .rasterize import RasterResult, rasterize


def render_view(gaussians, camera: OrbitCamera, background=(1.0, 1.0, 1.0)) -> RasterResult:
    """``gaussians`` has ``means, quats, scales, opacities, colors`` (e.g. a FrameGaussians or GaussianFrame);
    the image is ``camera.size`` square over ``background``."""
    g = gaussians
    bg = torch.as_tensor(background, dtype=g.means.dtype, device=g.means.device)
    return rasterize(g.means, g.quats, g.scales, g.opacities, g.colors,
                     to_torch(camera.viewmat, device=g.means.device), to_torch(camera.K, device=g.means.device),
                     camera.size, camera.size, bg)
