"""The one orchestrator: a request -> its stages -> run over one job directory.

    prompt --video (text -> image -> video)--+
    image  --video (image -> video)----------+--> preprocess --> anchors --> fit --> bake
    video / image-sequence folder -----------+
    example ------------------------------------------------> example --> fit --> bake

``stages_for(request)`` composes the stages of a request (job.json's ``request``); ``run_job(job_dir, progress,
should_stop)`` runs (or resumes) the request of a job directory, with progress and live-preview events in
events.jsonl and the job's state in job.json. `stag4d generate` (an input, a prompt or --example) and the
server's worker both call ``run_job``.

Every stage module keeps one contract: ``is_done(job, options)`` and ``run(job, options, progress, should_stop)``,
where ``options`` is the stage's own section of the request (``request.stage_options``). Stages skip themselves
when their outputs exist, so running the same request again resumes it. Stopping: ``should_stop()`` is checked
before each stage and handed to every stage, which raises ``job.JobStopped`` at a step boundary (the fit
checkpoints first; the others write atomically, so the previous outputs stay intact).
"""

from __future__ import annotations

import contextlib
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .job import DiskFullError, Job, JobStopped, ShouldStop, disk_full_stage, is_disk_full
from .request import (BAKE_OUTPUTS, EXAMPLE_FRAMES, EXAMPLE_GAUSSIANS, EXAMPLE_SIZE, RequestError, check_options,
                      request_kind, stage_options)

PROGRESS_INTERVAL_S = 0.1   # at most one progress event per stage per interval (first and last step always)
STATE_INTERVAL_S = 1.0      # job.json "progress" is refreshed at most this often

StageProgress = Callable[[str, dict], None]


@dataclass
class Stage:
    """One stage of a request: the stage module (``stag4d_backend.stages.NAME``) and its section of options."""
    name: str
    options: dict = field(default_factory=dict)

    @property
    def module(self):
        from .stages import anchors, bake, example, fit, preprocess, video  # torch: only when a stage runs

        return {"example": example, "video": video, "preprocess": preprocess, "anchors": anchors, "fit": fit,
                "bake": bake}[self.name]

    def is_done(self, job: Job) -> bool:
        return self.module.is_done(job, self.options)

    def run(self, job: Job, progress: Callable[[dict], None], should_stop: ShouldStop | None) -> dict:
        return self.module.run(job, self.options, progress, should_stop)


def _input_path(job_dir: Path | None, request: dict) -> str:
    raw = request.get("input") or request.get("path")
    if not raw:
        raise RequestError("the request names no input file")
    path = Path(raw)
    return str(path if path.is_absolute() or job_dir is None else job_dir / path)


def stages_for(request: dict, job_dir: str | Path | None = None, device: str | None = None) -> list[Stage]:
    """The stages of ``request`` in order, each with its own options; RequestError for a request that cannot run.
    ``device`` (the server's worker) overrides the request's; relative inputs are relative to ``job_dir``."""
    kind = request_kind(request)
    options = check_options(dict(request.get("options") or {}, **({"device": device} if device else {})))
    request = dict(request, options=options)
    job_dir = Path(job_dir) if job_dir is not None else None

    def section(name: str, **extra) -> Stage:
        return Stage(name, dict(stage_options(request, name), **extra))

    if kind == "example":
        fit = section("fit")
        fit.options.setdefault("preset", "preview")  # minutes on a CPU
        return [section("example"), fit, section("bake")]
    stages = []
    if kind == "prompt":
        stages.append(section("video", kind="prompt", prompt=request.get("prompt") or ""))
    elif kind == "image":
        stages.append(section("video", kind="image", image=_input_path(job_dir, request)))
    generated = kind in ("image", "prompt")
    video_dir = str(job_dir / "video") if job_dir is not None else "video"
    stages += [section("preprocess", input=video_dir if generated else _input_path(job_dir, request)),
               section("anchors"), section("fit"), section("bake")]
    return stages


