"""Niantic SPZ, version 4 ("NGSP" header, one zstd stream per attribute), one file per frame: ``spz/{k:04d}.spz``.

Written against the format as nianticlabs/spz defines it (README "File Format" and ``packGaussians`` /
``saveSpz`` in src/cc/load-spz.cc); the quantisation below reproduces the reference packer value for value:

- header, 32 bytes little endian: magic 0x5053474e ("NGSP"), version 4, numPoints, shDegree, fractionalBits 12,
  flags 0 (no anti-aliasing, no extensions), numStreams, tocByteOffset 32, 12 reserved zero bytes;
- table of contents at byte 32: per stream (compressed size u64, uncompressed size u64), then the zstd streams
  (level 12, as the reference) in the order positions, alphas, colors, scales, rotations, sh; the sh stream is
  absent for SH degree 0 (the reference skips empty streams), so numStreams is 5 or 6;
- positions: x, y, z as 24-bit signed fixed point with 12 fractional bits (1/4096 m; |x| < 2048 m);
- alphas: round(sigmoid(logit) * 255);
- colors: the SH DC coefficient f_dc as round(f_dc * 0.15 * 255 + 127.5), clamped to 0..255;
- scales: log-scales as round((log s + 10) * 16), clamped to 0..255 (log s in [-10, 5.94]);
- rotations: "smallest three": the unit quaternion in (x, y, z, w) order, sign chosen so its largest component is
  positive; 2 bits give that component's index, the other three are 9-bit magnitudes (scaled by 1/sqrt(2)) with a
  sign bit, packed into a little-endian u32;
- sh: f_rest coefficient-major with the colour channel innermost (our [N, K, 3] layout), each value
  round(x * 128) + 128 snapped to buckets of 8 (degree 1, 5 bits) or 16 (degrees 2-3, 4 bits), clamped.

Axes: SPZ stores RUB (x right, y up, z back, the OpenGL / three.js convention). The project's world already is
that for its front (input) camera, which sits on +Z looking at -Z with +Y up, so positions, quaternions and SH are
written unchanged, exactly like the glTF files.

The static attributes (alphas, colors, sh) compress to the same bytes in every frame, so they are compressed once.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from ..atomic import atomic_dir
from .frames import SampledFrames

MAGIC = 0x5053474E
VERSION = 4
FRACTIONAL_BITS = 12
HEADER_SIZE = 32
ZSTD_LEVEL = 12
COLOR_SCALE = 0.15
SH1_BITS, SH_REST_BITS = 5, 4
SQRT1_2 = np.float32(0.707106781186547524401)
STREAMS = ("positions", "alphas", "colors", "scales", "rotations", "sh")


def _round(x: np.ndarray) -> np.ndarray:
    """C's round(): halves away from zero (numpy's rounds them to even)."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(_round(x), 0, 255).astype(np.uint8)


def pack_positions(xyz: np.ndarray) -> bytes:
    scaled = np.asarray(xyz, dtype=np.float32) * np.float32(1 << FRACTIONAL_BITS)
    fixed = _round(scaled).astype(np.int64)
    limit = 1 << 23
    if not np.isfinite(scaled).all() or (np.abs(fixed) >= limit).any():
        raise ValueError(f"SPZ positions must lie within +-{limit >> FRACTIONAL_BITS} m of the origin")
    fixed = (fixed & 0xFFFFFF).astype("<u4")
    return np.ascontiguousarray(fixed.view(np.uint8).reshape(-1, 4)[:, :3]).tobytes()


def pack_alphas(opacity_logit: np.ndarray) -> bytes:
    a = 1.0 / (1.0 + np.exp(-np.asarray(opacity_logit, dtype=np.float32).reshape(-1)))
    return _to_u8(a.astype(np.float32) * np.float32(255.0)).tobytes()


def pack_colors(f_dc: np.ndarray) -> bytes:
    c = np.asarray(f_dc, dtype=np.float32).reshape(-1) * np.float32(COLOR_SCALE * 255.0) + np.float32(127.5)
    return _to_u8(c).tobytes()


def pack_scales(log_scales: np.ndarray) -> bytes:
    s = (np.asarray(log_scales, dtype=np.float32).reshape(-1) + np.float32(10.0)) * np.float32(16.0)
    return _to_u8(s).tobytes()


