"""Loading Zero123-XL (``ashawkey/zero123-xl-diffusers`` layout) into a :class:`Zero123SDS` guidance.

Folder layout (as on the Hub; the registry checks it is complete)::

    model_index.json
    unet/                    UNet2DConditionModel, 8 input channels (noisy latent + conditioning latent)
    vae/                     AutoencoderKL (SD 1.x, scaling 0.18215)
    image_encoder/           transformers CLIPVisionModelWithProjection (ViT-L/14, 768-d image_embeds)
    feature_extractor/       CLIPImageProcessor (224 px)
    clip_camera_projection/  CLIPCameraProjection: config.json + diffusion_pytorch_model.safetensors, keys
                             proj.weight [768, 772] and proj.bias [768] (the repo's zero123.py class)
    scheduler/               scheduler_config.json, read by DDIMScheduler.from_config

Each component is loaded from its subfolder with local files only (the registry found the folder offline), so the
repo's custom pipeline code (``clip_camera_projection/zero123.py``) is never imported or run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..device import resolve_device

MODEL_NAME = "zero123-xl"
SUBFOLDERS = ("unet", "vae", "image_encoder", "feature_extractor", "clip_camera_projection", "scheduler")


class CLIPCameraProjection(ModelMixin, ConfigMixin):
    """Linear(embedding_dim + additional_embeddings -> embedding_dim) over [CLIP embedding, camera pose].

    Same name, config keys and state-dict keys as the class the Zero123 diffusers repos ship, so their
    ``clip_camera_projection/`` folder loads with ``from_pretrained``.
    """

    @register_to_config
    def __init__(self, embedding_dim: int = 768, additional_embeddings: int = 4):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.additional_embeddings = additional_embeddings
        self.proj = torch.nn.Linear(embedding_dim + additional_embeddings, embedding_dim)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.proj(embedding)


@dataclass
class Zero123Components:
    unet: Any
    vae: Any
    image_encoder: Any
    feature_extractor: Any
    camera_projection: CLIPCameraProjection
    scheduler: DDIMScheduler


def _image_processor_class():
    """The PIL CLIP processor: what the authors' transformers 4 'slow' processor was. transformers 5 picks a
    torchvision one by default (slightly different resampling) and warns when torchvision is absent."""
    try:
        from transformers import CLIPImageProcessorPil
        return CLIPImageProcessorPil
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor
        return CLIPImageProcessor


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def _check_shapes(c: Zero123Components, folder: Path) -> None:
    from .registry import ModelLoadError, get_spec

    spec = get_spec(MODEL_NAME)
    problems = []
    if c.unet.config.in_channels != 8:
        problems.append(f"unet has {c.unet.config.in_channels} input channels (Zero123 needs 8)")
    d = c.camera_projection.config.embedding_dim
    if c.camera_projection.config.additional_embeddings != 4:
        problems.append("clip_camera_projection does not take a 4-number camera pose")
    if c.image_encoder.config.projection_dim != d:
        problems.append(f"image_encoder gives {c.image_encoder.config.projection_dim}-d embeddings, the camera "
                        f"projection expects {d}")
    if c.unet.config.cross_attention_dim != d:
        problems.append(f"unet cross-attention is {c.unet.config.cross_attention_dim}-d, the camera projection "
                        f"gives {d}")
    if problems:
        raise ModelLoadError(f"{folder} is not a Zero123 model: {'; '.join(problems)}.", spec)


def load_zero123_components(folder: str | os.PathLike, device: str | torch.device = "cpu",
                            dtype: torch.dtype = torch.float32) -> Zero123Components:
    """Every component from its subfolder of ``folder`` (local files only), on ``device`` in ``dtype``."""
    from transformers import CLIPVisionModelWithProjection

    from .registry import component_variant

    folder = Path(folder)
    # low_cpu_mem_usage needs accelerate (optional here); say so explicitly instead of a warning per component.
    kw = dict(torch_dtype=dtype, local_files_only=True, low_cpu_mem_usage=_has_accelerate())

    def diffusers_part(cls, sub):
        # a copy may hold only *.fp16.* weight files (saved with variant="fp16"): load that variant then
        return cls.from_pretrained(folder, subfolder=sub, variant=component_variant(folder / sub), **kw)

    unet = diffusers_part(UNet2DConditionModel, "unet")
    vae = diffusers_part(AutoencoderKL, "vae")
    camera_projection = diffusers_part(CLIPCameraProjection, "clip_camera_projection")
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(
        folder / "image_encoder", dtype=dtype, local_files_only=True,
        variant=component_variant(folder / "image_encoder"))
    feature_extractor = _image_processor_class().from_pretrained(folder / "feature_extractor",
                                                                 local_files_only=True)
    scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(folder, subfolder="scheduler",
                                                                    local_files_only=True))
    c = Zero123Components(unet, vae, image_encoder, feature_extractor, camera_projection, scheduler)
    _check_shapes(c, folder)
    for m in (c.unet, c.vae, c.image_encoder, c.camera_projection):
        m.to(device).eval().requires_grad_(False)
    return c


def load_zero123_sds(device: str | torch.device = "auto", local_path: str | os.PathLike | None = None,
                     seed: int = 0, **opts):
    """A ready :class:`~stag4d_backend.guidance.zero123_sds.Zero123SDS` from the installed Zero123-XL weights.

    The folder comes from the registry (``local_path`` > ``$STAG4D_ZERO123_XL_PATH`` > the Hugging Face cache,
    offline); missing weights raise ``registry.MissingWeightsError`` (one line naming the model, its size and
    the download command). fp16 on CUDA, float32 on CPU. ``opts`` go to ``Zero123SDS`` (guidance_scale,
    anneal_iters, latent, p_min, p_max, image_size); :func:`sds_options` maps a ``FitConfig`` onto them.
    """
    from ..guidance.zero123_sds import Zero123SDS
    from .registry import resolve, torch_dtype

    folder = resolve(MODEL_NAME, local_path)
    dev = resolve_device(device)
    dtype = torch_dtype(MODEL_NAME, dev)
    c = load_zero123_components(folder, dev, dtype)
    return Zero123SDS(c.unet, c.vae, c.image_encoder, c.feature_extractor, c.camera_projection, c.scheduler,
                      device=dev, dtype=dtype, seed=seed, **opts)


def sds_options(cfg) -> dict:
    """The SDS settings a fit config carries: guidance scale, annealing horizon (rescaled by --iters), seed."""
    return {"guidance_scale": cfg.guidance_scale, "anneal_iters": cfg.sds_anneal_iters, "seed": cfg.seed + 2}


# ------------------------------------------------------------------------------------------- random models

# The real model's configs (SD image-variations UNet with 8 input channels, SD 1.x VAE, CLIP ViT-L/14).
_FULL = {
    "unet": dict(sample_size=32, in_channels=8, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=256,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    "clip": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
    "image_size": 224,
}
# Tiny stand-ins with the same structure: 256 px renders -> 32x32 latents (4 VAE levels), 8-channel UNet.
_TINY = {
    "unet": dict(sample_size=32, in_channels=8, out_channels=4, cross_attention_dim=32, attention_head_dim=4,
                 block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "vae": dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                sample_size=256, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4),
    "clip": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=8, projection_dim=32),
    "image_size": 32,
}
_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
_MODEL_INDEX = {
    "_class_name": ["zero123", "Zero123Pipeline"],
    "clip_camera_projection": ["zero123", "CLIPCameraProjection"],
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def random_zero123_components(tiny: bool = True, seed: int = 0, device: str | torch.device = "cpu",
                              dtype: torch.dtype = torch.float32) -> Zero123Components:
    """Random-weight Zero123 components built in memory on ``device`` (initialised there: seconds for the
    full-size 860M-parameter UNet on a GPU)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = _TINY if tiny else _FULL
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["clip"]))
        camera_projection = CLIPCameraProjection(embedding_dim=cfg["clip"]["projection_dim"], additional_embeddings=4)
    for m in (unet, vae, image_encoder, camera_projection):
        m.to(dtype=dtype).eval().requires_grad_(False)
    s = cfg["image_size"]
    return Zero123Components(unet, vae, image_encoder,
                             _image_processor_class()(size={"shortest_edge": s}, crop_size={"height": s, "width": s}),
                             camera_projection, DDIMScheduler(**_SCHEDULER))


