"""One GPU check, prepared on the CPU and run on a GPU machine in one go: every figure a user needs.

    python3 benchmarks/gpu_check.py OUT_DIR                  # on a CUDA machine: real sizes, <= 8 min
    .venv/bin/python benchmarks/gpu_check.py OUT_DIR --cpu-dry-run   # tiny sizes on the CPU (~30 s; the suite runs it)

Steps (each in a process of its own with a time box; a failure or a timeout is recorded with its message and the
script goes on; the whole run is also capped by ``--budget-s``):

1. ``environment``: torch / CUDA / driver, GPU name and memory, nvcc, gsplat's version and whether its CUDA code
   builds here (gsplat JIT-builds on first use; where it cannot, the fits use the PyTorch rasteriser on CUDA).
2. ``cuda_tests``: the suite's ``-m cuda`` tests (gsplat vs the CPU rasteriser, gradients) in a pytest subprocess.
3. ``rasterizer``: forward + backward of 20k / 100k / 500k Gaussians at 256 / 512 / 1024 px, gsplat and the
   PyTorch path on CUDA (scene of benchmarks/rasterizer.py; median of ``repeats`` after a warm-up).
4. ``zero123plus``: Zero123++ v1.1 at full size with random weights (``FULL_SIZE_CONFIG`` in
   models/zero123plus.py: SD2 UNet, ViT-H encoders), fp16, 2 frames x 4 steps with the first-frame fusion,
   lockstep and stored: seconds per denoising step, peak VRAM, and which SDPA kernel ran (profiler; "n/a" on CPU).
5. ``zero123_xl_sds``: one Zero123-XL SDS loss + backward at full size (random weights), fp16: seconds, peak VRAM.
6. ``fit``: the ``standard`` fit with SDS (full-size random Zero123-XL) on the example scene, its whole schedule
   compressed into a few hundred steps (``FitConfig.with_iters``), then ``paper`` likewise if the box allows:
   seconds per step, peak VRAM, and the minutes per asset extrapolated to each preset's own iteration count.
7. ``bake``: 50k Gaussians x 30 frames (the standard field): the bake (USD + PLY; the bake stage evaluates on
   the CPU) and the deformation evaluated for the 30 frames on the device.

Outputs: ``OUT_DIR/gpu_check.json`` (every step: status, seconds, figures or error) and ``OUT_DIR/gpu_check.md``
(the tables to paste into docs/benchmarks.md), also printed. ``--cpu-dry-run`` runs the same steps at tiny sizes
on the CPU: the suite's tests/test_gpu_check.py runs it so the script cannot rot. See docs/benchmarks.md
("GPU check") for how to run it on a lent GPU machine (which packages to carry).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("environment", "cuda_tests", "rasterizer", "zero123plus", "zero123_xl_sds", "fit", "bake")

# Time box per step in seconds (GPU run; the dry run uses DRY_BOX). gsplat's first JIT build is the long pole.
# Sized from the first H200 run (2026-12-04): environment 81 s (gsplat's JIT build 69 s), cuda_tests 77 s, the
# rasteriser table ~65 s, zero123plus 34 s, SDS 25 s, fit 154 s (model builds + 300 + 150 steps), bake 9 s: 445 s.
GPU_BOX = {"environment": 120, "cuda_tests": 110, "rasterizer": 65, "zero123plus": 50, "zero123_xl_sds": 35,
           "fit": 180, "bake": 30}
DRY_BOX = {"environment": 60, "cuda_tests": 60, "rasterizer": 60, "zero123plus": 90, "zero123_xl_sds": 60,
           "fit": 90, "bake": 60}

GPU_SIZES = {
    "raster_counts": [20_000, 100_000, 500_000], "raster_sizes": [256, 512, 1024], "raster_repeats": 5,
    "z123pp": "full", "z123pp_frames": 2, "z123pp_steps": 4, "z123pp_dtype": "float16",
    "sds": "full", "sds_calls": 5, "sds_px": 256,
    "fit_frames": 8, "fit_size": 512, "fit_anchor_size": 256, "fit_iters": {"standard": 300, "paper": 150},
    "fit_tiny_field": False,
    "bake_gaussians": 50_000, "bake_frames": 30, "bake_field": "full",
}
DRY_SIZES = {
    "raster_counts": [300, 1000], "raster_sizes": [32, 48], "raster_repeats": 2,
    "z123pp": "tiny", "z123pp_frames": 2, "z123pp_steps": 2, "z123pp_dtype": "float32",
    "sds": "tiny", "sds_calls": 2, "sds_px": 64,
    "fit_frames": 2, "fit_size": 32, "fit_anchor_size": 32, "fit_iters": {"standard": 4, "paper": 2},
    "fit_tiny_field": True,
    "bake_gaussians": 2000, "bake_frames": 4, "bake_field": "preview",
}


# ------------------------------------------------------------------------------------------ helpers

def _paths() -> None:
    for p in (str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")):
        if p not in sys.path:
            sys.path.insert(0, p)


def _device(spec):
    import torch

    return torch.device("cuda" if spec["gpu"] else "cpu")


class Memory:
    """Peak memory of a region: CUDA's allocator peak on a GPU, the process's RSS rise on the CPU."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"
        if not self.cuda:
            from generative import PeakMeter

            self.meter = PeakMeter()

    def start(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            self.meter.start()

    def stop(self) -> dict:
        if self.cuda:
            self.torch.cuda.synchronize()
            return {"peak_vram_mb": self.torch.cuda.max_memory_allocated() / 2**20,
                    "peak_vram_reserved_mb": self.torch.cuda.max_memory_reserved() / 2**20}
        m = self.meter.stop()
        return {"peak_rss_rise_mb": m["peak_rise_mb"]}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


_RESULT_PATH: Path | None = None


def save_partial(figures: dict) -> None:
    """Write what a step has so far: if its time box ends it, the driver still records these figures."""
    if _RESULT_PATH is not None:
        _RESULT_PATH.write_text(json.dumps({"figures": figures, "partial": True}, default=str))


def _median(xs):
    return statistics.median(xs) if xs else None


# ------------------------------------------------------------------------------------------ 1. environment

def step_environment(spec: dict) -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(), "nvcc": shutil.which("nvcc")}
    try:
        import diffusers
        import transformers

        out.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    except ImportError as exc:
        out["missing"] = str(exc)
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        out["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        out["driver"] = q.stdout.split(",")[1].strip() if q.stdout.count(",") >= 2 else None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   compute_capability=f"{p.major}.{p.minor}",
                   multiprocessors=p.multi_processor_count)
    from stag4d_backend.doctor import gsplat_report
    from stag4d_backend.render.gsplat_backend import gsplat_status
    from stag4d_backend.render.rasterize import available_backends

    t0 = time.perf_counter()
    st = gsplat_status()                     # imports gsplat and loads / JIT-builds its CUDA code
    out.update(gsplat_usable=st.usable, gsplat_version=st.version, gsplat_reason=st.reason,
               gsplat_check_s=round(time.perf_counter() - t0, 1), doctor_gsplat=gsplat_report())
    # available_backends() may build the compiled CPU kernel (a minute on a fresh machine): not on the GPU's clock
    out["rasteriser_backends"] = available_backends() if not spec["gpu"] else None
    out["fit_rasteriser_on_cuda"] = "gsplat" if st.usable else ("torch (PyTorch rasteriser on CUDA)"
                                                                if torch.cuda.is_available() else "n/a (no CUDA)")
    return out


