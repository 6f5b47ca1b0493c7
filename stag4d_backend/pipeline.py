"""Stages over one job directory, each skipped when its outputs exist.

``generate_example`` / ``example_stages``: the embedded example (``stag4d generate --example``): a procedural
animated creature with exact anchor views is written in the STAG4D layout (no weights, no GPU needed), then fitted
and baked. ``run_job(job_dir, should_stop)`` runs whatever request a job.json holds (the server's worker calls it):
the example, or the generative stages of ``generate.py`` for a video, an image, a folder or a prompt, with
progress and live-preview events in events.jsonl and the job's state in job.json.

Stopping: ``should_stop()`` reaches the fit (checked at every step boundary; the fit checkpoints, so the job
resumes there) and the progress callback of every other stage (which then raises ``JobCancelled``; stages write
atomically, so an interrupted stage leaves the previous outputs intact). Run again on the same directory, a job
skips finished stages and resumes the fit from its last checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import FitConfig, get_preset
from .job import Job

EXAMPLE_FRAMES = 16
EXAMPLE_SIZE = 256
EXAMPLE_GAUSSIANS = 12000
EXAMPLE_FPS = 12.0
EXAMPLE_BAKE_FORMATS = ("usd", "ply", "mesh", "preview", "cameras")
PROGRESS_INTERVAL_S = 0.1   # at most one progress event per stage per interval (first and last step always)
STATE_INTERVAL_S = 1.0      # job.json "progress" is refreshed at most this often
TERMINAL_STATES = ("finished", "failed", "cancelled")

StageProgress = Callable[[str, dict], None]


class JobCancelled(RuntimeError):
    """A stage stopped at a step boundary because the job was asked to stop; the directory is consistent and the
    job resumes where it stopped. Stages may raise it (or a subclass) when their ``should_stop`` is true;
    ``step`` is the last step done, when known."""

    def __init__(self, message: str = "stopped", step: int | None = None):
        super().__init__(message)
        self.step = step


@dataclass
class Stage:
    name: str
    done: Callable[[Job], bool]
    run: Callable[[Job, StageProgress], dict]


def _example_frames_stage(frames: int, size: int, gaussians: int) -> Stage:
    def done(job: Job) -> bool:
        return (job.frames_dir / "zero123" / f"{frames - 1}_rgba" / "5.png").is_file()

    def run(job: Job, progress: StageProgress) -> dict:
        """Render the creature's front and anchor views into a temporary folder, then move it into place."""
        from .example_scene import ExampleCreature, write_stag4d_layout

        tmp = job.path / ".frames.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        write_stag4d_layout(ExampleCreature(gaussians, seed=0), tmp, frames, size, size,
                            on_frame=lambda f: progress("example", {"step": f + 1, "total": frames}))
        (tmp / "meta.json").write_text(json.dumps({"fps": EXAMPLE_FPS, "source": "stag4d example creature"}) + "\n")
        shutil.rmtree(job.frames_dir, ignore_errors=True)
        tmp.replace(job.frames_dir)
        return {"frames": frames, "size": size}

    return Stage("example", done, run)


def fit_stage(cfg: FitConfig, should_stop: Callable[[], bool] | None = None, fit_kwargs: dict | None = None,
               lazy_kwargs: Callable[[], dict] | None = None) -> Stage:
    """``lazy_kwargs()`` adds fit arguments made only when the fit runs (loading the SDS weights, say)."""
    from .fitted import META

    def done(job: Job) -> bool:
        return (job.model_dir / META).is_file()

    def run(job: Job, progress: StageProgress) -> dict:
        from .stages.fit import fit

        kwargs = dict(fit_kwargs or {}, **(lazy_kwargs() if lazy_kwargs else {}))
        out = fit(job.frames_dir, job.model_dir, cfg, progress=lambda s: progress("fit", s),
                  should_stop=should_stop, **kwargs)
        if out.status == "cancelled":
            raise JobCancelled(f"stopped at fit step {out.iterations}", step=out.iterations)
        return {"iterations": out.iterations, "num_gaussians": out.num_gaussians, "notes": list(out.notes),
                "resumed_from": out.resumed_from}

    return Stage("fit", done, run)


def bake_stage(formats, fps: float | None = None) -> Stage:
    def done(job: Job) -> bool:
        return (job.bake_dir / "bake.json").is_file()

    def run(job: Job, progress: StageProgress) -> dict:
        from .stages.bake import bake

        res = bake(job.model_dir, job.bake_dir, formats=formats, fps=fps, progress=lambda s: progress("bake", s))
        return {"files": [p.relative_to(job.path).as_posix() if p.is_relative_to(job.path) else str(p)
                          for p in res.paths]}

    return Stage("bake", done, run)


