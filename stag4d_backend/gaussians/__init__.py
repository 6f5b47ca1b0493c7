"""4D Gaussians: canonical 3DGS set, HexPlane deformation, adaptive densification, PLY I/O, schedules.

See docs/gaussians.md. Everything here is pure tensor math except ``ply.py`` (file I/O); nothing prints.
"""

from .deformation import (
    PLANE_PAIRS,
    SPATIAL_PLANES,
    TIME_PLANES,
    DeformationConfig,
    DeformationNetwork,
    HexPlaneField,
    apply_deltas,
    num_grid_parameters,
    plane_shapes,
)
from .densify import AdaptiveDensification, to_ndc_grad
from .model import (
    PARAM_NAMES,
    SH_C0,
    GaussianModel,
    covariance_matrices,
    eval_sh,
    quaternion_to_rotation_matrix,
)
from .ply import load_model_ply, load_ply, save_model_ply, save_ply
from .schedules import LR_TABLE, learning_rates, log_linear_lr, sds_t_range

__all__ = [
    "PLANE_PAIRS",
    "SPATIAL_PLANES",
    "TIME_PLANES",
    "DeformationConfig",
    "DeformationNetwork",
    "HexPlaneField",
    "apply_deltas",
    "num_grid_parameters",
    "plane_shapes",
    "AdaptiveDensification",
    "to_ndc_grad",
    "PARAM_NAMES",
    "SH_C0",
    "GaussianModel",
    "covariance_matrices",
    "eval_sh",
    "quaternion_to_rotation_matrix",
    "load_model_ply",
    "load_ply",
    "save_model_ply",
    "save_ply",
    "LR_TABLE",
    "learning_rates",
    "log_linear_lr",
    "sds_t_range",
]
