"""Compiled, multi-threaded CPU kernel for Gaussian splat compositing (forward + hand-written backward).

Same contract, signature and results as :func:`stag4d_backend.render.composite_torch.composite_torch`
(float32 only)::

    composite_cpp(means2d [N,2], conics [N,3], features [N,C], opacities [N], depths [N], radii [N,2] int32,
                  width, height, tile_size=16) -> (image [H,W,C], alpha [H,W])

The C++ sources (``csrc/``: ``composite.cpp`` registers ``torch.ops.stag4d_composite.*``, ``kernel.cpp`` +
``kernel_impl.inc`` hold the torch-free kernel; ``projection.cpp`` + ``projection_impl.inc`` register the
compiled EWA projection ``torch.ops.stag4d_projection.*`` used by ``projection_cpp.py``: one shared library, one
build, one availability answer) are compiled on first use with ``torch.utils.cpp_extension.load`` (ninja + the
system C++ compiler, about 10 s) into a cache directory, so later processes only load the shared library (0.1 s);
a rebuild happens only when a source, the flags or the torch/Python version change:

* ``$STAG4D_EXT_DIR`` if set, else
* ``<venv>/torch_extensions`` when running inside a writable virtual environment (the repo's ``.venv``), else
* ``$XDG_CACHE_HOME/stag4d/torch_extensions`` (default ``~/.cache/stag4d/torch_extensions``),

each with a ``py<XY>_torch<version>/`` subfolder. ``python -m stag4d_backend.render.composite_cpp --build``
compiles eagerly (``install_scripts/install.sh`` calls it) and always exits 0.

:func:`cpp_available` builds/loads lazily, never raises and caches its answer. When the build fails it emits
one ``RuntimeWarning`` per process with the reason, and :func:`composite_cpp` then calls the PyTorch
implementation. ``STAG4D_DISABLE_CPP_KERNEL=1`` turns the kernel off (no warning).

The kernel uses torch's intra-op thread count (``torch.set_num_threads``). See ``docs/cpu_kernel.md``.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["composite_cpp", "cpp_available", "cpp_unavailable_reason", "build", "build_directory", "kernel_info"]

_HERE = Path(__file__).resolve().parent
# One shared library holds both compiled CPU kernels: the compositor (composite.cpp + kernel.cpp) and the EWA
# projection (projection.cpp, torch.ops.stag4d_projection.*, used through projection_cpp.py).
_SOURCES = [_HERE / "csrc" / "composite.cpp", _HERE / "csrc" / "kernel.cpp", _HERE / "csrc" / "projection.cpp"]
_NAME = "stag4d_composite_cpu"

# -O3 but no -ffast-math: it breaks the exp (the rounding trick is folded away: exp(-1.3) -> 0.5) and NaN
# handling. -ffp-contract=off: no FMA contraction, so forward and backward compute alpha bit-identically (the
# same skip/stop decisions) and every SIMD level gives the same bits (FMA would be ~15% faster). -fopenmp only
# makes ATen's at::parallel_for (an inline header) use torch's OpenMP pool; it links libgomp.so.1, the soname
# torch's bundled runtime already loaded, so there is one OpenMP runtime. No -march: kernel.cpp compiles its
# AVX-512 / AVX2 / SSE2 versions itself and picks one from cpuid at run time (docs/cpu_kernel.md).
_LINUX_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-Wno-psabi"]
_MAC_FLAGS = ["-O3", "-ffp-contract=off"]  # Apple clang has no OpenMP: the kernel then runs on one thread
_MSVC_FLAGS = ["/O2", "/fp:precise", "/openmp"]

_lock = threading.Lock()
_ext = None
_status: bool | None = None
_reason = ""


def _extra_cflags() -> list[str]:
    if sys.platform == "win32":
        flags = list(_MSVC_FLAGS)
    elif sys.platform == "darwin":
        flags = list(_MAC_FLAGS)
    else:
        flags = list(_LINUX_FLAGS)
    extra = os.environ.get("STAG4D_EXT_CFLAGS", "").split()  # for experiments only
    return flags + extra


def _extra_ldflags() -> list[str]:
    # -fopenmp links libgomp.so.1, the soname of the libgomp torch ships, so one OpenMP runtime is shared
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def build_directory() -> Path:
    """Where the compiled kernel is (or will be) cached."""
    env = os.environ.get("STAG4D_EXT_DIR")
    if env:
        base = Path(env).expanduser()
    elif sys.prefix != sys.base_prefix and os.access(sys.prefix, os.W_OK):
        base = Path(sys.prefix) / "torch_extensions"
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        base = Path(cache) / "stag4d" / "torch_extensions"
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__.replace('+', '_')}"
    return base / tag / _NAME


def _ensure_ninja() -> None:
    """torch's JIT build needs ``ninja`` on PATH; the PyPI wheel puts it next to the venv's python."""
    from torch.utils.cpp_extension import is_ninja_available

    if is_ninja_available():
        return
    dirs = []
    try:
        import ninja  # type: ignore[import-not-found]

        dirs.append(Path(ninja.BIN_DIR))
    except Exception:  # noqa: BLE001 - optional
        pass
    dirs.append(Path(sys.executable).parent)
    for d in dirs:
        if (d / "ninja").exists() or (d / "ninja.exe").exists():
            os.environ["PATH"] = str(d) + os.pathsep + os.environ.get("PATH", "")
            if is_ninja_available():
                return
    raise RuntimeError("the 'ninja' build tool is not installed (pip install ninja)")


_STALE_LOCK_SECONDS = 120.0  # a build takes ~10 s; an older lock was left by a killed build


def _wait_for_or_clear_lock(d: Path) -> None:
    """torch waits forever on a build directory's ``lock`` file; a build killed midway leaves it behind."""
    import time

    lock = d / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > _STALE_LOCK_SECONDS:
            try:
                lock.unlink()
            except FileNotFoundError:
                pass
            return
        time.sleep(0.25)


