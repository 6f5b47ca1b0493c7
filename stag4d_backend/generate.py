"""The generative pipeline: a video, an image or a prompt -> stages over one job directory.

    prompt --video (text -> image -> video)--+
    image  --video (image -> video)----------+--> preprocess --> anchors --> fit --> bake
    video / image-sequence folder -----------+

Each stage is skipped when its outputs exist, so running the same request again on the same job directory
resumes it. A stage that needs weights which are not installed stops the job with the registry's message
(which model, its size, the command that gets it) after every earlier stage has done its work.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from .config import FitConfig, get_preset
from .job import Job
from .pipeline import Stage

GENERATIVE_KINDS = ("video", "image", "folder", "prompt")
DEFAULT_BAKE_FORMATS = ("usd", "ply", "mesh", "preview", "cameras")

_VIDEO_MAGIC = (b"\x1aE\xdf\xa3",)            # Matroska / WebM (EBML)
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


class RequestError(ValueError):
    """A request that cannot run as asked (one line, names the fix)."""


def sniff_input(path: str | Path) -> str:
    """'video', 'image' or 'folder' from the content (not the file name); RequestError otherwise."""
    path = Path(path)
    if path.is_dir():
        return "folder"
    if not path.is_file():
        raise RequestError(f"{path}: no such file or folder")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[4:8] == b"ftyp" or head.startswith(_VIDEO_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"AVI "):
        return "video"
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
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


def fit_config(options: dict) -> FitConfig:
    """The preset (default: standard on CUDA, preview on a CPU) with the request's overrides."""
    import torch

    device = options.get("device")
    default = "standard" if (torch.cuda.is_available() and not str(device or "").startswith("cpu")) else "preview"
    cfg = get_preset(options.get("preset") or default)
    if options.get("iters"):
        cfg = cfg.with_iters(int(options["iters"]))
    if options.get("resolution"):
        cfg = cfg.with_resolution(int(options["resolution"]))
    overrides = {k: options[k] for k in ("device", "seed", "guidance") if options.get(k) is not None}
    return dataclasses.replace(cfg, **overrides)


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
                    should_stop=should_stop)
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


def _fit_stage(request: dict, should_stop, on_snapshot, snapshot_every: int) -> Stage:
    from .fitted import META

    def run(job: Job, progress) -> dict:
        from .stages.fit import fit

        options = request.get("options", {})
        cfg = fit_config(options)
        sds = load_sds_if_present(cfg, options)
        out = fit(job.frames_dir, job.model_dir, cfg, sds=sds, guidance_explicit=bool(options.get("guidance")),
                  progress=lambda s: progress("fit", s), should_stop=should_stop,
                  snapshot_every=snapshot_every, on_snapshot=on_snapshot)
        if out.status == "cancelled":
            raise Cancelled(f"cancelled at fit step {out.iterations}")
        return {"iterations": out.iterations, "num_gaussians": out.num_gaussians, "notes": list(out.notes)}

    return Stage("fit", lambda job: (job.model_dir / META).is_file(), run)


def _bake_stage(request: dict) -> Stage:
    def run(job: Job, progress) -> dict:
        from .stages.bake import bake

        opts = request.get("options", {})
        formats = opts.get("formats") or DEFAULT_BAKE_FORMATS
        res = bake(job.model_dir, job.bake_dir, formats=formats, fps=opts.get("fps"),
                   progress=lambda s: progress("bake", s))
        return {"files": [str(p.relative_to(job.path)) for p in res.paths]}

    return Stage("bake", lambda job: (job.bake_dir / "bake.json").is_file(), run)


class Cancelled(RuntimeError):
    """The job was cancelled at a step boundary; its directory is consistent and resumable."""


def generative_stages(request: dict, should_stop: Callable[[], bool] | None = None,
                      on_snapshot=None, snapshot_every: int = 0) -> list[Stage]:
    kind = request.get("kind")
    if kind not in GENERATIVE_KINDS:
        raise RequestError(f"unknown request kind {kind!r}; expected one of {', '.join(GENERATIVE_KINDS)}")
    generated = kind in ("image", "prompt")
    stages = [_video_stage(request, should_stop)] if generated else []
    stages += [_preprocess_stage(request, should_stop, generated), _anchors_stage(request, should_stop),
               _fit_stage(request, should_stop, on_snapshot, snapshot_every), _bake_stage(request)]
    return stages


__all__ = ["generative_stages", "make_request", "sniff_input", "fit_config", "RequestError", "Cancelled",
           "GENERATIVE_KINDS"]
