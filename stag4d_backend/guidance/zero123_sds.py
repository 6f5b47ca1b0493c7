"""Zero123-XL score distillation (algorithm spec section 8), behind the fit's ``ScoreDistillation`` interface.

One call of :meth:`Zero123SDS.loss` on a rendered image x in [0, 1]:

1. z = VAE.encode(2 * bilinear(x, 256) - 1).sample() * 0.18215, with gradients through the encoder.
2. t ~ U{t_min..t_max}, t = int(1000 * p) with p_min 0.5 -> 0.02 and p_max 0.95 -> 0.5 linearly over
   ``anneal_iters`` (3000 in the paper; ``FitConfig.sds_anneal_iters`` rescales with ``--iters``).
3. eps ~ N(0, I); z_t = sqrt(a_t) z + sqrt(1 - a_t) eps (DDIM ``add_noise``).
4. Conditioning: CLIP image embedding c and VAE latent v of the input frame or of anchor k of the frame
   (precomputed in :meth:`prepare`), camera T = [rad(d_polar), sin(d_az), cos(d_az), d_r];
   cc = proj([c, T]); CFG batch [cond, uncond] with an all-zero uncond (both cc and v).
5. eps_hat = u + 5 (c - u); w = 1 - a_t; g = nan_to_num(w (eps_hat - eps)).
6. loss = 0.5 * sum((z - sg(z - g))^2), so dloss/dz = g.

All randomness (t, the diffusion noise and the VAE posterior draws) comes from CPU ``torch.Generator``s seeded
from ``seed``: the same seed gives the same fit on any device, and :meth:`state_dict` / :meth:`load_state_dict`
carry the step generator across a resume. No file I/O here: ``models/zero123_xl.py`` loads the components.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..gaussians.schedules import sds_t_range
from .base import INPUT_VIEW, SDSRequest

NUM_ANCHORS = 6
LATENT_MODES = ("sample", "mode")


def slot_of(source: int) -> int:
    """Index into the per-frame conditioning table: 0 = the input frame, 1 + k = anchor k."""
    if source == INPUT_VIEW:
        return 0
    if not 0 <= source < NUM_ANCHORS:
        raise ValueError(f"SDS source must be INPUT_VIEW or an anchor 0..5, got {source}")
    return source + 1


def camera_embedding(delta_polar: float, delta_azimuth: float, delta_radius: float = 0.0) -> torch.Tensor:
    """Zero123's relative pose [rad(d_polar), sin(rad(d_az)), cos(rad(d_az)), d_r] as a float32 [4] tensor."""
    az = math.radians(delta_azimuth)
    return torch.tensor([math.radians(delta_polar), math.sin(az), math.cos(az), float(delta_radius)],
                        dtype=torch.float32)


