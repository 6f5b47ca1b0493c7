"""Canonical 3D Gaussians (algorithm spec section 4). Pure tensor math: no file I/O, no printing.

Raw (optimised) parameters live in ``GaussianModel.params``, an ``nn.ParameterDict`` keyed by the optimiser
group names of the authors:

==========  ==================  =========================================================
name        shape               meaning
==========  ==================  =========================================================
xyz         [N, 3]              centre (world units, Y-up)
f_dc        [N, 1, 3]           SH DC coefficient per RGB channel
f_rest      [N, (d+1)^2-1, 3]   higher SH coefficients (empty [N, 0, 3] for degree 0)
opacity     [N, 1]              opacity logit
scaling     [N, 3]              log of the per-axis standard deviation
rotation    [N, 4]              quaternion (w, x, y, z), stored unnormalised
==========  ==================  =========================================================

Activations: ``scales = exp(scaling)``, ``opacities = sigmoid(opacity)``, ``rotations = normalize(rotation)``,
colour = ``max(0, 0.5 + SH(dir))``.

Densification (``densify.py``) replaces entries of ``params`` in place, so always hand ``model.params`` itself
(not a copy) to the strategy; the properties below then see the new tensors.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]

#: Optimiser group / parameter names, in the authors' order (also the PLY attribute order).
PARAM_NAMES = ("xyz", "f_dc", "f_rest", "opacity", "scaling", "rotation")

# Real spherical-harmonics constants used by 3DGS (sh_utils.py of the Inria code / Plenoxels).
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (
    1.0925484305920792,
    -1.0925484305920792,
    0.31539156525252005,
    -1.0925484305920792,
    0.5462742152960396,
)
SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


# ---------------------------------------------------------------------------------------------------------------
# Small math helpers
# ---------------------------------------------------------------------------------------------------------------


def inverse_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """logit(x) = log(x / (1 - x)), as the authors compute it."""
    return torch.log(x / (1 - x))


def num_sh_coeffs(degree: int) -> int:
    """(degree + 1)^2: number of SH coefficients per channel, DC included."""
    return (int(degree) + 1) ** 2


def sh_degree_from_rest(num_rest: int) -> int:
    """Inverse of (d+1)^2 - 1 = num_rest; raises if num_rest is not of that form."""
    d = int(round(math.sqrt(num_rest + 1))) - 1
    if d < 0 or (d + 1) ** 2 - 1 != num_rest:
        raise ValueError(f"{num_rest} rest coefficients is not (d+1)^2-1 for any SH degree d")
    return d


def eval_sh(degree: int, sh: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Evaluate real SH up to ``degree`` (0..3) with the 3DGS constants and sign conventions.

    sh: [..., K, C] coefficients with K >= (degree+1)^2 (coefficient-major, i.e. the ``f_dc``/``f_rest`` layout
    concatenated along dim -2); dirs: [..., 3] unit directions (broadcast against sh[..., 0, :]'s batch dims).
    Returns [..., C] (without the +0.5 offset).
    """
    if not 0 <= degree <= 3:
        raise ValueError("SH degree must be in 0..3")
    if sh.shape[-2] < num_sh_coeffs(degree):
        raise ValueError(f"need {num_sh_coeffs(degree)} SH coefficients for degree {degree}, got {sh.shape[-2]}")
    result = SH_C0 * sh[..., 0, :]
    if degree == 0:
        return result
    d = dirs.unsqueeze(-1)  # [..., 3, 1] so each component broadcasts over channels
    x, y, z = d[..., 0, :], d[..., 1, :], d[..., 2, :]
    result = result - SH_C1 * y * sh[..., 1, :] + SH_C1 * z * sh[..., 2, :] - SH_C1 * x * sh[..., 3, :]
    if degree == 1:
        return result
    xx, yy, zz = x * x, y * y, z * z
    xy, yz, xz = x * y, y * z, x * z
    result = (
        result
        + SH_C2[0] * xy * sh[..., 4, :]
        + SH_C2[1] * yz * sh[..., 5, :]
        + SH_C2[2] * (2.0 * zz - xx - yy) * sh[..., 6, :]
        + SH_C2[3] * xz * sh[..., 7, :]
        + SH_C2[4] * (xx - yy) * sh[..., 8, :]
    )
    if degree == 2:
        return result
    result = (
        result
        + SH_C3[0] * y * (3 * xx - yy) * sh[..., 9, :]
        + SH_C3[1] * xy * z * sh[..., 10, :]
        + SH_C3[2] * y * (4 * zz - xx - yy) * sh[..., 11, :]
        + SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy) * sh[..., 12, :]
        + SH_C3[4] * x * (4 * zz - xx - yy) * sh[..., 13, :]
        + SH_C3[5] * z * (xx - yy) * sh[..., 14, :]
        + SH_C3[6] * x * (xx - 3 * yy) * sh[..., 15, :]
    )
    return result


