"""Zero123++ reference-only attention with STAG4D's first-frame fusion (design: stag4d-algorithm.md section 2).

Pure math, no file I/O. Every self-attention (``attn1``) processor of the UNet is replaced by
:class:`FusionAttnProcessor`, which is driven by one :class:`FusionContext` per sampling run (no module globals):

* ``phase = "write"``: the UNet runs on the noised condition latent; each attn1 keeps its input tokens (the
  LayerNorm'd hidden states, before to_k/to_v) in ``ctx.ref`` (official Zero123++ "reference-only" attention).
* ``phase = "read"``: the UNet runs on the 3x2 grid latent; each attn1 attends from its own N tokens to
  ``H = concat(own N tokens, reference M tokens)``. STAG4D's temporal anchor changes ``H`` only here, before
  to_k/to_v: the first R tokens of a later frame's ``H`` become the mean of its own and frame 0's tokens at the
  same (denoising step, layer, guidance branch). R = N (the grid tokens, counted from the feature map), except at
  the mid-block when ``mid_block_quirk`` is on (the authors' hard-coded R = 9600/(C/320)^2 exceeds N + M there,
  so the whole sequence, reference tokens included, is averaged).

Fusion modes (``ctx.mode``):
    off       plain Zero123++
    record    frame 0 alone: keep its R tokens per (step, layer) in ``ctx.store`` (the authors' EMBED list)
    fuse      later frames: average with ``ctx.store`` (the authors' mode, host memory ~ steps x layers)
    lockstep  the batch holds frame 0 first and later frames after it; frame 0's tokens are taken from the same
              batch, so nothing is stored (frame 0's own attention never sees the fusion, so its trajectory is
              that of a plain run with the same noise)

Batch layout in the read pass: ``[branch 0: frames 0..n-1, branch 1: frames 0..n-1]`` with branch 0 = the
unconditional (CFG) branch, as in diffusers' ``cat([latents] * 2)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import torch

MODES = ("off", "record", "fuse", "lockstep")
MID_BLOCK_PREFIX = "mid_block."


def is_attn1(name: str) -> bool:
    return name.endswith("attn1.processor")


def attn1_names(unet) -> list[str]:
    """The UNet's self-attention (attn1) processor names."""
    return [n for n in unet.attn_processors if is_attn1(n)]


@dataclass
class FusionContext:
    """State of one sampling run: the reference tokens of the current UNet call, the stored frame-0 tokens and
    counters the tests check. Index by (step, layer name), never by call count."""

    mode: str = "off"
    mid_block_quirk: bool = True          # faithful: the mid-block also averages the reference tokens
    branches: int = 2                     # CFG branches in the batch (1 without guidance)
    store_device: torch.device | str = "cpu"
    phase: str | None = None              # "write" | "read" | None (plain attention)
    step: int = -1
    layers: tuple[str, ...] = ()          # attn1 names installed (filled by install())
    ref: dict = field(default_factory=dict)
    store: dict = field(default_factory=dict)       # (step, name) -> [branches, R, C] (record/fuse)
    sites: dict = field(default_factory=dict)       # name -> (N own tokens, M reference tokens, C channels)
    fused_calls: int = 0
    recorded_calls: int = 0
    _seen: set = field(default_factory=set)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"fusion mode {self.mode!r}; expected one of {', '.join(MODES)}")

    # -- step bookkeeping -----------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        self.step = int(step)
        self._seen = set()
        self.ref.clear()

    def end_step(self) -> None:
        """Every installed attn1 must have run exactly once in this step's read pass."""
        if self.layers and self._seen != set(self.layers):
            missing = sorted(set(self.layers) - self._seen)
            raise RuntimeError(f"step {self.step}: {len(self._seen)} of {len(self.layers)} self-attention layers "
                               f"ran in the read pass (missing {missing[:3]})")
        self.phase = None

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values())

    # -- the fusion itself ----------------------------------------------------------------------------------
    def replace_count(self, name: str, n_own: int, total: int) -> int:
        """R: how many leading tokens of H are averaged with frame 0."""
        if self.mid_block_quirk and name.startswith(MID_BLOCK_PREFIX):
            return total
        return n_own

    def fuse(self, name: str, h: torch.Tensor, n_own: int) -> torch.Tensor:
        """Apply the temporal anchor to ``h`` = concat(own, ref) of one attn1 in the read pass (in place)."""
        if name in self._seen:
            raise RuntimeError(f"step {self.step}: layer {name} ran twice in one read pass")
        self._seen.add(name)
        self.sites.setdefault(name, (n_own, h.shape[1] - n_own, h.shape[2]))
        if self.mode == "off":
            return h
        r = self.replace_count(name, n_own, h.shape[1])
        frames = h.shape[0] // self.branches
        if frames * self.branches != h.shape[0]:
            raise RuntimeError(f"{name}: batch {h.shape[0]} is not {self.branches} branches x frames")
        hb = h.view(self.branches, frames, h.shape[1], h.shape[2])
        if self.mode == "record":
            # only frame 0's used tokens are kept (the authors keep all of H: ~15% more)
            self.store[(self.step, name)] = hb[:, 0, :r].detach().to(self.store_device, copy=True)
            self.recorded_calls += 1
            return h
        if self.mode == "fuse":
            try:
                anchor = self.store[(self.step, name)]
            except KeyError:
                raise RuntimeError(f"no stored frame-0 tokens for step {self.step}, layer {name}: the recording "
                                   f"run used another step count or UNet") from None
            anchor = anchor.to(device=h.device, dtype=h.dtype).unsqueeze(1)
            hb[:, :, :r] = (anchor + hb[:, :, :r]) / 2
        else:  # lockstep: frame 0 is batch entry 0 of each branch
            if frames < 2:
                raise RuntimeError("lockstep fusion needs frame 0 and at least one later frame in the batch")
            anchor = hb[:, :1, :r].clone()
            hb[:, 1:, :r] = (anchor + hb[:, 1:, :r]) / 2
        self.fused_calls += 1
        return h


