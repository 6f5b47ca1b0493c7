"""The fit stage: a STAG4D-layout data directory -> canonical Gaussians + deformation field in OUT_DIR.

Bad input is found before anything is written. The training state is checkpointed every
``checkpoint_every`` steps; running the same fit again on the same OUT_DIR resumes from the last checkpoint and
ends with the same result as an uninterrupted run. A fit that has finished is not repeated.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..config import GUIDANCE_CHOICES, FitConfig
from ..dataset import DataError, load_frames
from ..device import resolve_device
from ..fitted import CANONICAL, DEFORMATION, META, save_fitted
from ..fitting.checkpoint import fingerprint, load_checkpoint, save_checkpoint
from ..fitting.trainer import Trainer
from ..guidance.base import ScoreDistillation

ProgressFn = Callable[[dict], None]


class FitError(ValueError):
    """A request that cannot run as asked (one line, names the fix)."""


@dataclass
class FitOutcome:
    status: str                 # "finished" | "already_finished" | "cancelled" | "time_budget"
    out_dir: Path
    iterations: int
    num_gaussians: int
    elapsed_s: float
    resumed_from: int = 0
    notes: tuple[str, ...] = ()


def resolve_guidance(cfg: FitConfig, sds: ScoreDistillation | None, explicit: bool, has_anchors: bool
                     ) -> tuple[str, list[str]]:
    """The guidance that will actually run, and notes for the user. Without SDS weights a preset's default falls
    back to anchor views (and says so); an explicit request for SDS without weights is an error."""
    notes = []
    guidance = cfg.guidance
    if guidance not in GUIDANCE_CHOICES:
        raise FitError(f"unknown guidance {guidance!r}; choose one of {', '.join(GUIDANCE_CHOICES)}")
    if "sds" in guidance and sds is None:
        if explicit:
            raise FitError("--guidance " + guidance + " needs the Zero123-XL weights, which are not installed; "
                           "use --guidance anchors (see `stag4d models list`)")
        guidance = "anchors"
        notes.append("Zero123-XL weights not available: using the 'anchors' guidance (photometric loss on the "
                     "six anchor views) instead of score distillation")
    if "anchors" in guidance and not has_anchors:
        if guidance == "anchors":
            raise FitError("the data directory has no zero123/{f}_rgba/{k}.png anchor views, which the 'anchors' "
                           "guidance needs; generate them with `stag4d generate` or provide SDS weights")
        guidance = "sds"
        notes.append("no anchor views found: using SDS guidance only")
    return guidance, notes


def _read_fps(data_dir: Path) -> float | None:
    for name in ("meta.json", "frames.json"):
        p = data_dir / name
        if p.is_file():
            try:
                fps = json.loads(p.read_text()).get("fps")
                return float(fps) if fps else None
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                return None
    return None


def fit(data_dir: str | Path, out_dir: str | Path, cfg: FitConfig, *, sds: ScoreDistillation | None = None,
        guidance_explicit: bool = False, frames: list[int] | None = None, progress: ProgressFn | None = None,
        should_stop: Callable[[], bool] | None = None, checkpoint_hook: Callable[[int], None] | None = None,
        time_budget_s: float | None = None, snapshot_every: int = 0,
        on_snapshot: Callable[[int, object, object], None] | None = None) -> FitOutcome:
    """Fit and write the outputs. ``should_stop`` cancels (checkpoint only, resumable); ``time_budget_s`` ends the
    run early but still writes the outputs of the last step reached (status "time_budget", for benchmarks).
    ``on_snapshot(step, model, deformation)`` is called every ``snapshot_every`` steps (live previews); it must not
    modify them."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    device = resolve_device(cfg.device)
    data = load_frames(data_dir, cfg.ref_resolution, cfg.anchor_resolution, frames=frames)
    guidance, notes = resolve_guidance(cfg, sds, guidance_explicit, data.has_anchors)
    if guidance != cfg.guidance:
        cfg = dataclasses.replace(cfg, guidance=guidance)
    if out_dir.exists() and not out_dir.is_dir():
        raise FitError(f"{out_dir}: exists and is not a directory; choose another output folder")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)

    # The SDS model's own settings (latent mode, image size, ...) shape the result too: part of the fingerprint.
    sds_opts = sds.options() if sds is not None and "sds" in guidance and hasattr(sds, "options") else None
    fp = fingerprint(dict(cfg.to_dict(), sds=sds_opts) if sds_opts else cfg.to_dict(), data_dir, frames)
    state = load_checkpoint(out_dir) if out_dir.is_dir() else None
    if state is not None and state.get("fingerprint") != fp:
        raise FitError(f"{out_dir}: holds a fit of other data or options; use a new output folder "
                       f"(or delete {out_dir / 'state.pt'} to start over)")

    trainer = Trainer(cfg, data, sds if "sds" in guidance else None, device)
    resumed_from = 0
    if state is not None:
        trainer.load_state_dict(state)
        resumed_from = trainer.it
        if trainer.it >= cfg.iters and all((out_dir / n).is_file() for n in (CANONICAL, DEFORMATION, META)):
            return FitOutcome("already_finished", out_dir, trainer.it, trainer.model.num_points, 0.0,
                              resumed_from, tuple(notes))
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    elapsed_before = float(state.get("elapsed_s", 0.0)) if state else 0.0

    def checkpoint():
        save_checkpoint(out_dir, dict(trainer.state_dict(), elapsed_s=elapsed_before + time.perf_counter() - t0),
                        fp)
        if checkpoint_hook is not None:
            checkpoint_hook(trainer.it)

    last = {}
    out_of_time = False
    while trainer.it < cfg.iters:
        if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
            out_of_time = True
            break
        if should_stop is not None and should_stop():
            checkpoint()
            return FitOutcome("cancelled", out_dir, trainer.it, trainer.model.num_points,
                              time.perf_counter() - t0, resumed_from, tuple(notes))
        last = trainer.step()
        if progress is not None:
            progress(dict(last, elapsed_s=elapsed_before + time.perf_counter() - t0))
        if trainer.it % cfg.checkpoint_every == 0 and trainer.it < cfg.iters:
            checkpoint()
        if on_snapshot is not None and snapshot_every > 0 and trainer.it % snapshot_every == 0 \
                and trainer.it < cfg.iters:
            with torch.no_grad():
                on_snapshot(trainer.it, trainer.model, trainer.deformation)
    checkpoint()

    elapsed = elapsed_before + time.perf_counter() - t0
    meta = {
        "num_frames": data.num_frames,
        "frames": frames if frames is not None else list(range(data.num_frames)),
        "fps": _read_fps(data_dir),
        "time": "t = f / num_frames",
        "conventions": {"world": "Y-up, object at the origin", "camera": "orbit (elevation above, azimuth "
                        "from +Z toward +X), OpenCV view matrices", "ply": "3DGS layout",
                        "blender": "p_blender = (x, -z, y)"},
        "guidance": guidance,
        "config": cfg.to_dict(),
        "iterations": trainer.it,
        "num_gaussians": trainer.model.num_points,
        "elapsed_s": round(elapsed, 2),
        "final": {k: v for k, v in last.items() if isinstance(v, (int, float))},
        "data_dir": str(data_dir.resolve()),
        "source_size": data.source_size,
        "versions": {"stag4d": __version__, "torch": torch.__version__},
        "stopped_by_time_budget": out_of_time,
    }
    save_fitted(out_dir, trainer.model, trainer.deformation, meta)
    return FitOutcome("time_budget" if out_of_time else "finished", out_dir, trainer.it, trainer.model.num_points, time.perf_counter() - t0,
                      resumed_from, tuple(notes))


