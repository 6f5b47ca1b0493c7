"""Random training views and the SDS conditioning choice, as the STAG4D code draws them (spec section 3).

All randomness comes from the caller's ``torch.Generator`` so a fit is reproducible and resumable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..guidance.base import INPUT_VIEW, SDSRequest
from ..render.cameras import ANCHOR_AZIMUTHS, ANCHOR_ELEVATIONS, OrbitCamera, anchor_index_for_azimuth


@dataclass(frozen=True)
class RandomView:
    camera: OrbitCamera
    ver: int                # DG elevation offset drawn (degrees; positive = lower)
    hor: int                # azimuth drawn (degrees)


def _randint(low: int, high: int, g: torch.Generator) -> int:
    """Uniform integer in [low, high) (numpy's randint semantics, as the authors' code)."""
    return int(torch.randint(low, high, (1,), generator=g).item())


def _rand(g: torch.Generator) -> float:
    return float(torch.rand(1, generator=g).item())


def sample_random_view(g: torch.Generator, size: int, input_elevation: float = 0.0, radius: float = 2.0,
                       fovy: float = 49.1) -> RandomView:
    """ver ~ U{min_ver..max_ver-1}, hor ~ U{-180..179}; camera = orbit(e + ver, hor) in DG terms.

    ``input_elevation`` is in our convention (degrees above); the authors' bounds are in DG terms (e = -ours).
    """
    e = -input_elevation
    min_ver = max(min(-30, -30 - e), -80 - e)
    max_ver = min(max(30, 30 - e), 80 - e)
    ver = _randint(int(min_ver), int(max_ver), g)
    hor = _randint(-180, 180, g)
    camera = OrbitCamera(elevation=-(e + ver), azimuth=float(hor), radius=radius, fovy=fovy, size=size)
    return RandomView(camera, ver, hor)


def choose_conditioning(view: RandomView, frame: int, g: torch.Generator, has_anchors: bool = True,
                        input_probability: float = 0.6) -> SDSRequest:
    """The input frame if -30 < hor < 30, or with probability 0.6 otherwise; else the nearest anchor in azimuth.

    Mirrors the code's ``(A and B) or C`` precedence: the random number is drawn only when |hor| >= 30.
    """
    if -30 < view.hor < 30 or not has_anchors or _rand(g) > 1.0 - input_probability:
        return SDSRequest(frame, INPUT_VIEW, float(view.ver), float(view.hor))
    k = anchor_index_for_azimuth(view.hor)
    dg_elev_k = -ANCHOR_ELEVATIONS[k]
    return SDSRequest(frame, k, float(view.ver - dg_elev_k), float(view.hor - ANCHOR_AZIMUTHS[k]))
