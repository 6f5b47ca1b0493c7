"""Schedules of the STAG4D optimisation (algorithm spec sections 3, 5 and 8). Pure functions, no state.

``it`` is always the 1-based training step (the value after the authors' ``step += 1``).
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Tuple

#: The authors multiply the xyz, deformation-MLP and grid learning rates by ``spatial_lr_scale = 10``.
SPATIAL_LR_SCALE = 10.0

#: Steps over which the decaying learning rates go from lr0 to lr1 (``position_lr_max_steps``). The authors'
#: attempted switch to 5000 after step 2000 has no effect (the closure already captured 2000), so it is not modelled.
LR_MAX_STEPS = 2000

#: Optimiser param-group name -> (lr0, lr1), with the x10 spatial scale already applied where the authors apply it.
#: Groups whose lr0 == lr1 are constant.
LR_TABLE: Dict[str, Tuple[float, float]] = {
    "xyz": (2e-3, 2e-5),            # 2e-4 -> 2e-6, x10
    "deformation": (1.6e-3, 1.6e-4),  # deformation MLP (and the authors' unused timenet), 1.6e-4 -> 1.6e-5, x10
    "grid": (1.6e-2, 1.6e-3),       # HexPlane planes, 1.6e-3 -> 1.6e-4, x10
    "f_dc": (5e-3, 5e-3),
    "f_rest": (2.5e-4, 2.5e-4),     # feature_lr / 20; the tensor is empty with SH degree 0
    "opacity": (2e-2, 2e-2),
    "scaling": (1e-2, 1e-2),
    "rotation": (2e-3, 2e-3),
}

#: Adam settings of the authors (default betas).
ADAM_EPS = 1e-15


def log_linear_lr(it: float, lr0: float, lr1: float, max_steps: int = LR_MAX_STEPS) -> float:
    """exp((1-u) ln lr0 + u ln lr1) with u = clip(it / max_steps, 0, 1) (3DGS ``get_expon_lr_func`` without delay).

    lr0 == lr1 gives the constant lr0 (so zero rates are allowed); a negative ``it`` gives 0 like the authors.
    """
    if lr0 == lr1:
        return float(lr0)
    if it < 0 or (lr0 == 0.0 and lr1 == 0.0):
        return 0.0
    if lr0 <= 0.0 or lr1 <= 0.0:
        raise ValueError("log-linear interpolation needs positive learning rates")
    u = min(max(it / float(max_steps), 0.0), 1.0) if max_steps > 0 else 1.0
    return math.exp((1.0 - u) * math.log(lr0) + u * math.log(lr1))


def learning_rates(
    it: float,
    table: Mapping[str, Tuple[float, float]] = LR_TABLE,
    max_steps: int = LR_MAX_STEPS,
) -> Dict[str, float]:
    """Learning rate of every group of ``table`` at step ``it``."""
    return {name: log_linear_lr(it, lr0, lr1, max_steps) for name, (lr0, lr1) in table.items()}


def apply_learning_rates(
    optimizer,
    it: float,
    table: Mapping[str, Tuple[float, float]] = LR_TABLE,
    max_steps: int = LR_MAX_STEPS,
) -> Dict[str, float]:
    """Set ``group["lr"]`` of every param group whose ``"name"`` is in ``table``; returns the rates set.

    ``optimizer`` is one torch optimizer with named groups, or a dict name -> optimizer (the first group of
    each is set). Groups not in the table are left alone.
    """
    lrs = learning_rates(it, table, max_steps)
    if isinstance(optimizer, Mapping):
        for name, opt in optimizer.items():
            if name in lrs:
                for group in opt.param_groups:
                    group["lr"] = lrs[name]
    else:
        for group in optimizer.param_groups:
            name = group.get("name")
            if name in lrs:
                group["lr"] = lrs[name]
    return lrs


def step_ratio(it: float, iters: int = 2000) -> float:
    """``min(1, it / iters)``: multiplies the reference losses and drives the resolution schedule (``opt.iters``)."""
    return min(1.0, it / float(iters))


def render_resolution(it: float, iters: int = 2000, resolutions: Tuple[int, int, int] = (128, 256, 512)) -> int:
    """Resolution of the random-view renders: 128 while step_ratio < 0.3, 256 while < 0.6, else 512.

    With iters = 2000 the switches happen at it = 600 (-> 256) and it = 1200 (-> 512).
    """
    r = step_ratio(it, iters)
    return resolutions[0] if r < 0.3 else (resolutions[1] if r < 0.6 else resolutions[2])


def _linear_percent(start_step: float, start_value: float, end_value: float, end_step: float, it: float) -> float:
    # The authors' expression, kept literally so the float rounding (and hence the int() below) matches.
    return start_value + (end_value - start_value) * max(min(1.0, (it - start_step) / (end_step - start_step)), 0.0)


def sds_p_range(
    it: float,
    p_min: Tuple[float, float] = (0.5, 0.02),
    p_max: Tuple[float, float] = (0.95, 0.5),
    ramp_steps: int = 3000,
) -> Tuple[float, float]:
    """(p_min, p_max) of the SDS timestep range: 0.5 -> 0.02 and 0.95 -> 0.5 linearly over ``ramp_steps``."""
    lo = _linear_percent(0, p_min[0], p_min[1], ramp_steps, it)
    hi = _linear_percent(0, p_max[0], p_max[1], ramp_steps, it)
    return lo, hi


def sds_t_range(
    it: float,
    num_train_timesteps: int = 1000,
    p_min: Tuple[float, float] = (0.5, 0.02),
    p_max: Tuple[float, float] = (0.95, 0.5),
    ramp_steps: int = 3000,
) -> Tuple[int, int]:
    """Inclusive integer range (t_min, t_max) for ``t ~ U{t_min..t_max}``: int(T * p) as the authors.

    [500, 950] at it = 0, [260, 725] at it = 1500, [20, 500] from it = 3000.
    """
    lo, hi = sds_p_range(it, p_min, p_max, ramp_steps)
    return int(num_train_timesteps * lo), int(num_train_timesteps * hi)


def is_fine_stage(it: float, init_steps: int = 700) -> bool:
    """Deformation is bypassed while the 0-based step k = it - 1 < init_steps, i.e. for it <= 700."""
    return (it - 1) >= init_steps


def frame_time(frame: int, num_frames: int) -> float:
    """Time of frame f of F: t = f / F (the authors' normalisation; t never reaches 1)."""
    return frame / float(num_frames)


__all__ = [
    "SPATIAL_LR_SCALE",
    "LR_MAX_STEPS",
    "LR_TABLE",
    "ADAM_EPS",
    "log_linear_lr",
    "learning_rates",
    "apply_learning_rates",
    "step_ratio",
    "render_resolution",
    "sds_p_range",
    "sds_t_range",
    "is_fine_stage",
    "frame_time",
]