def random_zero123_sds(device: str | torch.device = "cpu", tiny: bool = True, seed: int = 0,
                       dtype: torch.dtype | None = None, **opts):
    """A Zero123SDS on random weights built in memory (benchmarks/gpu_check.py): fp16 on CUDA like the real
    model unless ``dtype`` says otherwise."""
    from ..guidance.zero123_sds import Zero123SDS
    from .registry import torch_dtype

    dev = resolve_device(device)
    dtype = dtype or torch_dtype(MODEL_NAME, dev)
    c = random_zero123_components(tiny, seed, dev, dtype)
    return Zero123SDS(c.unet, c.vae, c.image_encoder, c.feature_extractor, c.camera_projection, c.scheduler,
                      device=dev, dtype=dtype, seed=seed, **opts)


def save_random_zero123(folder: str | os.PathLike, tiny: bool = True, seed: int = 0,
                        variant: str | None = None) -> Path:
    """Random-weight Zero123 in the real folder layout (tests, benchmarks): ``tiny`` for seconds-long tests, or
    the full-size architecture for timing. Load it with ``load_zero123_sds(local_path=folder)``.
    ``variant="fp16"``: half-precision weights saved only as ``*.fp16.*`` files, as some copies hold them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = random_zero123_components(tiny, seed, dtype=torch.float16 if variant == "fp16" else torch.float32)
    for model, sub in ((c.unet, "unet"), (c.vae, "vae"), (c.image_encoder, "image_encoder"),
                       (c.camera_projection, "clip_camera_projection")):
        model.save_pretrained(folder / sub, variant=variant)
    c.feature_extractor.save_pretrained(folder / "feature_extractor")
    c.scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(_MODEL_INDEX, indent=2))
    return folder


__all__ = ["CLIPCameraProjection", "Zero123Components", "load_zero123_components", "load_zero123_sds",
           "sds_options", "save_random_zero123", "random_zero123_components", "random_zero123_sds", "MODEL_NAME"]
