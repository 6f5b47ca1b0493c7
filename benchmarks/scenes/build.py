"""Build and render the hard evaluation set (issue 13): six animated ground-truth scenes made with bpy 5.0.1 and
rendered with Cycles on the CPU, in the STAG4D layout the backend reads, plus held-out views to score a fit.

    .venv/bin/python benchmarks/scenes/build.py                      # all six scenes (minutes; cached)
    .venv/bin/python benchmarks/scenes/build.py --only ball column   # some scenes
    .venv/bin/python benchmarks/scenes/build.py --list               # names and cached folders, render nothing

Output: ``$STAG4D_SCENES_CACHE`` (default ``~/.cache/stag4d/scenes``) / ``<name>-<hash>/``, the hash being of
these scene scripts and the parameters below, so an edit re-renders and an unchanged scene is reused. The script
prints one line per scene, ``<name> <folder>``. Each folder holds::

    exact/ref/{f}_rgba.png             front (input) view, 256 px, f = 0..F-1, RGBA (alpha = matte)
    exact/zero123/{f}_rgba/{k}.png     the six Zero123++ v1.1 anchor poses, exact, 320 px
    noisy/ref, noisy/zero123/...       the same front views; anchors degraded (colour, blur, pose/scale jitter)
    heldout/{f}/{v}.png                12 held-out views (back and elevated included) at 4 frames, 256 px
    between/{f}_front.png, {f}_back.png   front and back views at the in-between time f + 0.5
    wide/{f}.png                       a wide camera (radius 6) at the held-out frames
    scene.json                         cameras (the backend's OrbitCamera fields), frames, times and the object's
                                       bounding centre/radius per frame (Y-up world), written last

Frame f of F is clip time t = f / F, as in the backend. Cameras are the backend's orbit cameras
(stag4d_backend/render/cameras.py), placed with ``blender_camera_matrix`` (Y-up -> Blender Z-up); each render
checks that Blender projects test points to the backend's pixels (within 1e-3 px).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from stag4d_backend.render.cameras import (  # noqa: E402
    OrbitCamera, anchor_cameras, blender_camera_matrix, front_camera, z_up_to_y_up_points)

PARAMS = {
    "frames": 12, "ref_size": 256, "anchor_size": 320, "heldout_size": 256, "samples": 16, "filter_px": 1.5,
    "heldout_frames": [0, 4, 7, 11],
    # (elevation, azimuth): none is an anchor pose; back = azimuth 180
    "heldout_views": [[0, 60], [0, 120], [0, 180], [0, 240], [0, 300], [20, 0], [20, 120], [20, 180], [20, 240],
                      [45, 90], [45, 180], [45, 270]],
    "back_view": [0, 180], "wide_view": [20, 30, 6.0],
}


def default_cache() -> Path:
    return Path(os.environ.get("STAG4D_SCENES_CACHE", Path.home() / ".cache" / "stag4d" / "scenes"))


def content_hash() -> str:
    h = hashlib.sha256(json.dumps(PARAMS, sort_keys=True).encode())
    for name in ("build.py", "motions.py", "noise.py"):
        h.update((HERE / name).read_bytes())
    return h.hexdigest()[:12]


def scene_dir(name: str, cache: Path | None = None) -> Path:
    return (cache or default_cache()) / f"{name}-{content_hash()}"


# --- Blender -------------------------------------------------------------------------------------------------------

def _setup(bpy, samples: int):
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    r = scene.render
    r.engine = "CYCLES"
    r.film_transparent = True
    r.filter_size = PARAMS["filter_px"]
    r.resolution_percentage = 100
    r.image_settings.file_format = "PNG"
    r.image_settings.color_mode = "RGBA"
    r.use_persistent_data = True
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
    scene.cycles.use_denoising = False
    scene.cycles.use_adaptive_sampling = False
    scene.cycles.seed = 0
    scene.cycles.max_bounces = 0
    scene.view_settings.view_transform = "Standard"  # emission colours come out as sRGB, no tone curve
    scene.view_settings.look = "None"
    cam_data = bpy.data.cameras.new("camera")
    cam_data.sensor_fit = "VERTICAL"
    cam_data.clip_start, cam_data.clip_end = 0.01, 100.0
    cam = bpy.data.objects.new("camera", cam_data)
    scene.collection.objects.link(cam)
    scene.camera = cam
    return scene, cam


def place_camera(scene, cam, orbit: OrbitCamera) -> None:
    from mathutils import Matrix

    cam.matrix_world = Matrix(blender_camera_matrix(orbit).tolist())
    cam.data.angle_y = math.radians(orbit.fovy)
    scene.render.resolution_x = scene.render.resolution_y = orbit.size


def projection_error_px(scene, cam, orbit: OrbitCamera, points_yup: np.ndarray) -> float:
    """Largest pixel distance between Blender's projection of the points and the backend's (K @ viewmat)."""
    from bpy_extras.object_utils import world_to_camera_view
    from mathutils import Vector

    from stag4d_backend.render.cameras import y_up_to_z_up_points

    place_camera(scene, cam, orbit)
    scene.view_layers[0].update()
    worst = 0.0
    for p, pb in zip(points_yup, y_up_to_z_up_points(points_yup)):
        v = world_to_camera_view(scene, cam, Vector(pb.tolist()))
        xb, yb = v.x * orbit.size, (1.0 - v.y) * orbit.size
        pc = orbit.viewmat @ np.append(p, 1.0)
        uv = orbit.K @ pc[:3]
        worst = max(worst, math.hypot(uv[0] / uv[2] - xb, uv[1] / uv[2] - yb))
    return worst


def render(bpy, scene, cam, orbit: OrbitCamera, path: Path) -> None:
    if path.is_file() and path.stat().st_size > 0:  # resuming an interrupted build
        return
    place_camera(scene, cam, orbit)
    path.parent.mkdir(parents=True, exist_ok=True)
    scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)


def bounds_yup(bpy, scene) -> list[float]:
    """(cx, cy, cz, radius) of the evaluated geometry: bounding-box centre, farthest vertex from it (Y-up world)."""
    deps = bpy.context.evaluated_depsgraph_get()
    pts = []
    for obj in scene.objects:
        if obj.type not in ("MESH", "FONT"):
            continue
        ev = obj.evaluated_get(deps)
        me = ev.to_mesh()
        co = np.empty(len(me.vertices) * 3)
        me.vertices.foreach_get("co", co)
        co = co.reshape(-1, 3)
        m = np.array(ev.matrix_world)
        pts.append(co @ m[:3, :3].T + m[:3, 3])
        ev.to_mesh_clear()
    p = z_up_to_y_up_points(np.concatenate(pts))
    c = (p.min(0) + p.max(0)) / 2.0
    return [*map(float, c), float(np.linalg.norm(p - c, axis=1).max())]


# --- one scene -------------------------------------------------------------------------------------------------------

def build_scene(name: str, out: Path, samples: int | None = None) -> dict:
    import bpy

    import motions
    from noise import NOISE, anchor_seed, degrade_anchor

    from PIL import Image

    P = PARAMS
    F = P["frames"]
    scene, cam = _setup(bpy, samples or P["samples"])
    pose = motions.SCENES[name](bpy)
    front = front_camera(P["ref_size"])
    anchors = anchor_cameras(P["anchor_size"])
    held = [OrbitCamera(el, az, size=P["heldout_size"]) for el, az in P["heldout_views"]]
    back = OrbitCamera(*P["back_view"], size=P["heldout_size"])
    wide = OrbitCamera(P["wide_view"][0], P["wide_view"][1], P["wide_view"][2], size=P["heldout_size"])
    test_pts = np.array([[0.3, 0.2, -0.1], [-0.4, -0.3, 0.25], [0.1, 0.45, 0.3]])
    err = max(projection_error_px(scene, cam, c, test_pts) for c in [front, *anchors, *held, wide])
    if err > 1e-3:
        raise RuntimeError(f"Blender camera disagrees with the backend's by {err:.4f} px")
    train_bounds, between_bounds = [], []
    for f in range(F):
        pose(f / F)
        scene.view_layers[0].update()
        train_bounds.append(bounds_yup(bpy, scene))
        render(bpy, scene, cam, front, out / "exact" / "ref" / f"{f}_rgba.png")
        for k, c in enumerate(anchors):
            render(bpy, scene, cam, c, out / "exact" / "zero123" / f"{f}_rgba" / f"{k}.png")
        if f in P["heldout_frames"]:
            for v, c in enumerate(held):
                render(bpy, scene, cam, c, out / "heldout" / str(f) / f"{v}.png")
            render(bpy, scene, cam, wide, out / "wide" / f"{f}.png")
        if f < F - 1:
            pose((f + 0.5) / F)
            scene.view_layers[0].update()
            between_bounds.append(bounds_yup(bpy, scene))
            render(bpy, scene, cam, front, out / "between" / f"{f}_front.png")
            render(bpy, scene, cam, back, out / "between" / f"{f}_back.png")
        print(f"  {name}: frame {f + 1}/{F}", flush=True)
    shutil.copytree(out / "exact" / "ref", out / "noisy" / "ref", dirs_exist_ok=True)
    for f in range(F):
        for k in range(6):
            src = out / "exact" / "zero123" / f"{f}_rgba" / f"{k}.png"
            dst = out / "noisy" / "zero123" / f"{f}_rgba" / f"{k}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            noisy = degrade_anchor(np.asarray(Image.open(src).convert("RGBA")), anchor_seed(name, f, k))
            Image.fromarray(noisy, "RGBA").save(dst)
    meta = {
        "name": name, "hash": content_hash(), "frames": F, "description": motions.SCENES[name].__doc__.strip(),
        "variants": {"exact": "exact", "noisy": "noisy"}, "noise": NOISE,
        "front_camera": front.to_dict(), "anchor_cameras": [c.to_dict() for c in anchors],
        "heldout_frames": P["heldout_frames"], "heldout_cameras": [c.to_dict() for c in held],
        "between_times": [f + 0.5 for f in range(F - 1)], "back_camera": back.to_dict(), "wide_camera": wide.to_dict(),
        "bounds_train": train_bounds, "bounds_between": between_bounds,
        "render": {"engine": "CYCLES", "device": "CPU", "samples": samples or P["samples"],
                   "filter_px": P["filter_px"], "view_transform": "Standard", "bpy": bpy.app.version_string},
        "camera_check_px": err,
    }
    (out / "scene.json").write_text(json.dumps(meta, indent=1))
    return meta


def ensure_scene(name: str, cache: Path | None = None, samples: int | None = None) -> Path:
    """The scene's folder, rendered now unless a complete one is cached."""
    final = scene_dir(name, cache)
    if (final / "scene.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial"  # renders already there are kept (resume)
    t0 = time.perf_counter()
    build_scene(name, tmp, samples)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    print(f"  {name}: rendered in {time.perf_counter() - t0:.0f}s", flush=True)
    return final


def main() -> None:
    import motions

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted(motions.SCENES), help="build only these scenes")
    p.add_argument("--cache", type=Path, help="cache folder (default $STAG4D_SCENES_CACHE or ~/.cache/stag4d/scenes)")
    p.add_argument("--list", action="store_true", help="print each scene's folder (cached or not) and exit")
    p.add_argument("--samples", type=int, help=f"Cycles samples (default {PARAMS['samples']}; not in the hash)")
    args = p.parse_args()
    names = args.only or list(motions.SCENES)
    for name in names:
        folder = scene_dir(name, args.cache) if args.list else ensure_scene(name, args.cache, args.samples)
        print(name, folder, flush=True)


if __name__ == "__main__":
    main()