def rgb_to_sh(rgb: torch.Tensor) -> torch.Tensor:
    """DC coefficient giving colour ``rgb`` (inverse of 0.5 + C0 * f_dc)."""
    return (rgb - 0.5) / SH_C0


def sh_to_rgb(f_dc: torch.Tensor) -> torch.Tensor:
    """Colour of a DC coefficient (no clamping)."""
    return f_dc * SH_C0 + 0.5


def quaternion_to_rotation_matrix(q: torch.Tensor) -> torch.Tensor:
    """[..., 4] quaternions (w, x, y, z), any norm -> [..., 3, 3] rotation matrices (normalised first)."""
    q = F.normalize(q, dim=-1)
    w, x, y, z = q.unbind(-1)
    rows = (
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    )
    return torch.stack(rows, dim=-1).reshape(q.shape[:-1] + (3, 3))


def covariance_matrices(scales: torch.Tensor, quats: torch.Tensor) -> torch.Tensor:
    """Sigma = R S S^T R^T from activated scales [..., 3] and quaternions [..., 4] -> [..., 3, 3]."""
    m = quaternion_to_rotation_matrix(quats) * scales.unsqueeze(-2)  # R @ diag(s)
    return m @ m.transpose(-1, -2)


def knn_mean_sq_dist(points: ArrayLike, k: int = 3) -> torch.Tensor:
    """Mean squared distance of each point to its ``k`` nearest other points (simple-knn ``distCUDA2`` with k=3).

    Uses ``scipy.spatial.cKDTree`` on a float64 copy. Points without neighbours (N = 1) get 0 (callers clamp).
    Returns a float32 CPU tensor [N].
    """
    from scipy.spatial import cKDTree

    pts = points.detach().cpu().double().numpy() if isinstance(points, torch.Tensor) else np.asarray(points, np.float64)
    n = pts.shape[0]
    if n == 0:
        return torch.zeros(0)
    kk = min(k, n - 1)
    if kk == 0:
        return torch.zeros(n)
    dist, _ = cKDTree(pts).query(pts, k=kk + 1)  # the first hit is the point itself
    dist = np.asarray(dist).reshape(n, kk + 1)[:, 1:]
    return torch.from_numpy((dist ** 2).mean(axis=1)).float()


