"""The Blender add-on's import and playback speed, and pictures of its splat display next to the backend's renders.

    .venv/bin/python benchmarks/blender.py                       # 30 frames x 50k Gaussians: import, frame change
    .venv/bin/python benchmarks/blender.py --gaussians 10000 50000 200000 --repeats 3
    .venv/bin/python benchmarks/blender.py --pictures docs         # docs/blender_splats.png (+ _points, _eevee)

Import = ``bpy.ops.stag4d.import_job`` on a baked job folder (Blender's USD import, the "Gaussian splats"
modifier and materials, frame range/fps): wall time of the operator. Frame change = ``scene.frame_set(f)`` +
``evaluated_depsgraph_get()`` with the splat display on (the cache reads the frame's positions, scales and
orientations; geometry nodes re-instance every Gaussian), median over every frame visited in a shuffled order.
Drawing the viewport is not included (headless bpy has no viewport). Targets: import under 3 s, frame change
under 50 ms (30 x 50k).

``render_and_compare`` is also used by tests/test_blender_addon.py: a headless Cycles render of the imported job
through the same camera as the backend's own render of that frame, and the silhouette IoU between them.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _bpy():
    os.environ.setdefault("BLENDER_USER_RESOURCES", tempfile.mkdtemp(prefix="stag4d-bl-"))
    os.environ.setdefault("XDG_CACHE_HOME", tempfile.mkdtemp(prefix="stag4d-cache-"))
    import bpy

    import blender_addon

    if not hasattr(bpy.types, "STAG4D_OT_import_job"):
        blender_addon.register()
    return bpy


def make_job(job_dir: Path, gaussians: int, frames: int, fps: float = 24.0, formats: str = "usd,ply",
             creature_motion: bool = False) -> Path:
    """A job folder (model/ + bake/) with the example creature's Gaussians and a moving field."""
    from bake_fixtures import make_fit_dir
    from stag4d_backend.stages.bake import bake

    net = None
    if creature_motion:  # a field regressed to the creature's real motion: nicer pictures
        from bake import fitted_creature_field
        from stag4d_backend.example_scene import ExampleCreature

        net = fitted_creature_field(ExampleCreature(gaussians, seed=0), frames)
    make_fit_dir(job_dir / "model", num_gaussians=gaussians, num_frames=frames, fps=fps, net=net)
    bake(job_dir / "model", job_dir / "bake", formats=formats)
    return job_dir


def ensure_camera(scene, orbit=None):
    """The scene camera "stag4d compare camera" placed like ``orbit`` (the backend's camera convention). Create it
    before importing, as a user's scene would have its camera: the splats' blur is bound to the scene camera."""
    import bpy

    from stag4d_backend.render.cameras import OrbitCamera

    return _camera(bpy, scene, orbit or OrbitCamera())


def _camera(bpy, scene, orbit):
    from mathutils import Matrix

    from stag4d_backend.render.cameras import blender_camera_matrix

    cam = bpy.data.objects.get("stag4d compare camera")
    if cam is None:
        cam = bpy.data.objects.new("stag4d compare camera", bpy.data.cameras.new("stag4d compare camera"))
        scene.collection.objects.link(cam)
    cam.data.sensor_fit, cam.data.lens_unit, cam.data.angle = "VERTICAL", "FOV", math.radians(orbit.fovy)
    cam.matrix_world = Matrix(blender_camera_matrix(orbit).tolist())
    scene.camera = cam
    return cam


def render_blender(scene, orbit, frame: int, out_png: Path, engine: str = "CYCLES", samples: int = 16) -> np.ndarray:
    """RGBA uint8 of the scene through ``orbit`` (transparent film)."""
    import bpy
    from PIL import Image

    _camera(bpy, scene, orbit)
    r = scene.render
    r.engine = engine
    r.resolution_x = r.resolution_y = orbit.size
    r.resolution_percentage = 100
    r.film_transparent = True
    r.image_settings.file_format = "PNG"
    r.image_settings.color_mode = "RGBA"
    if engine == "CYCLES":
        scene.cycles.device = "CPU"
        scene.cycles.samples = samples
        scene.cycles.use_denoising = False
        scene.cycles.use_adaptive_sampling = False
    else:
        scene.eevee.taa_render_samples = samples
    scene.frame_set(frame)
    r.filepath = str(out_png)
    bpy.ops.render.render(write_still=True)
    return np.array(Image.open(out_png).convert("RGBA"))


