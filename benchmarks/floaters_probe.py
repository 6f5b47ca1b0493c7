"""Where do stray Gaussians come from? A fit driven step by step with every Gaussian tracked.

Fits one scene with a preset (short runs for investigation), and every ``--every`` steps records, per Gaussian:
its deformed position at every training frame (distance from the object's centre in units of the object's
bounding radius), its opacity, whether any training camera (front + six anchors) sees it at each frame, and its
lineage (initial, clone or split child, with the step of birth). At the end it prints the floaters (opacity >
0.05 and, at ANY frame, farther than 1.7 radii from the centre), at which frames they are out, when they left,
how they were born, and whether any training view saw them there.

    .venv/bin/python benchmarks/floaters_probe.py --scene fast --iters 1500 --json /tmp/probe.json

Scenes: ``creature`` (the example's creature, 16 frames), ``fast`` (the creature translating across the frame,
spinning and bobbing: fast motion), ``minions`` (../shared/data/minions; centre/radius from the front mask).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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
from stag4d_backend.example_scene import ExampleCreature, GaussianFrame, write_stag4d_layout  # noqa: E402
from stag4d_backend.fitting.trainer import Trainer  # noqa: E402
from stag4d_backend.gaussians.densify import AdaptiveDensification  # noqa: E402
from stag4d_backend.metrics import psnr  # noqa: E402
from stag4d_backend.render.cameras import OrbitCamera, anchor_cameras, front_camera, to_torch  # noqa: E402
from stag4d_backend.render.view import render_view  # noqa: E402

FAR = 1.7
VISIBLE_OPACITY = 0.05


class FastCreature(ExampleCreature):
    """The example creature moving fast: across the frame (x +-0.35), up and down, and one full turn per clip."""

    def at(self, t: float, dtype=torch.float32) -> GaussianFrame:
        g = super().at(t, torch.float64)
        w = 2 * math.pi * t
        a = torch.tensor(w, dtype=torch.float64)
        c, s = torch.cos(a), torch.sin(a)
        R = torch.stack([torch.stack([c, 0 * c, s]), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64),
                         torch.stack([-s, 0 * c, c])])
        shift = torch.tensor([0.35 * math.sin(w), 0.12 * math.sin(2 * w), 0.0], dtype=torch.float64)
        means = g.means @ R.T + shift
        q = torch.stack([torch.cos(a / 2), 0 * a, torch.sin(a / 2), 0 * a])
        from stag4d_backend.example_scene import _quat_multiply

        quats = _quat_multiply(q.expand_as(g.quats), g.quats)
        return GaussianFrame(means.to(dtype), quats.to(dtype), g.scales.to(dtype), g.opacities.to(dtype),
                             g.colors.to(dtype))


def gt_bounds(creature, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame: bounding-box centre [F, 3] and bounding radius [F] of the ground-truth Gaussians."""
    cs, rs = [], []
    for f in range(frames):
        m = creature.at(f / frames).means
        c = 0.5 * (m.min(0).values + m.max(0).values)
        cs.append(c)
        rs.append((m - c).norm(dim=1).max())
    return torch.stack(cs), torch.stack(rs)


