"""The noisy-anchors variant: exact anchor renders degraded the way Zero123++ outputs disagree with the truth and
with each other (no bpy; numpy, PIL, scipy).

Each anchor view (frame f, view k) independently gets, from a seed fixed by (scene, f, k):
a small pose/scale error (image-plane rotation, scale about the centre, shift), a blur, and a colour shift
(per-channel gain and offset). Geometry and blur act on premultiplied RGBA so the matte moves with the colour.
"""

from __future__ import annotations

import zlib

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

NOISE = {"rotate_deg": 3.0, "scale": 0.04, "shift_px": 4.0, "blur_px": (0.4, 1.5), "gain": 0.06, "offset": 0.03}


def anchor_seed(scene: str, frame: int, view: int) -> int:
    return zlib.crc32(f"{scene}/{frame}/{view}".encode())


def degrade_anchor(rgba: np.ndarray, seed: int, noise: dict = NOISE) -> np.ndarray:
    """RGBA uint8 [S, S, 4] -> a degraded RGBA uint8 of the same size (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    size = rgba.shape[0]
    x = rgba.astype(np.float32) / 255.0
    prem = np.concatenate([x[..., :3] * x[..., 3:], x[..., 3:]], -1)
    ang = np.radians(rng.uniform(-1, 1) * noise["rotate_deg"])
    s = 1.0 + rng.uniform(-1, 1) * noise["scale"]
    dx, dy = rng.uniform(-1, 1, 2) * noise["shift_px"]
    # PIL's affine maps OUTPUT pixels to INPUT pixels: inverse of "scale by s, rotate by ang about the centre, shift".
    c = size / 2.0
    ca, sa = np.cos(ang) / s, np.sin(ang) / s
    a, b = ca, sa
    d, e = -sa, ca
    cx, cy = c + dx, c + dy
    coeffs = (a, b, c - a * cx - b * cy, d, e, c - d * cx - e * cy)
    blur = rng.uniform(*noise["blur_px"])
    chans = []
    for ch in range(4):
        im = Image.fromarray(prem[..., ch], "F").transform((size, size), Image.AFFINE, coeffs, Image.BILINEAR)
        chans.append(gaussian_filter(np.asarray(im, dtype=np.float32), blur, mode="constant"))
    prem = np.stack(chans, -1)
    alpha = np.clip(prem[..., 3:], 0.0, 1.0)
    rgb = np.where(alpha > 1e-4, prem[..., :3] / np.maximum(alpha, 1e-4), 1.0)
    gain = 1.0 + rng.uniform(-1, 1, 3) * noise["gain"]
    offset = rng.uniform(-1, 1, 3) * noise["offset"]
    rgb = np.clip(rgb * gain + offset, 0.0, 1.0)
    out = np.concatenate([rgb, alpha], -1)
    return (out * 255.0 + 0.5).astype(np.uint8)
