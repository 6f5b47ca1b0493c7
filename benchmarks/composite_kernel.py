"""Micro-benchmark of the compiled CPU compositing kernel (forward + backward) on synthetic splats.

    .venv/bin/python benchmarks/composite_kernel.py                      # the three standard cases
    .venv/bin/python benchmarks/composite_kernel.py --n 20000 --size 256 --torch   # also time composite_torch
    .venv/bin/python benchmarks/composite_kernel.py --n 100000 --size 512 --reps 3  # one case (peak RSS is
                                                                                    # meaningful for one case)

Scenes: N Gaussians with means uniform over the image (+-5% margin), random rotations, standard deviations
0.6-4.5 px (radii ceil(3.33 sigma) = 2..15 px), opacities 0.1-0.9, C = 4 random features, random depths.
Prints median wall times of forward, backward and forward+backward, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stag4d_backend.render.composite_cpp import composite_cpp, cpp_available, kernel_info  # noqa: E402


def make_scene(n: int, size: int, channels: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 2, generator=g) * 1.1 - 0.05) * size
    theta = torch.rand(n, generator=g) * math.pi
    s = 0.6 + torch.rand(n, 2, generator=g) * 3.9
    c, si = torch.cos(theta), torch.sin(theta)
    rot = torch.stack([torch.stack([c, -si], -1), torch.stack([si, c], -1)], -2)
    cov = rot @ torch.diag_embed(s * s) @ rot.transpose(-1, -2)
    inv = torch.linalg.inv(cov)
    conics = torch.stack([inv[:, 0, 0], inv[:, 0, 1], inv[:, 1, 1]], -1)
    radii = torch.ceil(3.33 * torch.sqrt(torch.stack([cov[:, 0, 0], cov[:, 1, 1]], -1))).to(torch.int32)
    opac = 0.1 + 0.8 * torch.rand(n, generator=g)
    feats = torch.rand(n, channels, generator=g)
    depths = torch.rand(n, generator=g) * 10 + 1
    return means.float(), conics.float(), feats, opac, depths, radii


def bench(fn, n: int, size: int, reps: int, warmup: int = 1):
    m, c, f, o, d, r = make_scene(n, size)
    leaves = [t.clone().requires_grad_(True) for t in (m, c, f, o)]
    gi = torch.rand(size, size, f.shape[1])
    ga = torch.rand(size, size)
    fwd, bwd = [], []
    for i in range(warmup + reps):
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        img, alpha = fn(*leaves, d, r, size, size)
        t1 = time.perf_counter()
        torch.autograd.backward([img, alpha], [gi, ga])
        t2 = time.perf_counter()
        if i >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    tot = [a + b for a, b in zip(fwd, bwd)]
    return statistics.median(fwd), statistics.median(bwd), statistics.median(tot)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, help="number of Gaussians (default: the three standard cases)")
    ap.add_argument("--size", type=int, default=256, help="image width = height")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--torch", action="store_true", help="also time composite_torch")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpp_available():
        print("compiled kernel unavailable:", kernel_info())
        return 1
    print("kernel:", kernel_info())
    cases = [(args.n, args.size)] if args.n else [(5000, 128), (20000, 256), (100000, 512)]
    for n, size in cases:
        reps = args.reps if n <= 20000 else min(args.reps, 3)
        f, b, t = bench(composite_cpp, n, size, reps)
        print(f"cpp   N={n:6d} {size}x{size}: fwd {f * 1e3:7.1f} ms  bwd {b * 1e3:7.1f} ms  fwd+bwd {t * 1e3:7.1f} ms"
              f"  (median of {reps}, {torch.get_num_threads()} threads)")
        if args.torch:
            from stag4d_backend.render.composite_torch import composite_torch

            f, b, t = bench(composite_torch, n, size, max(1, min(reps, 3)))
            print(f"torch N={n:6d} {size}x{size}: fwd {f * 1e3:7.1f} ms  bwd {b * 1e3:7.1f} ms  "
                  f"fwd+bwd {t * 1e3:7.1f} ms")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
