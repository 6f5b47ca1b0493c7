"""Evaluate a fitted 4D model at many frames at once (the bake's only heavy math). Pure torch/numpy, no I/O.

``FrameSampler`` gives exactly what ``DeformationNetwork.deltas`` gives (up to float32 rounding), but is built for
"the same points at many times":

- the three spatial planes of each HexPlane scale (xy, xz, yz) do not depend on t, so their product is sampled
  once per point;
- each time plane (xt, yt, zt) is first interpolated along t into a line per frame (a few hundred numbers), and
  the points then only do a 1-D linear lookup into that line (two gathers) instead of a ``grid_sample``;
- many frames are pushed through the MLP as one batched GEMM, in chunks of about ``chunk_points`` rows;
- for mesh vertices only the position head (and, with ``motion="rigid"``, the rotation-vector head) is evaluated.

Head outputs are combined with the canonical values by ``deformation.apply_deltas`` / ``move_points``, the same
functions ``DeformationNetwork.deform`` uses.

``sample_frames(animated, frame_values)`` returns ``SampledFrames``: per-frame raw parameters in the 3DGS PLY
layout (xyz, log-scales, raw quaternions) plus the static ones (SH, opacity logit), as float32 numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..gaussians.deformation import (
    HEAD_NAMES,
    PLANE_PAIRS,
    SPATIAL_PLANES,
    TIME_PLANES,
    DeformationNetwork,
    apply_deltas,
    move_points,
)
from ..gaussians.rigid import rotvec_to_quat

SH_C0 = 0.28209479177387814


@dataclass
class SampledFrames:
    """Gaussians at ``len(times)`` instants; index 0 of the per-frame arrays is the output frame."""

    times: np.ndarray         # [T] float64, t = f / F of each output frame
    frame_values: np.ndarray  # [T] float64, source-frame value f of each output frame (fractional when retimed)
    xyz: np.ndarray           # [T, N, 3] float32 centres
    scaling: np.ndarray       # [T, N, 3] float32 log-scales (raw, PLY layout)
    rotation: np.ndarray      # [T, N, 4] float32 raw quaternions (w, x, y, z), not normalised (PLY layout)
    f_dc: np.ndarray          # [N, 1, 3] float32 (static)
    f_rest: np.ndarray        # [N, K, 3] float32 (static)
    opacity: np.ndarray       # [N, 1] float32 logit (static)

    @property
    def num_frames(self) -> int:
        return int(self.xyz.shape[0])

    @property
    def num_gaussians(self) -> int:
        return int(self.xyz.shape[1])

    @property
    def sh_degree(self) -> int:
        return int(round(np.sqrt(self.f_rest.shape[1] + 1))) - 1

    # Activated values (what renderers and DCCs use).
    def scales(self) -> np.ndarray:
        """[T, N, 3] linear standard deviations."""
        return np.exp(self.scaling)

    def quats(self) -> np.ndarray:
        """[T, N, 4] unit quaternions (w, x, y, z); a zero quaternion becomes the identity."""
        n = np.linalg.norm(self.rotation, axis=-1, keepdims=True)
        q = self.rotation / np.maximum(n, 1e-12)
        q[..., 0] = np.where(n[..., 0] < 1e-12, 1.0, q[..., 0])
        return q.astype(np.float32, copy=False)

    def opacities(self) -> np.ndarray:
        """[N] in [0, 1]."""
        return (1.0 / (1.0 + np.exp(-self.opacity.reshape(-1).astype(np.float64)))).astype(np.float32)

    def base_colors(self) -> np.ndarray:
        """[N, 3] view-independent colour = max(0, 0.5 + C0 * f_dc) (the model's own degree-0 colour; for higher
        SH degrees this is the DC part only). Display-referred (sRGB-encoded) values, not clamped above 1."""
        return np.maximum(0.5 + SH_C0 * self.f_dc.reshape(-1, 3), 0.0).astype(np.float32)

    def raw_frame(self, k: int) -> dict:
        """The raw parameter dict of output frame k (keys of ``GaussianModel.params``)."""
        return {"xyz": self.xyz[k], "f_dc": self.f_dc, "f_rest": self.f_rest, "opacity": self.opacity,
                "scaling": self.scaling[k], "rotation": self.rotation[k]}


def srgb_to_linear(c: np.ndarray, above_one: bool = False) -> np.ndarray:
    """The sRGB transfer function, inverted (IEC 61966-2-1), for values in [0, 1]; with ``above_one`` values over 1
    keep going up the same power curve (a Gaussian's colour may exceed 1: the rasteriser blends it unclamped and
    clamps only the pixel, so a display that composites the splats needs it unclamped too)."""
    c = np.clip(np.asarray(c, dtype=np.float32), 0.0, None if above_one else 1.0)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4).astype(np.float32)


class FrameSampler:
    """Deformation deltas of fixed points at many times (see the module docstring).

    ``deltas(times, heads=None)`` -> dict head -> [T, N, k] float32 tensor, where k is 3, 3, 4 (and 3 for the
    ``"rigid"`` rotation-vector head of a ``motion="rigid"`` network); ``heads=None`` means all of the network's
    heads, in ``HEAD_NAMES`` order.
    Row layout throughout ([points, channels]); biases are fused into the GEMMs (``addmm``) and ReLUs run in
    place, because on a CPU the elementwise passes over [M, 192] activations cost as much as the GEMMs.
    """

    HEAD_SIZES = {"pos": 3, "scale": 3, "rot": 4, "rigid": 3}

    def __init__(self, net: DeformationNetwork, xyz: torch.Tensor, chunk_points: int = 65536,
                 mlp_rows: int = 8192):
        self.net = net
        grid = net.grid
        self.n = int(xyz.shape[0])
        self.chunk_points = int(chunk_points)
        self.mlp_rows = int(mlp_rows)
        f32 = torch.float32
        with torch.no_grad():
            xyz = xyz.detach().to(f32)
            q = grid.normalize_xyz(xyz)  # [N, 3] grid coordinates
            self._spatial = []  # per scale: [N, C], product of the three spatial-plane samples
            self._lookups = []  # per scale, per time plane: (plane [res_t, res_a, C], x0 [N], wx [N, 1])
            for planes in grid.grids:
                prod = None
                for pi in SPATIAL_PLANES:
                    a, b = PLANE_PAIRS[pi]
                    plane = planes[pi]
                    s = F.grid_sample(plane, q[:, [a, b]].reshape(1, self.n, 1, 2), mode="bilinear",
                                      padding_mode="border", align_corners=True)
                    s = s.reshape(plane.shape[1], self.n)
                    prod = s if prod is None else prod * s
                self._spatial.append(prod.t().contiguous().to(f32))
                look = []
                for pi in TIME_PLANES:
                    a = PLANE_PAIRS[pi][0]
                    plane = planes[pi][0].detach().to(f32).permute(1, 2, 0).contiguous()  # [res_t, res_a, C]
                    res_a = plane.shape[1]
                    x = ((q[:, a] + 1.0) * 0.5 * (res_a - 1)).clamp(0.0, res_a - 1)
                    x0 = x.floor().clamp(0, res_a - 1)
                    look.append((plane, x0.long(), (x - x0).reshape(self.n, 1)))
                self._lookups.append(look)
            self.feat_dim = sum(sp.shape[1] for sp in self._spatial)
            core = net.deformation_net
            self._feature_out = [(m.weight.detach().t().contiguous().to(f32), m.bias.detach().to(f32))
                                 if isinstance(m, nn.Linear) else None for m in core.feature_out]
            self._head_modules = dict(zip(HEAD_NAMES, core.heads()))

    @property
    def head_names(self) -> tuple:
        """The network's heads: ("pos", "scale", "rot"), plus "rigid" for a ``motion="rigid"`` network."""
        return tuple(self._head_modules)

    def _pair_lines(self, plane: torch.Tensor, tq: torch.Tensor) -> torch.Tensor:
        """plane [res_t, res_a, C], mapped times [T] -> [T * res_a, 2C]: row (t, i) holds the line at column i and
        at column i + 1 (the last column repeated), so that one gather fetches both x-neighbours."""
        res_t = plane.shape[0]
        y = ((tq + 1.0) * 0.5 * (res_t - 1)).clamp(0.0, res_t - 1)
        y0 = y.floor().clamp(0, max(res_t - 2, 0)).long()
        y1 = (y0 + 1).clamp(max=res_t - 1)
        wy = (y - y0.to(y.dtype)).reshape(-1, 1, 1)
        line = torch.lerp(plane[y0], plane[y1], wy)  # [T, res_a, C]
        nxt = torch.cat([line[:, 1:], line[:, -1:]], dim=1)
        return torch.cat([line, nxt], dim=2).reshape(-1, 2 * plane.shape[2])

    def _head_weights(self, heads: Sequence[str]):
        mods = [self._head_modules[name] for name in heads]
        w1 = torch.cat([m[1].weight for m in mods], dim=0).detach().t().contiguous().float()
        b1 = torch.cat([m[1].bias for m in mods], dim=0).detach().float()
        w2 = torch.block_diag(*[m[3].weight for m in mods]).detach().t().contiguous().float()
        b2 = torch.cat([m[3].bias for m in mods], dim=0).detach().float()
        return w1, b1, w2, b2

    def _block(self, r0: int, r1: int, tables: list, hw, out: torch.Tensor) -> None:
        """Features and MLP of the (frame, point) rows r0..r1 of a chunk (row = frame * N + point) -> out [B, k].
        Everything for one block stays in the CPU cache."""
        t0, p0 = divmod(r0, self.n)
        if p0 + (r1 - r0) <= self.n:  # the block lies inside one frame: slices instead of gathers
            sel = slice(p0, p0 + r1 - r0)
            take = lambda a: a[sel]  # noqa: E731
            frame_of = lambda res_a: t0 * res_a  # noqa: E731
        else:
            rows = torch.arange(r0, r1)
            t_idx, p_idx = rows // self.n, rows % self.n
            take = lambda a: a.index_select(0, p_idx)  # noqa: E731
            frame_of = lambda res_a: t_idx * res_a  # noqa: E731
        feat = torch.empty(r1 - r0, self.feat_dim)
        c0 = 0
        for spatial, look, tabs in zip(self._spatial, self._lookups, tables):
            C = spatial.shape[1]
            dst = feat[:, c0:c0 + C]
            dst.copy_(take(spatial))
            for (plane, x0, wx), tab in zip(look, tabs):
                g = tab.index_select(0, take(x0) + frame_of(plane.shape[1]))  # [B, 2C]
                dst.mul_(torch.lerp(g[:, :C], g[:, C:], take(wx)))
            c0 += C
        h = feat
        linear_seen = False
        for layer in self._feature_out:
            if layer is None:
                h = h.relu_()
            else:
                h = torch.addmm(layer[1], h, layer[0])
                linear_seen = True
        h = h.relu_() if linear_seen else F.relu(h)
        w1, b1, w2, b2 = hw
        z = torch.addmm(b1, h, w1).relu_()
        torch.addmm(b2, z, w2, out=out)

    @torch.no_grad()
    def deltas(self, times, heads: Sequence[str] | None = None,
               on_chunk: Callable[[int, int], None] | None = None) -> dict:
        heads = self.head_names if heads is None else tuple(heads)
        times = torch.as_tensor(np.asarray(times, dtype=np.float64), dtype=torch.float32).reshape(-1)
        tq = self.net.grid.map_time(times)
        T = times.shape[0]
        sizes = [self.HEAD_SIZES[name] for name in heads]
        res = torch.empty(T, self.n, sum(sizes))
        flat = res.view(-1, res.shape[2])
        hw = self._head_weights(heads)
        per_chunk = max(1, self.chunk_points // max(self.n, 1))
        for s in range(0, T, per_chunk):
            e = min(T, s + per_chunk)
            tables = [[self._pair_lines(plane, tq[s:e]) for plane, _, _ in look] for look in self._lookups]
            total = (e - s) * self.n
            for r0 in range(0, total, self.mlp_rows):
                r1 = min(total, r0 + self.mlp_rows)
                self._block(r0, r1, tables, hw, flat[s * self.n + r0:s * self.n + r1])
            if on_chunk is not None:
                on_chunk(e, T)
        return dict(zip(heads, res.split(sizes, dim=2)))


def _np32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def sample_frames(animated, frame_values, on_chunk: Callable[[int, int], None] | None = None,
                  chunk_points: int = 65536) -> SampledFrames:
    """Raw Gaussians of ``animated`` (an ``AnimatedGaussians``) at source-frame values ``frame_values``
    (t = f / num_frames, f may be fractional). Same count and order of Gaussians in every frame."""
    fv = np.asarray(frame_values, dtype=np.float64).reshape(-1)
    times = fv / float(animated.num_frames)
    p = animated.model.params
    with torch.no_grad():
        xyz = p["xyz"].detach().float().cpu()
        scaling = p["scaling"].detach().float().cpu()
        rotation = p["rotation"].detach().float().cpu()
        if animated.deformation is None:
            T = len(fv)
            d = {"pos": torch.zeros(T, *xyz.shape), "scale": torch.zeros(T, *scaling.shape),
                 "rot": torch.zeros(T, *rotation.shape)}
        else:
            net = animated.deformation.to("cpu")
            d = FrameSampler(net, xyz, chunk_points).deltas(times, on_chunk=on_chunk)
        # [1, N, k] canonical values broadcast against the [T, N, k] head outputs.
        deltas = tuple(d[h] for h in HEAD_NAMES if h in d)
        moved = apply_deltas(xyz.unsqueeze(0), scaling.unsqueeze(0), rotation.unsqueeze(0), deltas)
        xyz_t, scaling_t, rotation_t = (m.numpy() for m in moved)
    return SampledFrames(times, fv, xyz_t, scaling_t, rotation_t, _np32(p["f_dc"]).reshape(-1, 1, 3),
                         _np32(p["f_rest"]).reshape(xyz.shape[0], -1, 3), _np32(p["opacity"]).reshape(-1, 1))


def deform_points(net: DeformationNetwork | None, points: np.ndarray, times, chunk_points: int = 65536
                  ) -> np.ndarray:
    """Positions [T, V, 3] of arbitrary points (e.g. mesh vertices) moved by the field: p + dx(p, t), or
    R(w(p, t)) p + dx(p, t) for a ``motion="rigid"`` network. The field is defined everywhere in space, not only
    at the Gaussians."""
    pts = torch.as_tensor(np.asarray(points, dtype=np.float32))
    times = np.asarray(times, dtype=np.float64).reshape(-1)
    if net is None:
        return np.broadcast_to(pts.numpy(), (len(times),) + tuple(pts.shape)).copy()
    sampler = FrameSampler(net.to("cpu"), pts, chunk_points)
    d = sampler.deltas(times, heads=tuple(h for h in ("pos", "rigid") if h in sampler.head_names))
    q = rotvec_to_quat(d["rigid"]) if "rigid" in d else None
    return move_points(pts.unsqueeze(0), d["pos"], q).numpy()


__all__ = ["FrameSampler", "SampledFrames", "sample_frames", "deform_points", "srgb_to_linear", "SH_C0"]