def backend_render(job_dir: Path, orbit, frame: int) -> np.ndarray:
    from stag4d_backend.fitted import load_fitted
    from stag4d_backend.export.turntable import render_rgba

    animated, _ = load_fitted(job_dir / "model")
    return render_rgba(animated, orbit, frame)


def _on_white(rgba: np.ndarray) -> np.ndarray:
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    return (rgba[..., :3].astype(np.float32) * a + 255.0 * (1 - a) + 0.5).astype(np.uint8)


def render_and_compare(job_dir: Path, scene, frame: int = 0, size: int = 128, samples: int = 16,
                       elevation: float = 0.0, azimuth: float = 0.0, out_png: Path | None = None,
                       engine: str = "CYCLES") -> dict:
    """Render the imported job in Blender and with the backend from the same orbit camera; compare alpha
    silhouettes (threshold 0.5) and colours. ``out_png``: backend | Blender | |alpha difference|, on white."""
    from PIL import Image

    from stag4d_backend.render.cameras import OrbitCamera

    orbit = OrbitCamera(elevation=elevation, azimuth=azimuth, size=size)
    ref = backend_render(job_dir, orbit, frame)
    tmp = Path(tempfile.mkdtemp(prefix="stag4d-render-")) / "blender.png"
    t0 = time.perf_counter()
    img = render_blender(scene, orbit, frame, tmp, engine=engine, samples=samples)
    render_s = time.perf_counter() - t0
    a, b = ref[..., 3] > 127, img[..., 3] > 127
    both = a & b
    iou = float(both.sum() / max(1, (a | b).sum()))
    rgb_diff = float(np.abs(ref[..., :3].astype(int) - img[..., :3].astype(int))[both].mean()) if both.any() else 255.0
    if out_png is not None:
        diff = np.abs(ref[..., 3].astype(int) - img[..., 3].astype(int)).astype(np.uint8)
        sheet = np.concatenate([_on_white(ref), _on_white(img), np.repeat(255 - diff[..., None], 3, -1)], 1)
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sheet).save(out_png)
    return {"iou": iou, "rgb_diff": rgb_diff, "coverage": float(b.mean()), "render_s": render_s,
            "backend": ref, "blender": img}


def clean(bpy) -> None:
    from blender_addon import state

    state.stop_all(stop_server=False)
    for coll in (bpy.data.objects, bpy.data.collections, bpy.data.pointclouds, bpy.data.meshes,
                 bpy.data.cache_files, bpy.data.materials, bpy.data.node_groups, bpy.data.cameras):
        bpy.data.batch_remove(list(coll))
    for scene in bpy.data.scenes:
        scene.stag4d.jobs.clear()


def time_job(job_dir: Path, frames: int, repeats: int) -> dict:
    bpy = _bpy()
    from blender_addon import splat_nodes

    imports, changes, points_changes = [], [], []
    for _ in range(repeats):
        clean(bpy)
        scene = bpy.context.scene
        scene.frame_set(0)
        t0 = time.perf_counter()
        assert bpy.ops.stag4d.import_job(directory=str(job_dir)) == {"FINISHED"}
        bpy.context.evaluated_depsgraph_get()  # the first evaluation belongs to the import
        imports.append(time.perf_counter() - t0)
        obj = scene.stag4d.jobs[0].gaussians
        order = list(range(frames)) * 2
        random.Random(0).shuffle(order)
        for points, sink in ((False, changes), (True, points_changes)):
            splat_nodes.set_points_display(obj, points)
            scene.frame_set(0)
            bpy.context.evaluated_depsgraph_get()
            for f in order:
                t = time.perf_counter()
                scene.frame_set(f)
                dg = bpy.context.evaluated_depsgraph_get()
                obj.evaluated_get(dg)
                sink.append(time.perf_counter() - t)
        n = sum(1 for i in bpy.context.evaluated_depsgraph_get().object_instances if i.is_instance)
    return {"import_s": statistics.median(imports), "import_min_s": min(imports),
            "frame_ms": 1000 * statistics.median(changes), "frame_p90_ms": 1000 * float(np.percentile(changes, 90)),
            "points_frame_ms": 1000 * statistics.median(points_changes), "instances_points_mode": n}


