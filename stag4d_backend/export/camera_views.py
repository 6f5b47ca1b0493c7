"""`stag4d render --views`: the backend's own rasteriser seen through arbitrary (Blender) cameras, RGBA + depth.

The Blender add-on's exact display path (docs/blender_addon.md, "Exact: the backend's rasteriser"): for each
frame of the scene it sends the scene camera as a 4x4 matrix in the splat object's own space (Blender camera
axes: x right, y up, looking down -z) and its pinhole intrinsics K in pixels (principal point and focal lengths
from the lens, sensor fit, shift and resolution). This writes per view

* ``rgba_{index:04d}.png``: straight (un-premultiplied) sRGB RGBA, 8 bit: the rasteriser's colour / alpha,
  exactly what `stag4d render` writes for an orbit camera;
* ``depth_{index:04d}.png``: 16-bit grey, the rasteriser's expected camera depth (along the view axis, as
  Blender's Z pass) in units of ``DEPTH_UNIT`` Blender units; 65535 where nothing is drawn;
* with ``--stop-depth``, ``stop_{index:04d}.png``: 16-bit grey, the camera depth past which nothing shows (the
  rasteriser's compositing stops there; render/ray_stop.py), widened over each pixel's 3x3 neighbourhood and
  rounded up to ``DEPTH_UNIT``; 65535 where the pixel never stops. The add-on's Cycles display ends camera rays
  past it (docs/blender_addon.md, "Ray stop").

VIEWS.json: ``[{"index": 0, "frame": 0.0, "camera_in_object": [[4x4]], "K": [[3x3]], "width": W,
"height": H}, ...]``; ``frame`` is the fit's frame value (bake.json's ``frame_values``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..atomic import atomic_path
from ..fitted import load_fitted
from ..render.cameras import to_torch, viewmat_from_blender_local
from ..render.projection import project_gaussians
from ..render.rasterize import rasterize
from ..render.ray_stop import dilate_max, stop_depths
from ..render.reference import T_THRESHOLD
from .turntable import CamerasError, read_entry_list, straight_rgba, to_uint8

DEPTH_UNIT = 0.001       # Blender units per step of the 16-bit depth image (65.5 units of range)
DEPTH_EMPTY = 65535
VIEW_KEYS = ("index", "frame", "camera_in_object", "K", "width", "height")


def _matrix(value, shape, what: str) -> np.ndarray:
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise CamerasError(f"{what} is not a numeric matrix") from None
    if m.shape != shape or not np.all(np.isfinite(m)):
        raise CamerasError(f"{what} must be a finite {shape[0]}x{shape[1]} matrix")
    return m


def read_views(path: str | Path) -> list[dict]:
    path = Path(path)
    entries = read_entry_list(path, "view", VIEW_KEYS)
    out, seen = [], set()
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or any(k not in e for k in VIEW_KEYS):
            raise CamerasError(f"{path}: entry {i} needs {', '.join(VIEW_KEYS)}")
        try:
            view = {"index": int(e["index"]), "frame": float(e["frame"]), "width": int(e["width"]),
                    "height": int(e["height"])}
        except (TypeError, ValueError):
            raise CamerasError(f"{path}: entry {i} has a non-numeric index, frame, width or height") from None
        view["camera_in_object"] = _matrix(e["camera_in_object"], (4, 4), f"{path}: entry {i}: camera_in_object")
        view["K"] = _matrix(e["K"], (3, 3), f"{path}: entry {i}: K")
        if view["index"] < 0 or view["index"] in seen:
            raise CamerasError(f"{path}: entry {i}: index {view['index']} is negative or repeated")
        if not (1 <= view["width"] <= 8192 and 1 <= view["height"] <= 8192 and math.isfinite(view["frame"])):
            raise CamerasError(f"{path}: entry {i}: need 1 <= width, height <= 8192 and a finite frame")
        if view["K"][0, 0] <= 0 or view["K"][1, 1] <= 0:
            raise CamerasError(f"{path}: entry {i}: K needs positive focal lengths")
        try:
            view["viewmat"], view["depth_scale"] = viewmat_from_blender_local(view["camera_in_object"])
        except ValueError as exc:
            raise CamerasError(f"{path}: entry {i}: {exc}") from None
        seen.add(view["index"])
        out.append(view)
    return out


@torch.no_grad()
def view_gaussians(animated, view: dict):
    """The model's Gaussians at the view's frame, coloured for its camera position."""
    return animated.at_frame(view["frame"], to_torch(np.linalg.inv(view["viewmat"])[:3, 3]))


@torch.no_grad()
def render_view_rgba_depth(g, view: dict) -> tuple[np.ndarray, np.ndarray]:
    """(straight RGBA float [H, W, 4] in 0..1, expected depth [H, W] in Blender units, inf where empty) of the
    view's Gaussians ``g`` (view_gaussians)."""
    viewmat = view["viewmat"]
    res = rasterize(g.means, g.quats, g.scales, g.opacities, g.colors, to_torch(viewmat), to_torch(view["K"]),
                    view["width"], view["height"], (0.0, 0.0, 0.0))
    rgba = straight_rgba(res).numpy()
    drawn = rgba[..., 3] > 1e-6
    depth = np.where(drawn, res.depth.numpy() * view["depth_scale"], np.inf)
    return rgba, depth