def example_stages(cfg: FitConfig | None = None, frames: int = EXAMPLE_FRAMES, size: int = EXAMPLE_SIZE,
                   gaussians: int = EXAMPLE_GAUSSIANS, formats=EXAMPLE_BAKE_FORMATS,
                   should_stop: Callable[[], bool] | None = None, fit_kwargs: dict | None = None) -> list[Stage]:
    cfg = cfg or get_preset("preview")
    return [_example_frames_stage(frames, size, gaussians), fit_stage(cfg, should_stop, fit_kwargs),
            bake_stage(formats)]


def _is_stop(exc: BaseException, should_stop: Callable[[], bool] | None) -> bool:
    """A stage ended because the job was asked to stop: JobCancelled, or any error raised once a stop was asked
    (a stage's own cancellation exception)."""
    if isinstance(exc, JobCancelled):
        return True
    return isinstance(exc, Exception) and should_stop is not None and bool(should_stop())


def run_stages(job: Job, stages: list[Stage], progress: StageProgress | None = None, *,
               should_stop: Callable[[], bool] | None = None, stop_state: Callable[[], str] | None = None,
               on_finished: Callable[[dict], dict] | None = None) -> dict:
    """Run each stage whose outputs are missing; log stage events to the job's events.jsonl.

    ``should_stop`` is checked before each stage; a stage that stops (``JobCancelled``) gets a ``stage_stopped``
    event, the job the state ``stop_state()`` (default "cancelled"), and the exception propagates.
    ``on_finished(summary)`` returns extra job.json fields written with the final state."""
    progress = progress or (lambda stage, stats: None)
    summary = {}
    job.update(state="running")
    for stage in stages:
        if stage.done(job):
            job.emit("stage_skipped", stage=stage.name)
            summary[stage.name] = "skipped (outputs exist)"
            continue
        job.emit("stage_started", stage=stage.name)
        t0 = time.perf_counter()
        try:
            if should_stop is not None and should_stop():
                raise JobCancelled(f"stopped before {stage.name}")
            result = stage.run(job, progress)
        except BaseException as exc:
            if _is_stop(exc, should_stop):
                state = stop_state() if stop_state else "cancelled"
                step = getattr(exc, "step", None)
                job.emit("stage_stopped", stage=stage.name, state=state, message=str(exc),
                         **({"step": step} if step is not None else {}))
                job.update(state=state)
                raise exc if isinstance(exc, JobCancelled) else JobCancelled(str(exc)) from exc
            job.emit("stage_failed", stage=stage.name, error=_one_line(exc))
            job.update(state="failed", error=_one_line(exc))
            raise
        elapsed = round(time.perf_counter() - t0, 2)
        if isinstance(result, dict) and result.get("licences"):  # the models a stage used, kept in job.json
            known = {lic.get("model"): lic for lic in job.read().get("licences") or []}
            known.update({lic.get("model"): lic for lic in result["licences"]})
            job.update(licences=list(known.values()))
        if isinstance(result, dict) and result.get("record"):  # facts a stage keeps in job.json (e.g. matting)
            job.update(**result["record"])
        job.emit("stage_finished", stage=stage.name, elapsed_s=elapsed, result=result)
        summary[stage.name] = dict(result, elapsed_s=elapsed)
    job.update(state="finished", error=None, **(on_finished(summary) if on_finished else {}))
    return summary


def generate_example(job_dir: str | Path, cfg: FitConfig | None = None, progress: StageProgress | None = None,
                     **example_options) -> dict:
    """The example job end to end; ``example_options`` (frames, size, gaussians, formats) are for tests."""
    job = Job(job_dir).create({"kind": "example", "preset": (cfg or get_preset("preview")).preset})
    return run_stages(job, example_stages(cfg, **example_options), progress)


# --------------------------------------------------------------------------------------------------- run_job


def _one_line(exc: BaseException) -> str:
    """The first line of the message; our own errors are written for users and need no type name."""
    text = str(exc).strip().splitlines()
    ours = type(exc).__module__.startswith("stag4d_backend") or type(exc).__name__.endswith(("WeightsError",
                                                                                             "LoadError"))
    if not text:
        return type(exc).__name__
    return text[0] if ours else f"{type(exc).__name__}: {text[0]}"


def job_result(job: Job) -> dict | None:
    """What a finished job offers (paths relative to the job dir), read from bake/bake.json; None before."""
    try:
        manifest = json.loads((job.bake_dir / "bake.json").read_text())
    except (OSError, ValueError):
        return None

    def rel(name: str) -> str | None:
        return f"bake/{name}" if (job.bake_dir / name).exists() else None

    return {"usd": rel("gaussians.usdc"), "mesh": rel("mesh.usdc"), "ply_dir": rel("ply"),
            "preview": rel("preview.mp4"), "cameras": rel("cameras.json"), "fps": manifest.get("fps"),
            "frames": manifest.get("num_frames"), "num_gaussians": manifest.get("num_gaussians")}


