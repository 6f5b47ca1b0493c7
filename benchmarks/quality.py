"""Quality benchmark of the 4D fit.

Hard set (issue 13; docs/quality.md): the six Blender-rendered ground-truth scenes of ``benchmarks/scenes/``
(articulated character, squash-and-stretch ball, twisting/bending column, fast tumbling cube, whipping tail, fine
texture), built and cached on first use. Each scene is fitted from its front view + the six anchor views (exact,
or the noisy-anchors variant) and scored on 12 held-out views (back and elevated included) at 4 frames: PSNR,
SSIM, mask IoU (images on white), the seen (front) view, the in-between times f + 0.5 (front and back), and the
floaters figure (share of visible Gaussians farther than 1.7 x the object's bounding radius from its centre at
any baked frame; stag4d_backend/metrics.py). One JSON line per scene and one for the mean.

    .venv/bin/python benchmarks/quality.py --scene hard --variant exact --preset preview --json out.jsonl \
        --picture hard.png --work /tmp/hard               # the whole set, fits kept under /tmp/hard
    .venv/bin/python benchmarks/quality.py --scene hard --only ball --variant noisy     # one scene
    .venv/bin/python benchmarks/quality.py --scene hard --work /tmp/hard --reuse-fits   # re-score kept fits
    .venv/bin/python benchmarks/quality.py --table out.jsonl                            # Markdown table

Synthetic scene: the procedural animated creature of ``stag4d_backend/example_scene.py`` (exact ground truth at
any camera and time) is written in the STAG4D layout (front view + the six exact anchor views per frame), fitted
with a preset, and compared with the ground truth on held-out views (azimuths and elevations not used in
training) at every training frame, and on the front view at in-between times. Full images on white.
Minions: fits ``../shared/data/minions`` and reports front-view and anchor-view PSNR on the training frames
(no ground truth exists elsewhere). LPIPS is not reported: its network weights cannot be obtained here.

    .venv/bin/python benchmarks/quality.py --scene synthetic --preset preview
    .venv/bin/python benchmarks/quality.py --scene minions --preset preview
Writes a JSON summary (``--json``) and a picture of ground truth beside render (``--picture``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stag4d_backend.config import get_preset, with_overrides  # noqa: E402
from stag4d_backend.dataset import load_frames  # noqa: E402
from stag4d_backend.example_scene import ExampleCreature, render_frame, write_stag4d_layout  # noqa: E402
from stag4d_backend.fitted import load_fitted  # noqa: E402
from stag4d_backend.metrics import floater_fraction, mask_iou, psnr, ssim  # noqa: E402
from stag4d_backend.render.view import render_view  # noqa: E402
from stag4d_backend.render.cameras import OrbitCamera, anchor_cameras, front_camera, to_torch  # noqa: E402
from stag4d_backend.stages.fit import fit  # noqa: E402

HELD_OUT_VIEWS = [(el, az) for el in (0.0, 15.0) for az in (60.0, 120.0, 180.0, 240.0, 300.0)]


@torch.no_grad()
def render_fitted(animated, camera: OrbitCamera, frame: float) -> torch.Tensor:
    g = animated.at_frame(frame, to_torch(camera.position))
    return render_view(g, camera).rgb


def _fit(data_dir: Path, out_dir: Path, preset: str, iters: int | None, frames=None, threads: int = 0,
         max_minutes: float = 0.0, overrides: list[str] | None = None):
    cfg = get_preset(preset)
    if iters:
        cfg = cfg.with_iters(iters)
    cfg = with_overrides(cfg, overrides or [])
    if threads:
        cfg = dataclasses.replace(cfg, num_threads=threads)
    t0 = time.perf_counter()

    def progress(s):
        if s["step"] % max(1, cfg.iters // 20) == 0:
            print(f"  step {s['step']}/{cfg.iters} {s['stage']} loss {s['loss']:.1f} ref-psnr {s['psnr_ref']:.2f} "
                  f"gaussians {s['num_gaussians']} {time.perf_counter() - t0:.0f}s", flush=True)

    outcome = fit(data_dir, out_dir, cfg, frames=frames, progress=progress,
                  time_budget_s=60.0 * max_minutes if max_minutes else None)
    if outcome.status == "time_budget":
        print(f"  time budget of {max_minutes} min reached at step {outcome.iterations}", flush=True)
    return outcome, time.perf_counter() - t0, cfg


def _backend() -> str:
    from stag4d_backend.render.rasterize import resolve_backend

    return resolve_backend("auto", torch.device("cpu"), torch.float32)


def creature_floaters(creature: ExampleCreature, animated, frames: int) -> float:
    """The floaters figure (docs/quality.md) with the creature's true per-frame centre and bounding radius."""
    centres, radii = [], []
    for f in range(frames):
        m = creature.at(f / frames).means.double().numpy()
        c = (m.min(0) + m.max(0)) / 2.0
        centres.append(c)
        radii.append(float(np.linalg.norm(m - c, axis=1).max()))
    means = np.stack([animated.at_frame(f).means.numpy() for f in range(frames)])
    return floater_fraction(means, animated.at_frame(0).opacities.numpy(), np.stack(centres), np.array(radii))


