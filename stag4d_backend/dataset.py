"""Reading a STAG4D-layout data directory into tensors.

Layout (the authors'; ``../shared/data/minions`` is one)::

    DATA_DIR/ref/{f}_rgba.png             f = 0..F-1, no zero padding, square RGBA
    DATA_DIR/zero123/{f}_rgba/{k}.png     k = 0..5, the Zero123++ v1.1 views of frame f (optional)

Targets are composited on white; masks come from alpha. Each image is resized once, straight to the training
size (area filter), unlike the authors' 720 -> 800 -> 512 double resampling.
Errors are :class:`DataError` with one line that names the file and the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

NUM_ANCHORS = 6
_REF_NAME = re.compile(r"^(\d+)_rgba\.png$")


class DataError(ValueError):
    """Bad input data: the message is one line naming the file and the fix."""


@dataclass
class FrameData:
    """Tensors of a data directory at one resolution (float32, [0, 1])."""

    ref_rgb: torch.Tensor          # [F, R, R, 3] composited on white
    ref_mask: torch.Tensor         # [F, R, R]
    anchor_rgb: torch.Tensor | None   # [F, 6, A, A, 3] composited on white, or None without anchors
    anchor_mask: torch.Tensor | None  # [F, 6, A, A]
    source_size: int               # side of the ref images on disk
    data_dir: Path

    @property
    def num_frames(self) -> int:
        return self.ref_rgb.shape[0]

    @property
    def has_anchors(self) -> bool:
        return self.anchor_rgb is not None


def list_ref_frames(data_dir: str | Path) -> list[Path]:
    """The reference frames 0..F-1 in numeric order; raises DataError on gaps or an empty folder."""
    data_dir = Path(data_dir)
    ref_dir = data_dir / "ref"
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such directory; pass a folder containing ref/{{f}}_rgba.png")
    if not ref_dir.is_dir():
        raise DataError(f"{ref_dir}: missing; put the frames there as ref/0_rgba.png, ref/1_rgba.png, ...")
    indices = {}
    for p in ref_dir.iterdir():
        m = _REF_NAME.match(p.name)
        if m:
            indices[int(m.group(1))] = p
    if not indices:
        raise DataError(f"{ref_dir}: no frames named {{f}}_rgba.png (e.g. 0_rgba.png); add RGBA PNG frames")
    missing = sorted(set(range(max(indices) + 1)) - set(indices))
    if missing:
        raise DataError(f"{ref_dir / f'{missing[0]}_rgba.png'}: missing (frames must be numbered 0..F-1 "
                        f"without gaps; {len(missing)} missing); renumber or add the frame")
    return [indices[i] for i in range(len(indices))]


def _read_rgba(path: Path, expect_square: bool = True) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            mode, size = im.mode, im.size
            if mode not in ("RGBA", "LA", "PA") and not (mode == "P" and "transparency" in im.info):
                raise DataError(f"{path}: image mode {mode} has no alpha channel; provide RGBA frames with the "
                                f"object matted (transparent background), or run `stag4d generate` to matte a video")
            arr = np.asarray(im.convert("RGBA"))
    except DataError:
        raise
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot be read as an image ({exc}); replace it with a valid RGBA PNG") from None
    if expect_square and size[0] != size[1]:
        raise DataError(f"{path}: {size[0]}x{size[1]} is not square; pad it to a square (the object centred)")
    return arr


def _to_tensors(arr: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RGBA uint8 -> (rgb on white, mask) at ``size`` using an area (box) filter for downsizing."""
    im = Image.fromarray(arr, "RGBA")
    if im.size != (size, size):
        # Resize premultiplied colour so background colour under alpha=0 does not bleed into edges.
        x = np.asarray(im, dtype=np.float32) / 255.0
        prem = np.concatenate([x[..., :3] * x[..., 3:], x[..., 3:]], -1)
        chans = [Image.fromarray(prem[..., c]).resize((size, size), Image.BOX if size < im.size[0]
                                                      else Image.BILINEAR) for c in range(4)]
        prem = np.stack([np.asarray(c, dtype=np.float32) for c in chans], -1)
        rgb_p, a = prem[..., :3], np.clip(prem[..., 3], 0.0, 1.0)
    else:
        x = np.asarray(im, dtype=np.float32) / 255.0
        a = x[..., 3]
        rgb_p = x[..., :3] * a[..., None]
    rgb = np.clip(rgb_p + (1.0 - a[..., None]), 0.0, 1.0)  # composite on white
    return torch.from_numpy(np.ascontiguousarray(rgb)), torch.from_numpy(np.ascontiguousarray(a))


def load_frames(data_dir: str | Path, resolution: int, anchor_resolution: int | None = None,
                frames: list[int] | None = None, require_anchors: bool = False) -> FrameData:
    """Load ref frames (and anchors where present) at the given square resolutions."""
    data_dir = Path(data_dir)
    ref_paths = list_ref_frames(data_dir)
    if frames is not None:
        bad = [f for f in frames if not 0 <= f < len(ref_paths)]
        if bad:
            raise DataError(f"{data_dir / 'ref'}: frame {bad[0]} requested but only 0..{len(ref_paths) - 1} exist")
        ref_paths = [ref_paths[f] for f in frames]
    frame_ids = frames if frames is not None else list(range(len(ref_paths)))
    anchor_resolution = anchor_resolution or resolution

    rgbs, masks, source_size = [], [], None
    for p in ref_paths:
        arr = _read_rgba(p)
        if source_size is None:
            source_size = arr.shape[0]
        elif arr.shape[0] != source_size:
            raise DataError(f"{p}: {arr.shape[0]}x{arr.shape[1]} differs from the first frame's "
                            f"{source_size}x{source_size}; all frames must have one size")
        if arr[..., 3].max() == 0:
            raise DataError(f"{p}: fully transparent; the object must be visible (non-zero alpha)")
        rgb, mask = _to_tensors(arr, resolution)
        rgbs.append(rgb)
        masks.append(mask)

    zero_dir = data_dir / "zero123"
    anchor_rgb = anchor_mask = None
    if zero_dir.is_dir() or require_anchors:
        a_rgbs, a_masks = [], []
        for f in frame_ids:
            views_rgb, views_mask = [], []
            for k in range(NUM_ANCHORS):
                p = zero_dir / f"{f}_rgba" / f"{k}.png"
                if not p.is_file():
                    raise DataError(f"{p}: missing anchor view; generate anchors (`stag4d generate`) or "
                                    f"remove the zero123/ folder to fit without anchors")
                arr = _read_rgba(p).copy()
                # The authors' gen_mv writes alpha 1 (not 0) outside the object: treat it as background.
                arr[..., 3][arr[..., 3] <= 1] = 0
                rgb, mask = _to_tensors(arr, anchor_resolution)
                views_rgb.append(rgb)
                views_mask.append(mask)
            a_rgbs.append(torch.stack(views_rgb))
            a_masks.append(torch.stack(views_mask))
        anchor_rgb, anchor_mask = torch.stack(a_rgbs), torch.stack(a_masks)

    return FrameData(torch.stack(rgbs), torch.stack(masks), anchor_rgb, anchor_mask, int(source_size), data_dir)
