"""Quality metrics: image PSNR and SSIM on [H, W, 3] tensors in [0, 1], mask IoU, and the floaters figure of a
fitted 4D set (docs/quality.md). Pure math."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return float("inf") if mse == 0 else -10.0 * math.log10(mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian 11x11 window, sigma 1.5, K1 = 0.01, K2 = 0.03), per channel,
    valid region only (no padding), as skimage's ``structural_similarity(gaussian_weights=True)``."""
    x = a.float().permute(2, 0, 1)[:, None]
    y = b.float().permute(2, 0, 1)[:, None]
    w = _gaussian_window(window, sigma)[None, None].to(x)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mx ** 2
    syy = F.conv2d(y * y, w) - my ** 2
    sxy = F.conv2d(x * y, w) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def mask_iou(a, b, threshold: float = 0.5) -> float:
    """Intersection over union of two mattes (alpha in [0, 1], any shape) thresholded at ``threshold``;
    1.0 when both are empty."""
    ma, mb = np.asarray(a) > threshold, np.asarray(b) > threshold
    union = np.logical_or(ma, mb).sum()
    return 1.0 if union == 0 else float(np.logical_and(ma, mb).sum() / union)


def floater_mask(means, opacities, centres, radii, factor: float = 1.7, min_opacity: float = 0.05) -> np.ndarray:
    """Which Gaussians are floaters: visible (opacity > ``min_opacity``) and, at ANY of the frames, farther than
    ``factor`` x the object's bounding radius from its centre.

    means [F, N, 3] (positions at each baked frame), opacities [N] (activated), centres [F, 3], radii [F]."""
    means = np.asarray(means, dtype=np.float64)
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 1, 3)
    radii = np.asarray(radii, dtype=np.float64).reshape(-1, 1)
    if means.ndim != 3 or means.shape[0] != centres.shape[0] or radii.shape[0] != means.shape[0]:
        raise ValueError(f"means {means.shape}, centres {centres.shape[:1]}, radii {radii.shape[:1]}: "
                         f"need [F, N, 3], [F, 3], [F]")
    far = (np.linalg.norm(means - centres, axis=-1) > factor * radii).any(axis=0)
    return far & (np.asarray(opacities, dtype=np.float64).reshape(-1) > min_opacity)


def floater_fraction(means, opacities, centres, radii, factor: float = 1.7, min_opacity: float = 0.05) -> float:
    """The share of visible Gaussians that are floaters (:func:`floater_mask`); 0.0 when none is visible."""
    visible = int((np.asarray(opacities).reshape(-1) > min_opacity).sum())
    if visible == 0:
        return 0.0
    return float(floater_mask(means, opacities, centres, radii, factor, min_opacity).sum() / visible)
