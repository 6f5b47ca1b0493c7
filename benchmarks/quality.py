"""Quality benchmark of the 4D fit.

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
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stag4d_backend.config import get_preset  # noqa: E402
from stag4d_backend.dataset import load_frames  # noqa: E402
from stag4d_backend.example_scene import ExampleCreature, render_frame, write_stag4d_layout  # noqa: E402
from stag4d_backend.fitted import load_fitted  # noqa: E402
from stag4d_backend.metrics import psnr, ssim  # noqa: E402
from stag4d_backend.render.view import render_view  # noqa: E402
from stag4d_backend.render.cameras import OrbitCamera, anchor_cameras, front_camera, to_torch  # noqa: E402
from stag4d_backend.stages.fit import fit  # noqa: E402

HELD_OUT_VIEWS = [(el, az) for el in (0.0, 15.0) for az in (60.0, 120.0, 180.0, 240.0, 300.0)]


@torch.no_grad()
def render_fitted(animated, camera: OrbitCamera, frame: float) -> torch.Tensor:
    g = animated.at_frame(frame, to_torch(camera.position))
    return render_view(g, camera).rgb


def _fit(data_dir: Path, out_dir: Path, preset: str, iters: int | None, frames=None, threads: int = 0,
         max_minutes: float = 0.0):
    cfg = get_preset(preset)
    if iters:
        cfg = cfg.with_iters(iters)
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


def synthetic(args) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="stag4d-quality-"))
    creature = ExampleCreature(args.gt_gaussians, seed=0)
    data_dir = work / "data"
    t0 = time.perf_counter()
    write_stag4d_layout(creature, data_dir, num_frames=args.frames, size=args.size, anchor_size=args.size)
    print(f"ground truth written to {data_dir} in {time.perf_counter() - t0:.0f}s", flush=True)
    outcome, wall, cfg = _fit(data_dir, work / "fit", args.preset, args.iters, threads=args.threads,
                              max_minutes=args.max_minutes)
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
    if args.picture and pics:
        from PIL import Image

        rows = [np.concatenate([gt.numpy(), pred.numpy()], 1) for gt, pred in pics]
        Image.fromarray((np.concatenate(rows, 0) * 255).clip(0, 255).astype(np.uint8)).save(args.picture)
        print(f"picture (ground truth | render) -> {args.picture}")
    return {
        "scene": "synthetic", "preset": args.preset, "iters": cfg.iters, "steps_done": outcome.iterations,
        "backend": _backend(), "frames": args.frames, "size": args.size,
        "fit_wall_s": round(wall, 1), "num_gaussians": outcome.num_gaussians,
        "held_out_psnr": round(float(np.mean(held_p)), 2), "held_out_ssim": round(float(np.mean(held_s)), 4),
        "in_between_front_psnr": round(float(np.mean(between_p)), 2),
        "train_front_psnr": round(float(np.mean(train_front)), 2),
        "train_anchor_psnr": round(float(np.mean(train_anchor)), 2),
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
                              max_minutes=args.max_minutes)
    animated, meta = load_fitted(work / "fit")
    data = load_frames(data_dir, args.size, args.size, frames=frames)
    front, anchor = [], []
    for i in range(data.num_frames):
        front.append(psnr(render_fitted(animated, front_camera(args.size), i), data.ref_rgb[i]))
        for k, cam in enumerate(anchor_cameras(args.size, radius=cfg.anchor_radius or cfg.radius)):
            anchor.append(psnr(render_fitted(animated, cam, i), data.anchor_rgb[i, k]))
    return {
        "scene": "minions", "preset": args.preset, "iters": cfg.iters, "steps_done": outcome.iterations,
        "backend": _backend(), "frames": data.num_frames, "size": args.size,
        "fit_wall_s": round(wall, 1), "num_gaussians": outcome.num_gaussians,
        "front_psnr": round(float(np.mean(front)), 2), "anchor_psnr": round(float(np.mean(anchor)), 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "work_dir": str(work),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scene", choices=["synthetic", "minions"], default="synthetic")
    p.add_argument("--preset", default="preview")
    p.add_argument("--iters", type=int, help="override the preset's iterations")
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
    args = p.parse_args()
    result = synthetic(args) if args.scene == "synthetic" else minions(args)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
