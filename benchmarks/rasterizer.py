"""Benchmark of the CPU rasterisers: forward+backward time and peak memory.

Each case (backend, Gaussian count, image size) runs in its own subprocess, so the peak memory is the rise
of the process's peak RSS (``ru_maxrss``) over its value after imports and scene set-up, and cases do not
disturb each other. Scene: N Gaussians uniform in a ball of radius 0.5, seen from distance 2 on the +z axis
(the front view of docs/architecture.md), vertical fov 49.1 degrees, scales U(0.01, 0.03) per axis, random
rotations, opacities U(0.1, 0.9), random colours, background white. The loss is
``rgb.sum() + alpha.sum() + depth.sum()``, so every output gets a gradient.

Examples::

    .venv/bin/python benchmarks/rasterizer.py --quick
    .venv/bin/python benchmarks/rasterizer.py                      # default grid, a few minutes
    .venv/bin/python benchmarks/rasterizer.py --full --json benchmarks/out/raster.json
    .venv/bin/python benchmarks/rasterizer.py --counts 20000 --sizes 256 --backends torch,cpp --repeats 5

Backends: ``torch`` (PyTorch projection + tiled PyTorch compositor), ``cpp`` (compiled projection + compiled
compositor, when available), ``reference`` (dense; only run where N * H * W <= --reference-limit, 5000*128*128 by
default, with --reference-repeats runs and no warm-up; it takes ~30 s and ~7 GB there; --quick leaves it out).
Cases run one after the other in their own processes, all backends of a case in turn (so they see similar machine
load); the table lists each non-torch backend's speed-up over ``torch`` for the same case (ratio of the fwd+bwd
medians / of the minima).
Timings are wall clock; on a shared machine they are noisy: compare medians, and look at the min.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_scene(n: int, size: int, seed: int = 0, device="cpu"):
    """The benchmark scene (module docstring): (means, quats, scales, opacities, colors, viewmat, K), drawn on the
    CPU (the same scene on every device) and moved to ``device``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, 3, generator=g)
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    means = d * torch.rand(n, 1, generator=g) ** (1.0 / 3.0) * 0.5
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.02 + 0.01
    opac = torch.rand(n, generator=g) * 0.8 + 0.1
    colors = torch.rand(n, 3, generator=g)
    viewmat = torch.tensor([[1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, -1.0, 2.0], [0, 0, 0, 1]])  # eye (0,0,2)
    f = 0.5 * size / math.tan(math.radians(49.1) / 2)
    K = torch.tensor([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]])
    return tuple(t.to(device) for t in (means, quats, scales, opac, colors, viewmat, K))


