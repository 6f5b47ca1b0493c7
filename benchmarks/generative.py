"""Benchmark of the generative stages: preprocess, Zero123++ anchors (fusion off / stored / lockstep), Zero123-XL
SDS and the video stage (SVD img2vid, SDXL-Turbo). No weights are needed: the models are the tests' random-weight
stand-ins, saved in the real folder layouts and loaded through the stages' own loaders, so the figures measure the
code paths and the token counts, not the real models' FLOPs (except ``--full``, which builds the full-size
Zero123-XL architecture with random weights).

Cases (each in its own subprocess, one after the other):

* ``preprocess``: the 32 minions frames (``../shared/data/minions``, 720x720 RGBA; skipped with a message when
  absent) -> 512 px, and a synthetic 1080p RGB clip (``--video-frames`` 60 frames, H.264, an object on a uniform
  backdrop) with ``matting="color-key"``. The whole ``preprocess.run`` is timed (decode, matte, crop, PNG write);
  the split comes from the stage's progress events.
* ``anchors``: ``generate_grids`` (latents only, no VAE decode) with fusion off / stored / lockstep on (a) the tiny Zero123++ of
  tests/test_zero123pp_fusion.py (32 px tiles, latent 24x16, 16 attn1) and (b) the same tiny channels with the
  FULL-SIZE token counts: an 8x VAE and 320 px condition/tiles, so the grid latent is 120x80 (640x960 grids) and
  the reference latent 40x40, as in docs/anchors.md. Seconds per denoising step (per UNet batch kind), the
  frame-passes, the bytes the stored mode keeps (``FusionContext.stored_bytes``, checked against
  ``store_bytes``), and the full-size fp16 store of the real model (``full_size_store_bytes``).
* ``sds``: one Zero123-XL SDS ``loss`` + ``backward`` on a 256 px render with the tiny random model (median
  over max(10, repeats) calls); with ``--full`` also the full-size architecture (860M-parameter UNet, CLIP
  ViT-L, SD VAE; 6-25 s per call depending on the machine's load; built once into ``--work``, 4.7 GB, in a
  process of its own), split into VAE encode / UNet CFG batch / backward.
* ``video``: the tiny SVD img2vid pipeline (``--svd-frames`` frames, ``--svd-steps`` steps at 64 px) and the
  tiny SDXL-Turbo (1 step at 64 px), called with the stage's arguments; plus one whole ``video.run`` (image kind:
  load, cut-out, SVD, PNG write).

Timing: wall clock, median and min over ``--repeats`` timed runs after one warm-up run (no warm-up for the
full-token anchors and the 1080p clip: too expensive; their per-step medians are over the steps they have). ``torch.set_num_threads(--threads)`` in every worker (default 2; preprocess is numpy /
Pillow / scipy and does not use torch threads).

Memory: in each worker, after the model is loaded (or the input is ready), ``gc.collect()``, then the current
RSS (``VmRSS``) is read and the kernel's peak-RSS mark is reset (``/proc/self/clear_refs`` = 5); after the
warm-up and the timed runs ``VmHWM`` is the peak. "peak rise" = that peak minus the RSS of the loaded model
(what the work itself needs: activations, stored tokens, decoded frames); "process peak" = the largest RSS the
process had at any time (model building and loading included). Where ``clear_refs`` cannot be written (not Linux), the
rise is ``ru_maxrss`` after minus before, which only shows a rise above the loading peak.

    .venv/bin/python benchmarks/generative.py                        # default, ~4-5 min on the shared 2-core VM
    .venv/bin/python benchmarks/generative.py --only anchors --json benchmarks/out/generative.json
    .venv/bin/python benchmarks/generative.py --full --work /tmp/genbench   # + full-size SDS (keeps the model)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MINIONS = REPO.parent / "shared" / "data" / "minions"
GROUPS = ("preprocess", "anchors", "sds", "video")


# ------------------------------------------------------------------------------------------ memory helpers

def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_kib() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux


class PeakMeter:
    """Peak RSS of a code region: reset the kernel's high-water mark at start(), read it at stop()."""

    def __init__(self):
        self.process_peak_kib = 0
        self.method = ""

    def start(self) -> None:
        gc.collect()
        self.process_peak_kib = max(self.process_peak_kib, _status_kib("VmHWM") or 0, _maxrss_kib())
        self.base_kib = _status_kib("VmRSS") or _maxrss_kib()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.method = "VmHWM reset"
        except OSError:
            self.base_kib = _maxrss_kib()
            self.method = "ru_maxrss delta"

    def stop(self) -> dict:
        peak = _status_kib("VmHWM") if self.method == "VmHWM reset" else _maxrss_kib()
        self.process_peak_kib = max(self.process_peak_kib, peak or 0, _maxrss_kib())
        return {"rss_before_mb": self.base_kib / 1024, "peak_rise_mb": max(0, (peak or 0) - self.base_kib) / 1024,
                "process_peak_mb": self.process_peak_kib / 1024, "memory_method": self.method}


