"""`stag4d doctor`: what this machine offers the backend. Gathers facts; printing is the CLI's job."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path


def _memory_gib() -> str:
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh)
        total = int(info["MemTotal"].split()[0]) / 2**20
        avail = int(info["MemAvailable"].split()[0]) / 2**20
        return f"{avail:.1f} GiB available of {total:.1f} GiB"
    except (OSError, KeyError, ValueError):
        return "unknown"


def collect_report(cwd: str | os.PathLike = ".") -> dict[str, str]:
    from . import __version__

    report: dict[str, str] = {
        "stag4d": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu cores": str(os.cpu_count()),
        "memory": _memory_gib(),
    }
    disk = shutil.disk_usage(Path(cwd).resolve())
    report["disk free (cwd)"] = f"{disk.free / 2**30:.1f} GiB"
    try:
        import torch

        report["torch"] = torch.__version__
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            report["device"] = f"cuda: {props.name}, {props.total_memory / 2**30:.1f} GiB"
        else:
            report["device"] = f"cpu ({torch.get_num_threads()} threads); no CUDA device: fits run slowly"
    except ImportError:
        report["torch"] = "NOT INSTALLED: run bash install_scripts/install.sh"
    try:
        from .render.rasterize import available_backends

        report["rasteriser backends"] = ", ".join(available_backends())
        report["gsplat"] = gsplat_report()
    except ImportError as exc:  # the render package is incomplete in a broken install
        report["rasteriser backends"] = f"unavailable ({exc})"
    report.update(weights_report())
    return report


def gsplat_report() -> str:
    """One line: gsplat usable, or what a fit on this machine renders with instead."""
    from .render.gsplat_backend import gsplat_status

    st = gsplat_status()
    if st.usable:
        return f"{st.version}, CUDA kernels usable: fits on CUDA use gsplat"
    if st.reason == "no CUDA device":
        return "not used (no CUDA device)"
    return (f"NOT USABLE: {st.reason}. Fits on CUDA use the project's PyTorch rasteriser instead (same results, "
            f"slower); install `stag4d-backend[cuda]` (gsplat>=1.5,<1.6) where a CUDA toolkit (nvcc) is present")


def weights_report() -> dict[str, str]:
    """One line per registry model: present (where) or missing (size, licence, the command that gets it)."""
    try:
        from .models.registry import MODELS, hf_cache_dir, status
    except ImportError as exc:  # huggingface_hub missing in a broken install
        return {"weights": f"unknown ({exc})"}
    lines = {"weights cache": str(hf_cache_dir())}
    for name in MODELS:
        s = status(name)
        if s.location:
            lines[f"weights {name}"] = f"present ({s.location.source}: {s.location.path}); licence {s.spec.licence}"
        else:
            lines[f"weights {name}"] = (f"missing: about {s.spec.size_gb:g} GB, licence {s.spec.licence}; "
                                        f"`stag4d models download {name}`")
    return lines