class _ProgressEvents:
    """Stage progress -> throttled ``progress`` events {stage, step, total, loss?, elapsed_s, eta_s?} and the job's
    job.json ``stage``/``progress`` fields."""

    def __init__(self, job: Job, interval: float = PROGRESS_INTERVAL_S):
        self.job = job
        self.interval = interval
        self.stage = None
        self.t_stage = self.t_emit = self.t_state = 0.0
        self.first_step = None

    def __call__(self, stage: str, stats: dict) -> None:
        now = time.monotonic()
        step, total = stats.get("step"), stats.get("total")
        new_stage = stage != self.stage
        if new_stage:
            self.stage, self.t_stage, self.first_step = stage, now, step
        last = step is not None and total is not None and step >= total
        if not (new_stage or last or now - self.t_emit >= self.interval):
            return
        ev = {"stage": stage, "step": step, "total": total}
        for key in ("loss", "num_gaussians", "message"):
            if stats.get(key) is not None:
                ev[key] = stats[key]
        if stats.get("stage") not in (None, stage):
            ev["phase"] = stats["stage"]  # the fit's "coarse" / "fine"
        elapsed = stats.get("elapsed_s")
        ev["elapsed_s"] = round(float(elapsed if elapsed is not None else now - self.t_stage), 3)
        done = (step or 0) - (self.first_step or 0)
        if step is not None and total and done > 0:
            ev["eta_s"] = round((now - self.t_stage) / done * max(0, total - step), 1)
        self.t_emit = now
        self.job.emit("progress", **ev)
        if new_stage or last or now - self.t_state >= STATE_INTERVAL_S:
            self.t_state = now
            self.job.update(stage=stage, progress=ev)


def _job_stages(job: Job, request: dict, should_stop, device: str | None) -> tuple[list[Stage], FitConfig | None]:
    from .stages.preview import PreviewHook

    options = dict(request.get("options") or {})
    preview = PreviewHook(job.path, job.emit, every=options.get("preview_every"))
    kind = request.get("kind")
    if kind == "example":
        from .stages.bake import parse_formats

        from .config import config_from_options

        cfg = config_from_options(dict(options, device=device), default="preview")
        frames = int(options.get("example_frames") or EXAMPLE_FRAMES)
        return example_stages(cfg, frames, int(options.get("example_size") or EXAMPLE_SIZE),
                              int(options.get("example_gaussians") or EXAMPLE_GAUSSIANS),
                              parse_formats(options.get("formats") or EXAMPLE_BAKE_FORMATS), should_stop,
                              preview.fit_kwargs(cfg, frames)), cfg
    try:
        from .generate import generative_stages
    except ImportError as exc:
        raise RuntimeError(f"jobs of kind {kind!r} need the generative stages (stag4d_backend.generate), which "
                           f"this installation lacks ({exc}); only kind 'example' runs here") from None
    if device:
        options["device"] = device
        request = dict(request, options=options)
    from .config import config_from_options

    cfg = config_from_options(options)
    kwargs = preview.fit_kwargs(cfg)  # coarse_iters from the same config the generative fit stage uses
    return generative_stages(request, should_stop, kwargs["on_snapshot"], kwargs["snapshot_every"], cfg=cfg), cfg


def run_job(job_dir: str | Path, should_stop: Callable[[], bool] | None = None, *, device: str | None = None,
            stop_state: Callable[[], str] | None = None) -> str:
    """Run (or resume) the request in JOB_DIR/job.json; returns the final state ("finished", "failed",
    "cancelled" or what ``stop_state()`` says when stopped, e.g. "interrupted"). Never raises for a job that
    fails: the error is in job.json and a ``stage_failed`` / ``job_state`` event."""
    job = Job(job_dir)
    data = job.read()
    request = data.get("request") or {}
    job.update(state="running", error=None)
    job.emit("job_state", state="running", resumed=(job.model_dir / "state.pt").is_file())
    try:
        stages, _ = _job_stages(job, request, should_stop, device)
    except Exception as exc:  # a request that cannot run: say so in the job, not as a traceback
        error = _one_line(exc)
        job.update(state="failed", error=error)
        job.emit("job_state", state="failed", error=error)
        return "failed"
    reporter = _ProgressEvents(job)

    def progress(stage: str, stats: dict) -> None:
        reporter(stage, stats)
        if stage != "fit" and should_stop is not None and should_stop():  # the fit stops itself, checkpointed
            raise JobCancelled(f"stopped during {stage}")

    try:
        run_stages(job, stages, progress, should_stop=should_stop, stop_state=stop_state,
                   on_finished=lambda summary: {"result": job_result(job), "progress": None})
    except JobCancelled:
        state = job.read().get("state", "cancelled")
        job.emit("job_state", state=state)
        return state
    except Exception as exc:
        error = _one_line(exc)
        job.update(state="failed", error=error, traceback=traceback.format_exc(limit=20))
        job.emit("job_state", state="failed", error=error)
        return "failed"
    job.emit("job_state", state="finished", result=job.read().get("result"))
    return "finished"


__all__ = ["Stage", "JobCancelled", "run_stages", "run_job", "generate_example", "example_stages", "job_result",
           "TERMINAL_STATES"]