@torch.no_grad()
def render_view_stop_depth(g, view: dict, t_stop: float = T_THRESHOLD) -> np.ndarray:
    """[H, W] camera depth (Blender units) past which the rasteriser draws nothing of the view's Gaussians ``g``
    at or next to each pixel (with ``t_stop`` above 1e-4: at most ``t_stop`` of the colour behind); inf where it
    never stops."""
    viewmat = view["viewmat"]
    p = project_gaussians(g.means, g.quats, g.scales, g.opacities.reshape(-1), to_torch(viewmat),
                          to_torch(view["K"]), view["width"], view["height"])
    drawn = (p.radii > 0).all(-1) if p.radii.dim() == 2 else p.radii > 0
    stop = stop_depths(p.means2d.numpy(), p.conics.numpy(), g.opacities.reshape(-1).numpy(), p.depths.numpy(),
                       p.cov2d.numpy(), drawn.numpy(), view["width"], view["height"], t_stop=t_stop)
    return dilate_max(stop) * view["depth_scale"]


def depth_steps(depth: np.ndarray, round_up: bool = False) -> np.ndarray:
    """Blender-unit depths as the 16-bit images' steps of DEPTH_UNIT (inf -> DEPTH_EMPTY)."""
    scaled = depth / DEPTH_UNIT
    steps = np.where(np.isfinite(depth), np.ceil(scaled) if round_up else np.round(scaled), DEPTH_EMPTY)
    return np.clip(steps, 0, DEPTH_EMPTY).astype(np.uint16)


def _save(img: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp)


def render_views(out_dir: str | Path, views_json: str | Path, images_dir: str | Path, on_view=None,
                 stop_depth: bool = False, stop_transmittance: float = T_THRESHOLD) -> list[Path]:
    """Render every view of VIEWS.json; ``on_view(index, rgba_path)`` after each (progress). ``stop_depth``:
    also each view's stop_NNNN.png (the module docstring), a pixel counting as stopped at ``stop_transmittance``."""
    views = read_views(views_json)
    animated, _ = load_fitted(out_dir)
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for v in views:
        g = view_gaussians(animated, v)  # evaluated once for the images and the stop map
        rgba, depth = render_view_rgba_depth(g, v)
        rgba_path = images_dir / f"rgba_{v['index']:04d}.png"
        _save(Image.fromarray(to_uint8(rgba), "RGBA"), rgba_path)
        _save(Image.fromarray(depth_steps(depth)), images_dir / f"depth_{v['index']:04d}.png")
        if stop_depth:  # rounded up: a ray is never ended before the rasteriser's stop
            stop = depth_steps(render_view_stop_depth(g, v, stop_transmittance), round_up=True)
            _save(Image.fromarray(stop), images_dir / f"stop_{v['index']:04d}.png")
        written.append(rgba_path)
        if on_view is not None:
            on_view(v["index"], rgba_path)
    return written