def _captioned(rows: list[np.ndarray], titles: list[str], row_labels: list[str]) -> np.ndarray:
    """Stack comparison rows under a header naming the columns; each row gets a label in its top-left corner."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=16)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    sheet = np.concatenate(rows, 0)
    w = sheet.shape[1] // len(titles)
    header = Image.new("RGB", (sheet.shape[1], 28), "white")
    d = ImageDraw.Draw(header)
    for i, t in enumerate(titles):
        d.text((i * w + 8, 6), t, fill=(0, 0, 0), font=font)
    body = Image.fromarray(sheet)
    d = ImageDraw.Draw(body)
    for i, t in enumerate(row_labels):
        d.text((8, i * rows[0].shape[0] + 6), t, fill=(90, 90, 90), font=font)
    out = Image.new("RGB", (sheet.shape[1], sheet.shape[0] + 28), "white")
    out.paste(header, (0, 0))
    out.paste(body, (0, 28))
    return np.array(out)


TITLES = ["backend (stag4d render)", "Blender add-on ({})", "alpha difference"]


def pictures(out_dir: Path, work: Path, eevee: bool) -> None:
    """docs/blender_splats.png: the backend's render | the add-on's Cycles render | alpha difference, for a
    12k-Gaussian creature at three frames and two views; plus the points display and (optionally) EEVEE."""
    bpy = _bpy()
    from PIL import Image

    from blender_addon import splat_nodes

    job = make_job(work / "pictures", 12000, 16, fps=12.0, formats="usd,ply", creature_motion=True)
    rows, lines, labels = [], [], []
    for frame, (el, az) in ((0, (0, 0)), (5, (15, 40)), (10, (20, -120))):
        clean(bpy)
        ensure_camera(bpy.context.scene)
        bpy.ops.stag4d.import_job(directory=str(job))
        res = render_and_compare(job, bpy.context.scene, frame, 320, 64, el, az, work / f"cmp_{frame}.png")
        rows.append(np.array(Image.open(work / f"cmp_{frame}.png")))
        labels.append(f"frame {frame}, elevation {el}, azimuth {az}: IoU {res['iou']:.3f}")
        lines.append(f"frame {frame} el {el} az {az}: IoU {res['iou']:.3f}, mean |rgb| {res['rgb_diff']:.1f}, "
                     f"Cycles {res['render_s']:.1f} s")
    titles = [t.format("Cycles, splats") for t in TITLES]
    Image.fromarray(_captioned(rows, titles, labels)).save(out_dir / "blender_splats.png")
    clean(bpy)
    ensure_camera(bpy.context.scene)
    bpy.ops.stag4d.import_job(directory=str(job), points=True)
    obj = bpy.context.scene.stag4d.jobs[0].gaussians
    splat_nodes.set_modifier_input(obj, "Point Size", 1.0)
    res = render_and_compare(job, bpy.context.scene, 5, 320, 32, 15, 40, work / "points.png")
    Image.fromarray(_captioned([np.array(Image.open(work / "points.png"))],
                               [t.format("Cycles, points display") for t in TITLES],
                               [f"frame 5: IoU {res['iou']:.3f}"])).save(out_dir / "blender_points.png")
    lines.append(f"points display, frame 5: IoU {res['iou']:.3f}")
    if eevee:
        clean(bpy)
        ensure_camera(bpy.context.scene)
        bpy.ops.stag4d.import_job(directory=str(job))
        res = render_and_compare(job, bpy.context.scene, 5, 256, 16, 15, 40, work / "eevee.png",
                                 engine="BLENDER_EEVEE")
        Image.fromarray(_captioned([np.array(Image.open(work / "eevee.png"))],
                                   [t.format("EEVEE, splats") for t in TITLES],
                                   [f"frame 5: IoU {res['iou']:.3f}"])).save(out_dir / "blender_eevee.png")
        lines.append(f"EEVEE frame 5: IoU {res['iou']:.3f}, mean |rgb| {res['rgb_diff']:.1f}, "
                     f"{res['render_s']:.0f} s (software OpenGL here)")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gaussians", type=int, nargs="+", default=[50000])
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pictures", type=Path, help="write docs pictures into this folder instead of timing")
    ap.add_argument("--eevee", action="store_true", help="with --pictures: also an EEVEE render (minutes here)")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="stag4d-blbench-"))
    if args.pictures:
        args.pictures.mkdir(parents=True, exist_ok=True)
        pictures(args.pictures, work, args.eevee)
        return
    print("| Gaussians | frames | gaussians.usdc (MB) | import (s) | frame change, splats (ms, median / p90) "
          "| frame change, points (ms) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.gaussians:
        job = make_job(work / f"job_{n}", n, args.frames)
        r = time_job(job, args.frames, args.repeats)
        size = (job / "bake" / "gaussians.usdc").stat().st_size / 1e6
        print(f"| {n:,} | {args.frames} | {size:.1f} | {r['import_s']:.3f} | {r['frame_ms']:.1f} / "
              f"{r['frame_p90_ms']:.1f} | {r['points_frame_ms']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
