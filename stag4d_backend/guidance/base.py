"""The interface between the fit and a score-distillation guidance (Zero123-XL SDS, or a test double).

The fit samples a random view and chooses the conditioning image (the input frame or the nearest anchor, as the
STAG4D code does: ``fitting/views.py``); the guidance turns one rendered image into a loss whose gradient is the
SDS gradient. Poses use the STAG4D (DreamGaussian) convention at this boundary only: ``delta_polar`` is a DG
elevation difference in degrees (positive = target camera lower).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

INPUT_VIEW = -1  # SDSRequest.source for "condition on the input frame"


@dataclass(frozen=True)
class SDSRequest:
    frame: int              # frame index f (0..F-1)
    source: int             # INPUT_VIEW, or the anchor k = 0..5 whose image conditions the step
    delta_polar: float      # degrees, DG convention
    delta_azimuth: float    # degrees
    delta_radius: float = 0.0


@runtime_checkable
class ScoreDistillation(Protocol):
    """What the fit needs from an SDS guidance model."""

    def prepare(self, ref_rgb: torch.Tensor, anchor_rgb: torch.Tensor | None) -> None:
        """Precompute per-frame conditioning: ref_rgb [F,H,W,3] and anchor_rgb [F,6,h,w,3] on white."""

    def loss(self, image: torch.Tensor, request: SDSRequest, step: int, total_steps: int) -> torch.Tensor:
        """A scalar whose gradient w.r.t. ``image`` ([H,W,3] in [0,1]) is the SDS gradient for this request."""
