"""Tiled alpha compositing of projected 2D Gaussians in PyTorch (CPU or any device), with a hand-written
backward pass.

THE COMPOSITOR CONTRACT (shared with ``composite_cpp.composite_cpp`` and ``reference.composite_reference``)
---------------------------------------------------------------------------------------------------------
::

    composite_torch(means2d [N,2], conics [N,3], features [N,C], opacities [N], depths [N],
                    radii [N,2] int32, width, height, tile_size=16) -> (image [H,W,C], alpha [H,W])

* ``conics = (a, b, c)``, the upper triangle of the inverse 2D covariance. For pixel ``(px, py)`` with centre
  ``(px + 0.5, py + 0.5)`` and ``(dx, dy) = means2d - centre``:
  ``sigma = 0.5 * (a dx^2 + c dy^2) + b dx dy``.
* ``depths`` is only the sort key: Gaussians are composited front to back in ascending depth (ties keep the
  input order: a stable sort).
* Gaussians with any radius ``<= 0`` are skipped entirely.
* Per pixel, ``T = 1``; for each Gaussian in order: ``alpha = min(0.999, opacity * exp(-sigma))``; skip it
  if ``sigma < 0`` or ``alpha < 1/255``; ``next_T = T (1 - alpha)``; if ``next_T <= 1e-4`` the pixel is done
  and this Gaussian is NOT added; otherwise ``image += alpha T features``, ``T = next_T``.
  ``alpha_out = 1 - T`` at the end. (gsplat 1.5 ``rasterize_to_pixels``, classic mode, no background.)
* The radii boxes are only a culling aid: every pixel a Gaussian can reach with ``alpha >= 1/255`` lies within
  ``means2d +- radii``, so evaluating every non-skipped Gaussian at every pixel gives the same image.
* Differentiable w.r.t. ``means2d``, ``conics``, ``features`` and ``opacities`` (not ``depths``, ``radii``).
  Works in float32 and float64; outputs have the dtype of ``means2d``.

How this implementation works
-----------------------------
Gaussians are binned to ``tile_size`` x ``tile_size`` tiles from their radii boxes (the same boxes as gsplat's
``isect_tiles``), the (tile, Gaussian) pairs are sorted by (tile, depth rank), and tiles are processed in
chunks (busiest first) with a padded ``[tiles, pixels, K]`` gather; a chunk holds at most ``CHUNK_ELEMENTS``
such entries, which bounds memory. ``sigma`` is one float64 matmul of a per-pixel basis
``(u^2, uv, v^2, u, v, 1)`` with per-(tile, Gaussian) polynomial coefficients (exact, then rounded).
Transmittance is a sequential ``cumprod`` of ``[T_in, 1 - alpha_1, 1 - alpha_2, ...]`` (bit-identical to the
per-pixel loop); the early stop is the suffix where that product is ``<= 1e-4``. The forward walks a chunk's
Gaussians in runs of ``FORWARD_BLOCK`` and stops once every pixel of the chunk is done.

The backward pass recomputes each chunk (nothing large is saved), truncated after the last Gaussian any of
its pixels used, and applies the analytic gradient that gsplat's CUDA backward uses
(``dL/dalpha_k = T_k G_k + (T_final dL/dalpha_out - sum_{j>k} w_j G_j) / (1 - alpha_k)`` with
``G_k = features_k . dL/dimage``, zero through the 0.999 cap, skipped and stopped Gaussians). It is checked
against autograd through the dense reference and against finite differences in ``tests/test_rasterize.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

ALPHA_THRESHOLD = 1.0 / 255.0
T_THRESHOLD = 1e-4
MAX_ALPHA = 0.999

#: Upper bound on the entries of one [tiles, pixels, K] work tensor (about a dozen are alive at once).
CHUNK_ELEMENTS = int(os.environ.get("STAG4D_RASTER_CHUNK", 1 << 21))
#: The forward pass walks each chunk's Gaussians in runs of this many and stops when all its pixels are done.
FORWARD_BLOCK = int(os.environ.get("STAG4D_RASTER_BLOCK", 256))


@dataclass
class _Plan:
    """Binning result (no gradients): which Gaussians touch which tile, in depth order."""

    n: int
    width: int
    height: int
    tile_size: int
    tiles_x: int
    tiles_y: int
    sorted_ids: Tensor  # [M] int64 Gaussian ids, grouped by tile, front to back inside a tile
    tile_start: Tensor  # [T] int64 offset of each tile's run in sorted_ids
    tile_count: Tensor  # [T] int64 length of each tile's run
    chunks: list  # list of (tile ids tensor [nt], K)
    basis: Tensor  # [P, 6] float64 (u^2, uv, v^2, u, v, 1), (u, v) = pixel centre - tile centre


def _make_plan(means2d: Tensor, depths: Tensor, radii: Tensor, width: int, height: int, tile_size: int,
               chunk_elements: int) -> _Plan:
    device = means2d.device
    n = means2d.shape[0]
    ts = int(tile_size)
    tiles_x = (width + ts - 1) // ts
    tiles_y = (height + ts - 1) // ts
    n_tiles = tiles_x * tiles_y
    p = ts * ts
    with torch.no_grad():
        radii = radii.to(device)
        valid = (radii > 0).all(dim=-1)
        vid = torch.nonzero(valid, as_tuple=False).squeeze(1)
        m = means2d.detach()[vid].to(torch.float64)
        r = radii[vid].to(torch.float64)
        # gsplat isect_tiles: tile_min = floor((x - r) / ts), tile_max = ceil((x + r) / ts) (exclusive)
        tx0 = torch.floor((m[:, 0] - r[:, 0]) / ts).clamp(0, tiles_x).long()
        tx1 = torch.ceil((m[:, 0] + r[:, 0]) / ts).clamp(0, tiles_x).long()
        ty0 = torch.floor((m[:, 1] - r[:, 1]) / ts).clamp(0, tiles_y).long()
        ty1 = torch.ceil((m[:, 1] + r[:, 1]) / ts).clamp(0, tiles_y).long()
        bw = (tx1 - tx0).clamp_min(0)
        bh = (ty1 - ty0).clamp_min(0)
        counts = bw * bh
        nv = vid.numel()
        # depth rank (stable: ties keep the input order)
        order = torch.sort(depths.detach()[vid], stable=True).indices
        rank = torch.empty_like(order)
        rank[order] = torch.arange(nv, device=device)

        total = int(counts.sum())
        if total > 0:
            g = torch.repeat_interleave(torch.arange(nv, device=device), counts)
            start = torch.cumsum(counts, 0) - counts
            local = torch.arange(total, device=device) - start[g]
            gw = bw[g]
            tile = (ty0[g] + local // gw) * tiles_x + tx0[g] + local % gw
            key = tile * max(nv, 1) + rank[g]
            key_sorted, perm = torch.sort(key)
            sorted_ids = vid[g[perm]]
            sorted_tile = key_sorted // max(nv, 1)
            tile_count = torch.bincount(sorted_tile, minlength=n_tiles)
        else:
            sorted_ids = torch.zeros(0, dtype=torch.long, device=device)
            tile_count = torch.zeros(n_tiles, dtype=torch.long, device=device)
        tile_start = torch.cumsum(tile_count, 0) - tile_count

        # chunk schedule: busiest tiles first, so the padding inside a chunk stays small
        active = torch.nonzero(tile_count > 0, as_tuple=False).squeeze(1)
        cnt = tile_count[active]
        srt = torch.sort(cnt, descending=True)
        active = active[srt.indices]
        cnt_list = srt.values.tolist()
        chunks = []
        i = 0
        while i < len(cnt_list):
            k = int(cnt_list[i])
            nt = max(1, chunk_elements // (k * p))
            chunks.append((active[i:i + nt], k))
            i += nt

        ar = torch.arange(ts, device=device, dtype=torch.float64) + 0.5 - 0.5 * ts
        v, u = torch.meshgrid(ar, ar, indexing="ij")  # row-major pixels inside a tile
        u, v = u.reshape(-1), v.reshape(-1)
        basis = torch.stack([u * u, u * v, v * v, u, v, torch.ones_like(u)], dim=-1)
    return _Plan(n=n, width=width, height=height, tile_size=ts, tiles_x=tiles_x, tiles_y=tiles_y,
                 sorted_ids=sorted_ids, tile_start=tile_start, tile_count=tile_count, chunks=chunks,
                 basis=basis)


def _gather_ids(plan: _Plan, tiles: Tensor, k: int) -> Tensor:
    """[nt, k] Gaussian ids of each tile's run, padded with the dummy id ``plan.n``."""
    ar = torch.arange(k, device=tiles.device)
    pos = plan.tile_start[tiles][:, None] + ar[None, :]
    inside = ar[None, :] < plan.tile_count[tiles][:, None]
    if plan.sorted_ids.numel() == 0:
        return torch.full(pos.shape, plan.n, dtype=torch.long, device=tiles.device)
    pos = pos.clamp_max(plan.sorted_ids.numel() - 1)
    return torch.where(inside, plan.sorted_ids[pos], torch.full_like(pos, plan.n))


