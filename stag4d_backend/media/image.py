"""Image helpers: any PIL mode to RGB/RGBA, alpha from a uniform background colour, the object's box and the
one square crop of a clip. Pure image work on PIL images (no files)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

ALPHA_FLOOR = 8                  # alpha below this is background: matting noise, the authors' alpha-1 background


class MediaError(ValueError):
    """Bad input; the message is one line that names the file and the fix."""


# ----------------------------------------------------------------------------------------------------------
# Images: modes and alpha


def to_rgb_or_rgba(im: Image.Image, name: str) -> Image.Image:
    """Any common PIL mode -> RGB or RGBA (8 bits). Unsupported modes raise MediaError."""
    mode = im.mode
    if mode in ("RGB", "RGBA"):
        return im
    if mode in ("LA", "La", "PA", "RGBa"):
        return im.convert("RGBA")
    if mode == "P":
        return im.convert("RGBA" if "transparency" in im.info else "RGB")
    if mode in ("L", "1", "RGBX", "CMYK", "YCbCr"):
        return im.convert("RGB")
    if mode.startswith("I"):  # 16-bit greyscale PNG ("I;16", "I;16B") or 32-bit "I"
        arr = np.asarray(im).astype(np.float64)
        scale = 257.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 1.0
        return Image.fromarray(np.clip(np.round(arr / scale), 0, 255).astype(np.uint8), "L").convert("RGB")
    raise MediaError(f"{name}: image mode {mode} is not supported; save it as an 8-bit RGB or RGBA PNG")


def has_alpha(images: list[Image.Image]) -> bool:
    """True when the frames carry a real alpha (RGBA with some transparency); an all-opaque alpha is ignored."""
    return any(im.mode == "RGBA" and im.getchannel("A").getextrema()[0] < 255 - ALPHA_FLOOR for im in images)


def color_key(im: Image.Image, color: tuple[int, int, int] | None = None, tolerance: float = 24.0,
              softness: float = 12.0, name: str = "image") -> Image.Image:
    """Cut the object out of a uniform background: pixels close to the background colour (``color``, or the
    median of the border) that are connected to the image border become transparent, with a soft ramp of
    ``softness`` levels below ``tolerance``. Regions of background colour inside the object stay opaque. Raises
    MediaError when the border is not mostly that colour (keying would cut into a real scene)."""
    from scipy import ndimage

    rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    bg = np.median(border, axis=0) if color is None else np.asarray(color, np.float32)
    dist = np.abs(rgb - bg).max(-1)  # Chebyshev distance in 0..255 levels
    border_dist = np.abs(border - bg).max(-1)
    if (border_dist < tolerance).mean() < 0.9:
        what = "white" if color == (255, 255, 255) else f"a uniform colour (median {tuple(int(c) for c in bg)})"
        raise MediaError(f"{name}: the background is not {what} along the border, so it cannot be keyed "
                              f"out; install the matting model (`stag4d models download matting`) or give RGBA "
                              f"frames")
    # A 3x3 median first: video compression leaves isolated noisy pixels in flat backgrounds.
    dist = ndimage.median_filter(dist, size=3, mode="nearest")
    near = dist < tolerance
    labels, _ = ndimage.label(near)
    edge_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background = np.isin(labels, edge_labels[edge_labels > 0])
    # Specks of foreground far smaller than the object (noise, dust) become background too.
    fg_labels, n_fg = ndimage.label(~background)
    if n_fg > 1:
        areas = ndimage.sum_labels(np.ones_like(dist), fg_labels, index=np.arange(1, n_fg + 1))
        specks = np.isin(fg_labels, np.flatnonzero(areas < 0.01 * areas.max()) + 1)
    else:
        specks = np.zeros_like(background)
    ramp = np.clip((dist - (tolerance - softness)) / max(softness, 1e-6), 0.0, 1.0)
    alpha = np.where(background, ramp, 1.0)
    alpha[specks] = 0.0
    out = np.dstack([rgb, alpha * 255.0])
    return Image.fromarray(np.round(out).astype(np.uint8), "RGBA")


def clean_alpha(im: Image.Image) -> Image.Image:
    """Alpha below ALPHA_FLOOR -> 0 (faint matting noise would otherwise widen the crop box)."""
    a = np.asarray(im.getchannel("A"))
    if a.min() >= ALPHA_FLOOR or not (a < ALPHA_FLOOR).any():
        return im
    a = np.where(a < ALPHA_FLOOR, 0, a).astype(np.uint8)
    out = im.copy()
    out.putalpha(Image.fromarray(a, "L"))
    return out


def alpha_bbox(im: Image.Image) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of alpha > 0, exclusive end; None when fully transparent."""
    return im.getchannel("A").getbbox()


# ----------------------------------------------------------------------------------------------------------
# The crop rule


def clip_crop_box(boxes: list[tuple[int, int, int, int]], fraction: float) -> tuple[float, float, float, float]:
    """One square box (x0, y0, x1, y1, source pixels) for the whole clip: centred on the union of the per-frame
    object boxes, side = the union's larger extent / ``fraction``. The box may extend past the frame (padded
    with transparency)."""
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[2] for b in boxes)
    y1 = max(b[3] for b in boxes)
    side = max(x1 - x0, y1 - y0) / fraction
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    return (cx - side / 2.0, cy - side / 2.0, cx + side / 2.0, cy + side / 2.0)


def crop_square(im: Image.Image, box: tuple[float, float, float, float], size: int) -> Image.Image:
    """Resample the (sub-pixel) box of an RGBA image to size x size; transparent outside the image. Pillow
    resizes RGBA premultiplied, so background colour under alpha 0 does not bleed into the edges."""
    x0, y0, x1, y1 = box
    w, h = im.size
    pl, pt = max(0, -math.floor(x0)), max(0, -math.floor(y0))
    pr, pb = max(0, math.ceil(x1) - w), max(0, math.ceil(y1) - h)
    if pl or pt or pr or pb:
        canvas = Image.new("RGBA", (w + pl + pr, h + pt + pb), (0, 0, 0, 0))
        canvas.paste(im, (pl, pt))
        im = canvas
    out = im.resize((size, size), Image.Resampling.LANCZOS, box=(x0 + pl, y0 + pt, x1 + pl, y1 + pt))
    # LANCZOS rings faintly into the background: keep "alpha 0 outside" exact, with black (not stale) RGB there.
    arr = np.array(out)
    arr[arr[..., 3] < ALPHA_FLOOR] = 0
    return Image.fromarray(arr, "RGBA")
