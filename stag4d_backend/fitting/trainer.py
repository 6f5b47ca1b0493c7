"""One STAG4D training step and the state it needs (spec sections 5-6). Pure compute: no file I/O, no printing.

Per iteration: learning rates for ``it``; a batch of frames (the middle frame during the coarse stage, random
frames after, optionally from a window widening around the middle: ``time_window_iters``); for each, the
reference view (white background, RGB + alpha MSE ramped by min(1, it/ramp)), the anchor views (``anchors``
guidance: RGB + alpha MSE at the exact Zero123++ poses, random white/black background) and a random view scored
by SDS (``sds`` guidance); the HexPlane regulariser; Adam; then densification statistics
from the sum of the screen-space mean gradients of all renders, and a densify/prune event when due.
All randomness comes from one ``torch.Generator`` whose state is checkpointed, so a resumed fit equals an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import torch

from ..config import FitConfig
from ..dataset import FrameData
from ..gaussians.animated import FrameGaussians, frame_gaussians
from ..gaussians.deformation import DeformationNetwork
from ..gaussians.model import GaussianModel
from ..gaussians.schedules import log_linear_lr
from ..guidance.base import ScoreDistillation
from ..render import rasterize
from ..render.cameras import OrbitCamera, anchor_cameras, to_torch
from .in_view import TrainingViews, dilate_mask, silhouette_distance
from .views import choose_conditioning, sample_random_view

WHITE = (1.0, 1.0, 1.0)
BLACK = (0.0, 0.0, 0.0)


def frame_window(it: int, num_frames: int, coarse_iters: int, window_iters: int) -> tuple[int, int]:
    """First and last frame (inclusive) that fine step ``it`` may train: the whole clip, or while
    ``it - coarse_iters < window_iters`` a window around the middle frame (the coarse stage's) widening linearly
    from one frame to the whole clip."""
    n, mid = num_frames, num_frames // 2
    if window_iters <= 0 or it - coarse_iters >= window_iters:
        return 0, n - 1
    half = math.ceil(max(0, it - coarse_iters) / window_iters * max(mid, n - 1 - mid))
    return max(0, mid - half), min(n - 1, mid + half)


class _CameraTensors:
    """viewmat, K and centre of a camera as tensors, cached once."""

    def __init__(self, camera: OrbitCamera, device):
        self.camera = camera
        self.viewmat = to_torch(camera.viewmat, device=device)
        self.K = to_torch(camera.K, device=device)
        self.campos = to_torch(camera.position, device=device)
        self.size = camera.size


class Trainer:
    def __init__(self, cfg: FitConfig, data: FrameData, sds: ScoreDistillation | None = None,
                 device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.data = data
        self.num_frames = data.num_frames
        self.sds = sds
        self.use_anchors = "anchors" in cfg.guidance
        self.use_sds = "sds" in cfg.guidance
        if self.use_anchors and not data.has_anchors:
            raise ValueError("the 'anchors' guidance needs zero123/{f}_rgba/{k}.png anchor views")
        if self.use_sds and sds is None:
            raise ValueError("the 'sds' guidance needs a score-distillation model")

        self.ref_rgb = data.ref_rgb.to(self.device)
        self.ref_mask = data.ref_mask.to(self.device)
        if data.has_anchors:
            self.anchor_rgb = data.anchor_rgb.to(self.device)
            self.anchor_mask = data.anchor_mask.to(self.device)
        self.front = _CameraTensors(OrbitCamera(cfg.input_elevation, 0.0, cfg.radius, cfg.fovy, cfg.ref_resolution),
                                    self.device)
        self.anchors = [_CameraTensors(c, self.device) for c in anchor_cameras(
            cfg.anchor_resolution, cfg.anchor_radius or cfg.radius, cfg.fovy, cfg.input_elevation)]
        self.training_views = TrainingViews.for_fit(cfg.radius, cfg.fovy, cfg.input_elevation, cfg.anchor_radius,
                                                    self.device)
        # The silhouette check uses the views that have a matte: the front, and the anchors when present.
        self.silhouette_views = self.training_views if data.has_anchors else TrainingViews(
            [self.front.camera], self.device)
        self._grown_masks = None
        self._distance_maps = None

        init_gen = torch.Generator().manual_seed(cfg.seed)
        self.model = GaussianModel.init_random_ball(cfg.num_pts, cfg.init_radius, generator=init_gen,
                                                    sh_degree=cfg.sh_degree, init_opacity=cfg.init_opacity,
                                                    device=self.device)
        self.deformation = DeformationNetwork(cfg.deformation, generator=init_gen).to(self.device)
        self.optimizer = self._make_optimizer()
        self.strategy = dataclasses.replace(cfg.densify, seed=cfg.seed)
        self.densify_state = self.strategy.initialize_state(self.model.num_points)
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.it = 0
        if sds is not None:
            sds.prepare(data.ref_rgb, data.anchor_rgb)

    # ------------------------------------------------------------------------------------------- setup

    def learning_rates(self, it: int) -> dict[str, float]:
        return {name: log_linear_lr(it, lr0, lr1, self.cfg.lr_max_steps) for name, (lr0, lr1) in self.cfg.lr.items()}

    def _make_optimizer(self) -> torch.optim.Adam:
        lrs = self.learning_rates(0)
        return self.model.make_optimizer(lrs, extra_groups=self.deformation.param_groups(lrs))

    def _set_learning_rates(self, it: int) -> None:
        lrs = self.learning_rates(it)
        for group in self.optimizer.param_groups:
            if group.get("name") in lrs:
                group["lr"] = lrs[group["name"]]

    def is_fine(self, it: int) -> bool:
        return it > self.cfg.coarse_iters

    def frame_window(self, it: int) -> tuple[int, int]:
        return frame_window(it, self.num_frames, self.cfg.coarse_iters, self.cfg.time_window_iters)

    def view_resolution(self, it: int) -> int:
        res = self.cfg.view_resolutions[0][1]
        for start, r in self.cfg.view_resolutions:
            if it >= start:
                res = r
        return res

    # ------------------------------------------------------------------------------------------- rendering

    def gaussians_at(self, t: float | None, campos: torch.Tensor | None = None) -> FrameGaussians:
        return frame_gaussians(self.model, self.deformation if t is not None else None, t, campos)

    def render(self, g: FrameGaussians, cam: _CameraTensors, background, size: int | None = None):
        size = size or cam.size
        return rasterize(g.means, g.quats, g.scales, g.opacities, g.colors, cam.viewmat, cam.K, size, size,
                         torch.tensor(background, dtype=g.means.dtype, device=g.means.device),
                         depth_spread=self.cfg.lambda_depth_spread > 0)

    def _surface_terms(self, renders, terms: dict) -> torch.Tensor | float:
        """The optional one-surface term over the step's renders (0 when off); its value goes into ``terms``."""
        if self.cfg.lambda_depth_spread <= 0:
            return 0.0
        l_spread = self.depth_spread_loss(renders)
        terms["depth_spread"] = l_spread.item()
        return self.cfg.lambda_depth_spread * l_spread

    @staticmethod
    def depth_spread_loss(renders) -> torch.Tensor:
        """Sum over renders of the mean per-pixel spread of the blending weights along the ray (alpha x the
        weighted variance of depth): 0 when every pixel's colour comes from one thin layer. With few views, layers
        of half-transparent Gaussians at different depths can paint each training view and disagree everywhere
        else; this asks each ray to stop at one surface."""
        return sum(r.depth_spread.mean() for r in renders)

    def _rand(self) -> float:
        return float(torch.rand(1, generator=self.generator).item())

    # ------------------------------------------------------------------------------------------- one step

    def step(self) -> dict:
        cfg = self.cfg
        it = self.it + 1
        self._set_learning_rates(it)
        fine = self.is_fine(it)
        ramp = min(1.0, it / cfg.ramp_iters) if cfg.ramp_iters > 0 else 1.0
        terms: dict[str, float] = defaultdict(float)
        total = torch.zeros((), device=self.device)
        renders = []

        for _ in range(cfg.batch_size):
            if fine:
                lo, hi = self.frame_window(it)
                f = int(torch.randint(lo, hi + 1, (1,), generator=self.generator).item())
            else:
                f = self.num_frames // 2
            t = f / self.num_frames if fine else None
            g = self.gaussians_at(t, self.front.campos if self.model.sh_degree else None)

            out = self.render(g, self.front, WHITE)
            renders.append(out)
            l_rgb = torch.mean((out.rgb - self.ref_rgb[f]) ** 2)
            l_alpha = torch.mean((out.alpha - self.ref_mask[f]) ** 2)
            total = total + ramp * (cfg.lambda_rgb * l_rgb + cfg.lambda_alpha * l_alpha)
            terms["ref_rgb"] += l_rgb.item()
            terms["ref_alpha"] += l_alpha.item()
            if cfg.lambda_in_view > 0:
                l_in_view = self.training_views.loss(g.means)
                total = total + cfg.lambda_in_view * l_in_view
                terms["in_view"] += l_in_view.item()
            if cfg.lambda_in_silhouette > 0:
                l_in_sil = self.silhouette_views.silhouette_loss(g.means, self.distance_maps(f))
                total = total + cfg.lambda_in_silhouette * l_in_sil
                terms["in_silhouette"] += l_in_sil.item()

            if self.use_anchors:
                ks = torch.randperm(6, generator=self.generator)[: cfg.anchors_per_step].tolist()
                for k in ks:
                    bg = BLACK if self._rand() < cfg.invert_bg_prob else WHITE
                    cam = self.anchors[k]
                    if self.model.sh_degree:
                        g = self.gaussians_at(t, cam.campos)
                    out = self.render(g, cam, bg)
                    renders.append(out)
                    mask = self.anchor_mask[f, k]
                    # Targets are stored on white; move them onto this background.
                    target = self.anchor_rgb[f, k] - (1.0 - mask)[..., None] * (1.0 - bg[0])
                    a_rgb = torch.mean((out.rgb - target) ** 2)
                    a_alpha = torch.mean((out.alpha - mask) ** 2)
                    total = total + ramp * (cfg.lambda_anchor_rgb * a_rgb + cfg.lambda_anchor_alpha * a_alpha)
                    terms["anchor_rgb"] += a_rgb.item()
                    terms["anchor_alpha"] += a_alpha.item()

            if self.use_sds:
                view = sample_random_view(self.generator, self.view_resolution(it), cfg.input_elevation,
                                          cfg.radius, cfg.fovy)
                request = choose_conditioning(view, f, self.generator, self.data.has_anchors)
                bg = BLACK if self._rand() < cfg.invert_bg_prob else WHITE
                cam = _CameraTensors(view.camera, self.device)
                if self.model.sh_degree:
                    g = self.gaussians_at(t, cam.campos)
                out = self.render(g, cam, bg)
                renders.append(out)
                l_sds = self.sds.loss(out.rgb, request, it, cfg.iters)
                total = total + cfg.lambda_sds * l_sds
                terms["sds"] += l_sds.item()

        total = total + self._surface_terms(renders, terms)
        reg = self.deformation.regularization()["total"]
        total = total + reg
        terms["reg"] = reg.item()

        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()

        event = None
        if self.strategy.is_stats_step(it) or self.strategy.is_event_step(it):
            n = self.model.num_points
            grads = torch.stack([r.means2d.grad if r.means2d.grad is not None
                                 else torch.zeros(n, 2, device=self.device) for r in renders])
            visible = torch.stack([r.radii > 0 for r in renders])
            sizes = [(r.rgb.shape[1], r.rgb.shape[0]) for r in renders]
            info = {"grad2d": grads, "visible": visible, "image_sizes": sizes}
            if cfg.stray_min_views > 0 and self.strategy.is_event_step(it):
                stray = info["stray"] = self.stray_gaussians()
                info["prune_stray"] = (it >= cfg.stray_prune_from * cfg.iters
                                       and int(stray.sum()) <= cfg.stray_prune_max_fraction * stray.numel())
            event = self.strategy.step_post_backward(self.model.params, self.optimizer, self.densify_state, it,
                                                     info=info)

        self.it = it
        stats = {k: v / cfg.batch_size if k not in ("reg", "depth_spread") else v for k, v in terms.items()}
        stats.update(step=it, total=cfg.iters, loss=total.item(), stage="fine" if fine else "coarse",
                     num_gaussians=self.model.num_points,
                     psnr_ref=-10.0 * math.log10(max(stats["ref_rgb"], 1e-10)))
        if event is not None:
            stats["densify"] = event
        return stats

    def _mattes(self, f: int) -> list[torch.Tensor]:
        """The mattes of frame ``f`` in ``silhouette_views`` order: the front, then the anchors when present."""
        anchors = [self.anchor_mask[f, k] for k in range(self.anchor_mask.shape[1])] if self.data.has_anchors else []
        return [self.ref_mask[f]] + anchors

    def distance_maps(self, f: int) -> torch.Tensor:
        """[C, S, S] distance from the grown silhouette of frame ``f`` in each view with a matte (computed once)."""
        if self._distance_maps is None:
            m = self.cfg.silhouette_margin
            self._distance_maps = torch.stack([torch.stack([silhouette_distance(mask, m) for mask in self._mattes(i)])
                                               for i in range(self.num_frames)]).to(self.device)
        return self._distance_maps[f]

    @torch.no_grad()
    def stray_gaussians(self) -> torch.Tensor:
        """[N] bool: at some frame, off the object's silhouette in at least ``stray_min_views`` training views
        (centre outside the image or on background beyond the margin). The data explains no such Gaussian there."""
        if self._grown_masks is None:  # the mattes grown by the margin, once (bool: small)
            m = self.cfg.silhouette_margin
            self._grown_masks = [[dilate_mask(mask, m) > 0.5 for mask in self._mattes(f)]
                                 for f in range(self.num_frames)]
        stray = torch.zeros(self.model.num_points, dtype=torch.bool, device=self.device)
        for f in range(self.num_frames):
            means = self.gaussians_at(f / self.num_frames).means
            off = self.silhouette_views.off_silhouette(means, self._grown_masks[f], margin=0.0)
            stray |= off >= self.cfg.stray_min_views
        return stray

    # ------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {
            "it": self.it,
            "model": self.model.state(),
            "deformation": {k: v.detach().clone() for k, v in self.deformation.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "densify_state": self.densify_state,
            "generator": self.generator.get_state(),
            # The SDS model draws t and noise from its own generator: part of the state for a bit-exact resume.
            "sds": self.sds.state_dict() if self.sds is not None and hasattr(self.sds, "state_dict") else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state({k: v.to(self.device) for k, v in state["model"].items()})
        self.deformation.load_state_dict(state["deformation"])
        self.optimizer = self._make_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.densify_state = state["densify_state"]
        self.generator.set_state(state["generator"])
        if state.get("sds") is not None and self.sds is not None and hasattr(self.sds, "load_state_dict"):
            self.sds.load_state_dict(state["sds"])
        self.it = int(state["it"])