# ------------------------------------------------------------------------------------------ 2. CUDA tests

def step_cuda_tests(spec: dict) -> dict:
    import xml.etree.ElementTree as ET

    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if "pytest.mark.cuda" in p.read_text())
    junit = Path(spec["out_dir"]) / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rA", "-p", "no:cacheprovider",
           f"--junitxml={junit}", *files]
    r = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True, timeout=spec["box"] - 5)
    cases = []
    if junit.is_file():
        for tc in ET.parse(junit).getroot().iter("testcase"):
            tag = next((c.tag for c in tc if c.tag in ("failure", "error", "skipped")), "passed")
            kind = {"failure": "failed", "error": "errors"}.get(tag, tag)
            msg = next((c.get("message", "") for c in tc if c.tag in ("failure", "error", "skipped")), "")
            cases.append({"test": f"{tc.get('classname')}::{tc.get('name')}", "result": kind,
                          "seconds": float(tc.get("time", 0)), "message": msg[:300]})
    count = {k: sum(c["result"] == k for c in cases) for k in ("passed", "failed", "errors", "skipped")}
    out = {"files": files, "returncode": r.returncode, **count, "tests": cases,
           "summary": (r.stdout.strip().splitlines() or [""])[-1]}
    if count["failed"] or count["errors"] or r.returncode not in (0, 5):   # 5 = nothing collected
        out["error"] = f"{count['failed']} failed, {count['errors']} errors (pytest exit {r.returncode}): " \
                       + "; ".join(f"{c['test']}: {c['message']}" for c in cases if c["result"] in ("failed", "errors"))
    return out


