"""STAG4D's adaptive (percentile) densification, shaped like a gsplat ``Strategy`` (algorithm spec section 6).

Design
------
- ``AdaptiveDensification`` is a dataclass of options; its mutable statistics live in a ``state`` dict created
  by ``initialize_state()`` and passed back on every call (gsplat's convention, so a checkpoint can store it).
- ``params`` is a mutable mapping name -> per-Gaussian tensor (every entry has leading dim N), normally
  ``GaussianModel.params`` (an ``nn.ParameterDict``). Entries are *replaced* (never resized in place) and written
  back into the same mapping. Extra per-Gaussian tensors that are not optimised (e.g. a bool deformation table)
  go in the optional ``extras`` mapping and receive the same clone/split/prune treatment.
- ``optimizers`` may be one optimizer with named groups (the authors' layout), a dict name -> optimizer (gsplat's
  layout) or any iterable of optimizers: parameters are found by identity in the param groups, so any layout works.
  Optimiser state surgery: every tensor state entry with leading dim N (``exp_avg``, ``exp_avg_sq``, ...) is
  indexed like the parameter; scalar entries such as Adam's ``step`` are kept. Clones get zero moments
  (``clone_moments="zero"``, faithful) or copies of the parent's (``"copy"``); split children get zero moments;
  pruned rows are dropped; kept rows keep their moments unchanged.

Per iteration (faithful order: after ``loss.backward()`` *and* ``optimizer.step()``), call::

    strategy.step_post_backward(params, optimizer, state, it, info={"grad2d": g, "visible": vis})

where ``g`` are the screen-space mean gradients in the Inria rasteriser's NDC units: either one [N, 2] tensor
already summed over the iteration's renders, or a stack [R, N, 2] of per-render gradients; ``vis`` is [N] or
[R, N] bool (radii > 0). gsplat's ``means2d`` gradients are in pixels: pass ``info["image_sizes"]`` = (W, H) or a
list of per-render (W, H) and they are multiplied by (W/2, H/2) per render before summing (``to_ndc_grad``).
``accumulate`` and ``densify_and_prune`` are public for callers that drive the two halves themselves.

No printing; each event's counts are returned and stored in ``state["last_event"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, MutableMapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .model import quaternion_to_rotation_matrix

OptimizerLike = Union[torch.optim.Optimizer, Mapping[str, torch.optim.Optimizer], Iterable[torch.optim.Optimizer]]


def to_ndc_grad(grad_px: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """Pixel-space 2D mean gradients [..., 2] -> the Inria rasteriser's NDC-scaled units: multiply by (W/2, H/2).

    (A pixel coordinate is u = (x_ndc + 1) * W / 2 - 0.5, so dL/dx_ndc = dL/du * W / 2.)
    """
    scale = grad_px.new_tensor([width / 2.0, height / 2.0])
    return grad_px[..., :2] * scale


def _optimizer_list(optimizers: Optional[OptimizerLike]) -> List[torch.optim.Optimizer]:
    if optimizers is None:
        return []
    if isinstance(optimizers, torch.optim.Optimizer):
        return [optimizers]
    if isinstance(optimizers, Mapping):
        return list(optimizers.values())
    return list(optimizers)


@dataclass
class AdaptiveDensification:
    """Options (defaults = the authors' numbers; ``extent`` = 1 world unit).

    Schedule: statistics are accumulated for ``refine_start <= it <= refine_stop``; a densify+prune event happens
    when also ``(it - event_offset) % refine_every == 0`` (1201, 1301, ..., 5901: 48 events).
    """

    # --- schedule
    refine_start: int = 1200
    refine_stop: int = 6000
    refine_every: int = 100
    event_offset: int = 1
    # --- statistics
    grad_mode: str = "sum_then_norm"  # faithful: norm of the per-iteration SUM over renders | "per_render" (3DGS)
    # --- threshold
    threshold_mode: str = "percentile"  # faithful: floor(fraction*M)-th largest non-zero mean grad | "fixed"
    densify_fraction: float = 0.025  # "densify_grad_threshold_percent"
    grad_threshold: float = 2e-4  # fixed mode (vanilla 3DGS), NDC units as the Inria rasteriser
    # --- clone / split
    percent_dense: float = 0.1
    scene_extent: float = 1.0
    split_n: int = 2
    split_scale_divisor: float = 1.6  # children get log(s / 1.6) (= 0.8 * N in the 3DGS code)
    clone_moments: str = "zero"  # faithful "zero" | "copy" (the parent's Adam moments)
    max_gaussians: Optional[int] = None  # skip clone/split while N >= this (None or <= 0: no cap, faithful)
    # --- prune
    prune_opacity: float = 0.01  # sigmoid(opacity) < this
    prune_big_scale: Optional[float] = 0.1  # max(scale) > this * extent (None: off)
    prune_small_scale: Optional[float] = 0.001  # max(scale) < this (world units; None: off)
    min_gaussians: int = 1  # never prune below this many: the highest-opacity candidates are kept
    # --- misc
    seed: Optional[int] = None  # seeds the split sampling (None: global torch RNG)
    xyz_key: str = "xyz"
    scaling_key: str = "scaling"
    rotation_key: str = "rotation"
    opacity_key: str = "opacity"

    def __post_init__(self):
        if self.grad_mode not in ("sum_then_norm", "per_render"):
            raise ValueError("grad_mode must be 'sum_then_norm' or 'per_render'")
        if self.threshold_mode not in ("percentile", "fixed"):
            raise ValueError("threshold_mode must be 'percentile' or 'fixed'")
        if self.clone_moments not in ("zero", "copy"):
            raise ValueError("clone_moments must be 'zero' or 'copy'")
        if self.refine_every < 1 or self.split_n < 1:
            raise ValueError("refine_every and split_n must be >= 1")

    # ------------------------------------------------------------------------------------------- state

    def initialize_state(self, num_points: Optional[int] = None) -> Dict[str, Any]:
        """``grad2d``/``count`` [N] float accumulators (created lazily when N is unknown), ``rng_state`` (the
        CPU generator state of the split sampling, a uint8 tensor, when ``seed`` is set) and the bookkeeping of
        the last event. Only tensors, numbers and None: saves with ``torch.save`` and loads with
        ``torch.load(weights_only=True)``."""
        state: Dict[str, Any] = {"grad2d": None, "count": None, "rng_state": None, "last_event": None,
                                 "num_events": 0}
        if self.seed is not None:
            state["rng_state"] = torch.Generator().manual_seed(int(self.seed)).get_state()
        if num_points is not None:
            state["grad2d"] = torch.zeros(int(num_points))
            state["count"] = torch.zeros(int(num_points))
        return state

    def is_stats_step(self, it: int) -> bool:
        return self.refine_start <= it <= self.refine_stop

    def is_event_step(self, it: int) -> bool:
        return self.is_stats_step(it) and (it - self.event_offset) % self.refine_every == 0

    def check_sanity(self, params: Mapping[str, torch.Tensor], optimizers: Optional[OptimizerLike] = None) -> None:
        """Required keys present, every entry per-Gaussian, every Parameter that requires grad in an optimizer."""
        for key in (self.xyz_key, self.scaling_key, self.rotation_key, self.opacity_key):
            if key not in params:
                raise KeyError(f"params has no {key!r}")
        n = params[self.xyz_key].shape[0]
        for name, p in params.items():
            if p.shape[0] != n:
                raise ValueError(f"params[{name!r}] has leading dim {p.shape[0]}, expected N = {n}")
        known = {id(q) for opt in _optimizer_list(optimizers) for g in opt.param_groups for q in g["params"]}
        if optimizers is not None:
            for name, p in params.items():
                if isinstance(p, nn.Parameter) and p.requires_grad and id(p) not in known:
                    raise ValueError(f"params[{name!r}] is not in any optimizer")

    # ------------------------------------------------------------------------------------------- statistics

    def accumulate(
        self,
        state: Dict[str, Any],
        grads: torch.Tensor,
        visible: torch.Tensor,
        image_sizes: Optional[Union[Tuple[float, float], Sequence[Tuple[float, float]]]] = None,
        step: Optional[int] = None,
    ) -> None:
        """Add one iteration of screen-space gradient statistics.

        grads: [N, 2] (already summed over the iteration's renders) or [R, N, 2] (per render); visible: [N] or
        [R, N] bool. ``image_sizes`` converts pixel-unit gradients to NDC units per render (see module doc).
        sum_then_norm (faithful): g = ||sum_r grad_r||, accum += g and count += 1 where visible in any render.
        per_render (vanilla 3DGS): accum += ||grad_r|| and count += 1 for every render where visible.
        With ``step`` given, nothing happens outside [refine_start, refine_stop].
        """
        if step is not None and not self.is_stats_step(step):
            return
        grads = grads.detach()[..., :2].float()
        if grads.dim() == 2:
            grads = grads.unsqueeze(0)
        visible = visible.detach().to(torch.bool)
        if visible.dim() == 1:
            visible = visible.unsqueeze(0).expand(grads.shape[0], -1)
        r, n = grads.shape[0], grads.shape[1]
        if visible.shape != (r, n):
            raise ValueError(f"visible has shape {tuple(visible.shape)}, expected {(r, n)} or {(n,)}")
        if image_sizes is not None:
            sizes = [image_sizes] if isinstance(image_sizes[0], (int, float)) else list(image_sizes)
            if len(sizes) == 1 and r > 1:
                sizes = sizes * r
            if len(sizes) != r:
                raise ValueError("one image size per render is needed")
            scale = grads.new_tensor([[w / 2.0, h / 2.0] for w, h in sizes]).unsqueeze(1)  # [R, 1, 2]
            grads = grads * scale
        if state.get("grad2d") is None:
            state["grad2d"] = torch.zeros(n, device=grads.device)
            state["count"] = torch.zeros(n, device=grads.device)
        if state["grad2d"].shape[0] != n:
            raise ValueError(f"statistics hold {state['grad2d'].shape[0]} Gaussians, got gradients for {n}")
        accum, count = state["grad2d"], state["count"]
        if accum.device != grads.device:
            state["grad2d"] = accum = accum.to(grads.device)
            state["count"] = count = count.to(grads.device)
        if self.grad_mode == "sum_then_norm":
            g = torch.linalg.vector_norm(grads.sum(0), dim=-1)
            vis = visible.any(0)
            accum += torch.where(vis, g, torch.zeros_like(g))
            count += vis.to(count.dtype)
        else:
            g = torch.linalg.vector_norm(grads, dim=-1)  # [R, N]
            accum += torch.where(visible, g, torch.zeros_like(g)).sum(0)
            count += visible.to(count.dtype).sum(0)

    def mean_grads(self, state: Mapping[str, Any], n: int, device=None) -> torch.Tensor:
        """accum / count with NaN (count 0) -> 0; zeros when nothing was accumulated."""
        accum, count = state.get("grad2d"), state.get("count")
        if accum is None or accum.shape[0] != n:
            if accum is not None and accum.shape[0] != n:
                raise ValueError(f"statistics hold {accum.shape[0]} Gaussians, params hold {n}")
            return torch.zeros(n, device=device)
        g = accum / count
        return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0).to(device if device is not None else g.device)

    def threshold(self, mean_grads: torch.Tensor) -> Optional[float]:
        """tau, or None when there is nothing to densify.

        percentile: the M non-zero finite mean gradients sorted descending, tau = value at index
        int(fraction * M), clamped to M - 1 (the authors crash for M = 0 or an index >= M; here M = 0 -> None).
        The authors take exp(log(.)) of the sorted value; we use the value itself (differs by at most an ulp).
        fixed: ``grad_threshold``.
        """
        if self.threshold_mode == "fixed":
            return float(self.grad_threshold)
        g = mean_grads[torch.isfinite(mean_grads) & (mean_grads > 0)]
        m = g.numel()
        if m == 0:
            return None
        idx = min(int(self.densify_fraction * m), m - 1)
        return float(torch.sort(g, descending=True).values[idx])

    # ------------------------------------------------------------------------------------------- strategy hooks

    def step_pre_backward(self, params, optimizers, state, step, info=None) -> None:
        """Nothing to do before backward (kept for the gsplat ``Strategy`` shape)."""
        return None

    def step_post_backward(
        self,
        params: MutableMapping[str, torch.Tensor],
        optimizers: Optional[OptimizerLike],
        state: Dict[str, Any],
        step: int,
        info: Optional[Mapping[str, Any]] = None,
        extras: Optional[MutableMapping[str, torch.Tensor]] = None,
    ) -> Optional[Dict[str, Any]]:
        """Accumulate ``info``'s gradients (if given and in the window), then densify + prune on event steps.

        ``info`` keys: ``grad2d`` ([N, 2] or [R, N, 2]), ``visible`` ([N] or [R, N] bool), optional
        ``image_sizes`` and ``stray`` (see ``densify_and_prune``). Returns the event summary on event steps,
        else None.
        """
        if info is not None and info.get("grad2d") is not None and self.is_stats_step(step):
            self.accumulate(state, info["grad2d"], info["visible"], info.get("image_sizes"))
        if not self.is_event_step(step):
            return None
        stray = info.get("stray") if info is not None else None
        summary = self.densify_and_prune(params, optimizers, state, extras=extras, stray=stray,
                                         prune_stray=bool(info.get("prune_stray", True)) if info else True)
        summary["step"] = int(step)
        return summary

    # ------------------------------------------------------------------------------------------- the event

    @torch.no_grad()
    def densify_and_prune(
        self,
        params: MutableMapping[str, torch.Tensor],
        optimizers: Optional[OptimizerLike],
        state: Dict[str, Any],
        extras: Optional[MutableMapping[str, torch.Tensor]] = None,
        stray: Optional[torch.Tensor] = None,
        prune_stray: bool = True,
    ) -> Dict[str, Any]:
        """One event: clone, then split (clones have g = 0), then prune; statistics reset. Returns counts.

        ``stray`` ([N] bool, optional; not in the authors' method): Gaussians the caller found unexplained by
        the data (off the object's silhouettes at some frame). They are neither cloned nor split (a copy would
        inherit the same stray offset) and, with ``prune_stray``, pruned."""
        self.check_sanity(params)
        xyz = params[self.xyz_key]
        n0 = xyz.shape[0]
        for name, x in (extras or {}).items():
            if x.shape[0] != n0:
                raise ValueError(f"extras[{name!r}] has leading dim {x.shape[0]}, expected N = {n0}")
        device = xyz.device
        g = self.mean_grads(state, n0, device)
        tau = self.threshold(g) if n0 > 0 else None
        n_clone = n_split = 0
        capped = self.max_gaussians is not None and self.max_gaussians > 0 and n0 >= self.max_gaussians
        densify = tau is not None and not capped
        limit = self.percent_dense * self.scene_extent
        if stray is None:
            stray = torch.zeros(n0, dtype=torch.bool, device=device)
        stray = stray.to(device=device, dtype=torch.bool)
        if densify:
            max_scale = torch.exp(params[self.scaling_key]).max(dim=1).values
            clone_mask = (g >= tau) & (max_scale <= limit) & ~stray
            n_clone = int(clone_mask.sum())
            if n_clone:
                self._clone(params, optimizers, extras, clone_mask)
            n1 = params[self.xyz_key].shape[0]
            stray = torch.cat([stray, stray.new_zeros(n1 - n0)])
            g_pad = torch.cat([g, g.new_zeros(n1 - n0)])
            max_scale = torch.exp(params[self.scaling_key]).max(dim=1).values
            split_mask = (g_pad >= tau) & (max_scale > limit) & ~stray
            n_split = int(split_mask.sum())
            if n_split:
                generator = None
                if state.get("rng_state") is not None:
                    generator = torch.Generator()
                    generator.set_state(state["rng_state"])
                self._split(params, optimizers, extras, split_mask, generator)
                stray = torch.cat([stray[~split_mask], stray.new_zeros(self.split_n * n_split)])
                if generator is not None:
                    state["rng_state"] = generator.get_state()
        n_before_prune = params[self.xyz_key].shape[0]
        prune_mask = self.prune_mask(params)
        n_stray = int(stray.sum())
        if prune_stray:
            prune_mask |= stray
        n_candidates = int(prune_mask.sum())
        prune_mask = self._guard_prune(params, prune_mask)
        n_prune = int(prune_mask.sum())
        if n_prune:
            self._remove(params, optimizers, extras, prune_mask)
        n_final = params[self.xyz_key].shape[0]
        state["grad2d"] = torch.zeros(n_final, device=device)
        state["count"] = torch.zeros(n_final, device=device)
        summary = {
            "tau": tau,
            "num_before": n0,
            "num_clone": n_clone,
            "num_split": n_split,
            "num_prune": n_prune,
            "num_prune_candidates": n_candidates,
            "num_stray": n_stray,
            "num_after_densify": n_before_prune,
            "num_after": n_final,
        }
        state["last_event"] = summary
        state["num_events"] = int(state.get("num_events", 0)) + 1
        return summary

    def prune_mask(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """sigmoid(opacity) < prune_opacity, or max(scale) > prune_big_scale * extent, or max(scale) <
        prune_small_scale (all canonical values)."""
        opacity = torch.sigmoid(params[self.opacity_key]).reshape(-1)
        mask = opacity < self.prune_opacity
        max_scale = torch.exp(params[self.scaling_key]).max(dim=1).values
        if self.prune_big_scale is not None:
            mask |= max_scale > self.prune_big_scale * self.scene_extent
        if self.prune_small_scale is not None:
            mask |= max_scale < self.prune_small_scale
        return mask

    def _guard_prune(self, params: Mapping[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        n = mask.shape[0]
        keep_min = min(max(int(self.min_gaussians), 0), n)
        n_left = n - int(mask.sum())
        if n_left >= keep_min:
            return mask
        # Spare the (keep_min - n_left) most opaque of the candidates.
        opacity = params[self.opacity_key].detach().reshape(-1)
        cand = mask.nonzero(as_tuple=True)[0]
        spare = cand[torch.argsort(opacity[cand], descending=True)[: keep_min - n_left]]
        mask = mask.clone()
        mask[spare] = False
        return mask

    # ------------------------------------------------------------------------------------------- tensor surgery

    def _clone(self, params, optimizers, extras, mask: torch.Tensor) -> None:
        copy = self.clone_moments == "copy"

        def param_fn(name, x):
            return torch.cat([x, x[mask]])

        def state_fn(name, x):
            return torch.cat([x, x[mask] if copy else torch.zeros_like(x[mask])])

        update_per_gaussian(params, optimizers, param_fn, state_fn, extras)

    def _split(self, params, optimizers, extras, mask: torch.Tensor, generator: Optional[torch.Generator]) -> None:
        k = self.split_n
        sel = mask.nonzero(as_tuple=True)[0]
        scales = torch.exp(params[self.scaling_key][sel]).repeat(k, 1)  # [k*S, 3], children grouped per draw
        noise = torch.randn(scales.shape, generator=generator, dtype=scales.dtype,
                            device="cpu" if generator is not None else scales.device).to(scales.device)
        rots = quaternion_to_rotation_matrix(params[self.rotation_key][sel]).repeat(k, 1, 1)
        new_xyz = (rots @ (scales * noise).unsqueeze(-1)).squeeze(-1) + params[self.xyz_key][sel].repeat(k, 1)
        new_scaling = torch.log(scales / self.split_scale_divisor)
        keep = ~mask

        def children(name, x):
            if name == self.xyz_key:
                return new_xyz.to(x.dtype)
            if name == self.scaling_key:
                return new_scaling.to(x.dtype)
            return x[sel].repeat(k, *([1] * (x.dim() - 1)))

        def param_fn(name, x):
            return torch.cat([x[keep], children(name, x)])

        def state_fn(name, x):
            return torch.cat([x[keep], x.new_zeros((k * sel.numel(),) + tuple(x.shape[1:]))])

        update_per_gaussian(params, optimizers, param_fn, state_fn, extras)

    def _remove(self, params, optimizers, extras, mask: torch.Tensor) -> None:
        keep = ~mask
        update_per_gaussian(params, optimizers, lambda name, x: x[keep], lambda name, x: x[keep], extras)


def update_per_gaussian(
    params: MutableMapping[str, torch.Tensor],
    optimizers: Optional[OptimizerLike],
    param_fn,
    state_fn,
    extras: Optional[MutableMapping[str, torch.Tensor]] = None,
) -> None:
    """Replace every per-Gaussian tensor ``x`` of ``params`` (and ``extras``) by ``param_fn(name, x)``.

    ``nn.Parameter`` entries become new Parameters (same ``requires_grad``); where an optimizer holds the old
    Parameter (found by identity in any param group), the group entry is swapped and every tensor state value
    with the old leading dim N is mapped with ``state_fn(name, value)``; other state (``step``) is kept.
    """
    opts = _optimizer_list(optimizers)
    for name in list(params.keys()):
        old = params[name]
        n = old.shape[0]
        new_data = param_fn(name, old.detach())
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new_data.contiguous(), requires_grad=old.requires_grad)
            for opt in opts:
                for group in opt.param_groups:
                    for i, q in enumerate(group["params"]):
                        if q is old:
                            group["params"][i] = new
                            st = opt.state.pop(old, None)
                            if st is not None:
                                opt.state[new] = {
                                    k: (state_fn(name, v) if isinstance(v, torch.Tensor) and v.dim() > 0
                                        and v.shape[0] == n else v)
                                    for k, v in st.items()
                                }
            params[name] = new
        else:
            params[name] = new_data
    if extras is not None:
        for name in list(extras.keys()):
            extras[name] = param_fn(name, extras[name])


__all__ = ["AdaptiveDensification", "to_ndc_grad", "update_per_gaussian"]
