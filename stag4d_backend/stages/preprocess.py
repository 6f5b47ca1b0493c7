"""The preprocess stage: a video, an image sequence or an image -> ``frames/ref/{f}_rgba.png`` (docs/preprocess.md).

    input (video file | folder of images | image file)
      -> decode + select frames (start, end, stride, frames cap); fps kept (divided by stride)
      -> alpha: the input's own, or matting (BiRefNet where installed), or a uniform-colour key
      -> ONE square crop box for the whole clip: centred on the union of the object's boxes over all frames,
         its side such that the union's larger extent fills ``fraction`` of it (so motion is kept)
      -> resize to ``size`` x ``size``; alpha 0 outside the object
      -> frames/ref/{f}_rgba.png (f = 0..F-1) and frames/meta.json

Everything is decoded, matted and cropped in memory, written into a temporary folder and renamed into place, and
``meta.json`` (which :func:`is_done` checks) is written last: a killed run leaves no half-written ``ref/``.
Bad input raises :class:`PreprocessError` (one line that names the fix) before anything is written.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from PIL import Image

from .. import __version__
from ..atomic import atomic_dir, remove_stale_temps, write_json
from ..job import check_stop
from ..media.clip import Clip, Selection, read_clip
from ..media.image import (MediaError, alpha_bbox, clean_alpha, clip_crop_box, color_key, crop_square, has_alpha,
                           to_rgb_or_rgba)

ProgressFn = Callable[[dict], None]

META = "meta.json"
DEFAULT_SIZE = 512               # the fit's reference resolution (config.ref_resolution); anchors resize to 320
DEFAULT_FRACTION = 0.75          # Zero123++'s own demo recentres the object's larger side to 0.75 of the image
MATTING_CHOICES = ("auto", "model", "none", "white-key", "color-key")

NO_MATTING = ("input has no alpha and no matting model is installed: `stag4d models download matting`, or give "
              "RGBA frames (PNG with transparency) / an image sequence cut out in any tool; on a plain uniform "
              "background, matting='color-key' (CLI: --matting color-key, or white-key) cuts it out without a model")


# Bad input or options, from decoding to cropping: one error class (media.image.MediaError), one line naming the fix.
PreprocessError = MediaError


def _check_stop(should_stop) -> None:
    check_stop(should_stop, "cancelled during preprocess")


def _norm_options(options: dict) -> dict:
    """The options that decide the output (the fingerprint compared by :func:`is_done`)."""
    if not options.get("input"):
        raise PreprocessError("no input given: pass a video file, an image file or a folder of images")
    size = options.get("size") or DEFAULT_SIZE
    fraction = options.get("fraction") or DEFAULT_FRACTION
    try:
        size, fraction = int(size), float(fraction)
    except (TypeError, ValueError):
        raise PreprocessError(f"size={options.get('size')!r} / fraction={options.get('fraction')!r}: expected "
                              f"a whole number of pixels and a number in (0, 1]") from None
    if not 16 <= size <= 4096:
        raise PreprocessError(f"size={size}: the output side must be between 16 and 4096 pixels")
    if not 0.05 <= fraction <= 1.0:
        raise PreprocessError(f"fraction={fraction}: the object's share of the side must be in [0.05, 1]")
    matting = options.get("matting") or "auto"
    if matting not in MATTING_CHOICES:
        raise PreprocessError(f"matting={matting!r}: choose one of {', '.join(MATTING_CHOICES)}")
    sel = Selection.from_options(options)
    fps = options.get("fps")
    if fps is not None:
        try:
            fps = float(fps)
        except (TypeError, ValueError):
            raise PreprocessError(f"fps={fps!r}: expected a number of frames per second") from None
        if not fps > 0:
            raise PreprocessError(f"fps={fps}: must be > 0")
    path = Path(options["input"]).expanduser()
    return {"input": str(path.resolve()), "input_signature": _signature(path), "size": size,
            "fraction": fraction, "matting": matting, "start": sel.start, "end": sel.end, "stride": sel.stride,
            "frames": sel.frames, "fps": fps}


def _signature(path: Path) -> list:
    """Size and mtime of the input (each file of a folder), so a replaced input is preprocessed again."""
    if path.is_file():
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    if path.is_dir():
        out = []
        for p in sorted(path.iterdir()):
            if p.is_file() and not p.name.startswith("."):
                st = p.stat()
                out.append([p.name, st.st_size, st.st_mtime_ns])
        ref = path / "ref"
        if ref.is_dir():
            out.append(["ref/", _signature(ref)])
        return out
    return []


# ----------------------------------------------------------------------------------------------------------
# Alpha for the clip


def matting_problem(options: dict | None = None) -> str | None:
    """None when the matting model can run; else the one-line reason (NO_MATTING when it is not installed)."""
    try:
        from ..models import matting, registry
    except ImportError:  # pragma: no cover - part of the package
        return NO_MATTING
    local = (options or {}).get("matting_model_path")
    reason = matting.unavailable_reason(local)
    if reason is None:
        return None
    try:
        registry.resolve(matting.NAME, local)
    except registry.MissingWeightsError:
        return NO_MATTING if not local else reason
    return reason  # installed but unusable (its code's packages are missing)


MATTING_SAYS = {"input": "the input itself", "model": "the BiRefNet matting model",
                "white-key": "a white-background key", "color-key": "a uniform-background colour key"}


def matte_clip(clip: Clip, mode: str, options: dict, progress: ProgressFn,
               should_stop=None) -> tuple[list[Image.Image], str, str]:
    """RGBA frames for the clip, how the alpha was obtained ("input", "model", "white-key", "color-key") and one
    line saying so (for 'auto', also why: users must know when a key stood in for the model)."""
    images = clip.images
    src_alpha = has_alpha(images)
    asked = mode
    why = ""
    if mode == "auto":
        if src_alpha:
            mode = "input"
        else:
            problem = matting_problem(options)
            if problem is None:
                mode = "model"
            elif clip.matting_hint in ("white-key", "color-key"):
                mode = clip.matting_hint  # generated frames on the plain background we asked for (video stage)
                why = f" (the matting model cannot run: {problem.rstrip('.')}; the frames were generated on a " \
                      f"plain background)"
            else:
                raise PreprocessError(problem)
    elif mode == "none":
        if not src_alpha:
            raise PreprocessError(f"{clip.source}: matting='none' but the input has no alpha; give RGBA frames "
                                  f"or use matting='auto'")
        mode = "input"
    elif mode == "model":
        problem = matting_problem(options)
        if problem is not None:
            raise PreprocessError(problem)

    n = len(images)
    said = f"alpha from {MATTING_SAYS[mode]} (matting={asked}){why}"
    progress({"phase": "matte", "step": 0, "total": n, "message": said})
    if mode == "input":
        out = [im.convert("RGBA") for im in images]
    elif mode == "model":
        from ..models import matting

        out = []
        for i, im in enumerate(images):
            _check_stop(should_stop)
            out.extend(matting.matte([im.convert("RGB")], device=options.get("device") or "auto",
                                     local_path=options.get("matting_model_path")))
            progress({"phase": "matte", "step": i + 1, "total": n, "message": "matting"})
    else:
        color = (255, 255, 255) if mode == "white-key" else None
        out = []
        for i, im in enumerate(images):
            _check_stop(should_stop)
            out.append(color_key(im, color, name=f"{clip.source} (frame {clip.indices[i]})"))
            progress({"phase": "matte", "step": i + 1, "total": n, "message": f"keying out the background ({mode})"})
    return [clean_alpha(im) for im in out], mode, said


# ----------------------------------------------------------------------------------------------------------
# The stage


def _read_meta(job) -> dict | None:
    p = Path(job.frames_dir) / META
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def same_request(recorded: dict | None, now: dict, path_key: str, signature_key: str) -> bool:
    """Equal requests; an input that has since disappeared (a temporary upload) still matches the outputs
    recorded for it, so a finished stage is not rerun (and failed) on resume."""
    if recorded == now:
        return True
    if not recorded or Path(now[path_key]).exists():
        return False
    strip = lambda d: {k: v for k, v in d.items() if k != signature_key}  # noqa: E731
    return strip(recorded) == strip(now)


def is_done(job, options: dict) -> bool:
    """True when frames/meta.json records this very request and every frame it lists exists."""
    meta = _read_meta(job)
    if not meta or meta.get("stage") != "preprocess":
        return False
    try:
        if not same_request(meta.get("request"), _norm_options(options), "input", "input_signature"):
            return False
    except PreprocessError:
        return False
    ref = Path(job.frames_dir) / "ref"
    return all((ref / f"{f}_rgba.png").is_file() for f in range(int(meta.get("frames", 0)))) and \
        int(meta.get("frames", 0)) > 0


def run(job, options: dict, progress: ProgressFn | None = None, should_stop=None) -> dict:
    """Decode, select, matte, crop and write frames/ref/{f}_rgba.png + frames/meta.json (see module doc)."""
    progress = progress or (lambda s: None)
    t0 = time.perf_counter()
    req = _norm_options(options)
    sel = Selection.from_options(options)
    size, fraction = req["size"], req["fraction"]
    frames_dir = Path(job.frames_dir)

    clip = read_clip(req["input"], sel, should_stop, progress)
    rgba, matting_used, matting_said = matte_clip(clip, req["matting"], options, progress, should_stop)

    boxes = []
    for i, im in enumerate(rgba):
        box = alpha_bbox(im)
        if box is None:
            raise PreprocessError(f"{clip.source}: frame {clip.indices[i]} is empty after matting ({matting_used}):"
                                  f" no object found (alpha 0 everywhere); check the input or give RGBA frames")
        boxes.append(box)
    crop = clip_crop_box(boxes, fraction)

    frames_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(frames_dir)
    n = len(rgba)
    with atomic_dir(frames_dir / "ref") as tmp:
        for f, im in enumerate(rgba):
            _check_stop(should_stop)
            crop_square(im, crop, size).save(tmp / f"{f}_rgba.png", compress_level=4)
            progress({"phase": "write", "step": f + 1, "total": n, "message": f"writing frame {f}"})
        # From here the old ref/ is replaced: its meta.json and the anchors made from it are stale.
        (frames_dir / META).unlink(missing_ok=True)
    shutil.rmtree(frames_dir / "zero123", ignore_errors=True)

    stride = sel.effective_stride(clip.indices)
    source_fps = clip.fps
    fps = source_fps / stride if source_fps else req["fps"]
    inv = 1.0 / clip.scale
    meta = {
        "stage": "preprocess",
        "fps": fps,
        "fps_source": "input" if source_fps else ("option" if req["fps"] else None),
        "source": clip.source,
        "source_kind": clip.kind,
        "source_fps": source_fps,
        "source_size": list(clip.original_size),
        "source_frames": clip.indices,
        "stride": stride,
        "frames": n,
        "size": size,
        "fraction": fraction,
        # In the source frame's pixels (after rotation), x0 y0 x1 y1; may extend past the frame.
        "crop_box": [round(c * inv, 3) for c in crop],
        "matting": matting_used,
        "matting_note": matting_said,
        "request": req,
        "versions": {"stag4d": __version__},
    }
    write_json(frames_dir / META, meta)
    return {"frames": n, "size": size, "fps": fps, "matting": matting_used, "note": matting_said,
            "record": {"matting": {"method": matting_used, "note": matting_said}},
            "crop_box": meta["crop_box"], "elapsed_s": round(time.perf_counter() - t0, 2)}


__all__ = ["run", "is_done", "PreprocessError", "read_clip", "Selection", "clip_crop_box", "crop_square",
           "color_key", "to_rgb_or_rgba", "has_alpha", "NO_MATTING", "DEFAULT_SIZE", "DEFAULT_FRACTION"]
