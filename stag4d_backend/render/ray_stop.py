"""Where each pixel's ray stops: the camera depth at which the rasteriser's front-to-back compositing ends.

The rasteriser stops a pixel when the next Gaussian would take its transmittance to T_THRESHOLD (1e-4) or
less; nothing behind that Gaussian shows. A ray tracer that composites the same splats (the Blender add-on's
Cycles display) cannot see its transmittance and goes on through every square behind, ~5x more crossings than
the ones that count (docs/benchmarks.md, issue 19). Given this map it can end a camera ray past the stop depth
of its pixel and lose nothing the rasteriser draws.

``stop_depths`` follows the reference compositor (render/reference.py) exactly, but only over each Gaussian's
box of pixels where its alpha can reach ALPHA_THRESHOLD (``sqrt(2 ln(255 opacity))`` sigmas of the projected
covariance along each image axis: the level set's extent), so it runs in seconds for 50k Gaussians at 512 px.
``dilate_max`` widens it for rays that start anywhere inside a pixel (a pixel filter, not only the centre).
Pure numpy, no I/O.
"""

from __future__ import annotations

import math

import numpy as np

from .reference import ALPHA_THRESHOLD, MAX_ALPHA, T_THRESHOLD


def pixel_box(mean2d, half_x: float, half_y: float, width: int, height: int):
    """The pixels whose centres lie within ``mean2d +- (half_x, half_y)``: (row and column slices, the centres'
    x and y offsets from the mean as a row and a column), or None if there are none in the image."""
    mx, my = mean2d
    x0, x1 = max(0, math.ceil(mx - half_x - 0.5)), min(width - 1, math.floor(mx + half_x - 0.5))
    y0, y1 = max(0, math.ceil(my - half_y - 0.5)), min(height - 1, math.floor(my + half_y - 0.5))
    if x1 < x0 or y1 < y0:
        return None
    dx = mx - (np.arange(x0, x1 + 1) + 0.5)[None, :]
    dy = my - (np.arange(y0, y1 + 1) + 0.5)[:, None]
    return (slice(y0, y1 + 1), slice(x0, x1 + 1)), dx, dy


def stop_depths(means2d, conics, opacities, depths, cov2d, drawn, width: int, height: int,
                t_stop: float = T_THRESHOLD) -> np.ndarray:
    """[H, W] camera depth of the Gaussian at which each pixel's compositing stops; inf where it never does.

    Inputs as ``project_gaussians`` returns them (means2d [N, 2] px, conics [N, 3] (a, b, c), depths [N],
    cov2d [N, 3] (xx, xy, yy) with the blur added), opacities [N], ``drawn`` [N] bool (radii > 0).
    ``t_stop``: the transmittance at which a pixel counts as stopped; the rasteriser's own (1e-4) by default,
    where what lies behind is exactly what the rasteriser leaves out. A larger one stops earlier; everything
    behind then adds at most ``t_stop`` of its colour to the pixel."""
    if not T_THRESHOLD <= t_stop < 1.0:
        raise ValueError(f"stop_depths: t_stop must be in [{T_THRESHOLD:g}, 1) (got {t_stop})")
    means2d, conics, cov2d = (np.asarray(a, np.float64) for a in (means2d, conics, cov2d))
    opacities = np.asarray(opacities, np.float64).reshape(-1)
    depths = np.asarray(depths, np.float64).reshape(-1)
    drawn = np.asarray(drawn, bool).reshape(-1) & (opacities >= ALPHA_THRESHOLD)
    extent = np.sqrt(2.0 * np.log(np.maximum(opacities / ALPHA_THRESHOLD, 1.0)))
    half_x, half_y = extent * np.sqrt(np.maximum(cov2d[:, 0], 0.0)), extent * np.sqrt(np.maximum(cov2d[:, 2], 0.0))
    T = np.ones((height, width))
    done = np.zeros((height, width), bool)
    stop = np.full((height, width), np.inf)
    for g in np.argsort(depths, kind="stable"):  # the rasteriser's order (a stable sort by depth)
        if not drawn[g]:
            continue
        found = pixel_box(means2d[g], half_x[g], half_y[g], width, height)
        if found is None:
            continue
        box, dx, dy = found
        if done[box].all():  # behind what already hides everything here: most of a dense set
            continue
        a, b, c = conics[g]
        sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
        alpha = np.minimum(opacities[g] * np.exp(-sigma), MAX_ALPHA)
        live = (sigma >= 0) & (alpha >= ALPHA_THRESHOLD) & ~done[box]
        nxt = T[box] * (1.0 - alpha)
        ends = live & (nxt <= t_stop)
        T[box] = np.where(live & ~ends, nxt, T[box])
        stop[box] = np.where(ends, depths[g], stop[box])
        done[box] |= ends
    return stop


def dilate_max(stop: np.ndarray, radius: int = 1) -> np.ndarray:
    """Each pixel's largest stop depth over its (2 radius + 1)^2 neighbourhood: a ray from anywhere in the pixel
    (or a pixel filter ``radius`` pixels wide) stops no earlier than the rasteriser's at any of those centres."""
    h, w = stop.shape
    pad = np.pad(stop, radius, constant_values=np.inf)
    out = np.full_like(stop, -np.inf)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            np.maximum(out, pad[radius + dy:radius + dy + h, radius + dx:radius + dx + w], out=out)
    return out