def _local_means(plan: _Plan, tiles: Tensor, mg: Tensor) -> Tensor:
    """Gaussian means relative to their tile's centre, float64: [nt, K, 2]."""
    ts = plan.tile_size
    cx = (tiles % plan.tiles_x).to(torch.float64) * ts + 0.5 * ts
    cy = (tiles // plan.tiles_x).to(torch.float64) * ts + 0.5 * ts
    return mg.to(torch.float64) - torch.stack([cx, cy], dim=-1)[:, None, :]


def _sigma_coefficients(ml: Tensor, cg: Tensor) -> Tensor:
    """sigma as a quadratic polynomial of the local pixel centre (u, v): coefficients of
    (u^2, uv, v^2, u, v, 1), float64 [nt, K, 6]. With dx = mx - u, dy = my - v (local means):
    sigma = 0.5 a dx^2 + b dx dy + 0.5 c dy^2."""
    a, b, c = cg.to(torch.float64).unbind(-1)
    mx, my = ml.unbind(-1)
    ga = a * mx + b * my
    gb = b * mx + c * my
    return torch.stack([0.5 * a, b, 0.5 * c, -ga, -gb, 0.5 * (mx * ga + my * gb)], dim=-1)


def _chunk_alpha(plan, tiles, ids, mp, cp, op, dtype):
    """Shared forward math for a chunk ([nt, P, K] tensors, P pixels of each tile, K Gaussians).

    sigma is evaluated as one float64 matmul of the pixel basis with per-(tile, Gaussian) coefficients
    (exact to float64 rounding, then rounded to ``dtype``), instead of a dozen elementwise passes.
    Returns (local means f64 [nt,K,2], conics [nt,K,3], vis, raw = opacity * vis, a = alpha or 0 where
    skipped, valid)."""
    mg = mp[ids]  # [nt, K, 2]
    cg = cp[ids]  # [nt, K, 3]
    og = op[ids]  # [nt, K]
    ml = _local_means(plan, tiles, mg)
    coef = _sigma_coefficients(ml, cg)  # [nt, K, 6]
    sigma = torch.matmul(plan.basis, coef.transpose(1, 2)).to(dtype)  # [nt, P, K]
    skip = sigma < 0
    vis = sigma.neg_().exp_()  # sigma's storage is reused
    raw = og[:, None, :] * vis
    alpha = torch.clamp_max(raw, MAX_ALPHA)
    skip |= alpha < ALPHA_THRESHOLD
    a = alpha.masked_fill_(skip, 0.0)  # alpha where drawn, 0 where skipped
    return ml, cg, vis, raw, a, skip


def _transmittance(a: Tensor, t_in: Tensor | None = None, done: Tensor | None = None):
    """Exclusive transmittance with the early stop, for Gaussians ``a`` [nt, P, K] (alpha, 0 = skipped).

    ``t_in`` [nt, P] is the transmittance entering this run of Gaussians (default 1) and ``done`` [nt, P]
    marks pixels that already stopped. The running product is one sequential ``cumprod`` over
    ``[t_in, 1 - a_1, 1 - a_2, ...]``, so it is bit-identical to the per-pixel loop ``T = T * (1 - a)``
    however the Gaussians are split into runs.

    Returns (T_excl [nt,P,K], stopped [nt,P,K] (True from the first Gaussian whose next_T <= 1e-4 on: those
    are not composited), T_final [nt,P] (T after the last composited Gaussian), n_incl [nt,P] (how many of
    these K come before the stop)).
    """
    nt, p, k = a.shape
    buf = a.new_empty((nt, p, k + 1))
    if t_in is None:
        buf[..., 0] = 1.0
    else:
        buf[..., 0] = t_in
    torch.sub(torch.ones((), dtype=a.dtype, device=a.device), a, out=buf[..., 1:])
    buf.cumprod_(-1)
    stopped = buf[..., 1:] <= T_THRESHOLD  # monotone product: a suffix along K
    if done is not None:
        stopped |= done[..., None]
    n_incl = k - stopped.sum(-1)  # [nt, P]
    t_final = torch.gather(buf, -1, n_incl[..., None])[..., 0]
    return buf[..., :k], stopped, t_final, n_incl


def _tiles_to_image(buf: Tensor, plan: _Plan) -> Tensor:
    """[n_tiles, P, ...] -> [H, W, ...]."""
    ts = plan.tile_size
    rest = buf.shape[2:]
    img = buf.reshape((plan.tiles_y, plan.tiles_x, ts, ts) + rest)
    img = img.permute((0, 2, 1, 3) + tuple(range(4, 4 + len(rest))))
    img = img.reshape((plan.tiles_y * ts, plan.tiles_x * ts) + rest)
    return img[: plan.height, : plan.width]


def _image_to_tiles(img: Tensor, plan: _Plan) -> Tensor:
    """[H, W, ...] -> [n_tiles, P, ...] (zero padded outside the image)."""
    ts = plan.tile_size
    rest = img.shape[2:]
    hp, wp = plan.tiles_y * ts, plan.tiles_x * ts
    full = img.new_zeros((hp, wp) + rest)
    full[: plan.height, : plan.width] = img
    t = full.reshape((plan.tiles_y, ts, plan.tiles_x, ts) + rest)
    t = t.permute((0, 2, 1, 3) + tuple(range(4, 4 + len(rest))))
    return t.reshape((plan.tiles_y * plan.tiles_x, ts * ts) + rest)


def _padded(x: Tensor, fill: float = 0.0) -> Tensor:
    """Append one dummy row (the target of padded ids)."""
    return torch.cat([x, x.new_full((1,) + tuple(x.shape[1:]), fill)], dim=0)


class _CompositeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, features, opacities, plan: _Plan):
        dtype = means2d.dtype
        n_tiles = plan.tiles_x * plan.tiles_y
        p = plan.tile_size ** 2
        ch = features.shape[1]
        mp, cp, fp, op = _padded(means2d), _padded(conics), _padded(features), _padded(opacities)
        out = means2d.new_zeros((n_tiles, p, ch))
        t_out = means2d.new_ones((n_tiles, p))
        n_out = torch.zeros((n_tiles, p), dtype=torch.long, device=means2d.device)
        for tiles, k in plan.chunks:
            ids_all = _gather_ids(plan, tiles, k)
            nt = tiles.numel()
            acc = t_run = done = None
            n_run = torch.zeros((nt, p), dtype=torch.long, device=means2d.device)
            # Gaussians in runs of FORWARD_BLOCK, front to back; stop once every pixel of the chunk is done.
            for k0 in range(0, k, FORWARD_BLOCK):
                ids = ids_all[:, k0:k0 + FORWARD_BLOCK]
                a = _chunk_alpha(plan, tiles, ids, mp, cp, op, dtype)[4]
                t_excl, stopped, t_final, n_incl = _transmittance(a, t_run, done)
                w = t_excl.mul_(a).masked_fill_(stopped, 0.0)  # [nt, P, kb]
                contrib = torch.bmm(w, fp[ids])  # [nt, P, C]
                acc = contrib if acc is None else acc.add_(contrib)
                n_run += n_incl
                t_run = t_final
                done = stopped[..., -1].clone()
                if k0 + FORWARD_BLOCK < k and bool(done.all()):
                    break
            out[tiles] = acc
            t_out[tiles] = t_run
            n_out[tiles] = n_run
        ctx.plan = plan
        ctx.save_for_backward(means2d, conics, features, opacities, t_out, n_out)
        image = _tiles_to_image(out, plan)
        alpha = _tiles_to_image(1.0 - t_out, plan)
        return image, alpha

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_image, grad_alpha):
        plan: _Plan = ctx.plan
        means2d, conics, features, opacities, t_out, n_out = ctx.saved_tensors
        dtype = means2d.dtype
        n = plan.n
        need_m, need_c, need_f, need_o = ctx.needs_input_grad[:4]
        v_means = means2d.new_zeros((n + 1, 2))
        v_conics = means2d.new_zeros((n + 1, 3))
        v_feat = means2d.new_zeros((n + 1, features.shape[1]))
        v_op = means2d.new_zeros((n + 1,))
        if grad_image is None:
            grad_image = means2d.new_zeros((plan.height, plan.width, features.shape[1]))
        if grad_alpha is None:
            grad_alpha = means2d.new_zeros((plan.height, plan.width))
        g_tiles = _image_to_tiles(grad_image.to(dtype), plan)  # [n_tiles, P, C]
        ga_tiles = _image_to_tiles(grad_alpha.to(dtype), plan)  # [n_tiles, P]
        mp, cp, fp, op = _padded(means2d), _padded(conics), _padded(features), _padded(opacities)
        zero = torch.zeros((), dtype=dtype)

        for tiles, k in plan.chunks:
            # Gaussians after the last one any pixel of the chunk used cannot matter: truncate K.
            k_used = int(n_out[tiles].max())
            if k_used == 0:
                continue
            ids = _gather_ids(plan, tiles, k_used)
            ml, cg, vis, raw, a, skip = _chunk_alpha(plan, tiles, ids, mp, cp, op, dtype)
            t_excl, stopped, t_final, _ = _transmittance(a)
            w = (a * t_excl).masked_fill_(stopped, 0.0)  # [nt, P, K]
            g = g_tiles[tiles]  # [nt, P, C]
            fg = fp[ids]  # [nt, K, C]
            flat_ids = ids.reshape(-1)
            if need_f:
                v_feat.index_add_(0, flat_ids, torch.bmm(w.transpose(1, 2), g).reshape(-1, fg.shape[-1]))
            if not (need_m or need_c or need_o):
                continue
            gk = torch.bmm(g, fg.transpose(1, 2))  # [nt, P, K]: features_k . dL/dimage
            wg = w.mul_(gk)
            s_after = torch.cumsum(wg, dim=-1).neg_().add_(wg.sum(-1, keepdim=True))  # sum over j > k
            del w, wg
            ga_t = (ga_tiles[tiles] * t_final)[..., None]  # [nt, P, 1]: dL/dalpha_out * T_final
            # dL/dalpha_k = T_k G_k + (T_final dL/dalpha_out - sum_{j>k} w_j G_j) / (1 - alpha_k)
            v_alpha = s_after.neg_().add_(ga_t).div_(1.0 - a).add_(t_excl.mul_(gk))
            del s_after, t_excl, gk
            dead = stopped.logical_or_(skip).logical_or_(raw > MAX_ALPHA)  # no gradient through these
            v_alpha.masked_fill_(dead, 0.0)
            if need_o:
                v_op.index_add_(0, flat_ids, (v_alpha * vis).sum(1).reshape(-1))
            if need_m or need_c:
                # dL/dsigma = -dL/dalpha * opacity * vis; its moments against the pixel basis give the
                # gradients of the sigma polynomial's coefficients, then the chain rule to (means, conics).
                v_sigma = v_alpha.mul_(raw).to(torch.float64)
                mom = torch.matmul(v_sigma.transpose(1, 2), plan.basis).neg_()  # [nt, K, 6] dL/dcoef
                m0, m1, m2, m3, m4, m5 = mom.unbind(-1)
                mx, my = ml.unbind(-1)
                ca, cb, cc = cg.to(torch.float64).unbind(-1)
                if need_m:
                    vmx = -ca * m3 - cb * m4 + (ca * mx + cb * my) * m5
                    vmy = -cb * m3 - cc * m4 + (cb * mx + cc * my) * m5
                    v_means.index_add_(0, flat_ids, torch.stack([vmx, vmy], -1).reshape(-1, 2).to(dtype))
                if need_c:
                    va = 0.5 * m0 - mx * m3 + 0.5 * mx * mx * m5
                    vb = m1 - my * m3 - mx * m4 + mx * my * m5
                    vc = 0.5 * m2 - my * m4 + 0.5 * my * my * m5
                    v_conics.index_add_(0, flat_ids, torch.stack([va, vb, vc], -1).reshape(-1, 3).to(dtype))

        return (
            v_means[:n] if need_m else None,
            v_conics[:n] if need_c else None,
            v_feat[:n] if need_f else None,
            v_op[:n] if need_o else None,
            None,
        )


def composite_torch(
    means2d: Tensor,
    conics: Tensor,
    features: Tensor,
    opacities: Tensor,
    depths: Tensor,
    radii: Tensor,
    width: int,
    height: int,
    tile_size: int = 16,
    *,
    chunk_elements: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Composite projected Gaussians front to back; see the module docstring for the exact contract.

    Returns ``(image [H, W, C], alpha [H, W])`` without background.
    """
    width, height, tile_size = int(width), int(height), int(tile_size)
    dtype = means2d.dtype
    features = features.to(dtype)
    conics = conics.to(dtype)
    opacities = opacities.to(dtype)
    if radii.dim() == 1:
        radii = radii[:, None].expand(-1, 2)
    plan = _make_plan(means2d, depths, radii, width, height, tile_size,
                      chunk_elements if chunk_elements is not None else CHUNK_ELEMENTS)
    return _CompositeFn.apply(means2d, conics, features, opacities, plan)


__all__ = ["composite_torch", "ALPHA_THRESHOLD", "T_THRESHOLD", "MAX_ALPHA"]
