"""One Blender release through the add-on as a user meets it; run by tests/test_blender_versions.py with that
release's Python (a side environment's bpy wheel), never collected by pytest itself.

    python blender_version_check.py --zip ADDON.zip --job JOB_DIR --camera CAMERA.json --server URL
                                    --token-file FILE --out DIR

Installs the built zip with Blender's "Install from Disk" operator, enables it, imports the job with the light
points display, records the point positions at three frames, switches the splat display on, records the splat
instances' matrices, renders a 64x64 Cycles frame, connects to the server with the add-on's Connect button and
lists its jobs. Everything is written to DIR (result.json, arrays.npz, render.png) for the test to check with the
backend's own tools; only bpy, numpy and the standard library are used here, as in Blender.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from importlib import import_module
from pathlib import Path

import numpy as np

import bpy
from mathutils import Matrix

FRAMES = (0, 2, 3)
RENDER_FRAME = 2
MODULE = "bl_ext.user_default.stag4d_blender"  # what Install from Disk names an extension in the user repository


def _points(obj) -> np.ndarray:
    """World positions of the evaluated point cloud (the points display)."""
    ev = obj.evaluated_get(bpy.context.evaluated_depsgraph_get())
    pos = np.zeros(len(ev.data.points) * 3, np.float32)
    ev.data.attributes["position"].data.foreach_get("vector", pos)
    m = np.array(ev.matrix_world)
    return pos.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]


def _instances(obj) -> np.ndarray:
    """World matrices of the splat instances, in point order."""
    dg = bpy.context.evaluated_depsgraph_get()
    out = sorted(((i.persistent_id[1], np.array(i.matrix_world)) for i in dg.object_instances
                  if i.is_instance and i.parent is not None and i.parent.original == obj), key=lambda x: x[0])
    return np.stack([m for _, m in out]) if out else np.zeros((0, 4, 4))


def run(args, res: dict, arrays: dict) -> None:
    scene = bpy.context.scene
    bpy.data.batch_remove(list(bpy.data.objects))  # the start-up cube, light and camera
    # The user's scene camera, there before the import (the splats' blur is bound to it): the backend's camera.
    camera = json.loads(Path(args.camera).read_text())
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(cam)
    cam.data.sensor_fit, cam.data.lens_unit = "VERTICAL", "FOV"
    cam.data.angle = math.radians(camera["fovy"])
    cam.matrix_world = Matrix(camera["matrix"])
    scene.camera = cam
    scene.render.resolution_x = scene.render.resolution_y = 64
    scene.render.resolution_percentage = 100

    # Preferences > Get Extensions > Install from Disk.
    t = time.perf_counter()
    res["install"] = sorted(bpy.ops.extensions.package_install_files(
        filepath=args.zip, repo="user_default", enable_on_install=True))
    res["enabled"] = MODULE in bpy.context.preferences.addons
    res["timings"] = {"install": time.perf_counter() - t}
    addon = sys.modules[MODULE]
    splat_nodes = import_module(MODULE + ".splat_nodes")
    state = import_module(MODULE + ".state")

    t = time.perf_counter()
    res["import"] = sorted(bpy.ops.stag4d.import_job(directory=args.job, points=True))
    res["timings"]["import"] = time.perf_counter() - t
    item = scene.stag4d.jobs[0]
    obj = item.gaussians
    res["object"] = {"type": obj.type, "modifiers": [m.type for m in obj.modifiers], "state": item.state}
    res["frame_range"] = [scene.frame_start, scene.frame_end]
    res["fps"] = scene.render.fps / scene.render.fps_base
    for f in FRAMES:
        scene.frame_set(f)
        arrays[f"points_{f}"] = _points(obj)

    # The splat display: what the panel's "Points Display" checkbox does, every Gaussian shown (in point order).
    splat_nodes.set_points_display(obj, False)
    splat_nodes.set_modifier_input(obj, "Min Opacity", 0.0)
    scene.frame_set(RENDER_FRAME)
    arrays["splats"] = _instances(obj)
    arrays["object_matrix"] = np.array(obj.matrix_world)
    arrays["camera"] = np.array(cam.matrix_world)[:3, 3]
    res["pixel_angle"] = float(splat_nodes.get_modifier_input(obj, "Pixel Angle"))
    splat_nodes.set_modifier_input(obj, "Min Opacity", splat_nodes.DEFAULT_MIN_OPACITY)

    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = 8
    scene.cycles.use_denoising = False
    scene.cycles.use_adaptive_sampling = False
    scene.render.film_transparent = True
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGBA"
    scene.render.filepath = str(Path(args.out) / "render.png")
    t = time.perf_counter()
    bpy.ops.render.render(write_still=True)
    res["timings"]["render"] = time.perf_counter() - t

    # The Cycles ray stop on this release: the backend's stop maps (made by the test with --stop-depth) in the
    # splat material, the check that keeps it on for this camera, the same render.
    if args.exact:
        ray_stop = import_module(MODULE + ".ray_stop")
        first, count = scene.frame_start, scene.frame_end - scene.frame_start + 1
        ray_stop.enable(scene, Path(args.exact), first, count, scene.camera.name, obj.name)
        res["ray_stop"] = {"switch": ray_stop._nodes()[1].outputs[0].default_value,
                           "off": scene.get(ray_stop.OFF_REASON_KEY, "")}
        scene.render.filepath = str(Path(args.out) / "render_ray_stop.png")
        bpy.ops.render.render(write_still=True)
        ray_stop.disable(scene)

    # The exact display's compositor on this release: the backend's RGBA + depth images (made by the test)
    # composited over the scene by depth, the splat object hidden from the render.
    if args.exact:
        exact_display = import_module(MODULE + ".exact_display")
        first, count = scene.frame_start, scene.frame_end - scene.frame_start + 1
        exact_display.setup_compositor(scene, Path(args.exact), first, count, obj)
        res["exact_hidden"] = obj.hide_render
        scene.cycles.samples = 1
        scene.frame_set(RENDER_FRAME)
        scene.render.filepath = str(Path(args.out) / "render_exact.png")
        bpy.ops.render.render(write_still=True)

    # Preferences > Backend: Remote, the server's address and token; then the panel's Connect button.
    prefs = bpy.context.preferences.addons[MODULE].preferences
    prefs.backend, prefs.remote_url = "REMOTE", args.server
    prefs.remote_token = Path(args.token_file).read_text().strip()
    bpy.ops.stag4d.connect()
    deadline = time.monotonic() + 30
    while state.STATUS.get("busy") and time.monotonic() < deadline:  # what the add-on's timer does in Blender
        state.process_updates()
        time.sleep(0.05)
    state.process_updates()
    res["status"] = {"text": state.STATUS.get("text"), "error": bool(state.STATUS.get("error"))}
    client = import_module(MODULE + ".backend.client").Client(prefs.remote_url, prefs.remote_token)
    res["jobs"] = [{"id": j.get("id"), "state": j.get("state")} for j in client.list_jobs()]
    state.stop_all(stop_server=False)
    res["addon_file"] = addon.__file__


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zip", required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--server", required=True)
    ap.add_argument("--token-file", required=True)
    ap.add_argument("--camera", required=True, help="JSON: {matrix: 4x4 camera-to-world (Blender), fovy: degrees}")
    ap.add_argument("--out", required=True)
    ap.add_argument("--exact", help="folder of rgba_NNNN.png + depth_NNNN.png (stag4d render --views) to composite")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"version": list(bpy.app.version), "version_string": bpy.app.version_string}
    arrays: dict = {}
    try:
        run(args, res, arrays)
    except Exception:  # noqa: BLE001 - reported to the test, which shows it
        res["error"] = traceback.format_exc()
    np.savez(out / "arrays.npz", **arrays)
    (out / "result.json").write_text(json.dumps(res, indent=1))
    return 1 if "error" in res else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: the bpy 4.2 module segfaults in its own teardown at interpreter exit once any class with a
    # draw method or a PropertyGroup was registered (a minimal Panel reproduces it; 4.5 and 5.0 do not, and
    # Blender itself never runs that teardown). The results are written; skip the teardown.
    os._exit(code)
