"""Zero123++ v1.1 from a local folder in the `sudo-ai/zero123plus-v1.1` layout, and its sampler with STAG4D's
first-frame fusion (stag4d-algorithm.md section 2; docs/anchors.md).

Folder layout (the Hub repo's, loaded component by component so no custom pipeline code is fetched):
    model_index.json                   components + ``ramping_coefficients`` (one per text token, 77)
    unet/ vae/ text_encoder/ vision_encoder/   diffusers / transformers models
    tokenizer/                         CLIP BPE (vocab.json, merges.txt)
    feature_extractor_clip/            CLIPImageProcessor, 224 px, CLIP mean/std -> vision encoder
    feature_extractor_vae/             CLIPImageProcessor, 320 px, mean/std 0.5 -> VAE (the condition latent)
    scheduler/                         replaced by Euler-ancestral with trailing timesteps, as the authors do

The sampling loop is the official custom pipeline's (a StableDiffusionPipeline around a reference-only UNet)
written out: CFG batch [uncond, cond], uncond = text("") and cond = text("") + ramp * CLIP image embedding; the
condition latent is an unscaled VAE sample; each UNet call is a "write" pass on the noised condition latent and
a "read" pass on the grid latent (guidance/zero123pp_fusion.py does the attention part). Every random draw comes
from seeded CPU generators, per frame, so frames can share one noise sequence (the authors' default) and a
frame's result does not depend on what else is in its batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..guidance.zero123pp_fusion import FusionContext, bind, install
from ..job import JobStopped

MODEL_NAME = "zero123plus"
GREY = 127                      # the canvas the condition image is pasted on
GRID_ROWS, GRID_COLS = 3, 2     # six views, row-major: view k at row k // 2, column k % 2
DEFAULT_STEPS = 75
DEFAULT_GUIDANCE = 4.0
DEFAULT_SEED = 42
# Output tile edge: the official pipeline always renders a 640x960 grid (width=640, height=960 are its call's
# defaults), whatever the condition image's size; feature_extractor_vae's crop (also 320 for the real model)
# only sizes the condition latent.
DEFAULT_TILE = 320

# Independent random streams per frame, all derived from the frame's seed.
_NOISE, _REF_NOISE, _COND_SAMPLE, _NEG_SAMPLE = range(4)


def scale_latents(z: torch.Tensor) -> torch.Tensor:
    return (z - 0.22) * 0.75


def unscale_latents(z: torch.Tensor) -> torch.Tensor:
    return z / 0.75 + 0.22


def unscale_image(x: torch.Tensor) -> torch.Tensor:
    return x / 0.5 * 0.8


def stream_generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator (device-independent results); stream 0 is the seed itself."""
    return torch.Generator("cpu").manual_seed((int(seed) + (stream << 40)) % (1 << 63))


def to_rgb_on_grey(image: Image.Image) -> Image.Image:
    """RGBA -> RGB pasted on a (127, 127, 127) canvas with alpha as the mask (official to_rgb_image)."""
    if image.mode == "RGB":
        return image
    if image.mode != "RGBA":
        image = image.convert("RGBA")
    canvas = Image.new("RGB", image.size, (GREY, GREY, GREY))
    canvas.paste(image, mask=image.getchannel("A"))
    return canvas


