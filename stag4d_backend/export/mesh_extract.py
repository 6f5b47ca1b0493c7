"""A closed surface from canonical Gaussians: density grid -> filled occupancy -> marching cubes -> colours.

1. **Density.** D(x) = sum_i o_i exp(-1/2 (x - mu_i)^T (Sigma_i + s^2 I)^-1 (x - mu_i)) on a cubic-voxel grid over
   the opaque Gaussians' bounding box (``resolution`` voxels along the longest side). ``s`` = ``min_sigma`` voxels:
   every Gaussian is at least about a voxel wide, so a shell of thin, flat Gaussians stays watertight on the grid
   (the same idea as 3DGS's screen-space low-pass filter). Each Gaussian is splatted into the voxels within
   ``cutoff`` standard deviations of its centre (at most ``max_radius`` voxels), batched in torch.
2. **Level.** ``level_fraction`` (0.5) x the density scale, which is 1 (the peak of one fully opaque Gaussian), or
   the median density at the Gaussians' centres when that is lower (sparse, faint fits). A relative level such as
   "half the median density at the centres" is too high where many Gaussians overlap: the shell then gets holes.
3. **Solid.** Occupancy = D > level. Closed cavities (the inside of a shell of surface Gaussians) are filled
   (``scipy.ndimage.binary_fill_holes``), so marching cubes yields the outer surface only. Connected components
   (26-connectivity) smaller than ``keep_fraction`` of the largest one are dropped: no flying fragments.
4. **Surface.** ``skimage.measure.marching_cubes`` on the zero-padded grid (so the surface is closed), faces
   oriented outward (checked with the signed volume).
5. **Neighbours.** Each vertex gets its ``k_neighbors`` (16) nearest opaque Gaussians (scipy cKDTree) with
   normalised weights o_i exp(-1/2 Mahalanobis^2) (inverse distance when all kernels vanish). The vertex colour is
   the weighted colour; ``ExtractedMesh.skin`` blends per-Gaussian motion onto the vertices with the same weights.

Pure numpy/torch/scipy/scikit-image; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


class MeshExtractionError(ValueError):
    """No surface could be extracted (e.g. no opaque Gaussians)."""


@dataclass
class ExtractedMesh:
    vertices: np.ndarray       # [V, 3] float32, canonical space (Y-up)
    faces: np.ndarray          # [F, 3] int32, counter-clockwise seen from outside (right-handed, outward normals)
    colors: np.ndarray         # [V, 3] float32 display-referred (sRGB-encoded) colour in [0, 1]
    level: float               # iso-level used
    voxel_size: float
    grid_shape: tuple
    neighbors: np.ndarray      # [V, k] int64, indices (into the input Gaussians) of each vertex's nearest Gaussians
    weights: np.ndarray        # [V, k] float32, their normalised kernel weights (rows sum to 1)
    stats: dict = field(default_factory=dict)

    def skin(self, offsets: np.ndarray) -> np.ndarray:
        """Per-vertex offsets [..., V, 3] blended from per-Gaussian offsets [..., N, 3] with ``weights``."""
        offsets = np.asarray(offsets, dtype=np.float32)
        out = np.zeros(offsets.shape[:-2] + (self.vertices.shape[0], 3), np.float32)
        for j in range(self.neighbors.shape[1]):
            out += self.weights[:, j, None] * offsets[..., self.neighbors[:, j], :]
        return out


def _quat_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    q = torch.nn.functional.normalize(q, dim=-1)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def precisions(scales: torch.Tensor, quats: torch.Tensor, extra_var: float = 0.0):
    """(Sigma + extra_var I)^-1 [N, 3, 3] and the largest standard deviation [N] of each Gaussian."""
    R = _quat_to_rotmat(quats.double())
    cov = R @ torch.diag_embed(scales.double() ** 2) @ R.transpose(1, 2)
    cov = cov + extra_var * torch.eye(3, dtype=cov.dtype)
    return torch.linalg.inv(cov).float(), torch.sqrt(torch.linalg.eigvalsh(cov)[:, -1]).float()


def density_grid(means, scales, quats, opacities, resolution: int = 128, min_sigma: float = 0.75,
                 cutoff: float = 3.0, max_radius: int = 16, opacity_floor: float = 0.05, max_evals: int = 1 << 22):
    """(D [X, Y, Z] float32, origin [3], voxel size, prec [N,3,3], used mask [N]). See the module docstring."""
    means = torch.as_tensor(np.asarray(means), dtype=torch.float32)
    scales = torch.as_tensor(np.asarray(scales), dtype=torch.float32)
    quats = torch.as_tensor(np.asarray(quats), dtype=torch.float32)
    opac = torch.as_tensor(np.asarray(opacities), dtype=torch.float32).reshape(-1)
    used = opac >= opacity_floor
    if not bool(used.any()):
        raise MeshExtractionError(f"no Gaussian has opacity >= {opacity_floor}; nothing to mesh")
    mu, sc, qu, op = means[used], scales[used], quats[used], opac[used]
    # Bounding box: the opaque centres, padded by 3 typical sigmas, then 4 voxels on each side.
    lo, hi = mu.min(0).values, mu.max(0).values
    pad = 3.0 * float(sc.max(1).values.median())
    lo, hi = lo - pad, hi + pad
    voxel = float((hi - lo).max().clamp_min(1e-6)) / max(resolution - 9, 8)
    lo, hi = lo - 4 * voxel, hi + 4 * voxel
    shape = tuple(int(v) for v in (torch.ceil((hi - lo) / voxel).long() + 1).tolist())
    origin = lo
    prec, sig_max = precisions(sc, qu, (min_sigma * voxel) ** 2)
    radius = torch.ceil(cutoff * sig_max / voxel).long().clamp(1, max_radius)
    grid = torch.zeros(int(np.prod(shape)), dtype=torch.float32)
    strides = torch.tensor([shape[1] * shape[2], shape[2], 1])
    dims = torch.tensor(shape)
    centre = torch.round((mu - origin) / voxel).long()
    c2 = cutoff * cutoff
    for r in torch.unique(radius).tolist():
        sel = (radius == r).nonzero(as_tuple=True)[0]
        ax = torch.arange(-r, r + 1)
        off = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)  # [K, 3] voxel offsets
        off_w = off.float() * voxel                                                     # [K, 3] world offsets
        off_flat = (off * strides).sum(-1)                                              # [K] flat offsets
        step = max(1, max_evals // off.shape[0])
        for s in range(0, sel.numel(), step):
            idx = sel[s:s + step]
            c = centre[idx]
            d = (origin + c.float() * voxel - mu[idx])[:, None, :] + off_w[None]          # [B, K, 3]
            m = (torch.bmm(d, prec[idx]) * d).sum(-1)                                   # Mahalanobis^2 [B, K]
            val = (op[idx, None] * torch.exp(-0.5 * m)).masked_fill_(m >= c2, 0.0)
            flat = (c * strides).sum(-1)[:, None] + off_flat[None]                      # [B, K]
            edge = ~((c - r >= 0) & (c + r < dims)).all(-1)  # windows that cross the grid border
            if bool(edge.any()):
                vox = c[edge][:, None, :] + off[None]
                ok = ((vox >= 0) & (vox < dims)).all(-1)
                val[edge] = val[edge] * ok
                flat[edge] = torch.where(ok, flat[edge], torch.zeros_like(flat[edge]))
            grid.index_add_(0, flat.reshape(-1), val.reshape(-1))
    return grid.reshape(shape).numpy(), origin.numpy().astype(np.float64), voxel, prec, used


def _orient_outward(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    signed_volume = np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0
    return faces if signed_volume >= 0 else faces[:, ::-1].copy()


def kernel_neighbors(points: np.ndarray, mu: np.ndarray, prec: np.ndarray, opac: np.ndarray, k: int):
    """(indices [P, k], weights [P, k]) of the k nearest centres ``mu`` of each point, weighted by
    o_i exp(-1/2 (p - mu_i)^T prec_i (p - mu_i)) and normalised; inverse distance where all kernels vanish."""
    from scipy.spatial import cKDTree

    k = int(min(k, mu.shape[0]))
    dist, nn = cKDTree(mu).query(points, k=k)
    if k == 1:
        dist, nn = dist[:, None], nn[:, None]
    d = (points[:, None, :] - mu[nn]).astype(np.float32)                      # [P, k, 3]
    m = np.einsum("pki,pkij,pkj->pk", d, prec[nn], d)
    w = opac[nn] * np.exp(-0.5 * np.minimum(m, 80.0))
    fallback = w.sum(1) < 1e-8
    w[fallback] = 1.0 / np.maximum(dist[fallback], 1e-6)
    return nn, (w / w.sum(1, keepdims=True)).astype(np.float32)


def extract_mesh(means, scales, quats, opacities, colors, resolution: int = 128, level: float | None = None,
                 level_fraction: float = 0.5, keep_fraction: float = 0.1, k_neighbors: int = 16, **grid_kw
                 ) -> ExtractedMesh:
    """The closed, outward-oriented surface of the Gaussians with per-vertex colours (see the module docstring).
    ``colors`` [N, 3] are the Gaussians' display colours."""
    from scipy import ndimage
    from skimage.measure import marching_cubes

    D, origin, voxel, prec, used = density_grid(means, scales, quats, opacities, resolution=resolution, **grid_kw)
    mu = np.asarray(means, dtype=np.float32)[used.numpy()]
    op = np.asarray(opacities, dtype=np.float32).reshape(-1)[used.numpy()]
    if level is None:
        # Half the peak of one opaque Gaussian; lower for sparse, faint fits whose density never gets there.
        at = np.clip(np.round((mu - origin) / voxel).astype(np.int64), 0, np.array(D.shape) - 1)
        dens = D[at[:, 0], at[:, 1], at[:, 2]]
        level = float(level_fraction * min(1.0, float(np.median(dens))))
    if not level > 0:
        raise MeshExtractionError("the density is zero everywhere; nothing to mesh")
    occ = D > level
    solid = ndimage.binary_fill_holes(occ)
    labels, count = ndimage.label(solid, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        raise MeshExtractionError(f"no voxel above the iso-level {level:.4g}; nothing to mesh")
    sizes = np.bincount(labels.ravel())[1:]
    keep_ids = np.nonzero(sizes >= keep_fraction * sizes.max())[0] + 1
    kept = np.isin(labels, keep_ids)
    # Density for marching cubes: cavities raised above the level, dropped components and everything farther than
    # two voxels from a kept component set to zero.
    near = ndimage.binary_dilation(kept, iterations=2)
    field = np.where(kept & ~occ, np.maximum(D, 2.0 * level), D)
    field = np.where(near, field, 0.0).astype(np.float32)
    field = np.pad(field, 1)
    verts, faces, _, _ = marching_cubes(field, level=level, spacing=(voxel, voxel, voxel), allow_degenerate=False)
    verts = (verts - voxel + origin).astype(np.float32)  # undo the one-voxel pad
    faces = _orient_outward(verts.astype(np.float64), faces.astype(np.int32))
    # Each vertex's nearest opaque Gaussians, weighted by their kernel at the vertex: colours now, motion later.
    used_idx = np.nonzero(used.numpy())[0]
    nn, w = kernel_neighbors(verts, mu, prec.numpy(), op, k_neighbors)
    col = np.asarray(colors, dtype=np.float32).reshape(-1, 3)[used_idx]
    vcol = np.einsum("vk,vkc->vc", w, col[nn])
    stats = {"components_total": int(count), "components_kept": int(len(keep_ids)),
             "voxels_kept": int(kept.sum()), "voxels_dropped": int(solid.sum() - kept.sum()),
             "cavity_voxels_filled": int((solid & ~occ).sum())}
    return ExtractedMesh(verts, faces.astype(np.int32), np.clip(vcol, 0.0, 1.0).astype(np.float32), level, voxel,
                         tuple(D.shape), used_idx[nn].astype(np.int64), w.astype(np.float32), stats)


__all__ = ["extract_mesh", "density_grid", "kernel_neighbors", "ExtractedMesh", "MeshExtractionError", "precisions"]