# -- the stage contract (pipeline) --------------------------------------------------------------------------

def load_sds_if_present(cfg: FitConfig, guidance_explicit: bool, local_path=None):
    """Zero123-XL SDS when the preset uses it and the weights are installed; None otherwise (the fit then falls
    back to the anchor views and says so, unless SDS was asked for explicitly)."""
    if "sds" not in cfg.guidance:
        return None
    from ..models.registry import MissingWeightsError

    try:
        from ..models.zero123_xl import load_zero123_sds, sds_options

        return load_zero123_sds(device=cfg.device, local_path=local_path, **sds_options(cfg))
    except MissingWeightsError:
        if guidance_explicit:
            raise
        return None


def stage_config(options: dict) -> FitConfig:
    """The fit configuration of a request's fit section (preset, iters, resolution, device, seed, guidance,
    checkpoint_every)."""
    from ..config import config_from_options

    return config_from_options(options)


def is_done(job, options: dict) -> bool:
    return (job.model_dir / META).is_file()


def run(job, options: dict, progress: ProgressFn | None = None, should_stop=None) -> dict:
    """Fit the job's frames into JOB/model, with live previews every ``preview_every`` steps (default: every
    checkpoint; 0 = off). Stopped, it checkpoints and raises JobStopped; run again, it resumes there."""
    from ..export.live_preview import PreviewHook
    from ..job import JobStopped

    cfg = stage_config(options)
    explicit = bool(options.get("guidance"))
    hook = PreviewHook(job.path, job.emit, every=options.get("preview_every"))
    out = fit(job.frames_dir, job.model_dir, cfg, sds=load_sds_if_present(cfg, explicit),
              guidance_explicit=explicit, progress=progress, should_stop=should_stop, **hook.fit_kwargs(cfg))
    if out.status == "cancelled":
        raise JobStopped(f"stopped at fit step {out.iterations}", step=out.iterations)
    return {"iterations": out.iterations, "num_gaussians": out.num_gaussians, "notes": list(out.notes),
            "resumed_from": out.resumed_from}


__all__ = ["run", "is_done", "load_sds_if_present", "fit", "FitOutcome", "FitError", "DataError", "resolve_guidance", "resolve_device"]