class Zero123SDS:
    """Zero123(-XL) SDS guidance for the STAG4D fit (implements ``guidance.base.ScoreDistillation``).

    ``latent="sample"`` is the authors' choice (stochastic VAE latents, for the conditioning images drawn once);
    ``"mode"`` uses the posterior mean everywhere (deterministic, recommended).
    """

    def __init__(self, unet, vae, image_encoder, feature_extractor, camera_projection, scheduler, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 guidance_scale: float = 5.0, anneal_iters: int = 3000,
                 p_min: tuple[float, float] = (0.5, 0.02), p_max: tuple[float, float] = (0.95, 0.5),
                 latent: str = "sample", image_size: int = 256, seed: int = 0):
        if latent not in LATENT_MODES:
            raise ValueError(f"latent must be one of {LATENT_MODES}, got {latent!r}")
        if anneal_iters <= 0:
            raise ValueError("anneal_iters must be positive")
        self.device = torch.device(device)
        self.dtype = dtype
        self.unet, self.vae, self.image_encoder = unet, vae, image_encoder
        self.feature_extractor, self.camera_projection, self.scheduler = feature_extractor, camera_projection, scheduler
        for m in (unet, vae, image_encoder, camera_projection):
            if next(m.parameters()).dtype != dtype:  # the loader already gives the right dtype
                m.to(dtype=dtype)
            m.to(self.device).eval().requires_grad_(False)
        self.guidance_scale = float(guidance_scale)
        self.anneal_iters = int(anneal_iters)
        self.p_min, self.p_max = tuple(p_min), tuple(p_max)
        self.latent = latent
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        # float32 alpha-bar: w(t) and add_noise are computed in float32 whatever the model dtype.
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32).cpu()
        self.scaling_factor = float(vae.config.scaling_factor)
        # t, diffusion noise and the render's VAE posterior draw; checkpointed via state_dict().
        self.generator = torch.Generator().manual_seed(self.seed)
        self.image_embeds: torch.Tensor | None = None   # [F, 7, D]   slot 0 = input, 1 + k = anchor k
        self.cond_latents: torch.Tensor | None = None   # [F, 7, 4, h, w] unscaled VAE latents
        self.has_anchors = False

    # ------------------------------------------------------------------------------------------- conditioning

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> [B,3,S,S] bilinear, no antialias (the authors' F.interpolate)."""
        if images.shape[-1] == self.image_size and images.shape[-2] == self.image_size:
            return images
        return F.interpolate(images, (self.image_size, self.image_size), mode="bilinear", align_corners=False)

    def _posterior_latent(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Unscaled VAE latent of [B,3,S,S] images in [0,1]: mean + std * N(0,1) ('sample') or the mean."""
        dist = self.vae.encode(images.to(self.device, self.dtype) * 2.0 - 1.0).latent_dist
        if self.latent == "mode":
            return dist.mean
        noise = torch.randn(dist.mean.shape, generator=generator)
        return dist.mean + dist.std * noise.to(self.device, dist.mean.dtype)

    @torch.no_grad()
    def encode_condition_images(self, images: torch.Tensor, generator: torch.Generator | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP ``image_embeds`` [B, D] and unscaled VAE latents [B, 4, h, w] of [B, H, W, 3] images on white."""
        from PIL import Image

        x = self._resize(images.permute(0, 3, 1, 2).to(torch.float32).cpu().clamp(0, 1))
        # tensor -> PIL as torchvision's to_pil_image does it (x * 255 truncated to uint8), then the processor.
        pil = [Image.fromarray((im.permute(1, 2, 0) * 255).to(torch.uint8).numpy()) for im in x]
        pixels = self.feature_extractor(images=pil, return_tensors="pt").pixel_values
        embeds = self.image_encoder(pixels.to(self.device, self.dtype)).image_embeds
        g = generator if generator is not None else torch.Generator().manual_seed(self.seed)
        latents = self._posterior_latent(x, g)
        return embeds, latents

    @torch.no_grad()
    def prepare(self, ref_rgb: torch.Tensor, anchor_rgb: torch.Tensor | None) -> None:
        """Precompute the 7 conditionings (input + 6 anchors) of every frame.

        The VAE draws come from a generator seeded here (not the step generator), so a resumed fit gets the
        same conditioning latents and an unchanged step stream.
        """
        num_frames = ref_rgb.shape[0]
        self.has_anchors = anchor_rgb is not None
        g = torch.Generator().manual_seed(self.seed + 1_000_003)
        embeds, latents = [], []
        for f in range(num_frames):
            images = [ref_rgb[f]] + ([anchor_rgb[f, k] for k in range(NUM_ANCHORS)] if anchor_rgb is not None else [])
            # Each image goes to the conditioning size first (ref and anchors may differ in size).
            images = torch.cat([self._resize(im.permute(2, 0, 1)[None].float().cpu()) for im in images])
            c, v = self.encode_condition_images(images.permute(0, 2, 3, 1), g)
            if anchor_rgb is None:   # keep the table shape; anchor slots stay NaN and are refused in loss()
                c = torch.cat([c, c.new_full((NUM_ANCHORS,) + c.shape[1:], float("nan"))])
                v = torch.cat([v, v.new_full((NUM_ANCHORS,) + v.shape[1:], float("nan"))])
            embeds.append(c)
            latents.append(v)
        self.image_embeds = torch.stack(embeds)
        self.cond_latents = torch.stack(latents)

    def conditioning(self, request: SDSRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """The precomputed (CLIP embedding [1, D], VAE latent [1, 4, h, w]) that conditions this request."""
        if self.image_embeds is None:
            raise RuntimeError("Zero123SDS.prepare() must run before loss()")
        if request.source != INPUT_VIEW and not self.has_anchors:
            raise ValueError("this SDS request is conditioned on an anchor view, but no anchors were prepared")
        s = slot_of(request.source)
        return self.image_embeds[request.frame, s][None], self.cond_latents[request.frame, s][None]

    def encoder_hidden_states(self, request: SDSRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """CFG conditioning, batch order [cond, uncond]: (encoder states [2, 1, D], concat latents [2, 4, h, w])."""
        c, v = self.conditioning(request)
        pose = camera_embedding(request.delta_polar, request.delta_azimuth, request.delta_radius)
        pose = pose.to(self.device, self.dtype).view(1, 1, 4)
        cc = self.camera_projection(torch.cat([c[:, None, :], pose], dim=-1))          # [1, 1, D]
        return torch.cat([cc, torch.zeros_like(cc)]), torch.cat([v, torch.zeros_like(v)])

    # ------------------------------------------------------------------------------------------- the SDS step

    def t_range(self, step: float) -> tuple[int, int]:
        """Inclusive (t_min, t_max) at training step ``step`` (1-based, as the trainer passes it)."""
        return sds_t_range(step, self.num_train_timesteps, self.p_min, self.p_max, self.anneal_iters)

    def sample_t(self, step: float) -> int:
        t_min, t_max = self.t_range(step)
        return int(torch.randint(t_min, t_max + 1, (1,), generator=self.generator).item())

    def encode_render(self, image: torch.Tensor) -> torch.Tensor:
        """Scaled latent z [1, 4, h, w] of a render [H, W, 3] in [0, 1]; differentiable through the encoder."""
        x = self._resize(image.permute(2, 0, 1)[None])
        return self._posterior_latent(x, self.generator) * self.scaling_factor

    @torch.no_grad()
    def predict_noise(self, z_t: torch.Tensor, t: int, request: SDSRequest) -> torch.Tensor:
        """Guided eps_hat = u + s (c - u) for a noisy latent z_t [1, 4, h, w]."""
        ehs, v = self.encoder_hidden_states(request)
        x_in = torch.cat([z_t.to(self.dtype)] * 2)
        t_in = torch.full((2,), t, dtype=torch.long, device=self.device)
        eps = self.unet(torch.cat([x_in, v], dim=1), t_in, encoder_hidden_states=ehs).sample
        eps_c, eps_u = eps.float().chunk(2)
        return eps_u + self.guidance_scale * (eps_c - eps_u)

    def sds_gradient(self, z: torch.Tensor, t: int, noise: torch.Tensor, request: SDSRequest) -> torch.Tensor:
        """g = nan_to_num(w(t) (eps_hat - eps)), float32, w(t) = 1 - alpha_bar_t."""
        a = self.alphas_cumprod[t]
        z_t = a.sqrt() * z.detach().float() + (1.0 - a).sqrt() * noise
        eps_hat = self.predict_noise(z_t, t, request)
        return torch.nan_to_num((1.0 - a) * (eps_hat - noise))

    def latent_loss(self, z: torch.Tensor, request: SDSRequest, step: float) -> torch.Tensor:
        """0.5 * sum((z - sg(z - g))^2): its gradient w.r.t. z is g. Draws t, then the noise."""
        t = self.sample_t(step)
        noise = torch.randn(z.shape, generator=self.generator).to(self.device)
        g = self.sds_gradient(z, t, noise, request)
        zf = z.float()
        target = (zf - g).detach()
        return 0.5 * ((zf - target) ** 2).sum()

    def loss(self, image: torch.Tensor, request: SDSRequest, step: int, total_steps: int) -> torch.Tensor:
        """SDS loss of one render [H, W, 3] in [0, 1]. ``total_steps`` is not used: the annealing horizon is
        ``anneal_iters`` (the fit's ``sds_anneal_iters``), as in the authors' code."""
        z = self.encode_render(image.to(self.device))
        return self.latent_loss(z, request, step)

    # ------------------------------------------------------------------------------------------- resume

    def options(self) -> dict[str, Any]:
        """The settings that shape the result (for meta.json and the resume fingerprint)."""
        return {"guidance_scale": self.guidance_scale, "anneal_iters": self.anneal_iters, "p_min": list(self.p_min),
                "p_max": list(self.p_max), "latent": self.latent, "image_size": self.image_size, "seed": self.seed,
                "dtype": str(self.dtype).replace("torch.", "")}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


__all__ = ["Zero123SDS", "camera_embedding", "slot_of", "LATENT_MODES"]