def run_stages(job: Job, stages: list[Stage], progress: StageProgress | None = None, *,
               should_stop: ShouldStop | None = None, stop_state: Callable[[], str] | None = None,
               on_finished: Callable[[dict], dict] | None = None) -> dict:
    """Run each stage whose outputs are missing; log stage events to the job's events.jsonl.

    ``should_stop`` is checked before each stage and handed to it; a stage that stops (``JobStopped``) gets a
    ``stage_stopped`` event, the job the state ``stop_state()`` (default "cancelled"), and the exception
    propagates. ``on_finished(summary)`` returns extra job.json fields written with the final state."""
    progress = progress or (lambda stage, stats: None)
    summary = {}
    job.update(state="running")
    for stage in stages:
        with _disk_full_at(stage.name):
            if stage.is_done(job):
                job.emit("stage_skipped", stage=stage.name)
                summary[stage.name] = "skipped (outputs exist)"
                continue
            job.emit("stage_started", stage=stage.name)
            t0 = time.perf_counter()
            try:
                if should_stop is not None and should_stop():
                    raise JobStopped(f"stopped before {stage.name}")
                result = stage.run(job, lambda stats, name=stage.name: progress(name, stats), should_stop)
            except JobStopped as exc:
                state = stop_state() if stop_state else "cancelled"
                job.emit("stage_stopped", stage=stage.name, state=state, message=str(exc),
                         **({"step": exc.step} if exc.step is not None else {}))
                job.update(state=state)
                raise
            except (KeyboardInterrupt, SystemExit) as exc:
                # The process is being ended (Ctrl-C; Ray ending a worker whose server is gone): not the job's
                # fault. It resumes from its last checkpoint ("interrupted"), like a stop at a step boundary.
                job.emit("stage_stopped", stage=stage.name, state="interrupted",
                         message=f"the process was ended ({type(exc).__name__})")
                job.update(state="interrupted")
                raise
            except BaseException as exc:
                failure = DiskFullError(stage.name) if is_disk_full(exc) else exc
                job.emit("stage_failed", stage=stage.name, error=_one_line(failure))
                job.update(state="failed", error=_one_line(failure))
                raise
            elapsed = round(time.perf_counter() - t0, 2)
            _record(job, result)
            job.emit("stage_finished", stage=stage.name, elapsed_s=elapsed, result=result)
            summary[stage.name] = dict(result, elapsed_s=elapsed)
    job.update(state="finished", error=None, **(on_finished(summary) if on_finished else {}))
    return summary


@contextlib.contextmanager
def _disk_full_at(stage: str):
    """A full disk anywhere in ``stage`` (its own writes, or the job's events and job.json) becomes
    DiskFullError(stage): the job says "disk full at <stage>", and a worker that cannot even record that tells
    the server through its exit code (server.worker)."""
    try:
        yield
    except DiskFullError:
        raise
    except BaseException as exc:
        if is_disk_full(exc):
            raise DiskFullError(stage) from exc
        raise


def _record(job: Job, result) -> None:
    """Facts a stage keeps in job.json: the models it used (licences) and e.g. how it matted (record)."""
    if isinstance(result, dict) and result.get("licences"):
        known = {lic.get("model"): lic for lic in job.read().get("licences") or []}
        known.update({lic.get("model"): lic for lic in result["licences"]})
        job.update(licences=list(known.values()))
    if isinstance(result, dict) and result.get("record"):
        job.update(**result["record"])


