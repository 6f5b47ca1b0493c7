"""Bake time and file sizes (issue "Bake and exports"), and an optional visual check of the mesh in Blender.

    .venv/bin/python benchmarks/bake.py                          # 30 frames x 10k / 50k / 200k, both field sizes
    .venv/bin/python benchmarks/bake.py --sizes 50000 --threads 1 2
    .venv/bin/python benchmarks/bake.py --visual /tmp/bake_visual  # creature + fitted motion -> Blender renders
    .venv/bin/python benchmarks/bake.py --splats --sizes 50000 --fields preview --threads 2 --repeats 5
                                                                   # per-frame formats: ply, gltf, spz vs raw

Models are built directly (the example creature's Gaussians as the canonical set, a deformation field with random
time-dependent weights), written in the fit layout, then baked with ``stages.bake.bake``. "raw" is the float32
size of what changes per frame: T x N x (3 position + 4 orientation + 3 scale) x 4 bytes. Target (30 x 50k, USD):
at most 2 s and at most 1.5 x raw.

``--splats``: each per-frame format (ply, gltf, spz) baked on its own, median of R runs; "raw" there is every
attribute a standalone frame needs, in float32: T x N x (3 position + 4 rotation + 3 scale + 1 opacity +
3 (d+1)^2 SH) x 4 bytes. Targets (30 x 50k): glTF <= 1.2x raw, SPZ <= 0.2x raw, each <= 3 s on 2 cores.

Field sizes: "preview" = the preview preset's (32, 32, 32, 16) x (1, 2), 16 channels; "full" = the authors' /
standard preset's (64, 64, 64, 25) x (1, 2, 4, 8), 32 channels (35.7 M grid parameters, a 143 MB file to load).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stag4d_backend.example_scene import ExampleCreature  # noqa: E402
from stag4d_backend.fitted import save_fitted  # noqa: E402
from stag4d_backend.gaussians.deformation import TIME_PLANES, DeformationConfig, DeformationNetwork  # noqa: E402
from stag4d_backend.gaussians.model import GaussianModel, inverse_sigmoid, rgb_to_sh  # noqa: E402
from stag4d_backend.stages.bake import bake  # noqa: E402

FIELDS = {
    "preview": dict(resolution=(32, 32, 32, 16), multires=(1, 2), feature_dim=16),
    "full": dict(),
}


def creature_model(n: int, seed: int = 0) -> GaussianModel:
    c = ExampleCreature(n, seed=seed).at(0.0)
    return GaussianModel.from_arrays(c.means, rgb_to_sh(c.colors), None,
                                     inverse_sigmoid(c.opacities.clamp(1e-4, 1 - 1e-4)), torch.log(c.scales),
                                     c.quats)


def random_field(name: str, seed: int = 0) -> DeformationNetwork:
    net = DeformationNetwork(DeformationConfig(**FIELDS[name], head_init="authors"), seed=seed)
    with torch.no_grad():
        for planes in net.grid.grids:
            for pi in TIME_PLANES:
                planes[pi].add_(torch.randn_like(planes[pi]) * 0.3)
        for head in net.deformation_net.heads():
            head[-1].weight.mul_(0.05)
    return net


def dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_benchmark(sizes, fields, frames, threads_list, root: Path, repeats: int) -> list[dict]:
    rows = []
    for field in fields:
        for n in sizes:
            fit = root / f"fit_{field}_{n}"
            save_fitted(fit, creature_model(n), random_field(field),
                        {"num_frames": frames, "fps": 24.0, "source_size": 512})
            for threads in threads_list:
                best = None
                for _ in range(repeats):
                    out = root / "bake"
                    t0 = time.perf_counter()
                    res = bake(fit, out, formats="usd", threads=threads)
                    usd_total = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    res_ply = bake(fit, out, formats="ply", threads=threads)
                    ply_total = time.perf_counter() - t0
                    row = {"field": field, "N": n, "T": frames, "threads": threads, "usd_total_s": usd_total,
                           "evaluate_s": res.timings["evaluate"], "usd_write_s": res.timings["usd"],
                           "ply_total_s": ply_total, "ply_write_s": res_ply.timings["ply"],
                           "usd_bytes": dir_size(out / "gaussians.usdc"), "ply_bytes": dir_size(out / "ply"),
                           "raw_bytes": frames * n * 10 * 4}
                    if best is None or row["usd_total_s"] < best["usd_total_s"]:
                        best = row
                rows.append(best)
                r = best
                print(f"{field:8s} N={n:>7d} threads={threads}  usd total {r['usd_total_s']:.2f} s "
                      f"(evaluate {r['evaluate_s']:.2f}, write {r['usd_write_s']:.2f})  "
                      f"usd {r['usd_bytes'] / 1e6:.1f} MB = {r['usd_bytes'] / r['raw_bytes']:.2f} x raw  "
                      f"ply total {r['ply_total_s']:.2f} s ({r['ply_bytes'] / 1e6:.0f} MB)", flush=True)
            shutil.rmtree(fit, ignore_errors=True)
    return rows


def markdown(rows) -> str:
    out = ["| field | Gaussians | frames | threads | USD bake (s) | evaluate (s) | USD write (s) | gaussians.usdc (MB) "
           "| raw f32 (MB) | USD / raw | PLY bake (s) | ply/ (MB) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['field']} | {r['N']:,} | {r['T']} | {r['threads']} | {r['usd_total_s']:.2f} | "
                   f"{r['evaluate_s']:.2f} | {r['usd_write_s']:.2f} | {r['usd_bytes'] / 1e6:.1f} | "
                   f"{r['raw_bytes'] / 1e6:.1f} | {r['usd_bytes'] / r['raw_bytes']:.2f} | {r['ply_total_s']:.2f} | "
                   f"{r['ply_bytes'] / 1e6:.0f} |")
    return "\n".join(out)


SPLAT_FORMATS = ("ply", "gltf", "spz")


def machine_line() -> str:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return f"{model}, {os.cpu_count()} CPUs, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"


def run_splat_formats(sizes, fields, frames, threads_list, root: Path, repeats: int) -> list[dict]:
    """Each per-frame format baked alone (evaluation included), median of ``repeats`` runs."""
    rows = []
    for field in fields:
        for n in sizes:
            fit = root / f"fit_{field}_{n}"
            model = creature_model(n)
            save_fitted(fit, model, random_field(field), {"num_frames": frames, "fps": 24.0, "source_size": 512})
            raw = frames * n * (3 + 4 + 3 + 1 + 3 * (model.sh_degree + 1) ** 2) * 4
            for threads in threads_list:
                for fmt in SPLAT_FORMATS:
                    runs = []
                    for _ in range(repeats):
                        out = root / "bake"
                        shutil.rmtree(out, ignore_errors=True)
                        t0 = time.perf_counter()
                        res = bake(fit, out, formats=fmt, threads=threads)
                        runs.append((time.perf_counter() - t0, res.timings["evaluate"], res.timings[fmt]))
                    total, evaluate, write = (float(np.median([r[i] for r in runs])) for i in range(3))
                    size = dir_size(out / fmt) + (dir_size(out / "canonical.glb") if fmt == "gltf" else 0)
                    per_frame = dir_size(out / fmt)
                    row = {"field": field, "N": n, "T": frames, "threads": threads, "format": fmt,
                           "total_s": total, "evaluate_s": evaluate, "write_s": write, "bytes": size,
                           "frames_bytes": per_frame, "raw_bytes": raw}
                    rows.append(row)
                    print(f"{field:8s} N={n:>7d} threads={threads} {fmt:5s} bake {total:.2f} s (evaluate "
                          f"{evaluate:.2f}, write {write:.2f})  {per_frame / 1e6:.1f} MB = {per_frame / raw:.3f} x raw",
                          flush=True)
            shutil.rmtree(fit, ignore_errors=True)
    return rows


def splat_markdown(rows) -> str:
    out = ["| field | Gaussians | frames | threads | format | bake (s) | evaluate (s) | write (s) | frame files (MB) "
           "| raw f32 (MB) | size / raw |",
           "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['field']} | {r['N']:,} | {r['T']} | {r['threads']} | {r['format']} | {r['total_s']:.2f} | "
                   f"{r['evaluate_s']:.2f} | {r['write_s']:.2f} | {r['frames_bytes'] / 1e6:.1f} | "
                   f"{r['raw_bytes'] / 1e6:.1f} | {r['frames_bytes'] / r['raw_bytes']:.3f} |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- visual check

def fitted_creature_field(creature: ExampleCreature, frames: int, steps: int = 400, seed: int = 0
                          ) -> DeformationNetwork:
    """Regress a preview-size field to the creature's true motion (centres only), so that the baked mesh moves
    like the creature. Seconds to a minute on a CPU; not a STAG4D fit."""
    torch.manual_seed(seed)
    net = DeformationNetwork(DeformationConfig(**FIELDS["preview"]), seed=seed)
    canon = creature.at(0.0)
    targets = [creature.at(f / frames).means for f in range(frames)]
    opt = torch.optim.Adam([{"params": net.grid_parameters(), "lr": 1.6e-2},
                            {"params": net.mlp_parameters(), "lr": 1.6e-3}])
    for it in range(steps):
        f = it % frames
        dx, _, _ = net.deltas(canon.means, f / frames)
        loss = ((canon.means + dx - targets[f]) ** 2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        err = max(float(((canon.means + net.deltas(canon.means, f / frames)[0] - targets[f]).norm(dim=-1)).mean())
                  for f in range(frames))
    print(f"regressed field: mean centre error {err * 1000:.1f} mm (worst frame)")
    return net


def render_in_blender(bake_dir: Path, out_dir: Path, frames: list[int]) -> list[Path]:
    os.environ.setdefault("BLENDER_USER_RESOURCES", tempfile.mkdtemp())
    os.environ.setdefault("XDG_CACHE_HOME", tempfile.mkdtemp())
    import bpy
    from mathutils import Vector

    written = []
    for what in ("mesh", "gaussians"):
        bpy.ops.wm.read_factory_settings(use_empty=True)
        bpy.ops.wm.usd_import(filepath=str(bake_dir / f"{what}.usdc"))
        sc = bpy.context.scene
        obj = bpy.data.objects[what]
        sc.render.resolution_x = sc.render.resolution_y = 320
        if what == "mesh":  # Workbench with the vertex colours (the displayColor colour attribute)
            sc.render.engine = "BLENDER_WORKBENCH"
            sc.display.shading.light = "STUDIO"
            sc.display.shading.color_type = "VERTEX"
        else:  # Cycles renders point clouds as spheres of the radius attribute; colour via an Attribute node
            sc.render.engine = "CYCLES"
            sc.cycles.samples = 16
            sc.cycles.device = "CPU"
            mat = bpy.data.materials.new("displayColor")
            mat.use_nodes = True
            nodes, links = mat.node_tree.nodes, mat.node_tree.links
            nodes.clear()
            attr = nodes.new("ShaderNodeAttribute")
            attr.attribute_name = "displayColor"
            opacity = nodes.new("ShaderNodeAttribute")
            opacity.attribute_name = "opacity"
            emit = nodes.new("ShaderNodeEmission")
            clear = nodes.new("ShaderNodeBsdfTransparent")
            mix = nodes.new("ShaderNodeMixShader")  # each sphere as opaque as its Gaussian
            out = nodes.new("ShaderNodeOutputMaterial")
            links.new(attr.outputs["Color"], emit.inputs["Color"])
            links.new(opacity.outputs["Fac"], mix.inputs["Fac"])
            links.new(clear.outputs["BSDF"], mix.inputs[1])
            links.new(emit.outputs["Emission"], mix.inputs[2])
            links.new(mix.outputs["Shader"], out.inputs["Surface"])
            obj.data.materials.append(mat)
        cam = bpy.data.objects.new("cam", bpy.data.cameras.new("cam"))
        sc.collection.objects.link(cam)
        sc.camera = cam
        cam.data.sensor_fit, cam.data.angle = "VERTICAL", math.radians(49.1)
        for frame in frames:
            sc.frame_set(frame)
            for view, az, el in (("front", 0, 0), ("side", 90, 10), ("back", 180, 15), ("above", 35, 55)):
                a, e = math.radians(az), math.radians(el)
                p = Vector((1.6 * math.cos(e) * math.sin(a), -1.6 * math.cos(e) * math.cos(a), 1.6 * math.sin(e)))
                cam.location = p
                cam.rotation_euler = (-p).to_track_quat("-Z", "Y").to_euler()
                sc.render.filepath = str(out_dir / f"{what}_f{frame:02d}_{view}.png")
                bpy.ops.render.render(write_still=True)
                written.append(Path(sc.render.filepath))
    return written


def contact_sheet(paths: list[Path], out: Path, cols: int = 4) -> Path:
    from PIL import Image

    ims = [Image.open(p).convert("RGB") for p in paths]
    w, h = ims[0].size
    rows = math.ceil(len(ims) / cols)
    sheet = Image.new("RGB", (w * cols, h * rows), "white")
    for i, im in enumerate(ims):
        sheet.paste(im, ((i % cols) * w, (i // cols) * h))
    sheet.save(out)
    return out


def visual(out_dir: Path, n: int, frames: int, resolution: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    creature = ExampleCreature(n, seed=0)
    fit = out_dir / "fit"
    save_fitted(fit, creature_model(n), fitted_creature_field(creature, frames),
                {"num_frames": frames, "fps": 8.0, "source_size": 256})
    res = bake(fit, out_dir / "bake", formats="usd,mesh,preview", mesh_resolution=resolution)
    print(res.summary(), {k: round(v, 2) for k, v in res.timings.items()}, res.mesh)
    show = [0, frames // 4, frames // 2]
    pngs = render_in_blender(out_dir / "bake", out_dir / "renders", show)
    for what in ("mesh", "gaussians"):
        sheet = contact_sheet([p for p in pngs if p.name.startswith(what)], out_dir / f"{what}_sheet.png")
        print("wrote", sheet, f"(rows: frames {show}; columns: front, side, back, above)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    ap.add_argument("--fields", nargs="+", default=["preview", "full"], choices=list(FIELDS))
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    ap.add_argument("--repeats", type=int, default=2,
                    help="best of R runs (the machine may be shared); --splats: median of R runs")
    ap.add_argument("--splats", action="store_true", help="per-frame formats ply, gltf, spz vs raw float32")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--visual", metavar="OUT_DIR", help="render the baked creature mesh / points in Blender")
    ap.add_argument("--visual-gaussians", type=int, default=12000)
    ap.add_argument("--visual-frames", type=int, default=16)
    ap.add_argument("--mesh-resolution", type=int, default=128)
    args = ap.parse_args()
    if args.visual:
        visual(Path(args.visual), args.visual_gaussians, args.visual_frames, args.mesh_resolution)
        return 0
    root = Path(args.workdir or tempfile.mkdtemp(prefix="stag4d-bake-bench-"))
    print(machine_line())
    try:
        run = run_splat_formats if args.splats else run_benchmark
        rows = run(args.sizes, args.fields, args.frames, args.threads, root, args.repeats)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    print(machine_line())
    print()
    print(splat_markdown(rows) if args.splats else markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
