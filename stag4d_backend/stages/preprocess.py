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

import itertools
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from .. import __version__
from ..atomic import atomic_dir, remove_stale_temps, write_json
from ..job import check_stop

ProgressFn = Callable[[dict], None]

META = "meta.json"
VIDEO_META = "frames.json"       # written by the video stage next to its frames
DEFAULT_SIZE = 512               # the fit's reference resolution (config.ref_resolution); anchors resize to 320
DEFAULT_FRACTION = 0.75          # Zero123++'s own demo recentres the object's larger side to 0.75 of the image
MATTING_CHOICES = ("auto", "model", "none", "white-key", "color-key")
ALPHA_FLOOR = 8                  # alpha below this is background: matting noise, the authors' alpha-1 background
MAX_SIDE = 2048                  # larger decoded frames are downscaled first (memory; the output is ~512)
MAX_FRAMES = 1000                # a guard against keeping a whole feature film in memory
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
VIDEO_EXTS = {".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi"}

NO_MATTING = ("input has no alpha and no matting model is installed: `stag4d models download matting`, or give "
              "RGBA frames (PNG with transparency) / an image sequence cut out in any tool; on a plain uniform "
              "background, matting='color-key' (CLI: --matting color-key, or white-key) cuts it out without a model")


class PreprocessError(ValueError):
    """Bad input or options; the message is one line that names the file and the fix."""


# ----------------------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class Selection:
    """Which source frames are kept: ``range(start, end, stride)``, then the first ``frames`` of those.
    ``stride="auto"`` (with ``frames``) picks the smallest stride that spreads ``frames`` over the whole range."""

    start: int = 0
    end: int | None = None       # exclusive, in source frames; None = to the end
    stride: int | str = 1
    frames: int | None = None    # cap on the number kept; None = all

    @staticmethod
    def from_options(options: dict) -> "Selection":
        def as_int(key, minimum, allow_none=True, allow=()):
            v = options.get(key)
            if v is None or v == "":
                if allow_none:
                    return None
                raise PreprocessError(f"{key} is required")
            if v in allow:
                return v
            try:
                iv = int(v)
                if iv != float(v):
                    raise ValueError
            except (TypeError, ValueError):
                raise PreprocessError(f"{key}={v!r}: expected a whole number >= {minimum}") from None
            if iv < minimum:
                raise PreprocessError(f"{key}={iv}: must be >= {minimum}")
            return iv

        start = as_int("start", 0) or 0
        end = as_int("end", 1)
        stride = as_int("stride", 1, allow=("auto",)) or 1
        frames = as_int("frames", 1)
        if end is not None and end <= start:
            raise PreprocessError(f"end={end} must be greater than start={start} (end is exclusive)")
        if stride == "auto" and frames is None:
            raise PreprocessError("stride='auto' needs frames=N (the number of frames to spread over the clip)")
        return Selection(start, end, stride, frames)

    def indices(self, count: int, source: str) -> list[int]:
        """The kept source indices for a clip of ``count`` frames (PreprocessError when none remain)."""
        end = count if self.end is None else min(self.end, count)
        if self.start >= count:
            raise PreprocessError(f"{source}: start={self.start} is past the last frame (the input has {count} "
                                  f"frame{'s' if count != 1 else ''}, 0..{count - 1})")
        stride = self.stride
        if stride == "auto":
            stride = max(1, math.ceil((end - self.start) / self.frames))
        kept = list(range(self.start, end, stride))
        if self.frames is not None:
            kept = kept[:self.frames]
        if len(kept) > MAX_FRAMES:
            raise PreprocessError(f"{source}: {len(kept)} frames selected; at most {MAX_FRAMES} are supported: "
                                  f"use --stride, --frames or --end to keep fewer")
        return kept

    def effective_stride(self, kept: list[int]) -> int:
        if self.stride != "auto":
            return int(self.stride)
        return kept[1] - kept[0] if len(kept) > 1 else 1


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
# Images: modes and alpha