def _page_in(*modules) -> None:
    """Touch every weight: from_pretrained may leave safetensors memory-mapped, and pages faulted in by the
    first call would otherwise count as the work's memory instead of the loaded model's."""
    import torch

    with torch.no_grad():
        for m in modules:
            if m is None:
                continue
            for t in list(m.parameters()) + list(m.buffers()):
                if t.numel():
                    t.sum()


def _stats(values: list[float]) -> dict:
    return {"median_s": statistics.median(values), "min_s": min(values), "runs": len(values),
            "all_s": [round(v, 4) for v in values]}


def _setup_torch(threads: int):
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    return torch


def _tests_on_path() -> None:
    for p in (str(REPO), str(REPO / "tests")):
        if p not in sys.path:
            sys.path.insert(0, p)


# ------------------------------------------------------------------------------------------ preprocess

def write_1080p_clip(path: Path, frames: int, fps: int = 30) -> Path:
    """An object (body, head, a swinging arm) moving across a uniform backdrop, 1920x1080, H.264 yuv420p."""
    import av
    import numpy as np

    w, h = 1920, 1080
    bg = np.array((60, 140, 75), np.uint8)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    shade = ((xx / w * 80) + (yy / h * 60)).astype(np.uint8)[..., None]  # texture on the object
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"preset": "veryfast", "crf": "18"}
        for i in range(frames):
            t = i / max(1, frames - 1)
            cx, cy = 760 + 400 * t, 560 + 40 * math.sin(6.28 * t)
            a = np.empty((h, w, 3), np.uint8)
            a[:] = bg
            body = ((xx - cx) / 170) ** 2 + ((yy - cy) / 260) ** 2 <= 1
            head = (xx - cx) ** 2 + (yy - (cy - 330)) ** 2 <= 110 ** 2
            ang = 0.8 * math.sin(6.28 * 2 * t)
            ux, uy = math.sin(ang), -math.cos(ang)
            px, py = xx - (cx + 150), yy - (cy - 120)
            along = px * ux + py * uy
            arm = (along > 0) & (along < 260) & (np.abs(px * uy - py * ux) < 35)
            obj = body | head | arm
            a[obj] = (np.array((210, 90, 40), np.uint8) + shade)[obj]
            a[head] = (235, 200, 150)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _preprocess_worker(spec: dict) -> dict:
    sys.path.insert(0, str(REPO))
    from stag4d_backend.job import Job
    from stag4d_backend.stages import preprocess

    work = Path(spec["work"])
    out = {"case": spec["case"]}
    if spec["case"] == "preprocess-minions":
        src = Path(spec["minions"])
        if not (src / "ref").is_dir():
            return {**out, "skipped": f"minions data not found at {src}"}
        opts = {"input": str(src), "size": 512}
        n_src = len(list((src / "ref").glob("*_rgba.png")))
        from PIL import Image

        with Image.open(next((src / "ref").glob("*_rgba.png"))) as im:
            out["input"] = f"{n_src} frames {im.size[0]}x{im.size[1]} {im.mode} PNG"
    else:
        clip = work / f"synthetic_1080p_{spec['video_frames']}.mp4"
        if not clip.is_file():
            t0 = time.perf_counter()
            write_1080p_clip(clip, int(spec["video_frames"]))
            out["encode_s"] = time.perf_counter() - t0
        opts = {"input": str(clip), "size": 512, "matting": "color-key"}
        out["input"] = f"{spec['video_frames']} frames 1920x1080 RGB H.264 ({clip.stat().st_size / 1e3:.0f} kB)"

    def once(k: int):
        job = Job(work / f"{spec['case']}-job{k}")
        shutil.rmtree(job.path, ignore_errors=True)
        marks = {}
        t0 = time.perf_counter()
        res = preprocess.run(job, opts, lambda e: marks.__setitem__(e.get("phase"), time.perf_counter()))
        t1 = time.perf_counter()
        shutil.rmtree(job.path, ignore_errors=True)
        dec = marks.get("decode", t0)
        mat = marks.get("matte", dec)
        return t1 - t0, {"decode": dec - t0, "matte": mat - dec, "crop_write": t1 - mat}, res

    meter = PeakMeter()
    meter.start()
    if spec.get("warmup"):
        once(-1)
    runs = [once(k) for k in range(int(spec["repeats"]))]
    out.update(meter.stop())
    out.update(_stats([r[0] for r in runs]))
    out["phases_median_s"] = {p: statistics.median(r[1][p] for r in runs) for p in runs[0][1]}
    res = runs[-1][2]
    out["frames"] = res.get("frames") if isinstance(res, dict) else None
    return out


