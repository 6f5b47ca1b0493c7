"""Live previews during a fit: a light bake of the Gaussians being trained, as USD points.

``write_preview(path, model, deformation, num_frames, ...)`` evaluates at most ``max_frames`` evenly spaced frames
(t = f / F) of at most ``max_points`` Gaussians (the most opaque ones, in their original order) and writes them with
the bake's USD writer (points only, no splat prim), atomically. ``deformation=None`` previews the canonical set
(the coarse stage of a fit trains the canonical Gaussians only, so its field is not applied there).

``PreviewHook`` plugs this into ``stages.fit.fit`` (``snapshot_every`` / ``on_snapshot``): every N steps it writes
``JOB_DIR/previews/{step:06d}/gaussians.usdc``, announces it as a ``preview`` event and keeps the newest few.
The hook only reads the model (no RNG, no parameter change), so a fit with previews equals one without.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .frames import SampledFrames

PREVIEW_DIR = "previews"
PREVIEW_FILE = "gaussians.usdc"
MAX_POINTS = 20_000
MAX_FRAMES = 4
KEEP = 4            # newest previews kept on disk; older ones are deleted (the final bake is the result)
PREVIEW_FPS = 4.0   # a few frames spread over the clip: play them slowly


def preview_frames(num_frames: int, max_frames: int = MAX_FRAMES) -> list[int]:
    """Evenly spaced source frames, first one included."""
    n = max(1, min(int(num_frames), int(max_frames)))
    return sorted({int(round(k * num_frames / n)) % max(num_frames, 1) for k in range(n)})


@torch.no_grad()
def sample_preview(model, deformation, num_frames: int, max_frames: int = MAX_FRAMES,
                   max_points: int = MAX_POINTS) -> SampledFrames:
    """Raw Gaussians (PLY layout) of the preview frames, on the CPU; reads the model only."""
    p = model.params
    n = int(p["xyz"].shape[0])
    idx = None
    if n > max_points:  # the most opaque ones carry the picture
        idx = torch.topk(p["opacity"].detach().reshape(-1), max_points).indices.sort().values
    sel = (lambda t: t.detach()) if idx is None else (lambda t: t.detach().index_select(0, idx))
    xyz, scaling, rotation = sel(p["xyz"]), sel(p["scaling"]), sel(p["rotation"])
    frames = preview_frames(num_frames, max_frames)
    xs, ss, rs = [], [], []
    for f in frames:
        if deformation is not None:
            x, s, r = deformation.deform(xyz, scaling, rotation, f / num_frames)
        else:
            x, s, r = xyz, scaling, rotation
        xs.append(x.float().cpu().numpy())
        ss.append(s.float().cpu().numpy())
        rs.append(r.float().cpu().numpy())
    m = xyz.shape[0]
    f_dc = sel(p["f_dc"]).float().cpu().numpy().reshape(m, 1, 3)
    f_rest = sel(p["f_rest"]).float().cpu().numpy().reshape(m, -1, 3)
    opacity = sel(p["opacity"]).float().cpu().numpy().reshape(m, 1)
    fv = np.asarray(frames, dtype=np.float64)
    return SampledFrames(fv / num_frames, fv, np.stack(xs), np.stack(ss), np.stack(rs), f_dc, f_rest, opacity)


def write_preview(path: str | Path, model, deformation, num_frames: int, max_frames: int = MAX_FRAMES,
                  max_points: int = MAX_POINTS, custom: dict | None = None) -> dict:
    """Write the preview USD at ``path`` (atomically); returns {frames, num_gaussians, source_frames}."""
    from ..export.usd_points import write_gaussians_usd

    sampled = sample_preview(model, deformation, num_frames, max_frames, max_points)
    meta = dict(custom or {}, preview=True, source_frames=[int(f) for f in sampled.frame_values])
    write_gaussians_usd(sampled, path, PREVIEW_FPS, meta, splats=False)
    return {"frames": sampled.num_frames, "num_gaussians": sampled.num_gaussians,
            "source_frames": [int(f) for f in sampled.frame_values]}


class PreviewHook:
    """``fit(..., **hook.fit_kwargs(cfg, num_frames))`` writes a preview every ``every`` steps.

    ``every=None`` means the fit's checkpoint interval; 0 turns previews off. ``emit(kind, **fields)`` announces
    each preview (the job's event log). Called directly as ``hook(step, model, deformation)`` it uses
    ``coarse_iters`` and ``num_frames`` set on it (``num_frames`` defaults to the job's ``frames/ref`` count)."""

    def __init__(self, job_dir: str | Path, emit, every: int | None = None, max_frames: int = MAX_FRAMES,
                 max_points: int = MAX_POINTS, keep: int = KEEP):
        self.job_dir = Path(job_dir)
        self.emit = emit
        self.every = every
        self.max_frames = max_frames
        self.max_points = max_points
        self.keep = keep
        self.coarse_iters = 0
        self.num_frames: int | None = None

    def fit_kwargs(self, cfg, num_frames: int | None = None) -> dict:
        self.coarse_iters = int(cfg.coarse_iters)
        if num_frames:
            self.num_frames = int(num_frames)
        every = cfg.checkpoint_every if self.every is None else int(self.every)
        return {"snapshot_every": max(0, every), "on_snapshot": self if every > 0 else None}

    def _frame_count(self) -> int:
        if self.num_frames is None:
            ref = self.job_dir / "frames" / "ref"
            self.num_frames = len(list(ref.glob("*_rgba.png"))) if ref.is_dir() else 1
        return max(1, self.num_frames)

    def __call__(self, step: int, model, deformation) -> None:
        t0 = time.perf_counter()
        rel = f"{PREVIEW_DIR}/{step:06d}/{PREVIEW_FILE}"
        # The coarse stage (steps <= coarse_iters) trains the canonical set alone; its field is still at its init.
        deform = deformation if step > self.coarse_iters else None
        info = write_preview(self.job_dir / rel, model, deform, self._frame_count(), self.max_frames,
                             self.max_points, custom={"step": int(step)})
        self._prune()
        self.emit("preview", stage="fit", step=int(step), file=rel, frames=info["frames"],
                  num_gaussians=info["num_gaussians"], deformed=deform is not None,
                  elapsed_s=round(time.perf_counter() - t0, 3))

    def _prune(self) -> None:
        root = self.job_dir / PREVIEW_DIR
        steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())
        for old in steps[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)


__all__ = ["write_preview", "sample_preview", "preview_frames", "PreviewHook", "PREVIEW_DIR", "PREVIEW_FILE"]