def pack_rotations(rotation_wxyz: np.ndarray) -> bytes:
    q = np.asarray(rotation_wxyz, dtype=np.float32).reshape(-1, 4)[:, [1, 2, 3, 0]]  # -> x, y, z, w
    norm = np.linalg.norm(q, axis=1, keepdims=True)
    q = np.where(norm > 0, q / np.maximum(norm, 1e-30), np.array([0, 0, 0, 1], np.float32)).astype(np.float32)
    n = q.shape[0]
    largest = np.argmax(np.abs(q), axis=1)  # first of equal maxima, as the reference's strict '>'
    negate = q[np.arange(n), largest] < 0
    comp = largest.astype(np.uint32)
    for i in range(4):
        keep = largest != i
        negbit = ((q[:, i] < 0) ^ negate).astype(np.uint32)
        mag = np.minimum((np.float32(511.0) * (np.abs(q[:, i]) / SQRT1_2) + np.float32(0.5)).astype(np.uint32), 511)
        comp = np.where(keep, (comp << np.uint32(10)) | (negbit << np.uint32(9)) | mag, comp)
    return comp.astype("<u4").tobytes()


def pack_sh(f_rest: np.ndarray) -> bytes:
    """[N, K, 3] -> K * 3 bytes per Gaussian (coefficient-major, channel innermost), bucketed like the reference."""
    sh = np.asarray(f_rest, dtype=np.float32)
    if sh.size == 0:
        return b""
    q = (_round(sh * np.float32(128.0)) + 128.0).astype(np.int64)
    bucket = np.full(sh.shape[1], 1 << (8 - SH_REST_BITS), np.int64)
    bucket[:3] = 1 << (8 - SH1_BITS)
    b = bucket[None, :, None]
    q = (q + b // 2) // b * b
    return np.clip(q, 0, 255).astype(np.uint8).tobytes()


def sh_degree_of(num_rest: int) -> int:
    degree = {0: 0, 3: 1, 8: 2, 15: 3, 24: 4}.get(int(num_rest))
    if degree is None:
        raise ValueError(f"{num_rest} higher-order SH coefficients: not a complete degree 1..4")
    return degree


class SpzEncoder:
    """Encodes the frames of one fit; ``spz(xyz, rotation, scaling)`` -> .spz bytes (PLY-layout inputs)."""

    def __init__(self, f_dc: np.ndarray, f_rest: np.ndarray, opacity_logit: np.ndarray, level: int = ZSTD_LEVEL):
        self.n = int(np.asarray(f_dc).reshape(-1, 3).shape[0])
        if self.n == 0:
            raise ValueError("SPZ needs at least one Gaussian")
        f_rest = np.asarray(f_rest, dtype=np.float32).reshape(self.n, -1, 3)
        self.sh_degree = sh_degree_of(f_rest.shape[1])
        self._level = level
        self._local = threading.local()  # a ZstdCompressor must not be shared between threads
        static = {"alphas": pack_alphas(opacity_logit), "colors": pack_colors(f_dc), "sh": pack_sh(f_rest)}
        self._static = {k: (self._compress(v), len(v)) for k, v in static.items() if v}

    def _compress(self, data: bytes) -> bytes:
        import zstandard

        if not hasattr(self._local, "zstd"):
            self._local.zstd = zstandard.ZstdCompressor(level=self._level)
        return self._local.zstd.compress(data)

    def spz(self, xyz: np.ndarray, rotation: np.ndarray, scaling: np.ndarray) -> bytes:
        streams = dict(self._static)
        for name, raw in (("positions", pack_positions(xyz)), ("scales", pack_scales(scaling)),
                          ("rotations", pack_rotations(rotation))):
            streams[name] = (self._compress(raw), len(raw))
        order = [streams[name] for name in STREAMS if name in streams]
        header = struct.pack("<IIIBBBBI12x", MAGIC, VERSION, self.n, self.sh_degree, FRACTIONAL_BITS, 0,
                             len(order), HEADER_SIZE)
        toc = b"".join(struct.pack("<QQ", len(c), size) for c, size in order)
        return header + toc + b"".join(c for c, _ in order)


def frame_file_name(k: int) -> str:
    return f"{k:04d}.spz"


def write_spz_sequence(frames: SampledFrames, out_dir: str | os.PathLike,
                       progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """``out_dir/{k:04d}.spz`` for every output frame (the folder is replaced as a whole). Returns the paths."""
    out_dir = Path(out_dir)
    from concurrent.futures import ThreadPoolExecutor

    enc = SpzEncoder(frames.f_dc, frames.f_rest, frames.opacity)
    T = frames.num_frames

    def encode(k: int) -> bytes:  # zstd and most of numpy release the GIL: frames encode in parallel
        return enc.spz(frames.xyz[k], frames.rotation[k], frames.scaling[k])

    with atomic_dir(out_dir) as tmp, ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        for k, data in enumerate(pool.map(encode, range(T))):
            (tmp / frame_file_name(k)).write_bytes(data)
            if progress is not None:
                progress(k + 1, T)
    return [out_dir / frame_file_name(k) for k in range(T)]


__all__ = ["SpzEncoder", "write_spz_sequence", "frame_file_name", "pack_positions", "pack_rotations", "pack_sh",
           "MAGIC", "VERSION", "FRACTIONAL_BITS"]
