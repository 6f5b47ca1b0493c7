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
import subprocess
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


def render_blender(scene, orbit, frame: int, out_png: Path, engine: str = "CYCLES", samples: int = 16,
                   adaptive_min: int | None = None) -> np.ndarray:
    """RGBA uint8 of the scene through ``orbit`` (transparent film). ``adaptive_min``: Cycles' adaptive sampling
    with Blender's noise threshold 0.01 and this minimum sample count (0: Blender's automatic minimum, which is 64
    at that threshold): a pixel stops sampling once it has converged. None: every pixel takes all ``samples``."""
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
        scene.cycles.use_adaptive_sampling = adaptive_min is not None
        if adaptive_min is not None:
            scene.cycles.adaptive_threshold, scene.cycles.adaptive_min_samples = 0.01, adaptive_min
    else:
        scene.eevee.taa_render_samples = samples
    scene.frame_set(frame)
    r.filepath = str(out_png)
    bpy.ops.render.render(write_still=True)
    return np.array(Image.open(out_png).convert("RGBA"))


def model_dir(job_dir: Path) -> Path:
    """A job folder's model/ or, for a fit output folder (``stag4d fit -o DIR`` then ``stag4d bake DIR``), itself."""
    return job_dir / "model" if (job_dir / "model").is_dir() else job_dir


def backend_render(job_dir: Path, orbit, frame: int) -> np.ndarray:
    from stag4d_backend.fitted import load_fitted
    from stag4d_backend.export.turntable import render_rgba

    animated, _ = load_fitted(model_dir(job_dir))
    return render_rgba(animated, orbit, frame)


def fidelity(ref: np.ndarray, img: np.ndarray) -> dict:
    """The issue's comparison of two straight RGBA uint8 images: PSNR of the two composited on white (all
    pixels, peak 255), mean |rgb| difference of the straight colours where both alphas exceed 0.5 ("inside the
    silhouette", 0..255), and the IoU of those alpha > 0.5 silhouettes."""
    a, b = ref[..., 3] > 127, img[..., 3] > 127
    both = a & b
    iou = float(both.sum() / max(1, (a | b).sum()))
    rgb_diff = float(np.abs(ref[..., :3].astype(int) - img[..., :3].astype(int))[both].mean()) if both.any() else 255.0

    def white(x):
        al = x[..., 3:4].astype(np.float64) / 255.0
        return x[..., :3].astype(np.float64) * al + 255.0 * (1.0 - al)

    mse = float(np.mean((white(ref) - white(img)) ** 2))
    psnr = 10.0 * math.log10(255.0 ** 2 / mse) if mse > 0 else float("inf")
    return {"psnr_white": psnr, "rgb_diff": rgb_diff, "iou": iou}


def _on_white(rgba: np.ndarray) -> np.ndarray:
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    return (rgba[..., :3].astype(np.float32) * a + 255.0 * (1 - a) + 0.5).astype(np.uint8)


