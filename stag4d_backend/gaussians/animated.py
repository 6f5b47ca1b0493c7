"""Canonical Gaussians + deformation field = Gaussians at any time (spec section 7). Pure math, no I/O.

Frame f of F is evaluated at t = f / F; mu_f = mu + dx, s_f = exp(log s + ds), q_f = normalize(q + dq) (with a
``motion="rigid"`` field mu_f = R mu + dx and q_f = normalize(q_w ⊗ (q + dq)), see ``deformation.apply_deltas``);
opacity and colour are static. The count and order of Gaussians never change between frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .deformation import DeformationNetwork
from .model import GaussianModel


@dataclass
class FrameGaussians:
    """Activated parameters of every Gaussian at one time, ready for ``rasterize``."""

    means: torch.Tensor      # [N, 3]
    quats: torch.Tensor      # [N, 4] unit (w, x, y, z)
    scales: torch.Tensor     # [N, 3] linear
    opacities: torch.Tensor  # [N]
    colors: torch.Tensor     # [N, 3] (SH evaluated for ``campos`` when the degree is > 0)
    raw: dict                # raw per-frame parameters in the PLY layout (xyz, f_dc, f_rest, opacity, scaling, rotation)


def frame_gaussians(model: GaussianModel, deformation: DeformationNetwork | None, t: float | None,
                    campos: torch.Tensor | None = None) -> FrameGaussians:
    """Gaussians at time ``t`` (``None`` or no deformation: canonical, the coarse stage)."""
    p = model.params
    xyz, scaling, rotation = p["xyz"], p["scaling"], p["rotation"]
    if deformation is not None and t is not None:
        xyz, scaling, rotation = deformation.deform(xyz, scaling, rotation, t)
    if model.sh_degree > 0:
        if campos is None:
            raise ValueError("SH degree > 0 needs the camera position for colours")
        colors = model.colors(xyz - campos.to(xyz).reshape(1, 3))
    else:
        colors = model.colors()
    raw = {"xyz": xyz, "f_dc": p["f_dc"], "f_rest": p["f_rest"], "opacity": p["opacity"], "scaling": scaling,
           "rotation": rotation}
    return FrameGaussians(xyz, F.normalize(rotation, dim=-1), torch.exp(scaling),
                          torch.sigmoid(p["opacity"]).reshape(-1), colors, raw)


class AnimatedGaussians:
    """A fitted result: canonical set + field + the frame count that defines t = f / F."""

    def __init__(self, model: GaussianModel, deformation: DeformationNetwork, num_frames: int):
        self.model = model
        self.deformation = deformation
        self.num_frames = int(num_frames)

    def time_of(self, frame: float) -> float:
        return float(frame) / self.num_frames

    @torch.no_grad()
    def at_frame(self, frame: float, campos: torch.Tensor | None = None) -> FrameGaussians:
        """Frame index (may be fractional for retiming) -> Gaussians; no autograd."""
        return frame_gaussians(self.model, self.deformation, self.time_of(frame), campos)
