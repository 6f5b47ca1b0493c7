"""Per-frame 3DGS PLY files: ``ply/{k:04d}.ply``, same count and order of Gaussians in every frame.

The layout is exactly ``stag4d_backend.gaussians.ply.save_ply``'s (binary little endian, all float32):
``x y z nx ny nz f_dc_0..2 f_rest_0..3K-1 opacity scale_0..2 rot_0..3``; normals 0, f_rest channel-major, opacity
as logit, scales as logs, rotation raw (w, x, y, z). It is written here with one numpy structured array per
sequence (the static columns are filled once; per frame only x y z, scale_* and rot_* change) and a hand-made
header, which is about ten times faster than going through plyfile for every frame. The whole ``ply/`` folder
is replaced atomically, so a rerun with fewer frames leaves no stale files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..gaussians.ply import ply_attribute_names
from ..atomic import atomic_dir
from .frames import SampledFrames


def ply_header(num_vertices: int, names: list[str]) -> bytes:
    lines = ["ply", "format binary_little_endian 1.0", f"element vertex {num_vertices}"]
    lines += [f"property float {n}" for n in names]
    lines.append("end_header")
    return ("\n".join(lines) + "\n").encode("ascii")


def frame_file_name(k: int) -> str:
    return f"{k:04d}.ply"


def write_ply_sequence(frames: SampledFrames, out_dir: str | os.PathLike,
                       progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Write one PLY per output frame into ``out_dir`` (replacing the folder as a whole). Returns the paths."""
    out_dir = Path(out_dir)
    n, T = frames.num_gaussians, frames.num_frames
    k_rest = frames.f_rest.shape[1]
    names = ply_attribute_names(k_rest)
    rec = np.zeros(n, dtype=[(name, "<f4") for name in names])
    view = rec.view(np.float32).reshape(n, len(names))  # column view of the record array
    col = {name: i for i, name in enumerate(names)}
    view[:, col["f_dc_0"]:col["f_dc_0"] + 3] = frames.f_dc.reshape(n, 3)
    if k_rest:
        rest = np.ascontiguousarray(frames.f_rest.transpose(0, 2, 1)).reshape(n, 3 * k_rest)  # channel-major
        view[:, col["f_rest_0"]:col["f_rest_0"] + 3 * k_rest] = rest
    view[:, col["opacity"]] = frames.opacity.reshape(n)
    header = ply_header(n, names)
    written = []
    with atomic_dir(out_dir) as tmp:
        for k in range(T):
            view[:, 0:3] = frames.xyz[k]
            view[:, col["scale_0"]:col["scale_0"] + 3] = frames.scaling[k]
            view[:, col["rot_0"]:col["rot_0"] + 4] = frames.rotation[k]
            with open(tmp / frame_file_name(k), "wb") as fh:
                fh.write(header)
                fh.write(rec.tobytes())
            if progress is not None:
                progress(k + 1, T)
        written = [out_dir / frame_file_name(k) for k in range(T)]
    return written


__all__ = ["write_ply_sequence", "ply_header", "frame_file_name"]
