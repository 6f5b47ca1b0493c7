"""`stag4d generate`: the stages over one job directory, each skipped when its outputs exist.

Today: the embedded example (``--example``): a procedural animated creature with exact anchor views is written
in the STAG4D layout (no weights, no GPU needed), then fitted with the ``preview`` preset and baked. The
generative stages for a video, an image or a prompt (preprocess, image/text to video, Zero123++ anchors) plug in
before ``fit`` as more stages of the same runner.
"""

from __future__ import annotations

import json
import shutil
import time
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

StageProgress = Callable[[str, dict], None]


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


def _fit_stage(cfg: FitConfig) -> Stage:
    from .fitted import META

    def done(job: Job) -> bool:
        return (job.model_dir / META).is_file()

    def run(job: Job, progress: StageProgress) -> dict:
        from .stages.fit import fit

        out = fit(job.frames_dir, job.model_dir, cfg, progress=lambda s: progress("fit", s))
        return {"iterations": out.iterations, "num_gaussians": out.num_gaussians, "notes": list(out.notes)}

    return Stage("fit", done, run)


def _bake_stage(formats) -> Stage:
    def done(job: Job) -> bool:
        return (job.bake_dir / "bake.json").is_file()

    def run(job: Job, progress: StageProgress) -> dict:
        from .stages.bake import bake

        res = bake(job.model_dir, job.bake_dir, formats=formats, progress=lambda s: progress("bake", s))
        return {"files": [str(p) for p in res.paths]}

    return Stage("bake", done, run)


def example_stages(cfg: FitConfig | None = None, frames: int = EXAMPLE_FRAMES, size: int = EXAMPLE_SIZE,
                   gaussians: int = EXAMPLE_GAUSSIANS, formats=EXAMPLE_BAKE_FORMATS) -> list[Stage]:
    cfg = cfg or get_preset("preview")
    return [_example_frames_stage(frames, size, gaussians), _fit_stage(cfg), _bake_stage(formats)]


def run_stages(job: Job, stages: list[Stage], progress: StageProgress | None = None) -> dict:
    """Run each stage whose outputs are missing; log stage events to the job's events.jsonl."""
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
            result = stage.run(job, progress)
        except BaseException as exc:
            job.emit("stage_failed", stage=stage.name, error=f"{type(exc).__name__}: {exc}")
            job.update(state="failed", error=str(exc))
            raise
        elapsed = round(time.perf_counter() - t0, 2)
        job.emit("stage_finished", stage=stage.name, elapsed_s=elapsed, result=result)
        summary[stage.name] = dict(result, elapsed_s=elapsed)
    job.update(state="finished")
    return summary


def generate_example(job_dir: str | Path, cfg: FitConfig | None = None, progress: StageProgress | None = None,
                     **example_options) -> dict:
    """The example job end to end; ``example_options`` (frames, size, gaussians, formats) are for tests."""
    job = Job(job_dir).create({"kind": "example", "preset": (cfg or get_preset("preview")).preset})
    return run_stages(job, example_stages(cfg, **example_options), progress)


__all__ = ["Stage", "run_stages", "generate_example", "example_stages"]
