"""Fit presets as dataclasses.

- ``paper``: the authors' numbers (../shared/design/stag4d-algorithm.md sections 4-8), faithful quirks included,
  except where a quirk is a crash or a silent no-op (documented in docs/fitting.md).
- ``standard``: best quality per GPU minute: zero-initialised deformation heads, SDS plus anchor views.
- ``preview``: a CPU run in minutes: small HexPlane, 256 px, anchor-view guidance, fewer Gaussians.
- ``tiny``: seconds; for tests and smoke runs only.

Iteration-based schedules (coarse stage, learning-rate decay, densification window, resolution switches, SDS
t-range annealing) are stored for the preset's own ``iters``; overriding ``--iters`` rescales them all
proportionally (``FitConfig.with_iters``), so a shorter run keeps the shape of the schedule.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .gaussians.deformation import DeformationConfig
from .gaussians.densify import AdaptiveDensification

GUIDANCE_CHOICES = ("anchors", "sds", "sds+anchors")
# Weight of the keep-inside-every-view term (fitting/in_view.py) in the presets that use it.
IN_VIEW_WEIGHT = 100.0
# Weight of the keep-on-the-silhouette term (fitting/in_view.py) in the presets that use it.
IN_SILHOUETTE_WEIGHT = 100.0
# Views off the silhouette that make a Gaussian a stray at a densification event (FitConfig.stray_min_views).
STRAY_MIN_VIEWS = 2


@dataclass
class FitConfig:
    preset: str = "paper"
    iters: int = 8000
    coarse_iters: int = 700               # static fit of the middle frame first
    # Progressive time window: for this many steps after the coarse stage, frames are drawn from a window around
    # the middle frame that widens linearly to the whole clip, so each frame first trained lies next to frames
    # the field already follows (large motion is tracked step by step instead of blurred). 0 = off (the
    # authors draw every frame from the start).
    time_window_iters: int = 0
    batch_size: int = 4
    ref_resolution: int = 512             # reference (input) view render/target size
    view_resolutions: tuple[tuple[float, int], ...] = ((0.0, 128), (600, 256), (1200, 512))  # (from it, res)
    anchor_resolution: int = 256          # anchor-view photometric loss size
    guidance: str = "sds"
    # Losses (summed over the batch as the authors do).
    lambda_rgb: float = 20000.0
    lambda_alpha: float = 5000.0
    ramp_iters: int = 2000                # reference weights ramp linearly: min(1, it / ramp_iters)
    lambda_anchor_rgb: float = 10000.0
    lambda_anchor_alpha: float = 2500.0
    anchors_per_step: int = 1             # anchor views rendered per batch item
    lambda_sds: float = 1.0
    guidance_scale: float = 5.0
    sds_anneal_iters: int = 3000
    invert_bg_prob: float = 0.5           # random views: black background with this probability
    # Keep every deformed Gaussian inside the image of every training view (fitting/in_view.py); 0 = off (the
    # authors have no such term). Sum over Gaussians of the squared overshoot in normalised image units.
    lambda_in_view: float = 0.0
    # Keep every deformed centre on the object's silhouette (grown by ``silhouette_margin``) in every training view
    # with a matte, at the frame being trained (fitting/in_view.py); 0 = off (the authors have no such term).
    # Sum over Gaussians and views of the squared distance in units of the image side.
    lambda_in_silhouette: float = 0.0
    # At each densification event, a Gaussian whose centre is off the object's silhouette (outside the image, or
    # on background beyond ``silhouette_margin`` x the image side) in at least this many training views at some
    # frame is neither cloned nor split and is pruned (fitting/in_view.py); 0 = off (the authors' rule).
    stray_min_views: int = 0
    # Ask every ray of every training render to stop at one surface: the sum over renders of the mean per-pixel
    # spread of the blending weights along the ray (alpha x weighted variance of camera depth, units^2,
    # Trainer.depth_spread_loss); 0 = off (the authors have no such term).
    lambda_depth_spread: float = 0.0
    silhouette_margin: float = 0.02
    stray_prune_from: float = 0.5         # strays are pruned from this fraction of ``iters`` on; before, only
                                          # kept from densifying (early on, the motion is not learnt yet)
    stray_prune_max_fraction: float = 0.05  # ... and only when they are outliers: at most this share of all
                                            # Gaussians (more means the fit is not aligned yet, not floaters)
    # Cameras.
    input_elevation: float = 0.0
    radius: float = 2.0
    anchor_radius: float = 0.0            # camera distance of the anchor views; 0 = ``radius``
    fovy: float = 49.1
    # Gaussians.
    num_pts: int = 10000
    init_radius: float = 0.5
    init_opacity: float = 0.1
    sh_degree: int = 0
    lr_max_steps: int = 2000
    lr: dict = field(default_factory=lambda: {
        "xyz": (2e-3, 2e-5), "deformation": (1.6e-3, 1.6e-4), "grid": (1.6e-2, 1.6e-3),
        "f_dc": (5e-3, 5e-3), "f_rest": (2.5e-4, 2.5e-4), "opacity": (2e-2, 2e-2),
        "scaling": (1e-2, 1e-2), "rotation": (2e-3, 2e-3)})
    deformation: DeformationConfig = field(default_factory=DeformationConfig)
    densify: AdaptiveDensification = field(default_factory=AdaptiveDensification)
    # Running.
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 500
    num_threads: int = 0                  # 0 = torch default

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FitConfig":
        d = dict(d)
        d["deformation"] = DeformationConfig(**d.get("deformation", {}))
        d["densify"] = AdaptiveDensification(**d.get("densify", {}))
        d["view_resolutions"] = tuple(tuple(x) for x in d.get("view_resolutions", ()))
        d["lr"] = {k: tuple(v) for k, v in d.get("lr", {}).items()}
        return cls(**d)

    def with_iters(self, iters: int) -> "FitConfig":
        """The same schedule shape at a different length: every iteration-based number scales."""
        if iters <= 0:
            raise ValueError("iters must be positive")
        s = iters / self.iters

        def sc(x):
            return max(1, int(round(x * s)))

        dens = dataclasses.replace(self.densify, refine_start=sc(self.densify.refine_start),
                                   refine_stop=sc(self.densify.refine_stop), refine_every=sc(self.densify.refine_every))
        return dataclasses.replace(
            self, iters=iters, coarse_iters=min(sc(self.coarse_iters), iters - 1) if self.coarse_iters else 0,
            time_window_iters=sc(self.time_window_iters) if self.time_window_iters else 0,
            ramp_iters=sc(self.ramp_iters), lr_max_steps=sc(self.lr_max_steps),
            sds_anneal_iters=sc(self.sds_anneal_iters), checkpoint_every=sc(self.checkpoint_every),
            view_resolutions=tuple((x * s, r) for x, r in self.view_resolutions), densify=dens)

    def with_resolution(self, res: int) -> "FitConfig":
        """Cap every render size at ``res`` (the reference view trains at exactly ``res``)."""
        return dataclasses.replace(
            self, ref_resolution=res, anchor_resolution=min(self.anchor_resolution, res),
            view_resolutions=tuple((x, min(r, res)) for x, r in self.view_resolutions))


def with_overrides(cfg: FitConfig, items: list[str] | tuple[str, ...]) -> FitConfig:
    """A copy of ``cfg`` with ``KEY=JSON`` items applied, KEY a field or a dotted field of a nested config
    (``densify.max_gaussians=20000``, ``anchors_per_step=3``); for benchmarks and investigations. ValueError on an
    unknown field or a value of the wrong type."""
    cfg = FitConfig.from_dict(cfg.to_dict())
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r}: expected KEY=VALUE")
        try:
            value = json.loads(text)
        except ValueError:
            raise ValueError(f"{item!r}: the value is not JSON") from None
        *path, name = key.split(".")
        obj = cfg
        for part in path:
            obj = getattr(obj, part, None)
            if not dataclasses.is_dataclass(obj):
                raise ValueError(f"{item!r}: no config section {part!r}")
        if name not in {f.name for f in dataclasses.fields(obj)}:
            raise ValueError(f"{item!r}: no field {name!r}")
        old = getattr(obj, name)
        if isinstance(old, tuple):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        elif isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif type(value) is not type(old) and not isinstance(old, dict):
            raise ValueError(f"{item!r}: {key} is a {type(old).__name__}")
        setattr(obj, name, value)
    return cfg


def paper() -> FitConfig:
    return FitConfig(preset="paper", deformation=DeformationConfig(head_init="authors"))


def standard() -> FitConfig:
    return FitConfig(preset="standard", guidance="sds+anchors", iters=6000, coarse_iters=500,
                     lambda_in_view=IN_VIEW_WEIGHT, lambda_in_silhouette=IN_SILHOUETTE_WEIGHT, stray_min_views=STRAY_MIN_VIEWS,
                     deformation=DeformationConfig(time_mapping="symmetric"),
                     densify=AdaptiveDensification(refine_start=900, refine_stop=4500))


def preview() -> FitConfig:
    return FitConfig(
        preset="preview", guidance="anchors", iters=3000, coarse_iters=300, batch_size=1,
        ref_resolution=256, anchor_resolution=256, view_resolutions=((0.0, 256),),
        anchors_per_step=2, ramp_iters=1, lr_max_steps=3000,
        num_pts=5000, checkpoint_every=250, lambda_in_view=IN_VIEW_WEIGHT, lambda_in_silhouette=IN_SILHOUETTE_WEIGHT, stray_min_views=STRAY_MIN_VIEWS,
        lr={"xyz": (1.6e-3, 1.6e-5), "deformation": (1.6e-3, 1.6e-4), "grid": (1.6e-2, 1.6e-3),
            "f_dc": (5e-3, 5e-3), "f_rest": (2.5e-4, 2.5e-4), "opacity": (2e-2, 2e-2),
            "scaling": (5e-3, 5e-3), "rotation": (2e-3, 2e-3)},
        # "symmetric" time uses the whole time axis of the planes (the faithful mapping uses only its upper half).
        # 64^3 x 24 planes (the authors' spatial resolution): +0.27 dB held-out on the hard set's mean (fast cube
        # +1.0, ball +0.4, column +0.25, the rest within +-0.05) at no measurable time cost (docs/benchmarks.md).
        deformation=DeformationConfig(resolution=(64, 64, 64, 24), multires=(1, 2), feature_dim=16,
                                      time_mapping="symmetric"),
        densify=AdaptiveDensification(refine_start=400, refine_stop=2400, densify_fraction=0.05,
                                      max_gaussians=60000),
    )


def tiny() -> FitConfig:
    return FitConfig(
        preset="tiny", guidance="anchors", iters=40, coarse_iters=10, batch_size=1, ref_resolution=32,
        anchor_resolution=32, view_resolutions=((0.0, 32),), ramp_iters=1, lr_max_steps=40, num_pts=300,
        checkpoint_every=10, anchors_per_step=1, lambda_in_view=IN_VIEW_WEIGHT, lambda_in_silhouette=IN_SILHOUETTE_WEIGHT,
        deformation=DeformationConfig(resolution=(8, 8, 8, 4), multires=(1,), feature_dim=8, width=16),
        densify=AdaptiveDensification(refine_start=15, refine_stop=35, refine_every=10, densify_fraction=0.05,
                                      max_gaussians=2000),
    )


PRESETS = {"paper": paper, "standard": standard, "preview": preview, "tiny": tiny}


def get_preset(name: str) -> FitConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def default_preset(device: str | None = None) -> str:
    """`standard` where a CUDA device will run the fit, `preview` (minutes on a CPU) elsewhere."""
    if device and str(device).startswith("cpu"):
        return "preview"
    import torch

    return "standard" if torch.cuda.is_available() else "preview"


# Request options (CLI flags, job options) that override a preset's field of the same name.
OPTION_OVERRIDES = ("device", "seed", "guidance", "checkpoint_every", "num_threads")


def config_from_options(options: dict, default: str | None = None) -> FitConfig:
    """The preset named in ``options`` (else ``default``, else the device's default) with --iters and
    --resolution applied (schedules rescaled) and the OPTION_OVERRIDES that are set."""
    cfg = get_preset(options.get("preset") or default or default_preset(options.get("device")))
    if options.get("iters"):
        cfg = cfg.with_iters(int(options["iters"]))
    if options.get("resolution"):
        cfg = cfg.with_resolution(int(options["resolution"]))
    return dataclasses.replace(cfg, **{k: options[k] for k in OPTION_OVERRIDES if options.get(k) is not None})