def generate_example(job_dir: str | Path, cfg=None, progress: StageProgress | None = None, *,
                     frames: int = EXAMPLE_FRAMES, size: int = EXAMPLE_SIZE, gaussians: int = EXAMPLE_GAUSSIANS,
                     formats=None) -> dict:
    """The example job's stages on their own (no job events beyond the stages', no live previews): for tests and
    benchmarks. ``cfg`` names the preset (and seed); ``frames``, ``size``, ``gaussians`` shrink the example."""
    options = {"example_frames": frames, "example_size": size, "example_gaussians": gaussians,
               "formats": ",".join(formats) if formats and not isinstance(formats, str) else formats,
               "preset": cfg.preset if cfg is not None else None, "seed": cfg.seed if cfg is not None else None,
               "preview_every": 0}
    request = {"kind": "example", "options": check_options(options)}
    job = Job(job_dir).create(request)
    return run_stages(job, stages_for(request, job.path), progress)


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

    def rel(fmt: str) -> str | None:
        return f"bake/{BAKE_OUTPUTS[fmt]}" if (job.bake_dir / BAKE_OUTPUTS[fmt]).exists() else None

    return {"usd": rel("usd"), "mesh": rel("mesh"), "ply_dir": rel("ply"),
            "preview": rel("preview"), "cameras": rel("cameras"), "fps": manifest.get("fps"),
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


def error_kind(exc: BaseException) -> str:
    """How a job failed, for the CLI's exit code: "missing_weights", "request" (bad input) or "internal"."""
    from .models.registry import MissingWeightsError, ModelLoadError

    if isinstance(exc, (MissingWeightsError, ModelLoadError)):
        return "missing_weights"
    return "request" if isinstance(exc, ValueError) else "internal"


def _fail(job: Job, exc: BaseException, with_traceback: bool) -> str:
    stage = disk_full_stage(exc)
    error = f"disk full at {stage}" if stage else _one_line(exc)
    extra = {"traceback": traceback.format_exc(limit=20)} if with_traceback else {}
    job.update(state="failed", error=error, error_kind=error_kind(exc), **extra)
    job.emit("job_state", state="failed", error=error)
    return "failed"


def run_job(job_dir: str | Path, progress: StageProgress | None = None, should_stop: ShouldStop | None = None, *,
            device: str | None = None, stop_state: Callable[[], str] | None = None) -> str:
    """Run (or resume) the request in JOB_DIR/job.json; returns the final state ("finished", "failed",
    "cancelled" or what ``stop_state()`` says when stopped, e.g. "interrupted"). Never raises for a job that
    fails: the error is in job.json (``error``, ``error_kind``) and a ``stage_failed`` / ``job_state`` event.
    ``progress(stage, stats)`` sees every step (a progress bar); the events are throttled."""
    job = Job(job_dir)
    request = job.read().get("request") or {}
    job.update(state="running", error=None, error_kind=None)
    job.emit("job_state", state="running", resumed=(job.model_dir / "state.pt").is_file())
    try:
        stages = stages_for(request, job.path, device)
    except Exception as exc:  # a request that cannot run: say so in the job, not as a traceback
        return _fail(job, exc, with_traceback=False)
    reporter = _ProgressEvents(job)

    def on_progress(stage: str, stats: dict) -> None:
        reporter(stage, stats)
        if progress is not None:
            progress(stage, stats)

    try:
        run_stages(job, stages, on_progress, should_stop=should_stop, stop_state=stop_state,
                   on_finished=lambda summary: {"result": job_result(job), "progress": None})
    except JobStopped:
        state = job.read().get("state", "cancelled")
        job.emit("job_state", state=state)
        return state
    except (KeyboardInterrupt, SystemExit):
        job.emit("job_state", state="interrupted")
        raise
    except Exception as exc:
        return _fail(job, exc, with_traceback=True)
    job.emit("job_state", state="finished", result=job.read().get("result"))
    return "finished"


def stage_summary(job: Job, since: int = 0) -> dict:
    """{stage: result with elapsed_s | "skipped (outputs exist)"} of the run whose events start at ``since``."""
    summary = {}
    for ev in job.events(since):
        if ev["kind"] == "stage_skipped":
            summary[ev["stage"]] = "skipped (outputs exist)"
        elif ev["kind"] == "stage_finished":
            summary[ev["stage"]] = dict(ev.get("result") or {}, elapsed_s=ev.get("elapsed_s"))
    return summary


__all__ = ["Stage", "stages_for", "run_stages", "run_job", "generate_example", "job_result", "stage_summary",
           "error_kind"]