def mask_bounds(mask: torch.Tensor, fovy: float = 49.1, radius: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame from the front-view masks [F, H, W]: centre (x, y, 0) and a radius (half the box diagonal with a
    depth equal to the larger side), in world units at the camera distance."""
    f_, h, w = mask.shape
    px = 2 * radius * math.tan(math.radians(fovy) / 2) / h  # world units per pixel at the origin
    cs, rs = [], []
    for i in range(f_):
        ys, xs = torch.nonzero(mask[i] > 0.5, as_tuple=True)
        x0, x1, y0, y1 = xs.min().item(), xs.max().item(), ys.min().item(), ys.max().item()
        cx, cy = ((x0 + x1) / 2 - w / 2) * px, -((y0 + y1) / 2 - h / 2) * px
        sx, sy = (x1 - x0) * px, (y1 - y0) * px
        cs.append(torch.tensor([cx, cy, 0.0]))
        rs.append(torch.tensor(0.5 * math.sqrt(sx * sx + sy * sy + max(sx, sy) ** 2)))
    return torch.stack(cs), torch.stack(rs)


def seen_by(means: torch.Tensor, cameras, every: bool = False) -> torch.Tensor:
    """[N] bool: the point projects inside the image of at least one camera (of every camera with ``every``),
    in front of it."""
    out = torch.full((means.shape[0],), every, dtype=torch.bool)
    for cam in cameras:
        V = torch.as_tensor(cam.viewmat, dtype=means.dtype)
        K = torch.as_tensor(cam.K, dtype=means.dtype)
        pc = means @ V[:3, :3].T + V[:3, 3]
        z = pc[:, 2]
        uv = pc[:, :2] / z.clamp_min(1e-6)[:, None] * K[0, 0] + K[:2, 2]
        inside = (z > 0.05) & (uv[:, 0] >= 0) & (uv[:, 0] < cam.size) & (uv[:, 1] >= 0) & (uv[:, 1] < cam.size)
        out = out & inside if every else out | inside
    return out


@torch.no_grad()
def per_frame_distance(trainer: Trainer, centres, radii):
    """[F, N] distance / radius and [F, N] seen-by-a-training-camera."""
    cams = [front_camera(256)] + anchor_cameras(256)
    d, seen, seen_all = [], [], []
    for f in range(trainer.num_frames):
        g = trainer.gaussians_at(f / trainer.num_frames)
        d.append((g.means - centres[f]).norm(dim=1) / radii[f])
        seen.append(seen_by(g.means, cams))
        seen_all.append(seen_by(g.means, cams, every=True))
    return torch.stack(d), torch.stack(seen), torch.stack(seen_all)


class Tracking(AdaptiveDensification):
    """The fit's densification, plus a per-Gaussian id carried through clone/split/prune."""

    def attach(self, n: int):
        self.extras = {"uid": torch.arange(n, dtype=torch.float64)}
        self.next_uid = n
        self.lineage = {}  # uid -> (kind, parent uid, step)

    def step_post_backward(self, params, optimizers, state, step, info=None, extras=None):
        n0 = params[self.xyz_key].shape[0]
        out = super().step_post_backward(params, optimizers, state, step, info, extras=self.extras)
        if out is not None:
            uid = self.extras["uid"]
            seen = set()
            for i in range(uid.shape[0]):
                u = int(uid[i])
                if u in seen:  # a second row with this id: a clone or split child
                    kind = "clone" if out["num_clone"] and i < n0 + out["num_clone"] else "split"
                    self.lineage[self.next_uid] = (kind, u, step)
                    uid[i] = self.next_uid
                    self.next_uid += 1
                else:
                    seen.add(u)
        return out


HELD_OUT_VIEWS = [(el, az) for el in (0.0, 15.0) for az in (60.0, 120.0, 180.0, 240.0, 300.0)]


@torch.no_grad()
def quality(trainer: Trainer, creature, data, size: int = 128) -> dict:
    """Synthetic: held-out PSNR (10 views x 4 frames) against the ground truth; minions: front / anchor PSNR."""
    from stag4d_backend.example_scene import render_frame

    F = trainer.num_frames
    frames = sorted({0, F // 4, F // 2, (3 * F) // 4, F - 1})
    res = {}
    if creature is not None:
        vals = []
        for f in frames:
            for el, az in HELD_OUT_VIEWS:
                cam = OrbitCamera(el, az, 2.0, 49.1, size)
                gt, _ = render_frame(creature.at(f / F), cam)
                g = trainer.gaussians_at(f / F, to_torch(cam.position))
                vals.append(psnr(render_view(g, cam).rgb, gt))
        res["held_out_psnr"] = round(float(np.mean(vals)), 2)
    front = []
    for f in frames:
        cam = front_camera(data.ref_rgb.shape[1])
        front.append(psnr(render_view(trainer.gaussians_at(f / F), cam).rgb, data.ref_rgb[f]))
    res["front_psnr"] = round(float(np.mean(front)), 2)
    if data.has_anchors:
        anc = []
        for f in frames:
            for k, cam in enumerate(anchor_cameras(data.anchor_rgb.shape[2])):
                anc.append(psnr(render_view(trainer.gaussians_at(f / F), cam).rgb, data.anchor_rgb[f, k]))
        res["anchor_psnr"] = round(float(np.mean(anc)), 2)
    return res


@torch.no_grad()
def hard_held_out(trainer: Trainer, folder, scene: dict) -> float:
    """Mean PSNR on white over the hard scene's held-out views and frames (as benchmarks/quality.py)."""
    from PIL import Image

    vals = []
    for f in scene["heldout_frames"]:
        for v, cd in enumerate(scene["heldout_cameras"]):
            cam = OrbitCamera.from_dict(cd)
            rgba = np.asarray(Image.open(Path(folder) / "heldout" / str(f) / f"{v}.png").convert("RGBA"),
                              dtype=np.float32) / 255.0
            gt = torch.from_numpy(rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:]))
            g = trainer.gaussians_at(f / trainer.num_frames, to_torch(cam.position))
            vals.append(psnr(render_view(g, cam).rgb, gt))
    return round(float(np.mean(vals)), 2)


def run(args) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="stag4d-probe-"))
    cfg = get_preset(args.preset)
    if args.iters:
        cfg = cfg.with_iters(args.iters)
    if args.resolution:
        cfg = cfg.with_resolution(args.resolution)
    cfg = with_overrides(cfg, args.set or [])
    hard = None
    if args.hard:
        hard = json.loads((Path(args.hard) / "scene.json").read_text())
        data = load_frames(Path(args.hard) / args.variant, cfg.ref_resolution, cfg.anchor_resolution)
        b = torch.tensor(hard["bounds_train"], dtype=torch.float32)
        centres, radii = b[:, :3], b[:, 3]
        creature = None
    elif args.scene == "minions":
        frames = list(range(args.frames)) if args.frames else None
        data = load_frames(args.minions, cfg.ref_resolution, cfg.anchor_resolution, frames=frames)
        centres, radii = mask_bounds(data.ref_mask)
        creature = None
    else:
        creature = (FastCreature if args.scene == "fast" else ExampleCreature)(12000, seed=0)
        nf = args.frames or 16
        data_dir = work / f"data-{args.scene}"
        if not (data_dir / "zero123" / f"{nf - 1}_rgba" / "5.png").is_file():
            write_stag4d_layout(creature, data_dir, num_frames=nf, size=256, anchor_size=256)
        data = load_frames(data_dir, cfg.ref_resolution, cfg.anchor_resolution)
        centres, radii = gt_bounds(creature, nf)
    torch.manual_seed(0)
    trainer = Trainer(cfg, data, None, "cpu")
    tracking = Tracking(**{f.name: getattr(trainer.strategy, f.name) for f in dataclasses.fields(trainer.strategy)})
    tracking.attach(trainer.model.num_points)
    trainer.strategy = tracking
    left_at = {}  # uid -> first snapshot step it was a floater
    history = []
    t0 = time.perf_counter()
    while trainer.it < cfg.iters:
        trainer.step()
        if trainer.it % args.every == 0 or trainer.it == cfg.iters:
            d, seen, _ = per_frame_distance(trainer, centres, radii)
            op = torch.sigmoid(trainer.model.params["opacity"].detach()).reshape(-1)
            far = (d > FAR).any(0) & (op > VISIBLE_OPACITY)
            vis = op > VISIBLE_OPACITY
            uid = tracking.extras["uid"]
            for i in far.nonzero(as_tuple=True)[0].tolist():
                left_at.setdefault(int(uid[i]), trainer.it)
            history.append({"step": trainer.it, "n": int(vis.sum()), "floaters": int(far.sum()),
                            "fraction": round(float(far.sum()) / max(int(vis.sum()), 1), 4),
                            "max_dist": round(float((d * vis).max()), 2),
                            "far_per_frame": [int(((d[f] > FAR) & vis).sum()) for f in range(d.shape[0])]})
            print(f"step {trainer.it} {time.perf_counter() - t0:.0f}s {history[-1]}", flush=True)
    # The floaters at the end, explained.
    d, seen, seen_all = per_frame_distance(trainer, centres, radii)
    op = torch.sigmoid(trainer.model.params["opacity"].detach()).reshape(-1)
    vis = op > VISIBLE_OPACITY
    far_f = (d > FAR) & vis
    far = far_f.any(0)
    uid = tracking.extras["uid"]
    kinds = {"initial": 0, "clone": 0, "split": 0}
    seen_when_far = int((far_f & seen).sum())
    frames_far = far_f.sum(0)[far]
    born = []
    for i in far.nonzero(as_tuple=True)[0].tolist():
        u = int(uid[i])
        kind = tracking.lineage.get(u, ("initial", None, 0))
        # A child's kind; walk up to see whether an ancestor was already a floater when it was born.
        kinds[kind[0]] += 1
        born.append(kind[2])
    canon = trainer.model.params["xyz"].detach()
    can_d = (canon - centres.mean(0)).norm(dim=1) / radii.mean()
    summary = {
        "scene": args.scene, "preset": args.preset, "iters": cfg.iters, "frames": int(d.shape[0]),
        "visible": int(vis.sum()), "floaters": int(far.sum()), "fraction": round(float(far.sum()) / int(vis.sum()), 4),
        "far_per_frame": far_f.sum(1).tolist(),
        "seen_by_a_training_camera_while_far (Gaussian-frames)": seen_when_far,
        "seen_by_every_training_camera_while_far (Gaussian-frames)": int((far_f & seen_all).sum()),
        "far Gaussian-frames": int(far_f.sum()),
        "frames out per floater (median)": float(frames_far.float().median()) if far.any() else 0,
        "lineage": kinds,
        "born_step_median": float(np.median(born)) if born else None,
        "left_at_step (median of floaters)": float(np.median([left_at.get(int(uid[i]), -1) for i in
                                                             far.nonzero(as_tuple=True)[0].tolist()]))
        if far.any() else None,
        "canonical dist/radius of floaters (median)": float(can_d[far].median()) if far.any() else None,
        "canonical dist/radius of others (median)": float(can_d[vis & ~far].median()),
        "opacity of floaters (median)": float(op[far].median()) if far.any() else None,
        "max dist/radius": float((d * vis).max()),
        "history": history, "wall_s": round(time.perf_counter() - t0, 1),
    }
    torch.save({"model": trainer.model.state(), "deformation": trainer.deformation.state_dict(),
                "uid": uid, "lineage": tracking.lineage, "d": d, "seen": seen, "op": op}, work / "probe_end.pt")
    summary.update(quality(trainer, creature, data))
    if hard is not None:
        summary.update(scene=hard["name"] + "/" + args.variant, held_out_psnr=hard_held_out(trainer, args.hard, hard))
    summary["work"] = str(work)
    return summary


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scene", choices=["creature", "fast", "minions"], default="fast")
    p.add_argument("--preset", default="preview")
    p.add_argument("--iters", type=int)
    p.add_argument("--resolution", type=int, help="cap every render size (faster investigation runs)")
    p.add_argument("--frames", type=int, default=0)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--set", action="append", help="override a config field, e.g. densify.max_gaussians=20000")
    p.add_argument("--hard", help="a hard-set scene folder (benchmarks/scenes/build.py --list)")
    p.add_argument("--variant", default="exact", choices=["exact", "noisy"])
    p.add_argument("--minions", default=str(REPO.parent / "shared" / "data" / "minions"))
    p.add_argument("--work")
    p.add_argument("--json")
    args = p.parse_args()
    s = run(args)
    print(json.dumps({k: v for k, v in s.items() if k != "history"}, indent=1))
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(s) + "\n")


if __name__ == "__main__":
    main()
