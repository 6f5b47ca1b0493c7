"""Where Cycles' time goes on a splat set: how many squares each camera ray crosses, against how many the
backend's rasteriser composites before it stops (issue 19's 64-sample target).

    .venv/bin/python benchmarks/cycles_crossings.py                  # 30 x 50k creature set, front, 128 px
    .venv/bin/python benchmarks/cycles_crossings.py --size 256 --view 20 35
    .venv/bin/python benchmarks/cycles_crossings.py --job BAKED_FIT  # a real fit (stag4d fit + stag4d bake)
    .venv/bin/python benchmarks/cycles_crossings.py --cycles         # also count them in Cycles itself

Backend count (no bpy): frame 0 projected with the rasteriser's own projection; each Gaussian's footprint box is
the square the splat display traces (half-width min(3, sqrt(2 ln(255 opacity))) sigmas of the projected, 0.3 px^2
blurred covariance along the image axes; the add-on's squares add a 2 % and a perspective margin). Per covered
pixel, in depth order:

- crossed: every box over the pixel (what an Exact-per-Sample camera ray pays a transparent bounce for, up to
  Cycles' 1024 transparent bounces);
- before T < 1e-4: the boxes crossed while the transmittance is still above the rasteriser's stop (gsplat's
  1e-4), i.e. what a renderer that knew its transmittance would pay; before T < 1/255 likewise;
- after culling: crossed boxes of the Gaussians whose largest compositing weight (T x alpha, any pixel) reaches
  1e-4: what a camera-specific cull of the never-seen Gaussians would leave.

``--cycles``: Cycles itself counts them. The splat material is swapped for Transparent + Emission 1/1024 (an Add
Shader: the ray goes on at full throughput and every square adds 1/1024), rendered at 1 sample, Exact per Sample,
to a float EXR; a pixel's value x 1024 is its number of crossings (capped by the transparent bounce limit).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from stag4d_backend.render.reference import (ALPHA_THRESHOLD as ALPHA_MIN, MAX_ALPHA as ALPHA_MAX,  # noqa: E402
                                             T_THRESHOLD as T_STOP)


def footprints(job: Path, size: int, elevation: float, azimuth: float, frame: int = 0) -> dict:
    """The projected Gaussians of ``frame`` (numpy, float64) and each one's footprint box half-widths (px)."""
    from stag4d_backend.fitted import load_fitted
    from stag4d_backend.render.cameras import OrbitCamera, to_torch
    from stag4d_backend.render.projection import project_gaussians
    from blender import model_dir

    animated, _ = load_fitted(model_dir(job))
    cam = OrbitCamera(size=size, elevation=elevation, azimuth=azimuth)
    g = animated.at_frame(frame, to_torch(cam.position))
    p = project_gaussians(g.means, g.quats, g.scales, g.opacities, to_torch(cam.viewmat), to_torch(cam.K),
                          size, size)
    opacity = g.opacities.reshape(-1).double().numpy()
    cov = p.cov2d.double().numpy()
    k = np.minimum(3.0, np.sqrt(2.0 * np.log(np.maximum(255.0 * opacity, 1.0))))
    drawn = ((p.radii > 0).all(-1) if p.radii.dim() == 2 else p.radii > 0).numpy()
    return {"means2d": p.means2d.double().numpy(), "conics": p.conics.double().numpy(), "opacity": opacity,
            "depths": p.depths.double().numpy(), "rx": k * np.sqrt(cov[:, 0]), "ry": k * np.sqrt(cov[:, 2]),
            "drawn": drawn & (k > 0), "size": size}


def _box(f: dict, g: int):
    """Pixel slices of Gaussian g's box (pixel centres inside it) and the centres' offsets from its mean."""
    from stag4d_backend.render.ray_stop import pixel_box

    return pixel_box(f["means2d"][g], f["rx"][g], f["ry"][g], f["size"], f["size"])


def crossings(f: dict) -> dict:
    """Per-pixel counts (see the module docstring) and each Gaussian's largest compositing weight."""
    size = f["size"]
    T = np.ones((size, size))
    done = np.zeros((size, size), bool)
    crossed, alive_stop, alive_vis = (np.zeros((size, size)) for _ in range(3))
    weight = np.zeros(len(f["opacity"]))
    order = [g for g in np.argsort(f["depths"], kind="stable") if f["drawn"][g]]
    for g in order:
        box = _box(f, g)
        if box is None:
            continue
        sl, dx, dy = box
        crossed[sl] += 1
        alive_stop[sl] += ~done[sl]
        alive_vis[sl] += (T[sl] > ALPHA_MIN) & ~done[sl]
        a, b, c = f["conics"][g]
        s = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
        alpha = np.minimum(f["opacity"][g] * np.exp(-s), ALPHA_MAX)
        use = (s >= 0) & (alpha >= ALPHA_MIN) & ~done[sl]
        nxt = T[sl] * (1.0 - alpha)
        stop = use & (nxt <= T_STOP)
        add = use & ~stop
        if add.any():
            weight[g] = float((alpha * T[sl])[add].max())
        T[sl] = np.where(add, nxt, T[sl])
        done[sl] |= stop
    culled = np.zeros((size, size))
    for g in order:
        box = _box(f, g) if weight[g] >= T_STOP else None
        if box is not None:
            culled[box[0]] += 1
    return {"crossed": crossed, "before T < 1e-4": alive_stop, "before T < 1/255": alive_vis,
            "after culling (weight < 1e-4)": culled, "weight": weight}


