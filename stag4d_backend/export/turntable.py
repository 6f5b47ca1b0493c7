"""`stag4d render`: images of a fitted 4D model from cameras in the pinned convention, and a turntable video."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..atomic import atomic_path
from ..fitted import load_fitted
from ..gaussians.animated import AnimatedGaussians
from ..render.view import render_view
from ..render.cameras import OrbitCamera, to_torch

CAMERA_KEYS = ("index", "frame", "elevation", "azimuth", "radius", "fovy", "size")


class CamerasError(ValueError):
    """A CAMERAS.json that cannot be used (one line naming the entry and the fix)."""


def read_entry_list(path: Path, noun: str, keys) -> list:
    """The non-empty JSON list of ``noun`` objects in ``path`` (CAMERAS.json, VIEWS.json); CamerasError otherwise."""
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        raise CamerasError(f"{path}: no such file; write a JSON list of {noun}s {list(keys)}") from None
    except json.JSONDecodeError as exc:
        raise CamerasError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(entries, list) or not entries:
        raise CamerasError(f"{path}: expected a non-empty JSON list of {noun} objects")
    return entries


def read_cameras(path: str | Path) -> list[dict]:
    path = Path(path)
    entries = read_entry_list(path, "camera", CAMERA_KEYS)
    out, seen = [], set()
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise CamerasError(f"{path}: entry {i} is not an object")
        missing = [k for k in CAMERA_KEYS if k not in e]
        if missing:
            raise CamerasError(f"{path}: entry {i} lacks {', '.join(missing)}")
        try:
            cam = {"index": int(e["index"]), "frame": float(e["frame"]), "elevation": float(e["elevation"]),
                   "azimuth": float(e["azimuth"]), "radius": float(e["radius"]), "fovy": float(e["fovy"]),
                   "size": int(e["size"])}
        except (TypeError, ValueError):
            raise CamerasError(f"{path}: entry {i} has a non-numeric value") from None
        if cam["index"] < 0 or cam["index"] in seen:
            raise CamerasError(f"{path}: entry {i}: index {cam['index']} is negative or repeated")
        if not (0 < cam["fovy"] < 180 and cam["radius"] > 0 and 1 <= cam["size"] <= 8192
                and all(math.isfinite(cam[k]) for k in ("frame", "elevation", "azimuth"))):
            raise CamerasError(f"{path}: entry {i}: need 0 < fovy < 180, radius > 0, 1 <= size <= 8192")
        seen.add(cam["index"])
        out.append(cam)
    return out


@torch.no_grad()
def render_rgba(animated: AnimatedGaussians, camera: OrbitCamera, frame: float) -> np.ndarray:
    """Straight (un-premultiplied) RGBA uint8 [H, W, 4] of the model at ``frame`` seen from ``camera``."""
    g = animated.at_frame(frame, to_torch(camera.position))
    res = render_view(g, camera, (0.0, 0.0, 0.0))
    return to_uint8(straight_rgba(res).numpy())


def straight_rgba(res) -> torch.Tensor:
    """Straight (un-premultiplied) RGBA float [H, W, 4] in 0..1 of a rasteriser result drawn over black."""
    a = res.alpha.clamp(0, 1)
    rgb = torch.where(a[..., None] > 1e-6, res.rgb / a.clamp_min(1e-6)[..., None], torch.zeros_like(res.rgb))
    return torch.cat([rgb.clamp(0, 1), a[..., None]], -1)


def to_uint8(rgba: np.ndarray) -> np.ndarray:
    return (rgba * 255.0 + 0.5).astype(np.uint8)


def on_white(rgba: np.ndarray) -> np.ndarray:
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    return (rgba[..., :3].astype(np.float32) * a + 255.0 * (1 - a) + 0.5).astype(np.uint8)


def render_cameras(out_dir: str | Path, cameras_json: str | Path, images_dir: str | Path) -> list[Path]:
    cams = read_cameras(cameras_json)
    animated, _ = load_fitted(out_dir)
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for c in cams:
        rgba = render_rgba(animated, OrbitCamera.from_dict(c), c["frame"])
        path = images_dir / f"{c['index']:04d}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(rgba, "RGBA").save(tmp)
        written.append(path)
    return written


def render_turntable(out_dir: str | Path, video_path: str | Path, size: int = 256, loops: int = 1,
                     elevation: float = 10.0, fps: float | None = None) -> Path:
    """An mp4 orbiting the object once while the animation plays ``loops`` times (on white)."""
    import imageio.v2 as imageio

    animated, meta = load_fitted(out_dir)
    fps = fps or meta.get("fps") or 12.0
    n = animated.num_frames * loops
    video_path = Path(video_path)
    video_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = video_path.with_name(f".{video_path.stem}.tmp.mp4")
    size = size + size % 16  # H.264 likes multiples of 16
    with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=7, macro_block_size=16) as writer:
        for i in range(n):
            cam = OrbitCamera(elevation, 360.0 * i / n, 2.0, 49.1, size)
            writer.append_data(on_white(render_rgba(animated, cam, i % animated.num_frames)))
    tmp.replace(video_path)
    return video_path
