"""The video stage: an image (image -> video) or a prompt (text -> image -> video) -> ``JOB/video/``.

    prompt --SDXL-Turbo--> image --cut out, centred on white--> SVD img2vid-xt --> video/{i:04d}.png + frames.json
    image  ------------------------^

- Text to image: SDXL-Turbo, 1 step (1-4 allowed), guidance 0, 512x512, with the prompt wrapped as
  ``PROMPT_TEMPLATE`` ("a 3D render of ..., full body, centred, plain white background") so that the object is
  whole, centred and easy to cut out.
- The image (given or generated) is cut out (its own alpha; else the matting model; else a key of its uniform
  background colour, white for generated images), then centred on a white square with the object's larger side
  at ``video_fraction`` (0.6: leaves room for the motion SVD adds) of ``video_size`` (576: SVD was trained at
  1024x576, its object-orbit fine-tune SV3D runs it at 576x576).
- Image to video: Stable Video Diffusion img2vid-xt (25 frames by default, its training length), fps 7 (its
  micro-conditioning and the clip's playback rate), motion bucket 127, noise augmentation 0.02, 25 steps, the
  guidance ramp 1 -> 3 of the pipeline.

Output, swapped into place as a whole: ``video/{i:04d}.png`` (RGB), ``video/condition.png`` (the SVD input),
``video/text_image.png`` (prompt requests), ``video/frames.json`` {fps, frames, files, matting: "white-key",
background, request, ...}. The preprocess stage reads that folder: it mattes the frames with the matting model
where installed and otherwise keys out the white background we asked for (``matting: "white-key"``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from PIL import Image, ImageOps

from .. import __version__
from ..atomic import atomic_dir, remove_stale_temps
from ..job import check_stop as raise_if_stopped
from ..media.image import MediaError, clip_crop_box, color_key, crop_square, has_alpha, to_rgb_or_rgba
from .preprocess import matting_problem, same_request

ProgressFn = Callable[[dict], None]

VIDEO_DIR = "video"
FRAMES_JSON = "frames.json"
KINDS = ("image", "prompt")
PROMPT_TEMPLATE = "a 3D render of {prompt}, full body, centred, plain white background"
WHITE = (255, 255, 255)

# name: (default, type, minimum, maximum)
_PARAMS = {
    "video_frames": (None, int, 2, 128),        # None: the model's own (unet config num_frames: 25 for -xt)
    "video_fps": (7, int, 1, 60),
    "motion_bucket_id": (127, int, 0, 1023),
    "noise_aug_strength": (0.02, float, 0.0, 1.0),
    "video_steps": (25, int, 1, 200),
    "video_size": (576, int, 64, 2048),
    "video_fraction": (0.6, float, 0.1, 1.0),
    "decode_chunk_size": (8, int, 1, 128),
    "min_guidance_scale": (1.0, float, 0.0, 20.0),
    "max_guidance_scale": (3.0, float, 0.0, 20.0),
    "image_steps": (1, int, 1, 50),
    "image_size": (512, int, 64, 2048),
    "image_guidance": (0.0, float, 0.0, 20.0),
    "seed": (0, int, 0, 2**63 - 1),
}


class VideoError(ValueError):
    """A request the video stage cannot run as asked (one line that names the fix)."""


def _param(options: dict, name: str):
    default, typ, lo, hi = _PARAMS[name]
    v = options.get(name)
    if v is None or v == "":
        return default
    try:
        x = typ(v)
        if typ is int and x != float(v):
            raise ValueError
    except (TypeError, ValueError):
        raise VideoError(f"{name}={v!r}: expected {'a whole number' if typ is int else 'a number'}") from None
    if not lo <= x <= hi:
        raise VideoError(f"{name}={x}: must be between {lo} and {hi}")
    return x


def _signature(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _norm_options(options: dict) -> dict:
    """The request fingerprint (what decides the output) with defaults filled in; VideoError on bad values."""
    kind = options.get("kind")
    if kind not in KINDS:
        raise VideoError(f"kind={kind!r}: the video stage takes kind 'image' (with image=PATH) or 'prompt'")
    req = {"kind": kind}
    if kind == "prompt":
        prompt = (options.get("prompt") or "").strip()
        if not prompt:
            raise VideoError("the prompt is empty: describe the object to generate")
        req["prompt"] = prompt
    else:
        raw = options.get("image")
        if not raw:
            raise VideoError("no image given: pass image=PATH")
        path = Path(raw).expanduser()
        req["image"] = str(path.resolve())
        req["image_signature"] = _signature(path) if path.is_file() else None
    for name in _PARAMS:
        if kind == "image" and name.startswith("image_"):
            continue
        req[name] = _param(options, name)
    # Sizes are rounded to a multiple of 64 (VAE factor 8 x three UNet downsamplings of the real models).
    for name in ("video_size", "image_size"):
        if name in req:
            req[name] = max(64, int(round(req[name] / 64.0)) * 64)
    if req["min_guidance_scale"] > req["max_guidance_scale"]:
        raise VideoError("min_guidance_scale must not exceed max_guidance_scale")
    return req


# ----------------------------------------------------------------------------------------------------------
# The conditioning image


def cut_out(im: Image.Image, options: dict, assume_white: bool, name: str) -> tuple[Image.Image, str]:
    """RGBA cut-out of a single image and how it was made: its own alpha, the matting model, or a key of the
    uniform (white for generated images) background. VideoError with the fix when none applies."""
    im = to_rgb_or_rgba(im, name)
    if has_alpha([im]):
        return im.convert("RGBA"), "input"
    problem = matting_problem(options)
    if problem is None:
        from ..models import matting

        return matting.matte([im], device=options.get("device") or "auto",
                             local_path=options.get("matting_model_path"))[0], "model"
    try:
        return color_key(im, WHITE if assume_white else None, name=name), ("white-key" if assume_white
                                                                           else "color-key")
    except MediaError:
        raise VideoError(f"{name}: the image has no alpha and its background is not a uniform colour, and "
                         f"{problem}") from None


def condition_image(rgba: Image.Image, size: int, fraction: float, name: str = "image") -> Image.Image:
    """The object centred on a white size x size square, its larger side at ``fraction`` of it."""
    box = rgba.getchannel("A").getbbox()
    if box is None:
        raise VideoError(f"{name}: nothing left after cutting out the object (alpha 0 everywhere)")
    sq = crop_square(rgba, clip_crop_box([box], fraction), size)
    canvas = Image.new("RGBA", sq.size, WHITE + (255,))
    canvas.alpha_composite(sq)
    return canvas.convert("RGB")


# ----------------------------------------------------------------------------------------------------------
# The stage


def _read_frames_json(job) -> dict | None:
    try:
        return json.loads((Path(job.path) / VIDEO_DIR / FRAMES_JSON).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_done(job, options: dict) -> bool:
    """True when video/frames.json records this very request and every frame it lists exists."""
    meta = _read_frames_json(job)
    if not meta:
        return False
    try:
        req = _norm_options(options)
    except VideoError:
        return False
    if req["kind"] == "image":
        if not same_request(meta.get("request"), req, "image", "image_signature"):
            return False
    elif meta.get("request") != req:
        return False
    folder = Path(job.path) / VIDEO_DIR
    files = meta.get("files") or []
    return bool(files) and all((folder / f).is_file() for f in files)


def _stopper(should_stop):
    return lambda: raise_if_stopped(should_stop, "cancelled during the video stage")


def _generator(seed: int):
    import torch

    # A CPU generator: the same seed gives the same initial noise on every device.
    return torch.Generator("cpu").manual_seed(int(seed))


def text_to_image(req: dict, options: dict, progress: ProgressFn, check_stop, total: int) -> Image.Image:
    from ..models.video_models import free_memory, load_sdxl_turbo

    check_stop()
    progress({"phase": "text_to_image", "step": 0, "total": total, "message": "loading SDXL-Turbo"})
    pipe = load_sdxl_turbo(options.get("sdxl_turbo_model_path"), device=options.get("device") or "auto",
                           cpu_offload=bool(options.get("cpu_offload")))
    steps = req["image_steps"]

    def on_step(p, i, t, kwargs):
        progress({"phase": "text_to_image", "step": i + 1, "total": total, "message": f"text to image {i + 1}/{steps}"})
        check_stop()
        return kwargs

    try:
        image = pipe(prompt=PROMPT_TEMPLATE.format(prompt=req["prompt"]), num_inference_steps=steps,
                     guidance_scale=req["image_guidance"], height=req["image_size"], width=req["image_size"],
                     generator=_generator(req["seed"]), callback_on_step_end=on_step).images[0]
    finally:
        pipe = None
        free_memory()
    return image


def image_to_video(cond: Image.Image, req: dict, options: dict, progress: ProgressFn, check_stop,
                   offset: int, total: int) -> tuple[list[Image.Image], dict]:
    from ..models.video_models import free_memory, load_svd

    check_stop()
    progress({"phase": "image_to_video", "step": offset, "total": total, "message": "loading Stable Video Diffusion"})
    pipe = load_svd(options.get("svd_model_path"), device=options.get("device") or "auto",
                    cpu_offload=bool(options.get("cpu_offload")))
    steps = req["video_steps"]
    num_frames = req["video_frames"] or int(getattr(pipe.unet.config, "num_frames", 25))

    def on_step(p, i, t, kwargs):
        progress({"phase": "image_to_video", "step": offset + i + 1, "total": total,
                  "message": f"image to video {i + 1}/{steps}"})
        check_stop()
        return kwargs

    try:
        out = pipe(cond, height=req["video_size"], width=req["video_size"], num_frames=num_frames,
                   num_inference_steps=steps, min_guidance_scale=req["min_guidance_scale"],
                   max_guidance_scale=req["max_guidance_scale"], fps=req["video_fps"],
                   motion_bucket_id=req["motion_bucket_id"], noise_aug_strength=req["noise_aug_strength"],
                   decode_chunk_size=min(req["decode_chunk_size"], num_frames),
                   generator=_generator(req["seed"]), callback_on_step_end=on_step)
        frames = [im.convert("RGB") for im in out.frames[0]]
        info = {"num_frames": num_frames, "dtype": str(pipe.unet.dtype).replace("torch.", ""),
                "device": str(pipe.device)}
    finally:
        pipe = None
        free_memory()
    return frames, info


def run(job, options: dict, progress: ProgressFn | None = None, should_stop=None) -> dict:
    """Generate the clip (see module doc) into JOB/video/; returns a summary."""
    progress = progress or (lambda s: None)
    check_stop = _stopper(should_stop)
    t0 = time.perf_counter()
    req = _norm_options(options)
    prompt = req["kind"] == "prompt"
    total = (req["image_steps"] if prompt else 0) + req["video_steps"]

    text_image = None
    if prompt:
        text_image = text_to_image(req, options, progress, check_stop, total)
        source, name = text_image, "the generated image"
    else:
        path = Path(req["image"])
        if not path.is_file():
            raise VideoError(f"{path}: no such image file")
        try:
            with Image.open(path) as im:
                im.load()
                source = ImageOps.exif_transpose(im)
        except (OSError, ValueError) as exc:
            raise VideoError(f"{path}: cannot be read as an image ({exc}); give a PNG or JPEG") from None
        name = str(path)
    rgba, cut = cut_out(source, options, assume_white=prompt, name=name)
    cond = condition_image(rgba, req["video_size"], req["video_fraction"], name)

    offset = req["image_steps"] if prompt else 0
    frames, info = image_to_video(cond, req, options, progress, check_stop, offset, total)
    check_stop()

    folder = Path(job.path) / VIDEO_DIR
    Path(job.path).mkdir(parents=True, exist_ok=True)
    remove_stale_temps(job.path)
    files = [f"{i:04d}.png" for i in range(len(frames))]
    with atomic_dir(folder) as tmp:
        for f, im in zip(files, frames):
            im.save(tmp / f, compress_level=4)
        cond.save(tmp / "condition.png")
        if text_image is not None:
            text_image.save(tmp / "text_image.png")
        meta = {
            "stage": "video",
            "fps": float(req["video_fps"]),
            "frames": len(frames),
            "files": files,
            # Generated frames are RGB on the white we asked for: preprocess keys it out without a matting model.
            "matting": "white-key",
            "background": list(WHITE),
            "kind": req["kind"],
            "prompt": req.get("prompt"),
            "prompt_used": PROMPT_TEMPLATE.format(prompt=req["prompt"]) if prompt else None,
            "image": req.get("image"),
            "condition": {"file": "condition.png", "cut_out": cut, "size": req["video_size"],
                          "fraction": req["video_fraction"]},
            "models": {"image_to_video": "svd", "text_to_image": "sdxl-turbo" if prompt else None},
            "run": info,
            "seed": req["seed"],
            "request": req,
            "versions": {"stag4d": __version__},
        }
        (tmp / FRAMES_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return {"frames": len(frames), "fps": meta["fps"], "size": req["video_size"], "cut_out": cut,
            "elapsed_s": round(time.perf_counter() - t0, 2)}


__all__ = ["run", "is_done", "VideoError", "PROMPT_TEMPLATE", "cut_out", "condition_image", "VIDEO_DIR"]