def to_rgb_or_rgba(im: Image.Image, name: str) -> Image.Image:
    """Any common PIL mode -> RGB or RGBA (8 bits). Unsupported modes raise PreprocessError."""
    mode = im.mode
    if mode in ("RGB", "RGBA"):
        return im
    if mode in ("LA", "La", "PA", "RGBa"):
        return im.convert("RGBA")
    if mode == "P":
        return im.convert("RGBA" if "transparency" in im.info else "RGB")
    if mode in ("L", "1", "RGBX", "CMYK", "YCbCr"):
        return im.convert("RGB")
    if mode.startswith("I"):  # 16-bit greyscale PNG ("I;16", "I;16B") or 32-bit "I"
        arr = np.asarray(im).astype(np.float64)
        scale = 257.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 1.0
        return Image.fromarray(np.clip(np.round(arr / scale), 0, 255).astype(np.uint8), "L").convert("RGB")
    raise PreprocessError(f"{name}: image mode {mode} is not supported; save it as an 8-bit RGB or RGBA PNG")


def has_alpha(images: list[Image.Image]) -> bool:
    """True when the frames carry a real alpha (RGBA with some transparency); an all-opaque alpha is ignored."""
    return any(im.mode == "RGBA" and im.getchannel("A").getextrema()[0] < 255 - ALPHA_FLOOR for im in images)


def color_key(im: Image.Image, color: tuple[int, int, int] | None = None, tolerance: float = 24.0,
              softness: float = 12.0, name: str = "image") -> Image.Image:
    """Cut the object out of a uniform background: pixels close to the background colour (``color``, or the
    median of the border) that are connected to the image border become transparent, with a soft ramp of
    ``softness`` levels below ``tolerance``. Regions of background colour inside the object stay opaque. Raises
    PreprocessError when the border is not mostly that colour (keying would cut into a real scene)."""
    from scipy import ndimage

    rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    bg = np.median(border, axis=0) if color is None else np.asarray(color, np.float32)
    dist = np.abs(rgb - bg).max(-1)  # Chebyshev distance in 0..255 levels
    border_dist = np.abs(border - bg).max(-1)
    if (border_dist < tolerance).mean() < 0.9:
        what = "white" if color == (255, 255, 255) else f"a uniform colour (median {tuple(int(c) for c in bg)})"
        raise PreprocessError(f"{name}: the background is not {what} along the border, so it cannot be keyed "
                              f"out; install the matting model (`stag4d models download matting`) or give RGBA "
                              f"frames")
    # A 3x3 median first: video compression leaves isolated noisy pixels in flat backgrounds.
    dist = ndimage.median_filter(dist, size=3, mode="nearest")
    near = dist < tolerance
    labels, _ = ndimage.label(near)
    edge_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background = np.isin(labels, edge_labels[edge_labels > 0])
    # Specks of foreground far smaller than the object (noise, dust) become background too.
    fg_labels, n_fg = ndimage.label(~background)
    if n_fg > 1:
        areas = ndimage.sum_labels(np.ones_like(dist), fg_labels, index=np.arange(1, n_fg + 1))
        specks = np.isin(fg_labels, np.flatnonzero(areas < 0.01 * areas.max()) + 1)
    else:
        specks = np.zeros_like(background)
    ramp = np.clip((dist - (tolerance - softness)) / max(softness, 1e-6), 0.0, 1.0)
    alpha = np.where(background, ramp, 1.0)
    alpha[specks] = 0.0
    out = np.dstack([rgb, alpha * 255.0])
    return Image.fromarray(np.round(out).astype(np.uint8), "RGBA")


def clean_alpha(im: Image.Image) -> Image.Image:
    """Alpha below ALPHA_FLOOR -> 0 (faint matting noise would otherwise widen the crop box)."""
    a = np.asarray(im.getchannel("A"))
    if a.min() >= ALPHA_FLOOR or not (a < ALPHA_FLOOR).any():
        return im
    a = np.where(a < ALPHA_FLOOR, 0, a).astype(np.uint8)
    out = im.copy()
    out.putalpha(Image.fromarray(a, "L"))
    return out


