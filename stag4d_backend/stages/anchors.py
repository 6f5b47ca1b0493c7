"""Stage "anchors": six Zero123++ v1.1 views per frame with STAG4D's first-frame attention fusion (docs/anchors.md).

Reads  frames/ref/{f}_rgba.png             f = 0..F-1
Writes frames/zero123/{f}_rgba/{k}.png     k = 0..5, RGBA, one folder per frame replaced atomically

Resumable per frame: finished frames are skipped. In the default lockstep mode frame 0 is denoised beside every
batch of later frames, so a later frame never needs anything from an earlier run.

Options (all optional): model_path (or zero123plus_model_path: the request's options are shared by all
stages), matting_model_path, device, dtype, steps (75), guidance_scale (4.0), seed (42; every frame
starts from the same noise, as the authors do), per_frame_noise (False), fusion ("lockstep" | "stored" |
"off"), mid_block_quirk (True = faithful), batch (later frames per batch), tile (px, default 320: the official
640x960 grid), tile_matting ("auto" | "grey" | "model"), grey_threshold. ``run`` stops at a denoising step when
its ``should_stop()`` is true (JobStopped).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..atomic import atomic_dir, remove_stale_temps
from ..device import resolve_device
from ..job import JobStopped

NUM_VIEWS = 6
FUSION_MODES = ("lockstep", "stored", "off")
MATTING_CHOICES = ("auto", "grey", "model")
DEFAULTS = dict(model_path=None, device=None, dtype=None, steps=75, guidance_scale=4.0, seed=42,
                per_frame_noise=False, fusion="lockstep", mid_block_quirk=True, batch=None, tile=None,
                tile_matting="auto", grey_threshold=None)


def _options(options: dict | None) -> dict:
    opts = dict(DEFAULTS)
    opts.update({k: v for k, v in (options or {}).items() if v is not None})
    if opts["fusion"] not in FUSION_MODES:
        raise ValueError(f"fusion={opts['fusion']!r}; expected one of {', '.join(FUSION_MODES)}")
    if opts["tile_matting"] not in MATTING_CHOICES:
        raise ValueError(f"tile_matting={opts['tile_matting']!r}; expected one of {', '.join(MATTING_CHOICES)}")
    if int(opts["steps"]) < 1:
        raise ValueError("steps must be at least 1")
    return opts


def _zero_dir(job) -> Path:
    return Path(job.frames_dir) / "zero123"


def frame_done(zero_dir: Path, f: int) -> bool:
    d = zero_dir / f"{f}_rgba"
    return all((d / f"{k}.png").is_file() for k in range(NUM_VIEWS))


def _ref_frames(job) -> list[Path]:
    from ..dataset import list_ref_frames

    return list_ref_frames(job.frames_dir)


def is_done(job, options: dict | None = None) -> bool:
    try:
        n = len(_ref_frames(job))
    except ValueError:  # DataError: no input frames yet; run() says what is wrong
        return False
    zero = _zero_dir(job)
    return all(frame_done(zero, f) for f in range(n))


# -- matting of the generated tiles ------------------------------------------------------------------------

def matte_grey(tile: Image.Image, threshold: float | None = None) -> Image.Image:
    """Cut the object out of a Zero123++ tile by its uniform grey background: colour distance to the border's
    median colour, a 3x3 opening against speckle, the largest connected component, enclosed holes filled.
    Alpha is 255 inside and 0 outside (the authors write 1 outside, a bug)."""
    from scipy import ndimage

    rgb = np.asarray(tile.convert("RGB"), dtype=np.int16)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.abs(rgb - bg).max(axis=-1)
    if threshold is None:
        # a few grey levels of tolerance, more when the background itself is noisy (early/low-step samples)
        b = np.abs(border - bg).max(axis=-1)
        threshold = max(8.0, 3.0 * float(np.percentile(b, 90)))
    fg = ndimage.binary_opening(dist > threshold, structure=np.ones((3, 3), bool))
    labels, n = ndimage.label(fg)
    if n == 0:
        mask = np.zeros(fg.shape, bool)
    else:
        sizes = ndimage.sum_labels(fg, labels, index=np.arange(1, n + 1))
        mask = ndimage.binary_fill_holes(labels == (1 + int(np.argmax(sizes))))
    alpha = mask.astype(np.uint8) * 255
    return Image.fromarray(np.dstack([rgb.astype(np.uint8), alpha]), "RGBA")


def tile_matter(choice: str, threshold: float | None = None, device="auto",
                local_path=None) -> tuple[Callable[[list], list], str]:
    """(function list[RGB tile] -> list[RGBA tile], name). "auto" uses the matting model (models/matting.py)
    when it can run here and the grey-background matting otherwise; "model" insists on the model and fails
    before any sampling (MissingWeightsError / ModelLoadError)."""
    grey = (lambda tiles: [matte_grey(t, threshold) for t in tiles]), "grey"
    if choice == "grey":
        return grey
    from ..models import matting

    if choice == "auto" and not matting.is_available(local_path):
        return grey
    matting.load(local_path, device)  # cached; fail now rather than after the first batch
    return (lambda tiles: matting.matte(tiles, device=device, local_path=local_path)), "model"


# -- the stage -----------------------------------------------------------------------------------------------

def run(job, options: dict | None, progress: Callable[[dict], None] | None = None, should_stop=None) -> dict:
    """Generate the missing frames' anchor views; returns a summary dict."""
    import torch

    from ..models.zero123plus import Zero123PlusSampler, generate_grids, load_zero123plus, \
        split_grid

    opts = _options(options)
    progress = progress or (lambda stats: None)
    refs = _ref_frames(job)
    num = len(refs)
    zero = _zero_dir(job)
    remove_stale_temps(zero)
    todo = [f for f in range(num) if not frame_done(zero, f)]
    if not todo:
        return {"frames": num, "generated": 0}

    device = str(resolve_device(opts["device"]))
    model = load_zero123plus(opts.get("zero123plus_model_path") or opts["model_path"], device=device,
                             dtype=opts["dtype"], tile=opts["tile"])
    matter, matting_used = tile_matter(opts["tile_matting"], opts["grey_threshold"], device,
                                       opts.get("matting_model_path"))
    sampler = Zero123PlusSampler(model)
    batch = int(opts["batch"] or (4 if torch.device(device).type == "cuda" else 1))
    steps = int(opts["steps"])

    needed = sorted(set(todo) | ({0} if opts["fusion"] != "off" else set()))
    images = {}
    for f in needed:
        with Image.open(refs[f]) as im:
            images[f] = im.convert("RGBA")

    done = num - len(todo)
    state = {"batch_t0": time.perf_counter(), "steps": 0, "seconds": 0.0}

    def on_step(frames, i, n):
        progress({"step": i, "total": n, "frame": next((f for f in frames if f != 0), 0),
                  "frames": list(frames), "done_frames": done, "num_frames": num})

    def step_timer(frames, i, n):
        now = time.perf_counter()
        state["seconds"] += now - state["batch_t0"]
        state["steps"] += 1
        state["batch_t0"] = now
        on_step(frames, i, n)

    contexts = []
    written = []
    t0 = time.perf_counter()
    grids = generate_grids(sampler, images, todo, mode=opts["fusion"], batch=batch, steps=steps,
                           guidance_scale=float(opts["guidance_scale"]), seed=int(opts["seed"]),
                           per_frame_noise=bool(opts["per_frame_noise"]),
                           mid_block_quirk=bool(opts["mid_block_quirk"]), tile=opts["tile"],
                           on_step=step_timer, should_stop=should_stop, contexts=contexts)
    try:
        for f, grid in grids:
            rgba = matter(split_grid(grid))
            with atomic_dir(zero / f"{f}_rgba") as tmp:
                for k, view in enumerate(rgba):
                    view.save(tmp / f"{k}.png")
            written.append(f)
            done += 1
            progress({"step": steps, "total": steps, "frame": f, "frames": [f], "done_frames": done,
                      "num_frames": num, "written": str((zero / f"{f}_rgba").relative_to(job.frames_dir))})
            state["batch_t0"] = time.perf_counter()  # decoding/matting/writing are not denoising steps
    except JobStopped as exc:
        raise JobStopped(f"anchors cancelled ({len(written)} frames written; {exc})") from None

    stored = max((c.stored_bytes() for c in contexts), default=0)
    return {"frames": num, "generated": len(written), "fusion": opts["fusion"], "steps": steps,
            "batch": batch, "tile_matting": matting_used, "device": str(device),
            "grid_size": list(grid.size) if written else None,
            "seconds": round(time.perf_counter() - t0, 2),
            "seconds_per_step": round(state["seconds"] / max(1, state["steps"]), 4),
            "stored_bytes": stored}


__all__ = ["run", "is_done", "matte_grey", "tile_matter", "frame_done", "DEFAULTS"]