# ------------------------------------------------------------------------------------------ 3. rasteriser

def step_rasterizer(spec: dict) -> dict:
    import torch

    from rasterizer import make_scene
    from stag4d_backend.render import rasterize
    from stag4d_backend.render.gsplat_backend import gsplat_status

    dev, sz = _device(spec), spec["sizes"]
    deadline = time.perf_counter() + spec["box"] - 10
    backends = ["gsplat", "torch"] if dev.type == "cuda" else ["gsplat", "torch", "cpp"]
    cases = []
    for backend in backends:
        for n in sz["raster_counts"]:
            for size in sz["raster_sizes"]:
                case = {"backend": backend, "gaussians": n, "size": size}
                cases.append(case)
                if backend == "gsplat" and not gsplat_status().usable:
                    case.update(status="unavailable", error=gsplat_status().reason)
                    continue
                if time.perf_counter() > deadline:
                    case.update(status="skipped", error="step time box reached")
                    continue
                try:
                    means, quats, scales, opac, colors, V, K = make_scene(n, size, 0, dev)
                    mem = Memory(dev)

                    def once():
                        leaves = [t.clone().requires_grad_(True) for t in (means, quats, scales, opac, colors)]
                        _sync(dev)
                        t0 = time.perf_counter()
                        res = rasterize(*leaves, V, K, size, size, [1.0, 1.0, 1.0], backend=backend)
                        _sync(dev)
                        t1 = time.perf_counter()
                        (res.rgb.sum() + res.alpha.sum() + res.depth.sum()).backward()
                        _sync(dev)
                        return t1 - t0, time.perf_counter() - t0, res.backend, int((res.radii > 0).sum())

                    mem.start()
                    once()
                    runs = [once() for _ in range(sz["raster_repeats"])]
                    case.update(status="ok", ran=runs[0][2], drawn=runs[0][3], **mem.stop(),
                                fwd_ms=_median([r[0] for r in runs]) * 1e3,
                                fwd_bwd_ms=_median([r[1] for r in runs]) * 1e3,
                                fwd_bwd_min_ms=min(r[1] for r in runs) * 1e3, runs=len(runs))
                except Exception as exc:  # noqa: BLE001 - recorded per case (OOM at 500k x 1024, say)
                    case.update(status="failed", error=f"{type(exc).__name__}: {str(exc)[:300]}")
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                save_partial({"device": str(dev), "cases": cases})
    out = {"device": str(dev), "cases": cases}
    bad = [c for c in cases if c["status"] == "failed"]
    if bad:
        out["error"] = f"{len(bad)} case(s) failed: " + "; ".join(f"{c['backend']} {c['gaussians']}x{c['size']}: "
                                                                  f"{c['error']}" for c in bad[:3])
    return out


# ------------------------------------------------------------------------------------------ 4. Zero123++