def _as_tensor(x: ArrayLike, dtype=torch.float32, device=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(dtype=dtype, device=device if device is not None else x.device)
    return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


class GaussianModel(nn.Module):
    """Canonical Gaussians: one ``nn.Parameter`` per attribute in ``self.params`` (see the module docstring)."""

    def __init__(self, sh_degree: int = 0, num_points: int = 0, device: Optional[Union[str, torch.device]] = None):
        super().__init__()
        if not 0 <= sh_degree <= 3:
            raise ValueError("sh_degree must be in 0..3")
        self.sh_degree = int(sh_degree)
        n, k = int(num_points), num_sh_coeffs(sh_degree) - 1
        shapes = {
            "xyz": (n, 3),
            "f_dc": (n, 1, 3),
            "f_rest": (n, k, 3),
            "opacity": (n, 1),
            "scaling": (n, 3),
            "rotation": (n, 4),
        }
        params = {name: nn.Parameter(torch.zeros(shapes[name], device=device)) for name in PARAM_NAMES}
        with torch.no_grad():
            params["rotation"][:, 0] = 1.0
        self.params = nn.ParameterDict(OrderedDict((name, params[name]) for name in PARAM_NAMES))

    # ----------------------------------------------------------------------------------- constructors

    @classmethod
    def from_arrays(
        cls,
        xyz: ArrayLike,
        f_dc: ArrayLike,
        f_rest: Optional[ArrayLike] = None,
        opacity: Optional[ArrayLike] = None,
        scaling: Optional[ArrayLike] = None,
        rotation: Optional[ArrayLike] = None,
        sh_degree: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
    ) -> "GaussianModel":
        """Build from raw (pre-activation) arrays; numpy or torch, copied.

        - f_dc: [N, 3] or [N, 1, 3].
        - f_rest: [N, K, 3] (coefficient-major, our layout) or [N, 3K] (channel-major, the PLY layout);
          None = zeros for ``sh_degree`` (default 0).
        - opacity: logits [N] or [N, 1]; None = logit(0.1).
        - scaling: log-scales [N, 3]; None = the kNN rule of ``init_random_ball``.
        - rotation: [N, 4] wxyz; None = identity.
        """
        xyz_t = _as_tensor(xyz, device=device).reshape(-1, 3)
        n = xyz_t.shape[0]
        dev = xyz_t.device
        f_dc_t = _as_tensor(f_dc, device=dev).reshape(n, 1, 3)
        if f_rest is None:
            deg = 0 if sh_degree is None else int(sh_degree)
            f_rest_t = torch.zeros(n, num_sh_coeffs(deg) - 1, 3, device=dev)
        else:
            f_rest_t = _as_tensor(f_rest, device=dev)
            if f_rest_t.dim() == 2:  # PLY layout: [N, 3*K] channel-major -> [N, K, 3]
                if f_rest_t.shape[1] % 3:
                    raise ValueError("flat f_rest must have 3*K columns")
                f_rest_t = f_rest_t.reshape(n, 3, -1).transpose(1, 2)
            f_rest_t = f_rest_t.reshape(n, -1, 3).contiguous()
            deg = sh_degree_from_rest(f_rest_t.shape[1])
            if sh_degree is not None and int(sh_degree) != deg:
                raise ValueError(f"f_rest has {f_rest_t.shape[1]} coefficients, not degree {sh_degree}")
        if opacity is None:
            opacity_t = inverse_sigmoid(torch.full((n, 1), 0.1, device=dev))
        else:
            opacity_t = _as_tensor(opacity, device=dev).reshape(n, 1)
        if scaling is None:
            scaling_t = knn_log_scales(xyz_t).to(dev)
        else:
            scaling_t = _as_tensor(scaling, device=dev).reshape(n, 3)
        if rotation is None:
            rotation_t = torch.zeros(n, 4, device=dev)
            rotation_t[:, 0] = 1.0
        else:
            rotation_t = _as_tensor(rotation, device=dev).reshape(n, 4)
        model = cls(sh_degree=deg, num_points=0, device=dev)
        model.load_state(
            {"xyz": xyz_t, "f_dc": f_dc_t, "f_rest": f_rest_t, "opacity": opacity_t, "scaling": scaling_t,
             "rotation": rotation_t}
        )
        return model

    @classmethod
    def init_random_ball(
        cls,
        num_pts: int = 10000,
        radius: float = 0.5,
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
        sh_degree: int = 0,
        init_opacity: float = 0.1,
        device: Optional[Union[str, torch.device]] = None,
    ) -> "GaussianModel":
        """The authors' random initialisation (``Renderer.initialize`` + ``create_from_pcd``).

        - direction uniform on the sphere (phi ~ U[0, 2pi), cos(theta) ~ U[-1, 1]), r = radius * cbrt(u);
        - f_dc ~ U(0, 1/255) (colour 0.5 + C0 * f_dc: mid-grey), f_rest = 0;
        - log-scale = log(sqrt(max(mean sq. distance to 3 nearest neighbours, 1e-7))) on all three axes;
        - quaternion (1, 0, 0, 0); opacity = logit(0.1).

        Deterministic given ``generator`` (a CPU ``torch.Generator``) or ``seed``; with neither, uses the global
        torch RNG. Sampling is done in float64 on the CPU, then cast to float32 and moved to ``device``.
        """
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        n = int(num_pts)
        u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
        phi = u[:, 0] * (2 * math.pi)
        cos_t = u[:, 1] * 2 - 1
        sin_t = torch.sqrt(torch.clamp(1 - cos_t * cos_t, min=0.0))
        r = radius * torch.pow(u[:, 2], 1.0 / 3.0)
        xyz = torch.stack([r * sin_t * torch.cos(phi), r * sin_t * torch.sin(phi), r * cos_t], dim=1).float()
        f_dc = (torch.rand(n, 3, generator=generator, dtype=torch.float64) / 255.0).float()
        scaling = knn_log_scales(xyz)
        opacity = inverse_sigmoid(torch.full((n, 1), float(init_opacity)))
        f_rest = torch.zeros(n, num_sh_coeffs(sh_degree) - 1, 3)
        return cls.from_arrays(xyz, f_dc, f_rest, opacity, scaling, None, device=device)

    # ----------------------------------------------------------------------------------- raw parameters

    @property
    def xyz(self) -> nn.Parameter:
        return self.params["xyz"]

    @property
    def f_dc(self) -> nn.Parameter:
        return self.params["f_dc"]

    @property
    def f_rest(self) -> nn.Parameter:
        return self.params["f_rest"]

    @property
    def opacity(self) -> nn.Parameter:
        """Opacity logits [N, 1]."""
        return self.params["opacity"]

    @property
    def scaling(self) -> nn.Parameter:
        """Log-scales [N, 3]."""
        return self.params["scaling"]

    @property
    def rotation(self) -> nn.Parameter:
        """Raw (unnormalised) wxyz quaternions [N, 4]."""
        return self.params["rotation"]

    @property
    def num_points(self) -> int:
        return int(self.params["xyz"].shape[0])

    def __len__(self) -> int:
        return self.num_points

    @property
    def device(self) -> torch.device:
        return self.params["xyz"].device

    # ----------------------------------------------------------------------------------- activated values

    @property
    def scales(self) -> torch.Tensor:
        """exp(scaling) [N, 3]."""
        return torch.exp(self.params["scaling"])

    @property
    def opacities(self) -> torch.Tensor:
        """sigmoid(opacity) [N, 1]."""
        return torch.sigmoid(self.params["opacity"])

    @property
    def rotations(self) -> torch.Tensor:
        """Unit quaternions [N, 4] (wxyz)."""
        return F.normalize(self.params["rotation"], dim=-1)

    @property
    def features(self) -> torch.Tensor:
        """All SH coefficients [N, (d+1)^2, 3] (f_dc then f_rest)."""
        return torch.cat([self.params["f_dc"], self.params["f_rest"]], dim=1)

    def covariances(self) -> torch.Tensor:
        """World-space covariance matrices [N, 3, 3] of the canonical Gaussians."""
        return covariance_matrices(self.scales, self.params["rotation"])

    def colors(self, view_dirs: Optional[torch.Tensor] = None, degree: Optional[int] = None) -> torch.Tensor:
        """RGB [N, 3] = max(0, 0.5 + SH(dir)).

        ``view_dirs`` [N, 3] (or [3], broadcast) are the directions from the camera centre to each Gaussian
        (``xyz - campos``); they are normalised here and ignored for degree 0. ``degree`` defaults to the
        model's ``sh_degree`` (the authors always use the full degree).
        """
        deg = self.sh_degree if degree is None else min(int(degree), self.sh_degree)
        if deg > 0:
            if view_dirs is None:
                raise ValueError("view directions are needed for SH degree > 0")
            dirs = F.normalize(view_dirs.to(self.params["xyz"].dtype), dim=-1)
            dirs = dirs.expand(self.num_points, 3)
        else:
            dirs = self.params["xyz"]  # unused
        return torch.clamp_min(eval_sh(deg, self.features, dirs) + 0.5, 0.0)

    def colors_from_camera(self, campos: torch.Tensor, xyz: Optional[torch.Tensor] = None,
                           degree: Optional[int] = None) -> torch.Tensor:
        """``colors`` with per-Gaussian directions ``xyz - campos`` (``xyz`` defaults to the canonical centres;
        pass the deformed centres for a frame)."""
        pts = self.params["xyz"] if xyz is None else xyz
        return self.colors(pts - campos.to(pts).reshape(1, 3), degree)

    # ----------------------------------------------------------------------------------- optimiser helpers

    def param_groups(self, lrs: Optional[Mapping[str, float]] = None) -> list:
        """One Adam param group per attribute, named like the authors (``"name"`` key). ``lrs`` defaults to the
        it = 0 values of ``schedules.LR_TABLE``."""
        if lrs is None:
            from .schedules import learning_rates

            lrs = learning_rates(0)
        return [{"params": [self.params[name]], "lr": float(lrs[name]), "name": name} for name in PARAM_NAMES]

    def make_optimizer(self, lrs: Optional[Mapping[str, float]] = None, eps: float = 1e-15,
                       extra_groups: Iterable[dict] = ()) -> torch.optim.Adam:
        """Adam(eps=1e-15) over ``param_groups(lrs)`` plus ``extra_groups`` (e.g. the deformation network's)."""
        return torch.optim.Adam(self.param_groups(lrs) + list(extra_groups), lr=0.0, eps=eps)

    # ----------------------------------------------------------------------------------- plain tensors

    def state(self) -> Dict[str, torch.Tensor]:
        """Detached copies of the raw parameters, keyed by ``PARAM_NAMES``."""
        return {name: self.params[name].detach().clone() for name in PARAM_NAMES}

    def load_state(self, state: Mapping[str, ArrayLike]) -> "GaussianModel":
        """Replace every parameter by a new ``nn.Parameter`` holding a copy of ``state[name]``.

        The SH degree follows ``state["f_rest"]``. Any optimiser built on the old parameters must be rebuilt.
        """
        missing = [n for n in PARAM_NAMES if n not in state]
        if missing:
            raise KeyError(f"missing Gaussian attributes: {missing}")
        dev = self.params["xyz"].device if len(self.params) else None
        tensors = {n: _as_tensor(state[n], device=dev).clone() for n in PARAM_NAMES}
        n = tensors["xyz"].shape[0]
        expected = {"xyz": (n, 3), "f_dc": (n, 1, 3), "opacity": (n, 1), "scaling": (n, 3), "rotation": (n, 4)}
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}, expected {shape}")
        rest = tensors["f_rest"]
        if rest.dim() != 3 or rest.shape[0] != n or rest.shape[2] != 3:
            raise ValueError(f"f_rest has shape {tuple(rest.shape)}, expected ({n}, K, 3)")
        self.sh_degree = sh_degree_from_rest(rest.shape[1])
        for name in PARAM_NAMES:
            self.params[name] = nn.Parameter(tensors[name].contiguous())
        return self

    def extra_repr(self) -> str:
        return f"num_points={self.num_points}, sh_degree={self.sh_degree}"


def knn_log_scales(xyz: ArrayLike, k: int = 3, min_sq_dist: float = 1e-7) -> torch.Tensor:
    """Initial log-scales [N, 3]: log(sqrt(clamp(mean sq. distance to k nearest neighbours, min_sq_dist)))."""
    d2 = torch.clamp_min(knn_mean_sq_dist(xyz, k), min_sq_dist)
    return torch.log(torch.sqrt(d2))[:, None].repeat(1, 3)


__all__ = [
    "PARAM_NAMES",
    "SH_C0",
    "GaussianModel",
    "eval_sh",
    "rgb_to_sh",
    "sh_to_rgb",
    "inverse_sigmoid",
    "num_sh_coeffs",
    "sh_degree_from_rest",
    "quaternion_to_rotation_matrix",
    "covariance_matrices",
    "knn_mean_sq_dist",
    "knn_log_scales",
]
