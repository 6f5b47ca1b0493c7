"""Fitted models for the bake tests, built directly (no training): the example creature's Gaussians at t = 0 as
the canonical set and a small deformation field with random, time-dependent, few-centimetre deltas.

Import the fixtures into a test module with ``from bake_fixtures import ...`` (tests/ is on sys.path).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stag4d_backend.example_scene import ExampleCreature
from stag4d_backend.fitted import save_fitted
from stag4d_backend.gaussians.deformation import TIME_PLANES, DeformationConfig, DeformationNetwork
from stag4d_backend.gaussians.model import GaussianModel, inverse_sigmoid, rgb_to_sh

SMALL_CFG = dict(resolution=(8, 8, 8, 4), multires=(1, 2), feature_dim=8, width=16)


def moving_deformation(seed: int = 0, motion: float = 0.05, **cfg) -> DeformationNetwork:
    """A random field whose deltas change with t (random time planes): over t in [0, 1) the centres of points in
    the unit cube move by up to about ``motion``, log-scales and quaternions by up to about 0.1."""
    net = DeformationNetwork(DeformationConfig(**dict(SMALL_CFG, **cfg), head_init="authors"), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        _randomise_time_planes(net, g)
        probe = torch.rand(512, 3, generator=g) - 0.5
        times = torch.linspace(0, 1, 9)
        core = net.deformation_net
        for i, (head, target) in enumerate(((core.pos_deform, motion), (core.scales_deform, 0.1),
                                            (core.rotations_deform, 0.1))):
            head[-1].bias.zero_()
            d = torch.stack([net.deltas(probe, float(t))[i] for t in times])
            spread = float((d - d.mean(0)).abs().max())
            head[-1].weight.mul_(target / max(spread, 1e-9))
    return net


def creature_model(num_gaussians: int = 400, seed: int = 0, sh_degree: int = 0) -> GaussianModel:
    c = ExampleCreature(num_gaussians, seed=seed).at(0.0)
    n = c.means.shape[0]
    f_rest = None
    if sh_degree:
        k = (sh_degree + 1) ** 2 - 1
        f_rest = torch.randn(n, k, 3, generator=torch.Generator().manual_seed(seed)) * 0.05
    # Raw rotations deliberately not unit length (as in a fit): the PLY keeps them raw, USD normalises.
    rot = c.quats * (0.5 + torch.rand(n, 1, generator=torch.Generator().manual_seed(seed + 2)))
    return GaussianModel.from_arrays(c.means, rgb_to_sh(c.colors), f_rest,
                                     inverse_sigmoid(c.opacities.clamp(1e-4, 1 - 1e-4)), torch.log(c.scales), rot)


def make_fit_dir(path: Path, num_gaussians: int = 400, num_frames: int = 4, fps: float | None = 12.0,
                 seed: int = 0, sh_degree: int = 0, motion: float = 0.05, net: DeformationNetwork | None = None
                 ) -> Path:
    """A folder in the layout of ``stag4d fit``'s output (canonical.ply, deformation.safetensors, meta.json)."""
    model = creature_model(num_gaussians, seed, sh_degree)
    net = net if net is not None else moving_deformation(seed, motion)
    meta = {"num_frames": num_frames, "fps": fps, "time": "t = f / num_frames", "source_size": 64,
            "num_gaussians": model.num_points}
    save_fitted(path, model, net, meta)
    return Path(path)


@pytest.fixture(scope="module")
def small_fit(tmp_path_factory) -> Path:
    """400 Gaussians, 4 frames at 12 fps, SH degree 0."""
    return make_fit_dir(tmp_path_factory.mktemp("fit") / "out", num_gaussians=400, num_frames=4, fps=12.0)


@pytest.fixture(scope="module")
def mesh_fit(tmp_path_factory) -> Path:
    """2500 Gaussians (a closed creature surface), 3 frames, for mesh tests."""
    return make_fit_dir(tmp_path_factory.mktemp("meshfit") / "out", num_gaussians=2500, num_frames=3, fps=8.0,
                        seed=1)


def _randomise_time_planes(net: DeformationNetwork, g: torch.Generator) -> None:
    """Random time planes, so the field's deltas change with t."""
    for planes in net.grid.grids:
        for pi in TIME_PLANES:
            planes[pi].add_(torch.randn(planes[pi].shape, generator=g) * 0.5)


def moving_rigid_deformation(cfg: DeformationConfig, seed: int = 0) -> DeformationNetwork:
    """A ``motion="rigid"`` field (``cfg`` rigid, authors init) with non-zero, time-dependent heads and rotation
    vectors of a few radians (some angles above pi)."""
    net = DeformationNetwork(cfg, seed=seed)
    with torch.no_grad():
        _randomise_time_planes(net, torch.Generator().manual_seed(seed + 1))
        last = net.deformation_net.rotvec_deform[3]
        last.weight.mul_(20.0)
        last.bias.zero_()
    return net


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """(w, x, y, z) unit quaternions [..., 4] -> rotation matrices [..., 3, 3]."""
    w, x, y, z = np.moveaxis(np.asarray(q, dtype=np.float64), -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def to_blender(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return np.stack([p[..., 0], -p[..., 2], p[..., 1]], -1)


__all__ = ["make_fit_dir", "moving_deformation", "creature_model", "small_fit", "mesh_fit", "quat_to_matrix",
           "to_blender", "SMALL_CFG"]


# blender_addon/splat_nodes.py's bound of each splat square (not imported there: that module needs bpy)
SPLAT_EXTENT, SPLAT_MIN_OPACITY, QUAD_MARGIN, PERSPECTIVE_MARGIN, SLANT_LIMIT = 3.0, 1.0 / 255.0, 1.02, 2.0, 4.0


def splat_bound(axes: np.ndarray, centres: np.ndarray, opacity: np.ndarray, camera: np.ndarray,
                camera_rot: np.ndarray) -> np.ndarray:
    """The scale splat_nodes._splat_bound gives each square (N x 3), from the Gaussians' axes (N x 3 x 3, columns
    = the axes times their sigmas), centres and opacities, and the camera's position and rotation, all in one
    space: the ellipsoid's support along a = (1, 0, -x/z) and (0, 1, -y/z) of the centre in camera space (its
    footprint along the ray through the centre), the largest sigma on z, all times (radius / extent) x
    (margin + fan-out), radius = min(extent, sqrt(2 ln(opacity / min))) sigmas."""
    local = (centres - camera) @ camera_rot  # the centres in the camera's space
    slant = np.clip(local[:, :2] / local[:, 2:3], -SLANT_LIMIT, SLANT_LIMIT)
    support = []
    for i in (0, 1):
        a = np.zeros((len(centres), 3))
        a[:, i], a[:, 2] = 1.0, -slant[:, i]
        support.append(np.linalg.norm(np.einsum("nij,ni->nj", axes, a @ camera_rot.T), axis=1))
    largest = np.linalg.norm(axes, axis=1).max(1)
    radius = np.minimum(SPLAT_EXTENT, np.sqrt(np.maximum(0.0, 2.0 * np.log(opacity / SPLAT_MIN_OPACITY))))
    dist = np.linalg.norm(centres - camera, axis=1)
    factor = radius / SPLAT_EXTENT * (QUAD_MARGIN + PERSPECTIVE_MARGIN * radius * largest / dist)
    return np.stack(support + [largest], 1) * factor[:, None]