# ------------------------------------------------------------------------------------------ anchors

def build_full_token_zero123plus(tiny_dir: Path, root: Path) -> Path:
    """The tiny Zero123++ with an 8x VAE and 320 px condition/tiles: tiny channels, full-size token counts
    (grid latent 120x80, reference latent 40x40)."""
    import torch
    from diffusers import AutoencoderKL

    from stag4d_backend.models.zero123plus import _image_processor_class

    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(tiny_dir, tmp)
    shutil.rmtree(tmp / "vae")
    shutil.rmtree(tmp / "feature_extractor_vae")
    torch.manual_seed(1)
    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16, 16, 16), latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=4, sample_size=320).save_pretrained(tmp / "vae")
    _image_processor_class()(size={"shortest_edge": 320}, crop_size={"height": 320, "width": 320}, resample=3,
                             image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(tmp / "feature_extractor_vae")
    tmp.rename(root)
    return root


def _ensure_zero123plus(work: Path, which: str) -> tuple[Path, float]:
    _tests_on_path()
    from test_zero123pp_fusion import build_tiny_zero123plus

    tiny = work / "zero123plus-tiny"
    t0 = time.perf_counter()
    if not (tiny / "model_index.json").is_file():
        tmp = work / "zero123plus-tiny.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_zero123plus(tmp)
        tmp.rename(tiny)
    if which == "tiny":
        return tiny, time.perf_counter() - t0
    full = work / "zero123plus-full-tokens"
    if not (full / "model_index.json").is_file():
        build_full_token_zero123plus(tiny, full)
    return full, time.perf_counter() - t0


def _anchors_worker(spec: dict) -> dict:
    torch = _setup_torch(spec["threads"])
    _tests_on_path()
    from test_zero123pp_fusion import make_frame

    from stag4d_backend.guidance.zero123pp_fusion import attn1_names, attn1_sites, store_bytes
    from stag4d_backend.models.zero123plus import (Zero123PlusSampler, full_size_store_bytes, generate_grids,
                                                   load_zero123plus)

    work = Path(spec["work"])
    model_dir, build_s = _ensure_zero123plus(work, spec["model"])
    t0 = time.perf_counter()
    tile = 32 if spec["model"] == "tiny" else None   # the tiny model's 32 px tiles; full tokens: 320 (default)
    sampler = Zero123PlusSampler(load_zero123plus(model_dir, device="cpu", tile=tile))
    load_s = time.perf_counter() - t0
    m = sampler.model
    _page_in(m.unet, m.vae, m.text_encoder, m.vision_encoder)
    frames = {f: make_frame(f % 3) for f in range(int(spec["frames"]))}
    steps, mode, batch = int(spec["steps"]), spec["mode"], int(spec["batch"])

    log = []   # (ctx mode, frames in the UNet batch, seconds) per denoising step
    orig = sampler.sample

    def timed_sample(conds, seeds, ctx, *args):
        last = [time.perf_counter()]
        args = list(args) + [None] * (5 - len(args))   # steps, guidance_scale, tile, on_step, should_stop
        report = args[3]

        def on_step(i, n):
            now = time.perf_counter()
            log.append((ctx.mode, len(conds), now - last[0]))
            last[0] = now
            if report is not None:
                report(i, n)

        args[3] = on_step
        return orig(conds, seeds, ctx, *args)

    sampler.sample = timed_sample

    def once():
        ctxs = []
        del log[:]
        t = time.perf_counter()
        out = list(generate_grids(sampler, frames, list(frames), mode=mode, batch=batch, steps=steps, seed=7,
                                  decode=False, contexts=ctxs))
        wall = time.perf_counter() - t
        assert len(out) == len(frames)
        return wall, list(log), ctxs

    meter = PeakMeter()
    meter.start()
    if spec.get("warmup"):
        once()
    runs = [once() for _ in range(int(spec["repeats"]))]
    result = {"case": f"anchors-{spec['model']}-{mode}", "model": spec["model"], "mode": mode, "frames": len(frames),
              "steps": steps, "batch": batch, "build_s": build_s, "load_s": load_s, **meter.stop()}
    result.update(_stats([r[0] for r in runs]))
    # per UNet batch kind: record (frame 0 alone, stored mode), fuse / off (later frames), lockstep [0, k...]
    kinds: dict[str, list[float]] = {}
    for _, log_run, _ in runs:
        for m, n, dt in log_run:
            kinds.setdefault(f"{m} x{n}", []).append(dt)
    result["step_s"] = {k: {"median": statistics.median(v), "min": min(v), "n": len(v)} for k, v in kinds.items()}
    result["sampling_s"] = statistics.median(sum(dt for *_, dt in r[1]) for r in runs)
    ctxs = runs[-1][2]
    result["frame_passes"] = sum(n for _, n, _ in runs[-1][1]) // steps
    result["stored_bytes"] = max((c.stored_bytes() for c in ctxs), default=0)
    m = sampler.model
    h, w = sampler.latent_size()
    ref = m.tile_size // m.vae_scale_factor
    sites = attn1_sites(m.unet.config, (h, w), (ref, ref))
    result.update(latent=[h, w], ref_latent=[ref, ref], tile=m.tile_size, attn1=len(attn1_names(m.unet)),
                  unet_channels=list(m.unet.config.block_out_channels), sites=sites)
    rec = next((c for c in ctxs if c.mode == "record"), None)
    if rec is not None:
        result["stored_formula_bytes"] = store_bytes(rec.sites, steps, bytes_per_value=4)
        result["stored_per_step_bytes"] = result["stored_bytes"] / steps
    if spec["model"] == "full_tokens" and mode == "stored":
        result["full_size_fp16_75"] = {"authors_whole_H": full_size_store_bytes(whole_sequence=True),
                                       "ours_R_tokens": full_size_store_bytes(), "lockstep": 0}
    result["threads"] = torch.get_num_threads()
    return result


def lockstep_passes(frames: int, batch: int) -> int:
    """Frame-passes of lockstep (frame 0 recomputed beside every batch of later frames); stored needs F."""
    return frames - 1 + math.ceil((frames - 1) / batch) if frames > 1 else 1


# ------------------------------------------------------------------------------------------ SDS

def _ensure_zero123_xl(work: Path, tiny: bool) -> tuple[Path, float]:
    from stag4d_backend.models.zero123_xl import save_random_zero123

    folder = work / ("zero123-xl-tiny" if tiny else "zero123-xl-full")
    t0 = time.perf_counter()
    if not (folder / "model_index.json").is_file():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_random_zero123(tmp, tiny=tiny)
        tmp.rename(folder)
    return folder, time.perf_counter() - t0


def _build_worker(spec: dict) -> dict:
    """Build the full-size random Zero123-XL in a process of its own (its ~5 GB must not count as the SDS
    worker's memory)."""
    _setup_torch(spec["threads"])
    sys.path.insert(0, str(REPO))
    folder, build_s = _ensure_zero123_xl(Path(spec["work"]), tiny=False)
    return {"case": "build-zero123-xl-full", "build_s": build_s, "folder": str(folder)}


def _sds_worker(spec: dict) -> dict:
    torch = _setup_torch(spec["threads"])
    sys.path.insert(0, str(REPO))
    from stag4d_backend.guidance.base import INPUT_VIEW, SDSRequest
    from stag4d_backend.models.zero123_xl import load_zero123_sds

    tiny = spec["size"] == "tiny"
    folder, build_s = _ensure_zero123_xl(Path(spec["work"]), tiny)
    t0 = time.perf_counter()
    sds = load_zero123_sds("cpu", folder, seed=0)
    load_s = time.perf_counter() - t0
    _page_in(sds.unet, sds.vae, sds.image_encoder, sds.camera_projection)
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1, 256, 256, 3, generator=g)
    anchors = torch.rand(1, 6, 256, 256, 3, generator=g) if tiny else None
    t0 = time.perf_counter()
    sds.prepare(ref, anchors)
    prepare_s = time.perf_counter() - t0
    image = torch.rand(256, 256, 3, generator=g)
    request = SDSRequest(0, INPUT_VIEW, 10.0, 90.0)

    def once(step):
        x = image.clone().requires_grad_(True)
        t0 = time.perf_counter()
        z = sds.encode_render(x)            # == sds.loss(x, ...), split for the timing
        t1 = time.perf_counter()
        loss = sds.latent_loss(z, request, step)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        return t3 - t0, {"vae_encode": t1 - t0, "unet_cfg": t2 - t1, "backward": t3 - t2}

    meter = PeakMeter()
    calls = int(spec["calls"])
    meter.start()
    if spec.get("warmup"):
        once(1)
    runs = [once(1 + k) for k in range(calls)]
    out = {"case": f"sds-{spec['size']}", "build_s": build_s, "load_s": load_s, "prepare_s": prepare_s,
           "prepare_images": 7 if tiny else 1, "unet_params_m": sum(p.numel() for p in sds.unet.parameters()) / 1e6,
           **meter.stop(), **_stats([r[0] for r in runs])}
    out["parts_median_s"] = {p: statistics.median(r[1][p] for r in runs) for p in runs[0][1]}
    out["threads"] = torch.get_num_threads()
    return out