def _worker(spec: dict) -> dict:
    import resource

    import torch

    sys.path.insert(0, str(REPO))
    from stag4d_backend.render import rasterize
    from stag4d_backend.render.rasterize import resolve_backend

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    n, size, backend = int(spec["count"]), int(spec["size"]), spec["backend"]
    means, quats, scales, opac, colors, viewmat, K = make_scene(n, size, int(spec.get("seed", 0)))
    which = resolve_backend(backend, torch.device("cpu"), torch.float32)

    def once():
        leaves = [t.clone().requires_grad_(True) for t in (means, quats, scales, opac, colors)]
        t0 = time.perf_counter()
        res = rasterize(*leaves, viewmat, K, size, size, [1.0, 1.0, 1.0], backend=backend)
        t1 = time.perf_counter()
        (res.rgb.sum() + res.alpha.sum() + res.depth.sum()).backward()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t0, int((res.radii > 0).sum())

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runs = []
    if spec.get("warmup", True):
        once()
    for _ in range(int(spec["repeats"])):
        runs.append(once())
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mb = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0  # ru_maxrss: bytes on macOS, KiB on Linux
    fwd = sorted(r[0] for r in runs)
    tot = sorted(r[1] for r in runs)
    return {
        "backend": which,
        "count": n,
        "size": size,
        "drawn": runs[-1][2],
        "threads": torch.get_num_threads(),
        "repeats": len(runs),
        "fwd_median_s": fwd[len(fwd) // 2],
        "fwd_bwd_median_s": tot[len(tot) // 2],
        "fwd_bwd_min_s": tot[0],
        "fwd_bwd_all_s": [r[1] for r in runs],
        "peak_rss_delta_mb": (rss1 - rss0) / mb,
    }


def _run_case(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timeout after {timeout:.0f} s"}
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {**spec, "error": tail}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _available_backends() -> list[str]:
    sys.path.insert(0, str(REPO))
    from stag4d_backend.render.rasterize import cpp_compositor_available

    names = ["torch"]
    if cpp_compositor_available():
        names.append("cpp")
    return names + ["reference"]


def _add_speedups(rows: list[dict]) -> None:
    """Each non-torch row gets ``speedup_vs_torch`` (torch median / its median, fwd+bwd) and
    ``speedup_vs_torch_min`` (ratio of the minima) when the same case ran with the torch backend."""
    torch_rows = {(r["count"], r["size"]): r for r in rows if r.get("backend") == "torch" and "error" not in r}
    for r in rows:
        ref = torch_rows.get((r["count"], r["size"]))
        if r.get("backend") == "torch" or "error" in r or ref is None:
            continue
        r["speedup_vs_torch"] = ref["fwd_bwd_median_s"] / r["fwd_bwd_median_s"]
        r["speedup_vs_torch_min"] = ref["fwd_bwd_min_s"] / r["fwd_bwd_min_s"]


def _fmt_ms(seconds: float) -> str:
    ms = 1e3 * seconds
    return f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def _table(rows: list[dict]) -> str:
    head = ("| backend | N | size | drawn | fwd (ms) | fwd+bwd median (ms) | fwd+bwd min (ms) | runs "
            "| peak RSS delta (MB) | vs torch (median / min) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['count']} | {r['size']} | | | {r['error']} | | | | |")
            continue
        ratio = (f"{r['speedup_vs_torch']:.1f}x / {r['speedup_vs_torch_min']:.1f}x"
                 if "speedup_vs_torch" in r else "")
        lines.append(
            f"| {r['backend']} | {r['count']} | {r['size']} | {r['drawn']} | {_fmt_ms(r['fwd_median_s'])} "
            f"| {_fmt_ms(r['fwd_bwd_median_s'])} | {_fmt_ms(r['fwd_bwd_min_s'])} | {r['repeats']} "
            f"| {r['peak_rss_delta_mb']:.0f} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128,256", help="image sizes (square), comma separated")
    ap.add_argument("--counts", default="5000,20000", help="Gaussian counts, comma separated")
    ap.add_argument("--backends", default="auto",
                    help="comma separated from torch,cpp,reference; 'auto' = every available one")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per case (after one warm-up)")
    ap.add_argument("--reference-repeats", type=int, default=1, help="timed runs for the dense reference")
    ap.add_argument("--reference-limit", type=float, default=5000 * 128 * 128,
                    help="run the reference only where N*H*W is at most this")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per case")
    ap.add_argument("--quick", action="store_true",
                    help="5k Gaussians at 128 and 256 px, 3 runs, no dense reference (it needs ~7 GB)")
    ap.add_argument("--full", action="store_true", help="5k/20k/50k Gaussians at 128/256/512 px")
    ap.add_argument("--json", default="", help="write the results to this JSON file")
    ap.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._worker:
        print(json.dumps(_worker(json.loads(args._worker))))
        return 0

    if args.quick:
        args.counts, args.sizes, args.repeats = "5000", "128,256", 3
    if args.full:
        args.counts, args.sizes = "5000,20000,50000", "128,256,512"
    counts = [int(c) for c in args.counts.split(",") if c]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.backends == "auto":
        backends = _available_backends()
        if args.quick:
            backends = [b for b in backends if b != "reference"]
    else:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    # case by case, every backend in turn, so that the backends of one case see the same machine load
    rows = []
    for n in counts:
        for size in sizes:
            for backend in backends:
                ref = backend == "reference"
                if ref and n * size * size > args.reference_limit:
                    continue
                spec = {"backend": backend, "count": n, "size": size, "threads": args.threads,
                        "repeats": args.reference_repeats if ref else args.repeats, "warmup": not ref}
                print(f"running {backend} N={n} size={size} ...", file=sys.stderr, flush=True)
                rows.append(_run_case(spec, args.timeout))
    order = {b: i for i, b in enumerate(backends)}
    rows.sort(key=lambda r: order.get(r.get("backend"), len(order)))  # table grouped by backend, as before
    _add_speedups(rows)
    table = _table(rows)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"cpu_count": os.cpu_count(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