def alpha_bbox(im: Image.Image) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of alpha > 0, exclusive end; None when fully transparent."""
    return im.getchannel("A").getbbox()


# ----------------------------------------------------------------------------------------------------------
# The crop rule


def clip_crop_box(boxes: list[tuple[int, int, int, int]], fraction: float) -> tuple[float, float, float, float]:
    """One square box (x0, y0, x1, y1, source pixels) for the whole clip: centred on the union of the per-frame
    object boxes, side = the union's larger extent / ``fraction``. The box may extend past the frame (padded
    with transparency)."""
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[2] for b in boxes)
    y1 = max(b[3] for b in boxes)
    side = max(x1 - x0, y1 - y0) / fraction
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    return (cx - side / 2.0, cy - side / 2.0, cx + side / 2.0, cy + side / 2.0)


def crop_square(im: Image.Image, box: tuple[float, float, float, float], size: int) -> Image.Image:
    """Resample the (sub-pixel) box of an RGBA image to size x size; transparent outside the image. Pillow
    resizes RGBA premultiplied, so background colour under alpha 0 does not bleed into the edges."""
    x0, y0, x1, y1 = box
    w, h = im.size
    pl, pt = max(0, -math.floor(x0)), max(0, -math.floor(y0))
    pr, pb = max(0, math.ceil(x1) - w), max(0, math.ceil(y1) - h)
    if pl or pt or pr or pb:
        canvas = Image.new("RGBA", (w + pl + pr, h + pt + pb), (0, 0, 0, 0))
        canvas.paste(im, (pl, pt))
        im = canvas
    out = im.resize((size, size), Image.Resampling.LANCZOS, box=(x0 + pl, y0 + pt, x1 + pl, y1 + pt))
    # LANCZOS rings faintly into the background: keep "alpha 0 outside" exact, with black (not stale) RGB there.
    arr = np.array(out)
    arr[arr[..., 3] < ALPHA_FLOOR] = 0
    return Image.fromarray(arr, "RGBA")


# ----------------------------------------------------------------------------------------------------------
# Reading the input


@dataclass
class Clip:
    kind: str                                  # "video" | "sequence" | "image"
    source: str
    fps: float | None
    indices: list[int]                         # kept source frame indices
    images: list[Image.Image]                  # RGB or RGBA, same size
    scale: float = 1.0                         # decoded / original pixels (MAX_SIDE downscale)
    original_size: tuple[int, int] = (0, 0)
    matting_hint: str | None = None            # "white-key" for generated frames on white (video stage)
    notes: list[str] = field(default_factory=list)


def _limit_size(im: Image.Image) -> tuple[Image.Image, float]:
    w, h = im.size
    if max(w, h) <= MAX_SIDE:
        return im, 1.0
    s = MAX_SIDE / max(w, h)
    return im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS), s


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _open_image(path: Path) -> Image.Image:
    try:
        im = Image.open(path)
        im.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise PreprocessError(f"{path}: cannot be read as an image ({exc}); replace it with a valid PNG or "
                              f"JPEG") from None
    return im


def _check_stop(should_stop) -> None:
    check_stop(should_stop, "cancelled during preprocess")


def _pick_frames(frames, to_image, count: int, sel: Selection, path: Path, should_stop,
                 progress: ProgressFn) -> tuple[list[int], list[Image.Image], float, tuple[int, int]]:
    """Walk a decoder's frames once, converting only the kept ones. With a known length (``count`` > 0) the kept
    indices are fixed up front; otherwise (some webm/mkv) they are chosen on the fly with the same rule."""
    wanted = sel.indices(count, str(path)) if count > 0 else None
    wanted_set = set(wanted or ())
    stride = 1 if sel.stride == "auto" else int(sel.stride)
    images, kept, scale, orig, decoded = [], [], 1.0, (0, 0), 0

    def corrupt(exc: Exception) -> PreprocessError:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        return PreprocessError(f"{path}: the video is corrupt or truncated (decoding failed after {decoded} frames: "
                               f"{first}); re-export it or give an image sequence")

    it = iter(frames)
    for i in itertools.count():
        try:  # only decoder errors mean a corrupt file; the progress callback's own errors pass through
            frame = next(it)
        except StopIteration:
            break
        except Exception as exc:  # noqa: BLE001
            raise corrupt(exc) from None
        decoded = i + 1
        if wanted is not None:
            if i > wanted[-1]:
                break
            if i not in wanted_set:
                continue
        else:
            if (sel.end is not None and i >= sel.end) or (sel.frames is not None and len(images) >= sel.frames):
                break
            if i < sel.start or (i - sel.start) % stride:
                continue
            if len(images) >= MAX_FRAMES:
                raise PreprocessError(f"{path}: more than {MAX_FRAMES} frames selected; use --stride, --frames "
                                      f"or --end to keep fewer")
        _check_stop(should_stop)
        try:
            im = to_image(frame)
        except Exception as exc:  # noqa: BLE001
            raise corrupt(exc) from None
        orig = im.size
        im, scale = _limit_size(im)
        images.append(im)
        kept.append(i)
        progress({"phase": "decode", "step": len(images), "total": len(wanted) if wanted else None,
                  "message": f"decoding frame {i}"})
    if not images:
        if decoded == 0:
            raise PreprocessError(f"{path}: no frames could be decoded (empty or corrupt video); re-export it or "
                                  f"give an image sequence")
        raise PreprocessError(f"{path}: start={sel.start} is past the last frame (the input has {decoded} frames, "
                              f"0..{decoded - 1})")
    # A container may announce more frames than it holds (wanted[-1] past the end): keep what decoded.
    return kept, images, scale, orig


def _av_to_image(frame) -> Image.Image:
    im = frame.to_image()
    rot = getattr(frame, "rotation", 0) or 0
    if rot % 360:  # display-matrix rotation (phone videos): show what players show, as ffmpeg does
        im = im.rotate(rot, expand=True)
    return im


def _read_video(path: Path, sel: Selection, should_stop, progress: ProgressFn) -> Clip:
    try:
        import av
    except ImportError:  # pragma: no cover - av is a dependency; imageio-ffmpeg is the fallback
        return _read_video_imageio(path, sel, should_stop, progress, "PyAV is not installed")
    try:
        container = av.open(str(path))
    except Exception as exc:  # noqa: BLE001 - any FFmpeg/OS error: try the other reader, then report
        return _read_video_imageio(path, sel, should_stop, progress, str(exc))
    with container:
        if not container.streams.video:
            raise PreprocessError(f"{path}: has no video stream; give a video (mp4, mov, webm) or images")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else None
        count = stream.frames or 0
        if count <= 0 and sel.stride == "auto":  # the length is needed to spread the frames: count packets
            try:
                count = sum(1 for pkt in container.demux(stream) if pkt.size)
                container.seek(0)
            except Exception as exc:  # noqa: BLE001
                raise PreprocessError(f"{path}: the video is corrupt ({exc}); re-export it") from None
        kept, images, scale, orig = _pick_frames(container.decode(stream), _av_to_image, count, sel, path,
                                                 should_stop, progress)
    return Clip("video", str(path), fps, kept, images, scale, orig)


def _read_video_imageio(path: Path, sel: Selection, should_stop, progress: ProgressFn, why: str) -> Clip:
    """Fallback reader (imageio-ffmpeg's own ffmpeg binary) for files PyAV's FFmpeg build cannot open."""
    reason = why.strip().splitlines()[0][:200] if why and why.strip() else "unknown format"
    try:
        import imageio.v2 as iio

        reader = iio.get_reader(str(path), "ffmpeg")
    except Exception:  # noqa: BLE001
        raise PreprocessError(f"{path}: cannot be read as a video ({reason}); give an mp4/mov/webm video, an "
                              f"image or a folder of images") from None
    try:
        meta = reader.get_meta_data()
        fps = float(meta.get("fps") or 0) or None
        count = 0
        if sel.stride == "auto":
            count = reader.count_frames()
        kept, images, scale, orig = _pick_frames(iter(reader), Image.fromarray, count, sel, path, should_stop,
                                                 progress)
    finally:
        reader.close()
    return Clip("video", str(path), fps, kept, images, scale, orig)


def _frame_files(folder: Path) -> tuple[list[Path], dict]:
    """The image files of a folder in frame order, and the video stage's metadata if present."""
    meta = {}
    if (folder / VIDEO_META).is_file():
        try:
            meta = json.loads((folder / VIDEO_META).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PreprocessError(f"{folder / VIDEO_META}: unreadable ({exc}); delete it or regenerate the "
                                  f"video") from None
        if isinstance(meta.get("files"), list):
            return [folder / n for n in meta["files"]], meta
    ref = folder / "ref"
    if ref.is_dir() and not any(p.suffix.lower() in IMAGE_EXTS for p in folder.iterdir() if p.is_file()):
        # A STAG4D-layout data folder: its ref/{f}_rgba.png frames in numeric order.
        found = {}
        for p in ref.iterdir():
            m = re.match(r"^(\d+)_rgba\.png$", p.name)
            if m:
                found[int(m.group(1))] = p
        return [found[k] for k in sorted(found)], meta
    files = [p for p in folder.iterdir()
             if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS]
    return sorted(files, key=lambda p: _natural_key(p.name)), meta


def _read_sequence(folder: Path, sel: Selection, should_stop, progress: ProgressFn) -> Clip:
    files, meta = _frame_files(folder)
    if not files:
        raise PreprocessError(f"{folder}: no images found (png, jpg, webp, bmp, tiff); put the frames there "
                              f"as 0000.png, 0001.png, ...")
    kept = sel.indices(len(files), str(folder))
    images, size, scale, orig = [], None, 1.0, (0, 0)
    for n, i in enumerate(kept):
        _check_stop(should_stop)
        p = files[i]
        if not p.is_file():
            raise PreprocessError(f"{p}: listed in {VIDEO_META} but missing; regenerate the video")
        im = to_rgb_or_rgba(ImageOps.exif_transpose(_open_image(p)), str(p))
        if size is None:
            size = im.size
        elif im.size != size:
            raise PreprocessError(f"{p}: {im.size[0]}x{im.size[1]} differs from the first frame's "
                                  f"{size[0]}x{size[1]} ({files[kept[0]].name}); all frames must have one size")
        orig = im.size
        im, scale = _limit_size(im)
        images.append(im)
        progress({"phase": "decode", "step": n + 1, "total": len(kept), "message": f"reading {p.name}"})
    fps = meta.get("fps")
    fps = float(fps) if isinstance(fps, (int, float)) and fps > 0 else None
    modes = {im.mode for im in images}
    if len(modes) > 1 and has_alpha(images):
        opaque = next(files[i].name for i, im in zip(kept, images) if im.mode != "RGBA")
        raise PreprocessError(f"{folder}: some frames have alpha and some do not (e.g. {opaque}); give every "
                              f"frame the same kind (all RGBA cut-outs, or all RGB to be matted)")
    return Clip("sequence", str(folder), fps, kept, images, scale, orig, meta.get("matting"))


def _read_image(path: Path, sel: Selection, should_stop, progress: ProgressFn) -> Clip:
    im = _open_image(path)
    n = getattr(im, "n_frames", 1)
    if n > 1:  # animated GIF / APNG / WebP: a clip; fps from the first frame's duration
        kept = sel.indices(n, str(path))
        duration = im.info.get("duration") or 0
        fps = 1000.0 / duration if duration else None
        images, scale, orig = [], 1.0, (0, 0)
        for k, i in enumerate(kept):
            _check_stop(should_stop)
            im.seek(i)  # frames are decoded in order; seek replays the ones in between
            fr = im.copy()
            fr = to_rgb_or_rgba(fr, f"{path} frame {i}")
            orig = fr.size
            fr, scale = _limit_size(fr)
            images.append(fr)
            progress({"phase": "decode", "step": k + 1, "total": len(kept), "message": f"reading frame {i}"})
        return Clip("sequence", str(path), fps, kept, images, scale, orig)
    sel.indices(1, str(path))  # start/end out of range for a single image
    im = to_rgb_or_rgba(ImageOps.exif_transpose(im), str(path))
    orig = im.size
    im, scale = _limit_size(im)
    progress({"phase": "decode", "step": 1, "total": 1, "message": f"reading {path.name}"})
    return Clip("image", str(path), None, [0], [im], scale, orig)


def _is_video_file(path: Path) -> bool:
    if path.suffix.lower() in VIDEO_EXTS:
        return True
    from ..media import sniff_file

    found = sniff_file(path)
    return found is not None and found[0] == "video"


def read_clip(path: str | Path, sel: Selection, should_stop=None, progress: ProgressFn | None = None) -> Clip:
    """Decode the kept frames of a video file, a folder of images or an image file (RGB or RGBA PIL images)."""
    progress = progress or (lambda s: None)
    path = Path(path).expanduser()
    if path.is_dir():
        clip = _read_sequence(path, sel, should_stop, progress)
    elif path.is_file():
        if path.stat().st_size == 0:
            raise PreprocessError(f"{path}: the file is empty")
        if _is_video_file(path):
            clip = _read_video(path, sel, should_stop, progress)
        else:
            clip = _read_image(path, sel, should_stop, progress)
    else:
        raise PreprocessError(f"{path}: no such file or folder")
    clip.images = [to_rgb_or_rgba(im, clip.source) for im in clip.images]
    return clip


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
