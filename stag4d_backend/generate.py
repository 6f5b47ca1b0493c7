"""The generative pipeline: a video, an image or a prompt -> stages over one job directory.

    prompt --video (text -> image -> video)--+
    image  --video (image -> video)----------+--> preprocess --> anchors --> fit --> bake
    video / image-sequence folder -----------+

Each stage is skipped when its outputs exist, so running the same request again on the same job directory
resumes it. A stage that needs weights which are not installed stops the job with the registry's message
(which model, its size, the command that gets it) after every earlier stage has done its work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .config import FitConfig, config_from_options
from .job import Job
from .media import sniff_file
from .pipeline import EXAMPLE_BAKE_FORMATS as DEFAULT_BAKE_FORMATS
from .pipeline import JobCancelled, Stage, bake_stage, fit_stage

GENERATIVE_KINDS = ("video", "image", "folder", "prompt")


class RequestError(ValueError):
    """A request that cannot run as asked (one line, names the fix)."""


def sniff_input(path: str | Path) -> str:
    """'video', 'image' or 'folder' from the content (not the file name); RequestError otherwise."""
    path = Path(path)
    if path.is_dir():
        return "folder"
    if not path.is_file():
        raise RequestError(f"{path}: no such file or folder")
    found = sniff_file(path)
    if found is not None:
        return found[0]
    raise RequestError(f"{path}: not a video (mp4, mov, webm, avi) or an image (png, jpeg, webp, gif, bmp, tiff)")


def make_request(input_path: str | Path | None = None, prompt: str | None = None, **options) -> dict:
    """The job.json request of `stag4d generate INPUT|--prompt TEXT` (the server builds the same shape)."""
    if (input_path is None) == (prompt is None):
        raise RequestError("give either an input file/folder or --prompt TEXT")
    options = {k: v for k, v in options.items() if v is not None}
    if prompt is not None:
        if not prompt.strip():
            raise RequestError("--prompt is empty")
        return {"kind": "prompt", "prompt": prompt, "options": options}
    path = Path(input_path).expanduser().resolve()
    return {"kind": sniff_input(path), "input": str(path), "options": options}


def _input_of(job: Job, request: dict) -> Path:
    raw = request.get("input") or request.get("path")
    if not raw:
        raise RequestError("the request names no input file")
    path = Path(raw)
    return path if path.is_absolute() else job.path / path


def _video_stage(request: dict, should_stop) -> Stage:
    from .stages import video

    def options(job: Job) -> dict:
        opts = dict(request.get("options", {}), should_stop=should_stop)
        if request["kind"] == "prompt":
            opts.update(kind="prompt", prompt=request["prompt"])
        else:
            opts.update(kind="image", image=str(_input_of(job, request)))
        return opts

    return Stage("video", lambda job: video.is_done(job, options(job)),
                 lambda job, progress: video.run(job, options(job), lambda s: progress("video", s)))


def _preprocess_stage(request: dict, should_stop, generated_video: bool) -> Stage:
    from .stages import preprocess

    def options(job: Job) -> dict:
        opts = dict(request.get("options", {}), should_stop=should_stop)
        opts["input"] = str(job.path / "video") if generated_video else str(_input_of(job, request))
        return opts

    return Stage("preprocess", lambda job: preprocess.is_done(job, options(job)),
                 lambda job, progress: preprocess.run(job, options(job), lambda s: progress("preprocess", s)))


def _anchors_stage(request: dict, should_stop) -> Stage:
    from .stages import anchors

    def options(job: Job) -> dict:
        # The request's options are shared by every stage: the anchors' own knobs carry an anchor_ prefix there.
        opts = {k: v for k, v in request.get("options", {}).items() if k not in ("steps", "batch", "model_path")}
        opts.update(steps=opts.pop("anchor_steps", None), batch=opts.pop("anchor_batch", None),
                    tile=opts.pop("anchor_tile", None), should_stop=should_stop)
        return opts

    return Stage("anchors", lambda job: anchors.is_done(job, options(job)),
                 lambda job, progress: anchors.run(job, options(job), lambda s: progress("anchors", s)))


def load_sds_if_present(cfg: FitConfig, options: dict):
    """Zero123-XL SDS when the preset uses it and the weights are installed; None otherwise (the fit then falls
    back to the anchor views and says so, unless SDS was asked for explicitly)."""
    if "sds" not in cfg.guidance:
        return None
    from .models.registry import MissingWeightsError

    try:
        from .models.zero123_xl import load_zero123_sds, sds_options

        return load_zero123_sds(device=cfg.device, local_path=options.get("sds_model_path"), **sds_options(cfg))
    except MissingWeightsError:
        if options.get("guidance"):
            raise
        return None


class Cancelled(JobCancelled):
    """The job was cancelled at a step boundary; its directory is consistent and resumable."""


def generative_stages(request: dict, should_stop: Callable[[], bool] | None = None,
                      on_snapshot=None, snapshot_every: int = 0, cfg: FitConfig | None = None) -> list[Stage]:
    """The stages of ``request``; ``cfg`` is the fit configuration when the caller has built it already."""
    kind = request.get("kind")
    if kind not in GENERATIVE_KINDS:
        raise RequestError(f"unknown request kind {kind!r}; expected one of {', '.join(GENERATIVE_KINDS)}")
    options = request.get("options", {})
    cfg = cfg or config_from_options(options)
    generated = kind in ("image", "prompt")
    fit_kwargs = {"guidance_explicit": bool(options.get("guidance")), "snapshot_every": snapshot_every,
                  "on_snapshot": on_snapshot}
    stages = [_video_stage(request, should_stop)] if generated else []
    stages += [_preprocess_stage(request, should_stop, generated), _anchors_stage(request, should_stop),
               fit_stage(cfg, should_stop, fit_kwargs, lambda: {"sds": load_sds_if_present(cfg, options)}),
               bake_stage(options.get("formats") or DEFAULT_BAKE_FORMATS, options.get("fps"))]
    return stages


__all__ = ["generative_stages", "make_request", "sniff_input", "RequestError", "Cancelled",
           "GENERATIVE_KINDS"]