def split_grid(grid: Image.Image) -> list[Image.Image]:
    """The 3x2 grid (W x H = 2t x 3t) -> six t x t views, k row-major."""
    w, h = grid.size
    tw, th = w // GRID_COLS, h // GRID_ROWS
    return [grid.crop(((k % 2) * tw, (k // 2) * th, (k % 2 + 1) * tw, (k // 2 + 1) * th)) for k in range(6)]


def _image_processor_class():
    # The PIL backend is what transformers 4.29 (the authors' pin) used; the torchvision one warns when absent.
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:  # older/newer transformers without the split backends
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


@dataclass
class Zero123PlusModel:
    unet: object
    vae: object
    text_encoder: object
    tokenizer: object
    vision_encoder: object
    feature_extractor_clip: object
    feature_extractor_vae: object
    scheduler_config: dict
    ramping_coefficients: list[float]
    path: Path
    device: torch.device
    dtype: torch.dtype
    tile_size: int = DEFAULT_TILE   # output tile edge in px (the grid is 2 x 3 tiles)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def load_zero123plus(model_path: str | Path | None = None, device: str | torch.device = "cpu",
                     dtype: str | torch.dtype | None = None, tile: int | None = None) -> Zero123PlusModel:
    """Load the components from the registry's folder (``model_path`` overrides). MissingWeightsError (from
    the registry) when absent, ModelLoadError when present but unusable. ``tile``: output tile edge in px
    (default 320, the official 640x960 grid); a multiple of the VAE's downsampling factor."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    from .registry import ModelLoadError, check_vocab, get_spec, resolve, torch_dtype

    spec = get_spec(MODEL_NAME)
    folder = resolve(MODEL_NAME, model_path)
    device = torch.device(device)
    if dtype is None:
        dtype = torch_dtype(MODEL_NAME, device)
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder / 'model_index.json'}: unreadable ({exc}); re-download with "
                             f"`stag4d models download {MODEL_NAME}`", spec) from None
    ramp = index.get("ramping_coefficients")
    if not isinstance(ramp, list) or not ramp:
        raise ModelLoadError(f"{folder / 'model_index.json'} has no ramping_coefficients: not a Zero123++ "
                             f"v1.1 folder", spec)

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    check_vocab(tokenizer, spec)
    if len(ramp) != tokenizer.model_max_length:
        raise ModelLoadError(f"{folder}: {len(ramp)} ramping coefficients but the tokenizer pads to "
                             f"{tokenizer.model_max_length} tokens", spec)
    proc = _image_processor_class()
    kw = dict(torch_dtype=dtype)
    model = Zero123PlusModel(
        unet=UNet2DConditionModel.from_pretrained(folder / "unet", **kw),
        vae=AutoencoderKL.from_pretrained(folder / "vae", **kw),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", **kw),
        tokenizer=tokenizer,
        vision_encoder=CLIPVisionModelWithProjection.from_pretrained(folder / "vision_encoder", **kw),
        feature_extractor_clip=proc.from_pretrained(folder / "feature_extractor_clip"),
        feature_extractor_vae=proc.from_pretrained(folder / "feature_extractor_vae"),
        scheduler_config=json.loads((folder / "scheduler" / "scheduler_config.json").read_text()),
        ramping_coefficients=[float(x) for x in ramp],
        path=folder, device=device, dtype=dtype, tile_size=int(tile or DEFAULT_TILE))
    check_tile(model.tile_size, model.vae_scale_factor)
    for m in (model.unet, model.vae, model.text_encoder, model.vision_encoder):
        m.to(device).eval().requires_grad_(False)
    return model


def check_tile(tile: int, vae_scale_factor: int) -> None:
    if tile <= 0 or tile % vae_scale_factor:
        raise ValueError(f"Zero123++ tile {tile} px: must be a positive multiple of the VAE's downsampling "
                         f"factor {vae_scale_factor} (the official grid uses 320)")


@dataclass
class FrameCondition:
    cond_lat: torch.Tensor       # [1, 4, t, t] unscaled VAE sample of the condition image
    prompt_embeds: torch.Tensor  # [1, 77, D] text("") + ramp * image embedding


class Zero123PlusSampler:
    """Zero123++ v1.1 sampling (Euler ancestral, trailing) with the fusion processors installed once."""

    def __init__(self, model: Zero123PlusModel):
        self.model = model
        self.ctx = FusionContext()
        self.layers = install(model.unet, self.ctx)
        self._text: torch.Tensor | None = None
        self._neg: dict[int, torch.Tensor] = {}

    # -- conditioning -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def text_embeds(self) -> torch.Tensor:
        """text("") as diffusers' encode_prompt builds it (padded to model_max_length, no attention mask
        unless the encoder asks for one)."""
        if self._text is None:
            m = self.model
            tok = m.tokenizer("", padding="max_length", max_length=m.tokenizer.model_max_length, truncation=True,
                              return_tensors="pt")
            mask = tok.attention_mask.to(m.device) if getattr(m.text_encoder.config, "use_attention_mask",
                                                              False) else None
            self._text = m.text_encoder(tok.input_ids.to(m.device), attention_mask=mask)[0].to(m.dtype)
        return self._text

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.model.vae.encode(pixels).latent_dist.sample(generator=gen)

    def _pixels(self, processor, rgb: Image.Image) -> torch.Tensor:
        px = processor(images=rgb, return_tensors="pt").pixel_values
        return px.to(device=self.model.device, dtype=self.model.dtype)

    @torch.no_grad()
    def negative_latent(self, seed: int, like: torch.Tensor) -> torch.Tensor:
        """VAE sample of the all-zero (mid-grey) image: the CFG branch's condition latent."""
        if seed not in self._neg:
            self._neg[seed] = self._encode(torch.zeros_like(like), stream_generator(seed, _NEG_SAMPLE))
        return self._neg[seed]

    @torch.no_grad()
    def condition(self, image: Image.Image, seed: int) -> FrameCondition:
        m = self.model
        rgb = to_rgb_on_grey(image)
        px_vae = self._pixels(m.feature_extractor_vae, rgb)
        px_clip = self._pixels(m.feature_extractor_clip, rgb)
        cond_lat = self._encode(px_vae, stream_generator(seed, _COND_SAMPLE))
        self.negative_latent(seed, px_vae)
        global_embeds = m.vision_encoder(px_clip).image_embeds.unsqueeze(-2)        # [1, 1, D]
        ramp = global_embeds.new_tensor(m.ramping_coefficients).unsqueeze(-1)      # [77, 1]
        return FrameCondition(cond_lat, self.text_embeds() + global_embeds * ramp)

    # -- sampling -----------------------------------------------------------------------------------------------
    def latent_size(self, tile: int | None = None) -> tuple[int, int]:
        t = int(tile or self.model.tile_size)
        sf = self.model.vae_scale_factor
        check_tile(t, sf)
        return GRID_ROWS * t // sf, GRID_COLS * t // sf

    @torch.no_grad()
    def sample(self, conds: Sequence[FrameCondition], seeds: Sequence[int], ctx: FusionContext,
               steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE, tile: int | None = None,
               on_step: Callable[[int, int], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
        """Denoise one batch of frames together; returns their latents [n, 4, h, w] (still scaled)."""
        from diffusers import EulerAncestralDiscreteScheduler
        from diffusers.utils.torch_utils import randn_tensor

        m = self.model
        n = len(conds)
        dev, dt = m.device, m.dtype
        cfg = guidance_scale > 1.0
        sched = EulerAncestralDiscreteScheduler.from_config(m.scheduler_config, timestep_spacing="trailing")
        sched.set_timesteps(steps, device=dev)

        bind(m.unet, ctx)
        ctx.branches = 2 if cfg else 1
        noise_gens = [stream_generator(s, _NOISE) for s in seeds]
        ref_gens = [stream_generator(s, _REF_NOISE) for s in seeds]
        h, w = self.latent_size(tile)
        latents = randn_tensor((n, m.unet.config.in_channels, h, w), generator=noise_gens, device=dev,
                               dtype=dt) * sched.init_noise_sigma

        cond_lat = torch.cat([c.cond_lat for c in conds])
        embeds = torch.cat([c.prompt_embeds for c in conds])
        if cfg:
            neg = torch.cat([self.negative_latent(s, c.cond_lat) for s, c in zip(seeds, conds)])
            ref_lat = torch.cat([neg, cond_lat])
            embeds = torch.cat([self.text_embeds().expand(n, -1, -1), embeds])
        else:
            ref_lat = cond_lat
        branches = ctx.branches

        for i, t in enumerate(sched.timesteps):
            ctx.begin_step(i)
            model_in = sched.scale_model_input(torch.cat([latents] * branches), t)
            # one draw per frame and step of shape [branches, ...] (the official randn_like(cond_lat)),
            # regrouped to the batch's [branch][frame] order
            noise = torch.stack([randn_tensor((branches, *cond_lat.shape[1:]), generator=g, device=dev, dtype=dt)
                                 for g in ref_gens], dim=1).flatten(0, 1)
            t1 = t.reshape(-1)
            ref_in = sched.scale_model_input(sched.add_noise(ref_lat, noise, t1), t1)
            ctx.phase = "write"
            m.unet(ref_in, t, encoder_hidden_states=embeds, return_dict=False)
            ctx.phase = "read"
            pred = m.unet(model_in, t, encoder_hidden_states=embeds, return_dict=False)[0]
            ctx.end_step()
            if cfg:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            latents = sched.step(pred, t, latents, generator=noise_gens, return_dict=False)[0]
            if on_step is not None:
                on_step(i + 1, steps)
            if should_stop is not None and should_stop() and i + 1 < steps:
                raise JobStopped(f"stopped after denoising step {i + 1} of {steps}")
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents -> 3x2 grid images, one VAE decode per frame (bounded memory at 640x960)."""
        vae = self.model.vae
        out = []
        for z in latents.split(1):
            x = vae.decode(unscale_latents(z) / vae.config.scaling_factor, return_dict=False)[0]
            x = (unscale_image(x).float() / 2 + 0.5).clamp(0, 1)
            arr = (x[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            out.append(Image.fromarray(arr))
        return out


def frame_batches(todo: Sequence[int], batch: int) -> list[list[int]]:
    later = [f for f in todo if f != 0]
    batch = max(1, int(batch))
    return [later[i:i + batch] for i in range(0, len(later), batch)]


def generate_grids(sampler: Zero123PlusSampler, images: dict[int, Image.Image], todo: Sequence[int], *,
                   mode: str = "lockstep", batch: int = 1, steps: int = DEFAULT_STEPS,
                   guidance_scale: float = DEFAULT_GUIDANCE, seed: int = DEFAULT_SEED, per_frame_noise: bool = False,
                   mid_block_quirk: bool = True, tile: int | None = None,
                   on_step: Callable[[list[int], int, int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None, decode: bool = True,
                   contexts: list | None = None) -> Iterator[tuple[int, Image.Image]]:
    """Yield (frame, grid image) for the frames in ``todo`` as each batch finishes.

    ``images`` must hold frame 0 whenever a later frame is asked for (it is the anchor). Modes:
    lockstep = frame 0 is denoised beside every batch of later frames (nothing stored, resumable per frame);
    stored = frame 0 once, its tokens kept in host memory for all later frames (the authors' way);
    off = every frame independently (plain Zero123++). ``decode=False`` yields latents [4, h, w] instead of
    images; ``contexts`` collects the FusionContexts (tests)."""
    if mode not in ("lockstep", "stored", "off"):
        raise ValueError(f"fusion mode {mode!r}; expected lockstep, stored or off")
    todo = sorted(set(int(f) for f in todo))
    seed_of = (lambda f: seed + f) if per_frame_noise else (lambda f: seed)
    conds: dict[int, FrameCondition] = {}

    def cond(f):
        if f not in conds:
            conds[f] = sampler.condition(images[f], seed_of(f))
        return conds[f]

    def run(frames, ctx):
        if contexts is not None:
            contexts.append(ctx)
        report = (lambda i, n: on_step(frames, i, n)) if on_step else None
        lat = sampler.sample([cond(f) for f in frames], [seed_of(f) for f in frames], ctx, steps, guidance_scale,
                             tile, report, should_stop)
        return sampler.decode(lat) if decode else list(lat)

    batches = frame_batches(todo, batch)
    if mode == "off":
        for frames in ([[0]] if 0 in todo else []) + batches:
            yield from zip(frames, run(frames, FusionContext("off", mid_block_quirk)))
        return
    if mode == "stored":
        if not batches:
            if 0 in todo:
                yield 0, run([0], FusionContext("off", mid_block_quirk))[0]
            return
        rec = FusionContext("record", mid_block_quirk)
        grid0 = run([0], rec)[0]
        if 0 in todo:
            yield 0, grid0
        for frames in batches:
            ctx = FusionContext("fuse", mid_block_quirk)
            ctx.store = rec.store
            yield from zip(frames, run(frames, ctx))
        return
    # lockstep
    if not batches:
        if 0 in todo:
            yield 0, run([0], FusionContext("off", mid_block_quirk))[0]
        return
    zero_pending = 0 in todo
    for frames in batches:
        grids = run([0] + frames, FusionContext("lockstep", mid_block_quirk))
        if zero_pending:
            zero_pending = False
            yield 0, grids[0]
        yield from zip(frames, grids[1:])


def full_size_store_bytes(unet_config: dict | None = None, steps: int = DEFAULT_STEPS, bytes_per_value: int = 2,
                          whole_sequence: bool = False) -> int:
    """Host memory of the stored mode at 640x960 (SD2 UNet shapes unless a config is given)."""
    from ..guidance.zero123pp_fusion import attn1_sites, store_bytes

    cfg = unet_config or dict(down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                              up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                              block_out_channels=[320, 640, 1280, 1280], layers_per_block=2)
    sites = attn1_sites(cfg, (120, 80), (40, 40))
    return store_bytes(sites, steps, bytes_per_value, whole_sequence=whole_sequence)


__all__ = ["Zero123PlusModel", "Zero123PlusSampler", "FrameCondition", "load_zero123plus", "generate_grids",
           "split_grid", "to_rgb_on_grey", "scale_latents", "unscale_latents", "unscale_image",
           "full_size_store_bytes", "DEFAULT_TILE", "DEFAULT_STEPS", "DEFAULT_GUIDANCE", "DEFAULT_SEED"]


# ------------------------------------------------------------------------------------------- full-size configs

# Zero123++ v1.1's architecture as published (sudo-ai/zero123plus-v1.1 model card and component configs; the
# parameter counts are pinned in tests/test_zero123pp_fusion.py): a Stable Diffusion 2 UNet (4 latent channels,
# widths 320/640/1280/1280, 5/10/20/20 heads of 64, 1024-d cross-attention, linear projections), the SD VAE, the
# OpenCLIP ViT-H/14 text tower (1024-d, 23 layers) and CLIP ViT-H/14 vision tower with a 1024-d projection, and
# SD2's training noise schedule (the sampler swaps in Euler-ancestral with trailing timesteps). For timing with
# random weights (benchmarks/gpu_check.py); the real weights bring their own configs.
FULL_SIZE_CONFIG = {
    "unet": dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
                 cross_attention_dim=1024, use_linear_projection=True, norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, sample_size=768, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4),
    "text_encoder": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                         num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                         projection_dim=1024),
    "vision_encoder": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu"),
    "feature_extractor_clip": dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                   resample=3, image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711]),
    "feature_extractor_vae": dict(size={"shortest_edge": 320}, crop_size={"height": 320, "width": 320}, resample=3,
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3),
    "scheduler": dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", steps_offset=1),
}


def random_zero123plus(tokenizer, device="cpu", dtype=torch.float32, config: dict | None = None,
                       seed: int = 0) -> Zero123PlusModel:
    """A Zero123++ with random weights built in memory on ``device`` (full size by default): the real model's
    shapes and token counts, for timing and memory checks. ``tokenizer``: any CLIPTokenizer padding to 77."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = config or FULL_SIZE_CONFIG
    device = torch.device(device)
    torch.manual_seed(seed)
    text_cfg = dict(cfg["text_encoder"], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    with device:  # initialise on the device: seconds instead of minutes for ~2 G parameters on a CPU
        parts = dict(unet=UNet2DConditionModel(**cfg["unet"]), vae=AutoencoderKL(**cfg["vae"]),
                     text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)),
                     vision_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["vision_encoder"])))
    for m in parts.values():
        m.to(dtype=dtype).eval().requires_grad_(False)
    proc = _image_processor_class()
    return Zero123PlusModel(**parts, tokenizer=tokenizer,
                            feature_extractor_clip=proc(**cfg["feature_extractor_clip"]),
                            feature_extractor_vae=proc(**cfg["feature_extractor_vae"]),
                            scheduler_config=dict(cfg["scheduler"]),
                            ramping_coefficients=np.linspace(0.0, 1.0, tokenizer.model_max_length).tolist(),
                            path=Path("<random>"), device=device, dtype=dtype)