def _load(verbose: bool = False):
    from torch.utils.cpp_extension import load

    _ensure_ninja()
    d = build_directory()
    d.mkdir(parents=True, exist_ok=True)
    _wait_for_or_clear_lock(d)
    load(
        name=_NAME,
        sources=[str(s) for s in _SOURCES],
        extra_cflags=_extra_cflags(),
        extra_ldflags=_extra_ldflags(),
        build_directory=str(d),
        verbose=verbose,
        is_python_module=False,  # the library registers torch.ops.stag4d_composite.* (no pybind11: fast build)
    )
    return torch.ops.stag4d_composite


def _short(exc: BaseException, max_lines: int = 8) -> str:
    """The diagnostic lines of a build error (not the long compiler command lines), deduplicated."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    first = lines[0].split(": [", 1)[0] if lines else ""  # "Error building extension 'x': [1/3] c++ ..."
    head = f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__
    keep: list[str] = []
    for ln in lines[1:]:
        if ln.startswith(("[", "FAILED:", "ninja: build stopped")) or (" -c " in ln and " -o " in ln):
            continue
        if ln not in keep:
            keep.append(ln[:300])
    detail = "; ".join(keep[:max_lines])
    hint = " (details: python -m stag4d_backend.render.composite_cpp --build --verbose)"
    return f"{head}{': ' + detail if detail else ''}{hint}"


def _try_load(verbose: bool = False, warn: bool = True) -> bool:
    global _ext, _status, _reason
    with _lock:
        if _status is not None:
            return _status
        if os.environ.get("STAG4D_DISABLE_CPP_KERNEL", "").strip() not in ("", "0"):
            _status, _reason = False, "disabled by STAG4D_DISABLE_CPP_KERNEL"
            return False
        try:
            _ext = _load(verbose=verbose)
            _status, _reason = True, ""
        except Exception as exc:  # noqa: BLE001 - never raise from here
            _ext, _status, _reason = None, False, _short(exc)
            if warn:
                warnings.warn(
                    "STAG4D: the compiled CPU compositing kernel could not be built, so the (slower) PyTorch "
                    f"implementation is used. Reason: {_reason}",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return _status


def cpp_available() -> bool:
    """True when the compiled kernel is usable; builds or loads it on the first call. Never raises."""
    if _status is not None:
        return _status
    return _try_load()


def cpp_unavailable_reason() -> str:
    """Why :func:`cpp_available` is False ("" when it is True or was not asked yet)."""
    return _reason


def kernel_info() -> str:
    """One line about the loaded kernel (SIMD version in use, thread count) or why it is unavailable."""
    if not cpp_available():
        return f"unavailable ({_reason})"
    return f"{_ext.build_info()} cache={build_directory()}"


def build(verbose: bool = False) -> Path:
    """Compile (or load the cached) kernel now; raises on failure. Returns the cache directory."""
    global _status
    with _lock:
        if _status is False:
            _status = None  # an explicit build retries
    if not _try_load(verbose=verbose, warn=False):
        raise RuntimeError(_reason)
    return build_directory()


# --------------------------------------------------------------------------------------------- autograd glue
class _CompositeCppFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, features, opacities, depths, radii, width, height, tile_size):
        image, alpha, t_final, last, offsets, ids = _ext.forward(
            means2d, conics, features, opacities, depths, radii, width, height, tile_size
        )
        ctx.dims = (width, height, tile_size)
        ctx.save_for_backward(means2d, conics, features, opacities, radii, t_final, last, offsets, ids)
        return image, alpha

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_image, grad_alpha):
        need = ctx.needs_input_grad[:4]
        if not any(need):
            return (None,) * 9
        means2d, conics, features, opacities, radii, t_final, last, offsets, ids = ctx.saved_tensors
        width, height, tile_size = ctx.dims
        if grad_image is None:
            grad_image = torch.zeros((height, width, features.shape[1]), dtype=torch.float32)
        if grad_alpha is None:
            grad_alpha = torch.zeros((height, width), dtype=torch.float32)
        gm, gc, gf, go = _ext.backward(
            means2d, conics, features, opacities, radii, t_final, last, offsets, ids,
            grad_image.to(torch.float32).contiguous(), grad_alpha.to(torch.float32).contiguous(),
            width, height, tile_size,
        )
        return (gm if need[0] else None, gc if need[1] else None, gf if need[2] else None,
                go if need[3] else None, None, None, None, None, None)


def _check_float(name: str, t: Tensor, n: int | None, cols: int | None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"composite_cpp: {name} must be a torch.Tensor")
    if t.device.type != "cpu":
        raise ValueError(f"composite_cpp: {name} must be on the CPU (got {t.device}); use composite_torch")
    if t.dtype != torch.float32:
        raise TypeError(f"composite_cpp: {name} must be float32 (got {t.dtype}); the compiled kernel is "
                        "float32-only, use composite_torch for other dtypes")
    shape_ok = (t.dim() == 1 and t.shape[0] == n) if cols is None else (
        t.dim() == 2 and (n is None or t.shape[0] == n) and (t.shape[1] == cols if cols > 0 else t.shape[1] >= 1))
    if not shape_ok:
        want = f"[{n}]" if cols is None else f"[N, {cols if cols > 0 else 'C>=1'}]"
        raise ValueError(f"composite_cpp: {name} must have shape {want} (got {list(t.shape)})")


def composite_cpp(
    means2d: Tensor,
    conics: Tensor,
    features: Tensor,
    opacities: Tensor,
    depths: Tensor,
    radii: Tensor,
    width: int,
    height: int,
    tile_size: int = 16,
) -> tuple[Tensor, Tensor]:
    """Composite projected Gaussians front to back with the compiled kernel (see the module docstring).

    Inputs must be float32 CPU tensors (radii an integer tensor [N,2] or [N]); non-contiguous inputs are made
    contiguous. Falls back to ``composite_torch`` when the kernel is unavailable.
    """
    if not cpp_available():
        from .composite_torch import composite_torch

        return composite_torch(means2d, conics, features, opacities, depths, radii, width, height, tile_size)
    width, height, tile_size = int(width), int(height), int(tile_size)
    if width < 0 or height < 0:
        raise ValueError(f"composite_cpp: width and height must be >= 0 (got {width}x{height})")
    if not 1 <= tile_size <= 64:
        raise ValueError(f"composite_cpp: tile_size must be in [1, 64] (got {tile_size})")
    _check_float("means2d", means2d, None, 2)
    n = means2d.shape[0]
    _check_float("conics", conics, n, 3)
    _check_float("features", features, n, 0)
    _check_float("opacities", opacities, n, None)
    _check_float("depths", depths, n, None)
    if not isinstance(radii, Tensor) or radii.device.type != "cpu":
        raise ValueError("composite_cpp: radii must be a CPU tensor")
    if radii.dtype.is_floating_point or radii.dtype.is_complex or radii.dtype == torch.bool:
        raise TypeError(f"composite_cpp: radii must be an integer tensor (int32), got {radii.dtype}")
    if radii.dim() == 1:
        radii = radii[:, None].expand(-1, 2)
    if radii.shape != (n, 2):
        raise ValueError(f"composite_cpp: radii must have shape [{n}, 2] (got {list(radii.shape)})")
    if radii.dtype != torch.int32:
        radii = radii.clamp(-(2**31), 2**31 - 1).to(torch.int32)
    radii = radii.contiguous()
    return _CompositeCppFn.apply(
        means2d.contiguous(), conics.contiguous(), features.contiguous(), opacities.contiguous(),
        depths.detach().contiguous(), radii, width, height, tile_size,
    )


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    parser = argparse.ArgumentParser(prog="python -m stag4d_backend.render.composite_cpp",
                                     description="Build or inspect the compiled CPU compositing kernel.")
    parser.add_argument("--build", action="store_true", help="compile now (cached); always exits 0")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        where = build(verbose=args.verbose)
    except Exception as exc:  # noqa: BLE001
        print("WARNING: the STAG4D CPU compositing kernel could not be built; the PyTorch compositor will be "
              f"used instead (slower). Reason:\n{exc}", file=sys.stderr)
        return 0
    print(f"STAG4D CPU compositing kernel ready in {time.perf_counter() - t0:.1f} s: {where}")
    print(f"  {_ext.build_info()}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