# ------------------------------------------------------------------------------------------ video stage

def _video_worker(spec: dict) -> dict:
    torch = _setup_torch(spec["threads"])
    _tests_on_path()
    import numpy as np
    from PIL import Image

    from stag4d_backend.stages import video

    work = Path(spec["work"])
    size = 64
    t0 = time.perf_counter()
    if spec["model"] == "svd":
        from test_video_stage import build_tiny_svd

        from stag4d_backend.models.video_models import load_svd

        folder = work / "svd-tiny"
        if not (folder / "model_index.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            build_tiny_svd(folder)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipe = load_svd(folder, device="cpu")
        load_s = time.perf_counter() - t0
        _page_in(pipe.unet, pipe.vae, pipe.image_encoder)
        yy, xx = np.mgrid[:60, :80]
        arr = np.zeros((60, 80, 4), np.uint8)
        arr[(xx - 34) ** 2 + (yy - 30) ** 2 <= 14 ** 2] = (200, 80, 40, 255)
        disc = work / "disc.png"
        Image.fromarray(arr, "RGBA").save(disc)
        cond = video.condition_image(Image.fromarray(arr, "RGBA"), size, 0.6)
        n, steps = int(spec["svd_frames"]), int(spec["svd_steps"])

        def once():
            t = time.perf_counter()
            out = pipe(cond, height=size, width=size, num_frames=n, num_inference_steps=steps,
                       min_guidance_scale=1.0, max_guidance_scale=3.0, fps=7, motion_bucket_id=127,
                       noise_aug_strength=0.02, decode_chunk_size=min(8, n),
                       generator=torch.Generator("cpu").manual_seed(0))
            assert len(out.frames[0]) == n
            return time.perf_counter() - t
        what = f"{n} frames, {steps} steps, {size} px"
    else:
        from test_video_stage import build_tiny_sdxl_turbo

        from stag4d_backend.models.video_models import load_sdxl_turbo

        folder = work / "sdxl-turbo-tiny"
        if not (folder / "model_index.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            build_tiny_sdxl_turbo(folder)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipe = load_sdxl_turbo(folder, device="cpu")
        load_s = time.perf_counter() - t0
        _page_in(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
        prompt = video.PROMPT_TEMPLATE.format(prompt="a dancing robot")

        def once():
            t = time.perf_counter()
            pipe(prompt=prompt, num_inference_steps=1, guidance_scale=0.0, height=size, width=size,
                 generator=torch.Generator("cpu").manual_seed(0)).images[0]
            return time.perf_counter() - t
        what = f"1 step, {size} px"

    meter = PeakMeter()
    meter.start()
    if spec.get("warmup"):
        once()
    times = [once() for _ in range(int(spec["repeats"]))]
    out = {"case": f"video-{spec['model']}", "what": what, "build_s": build_s, "load_s": load_s, **meter.stop(),
           **_stats(times), "threads": torch.get_num_threads()}
    if spec["model"] == "svd":
        # the whole stage once (loads the pipeline again, cuts out, runs SVD, writes the PNGs + frames.json)
        from stag4d_backend.job import Job

        pipe = None
        gc.collect()
        job = Job(work / "video-stage-job")
        shutil.rmtree(job.path, ignore_errors=True)
        t = time.perf_counter()
        video.run(job, {"kind": "image", "image": str(disc), "svd_model_path": str(folder), "device": "cpu",
                        "video_size": size, "video_frames": n, "video_steps": steps, "seed": 3})
        out["stage_run_s"] = time.perf_counter() - t
        shutil.rmtree(job.path, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------ driver

WORKERS = {"preprocess": _preprocess_worker, "anchors": _anchors_worker, "sds": _sds_worker,
           "video": _video_worker, "build": _build_worker}


def _run_case(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO), env=env)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timeout after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {**spec, "error": tail[:300]}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = wall
    return res


def _s(x: float | None) -> str:
    if x is None:
        return ""
    if x < 0.1:
        return f"{x * 1e3:.1f} ms"
    return f"{x:.2f} s" if x < 10 else f"{x:.1f} s"


def _mb(x: float | None) -> str:
    return "" if x is None else f"{x:.0f}"


def _fmt_bytes(b: float) -> str:
    return f"{b / 1e9:.2f} GB" if b >= 1e9 else f"{b / 1e6:.1f} MB"


def _built(build: dict) -> str:
    if "build_s" not in build:
        return ""
    if build["build_s"] < 1.0:
        return "; model reused from --work"
    return f"; model built in {_s(build['build_s'])} (separate process)"


def report(rows: list[dict], args) -> str:
    lines = [f"torch threads: {args.threads} (preprocess does not use torch); medians over --repeats "
             f"{args.repeats} timed runs after a warm-up unless noted; peak rise = peak RSS (warm-up + timed runs) "
             f"above the RSS of the loaded model, process peak = the worker's largest RSS incl. loading.", ""]
    by = {r.get("case"): r for r in rows}

    def err(r):
        return r.get("error") or r.get("skipped")

    # -- main table
    lines += ["| stage | case | timed | median | min | runs | peak rise (MB) | process peak (MB) | notes |",
              "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        case = r.get("case", "?")
        if case.startswith("build") and not err(r):
            continue
        if err(r):
            lines.append(f"| {case.split('-')[0]} | {case} | | | | | | | {err(r)} |")
            continue
        if case.startswith("preprocess"):
            ph = r["phases_median_s"]
            note = (f"{r['input']}; decode {_s(ph['decode'])}, matte {_s(ph['matte'])}, crop+write "
                    f"{_s(ph['crop_write'])}")
            if "encode_s" in r:
                note += f"; writing the clip took {_s(r['encode_s'])} (not timed)"
            timed = f"preprocess.run -> {r['frames']} x 512 px" + (" (no warm-up)" if "1080p" in case else "")
            lines.append(f"| preprocess | {case[11:]} | {timed} | {_s(r['median_s'])} | {_s(r['min_s'])} | "
                         f"{r['runs']} | {_mb(r['peak_rise_mb'])} | {_mb(r['process_peak_mb'])} | {note} |")
        elif case.startswith("anchors"):
            steps = "; ".join(f"{k}: {_s(v['median'])}" for k, v in r["step_s"].items())
            lines.append(f"| anchors | {r['model']} {r['mode']} | generate_grids, {r['frames']} frames x "
                         f"{r['steps']} steps, batch {r['batch']} | {_s(r['median_s'])} | {_s(r['min_s'])} | "
                         f"{r['runs']} | {_mb(r['peak_rise_mb'])} | {_mb(r['process_peak_mb'])} | per step: "
                         f"{steps} |")
        elif case.startswith("sds"):
            p = r["parts_median_s"]
            lines.append(f"| sds | {case[4:]} ({r['unet_params_m']:.1f}M UNet) | loss + backward, 256 px | "
                         f"{_s(r['median_s'])} | {_s(r['min_s'])} | {r['runs']} | {_mb(r['peak_rise_mb'])} | "
                         f"{_mb(r['process_peak_mb'])} | VAE encode {_s(p['vae_encode'])}, UNet CFG "
                         f"{_s(p['unet_cfg'])}, backward {_s(p['backward'])}; prepare ({r['prepare_images']} "
                         f"images) {_s(r['prepare_s'])}"
                         + (_built(by.get("build-zero123-xl-full", {})) if r["case"] == "sds-full" else "")
                         + " |")
        elif case.startswith("video"):
            note = f"load {_s(r['load_s'])}"
            if "stage_run_s" in r:
                note += f"; whole video.run (image kind, incl. load + PNG write) {_s(r['stage_run_s'])}"
            name = "SVD img2vid" if case.endswith("svd") else "SDXL-Turbo"
            lines.append(f"| video | tiny {name} | pipeline call, {r['what']} | {_s(r['median_s'])} | "
                         f"{_s(r['min_s'])} | {r['runs']} | {_mb(r['peak_rise_mb'])} | {_mb(r['process_peak_mb'])} "
                         f"| {note} |")

    # -- anchors detail
    an = [r for r in rows if r.get("case", "").startswith("anchors") and not err(r)]
    if an:
        lines += ["", "Anchors (Zero123++ sampling, fusion modes):", "",
                  "| model | latent (ref) | mode | UNet batches | s / denoising step (median) | frame-passes | "
                  "sampling s / run | stored | = store_bytes formula | peak rise (MB) |",
                  "|---|---|---|---|---|---:|---:|---:|---|---:|"]
        for r in an:
            model = (f"tiny (tile {r['tile']}, {r['attn1']} attn1, ch {r['unet_channels'][0]}-"
                     f"{r['unet_channels'][-1]})" if r["model"] == "tiny" else
                     f"tiny channels, full tokens (tile {r['tile']}, {r['attn1']} attn1)")
            batches = ", ".join(f"{k.split(' ')[0]} {k.split(' ')[1]}" for k in r["step_s"])
            steps = "; ".join(f"{_s(v['median'])} ({k})" for k, v in r["step_s"].items())
            stored = _fmt_bytes(r["stored_bytes"]) if r["stored_bytes"] else "0"
            formula = ""
            if "stored_formula_bytes" in r:
                formula = ("yes" if r["stored_formula_bytes"] == r["stored_bytes"] else
                           f"no ({_fmt_bytes(r['stored_formula_bytes'])})")
                formula += f"; {_fmt_bytes(r['stored_per_step_bytes'])} per step"
            lines.append(f"| {model} | {r['latent'][0]}x{r['latent'][1]} ({r['ref_latent'][0]}x"
                         f"{r['ref_latent'][1]}) | {r['mode']} | {batches} | {steps} | {r['frame_passes']} | "
                         f"{_s(r['sampling_s'])} | {stored} | {formula} | {_mb(r['peak_rise_mb'])} |")
        fs = next((r["full_size_fp16_75"] for r in an if "full_size_fp16_75" in r), None)
        if fs:
            lines += ["", "Stored-mode host memory of the real model (SD2 UNet shapes, 640x960 grids, fp16, 2 CFG "
                      "branches, 75 steps; `full_size_store_bytes`): "
                      f"authors (all of H) {_fmt_bytes(fs['authors_whole_H'])}, ours (R tokens) "
                      f"{_fmt_bytes(fs['ours_R_tokens'])}, lockstep 0."]
        lines += ["", "Lockstep compute overhead: frame 0 is recomputed beside every batch, so F frames with B later "
                  "frames per batch cost F - 1 + ceil((F - 1) / B) frame-passes against F for stored/off: "
                  + ", ".join(f"F={f}, B={b}: {lockstep_passes(f, b)} vs {f} "
                              f"(+{100 * (lockstep_passes(f, b) / f - 1):.0f}%)"
                              for f, b in ((30, 1), (30, 4), (3, args.batch), (2, args.batch))) + "."]
        for model in ("tiny", "full_tokens"):
            st, lk = by.get(f"anchors-{model}-stored"), by.get(f"anchors-{model}-lockstep")
            if st and lk and not err(st) and not err(lk):
                lines.append(f"Measured ({model}): lockstep / stored sampling time = "
                             f"{lk['sampling_s'] / st['sampling_s']:.2f} "
                             f"({lk['frame_passes']} vs {st['frame_passes']} frame-passes).")
    return "\n".join(lines)


def plan(args) -> list[dict]:
    only = set(args.only.split(",")) if args.only else set(GROUPS)
    base = {"work": args.work_dir, "threads": args.threads, "repeats": args.repeats}
    cases = []
    if "preprocess" in only:
        cases.append({**base, "group": "preprocess", "case": "preprocess-minions", "minions": args.minions,
                      "warmup": True})
        cases.append({**base, "group": "preprocess", "case": "preprocess-1080p-color-key",
                      "video_frames": args.video_frames, "warmup": False})
    if "anchors" in only:
        for mode in ("off", "stored", "lockstep"):
            cases.append({**base, "group": "anchors", "model": "tiny", "mode": mode, "frames": 3, "steps": args.steps,
                          "batch": args.batch, "warmup": True})
        if args.full_token_steps > 0:
            for mode in ("off", "stored", "lockstep"):
                cases.append({**base, "group": "anchors", "model": "full_tokens", "mode": mode, "frames": 2,
                              "steps": args.full_token_steps, "batch": args.batch, "repeats": 1, "warmup": False})
    if "sds" in only:
        cases.append({**base, "group": "sds", "size": "tiny", "calls": max(10, args.repeats), "warmup": True})
        if args.full:
            cases.append({**base, "group": "build", "case": "build-zero123-xl-full"})
            cases.append({**base, "group": "sds", "size": "full", "calls": args.full_sds_calls or args.repeats,
                          "warmup": True})
    if "video" in only:
        for model in ("svd", "sdxl"):
            cases.append({**base, "group": "video", "model": model, "svd_frames": args.svd_frames,
                          "svd_steps": args.svd_steps, "warmup": True})
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per case (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker")
    ap.add_argument("--only", default="", help=f"comma separated subset of {','.join(GROUPS)}")
    ap.add_argument("--minions", default=str(MINIONS), help="STAG4D-layout folder with ref/{f}_rgba.png")
    ap.add_argument("--video-frames", type=int, default=60, help="frames of the synthetic 1080p clip")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps, tiny Zero123++ (3 frames)")
    ap.add_argument("--full-token-steps", type=int, default=2,
                    help="denoising steps of the full-token Zero123++ case (2 frames, one run; 0 = skip)")
    ap.add_argument("--batch", type=int, default=1, help="later frames per batch (the anchors stage's CPU default)")
    ap.add_argument("--svd-frames", type=int, default=4)
    ap.add_argument("--svd-steps", type=int, default=2)
    ap.add_argument("--full", action="store_true",
                    help="also SDS calls of the full-size Zero123-XL architecture (random weights; builds "
                         "4.7 GB in --work the first time, in a process of its own)")
    ap.add_argument("--full-sds-calls", type=int, default=0,
                    help="timed full-size SDS calls after a warm-up call (0 = --repeats)")
    ap.add_argument("--work", default="", help="folder for the models and clips (kept, reused); default: a "
                                               "temporary folder removed at the end")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    ap.add_argument("--json", default="", help="write the results to this JSON file")
    ap.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._worker:
        spec = json.loads(args._worker)
        print(json.dumps(WORKERS[spec["group"]](spec)))
        return 0

    temp = not args.work
    args.work_dir = args.work or tempfile.mkdtemp(prefix="stag4d-genbench-")
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    rows = []
    try:
        for spec in plan(args):
            label = spec.get("case") or "-".join(str(spec[k]) for k in ("group", "model", "size", "mode") if k in spec)
            print(f"running {label} ...", file=sys.stderr, flush=True)
            r = _run_case(spec, args.timeout)
            r.setdefault("case", label)
            rows.append(r)
            if "error" in r:
                print(f"  {label}: {r['error']}", file=sys.stderr, flush=True)
    finally:
        if temp:
            shutil.rmtree(args.work_dir, ignore_errors=True)
    load1 = os.getloadavg()
    total = time.perf_counter() - t0
    text = report(rows, args)
    text += (f"\n\nTotal wall time {total:.0f} s; load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the "
             f"end (1-min; {os.cpu_count()} CPUs).")
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"cpu_count": os.cpu_count(), "threads": args.threads,
                                               "repeats": args.repeats, "loadavg_start": load0,
                                               "loadavg_end": load1, "total_s": total, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
