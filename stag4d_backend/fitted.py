"""The on-disk format of a fitted 4D model (what `stag4d fit` writes and `render`/`bake` read).

``OUT_DIR/``
  ``canonical.ply``               canonical Gaussians, 3DGS PLY layout (x y z, f_dc, f_rest, opacity logit, log
                                  scales, rot w x y z)
  ``deformation.safetensors``     the deformation network's state dict (names in docs/gaussians.md); its
                                  ``DeformationConfig`` is stored as JSON in the file's metadata
  ``meta.json``                   frames, fps, time convention, options, versions, statistics
  ``state.pt``                    the resumable training state (fitting/checkpoint.py)

Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, write_json
from .gaussians.animated import AnimatedGaussians
from .gaussians.deformation import DeformationConfig, DeformationNetwork
from .gaussians.model import GaussianModel
from .gaussians.ply import load_model_ply, save_model_ply

CANONICAL = "canonical.ply"
DEFORMATION = "deformation.safetensors"
META = "meta.json"
FORMAT_VERSION = 1


class FittedModelError(ValueError):
    """A folder that is not (or not yet) a complete fit."""


def save_fitted(out_dir: str | Path, model: GaussianModel, deformation: DeformationNetwork, meta: dict) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model_ply(out_dir / CANONICAL, model)
    state = {k: v.detach().to("cpu").contiguous() for k, v in deformation.state_dict().items()}
    with atomic_path(out_dir / DEFORMATION) as tmp:
        save_file(state, str(tmp), metadata={"deformation_config": json.dumps(deformation.cfg.to_dict()),
                                             "format_version": str(FORMAT_VERSION)})
    write_json(out_dir / META, dict(meta, format_version=FORMAT_VERSION), sort_keys=True)


def load_meta(out_dir: str | Path) -> dict:
    path = Path(out_dir) / META
    if not path.is_file():
        raise FittedModelError(f"{path}: missing; run `stag4d fit DATA_DIR -o {out_dir}` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FittedModelError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); re-run the fit") from None


def load_fitted(out_dir: str | Path, device: str | torch.device = "cpu") -> tuple[AnimatedGaussians, dict]:
    """(AnimatedGaussians, meta) of a finished fit."""
    out_dir = Path(out_dir)
    meta = load_meta(out_dir)
    for name in (CANONICAL, DEFORMATION):
        if not (out_dir / name).is_file():
            raise FittedModelError(f"{out_dir / name}: missing; the fit did not finish (re-run it to resume)")
    model = load_model_ply(out_dir / CANONICAL, device=device)
    from safetensors import safe_open

    with safe_open(str(out_dir / DEFORMATION), framework="pt") as fh:
        cfg_json = (fh.metadata() or {}).get("deformation_config")
    if cfg_json is None:
        raise FittedModelError(f"{out_dir / DEFORMATION}: no deformation_config metadata; re-run the fit")
    net = DeformationNetwork(DeformationConfig(**json.loads(cfg_json))).to(device)
    net.load_state_dict(load_file(str(out_dir / DEFORMATION), device=str(device)))
    return AnimatedGaussians(model, net, int(meta["num_frames"])), meta