def _sdpa_ops(fn, device) -> list[str]:
    """The scaled-dot-product-attention kernels (aten ops) one call runs, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if "scaled_dot_product" in n or "flash" in n.lower() or "fmha" in n.lower()
                  or "efficient_attention" in n)


def _sdpa_kernel(ops: list[str], device) -> str:
    if device.type != "cuda":
        return "n/a (CPU)"
    for key, name in (("cudnn", "cuDNN attention"), ("_flash_attention", "flash attention"),
                      ("efficient_attention", "memory-efficient attention"), ("_math", "math (unfused)")):
        if any(key in o for o in ops):
            return name
    return "unknown: " + ", ".join(ops)


def step_zero123plus(spec: dict) -> dict:
    import torch
    from test_zero123pp_fusion import build_tiny_zero123plus, make_frame
    from transformers import CLIPTokenizer

    from stag4d_backend.guidance.zero123pp_fusion import FusionContext, attn1_names
    from stag4d_backend.models.zero123plus import (Zero123PlusSampler, generate_grids, load_zero123plus,
                                                   random_zero123plus)

    dev, sz = _device(spec), spec["sizes"]
    dtype = getattr(torch, sz["z123pp_dtype"])
    work = Path(spec["work"])
    t0 = time.perf_counter()
    tiny_dir = build_tiny_zero123plus(work / "zero123plus-tiny")
    if sz["z123pp"] == "tiny":
        model = load_zero123plus(tiny_dir, device=dev, dtype=dtype, tile=32)
    else:  # the tiny folder's tokenizer (real CLIP BPE code, small vocabulary) + full-size random weights
        model = random_zero123plus(CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer"), dev, dtype)
    build_s = time.perf_counter() - t0
    sampler = Zero123PlusSampler(model)
    frames = {f: make_frame(f % 3) for f in range(sz["z123pp_frames"])}
    steps = sz["z123pp_steps"]
    out = {"model": sz["z123pp"], "dtype": str(dtype).replace("torch.", ""), "device": str(dev),
           "build_s": build_s, "unet_params_m": sum(p.numel() for p in model.unet.parameters()) / 1e6,
           "tile": model.tile_size, "latent": list(sampler.latent_size()), "attn1": len(attn1_names(model.unet)),
           "frames": len(frames), "steps": steps, "modes": {}}

    # which SDPA kernel: one write + read UNet pass pair, profiled
    cond = sampler.condition(frames[0], 0)

    def one_sample():
        sampler.sample([cond], [0], FusionContext("off"), 1)
        _sync(dev)

    ops = _sdpa_ops(one_sample, dev)
    out.update(sdpa_ops=ops, sdpa_kernel=_sdpa_kernel(ops, dev))

    for mode in ("lockstep", "stored"):
        times, ctxs = [], []
        last = [0.0]

        def on_step(frames_, i, n):
            _sync(dev)
            now = time.perf_counter()
            times.append((len(frames_), now - last[0]))
            last[0] = now

        mem = Memory(dev)
        mem.start()
        last[0] = time.perf_counter()
        t = time.perf_counter()
        grids = list(generate_grids(sampler, frames, list(frames), mode=mode, batch=4, steps=steps, seed=7,
                                    decode=False, on_step=on_step, contexts=ctxs))
        _sync(dev)
        wall = time.perf_counter() - t
        assert len(grids) == len(frames)
        # random fp16 weights may overflow: recorded, the timing still stands
        finite = all(bool(torch.isfinite(z.float()).all()) for _, z in grids)
        first_batch = [dt for n, dt in times[:steps]]
        out["modes"][mode] = {
            "wall_s": wall, **mem.stop(),
            "step_s_median": _median([dt for _, dt in times[1:]] or [dt for _, dt in times]),
            "first_step_s": times[0][1] if times else None,
            "step_s_by_batch": {f"x{n}": _median([dt for m, dt in times if m == n])
                                for n in sorted({n for n, _ in times})},
            "denoising_steps": len(times), "first_batch_s": sum(first_batch), "latents_finite": finite,
            "stored_bytes": max((c.stored_bytes() for c in ctxs), default=0)}
        save_partial(out)
    return out


# ------------------------------------------------------------------------------------------ 5. Zero123-XL SDS

def step_zero123_xl_sds(spec: dict) -> dict:
    import torch

    from stag4d_backend.guidance.base import INPUT_VIEW, SDSRequest
    from stag4d_backend.models.zero123_xl import random_zero123_sds

    dev, sz = _device(spec), spec["sizes"]
    t0 = time.perf_counter()
    sds = random_zero123_sds(dev, tiny=sz["sds"] == "tiny", seed=0, image_size=sz["sds_px"])
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    sds.prepare(torch.rand(1, 256, 256, 3, generator=g).to(dev), None)
    image = torch.rand(256, 256, 3, generator=g).to(dev)
    request = SDSRequest(0, INPUT_VIEW, 10.0, 90.0)

    def once(step):
        x = image.clone().requires_grad_(True)
        _sync(dev)
        t = time.perf_counter()
        sds.loss(x, request, step, 1000).backward()
        _sync(dev)
        finite.append(x.grad is not None and bool(torch.isfinite(x.grad).all()))
        return time.perf_counter() - t

    finite = []

    mem = Memory(dev)
    mem.start()
    once(1)
    times = [once(2 + k) for k in range(sz["sds_calls"])]
    return {"model": sz["sds"], "dtype": str(sds.dtype).replace("torch.", ""), "device": str(dev), "build_s": build_s,
            "unet_params_m": sum(p.numel() for p in sds.unet.parameters()) / 1e6, "sds_px": sz["sds_px"],
            "calls": len(times), "loss_backward_s_median": _median(times), "loss_backward_s_min": min(times),
            "grad_finite": all(finite),
            **mem.stop()}


# ------------------------------------------------------------------------------------------ 6. fit

def step_fit(spec: dict) -> dict:
    import torch

    from stag4d_backend.config import get_preset
    from stag4d_backend.example_scene import ExampleCreature, write_stag4d_layout
    from stag4d_backend.models.zero123_xl import random_zero123_sds
    from stag4d_backend.stages.fit import fit

    dev, sz = _device(spec), spec["sizes"]
    deadline = time.perf_counter() + spec["box"] - 5
    work = Path(spec["work"])
    data = write_stag4d_layout(ExampleCreature(3000, seed=1), work / "example", num_frames=sz["fit_frames"],
                               size=sz["fit_size"], anchor_size=sz["fit_anchor_size"])
    t0 = time.perf_counter()
    sds = random_zero123_sds(dev, tiny=sz["sds"] == "tiny", seed=0, image_size=sz["sds_px"])
    out = {"device": str(dev), "frames": sz["fit_frames"], "input_px": sz["fit_size"], "sds_model": sz["sds"],
           "sds_build_s": time.perf_counter() - t0, "presets": {}}
    for preset, iters in sz["fit_iters"].items():
        full = get_preset(preset)
        if time.perf_counter() > deadline - 10:
            out["presets"][preset] = {"status": "skipped", "error": "step time box reached"}
            continue
        cfg = full.with_iters(iters)
        if sz["fit_tiny_field"]:    # dry run: the tiny preset's field and point count, renders capped
            tiny = get_preset("tiny")
            cfg = dataclasses.replace(cfg.with_resolution(sz["fit_size"]), deformation=tiny.deformation,
                                      num_pts=tiny.num_pts)
        cfg = dataclasses.replace(cfg, device=str(dev), guidance="sds+anchors", checkpoint_every=10**6)
        stamps = []
        mem = Memory(dev)
        mem.start()
        res = fit(data, work / f"fit-{preset}", cfg, sds=sds, guidance_explicit=True,
                  progress=lambda s: stamps.append(s["elapsed_s"]),
                  time_budget_s=max(5.0, deadline - time.perf_counter() - 5))
        per_step = [b - a for a, b in zip(stamps, stamps[1:])]
        s_step = _median(per_step[len(per_step) // 10:]) if per_step else None   # skip the warm-up steps
        mean_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
        out["presets"][preset] = {
            "status": res.status, "iterations": res.iterations, "planned_iterations": iters,
            "gaussians": res.num_gaussians, "elapsed_s": res.elapsed_s, "s_per_step_median": s_step,
            "s_per_step_mean": mean_step, "preset_iters": full.iters,
            "minutes_per_asset": mean_step * full.iters / 60 if mean_step else None, **mem.stop()}
        save_partial(out)
    std = out["presets"].get("standard", {})
    if out["presets"].get("paper", {}).get("minutes_per_asset") is None and std.get("s_per_step_mean"):
        out["paper_minutes_from_standard_step"] = std["s_per_step_mean"] * get_preset("paper").iters / 60
    return out


# ------------------------------------------------------------------------------------------ 7. bake

def step_bake(spec: dict) -> dict:
    import torch
    from bake import creature_model, dir_size, random_field

    from stag4d_backend.fitted import load_fitted, save_fitted
    from stag4d_backend.stages.bake import bake

    dev, sz = _device(spec), spec["sizes"]
    n, frames = sz["bake_gaussians"], sz["bake_frames"]
    work = Path(spec["work"])
    fit_dir = work / "fit-bake"
    save_fitted(fit_dir, creature_model(n), random_field(sz["bake_field"]),
                {"num_frames": frames, "fps": 24.0, "source_size": 512})
    try:
        import pxr  # noqa: F401 - usd-core; a GPU machine may lack it (see docs/benchmarks.md)
        formats = "usd,ply"
    except ImportError:
        formats = "ply"
    out = {"gaussians": n, "frames": frames, "field": sz["bake_field"], "formats": formats}
    t = time.perf_counter()
    res = bake(fit_dir, work / "bake", formats=formats)
    out.update(bake_s=time.perf_counter() - t, timings_s=dict(res.timings),
               usd_mb=dir_size(work / "bake" / "gaussians.usdc") / 1e6 if "usd" in formats else None,
               ply_files=len(list((work / "bake" / "ply").glob("*.ply"))))
    animated, _ = load_fitted(fit_dir, device=dev)
    mem = Memory(dev)
    with torch.no_grad():
        animated.at_frame(0)
        _sync(dev)
        mem.start()
        t = time.perf_counter()
        for f in range(frames):
            fg = animated.at_frame(f)
        _sync(dev)
        out.update(evaluate_device=str(dev), evaluate_s=time.perf_counter() - t, **mem.stop(),
                   evaluated_points=int(fg.means.shape[0]))
    return out


WORKERS = {"environment": step_environment, "cuda_tests": step_cuda_tests, "rasterizer": step_rasterizer,
           "zero123plus": step_zero123plus, "zero123_xl_sds": step_zero123_xl_sds, "fit": step_fit,
           "bake": step_bake}


def _worker(spec: dict) -> dict:
    global _RESULT_PATH
    _paths()
    import torch

    _RESULT_PATH = Path(spec["result"])
    env = spec.get("environment")
    if spec["step"] != "environment" and env is not None and not env.get("gsplat_usable"):
        # the environment step found gsplat unusable (or did not finish its build): do not retry the build on
        # this step's clock; the rasteriser runs the PyTorch path on CUDA, as a user's fit would
        from stag4d_backend.render import gsplat_backend

        gsplat_backend._STATUS = gsplat_backend.GsplatStatus(False, env.get("gsplat_version"),
                                                             env.get("gsplat_reason") or "environment step: "
                                                             + str(env.get("error", "gsplat not checked")))

    torch.manual_seed(0)
    if not spec["gpu"]:
        torch.set_num_threads(spec["threads"])
    if spec["step"] in spec.get("fail", []):
        raise RuntimeError(f"injected failure in {spec['step']} (--fail-step)")
    return WORKERS[spec["step"]](spec)


# ------------------------------------------------------------------------------------------ driver

def run_step(spec: dict) -> dict:
    """The step in a subprocess with its time box: {"step", "status", "seconds", "figures" | "error"}."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    if spec["gpu"]:   # gsplat's JIT build: this GPU only, all cores
        env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    result_file = Path(spec["work"]) / f"{spec['step']}.result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(dict(spec, result=str(result_file)))]
    t0 = time.perf_counter()
    row = {"step": spec["step"], "time_box_s": spec["box"]}
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=spec["box"], cwd=str(REPO), env=env)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        row.update(status="timeout", seconds=time.perf_counter() - t0,
                   error=f"time box of {spec['box']:.0f} s reached" + (f"; last output: {tail.strip()[-300:]}"
                                                                      if tail.strip() else ""))
        if result_file.is_file():   # what the step had measured before its box ended
            row["figures"] = json.loads(result_file.read_text())["figures"]
            row["figures"].pop("error", None)
        return row
    row["seconds"] = time.perf_counter() - t0
    if result_file.is_file():
        res = json.loads(result_file.read_text())
        if "traceback" in res:
            return {**row, "status": "failed", "error": res["error"], "traceback": res["traceback"][-2000:]}
        figures = res["figures"]
        err = figures.pop("error", None)
        return {**row, "status": "failed" if err else "ok", "figures": figures, **({"error": err} if err else {})}
    tail = (r.stderr.strip() or r.stdout.strip() or "no output").splitlines()[-1]
    return {**row, "status": "failed", "error": f"worker exited with {r.returncode}: {tail[:400]}"}