def render_and_compare(job_dir: Path, scene, frame: int = 0, size: int = 128, samples: int = 16,
                       elevation: float = 0.0, azimuth: float = 0.0, out_png: Path | None = None,
                       engine: str = "CYCLES", adaptive_min: int | None = None) -> dict:
    """Render the imported job in Blender and with the backend from the same orbit camera; compare alpha
    silhouettes (threshold 0.5) and colours. ``out_png``: backend | Blender | |alpha difference|, on white."""
    from PIL import Image

    from stag4d_backend.render.cameras import OrbitCamera

    orbit = OrbitCamera(elevation=elevation, azimuth=azimuth, size=size)
    ref = backend_render(job_dir, orbit, frame)
    tmp = Path(tempfile.mkdtemp(prefix="stag4d-render-")) / "blender.png"
    t0 = time.perf_counter()
    img = render_blender(scene, orbit, frame, tmp, engine=engine, samples=samples, adaptive_min=adaptive_min)
    render_s = time.perf_counter() - t0
    if out_png is not None:
        diff = np.abs(ref[..., 3].astype(int) - img[..., 3].astype(int)).astype(np.uint8)
        sheet = np.concatenate([_on_white(ref), _on_white(img), np.repeat(255 - diff[..., None], 3, -1)], 1)
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sheet).save(out_png)
    return {**fidelity(ref, img), "coverage": float((img[..., 3] > 127).mean()), "render_s": render_s,
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


def time_render(job_dir: Path, size: int, samples: int, adaptive_min: int | None = None,
                sampling: str = "EXACT", elevation: float = 0.0, azimuth: float = 0.0, realize: bool = True,
                plain_material: bool = False, ray_stop: bool = False) -> float:
    """Wall time of one Cycles render (CPU, no denoising) of frame 0 through an orbit camera (default: the
    benchmarks' front camera, whose axes are the world's) with the panel's Splat Sampling ``sampling`` and the
    modifier's "Realize for Render" ``realize``. ``plain_material``: the splat material's alpha replaced by a
    constant 0.3 (same squares, same crossings in Exact per Sample: the difference is the material's cost).
    ``ray_stop``: the panel's Ray Stop made first (the backend's stop maps for this camera, timed apart)."""
    from blender_addon import splat_nodes

    bpy = _bpy()
    from stag4d_backend.render.cameras import OrbitCamera

    clean(bpy)
    scene = bpy.context.scene
    ensure_camera(scene)
    assert bpy.ops.stag4d.import_job(directory=str(job_dir)) == {"FINISHED"}
    scene.stag4d.splat_sampling = sampling
    splat_nodes.set_modifier_input(scene.stag4d.jobs[0].gaussians, "Realize for Render", realize)
    if plain_material:
        tree = bpy.data.materials[splat_nodes.SPLAT_MATERIAL].node_tree
        mix = next(n for n in tree.nodes if n.type == "MIX_SHADER")
        for link in list(mix.inputs["Fac"].links):
            tree.links.remove(link)
        mix.inputs["Fac"].default_value = 0.3
    if ray_stop:
        _camera(bpy, scene, OrbitCamera(size=size, elevation=elevation, azimuth=azimuth))
        scene.render.resolution_x = scene.render.resolution_y = size  # as render_blender will render
        scene.render.resolution_percentage = 100
        t0 = time.perf_counter()
        make_ray_stop(bpy, scene)
        print(f"ray stop maps ({scene.frame_end - scene.frame_start + 1} frames, backend process): "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    render_blender(scene, OrbitCamera(size=size, elevation=elevation, azimuth=azimuth), 0,
                   Path(tempfile.mkdtemp(prefix="stag4d-rt-")) / "r.png", samples=samples, adaptive_min=adaptive_min)
    return time.perf_counter() - t0


def ray_stop_fidelity(job_dir: Path, size: int, elevation: float, azimuth: float, samples: int = 1,
                      filter_width: float = 0.01, picture: Path | None = None) -> dict:
    """Cycles (Exact per Sample; by default 1 sample with the pixel-centre filter) of frame 0 without and with the
    Ray Stop: each against the backend, and the two against each other, with their render times. ``picture``:
    backend | Cycles | Cycles with the Ray Stop, on white."""
    bpy = _bpy()
    from stag4d_backend.render.cameras import OrbitCamera

    clean(bpy)
    scene = bpy.context.scene
    orbit = OrbitCamera(size=size, elevation=elevation, azimuth=azimuth)
    ensure_camera(scene, orbit)
    scene.render.resolution_x = scene.render.resolution_y = size
    assert bpy.ops.stag4d.import_job(directory=str(job_dir)) == {"FINISHED"}
    scene.cycles.filter_width = filter_width
    out = {}
    for name in ("without", "with"):
        if name == "with":
            make_ray_stop(bpy, scene)
        out[name] = render_and_compare(job_dir, scene, frame=0, size=size, samples=samples, elevation=elevation,
                                       azimuth=azimuth)
    out["between"] = fidelity(out["without"]["blender"], out["with"]["blender"])
    if picture is not None:
        from PIL import Image

        cells = [_on_white(out["without"]["backend"]), _on_white(out["without"]["blender"]),
                 _on_white(out["with"]["blender"])]
        sheet = _captioned([np.concatenate(cells, 1)], ["backend", "Cycles", "Cycles + Ray Stop"],
                           [f"Cycles {out['without']['render_s']:.1f} s, "
                            f"with the Ray Stop {out['with']['render_s']:.1f} s"])
        Path(picture).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sheet).save(picture)
    return out


def make_ray_stop(bpy, scene, timeout: float | None = None) -> None:
    """The panel's Ray Stop for the scene's first job, waited for (the backend's maps, then the material); raises
    if the job reports an error or the stop is off for the scene as it is."""
    import threading

    from blender_addon import ray_stop, state

    item = scene.stag4d.jobs[0]
    assert bpy.ops.stag4d.ray_stop(key=item.key) == {"FINISHED"}
    for t in threading.enumerate():
        if t.name.startswith("stag4d-ray-stop"):
            t.join(timeout)
    state.process_updates()
    if item.error or scene.get(ray_stop.OFF_REASON_KEY):
        raise RuntimeError(f"ray stop: {item.error or scene.get(ray_stop.OFF_REASON_KEY)}")


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


VIEWS = ((0, 0.0, 0.0), (5, 15.0, 40.0), (10, 20.0, -120.0))  # (frame, elevation, azimuth)
# The add-on's display as imported now ("Match the Backend Render" on): no Russian roulette on 1024 transparent
# bounces, pixel-centre sampling, the rasteriser's 0.999 alpha cap, sRGB-value blending, the 0.3 px^2 blur.
FINAL_LOOK = {"bounces": 1024, "rr": False, "filter": 0.01, "cap": 0.999, "display": True, "blur": True}
# The settings of the display before issue 19 (its ellipsoid geometry is gone; see docs/blender_addon.md).
MAIN_LOOK = {"bounces": 128, "rr": True, "filter": 1.5, "cap": 0.99, "display": False, "blur": True}
# Each cause undone alone from FINAL_LOOK: the PSNR it costs is its share. Deterministic (pixel-centre samples
# without Russian roulette), so 1 sample shows what 64 do, except for the two noise causes, which need samples.
CAUSE_VARIANTS = (
    ("now (Match the Backend Render)", {}),
    ("linear-light blending", {"display": False, "filter": 0.01}),
    ("128 transparent bounces", {"bounces": 128}),
    ("alpha cap 0.99", {"cap": 0.99}),
    ("no 0.3 px blur", {"blur": False}),
    ("Russian roulette on transparent bounces", {"rr": True}),
    ("1.5 px pixel filter", {"filter": 1.5}),
)
NOISE_CAUSES = ("Russian roulette on transparent bounces", "1.5 px pixel filter")


def apply_look(scene, obj, look: dict) -> None:
    """Set the render and material settings of a look (the keys of FINAL_LOOK) on an imported job."""
    import bpy

    from blender_addon import splat_nodes

    splat_nodes.set_display_space_blending(scene, look["display"])  # first: it sets the filter too
    cyc = scene.cycles
    cyc.transparent_max_bounces = look["bounces"]
    cyc.min_transparent_bounces = 0 if look["rr"] else look["bounces"]
    cyc.filter_width = look["filter"]
    mat = bpy.data.materials[splat_nodes.SPLAT_MATERIAL]
    for n in mat.node_tree.nodes:
        if n.bl_idname == "ShaderNodeMath" and n.operation == "MINIMUM":
            n.inputs[1].default_value = look["cap"]
    if not look.get("blur", True):
        obj.modifiers[splat_nodes.MODIFIER_NAME].driver_remove(
            f'["{splat_nodes._input_id(obj.modifiers[splat_nodes.MODIFIER_NAME].node_group, "Pixel Angle")}"]')
        splat_nodes.set_modifier_input(obj, "Pixel Angle", 0.0)


def causes(job: Path, work: Path, size: int, samples: int, variants=CAUSE_VARIANTS, views=VIEWS) -> list[dict]:
    """PSNR on white / colour difference / IoU of each CAUSE_VARIANTS row at every view; the deterministic rows
    with 1 sample, the noise rows with ``samples``."""
    bpy = _bpy()

    rows = []
    for i, (label, change) in enumerate(variants):
        look = {**FINAL_LOOK, **change}
        spp = samples if label in NOISE_CAUSES else 1
        for frame, el, az in views:
            clean(bpy)
            ensure_camera(bpy.context.scene)
            bpy.ops.stag4d.import_job(directory=str(job))
            scene = bpy.context.scene
            apply_look(scene, scene.stag4d.jobs[0].gaussians, look)
            res = render_and_compare(job, scene, frame, size, spp, el, az, work / f"cause_{i}_{frame}.png")
            rows.append({"variant": label, "samples": spp, "frame": frame, "elevation": el, "azimuth": az,
                         **{k: res[k] for k in ("psnr_white", "rgb_diff", "iou", "render_s")}})
            print(f"{label} | {spp} spp | frame {frame} el {el} az {az} | PSNR {res['psnr_white']:.2f} dB | "
                  f"|rgb| {res['rgb_diff']:.1f} | IoU {res['iou']:.3f} | {res['render_s']:.1f} s", flush=True)
    return rows


def _straight_uint8(rgb_premul, alpha) -> np.ndarray:
    a = np.clip(alpha, 0.0, 1.0)
    rgb = np.where(a[..., None] > 1e-6, rgb_premul / np.maximum(a, 1e-6)[..., None], 0.0)
    return (np.concatenate([np.clip(rgb, 0, 1), a[..., None]], -1) * 255.0 + 0.5).astype(np.uint8)


def _blackman_harris_weights(width_px: float, factor: int) -> np.ndarray:
    """Cycles' pixel filter (Blackman-Harris over [-width/2, width/2]) sampled at ``factor`` sub-pixels per pixel."""
    n = max(1, int(round(width_px * factor)))
    x = (np.arange(n) + 0.5) / n  # 0..1 over the filter's support
    w = 0.35875 - 0.48829 * np.cos(2 * np.pi * x) + 0.14128 * np.cos(4 * np.pi * x) - 0.01168 * np.cos(6 * np.pi * x)
    return w / w.sum()


def simulated_causes(job: Path, size: int, views=VIEWS) -> list[dict]:
    """The causes the backend's own rasteriser can reproduce in isolation, each alone against the reference render
    (same camera, frame, resolution): blending in linear light instead of sRGB values; Cycles' 1.5 px
    Blackman-Harris pixel filter instead of one sample at the pixel centre (rendered at 4x and filtered); the
    0.3 px^2 blur applied as an isotropic 3D variance (the node group's way) instead of in screen space; the 0.99
    alpha cap of the old material. No Blender involved: a pure measure of each cause's share."""
    import torch

    from stag4d_backend.export.frames import srgb_to_linear
    from stag4d_backend.fitted import load_fitted
    from stag4d_backend.render import composite_torch
    from stag4d_backend.render.cameras import OrbitCamera, to_torch
    from stag4d_backend.render.rasterize import rasterize

    animated, _ = load_fitted(model_dir(job))
    rows = []
    for frame, el, az in views:
        orbit = OrbitCamera(elevation=el, azimuth=az, size=size)
        g = animated.at_frame(frame, to_torch(orbit.position))

        def render(colors=None, scales=None, eps2d=0.3, scale=1, backend="auto"):
            K = orbit.K.copy()
            K[:2] *= scale
            res = rasterize(g.means, g.quats, g.scales if scales is None else scales, g.opacities,
                            g.colors if colors is None else colors, to_torch(orbit.viewmat), to_torch(K),
                            size * scale, size * scale, (0.0, 0.0, 0.0), eps2d=eps2d, backend=backend)
            return res.rgb.numpy().astype(np.float64), res.alpha.numpy().astype(np.float64)

        ref = _straight_uint8(*render())
        out = {}
        lin = torch.as_tensor(srgb_to_linear(g.colors.numpy()))
        rgb, a = render(colors=lin)
        straight = np.where(a[..., None] > 1e-6, rgb / np.maximum(a, 1e-6)[..., None], 0.0)
        enc = np.where(straight <= 0.0031308, 12.92 * straight, 1.055 * np.power(np.clip(straight, 0, None), 1 / 2.4)
                       - 0.055)
        out["linear-light blending"] = _straight_uint8(enc * a[..., None], a)
        f = 4  # Cycles' default pixel filter: 4x supersampled, Blackman-Harris 1.5 px, separable
        rgb, a = render(eps2d=0.3 * f * f, scale=f)
        w = _blackman_harris_weights(1.5, f)
        prem = np.concatenate([rgb, a[..., None]], -1)
        pad = len(w) // 2
        for axis in (0, 1):
            prem = np.apply_along_axis(lambda v: np.convolve(np.pad(v, pad, mode="edge"), w, mode="valid"), axis,
                                       prem)
        centre = np.arange(size) * f + f // 2
        prem = prem[: size * f, : size * f][np.ix_(centre, centre)] if prem.shape[0] >= size * f else prem
        out["1.5 px pixel filter"] = _straight_uint8(prem[..., :3], prem[..., 3])
        pixel_angle = 2.0 * math.tan(math.radians(orbit.fovy) / 2.0) / size
        dist = torch.linalg.norm(g.means - to_torch(orbit.position), dim=-1, keepdim=True)
        blurred = torch.sqrt(g.scales ** 2 + 0.3 * (pixel_angle * dist) ** 2)
        out["0.3 px blur as 3D variance"] = _straight_uint8(*render(scales=blurred, eps2d=0.0))
        saved = composite_torch.MAX_ALPHA
        composite_torch.MAX_ALPHA = 0.99
        try:
            out["alpha cap 0.99"] = _straight_uint8(*render(backend="torch"))
        finally:
            composite_torch.MAX_ALPHA = saved
        for name, img in out.items():
            rows.append({"cause": name, "frame": frame, "elevation": el, "azimuth": az, **fidelity(ref, img)})
    return rows


def fidelity_table(job: Path, work: Path, size: int, samples: list[int], engines: list[str],
                   out_dir: Path | None) -> list[dict]:
    """The add-on's display as imported (and the exact display) against the backend render, per engine and
    sample count, at every view; a picture sheet per engine (backend | Blender | alpha difference).
    CYCLES_CONVERGING: Cycles with the panel's Splat Sampling "Converging" and adaptive sampling (threshold 0.01,
    min samples 4)."""
    bpy = _bpy()
    from PIL import Image

    from blender_addon import state

    rows = []
    for engine in engines:
        for spp in samples:
            sheet, labels = [], []
            for frame, el, az in VIEWS:
                clean(bpy)
                ensure_camera(bpy.context.scene)
                bpy.ops.stag4d.import_job(directory=str(job))
                scene = bpy.context.scene
                if engine == "CYCLES_CONVERGING":
                    scene.stag4d.splat_sampling = "CONVERGING"
                if engine == "EXACT":
                    import threading

                    scene.render.resolution_x = scene.render.resolution_y = size
                    from stag4d_backend.render.cameras import OrbitCamera

                    ensure_camera(scene, OrbitCamera(elevation=el, azimuth=az, size=size))
                    item = scene.stag4d.jobs[0]
                    t0 = time.perf_counter()
                    bpy.ops.stag4d.exact_display(key=item.key)
                    for t in threading.enumerate():
                        if t.name.startswith("stag4d-exact"):
                            t.join()
                    state.process_updates()
                    backend_s = time.perf_counter() - t0
                png = work / f"fid_{engine}_{spp}_{frame}.png"
                res = render_and_compare(job, scene, frame, size, spp, el, az, png,
                                         engine="CYCLES" if engine in ("EXACT", "CYCLES_CONVERGING") else engine,
                                         adaptive_min=4 if engine == "CYCLES_CONVERGING" else None)
                if engine == "EXACT":
                    res["render_s"] += backend_s / (scene.frame_end - scene.frame_start + 1)
                rows.append({"engine": engine, "samples": spp, "frame": frame, "elevation": el, "azimuth": az,
                             **{k: res[k] for k in ("psnr_white", "rgb_diff", "iou", "render_s")}})
                print(f"{engine} | {spp} spp | frame {frame} el {el} az {az} | PSNR {res['psnr_white']:.2f} dB | "
                      f"|rgb| {res['rgb_diff']:.1f} | IoU {res['iou']:.3f} | {res['render_s']:.1f} s", flush=True)
                sheet.append(np.array(Image.open(png)))
                labels.append(f"frame {frame}, el {el:g}, az {az:g}: PSNR {res['psnr_white']:.1f} dB, "
                              f"|rgb| {res['rgb_diff']:.1f}")
            if out_dir is not None:
                name = {"CYCLES": f"Cycles {spp} spp", "EXACT": "exact display",
                        "CYCLES_CONVERGING": f"Cycles {spp} spp, converging"}.get(engine, f"EEVEE {spp} spp")
                titles = ["backend", f"Blender: {name}", "alpha difference"]  # short: narrow columns
                Image.fromarray(_captioned(sheet, titles, labels)).save(
                    out_dir / f"blender_fidelity_{engine.lower()}_{spp}.png")
    return rows


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown"


def _print_ray_stop(r: dict) -> None:
    for name in ("without", "with"):
        print(f"Ray stop {name}: PSNR on white {r[name]['psnr_white']:.2f} dB, |rgb| {r[name]['rgb_diff']:.2f}, "
              f"IoU {r[name]['iou']:.4f}, {r[name]['render_s']:.1f} s", flush=True)
    print(f"Ray stop, with vs without: PSNR on white {r['between']['psnr_white']:.2f} dB, "
          f"|rgb| {r['between']['rgb_diff']:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gaussians", type=int, nargs="+", default=[50000])
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pictures", type=Path, help="write docs pictures into this folder instead of timing")
    ap.add_argument("--eevee", action="store_true", help="with --pictures: also an EEVEE render (minutes here)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--fit", type=Path, help="fidelity on this job or fit folder (baked: bake/gaussians.usdc)")
    ap.add_argument("--size", type=int, default=96, help="with --fit: render size")
    ap.add_argument("--samples", type=int, nargs="+", default=[1, 64], help="with --fit: sample counts")
    ap.add_argument("--engines", nargs="+", default=["CYCLES", "EXACT"],
                    help="with --fit: CYCLES, CYCLES_CONVERGING (Splat Sampling 'Converging', adaptive "
                         "sampling with min 4), BLENDER_EEVEE (software OpenGL here: slow), EXACT")
    ap.add_argument("--causes", action="store_true", help="with --fit: each cause of the difference undone alone")
    ap.add_argument("--out", type=Path, help="with --fit or --ray-stop-fidelity: write the picture sheets here")
    ap.add_argument("--render", type=int, nargs=2, metavar=("SIZE", "SAMPLES"),
                    help="also time a Cycles render (CPU, 2 threads) of frame 0 of each set, as imported")
    ap.add_argument("--converging", action="store_true",
                    help="with --render: the panel's Splat Sampling 'Converging' (else 'Exact per Sample')")
    ap.add_argument("--view", type=float, nargs=2, default=(0.0, 0.0), metavar=("ELEVATION", "AZIMUTH"),
                    help="with --render: the orbit camera (default 0 0: the front, aligned with the world's axes)")
    ap.add_argument("--ray-stop-fidelity", action="store_true",
                    help="with --render SIZE SAMPLES, or with --fit (--size, --view; 1 sample): Cycles without / "
                         "with the Ray Stop vs the backend (frame 0)")
    ap.add_argument("--filter-width", type=float, default=0.01,
                    help="with --ray-stop-fidelity: Cycles' pixel filter width (default 0.01: the pixel centre)")
    ap.add_argument("--ray-stop", action="store_true",
                    help="with --render: the panel's Ray Stop on (the backend's stop maps, made first and timed apart)")
    ap.add_argument("--plain-material", action="store_true",
                    help="with --render: the splat material's alpha a constant (times the material's share)")
    ap.add_argument("--instanced", action="store_true",
                    help="with --render: 'Realize for Render' off (the squares reach Cycles as instances)")
    ap.add_argument("--adaptive", type=int, metavar="MIN_SAMPLES",
                    help="with --render: Cycles' adaptive sampling on (noise threshold 0.01) with this minimum "
                         "sample count (0: Blender's automatic minimum)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="stag4d-blbench-"))
    if args.fit:
        print(f"CPU: {_cpu_model()}; load before: {os.getloadavg()[0]:.1f}")
        if args.ray_stop_fidelity:
            _print_ray_stop(ray_stop_fidelity(args.fit, args.size, *args.view, filter_width=args.filter_width,
                                              picture=args.out / "ray_stop.png" if args.out else None))
        elif args.causes:
            for r in simulated_causes(args.fit, args.size):
                print(f"backend alone | {r['cause']} | frame {r['frame']} | PSNR {r['psnr_white']:.2f} dB | "
                      f"|rgb| {r['rgb_diff']:.2f} | IoU {r['iou']:.3f}", flush=True)
            causes(args.fit, work, args.size, max(args.samples))
        else:
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
            fidelity_table(args.fit, work, args.size, args.samples, args.engines, args.out)
        print(f"load after: {os.getloadavg()[0]:.1f}")
        return
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
              f"{r['frame_p90_ms']:.1f} | {r['points_frame_ms']:.1f} | load {os.getloadavg()[0]:.1f}", flush=True)
        if args.render and args.ray_stop_fidelity:
            _print_ray_stop(ray_stop_fidelity(job, args.render[0], *args.view, samples=args.render[1],
                                              filter_width=args.filter_width,
                                              picture=args.out / "ray_stop.png" if args.out else None))
        elif args.render:
            mode = "" if args.adaptive is None else f", adaptive sampling (min {args.adaptive})"
            sampling = "CONVERGING" if args.converging else "EXACT"
            wall = time_render(job, *args.render, adaptive_min=args.adaptive, sampling=sampling,
                               elevation=args.view[0], azimuth=args.view[1], realize=not args.instanced,
                               plain_material=args.plain_material, ray_stop=args.ray_stop)
            mode += ", instanced" if args.instanced else ""
            mode += ", ray stop" if args.ray_stop else ""
            mode += ", plain material (constant alpha)" if args.plain_material else ""
            print(f"Cycles {args.render[0]} px, {args.render[1]} spp{mode}, {sampling.lower()} splat sampling, "
                  f"camera el {args.view[0]:g} az {args.view[1]:g}, {n:,} splats: {wall:.1f} s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
