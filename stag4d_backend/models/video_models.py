"""Loaders for the video stage's models: Stable Video Diffusion img2vid-xt and SDXL-Turbo (docs/models.md).

Both load a diffusers pipeline from a local folder in the layout of the Hugging Face repo
(``stabilityai/stable-video-diffusion-img2vid-xt``: model_index.json, unet/, vae/, image_encoder/,
feature_extractor/, scheduler/; ``stabilityai/sdxl-turbo``: model_index.json, unet/, vae/, text_encoder/,
text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/). The folder comes from the registry (argument >
$STAG4D_<NAME>_PATH > Hugging Face cache, never the network). Weights stored as the fp16 variant are loaded as such
and cast to the device's dtype (float32 on a CPU). Failures are one-line MissingWeightsError / ModelLoadError.
"""

from __future__ import annotations

import gc
from pathlib import Path

from ..device import resolve_device

SVD = "svd"
SDXL_TURBO = "sdxl-turbo"


def _dtype_keyword() -> str:
    """diffusers renamed from_pretrained's ``torch_dtype`` to ``dtype`` (0.42 warns on the old name)."""
    try:
        from diffusers.utils import deprecation_utils

        return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    except ImportError:
        return "torch_dtype"


def _load_pipeline(name: str, pipeline_cls, local_path, device, dtype, cpu_offload: bool):
    from . import registry

    spec = registry.get_spec(name)
    folder = registry.resolve(name, local_path)
    dev = resolve_device(device)
    dtype = dtype or registry.torch_dtype(name, dev)
    variant = registry.variant_for(name, folder)
    try:
        pipe = pipeline_cls.from_pretrained(str(folder), **{_dtype_keyword(): dtype}, variant=variant,
                                            local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
        raise registry.ModelLoadError(f"{spec.title} at {folder} could not be loaded ({first}); re-download it "
                                      f"with `stag4d models download {name}` or fix {spec.env_var}", spec) from None
    pipe.set_progress_bar_config(disable=True)  # the stage reports progress itself; nothing below the CLI prints
    if cpu_offload and dev.type == "cuda":
        try:
            pipe.enable_model_cpu_offload(device=dev)
        except (ImportError, RuntimeError) as exc:
            raise registry.ModelLoadError(f"cpu_offload needs the accelerate package ({exc}); "
                                          f"`pip install accelerate` or run without it", spec) from None
    else:
        pipe = pipe.to(dev)
    return pipe


def load_svd(local_path: str | Path | None = None, device="auto", dtype=None, cpu_offload: bool = False):
    """StableVideoDiffusionPipeline from a folder in the img2vid(-xt) layout."""
    from diffusers import StableVideoDiffusionPipeline

    return _load_pipeline(SVD, StableVideoDiffusionPipeline, local_path, device, dtype, cpu_offload)


def load_sdxl_turbo(local_path: str | Path | None = None, device="auto", dtype=None, cpu_offload: bool = False,
                    min_vocab: int = 1000):
    """AutoPipelineForText2Image (StableDiffusionXLPipeline) from a folder in the sdxl-turbo layout; both
    tokenizers are checked for a real vocabulary (offline loading can return a nearly empty one)."""
    from diffusers import AutoPipelineForText2Image

    from . import registry

    pipe = _load_pipeline(SDXL_TURBO, AutoPipelineForText2Image, local_path, device, dtype, cpu_offload)
    spec = registry.get_spec(SDXL_TURBO)
    for attr in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, attr, None)
        if tok is None:
            raise registry.ModelLoadError(f"{spec.title} loaded without its {attr}: the folder is incomplete; "
                                          f"re-download it with `stag4d models download {SDXL_TURBO}`", spec)
        registry.check_vocab(tok, spec, minimum=min_vocab)
    return pipe


def free_memory() -> None:
    """Give the memory of dropped pipelines back (the prompt path holds SDXL and SVD one after the other):
    call after the last reference to a pipeline is gone."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["load_svd", "load_sdxl_turbo", "free_memory", "SVD", "SDXL_TURBO"]