def cycles_crossings(job: Path, size: int, elevation: float, azimuth: float) -> np.ndarray:
    """Cycles' own per-pixel count of the squares a camera ray crosses (see the module docstring)."""
    import blender as B
    from blender_addon import splat_nodes
    from stag4d_backend.render.cameras import OrbitCamera

    bpy = B._bpy()
    B.clean(bpy)
    scene = bpy.context.scene
    B.ensure_camera(scene)
    assert bpy.ops.stag4d.import_job(directory=str(job)) == {"FINISHED"}
    scene.stag4d.splat_sampling = "EXACT"
    nodes = bpy.data.materials[splat_nodes.SPLAT_MATERIAL].node_tree.nodes
    links = bpy.data.materials[splat_nodes.SPLAT_MATERIAL].node_tree.links
    nodes.clear()
    add, clear, emit = (nodes.new(t) for t in ("ShaderNodeAddShader", "ShaderNodeBsdfTransparent",
                                               "ShaderNodeEmission"))
    emit.inputs["Color"].default_value = (1.0 / 1024, 0.0, 0.0, 1.0)
    links.new(clear.outputs[0], add.inputs[0])
    links.new(emit.outputs[0], add.inputs[1])
    links.new(add.outputs[0], nodes.new("ShaderNodeOutputMaterial").inputs["Surface"])
    B._camera(bpy, scene, OrbitCamera(size=size, elevation=elevation, azimuth=azimuth))
    r = scene.render
    r.engine, r.resolution_x, r.resolution_y, r.resolution_percentage = "CYCLES", size, size, 100
    r.film_transparent = True
    r.image_settings.file_format, r.image_settings.color_mode = "OPEN_EXR", "RGBA"
    r.image_settings.color_depth = "32"
    scene.view_settings.view_transform = "Standard"  # EXR keeps scene-linear values whatever the view
    cyc = scene.cycles
    cyc.device, cyc.samples, cyc.use_denoising, cyc.use_adaptive_sampling = "CPU", 1, False, False
    scene.frame_set(0)
    r.filepath = str(Path(tempfile.mkdtemp(prefix="stag4d-cross-")) / "count.exr")
    bpy.ops.render.render(write_still=True)
    img = bpy.data.images.load(r.filepath)
    red = np.array(img.pixels[:], dtype=np.float64).reshape(size, size, 4)[::-1, :, 0]
    return np.rint(red * 1024.0)


def _stats(values: np.ndarray) -> str:
    return (f"{values.mean():.0f} | {np.median(values):.0f} | {np.percentile(values, 90):.0f} | "
            f"{values.max():.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--job", type=Path, help="a baked job folder or fit (default: the 30 x 50k creature set)")
    ap.add_argument("--gaussians", type=int, default=50000, help="without --job: the creature set's size")
    ap.add_argument("--size", type=int, default=128, help="image size (px)")
    ap.add_argument("--view", type=float, nargs=2, default=(0.0, 0.0), metavar=("ELEVATION", "AZIMUTH"))
    ap.add_argument("--cycles", action="store_true", help="also count the crossings in Cycles (bpy)")
    args = ap.parse_args()
    job = args.job
    if job is None:
        import blender as B

        job = Path(tempfile.gettempdir()) / "stag4d-crossings" / f"job_{args.gaussians}"
        if not (job / "bake" / "gaussians.usdc").exists():
            B.make_job(job, args.gaussians, 30)
    f = footprints(job, args.size, *args.view)
    counts = crossings(f)
    covered = counts["crossed"] > 0
    print(f"{job.name}, frame 0, el {args.view[0]:g} az {args.view[1]:g}, {args.size} px, "
          f"{len(f['opacity']):,} Gaussians; covered pixels {covered.mean():.3f}")
    print("| squares a camera ray crosses (covered pixels) | mean | median | p90 | max |")
    print("|---|---:|---:|---:|---:|")
    for name in ("crossed", "before T < 1e-4", "before T < 1/255", "after culling (weight < 1e-4)"):
        print(f"| {name} | {_stats(counts[name][covered])} |")
    seen = counts["weight"] >= T_STOP
    print(f"Gaussians with a compositing weight >= 1e-4 somewhere: {seen.mean():.3f}")
    if args.cycles:
        cyc = cycles_crossings(job, args.size, *args.view)
        print(f"| Cycles' own count (1024-bounce cap) | {_stats(cyc[cyc > 0])} |  covered {(cyc > 0).mean():.3f}")


if __name__ == "__main__":
    main()