# ------------------------------------------------------------------------------------------ report

def _s(x) -> str:
    if x is None:
        return ""
    return f"{x * 1e3:.1f} ms" if x < 0.1 else (f"{x:.2f} s" if x < 10 else f"{x:.1f} s")


def _mem(d: dict) -> str:
    if "peak_vram_mb" in d:
        return f"{d['peak_vram_mb'] / 1024:.2f} GiB VRAM"
    if "peak_rss_rise_mb" in d:
        return f"{d['peak_rss_rise_mb']:.0f} MB RSS rise"
    return ""


def summary(row: dict) -> str:
    """The figures a user needs from one step, in one cell."""
    f = row.get("figures") or {}
    name = row["step"]
    if name == "environment":
        gpu = f"{f.get('gpu')} ({f.get('gpu_memory_gib')} GiB, driver {f.get('driver')})" if f.get("gpu") else "no GPU"
        gs = f"usable {f.get('gsplat_version')}" if f.get("gsplat_usable") else str(f.get("gsplat_reason"))
        return (f"torch {f.get('torch')} (CUDA {f.get('torch_cuda')}), {gpu}; nvcc {'yes' if f.get('nvcc') else 'no'}; "
                f"gsplat: {gs}; the fit renders with {f.get('fit_rasteriser_on_cuda')}")
    if name == "cuda_tests":
        return (f"{f.get('passed')} passed, {f.get('failed')} failed, {f.get('skipped')} skipped "
                f"({', '.join(f.get('files', []))})")
    if name == "rasterizer":
        ok = [c for c in f.get("cases", []) if c["status"] == "ok"]
        return "; ".join(f"{c['ran']} {c['gaussians'] // 1000 if c['gaussians'] >= 1000 else c['gaussians']}"
                         f"{'k' if c['gaussians'] >= 1000 else ''}@{c['size']}: {c['fwd_bwd_ms']:.1f} ms"
                         for c in ok[:: max(1, len(ok) // 6)]) + " (table below)"
    if name == "zero123plus":
        m = f.get("modes", {})
        return (f"{f.get('model')} {f.get('dtype')}, {f.get('unet_params_m', 0):.1f}M UNet, latent "
                f"{'x'.join(map(str, f.get('latent', [])))}; s/step: "
                + ", ".join(f"{k} {_s(v['step_s_median'])} ({_mem(v)})" for k, v in m.items())
                + f"; SDPA: {f.get('sdpa_kernel')}")
    if name == "zero123_xl_sds":
        return (f"{f.get('model')} {f.get('dtype')}, {f.get('unet_params_m', 0):.1f}M UNet: loss+backward "
                f"{_s(f.get('loss_backward_s_median'))} (min {_s(f.get('loss_backward_s_min'))}), {_mem(f)}")
    if name == "fit":
        parts = []
        for p, v in f.get("presets", {}).items():
            if v.get("minutes_per_asset") is None:
                parts.append(f"{p}: {v.get('error', v.get('status'))}")
                continue
            parts.append(f"{p}: {v['iterations']} steps, {_s(v['s_per_step_mean'])}/step, {_mem(v)} -> "
                         f"{v['minutes_per_asset']:.1f} min per asset ({v['preset_iters']} steps)")
        if "paper_minutes_from_standard_step" in f:
            parts.append(f"paper at standard's step time: {f['paper_minutes_from_standard_step']:.1f} min")
        return "; ".join(parts)
    if name == "bake":
        return (f"{f.get('gaussians')} Gaussians x {f.get('frames')} frames ({f.get('field')} field): "
                f"bake {f.get('formats')} "
                f"{_s(f.get('bake_s'))}" + (f", USD {f['usd_mb']:.1f} MB" if f.get("usd_mb") else "")
                + f"; deformation on {f.get('evaluate_device')}: "
                f"{_s(f.get('evaluate_s'))} for all frames, {_mem(f)}")
    return ""


def markdown(report: dict) -> str:
    env = next((r.get("figures", {}) for r in report["steps"] if r["step"] == "environment"), {})
    head = [f"GPU check, {report['date']} UTC, {'CPU dry run (tiny sizes)' if report['dry_run'] else 'real sizes'}"
            f": `{report['command']}`; {env.get('gpu') or 'no GPU'}, {report['cpu_model']} ({os.cpu_count()} CPUs), "
            f"load {report['loadavg_start'][0]:.1f} -> {report['loadavg_end'][0]:.1f}; "
            f"total {report['total_s']:.0f} s.",
            "", "| step | status | seconds (box) | figures |", "|---|---|---:|---|"]
    for r in report["steps"]:
        cell = summary(r) if r["status"] == "ok" else \
            (r.get("error", "") + (f" -- {summary(r)}" if r.get("figures") else ""))
        head.append(f"| {r['step']} | {r['status']} | {r.get('seconds', 0):.0f} ({r['time_box_s']:.0f}) | "
                    f"{cell.replace('|', '/')} |")
    ras = next((r for r in report["steps"] if r["step"] == "rasterizer" and r.get("figures")), None)
    if ras:
        head += ["", "Rasteriser forward + backward (median of the runs after a warm-up):", "",
                 "| backend | Gaussians | px | status | fwd | fwd+bwd | min | peak memory |",
                 "|---|---:|---:|---|---:|---:|---:|---|"]
        for c in ras["figures"]["cases"]:
            if c["status"] == "ok":
                head.append(f"| {c['ran']} | {c['gaussians']:,} | {c['size']} | ok | {c['fwd_ms']:.1f} ms | "
                            f"{c['fwd_bwd_ms']:.1f} ms | {c['fwd_bwd_min_ms']:.1f} ms | {_mem(c)} |")
            else:
                head.append(f"| {c['backend']} | {c['gaussians']:,} | {c['size']} | {c['status']}: "
                            f"{c.get('error', '')} | | | | |")
    return "\n".join(head)


def _cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", nargs="?")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU (the suite's test)")
    ap.add_argument("--only", default="", help=f"comma separated subset of {','.join(STEPS)}")
    ap.add_argument("--budget-s", type=float, default=480, help="cap on the whole run (each step's box is cut to "
                                                               "what is left)")
    ap.add_argument("--box", action="append", default=[], metavar="STEP=SECONDS", help="another time box for a step")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the CPU dry run")
    ap.add_argument("--fail-step", action="append", default=[], help=argparse.SUPPRESS)   # tests: inject a failure
    ap.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._worker:
        spec = json.loads(args._worker)
        try:
            res = {"figures": _worker(spec)}
        except BaseException as exc:  # noqa: BLE001 - the driver records it and goes on
            res = {"error": f"{type(exc).__name__}: {str(exc)[:500]}", "traceback": traceback.format_exc()}
        Path(spec["result"]).write_text(json.dumps(res, default=str))
        return 0

    if not args.out_dir:
        ap.error("OUT_DIR is required")
    import torch

    gpu = not args.cpu_dry_run
    if gpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --cpu-dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    only = [s for s in args.only.split(",") if s] or list(STEPS)
    unknown = set(only) - set(STEPS)
    if unknown:
        ap.error(f"unknown step(s) {', '.join(sorted(unknown))}; choose from {', '.join(STEPS)}")
    boxes = dict(GPU_BOX if gpu else DRY_BOX)
    for item in args.box:
        name, _, secs = item.partition("=")
        if name not in boxes:
            ap.error(f"--box {item}: unknown step")
        boxes[name] = float(secs)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="stag4d-gpucheck-"))
    report = {"dry_run": not gpu, "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "command": " ".join(["benchmarks/gpu_check.py"] + (argv if argv is not None else sys.argv[1:])),
              "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(), "loadavg_start": list(os.getloadavg()),
              "sizes": GPU_SIZES if gpu else DRY_SIZES, "steps": []}
    t0 = time.perf_counter()
    try:
        for step in only:
            left = args.budget_s - (time.perf_counter() - t0)
            if left < 5:
                report["steps"].append({"step": step, "status": "skipped", "time_box_s": 0, "seconds": 0,
                                        "error": f"--budget-s {args.budget_s:.0f} spent"})
                continue
            env_row = next((r for r in report["steps"] if r["step"] == "environment"), None)
            env = None if env_row is None else dict(env_row.get("figures") or {}, error=env_row.get("error"))
            spec = {"step": step, "gpu": gpu, "box": min(boxes[step], left), "sizes": report["sizes"],
                    "work": str(work), "out_dir": str(out_dir), "threads": args.threads, "fail": args.fail_step,
                    "environment": env}
            print(f"[gpu_check] {step} (box {spec['box']:.0f} s) ...", file=sys.stderr, flush=True)
            row = run_step(spec)
            report["steps"].append(row)
            print(f"[gpu_check]   {row['status']} in {row['seconds']:.1f} s"
                  + (f": {row['error'][:200]}" if row.get("error") else ""), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["total_s"] = time.perf_counter() - t0
    report["loadavg_end"] = list(os.getloadavg())
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    text = markdown(report)
    (out_dir / "gpu_check.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
