"""Dense, obviously-correct reference compositor (whole image, plain autograd).

It follows gsplat's ``rasterize_to_pixels`` kernel line by line, but vectorised over all pixels instead of
per pixel, and it evaluates every non-culled Gaussian at every pixel (no tiles, no radii boxes). It is slow
(one Python iteration per Gaussian) and memory hungry under autograd; it exists for tests and benchmarks.
Same contract as ``composite_torch.composite_torch``.
"""

from __future__ import annotations

import torch
from torch import Tensor

ALPHA_THRESHOLD = 1.0 / 255.0
T_THRESHOLD = 1e-4
MAX_ALPHA = 0.999


def composite_reference(
    means2d: Tensor,
    conics: Tensor,
    features: Tensor,
    opacities: Tensor,
    depths: Tensor,
    radii: Tensor,
    width: int,
    height: int,
    tile_size: int = 16,  # unused; accepted for signature compatibility
) -> tuple[Tensor, Tensor]:
    width, height = int(width), int(height)
    dtype = means2d.dtype
    device = means2d.device
    ch = features.shape[1]
    if radii.dim() == 1:
        radii = radii[:, None].expand(-1, 2)

    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype),
        torch.arange(width, device=device, dtype=dtype),
        indexing="ij",
    )
    px = xs.reshape(-1) + 0.5
    py = ys.reshape(-1) + 0.5

    T = torch.ones(height * width, dtype=dtype, device=device)
    done = torch.zeros(height * width, dtype=torch.bool, device=device)
    image = torch.zeros(height * width, ch, dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)

    drawn = (radii > 0).all(dim=-1)
    order = torch.sort(depths.detach(), stable=True).indices
    for g in order.tolist():
        if not bool(drawn[g]):
            continue
        a, b, c = conics[g, 0], conics[g, 1], conics[g, 2]
        dx = means2d[g, 0] - px
        dy = means2d[g, 1] - py
        sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
        alpha = torch.clamp_max(opacities[g] * torch.exp(-sigma), MAX_ALPHA)
        skip = (sigma < 0) | (alpha < ALPHA_THRESHOLD)
        next_T = T * (1.0 - alpha)
        stop = ~done & ~skip & (next_T <= T_THRESHOLD)
        add = ~done & ~skip & ~stop
        vis = torch.where(add, alpha * T, zero)
        image = image + vis[:, None] * features[g][None, :]
        T = torch.where(add, next_T, T)
        done = done | stop
    alpha_out = 1.0 - T
    return image.reshape(height, width, ch), alpha_out.reshape(height, width)


__all__ = ["composite_reference"]
