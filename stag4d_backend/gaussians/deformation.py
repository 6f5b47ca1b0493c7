"""HexPlane (K-planes) deformation field + MLP heads + plane regularisers (algorithm spec sections 4 and 5).

Module tree and state-dict names (identical to the authors' ``deform_network`` for every live tensor, so their
``deformation.pth`` loads with :meth:`DeformationNetwork.load_authors_state_dict`)::

    DeformationNetwork
      deformation_net                       (authors: Deformation)
        grid                                HexPlaneField
          grids.{s}.{p}                     plane p (0..5) of scale s, shape [1, C, res_b, res_a]
        feature_out.0.{weight,bias}         Linear(C * num_scales -> W)   (+ ReLU, Linear(W, W) per extra depth)
        pos_deform.{1,3}.{weight,bias}      ReLU, Linear(W, W), ReLU, Linear(W, 3)
        scales_deform.{1,3}.{weight,bias}   ... Linear(W, 3)
        rotations_deform.{1,3}.{weight,bias} ... Linear(W, 4)
        rotvec_deform.{1,3}.{weight,bias}   ... Linear(W, 3)   only with motion="rigid" (not in the authors' model)

The authors' dead modules (``timenet``, the positional-encoding buffers ``*_poc``, ``opacity_deform``) are not
built; the AABB is a non-persistent buffer (the config is the source of truth).

Coordinates (faithful): the AABB is stored as [max, min] = [[+b]*3, [-b]*3], so the normalisation
``(p - aabb[0]) * 2 / (aabb[1] - aabb[0]) - 1`` gives ``p~ = -p / b``; time t = f / F is used as is
(``time_mapping="faithful"``) or mapped to 2t - 1 (``"symmetric"``, an option that changes results).

Motion (``DeformationConfig.motion``): ``"offset"`` (the authors') adds the head outputs, x + dx, log s + ds,
q + dq. ``"rigid"`` adds a fourth head, a world-frame rotation vector w, and moves each Gaussian rigidly:
x' = R(w) x + dx, log s' = log s + ds, q' = q_w ⊗ (q + dq) (``apply_deltas``; rotation helpers in ``rigid.py``).
A part spinning rigidly about c is then the spatially constant pair (w, c - R c), which the smooth field fits
easily, instead of the point-by-point offset R x - x.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .rigid import quat_multiply, quat_rotate, rotvec_to_quat

#: The 6 coordinate pairs of (x, y, z, t) in itertools order: 0:(x,y) 1:(x,z) 2:(x,t) 3:(y,z) 4:(y,t) 5:(z,t).
PLANE_PAIRS: Tuple[Tuple[int, int], ...] = tuple(itertools.combinations(range(4), 2))
SPATIAL_PLANES: Tuple[int, ...] = tuple(i for i, p in enumerate(PLANE_PAIRS) if 3 not in p)  # (0, 1, 3)
TIME_PLANES: Tuple[int, ...] = tuple(i for i, p in enumerate(PLANE_PAIRS) if 3 in p)  # (2, 4, 5)

#: Keys of the authors' ``deform_network`` state dict that have no counterpart here (dead code).
AUTHORS_IGNORED_PREFIXES = (
    "timenet.",
    "time_poc",
    "pos_poc",
    "rotation_scaling_poc",
    "opacity_poc",
    "deformation_net.opacity_deform.",
    "deformation_net.grid.aabb",
)

TimeLike = Union[float, int, torch.Tensor]

#: Names of the heads in ``_DeformationCore.heads()`` order (the last only with ``motion="rigid"``).
HEAD_NAMES: Tuple[str, ...] = ("pos", "scale", "rot", "rigid")
MOTIONS: Tuple[str, ...] = ("offset", "rigid")


@dataclass
class DeformationConfig:
    """Hyper-parameters of the field, the MLP and the regulariser. Defaults = the authors' numbers."""

    bounds: float = 1.6
    resolution: Tuple[int, int, int, int] = (64, 64, 64, 25)  # x, y, z, t of the base scale
    multires: Tuple[int, ...] = (1, 2, 4, 8)  # multipliers of the spatial resolution only
    feature_dim: int = 32  # channels per plane ("output_coordinate_dim")
    width: int = 64  # MLP width W
    depth: int = 1  # D: feature_out = Linear, then (ReLU, Linear) * (D - 1)
    head_init: str = "zero"  # "zero": last Linear of each head zeroed (exact identity) | "authors"
    time_mapping: str = "faithful"  # "faithful": t as is | "symmetric": 2t - 1
    flip_aabb: bool = True  # True = authors' [max, min] AABB (p~ = -p / b); False = p~ = p / b
    spatial_init: Tuple[float, float] = (0.1, 0.5)  # U(a, b) for spatial planes
    time_init: float = 1.0  # constant for planes containing t
    # Regulariser weights (section 5; the outer lambda_tv = 1 is folded in).
    plane_tv_weight: float = 0.05  # second-difference smoothness of the spatial planes (misnamed "TV")
    time_smoothness_weight: float = 5.0
    l1_time_planes_weight: float = 0.05
    # "offset": x + dx (the authors') | "rigid": R(w) x + dx with a rotation-vector head w (see the module docstring)
    motion: str = "offset"

    def __post_init__(self):
        self.resolution = tuple(int(r) for r in self.resolution)
        self.multires = tuple(int(m) for m in self.multires)
        self.spatial_init = tuple(float(v) for v in self.spatial_init)
        if len(self.resolution) != 4:
            raise ValueError("resolution must have 4 entries (x, y, z, t)")
        if self.head_init not in ("zero", "authors"):
            raise ValueError("head_init must be 'zero' or 'authors'")
        if self.time_mapping not in ("faithful", "symmetric"):
            raise ValueError("time_mapping must be 'faithful' or 'symmetric'")
        if self.motion not in MOTIONS:
            raise ValueError(f"motion must be one of {MOTIONS}, not {self.motion!r}")
        if self.depth < 1 or not self.multires:
            raise ValueError("depth must be >= 1 and multires non-empty")

    @classmethod
    def authors(cls, **overrides) -> "DeformationConfig":
        """The faithful configuration including the authors' non-zero initial deformation."""
        return replace(cls(head_init="authors"), **overrides)

    @classmethod
    def small(cls, **overrides) -> "DeformationConfig":
        """A CPU-friendly grid: (32, 32, 32, 13) x multires (1, 2), 611,328 grid parameters instead of 35.7 M,
        64-d features (the MLP input shrinks accordingly). A starting point for a CPU preset, not tuned."""
        return replace(cls(resolution=(32, 32, 32, 13), multires=(1, 2)), **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


def plane_shapes(cfg: DeformationConfig) -> List[List[Tuple[int, ...]]]:
    """Shapes of every plane, [scale][plane] -> (1, C, res_b, res_a)."""
    out = []
    for m in cfg.multires:
        res = [r * m for r in cfg.resolution[:3]] + [cfg.resolution[3]]
        out.append([(1, cfg.feature_dim, res[b], res[a]) for a, b in PLANE_PAIRS])
    return out


def num_grid_parameters(cfg: DeformationConfig) -> int:
    return sum(math.prod(s) for scale in plane_shapes(cfg) for s in scale)


def plane_smoothness(plane: torch.Tensor) -> torch.Tensor:
    """Mean squared second finite difference along the height axis (dim -2); 0 when the height is < 3."""
    h = plane.shape[-2]
    if h < 3:
        return plane.new_zeros(())
    first = plane[..., 1:, :] - plane[..., :-1, :]
    second = first[..., 1:, :] - first[..., :-1, :]
    return torch.square(second).mean()


def plane_tv(plane: torch.Tensor) -> torch.Tensor:
    """The true total-variation term of K-planes (``compute_plane_tv``); unused by the authors, offered as a tool."""
    b, c, h, w = plane.shape
    h_tv = torch.square(plane[..., 1:, :] - plane[..., :-1, :]).sum() / max(b * c * (h - 1) * w, 1)
    w_tv = torch.square(plane[..., :, 1:] - plane[..., :, :-1]).sum() / max(b * c * h * (w - 1), 1)
    return 2 * (h_tv + w_tv)


# ---------------------------------------------------------------------------------------------------------------


class HexPlaneField(nn.Module):
    """Multi-scale HexPlane features: per scale the Hadamard product of 6 bilinear plane samples, scales concatenated.

    ``forward(xyz [N, 3], t)`` -> [N, feature_dim * len(multires)] (128 with the defaults).
    """

    def __init__(self, cfg: Optional[DeformationConfig] = None, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.cfg = cfg = cfg or DeformationConfig()
        b = float(cfg.bounds)
        aabb = torch.tensor([[b, b, b], [-b, -b, -b]]) if cfg.flip_aabb else torch.tensor([[-b, -b, -b], [b, b, b]])
        self.register_buffer("aabb", aabb, persistent=False)
        self.grids = nn.ModuleList()
        for shapes in plane_shapes(cfg):
            planes = nn.ParameterList()
            for pi, shape in enumerate(shapes):
                p = torch.empty(shape)
                if pi in TIME_PLANES:
                    nn.init.constant_(p, cfg.time_init)
                else:
                    nn.init.uniform_(p, cfg.spatial_init[0], cfg.spatial_init[1], generator=generator)
                planes.append(nn.Parameter(p))
            self.grids.append(planes)
        self.feat_dim = cfg.feature_dim * len(cfg.multires)

    def normalize_xyz(self, xyz: torch.Tensor) -> torch.Tensor:
        """World coordinates -> grid coordinates (faithful: -p / bounds)."""
        aabb = self.aabb.to(xyz.dtype)
        return (xyz - aabb[0]) * (2.0 / (aabb[1] - aabb[0])) - 1.0

    def map_time(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.cfg.time_mapping == "faithful" else 2.0 * t - 1.0

    def forward(self, xyz: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """xyz [N, 3] world coordinates; t [N, 1] frame times (already broadcast, before mapping)."""
        n = xyz.shape[0]
        q = torch.cat([self.normalize_xyz(xyz), self.map_time(t.to(xyz.dtype))], dim=-1)  # [N, 4]
        if n == 0:
            return xyz.new_zeros(0, self.feat_dim)
        # One grid_sample per plane with all points batched. The sample grid is shaped [1, N, 1, 2] (not
        # [1, 1, N, 2]): the CPU kernel parallelises and vectorises better over output rows.
        coords = [q[:, [a, b]].reshape(1, n, 1, 2) for a, b in PLANE_PAIRS]
        feats = []
        for planes in self.grids:
            prod = None
            for plane, grid in zip(planes, coords):
                s = F.grid_sample(plane, grid, mode="bilinear", padding_mode="border", align_corners=True)
                s = s.reshape(plane.shape[1], n)  # [C, N]
                prod = s if prod is None else prod * s
            feats.append(prod)
        return torch.cat(feats, dim=0).t()  # [N, C * scales]

    def regularization_terms(self) -> Dict[str, torch.Tensor]:
        """Unweighted terms summed over scales: ``plane_smoothness`` (spatial planes, along their height axis:
        y for xy, z for xz and yz), ``time_smoothness`` (time planes along t) and ``l1_time`` (mean |1 - P| of
        the time planes)."""
        zero = self.grids[0][0].new_zeros(())
        spatial, temporal, l1 = zero, zero, zero
        for planes in self.grids:
            for i in SPATIAL_PLANES:
                spatial = spatial + plane_smoothness(planes[i])
            for i in TIME_PLANES:
                temporal = temporal + plane_smoothness(planes[i])
                l1 = l1 + torch.abs(1 - planes[i]).mean()
        return {"plane_smoothness": spatial, "time_smoothness": temporal, "l1_time": l1}


def _head(width: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, out))


class _DeformationCore(nn.Module):
    """The authors' ``Deformation`` (grid + feature_out + heads), kept as a level so state-dict names match."""

    def __init__(self, cfg: DeformationConfig, generator: Optional[torch.Generator]):
        super().__init__()
        self.grid = HexPlaneField(cfg, generator)
        layers: List[nn.Module] = [nn.Linear(self.grid.feat_dim, cfg.width)]
        for _ in range(cfg.depth - 1):
            layers += [nn.ReLU(), nn.Linear(cfg.width, cfg.width)]
        self.feature_out = nn.Sequential(*layers)
        self.pos_deform = _head(cfg.width, 3)
        self.scales_deform = _head(cfg.width, 3)
        self.rotations_deform = _head(cfg.width, 4)
        self.rigid = cfg.motion == "rigid"
        if self.rigid:  # built last, so the other heads' seeded init matches motion="offset"
            self.rotvec_deform = _head(cfg.width, 3)

    def heads(self) -> Tuple[nn.Sequential, ...]:
        """(pos, scales, rotations[, rotvec]): the modules of ``HEAD_NAMES`` that this network has."""
        base = (self.pos_deform, self.scales_deform, self.rotations_deform)
        return base + (self.rotvec_deform,) if self.rigid else base

    def forward(self, xyz: torch.Tensor, t: torch.Tensor):
        h = self.feature_out(self.grid(xyz, t))
        # The heads, evaluated as one: they all start with ReLU(h), so compute it once, run their first Linear
        # layers as one [W -> kW] GEMM and their last layers as one block-diagonal [kW -> 10 (13 rigid)] GEMM.
        # Mathematically identical to calling pos_deform(h), scales_deform(h), rotations_deform(h)[, rotvec_deform(h)].
        heads = self.heads()
        w1 = torch.cat([hd[1].weight for hd in heads], dim=0)
        b1 = torch.cat([hd[1].bias for hd in heads], dim=0)
        z = F.relu(F.linear(F.relu(h), w1, b1))
        w2 = torch.block_diag(*[hd[3].weight for hd in heads])
        b2 = torch.cat([hd[3].bias for hd in heads], dim=0)
        out = F.linear(z, w2, b2)
        return out.split([hd[3].out_features for hd in heads], dim=1)

    def forward_unfused(self, xyz: torch.Tensor, t: torch.Tensor):
        """Reference path calling the head modules one by one (used by the tests)."""
        h = self.feature_out(self.grid(xyz, t))
        return tuple(hd(h) for hd in self.heads())


def move_points(xyz: torch.Tensor, dx: torch.Tensor, q: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Moved positions: ``xyz + dx`` (offset motion, ``q=None``) or ``R(q) xyz + dx`` (rigid, q the unit quaternion
    of the rotation head). Also for points that are not Gaussians (mesh vertices)."""
    return xyz + dx if q is None else quat_rotate(q, xyz) + dx


def apply_deltas(xyz: torch.Tensor, log_scales: torch.Tensor, rotations: torch.Tensor,
                 deltas: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canonical raw values + head outputs -> deformed raw values; the one place where they are composed.

    ``deltas`` = (dx, ds, dq) (offset motion): (xyz + dx, log_scales + ds, rotations + dq); or (dx, ds, dq, w)
    (rigid): (R xyz + dx, log_scales + ds, q_w ⊗ (rotations + dq)) with q_w = exp(w), R its matrix. The
    quaternions stay unnormalised (q_w is unit, so the norm of rotations + dq is kept). Broadcasts."""
    dx, ds, dq = deltas[:3]
    q = rotvec_to_quat(deltas[3]) if len(deltas) == 4 else None
    rot = rotations + dq
    return move_points(xyz, dx, q), log_scales + ds, rot if q is None else quat_multiply(q, rot)


class DeformationNetwork(nn.Module):
    """HexPlane field + MLP giving per-Gaussian (dx, d log-scale, dq[, w]) at time t.

    ``deform`` returns *raw* values, like the authors: ``xyz + dx``, ``log_scales + ds`` and ``rotations + dq``
    where ``rotations`` are the raw (unnormalised) quaternions; apply exp / normalize at use. With
    ``motion="rigid"`` the centre and the quaternion are also rotated by exp(w) (``apply_deltas``).
    """

    def __init__(self, cfg: Optional[DeformationConfig] = None, seed: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, **overrides):
        super().__init__()
        cfg = cfg or DeformationConfig()
        if overrides:
            cfg = replace(cfg, **overrides)
        self.cfg = cfg
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        self.deformation_net = _DeformationCore(cfg, generator)
        self.reset_mlp_parameters(generator)

    # ----------------------------------------------------------------------------------- init

    @torch.no_grad()
    def reset_mlp_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """xavier_uniform_ weights; biases U(+-1/sqrt(fan_in)) (PyTorch's default, which the authors keep because of
        their init bug); with ``head_init="zero"`` the last Linear of each head is then zeroed (weights and bias),
        so the deformation is exactly the identity until the first optimiser step (also with ``motion="rigid"``:
        w = 0 is the identity rotation)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, gain=1.0, generator=generator)
                if m.bias is not None:
                    bound = 1.0 / math.sqrt(m.weight.shape[1]) if m.weight.shape[1] > 0 else 0.0
                    nn.init.uniform_(m.bias, -bound, bound, generator=generator)
        if self.cfg.head_init == "zero":
            for head in self.deformation_net.heads():
                nn.init.zeros_(head[-1].weight)
                nn.init.zeros_(head[-1].bias)

    # ----------------------------------------------------------------------------------- evaluation

    @property
    def grid(self) -> HexPlaneField:
        return self.deformation_net.grid

    @property
    def head_names(self) -> Tuple[str, ...]:
        """Names of ``deltas``' outputs: ("pos", "scale", "rot") or, rigid, ("pos", "scale", "rot", "rigid")."""
        return HEAD_NAMES[:len(self.deformation_net.heads())]

    @staticmethod
    def _broadcast_time(t: TimeLike, n: int, ref: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            return torch.full((n, 1), float(t), dtype=ref.dtype, device=ref.device)
        t = t.to(device=ref.device, dtype=ref.dtype)
        if t.numel() == 1:
            return t.reshape(1, 1).expand(n, 1)
        return t.reshape(n, 1)

    def deltas(self, xyz: torch.Tensor, t: TimeLike) -> Tuple[torch.Tensor, ...]:
        """(dx [N, 3], d log-scale [N, 3], dq [N, 4]) at canonical positions ``xyz`` and time(s) ``t``
        (a float, a 0-d/1-element tensor, or one time per point [N] / [N, 1]); with ``motion="rigid"`` also the
        rotation vector w [N, 3]. Combine them with canonical values through ``apply_deltas``."""
        return self.deformation_net(xyz, self._broadcast_time(t, xyz.shape[0], xyz))

    def deform(
        self,
        xyz: torch.Tensor,
        log_scales: torch.Tensor,
        rotations: torch.Tensor,
        t: TimeLike,
        mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Deformed (xyz + dx, log_scales + ds, rotations + dq), all raw (rigid motion: see ``apply_deltas``).

        ``rotations`` should be the raw quaternions (as the authors do); the result is *not* normalised. With
        ``mask`` [N] bool only those Gaussians are deformed (the authors' ``deformation_table``; all True there).
        """
        if mask is None:
            return apply_deltas(xyz, log_scales, rotations, self.deltas(xyz, t))
        mask = mask.to(torch.bool)
        tt = self._broadcast_time(t, xyz.shape[0], xyz)
        part = self.deformation_net(xyz[mask], tt[mask])
        moved = apply_deltas(xyz[mask], log_scales[mask], rotations[mask], part)
        idx = mask.nonzero(as_tuple=True)[0]
        # Scatter the deformed rows; x[idx] + d written back equals the former index_add bit for bit.
        return tuple(full.index_copy(0, idx, rows) for full, rows in zip((xyz, log_scales, rotations), moved))

    forward = deform

    # ----------------------------------------------------------------------------------- regulariser

    def regularization(self, weights: Optional[Mapping[str, float]] = None) -> Dict[str, torch.Tensor]:
        """Unweighted terms (see ``HexPlaneField.regularization_terms``) plus ``total`` = weighted sum with
        ``plane_tv_weight`` (0.05), ``time_smoothness_weight`` (5) and ``l1_time_planes_weight`` (0.05) unless
        ``weights`` (keys ``plane_smoothness``, ``time_smoothness``, ``l1_time``) overrides them."""
        terms = self.grid.regularization_terms()
        w = {
            "plane_smoothness": self.cfg.plane_tv_weight,
            "time_smoothness": self.cfg.time_smoothness_weight,
            "l1_time": self.cfg.l1_time_planes_weight,
        }
        if weights:
            w.update(weights)
        terms["total"] = sum(w[k] * terms[k] for k in ("plane_smoothness", "time_smoothness", "l1_time"))
        return terms

    # ----------------------------------------------------------------------------------- optimiser groups

    def grid_parameters(self) -> List[nn.Parameter]:
        return list(self.grid.parameters())

    def mlp_parameters(self) -> List[nn.Parameter]:
        return [p for name, p in self.named_parameters() if ".grid." not in name]

    def param_groups(self, lrs: Optional[Mapping[str, float]] = None) -> List[dict]:
        """Groups ``"deformation"`` (MLP) and ``"grid"`` (planes), named like the authors'. ``lrs`` defaults to
        the it = 0 values of ``schedules.LR_TABLE``."""
        if lrs is None:
            from .schedules import learning_rates

            lrs = learning_rates(0)
        return [
            {"params": self.mlp_parameters(), "lr": float(lrs["deformation"]), "name": "deformation"},
            {"params": self.grid_parameters(), "lr": float(lrs["grid"]), "name": "grid"},
        ]

    # ----------------------------------------------------------------------------------- authors' checkpoints

    def load_authors_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> List[str]:
        """Load the authors' ``deformation.pth`` state dict; returns the keys that were ignored (dead modules).

        Every live tensor must be present with the same shape (so the config must match theirs, e.g.
        ``DeformationConfig.authors()``, which has ``motion="offset"``: the authors have no rotation-vector head);
        raises ``KeyError``/``ValueError`` otherwise.
        """
        own = self.state_dict()
        ignored, picked = [], {}
        for k, v in state_dict.items():
            key = k[7:] if k.startswith("module.") else k
            if key.startswith(AUTHORS_IGNORED_PREFIXES):
                ignored.append(k)
                continue
            if key not in own:
                raise KeyError(f"unexpected key in the authors' state dict: {k}")
            if tuple(v.shape) != tuple(own[key].shape):
                raise ValueError(f"{k}: shape {tuple(v.shape)} != {tuple(own[key].shape)} (config mismatch?)")
            picked[key] = v
        missing = sorted(set(own) - set(picked))
        if missing:
            raise KeyError(f"missing keys: {missing[:5]}{'...' if len(missing) > 5 else ''}")
        self.load_state_dict(picked, strict=True)
        return ignored


def deformed_params(
    params: Mapping[str, torch.Tensor],
    net: Optional[DeformationNetwork],
    t: TimeLike,
    mask: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """Raw Gaussian parameters of one frame (section 7): ``xyz + dx``, ``scaling + ds``, ``rotation + dq``
    (unnormalised, as stored in the canonical PLY; rigid motion: ``apply_deltas``); every other entry (opacity,
    colour, ...) is passed through.

    ``params`` is ``GaussianModel.params`` (or any mapping with ``xyz``/``scaling``/``rotation``); ``net=None``
    means no deformation (the coarse stage). Same count and order of Gaussians as the canonical set, so
    ``ply.save_model_ply(path, None, params=deformed_params(...))`` writes a per-frame file.
    """
    out = dict(params)
    if net is not None:
        out["xyz"], out["scaling"], out["rotation"] = net.deform(params["xyz"], params["scaling"],
                                                                 params["rotation"], t, mask=mask)
    return out


__all__ = [
    "apply_deltas",
    "move_points",
    "deformed_params",
    "HEAD_NAMES",
    "MOTIONS",
    "PLANE_PAIRS",
    "SPATIAL_PLANES",
    "TIME_PLANES",
    "AUTHORS_IGNORED_PREFIXES",
    "DeformationConfig",
    "HexPlaneField",
    "DeformationNetwork",
    "plane_shapes",
    "num_grid_parameters",
    "plane_smoothness",
    "plane_tv",
]
