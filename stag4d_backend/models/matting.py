"""Matting: cut the object out of RGB frames with BiRefNet (``ZhengPeng7/BiRefNet``, MIT), registry name "matting".

``matte(images, device="auto", local_path=None) -> list[RGBA PIL.Image]`` and ``is_available()``.

BiRefNet ships its architecture as Python code in the model folder (``birefnet.py``, ``BiRefNet_config.py``,
``config.json`` with an ``auto_map``). We import that class through transformers' dynamic-module loader and build it
ourselves, then load ``model.safetensors``: transformers 5's ``from_pretrained`` creates models on the meta device,
which BiRefNet's Swin backbone does not survive (``.item()`` on a meta tensor) and skips the ``post_init`` it
expects. ``AutoModelForImageSegmentation.from_pretrained(trust_remote_code=True)`` is the fallback. The folder's
code imports packages of its own (timm, kornia, einops, torchvision for the real model): ``unavailable_reason``
names the missing ones instead of failing deep inside an import.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from ..device import resolve_device

NAME = "matting"
RESOLUTION = 1024                 # BiRefNet's training resolution
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)   # ImageNet normalisation, as BiRefNet's own inference code
_STD = np.array([0.229, 0.224, 0.225], np.float32)

_cache: dict = {}
_lock = threading.Lock()


def _registry():
    from . import registry

    return registry


def _imports(folder: Path) -> set[str] | None:
    """Top-level packages the folder's code imports (transformers' own import scan); None without transformers."""
    try:
        from transformers.dynamic_module_utils import get_imports
    except ImportError:
        return None
    return {pkg for py in folder.glob("*.py") for pkg in get_imports(py)}


# Packages whose wheel must be built for the installed torch: pip's default one can be built for another torch
# (PyPI's torchvision pairs with the CUDA build; beside the CPU build its import fails with "operator
# torchvision::nms does not exist"), so install.sh --matting installs the matching one.
# Each with the code that proves its compiled ops load.
_TORCH_PAIRED = {"torchvision": "import torch, torchvision.ops as o; o.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)"}
_INSTALL_HINT = "run `bash install_scripts/install.sh --matting`, which installs the build that matches torch"
_import_checks: dict[str, str | None] = {}


def broken_import(package: str) -> str | None:
    """None when ``package`` imports (with its compiled ops); else the error's last line. Run in a subprocess, once
    per process: a failed import of a torch extension can leave half-registered operators behind."""
    if package not in _import_checks:
        import subprocess
        import sys

        code = _TORCH_PAIRED.get(package, f"import {package}")
        try:
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
            lines = (res.stderr or res.stdout).strip().splitlines()
            _import_checks[package] = None if res.returncode == 0 else (lines[-1] if lines else "import failed")
        except (OSError, subprocess.SubprocessError) as exc:
            _import_checks[package] = f"could not check ({exc})"
    return _import_checks[package]


def unavailable_reason(local_path=None) -> str | None:
    """None when matting can run; else one line saying what is missing and how to get it."""
    reg = _registry()
    try:
        folder = reg.resolve(NAME, local_path)
    except reg.MissingWeightsError as exc:
        return str(exc)
    needed = _imports(folder)
    missing = ["transformers"] if needed is None else \
        sorted(pkg for pkg in needed if importlib.util.find_spec(pkg) is None)
    if missing:
        paired = [p for p in missing if p in _TORCH_PAIRED]
        how = _INSTALL_HINT if paired else f"install them with `pip install {' '.join(missing)}` in the " \
                                            f"backend's environment"
        return (f"the matting model at {folder} needs Python packages that are not installed: "
                f"{', '.join(missing)}; {how}")
    for pkg in sorted(needed.intersection(_TORCH_PAIRED)):
        err = broken_import(pkg)
        if err:
            return f"{pkg} is installed but does not work with this torch ({err}); {_INSTALL_HINT}"
    return None


def is_available(local_path=None) -> bool:
    return unavailable_reason(local_path) is None


def _build(folder: Path):
    """The BiRefNet nn.Module from the folder's own code and weights (see module doc)."""
    import torch
    from safetensors.torch import load_file
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    cfg = json.loads((folder / "config.json").read_text())
    auto_map = cfg.get("auto_map", {})
    ref = auto_map.get("AutoModelForImageSegmentation")
    if not ref:
        raise ValueError("config.json has no auto_map entry for AutoModelForImageSegmentation")
    cls = get_class_from_dynamic_module(ref, str(folder), local_files_only=True)
    kwargs = {}
    params = inspect.signature(cls.__init__).parameters
    if "bb_pretrained" in params:
        kwargs["bb_pretrained"] = False  # the backbone's ImageNet weights: ours come from model.safetensors
    if "config" in params and auto_map.get("AutoConfig"):
        cfg_cls = get_class_from_dynamic_module(auto_map["AutoConfig"], str(folder), local_files_only=True)
        kwargs["config"] = cfg_cls()
    with torch.device("cpu"):
        model = cls(**kwargs)
    weights = folder / "model.safetensors"
    if weights.is_file():
        state = load_file(str(weights))
    else:
        state = torch.load(next(folder.glob("*.bin")), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model


def load(local_path=None, device="auto"):
    """(model, device, dtype), cached per folder and device. Raises MissingWeightsError / ModelLoadError."""
    reg = _registry()
    folder = reg.resolve(NAME, local_path)
    dev = resolve_device(device)
    key = (str(folder), str(dev))
    with _lock:
        if key in _cache:
            return _cache[key]
        problem = unavailable_reason(local_path)
        if problem:
            raise reg.ModelLoadError(problem, reg.get_spec(NAME))
        dtype = reg.torch_dtype(NAME, dev)
        try:
            model = _build(folder)
        except Exception as first:  # noqa: BLE001 - try the transformers route before giving up
            try:
                from transformers import AutoModelForImageSegmentation

                model = AutoModelForImageSegmentation.from_pretrained(str(folder), trust_remote_code=True,
                                                                      local_files_only=True)
            except Exception as second:  # noqa: BLE001
                raise reg.ModelLoadError(
                    f"the matting model at {folder} could not be loaded ({type(first).__name__}: "
                    f"{str(first).splitlines()[0][:160] if str(first) else ''}; via transformers: "
                    f"{type(second).__name__}: {str(second).splitlines()[0][:160] if str(second) else ''}); "
                    f"re-download it with `stag4d models download matting`", reg.get_spec(NAME)) from None
        model = model.to(dev, dtype).eval()
        _cache[key] = (model, dev, dtype)
        return _cache[key]


def _prediction(out):
    """BiRefNet returns a list of side outputs (the last is the final map); other models a tensor or .logits."""
    if isinstance(out, (list, tuple)):
        out = out[-1]
    if hasattr(out, "logits"):
        out = out.logits
    return out


def matte(images: list[Image.Image], device="auto", local_path=None, model=None,
          resolution: int = RESOLUTION) -> list[Image.Image]:
    """RGBA copies of ``images`` with the predicted alpha (soft, 0..255) at each image's own size.
    ``model`` may be given directly (a module mapping [N,3,H,W] ImageNet-normalised input to logits)."""
    import torch

    if model is None:
        model, dev, dtype = load(local_path, device)
    else:
        p = next(model.parameters(), None)
        dev, dtype = (p.device, p.dtype) if p is not None else (resolve_device(device), torch.float32)
    out = []
    for im in images:
        rgb = im.convert("RGB")
        x = np.asarray(rgb.resize((resolution, resolution), Image.Resampling.BILINEAR), np.float32) / 255.0
        x = (x - _MEAN) / _STD
        t = torch.from_numpy(x).permute(2, 0, 1)[None].to(dev, dtype)
        with torch.inference_mode():
            pred = _prediction(model(t)).float().sigmoid()[0, 0].cpu().numpy()
        mask = Image.fromarray(np.round(pred * 255.0).astype(np.uint8), "L").resize(rgb.size,
                                                                                      Image.Resampling.BILINEAR)
        rgba = rgb.copy()
        rgba.putalpha(mask)
        out.append(rgba)
    return out


__all__ = ["matte", "is_available", "unavailable_reason", "load", "NAME"]
