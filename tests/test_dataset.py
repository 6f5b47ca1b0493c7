"""STAG4D-layout reader: values, anchors, and clear one-line errors for bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from stag4d_backend.dataset import DataError, list_ref_frames, load_frames


def _write_rgba(path, size=16, alpha=255, color=(255, 0, 0), mode="RGBA"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size, size, 4), np.uint8)
    arr[..., :3] = color
    arr[size // 4: 3 * size // 4, size // 4: 3 * size // 4, 3] = alpha
    im = Image.fromarray(arr, "RGBA")
    if mode != "RGBA":
        im = im.convert(mode)
    im.save(path)


def _make_dir(root, frames=3, anchors=True, size=16):
    for f in range(frames):
        _write_rgba(root / "ref" / f"{f}_rgba.png", size)
        if anchors:
            for k in range(6):
                _write_rgba(root / "zero123" / f"{f}_rgba" / f"{k}.png", 8, color=(0, 0, 255))
    return root


def test_loads_in_numeric_order_composited_on_white(tmp_path):
    root = _make_dir(tmp_path, frames=12)
    names = [p.name for p in list_ref_frames(root)]
    assert names[:3] == ["0_rgba.png", "1_rgba.png", "2_rgba.png"] and names[-1] == "11_rgba.png"
    data = load_frames(root, resolution=16, anchor_resolution=8)
    assert data.ref_rgb.shape == (12, 16, 16, 3) and data.ref_mask.shape == (12, 16, 16)
    assert data.anchor_rgb.shape == (12, 6, 8, 8, 3) and data.anchor_mask.shape == (12, 6, 8, 8)
    # outside the object: white, mask 0; inside: red, mask 1
    assert torch.all(data.ref_rgb[0, 0, 0] == 1) and data.ref_mask[0, 0, 0] == 0
    torch.testing.assert_close(data.ref_rgb[0, 8, 8], torch.tensor([1.0, 0, 0]))
    assert data.ref_mask[0, 8, 8] == 1
    assert data.source_size == 16 and data.num_frames == 12 and data.has_anchors


def test_resize_uses_premultiplied_area_filter(tmp_path):
    root = _make_dir(tmp_path, frames=1, anchors=False, size=16)
    data = load_frames(root, resolution=8)
    assert not data.has_anchors
    # the 8x8 square of ones at [4:12] maps exactly to [2:6]; no colour bleeds from the black transparent background
    assert torch.all(data.ref_mask[0, 2:6, 2:6] == 1) and data.ref_mask[0].sum() == 16
    assert torch.all(data.ref_rgb[0, 2:6, 2:6, 0] == 1) and torch.all(data.ref_rgb[0][data.ref_mask[0] == 0] == 1)


def test_frame_selection(tmp_path):
    root = _make_dir(tmp_path, frames=4)
    data = load_frames(root, 16, frames=[1, 3])
    assert data.num_frames == 2
    with pytest.raises(DataError, match="frame 9"):
        load_frames(root, 16, frames=[9])


def test_authors_background_alpha_of_one_is_background(tmp_path):
    root = _make_dir(tmp_path, frames=1, anchors=True)
    _write_rgba(root / "zero123" / "0_rgba" / "0.png", 8, color=(0, 0, 255))
    arr = np.array(Image.open(root / "zero123" / "0_rgba" / "0.png"))
    arr[..., 3][arr[..., 3] == 0] = 1
    Image.fromarray(arr).save(root / "zero123" / "0_rgba" / "0.png")
    data = load_frames(root, 16, anchor_resolution=8)
    assert data.anchor_mask[0, 0, 0, 0] == 0 and torch.all(data.anchor_rgb[0, 0, 0, 0] == 1)


@pytest.mark.parametrize("case,pattern", [
    ("empty", "no frames named"),
    ("no_ref", "ref: missing"),
    ("gap", "1_rgba.png: missing"),
    ("rgb_only", "no alpha channel"),
    ("non_square", "not square"),
    ("mismatch", "differs from the first frame"),
    ("missing_anchor", "3.png: missing anchor view"),
    ("garbage", "cannot be read as an image"),
    ("transparent", "fully transparent"),
    ("no_dir", "no such directory"),
])
def test_bad_input_is_one_clear_line(tmp_path, case, pattern):
    root = tmp_path / "data"
    if case == "empty":
        (root / "ref").mkdir(parents=True)
    elif case == "no_ref":
        root.mkdir()
    elif case == "gap":
        _write_rgba(root / "ref" / "0_rgba.png")
        _write_rgba(root / "ref" / "2_rgba.png")
    elif case == "rgb_only":
        _write_rgba(root / "ref" / "0_rgba.png", mode="RGB")
    elif case == "non_square":
        root.joinpath("ref").mkdir(parents=True)
        Image.new("RGBA", (16, 12), (1, 2, 3, 255)).save(root / "ref" / "0_rgba.png")
    elif case == "mismatch":
        _write_rgba(root / "ref" / "0_rgba.png", 16)
        _write_rgba(root / "ref" / "1_rgba.png", 32)
    elif case == "missing_anchor":
        _make_dir(root, frames=1)
        (root / "zero123" / "0_rgba" / "3.png").unlink()
    elif case == "garbage":
        root.joinpath("ref").mkdir(parents=True)
        (root / "ref" / "0_rgba.png").write_bytes(b"not a png")
    elif case == "transparent":
        _write_rgba(root / "ref" / "0_rgba.png", alpha=0)
    with pytest.raises(DataError, match=pattern) as err:
        load_frames(root, 16)
    assert "\n" not in str(err.value)


def test_minions_loads(minions_dir):
    data = load_frames(minions_dir, resolution=64, anchor_resolution=32, frames=[0, 31])
    assert data.source_size == 720 and data.num_frames == 2
    assert 0.15 < data.ref_mask.mean() < 0.35  # the object covers about a quarter of the frame
    assert data.anchor_rgb.shape == (2, 6, 32, 32, 3)
    assert data.anchor_mask[:, :, 0, 0].max() == 0  # the authors' alpha-1 background became 0
