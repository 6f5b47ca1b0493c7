"""Decoding an input clip: a video file (PyAV, else imageio), a folder of images or one image -> the kept frames
as PIL images, with the source's fps and size. ``Selection`` says which source frames are kept."""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image, ImageOps

from ..job import check_stop
from .image import MediaError, has_alpha, to_rgb_or_rgba
from .sniff import sniff_file

ProgressFn = Callable[[dict], None]

MAX_SIDE = 2048                  # larger decoded frames are downscaled first (memory; the output is ~512)
MAX_FRAMES = 1000                # a guard against keeping a whole feature film in memory
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
VIDEO_EXTS = {".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi"}
VIDEO_META = "frames.json"       # the video stage's record next to its frames (fps, matting)


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
                raise MediaError(f"{key} is required")
            if v in allow:
                return v
            try:
                iv = int(v)
                if iv != float(v):
                    raise ValueError
            except (TypeError, ValueError):
                raise MediaError(f"{key}={v!r}: expected a whole number >= {minimum}") from None
            if iv < minimum:
                raise MediaError(f"{key}={iv}: must be >= {minimum}")
            return iv

        start = as_int("start", 0) or 0
        end = as_int("end", 1)
        stride = as_int("stride", 1, allow=("auto",)) or 1
        frames = as_int("frames", 1)
        if end is not None and end <= start:
            raise MediaError(f"end={end} must be greater than start={start} (end is exclusive)")
        if stride == "auto" and frames is None:
            raise MediaError("stride='auto' needs frames=N (the number of frames to spread over the clip)")
        return Selection(start, end, stride, frames)

    def indices(self, count: int, source: str) -> list[int]:
        """The kept source indices for a clip of ``count`` frames (MediaError when none remain)."""
        end = count if self.end is None else min(self.end, count)
        if self.start >= count:
            raise MediaError(f"{source}: start={self.start} is past the last frame (the input has {count} "
                                  f"frame{'s' if count != 1 else ''}, 0..{count - 1})")
        stride = self.stride
        if stride == "auto":
            stride = max(1, math.ceil((end - self.start) / self.frames))
        kept = list(range(self.start, end, stride))
        if self.frames is not None:
            kept = kept[:self.frames]
        if len(kept) > MAX_FRAMES:
            raise MediaError(f"{source}: {len(kept)} frames selected; at most {MAX_FRAMES} are supported: "
                                  f"use --stride, --frames or --end to keep fewer")
        return kept

    def effective_stride(self, kept: list[int]) -> int:
        if self.stride != "auto":
            return int(self.stride)
        return kept[1] - kept[0] if len(kept) > 1 else 1


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
        raise MediaError(f"{path}: cannot be read as an image ({exc}); replace it with a valid PNG or "
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

    def corrupt(exc: Exception) -> MediaError:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        return MediaError(f"{path}: the video is corrupt or truncated (decoding failed after {decoded} frames: "
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
                raise MediaError(f"{path}: more than {MAX_FRAMES} frames selected; use --stride, --frames "
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
            raise MediaError(f"{path}: no frames could be decoded (empty or corrupt video); re-export it or "
                                  f"give an image sequence")
        raise MediaError(f"{path}: start={sel.start} is past the last frame (the input has {decoded} frames, "
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
            raise MediaError(f"{path}: has no video stream; give a video (mp4, mov, webm) or images")
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
                raise MediaError(f"{path}: the video is corrupt ({exc}); re-export it") from None
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
        raise MediaError(f"{path}: cannot be read as a video ({reason}); give an mp4/mov/webm video, an "
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
            raise MediaError(f"{folder / VIDEO_META}: unreadable ({exc}); delete it or regenerate the "
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
        raise MediaError(f"{folder}: no images found (png, jpg, webp, bmp, tiff); put the frames there "
                              f"as 0000.png, 0001.png, ...")
    kept = sel.indices(len(files), str(folder))
    images, size, scale, orig = [], None, 1.0, (0, 0)
    for n, i in enumerate(kept):
        _check_stop(should_stop)
        p = files[i]
        if not p.is_file():
            raise MediaError(f"{p}: listed in {VIDEO_META} but missing; regenerate the video")
        im = to_rgb_or_rgba(ImageOps.exif_transpose(_open_image(p)), str(p))
        if size is None:
            size = im.size
        elif im.size != size:
            raise MediaError(f"{p}: {im.size[0]}x{im.size[1]} differs from the first frame's "
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
        raise MediaError(f"{folder}: some frames have alpha and some do not (e.g. {opaque}); give every "
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
            raise MediaError(f"{path}: the file is empty")
        if _is_video_file(path):
            clip = _read_video(path, sel, should_stop, progress)
        else:
            clip = _read_image(path, sel, should_stop, progress)
    else:
        raise MediaError(f"{path}: no such file or folder")
    clip.images = [to_rgb_or_rgba(im, clip.source) for im in clip.images]
    return clip


__all__ = ["Selection", "Clip", "read_clip", "MAX_FRAMES", "MAX_SIDE", "IMAGE_EXTS", "VIDEO_EXTS"]