def synthetic(args) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="stag4d-quality-"))
    creature = ExampleCreature(args.gt_gaussians, seed=0)
    data_dir = work / "data"
    t0 = time.perf_counter()
    write_stag4d_layout(creature, data_dir, num_frames=args.frames, size=args.size, anchor_size=args.size)
    print(f"ground truth written to {data_dir} in {time.perf_counter() - t0:.0f}s", flush=True)
    outcome, wall, cfg = _fit(data_dir, work / "fit", args.preset, args.iters, threads=args.threads,
                              max_minutes=args.max_minutes, overrides=args.set)
    animated, meta = load_fitted(work / "fit")

    held_p, held_s, pics = [], [], []
    for f in range(args.frames):
        gt_frame = creature.at(f / args.frames)
        for el, az in HELD_OUT_VIEWS:
            cam = OrbitCamera(el, az, 2.0, 49.1, args.size)
            gt, _ = render_frame(gt_frame, cam)
            pred = render_fitted(animated, cam, f)
            held_p.append(psnr(pred, gt))
            held_s.append(ssim(pred, gt))
            if f in (0, args.frames // 2) and az in (120.0, 240.0) and el == 15.0:
                pics.append((gt, pred))
    between_p = []
    for f in range(args.frames):
        t = (f + 0.5) / args.frames
        gt, _ = render_frame(creature.at(t), front_camera(args.size))
        between_p.append(psnr(render_fitted(animated, front_camera(args.size), f + 0.5), gt))
    train_front, train_anchor = [], []
    for f in range(args.frames):
        fr = creature.at(f / args.frames)
        gt, _ = render_frame(fr, front_camera(args.size))
        train_front.append(psnr(render_fitted(animated, front_camera(args.size), f), gt))
        for cam in anchor_cameras(args.size):
            gt, _ = render_frame(fr, cam)
            train_anchor.append(psnr(render_fitted(animated, cam, f), gt))
    floaters = creature_floaters(creature, animated, args.frames)
    if args.picture and pics:
        from PIL import Image

        rows = [np.concatenate([gt.numpy(), pred.numpy()], 1) for gt, pred in pics]
        Image.fromarray((np.concatenate(rows, 0) * 255).clip(0, 255).astype(np.uint8)).save(args.picture)
        print(f"picture (ground truth | render) -> {args.picture}")
    return {
        "scene": "synthetic", "preset": args.preset, "set": args.set or [], "iters": cfg.iters,
        "steps_done": outcome.iterations,
        "backend": _backend(), "frames": args.frames, "size": args.size,
        "fit_wall_s": round(wall, 1), "num_gaussians": outcome.num_gaussians,
        "held_out_psnr": round(float(np.mean(held_p)), 2), "held_out_ssim": round(float(np.mean(held_s)), 4),
        "in_between_front_psnr": round(float(np.mean(between_p)), 2),
        "train_front_psnr": round(float(np.mean(train_front)), 2),
        "train_anchor_psnr": round(float(np.mean(train_anchor)), 2),
        "floaters_pct": round(100.0 * floaters, 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "work_dir": str(work),
    }


def minions(args) -> dict:
    data_dir = Path(args.minions)
    if not (data_dir / "ref").is_dir():
        raise SystemExit(f"minions data not found at {data_dir}")
    work = Path(args.work or tempfile.mkdtemp(prefix="stag4d-minions-"))
    frames = list(range(args.frames)) if args.frames else None
    outcome, wall, cfg = _fit(data_dir, work / "fit", args.preset, args.iters, frames=frames, threads=args.threads,
                              max_minutes=args.max_minutes, overrides=args.set)
    animated, meta = load_fitted(work / "fit")
    data = load_frames(data_dir, args.size, args.size, frames=frames)
    front, anchor = [], []
    for i in range(data.num_frames):
        front.append(psnr(render_fitted(animated, front_camera(args.size), i), data.ref_rgb[i]))
        for k, cam in enumerate(anchor_cameras(args.size, radius=cfg.anchor_radius or cfg.radius)):
            anchor.append(psnr(render_fitted(animated, cam, i), data.anchor_rgb[i, k]))
    return {
        "scene": "minions", "preset": args.preset, "set": args.set or [], "iters": cfg.iters,
        "steps_done": outcome.iterations,
        "backend": _backend(), "frames": data.num_frames, "size": args.size,
        "fit_wall_s": round(wall, 1), "num_gaussians": outcome.num_gaussians,
        "front_psnr": round(float(np.mean(front)), 2), "anchor_psnr": round(float(np.mean(anchor)), 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "work_dir": str(work),
    }


# --- the hard set (benchmarks/scenes/) ------------------------------------------------------------------------------

SCENES_BUILD = REPO / "benchmarks" / "scenes" / "build.py"
PICTURE_VIEWS = ((0.0, 180.0), (20.0, 180.0), (45.0, 90.0))  # back, elevated back, elevated side


def build_hard_set(names: list[str] | None, cache: str | None) -> dict[str, Path]:
    """Render (or find cached) scenes in a separate process (bpy and torch stay apart); name -> folder."""
    cmd = [sys.executable, str(SCENES_BUILD)] + (["--only", *names] if names else []) + (["--cache", cache] if cache else [])
    print("building the hard set (cached after the first run):", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    folders = {}
    for line in out.splitlines():
        parts = line.split(" ", 1)
        if len(parts) == 2 and (Path(parts[1]) / "scene.json").is_file():
            folders[parts[0]] = Path(parts[1])
    return folders


def read_rgba(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """An RGBA PNG -> (rgb composited on white [H, W, 3], alpha [H, W])."""
    from PIL import Image

    x = torch.from_numpy(np.asarray(Image.open(path).convert("RGBA"), dtype=np.float32) / 255.0)
    a = x[..., 3]
    return x[..., :3] * a[..., None] + (1.0 - a[..., None]), a


def _render(animated, cam: OrbitCamera, frame: float):
    res = render_view(animated.at_frame(frame, to_torch(cam.position)), cam)
    return res.rgb, res.alpha


def score_hard_scene(animated, folder: Path) -> tuple[dict, list]:
    """Metrics of a fit against one scene's ground truth, and its picture row (list of [H, W, 3] tiles)."""
    meta = json.loads((folder / "scene.json").read_text())
    held = [OrbitCamera.from_dict(c) for c in meta["heldout_cameras"]]
    per_frame, pairs = {}, {}
    p_all, s_all, iou_all = [], [], []
    for f in meta["heldout_frames"]:
        ps = []
        for v, cam in enumerate(held):
            gt, gt_a = read_rgba(folder / "heldout" / str(f) / f"{v}.png")
            pred, pred_a = _render(animated, cam, f)
            ps.append(psnr(pred, gt))
            s_all.append(ssim(pred, gt))
            iou_all.append(mask_iou(pred_a.numpy(), gt_a.numpy()))
            if (cam.elevation, cam.azimuth) in PICTURE_VIEWS:
                pairs[(f, (cam.elevation, cam.azimuth))] = (gt, pred)
        per_frame[f] = float(np.mean(ps))
        p_all += ps
    F = meta["frames"]
    front = OrbitCamera.from_dict(meta["front_camera"])
    seen_p, seen_iou = [], []
    for f in range(F):
        gt, gt_a = read_rgba(folder / "exact" / "ref" / f"{f}_rgba.png")
        pred, pred_a = _render(animated, front, f)
        seen_p.append(psnr(pred, gt))
        seen_iou.append(mask_iou(pred_a.numpy(), gt_a.numpy()))
    between = {"front": [], "back": []}
    back = OrbitCamera.from_dict(meta["back_camera"])
    for f in range(F - 1):
        for side, cam in (("front", front), ("back", back)):
            gt, _ = read_rgba(folder / "between" / f"{f}_{side}.png")
            between[side].append(psnr(_render(animated, cam, f + 0.5)[0], gt))
    means = np.stack([animated.at_frame(f).means.numpy() for f in range(F)])
    opac = animated.at_frame(0).opacities.numpy()
    bounds = np.asarray(meta["bounds_train"])
    floaters = floater_fraction(means, opac, bounds[:, :3], bounds[:, 3])
    visible = opac > 0.05
    dist = np.linalg.norm(means[:, visible] - bounds[:, None, :3], axis=-1) / bounds[:, None, 3]
    hardest = min(per_frame, key=per_frame.get)
    row = [t for view in PICTURE_VIEWS for t in pairs[(hardest, view)]]
    wide = OrbitCamera.from_dict(meta["wide_camera"])
    worst_far = max(meta["heldout_frames"], key=lambda f: float(dist[f].max()) if dist.size else 0.0)
    row += [read_rgba(folder / "wide" / f"{worst_far}.png")[0], _render(animated, wide, worst_far)[0]]
    result = {
        "held_out_psnr": round(float(np.mean(p_all)), 2), "held_out_ssim": round(float(np.mean(s_all)), 4),
        "held_out_iou": round(float(np.mean(iou_all)), 4),
        "held_out_psnr_per_frame": {str(f): round(p, 2) for f, p in per_frame.items()},
        "seen_psnr": round(float(np.mean(seen_p)), 2), "seen_iou": round(float(np.mean(seen_iou)), 4),
        "in_between_front_psnr": round(float(np.mean(between["front"])), 2),
        "in_between_back_psnr": round(float(np.mean(between["back"])), 2),
        "floaters_pct": round(100.0 * floaters, 3), "visible_gaussians": int(visible.sum()),
        "farthest_visible_over_radius": round(float(dist.max()) if dist.size else 0.0, 2),
        "floaters_pct_per_frame": [round(100.0 * float(x), 2) for x in (dist > 1.7).mean(1)] if dist.size else [],
        "picture_frames": {"hardest": hardest, "wide": worst_far},
    }
    return result, row


def hard(args) -> list[dict]:
    folders = build_hard_set(args.only, args.cache)
    work = Path(args.work or tempfile.mkdtemp(prefix="stag4d-hard-"))
    variants = ["exact", "noisy"] if args.variant == "both" else [args.variant]
    results, rows = [], []
    for variant in variants:
        for name, folder in folders.items():
            fit_dir = work / f"{name}-{variant}"
            print(f"{name} ({variant}): {folder}", flush=True)
            wall, steps, cfg_iters, gaussians = None, None, None, None
            if not (args.reuse_fits and (fit_dir / "meta.json").is_file()):
                outcome, wall, cfg = _fit(folder / variant, fit_dir, args.preset, args.iters, threads=args.threads,
                                          max_minutes=args.max_minutes, overrides=args.set)
                steps, cfg_iters, gaussians = outcome.iterations, cfg.iters, outcome.num_gaussians
            animated, _ = load_fitted(fit_dir)
            scores, row = score_hard_scene(animated, folder)
            rows.append(row)
            r = {"scene": name, "variant": variant, "preset": args.preset, "set": args.set or [],
                 "iters": cfg_iters, "steps_done": steps,
                 "fit_wall_s": None if wall is None else round(wall, 1), "num_gaussians": gaussians,
                 "load_avg_1m": round(os.getloadavg()[0], 2), **scores, "fit_dir": str(fit_dir)}
            print(json.dumps(r), flush=True)
            results.append(r)
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps(r) + "\n")
        keys = ("held_out_psnr", "held_out_ssim", "held_out_iou", "seen_psnr", "in_between_front_psnr",
                "in_between_back_psnr", "floaters_pct")
        done = [r for r in results if r["variant"] == variant]
        mean = {"scene": "mean", "variant": variant, "preset": args.preset, "set": args.set or [],
                "scenes": len(done),
                **{k: round(float(np.mean([r[k] for r in done])), 4 if "ssim" in k or "iou" in k else 2)
                   for k in keys},
                "min_held_out_psnr": min(r["held_out_psnr"] for r in done),
                "max_floaters_pct": max(r["floaters_pct"] for r in done)}
        print(json.dumps(mean), flush=True)
        results.append(mean)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(mean) + "\n")
    if args.picture and rows:
        from PIL import Image

        sheet = np.concatenate([np.concatenate([t.numpy() for t in row], 1) for row in rows], 0)
        Image.fromarray((sheet * 255 + 0.5).clip(0, 255).astype(np.uint8)).save(args.picture)
        print(f"picture (per scene: ground truth | render at back, elevated back, elevated side at the hardest "
              f"held-out frame, then the wide camera) -> {args.picture}")
    return results


def markdown_table(jsonl: Path) -> str:
    """The hard-set lines of a ``--json`` file as a Markdown table (one row per scene and variant, then means)."""
    rows = [json.loads(ln) for ln in Path(jsonl).read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "variant" in r and r["scene"] != "mean"]
    cols = ("held_out_psnr", "held_out_ssim", "held_out_iou", "seen_psnr", "in_between_front_psnr",
            "in_between_back_psnr", "floaters_pct", "farthest_visible_over_radius", "steps_done", "fit_wall_s",
            "num_gaussians", "load_avg_1m")
    out = ["| scene | variant | held-out PSNR | SSIM | IoU | seen PSNR | in-between front / back | floaters % | "
           "farthest / r | steps | fit s | Gaussians | load |", "|---|---|" + "---:|" * 11]
    def label(r):  # the variant, with the config overrides of the run (--set) if any
        return " ".join([r["variant"], *r.get("set", [])])

    for r in rows:
        v = [r.get(c) for c in cols]
        out.append(f"| {r['scene']} | {label(r)} | {v[0]} | {v[1]} | {v[2]} | {v[3]} | {v[4]} / {v[5]} | {v[6]} | "
                   f"{v[7]} | {v[8]} | {v[9]} | {v[10]} | {v[11]} |")
    for variant in dict.fromkeys(label(r) for r in rows):
        sel = [r for r in rows if label(r) == variant]
        m = {c: float(np.mean([r[c] for r in sel])) for c in cols[:8]}
        out.append(f"| **mean of {len(sel)}** | {variant} | **{m['held_out_psnr']:.2f}** | {m['held_out_ssim']:.4f} | "
                   f"{m['held_out_iou']:.4f} | {m['seen_psnr']:.2f} | {m['in_between_front_psnr']:.2f} / "
                   f"{m['in_between_back_psnr']:.2f} | **{m['floaters_pct']:.3f}** (max "
                   f"{max(r['floaters_pct'] for r in sel)}) | | | | | |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scene", choices=["synthetic", "minions", "hard"], default="synthetic")
    p.add_argument("--only", nargs="+", help="hard: these scenes only (default: all six)")
    p.add_argument("--variant", choices=["exact", "noisy", "both"], default="exact", help="hard: anchors to fit")
    p.add_argument("--cache", help="hard: scene cache folder (default $STAG4D_SCENES_CACHE or ~/.cache/stag4d/scenes)")
    p.add_argument("--reuse-fits", action="store_true", help="hard: score fits already in --work, fit the rest")
    p.add_argument("--preset", default="preview")
    p.add_argument("--iters", type=int, help="override the preset's iterations")
    p.add_argument("--set", action="append", metavar="KEY=JSON",
                   help="override a config field of the preset, e.g. anchors_per_step=3 or "
                        "densify.max_gaussians=20000 (repeatable; recorded in each JSON line)")
    p.add_argument("--frames", type=int, default=16, help="synthetic: frames; minions: first N frames (0 = all)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--gt-gaussians", type=int, default=12000)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop the fit after this wall time and evaluate what it reached (0 = no limit)")
    p.add_argument("--minions", default=str(REPO.parent / "shared" / "data" / "minions"))
    p.add_argument("--work", help="working directory (default: a new temporary one)")
    p.add_argument("--picture", help="PNG of ground truth beside render (synthetic)")
    p.add_argument("--json", help="append the result as one JSON line to this file")
    p.add_argument("--table", help="print the hard-set lines of this --json file as a Markdown table and exit")
    args = p.parse_args()
    if args.table:
        print(markdown_table(Path(args.table)))
        return
    if args.scene == "hard":
        hard(args)
        return
    result = synthetic(args) if args.scene == "synthetic" else minions(args)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