class FusionAttnProcessor:
    """attn1 processor: reference-only attention (write/read) plus the context's temporal fusion, then the
    stock scaled-dot-product attention on ``(hidden_states -> Q, H -> K, V)``."""

    def __init__(self, ctx: FusionContext, name: str, inner=None):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.ctx = ctx
        self.name = name
        self.inner = inner if inner is not None else AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        ctx = self.ctx
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        if ctx.phase == "write":
            ctx.ref[self.name] = encoder_hidden_states
        elif ctx.phase == "read":
            if hidden_states.ndim != 3:
                raise RuntimeError(f"{self.name}: expected [batch, tokens, channels] hidden states")
            try:
                ref = ctx.ref.pop(self.name)
            except KeyError:
                raise RuntimeError(f"{self.name}: no reference tokens; run the write pass first") from None
            h = torch.cat([encoder_hidden_states, ref], dim=1)
            encoder_hidden_states = ctx.fuse(self.name, h, n_own=hidden_states.shape[1])
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def install(unet, ctx: FusionContext) -> list[str]:
    """Put fusion processors on every attn1 (stock SDPA elsewhere); returns the attn1 names."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    procs, names = {}, []
    for name in unet.attn_processors:
        if is_attn1(name):
            procs[name] = FusionAttnProcessor(ctx, name)
            names.append(name)
        else:
            procs[name] = AttnProcessor2_0()
    unet.set_attn_processor(procs)
    ctx.layers = tuple(names)
    return names


def bind(unet, ctx: FusionContext) -> None:
    """Point the installed fusion processors at another context (one context per sampling run)."""
    for name, proc in unet.attn_processors.items():
        if isinstance(proc, FusionAttnProcessor):
            proc.ctx = ctx
    ctx.layers = tuple(attn1_names(unet))


# -- shapes and memory, from the UNet config -----------------------------------------------------------------

def _per_level(value, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def attn1_sites(unet_config, grid_hw: tuple[int, int], ref_hw: tuple[int, int]) -> dict[str, tuple[int, int, int]]:
    """name -> (N grid tokens, M reference tokens, C) for a UNet2DConditionModel config (cross-attention down
    and up blocks, UNetMidBlock2DCrossAttn) and latent sizes. Downsamplers are stride-2 3x3 convs with
    padding 1, so each level has ceil(size / 2) of the one above."""
    cfg = dict(unet_config)
    down = list(cfg["down_block_types"])
    up = list(cfg["up_block_types"])
    chans = list(cfg["block_out_channels"])
    n = len(down)
    layers = _per_level(cfg.get("layers_per_block", 2), n)
    depth = _per_level(cfg.get("transformer_layers_per_block", 1), n)

    def sizes(hw):
        out, (h, w) = [], hw
        for _ in range(n):
            out.append(h * w)
            h, w = -(-h // 2), -(-w // 2)
        return out

    g, r = sizes(grid_hw), sizes(ref_hw)
    sites = {}
    for i, kind in enumerate(down):
        if "CrossAttn" in kind:
            for a in range(layers[i]):
                for t in range(depth[i]):
                    sites[f"down_blocks.{i}.attentions.{a}.transformer_blocks.{t}.attn1.processor"] = (
                        g[i], r[i], chans[i])
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid is not None and "CrossAttn" in mid:
        for t in range(depth[-1]):
            sites[f"mid_block.attentions.0.transformer_blocks.{t}.attn1.processor"] = (g[-1], r[-1], chans[-1])
    rev_layers, rev_depth = layers[::-1], depth[::-1]
    for j, kind in enumerate(up):
        lvl = n - 1 - j
        if "CrossAttn" in kind:
            for a in range(rev_layers[j] + 1):
                for t in range(rev_depth[j]):
                    sites[f"up_blocks.{j}.attentions.{a}.transformer_blocks.{t}.attn1.processor"] = (
                        g[lvl], r[lvl], chans[lvl])
    return sites


def store_bytes(sites: dict[str, tuple[int, int, int]], steps: int, bytes_per_value: int = 2, branches: int = 2,
                mid_block_quirk: bool = True, whole_sequence: bool = False) -> int:
    """Host memory of the stored mode: per (step, layer) a [branches, R, C] tensor. ``whole_sequence`` = what
    the authors keep (all N + M tokens of H)."""
    total = 0
    for name, (n_own, m_ref, c) in sites.items():
        if whole_sequence or (mid_block_quirk and name.startswith(MID_BLOCK_PREFIX)):
            r = n_own + m_ref
        else:
            r = n_own
        total += branches * r * c
    return total * steps * bytes_per_value


__all__ = ["FusionContext", "FusionAttnProcessor", "install", "bind", "attn1_names", "attn1_sites",
           "store_bytes", "MODES"]
