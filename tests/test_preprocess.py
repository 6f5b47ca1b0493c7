"""The preprocess stage on small synthetic videos and image sequences (and the authors' minions frames where
present): frame selection and fps, one crop box for the clip, matting choices, bad input, atomic output."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from stag4d_backend.job import Job
from stag4d_backend.stages import preprocess as pp
from stag4d_backend.stages.preprocess import PreprocessError

BG = (40, 120, 200)
DISC = (230, 60, 30)


def disc_x(i: int, n: int) -> float:
    return 20 + i * 56 / (n - 1)


def write_video(path: Path, n: int = 20, w: int = 96, h: int = 64, fps: int = 10, rotation: int = 0) -> Path:
    """A red disc moving left to right over a uniform blue background (H.264, yuv420p)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if rotation:
            s.set_display_rotation(rotation)
        yy, xx = np.mgrid[:h, :w]
        for i in range(n):
            a = np.full((h, w, 3), BG, np.uint8)
            a[(xx - disc_x(i, n)) ** 2 + (yy - 32) ** 2 <= 8 ** 2] = DISC
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def write_rgba_sequence(folder: Path, n: int = 10, w: int = 80, h: int = 60) -> Path:
    """A 10x16 opaque rectangle moving diagonally, transparent elsewhere (RGB under alpha 0 is noise)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        a = np.zeros((h, w, 4), np.uint8)
        a[..., :3] = rng.integers(0, 255, (h, w, 3))
        x0, y0 = 10 + 4 * i, 8 + 2 * i
        a[y0:y0 + 16, x0:x0 + 10] = (250, 200, 0, 255)
        Image.fromarray(a, "RGBA").save(folder / f"frame_{i}.png")  # natural order: frame_2 before frame_10
    return folder


def centroid(path: Path) -> tuple[float, float]:
    a = np.asarray(Image.open(path))[..., 3].astype(float)
    ys, xs = np.mgrid[:a.shape[0], :a.shape[1]]
    return (xs * a).sum() / a.sum(), (ys * a).sum() / a.sum()


def meta(job: Job) -> dict:
    return json.loads((job.frames_dir / "meta.json").read_text())


@pytest.fixture
def no_matting(monkeypatch):
    monkeypatch.setattr(pp, "matting_problem", lambda options=None: pp.NO_MATTING)


def test_video_selection_fps_and_one_crop_box(tmp_path):
    video = write_video(tmp_path / "clip.mp4")
    job = Job(tmp_path / "job")
    opts = {"input": str(video), "matting": "color-key", "size": 64, "stride": 2, "start": 2, "end": 18,
            "frames": 5}
    events = []
    res = pp.run(job, opts, events.append)
    m = meta(job)
    assert m["source_frames"] == [2, 4, 6, 8, 10] and m["frames"] == res["frames"] == 5
    assert m["fps"] == 5.0 and m["source_fps"] == 10.0  # fps kept, divided by the stride
    assert m["source_size"] == [96, 64] and m["matting"] == "color-key"
    assert {e["message"].split()[0] for e in events} >= {"decoding", "keying", "writing"}
    x0, y0, x1, y1 = m["crop_box"]
    assert abs((x1 - x0) - (y1 - y0)) < 1e-6
    scale = 64 / (x1 - x0)
    union = [Image.open(job.frames_dir / "ref" / f"{f}_rgba.png").getchannel("A").getbbox() for f in range(5)]
    for f, src in enumerate(m["source_frames"]):
        im = Image.open(job.frames_dir / "ref" / f"{f}_rgba.png")
        assert im.mode == "RGBA" and im.size == (64, 64)
        a = np.asarray(im)[..., 3]
        assert a[0, 0] == a[-1, -1] == a[0, -1] == a[-1, 0] == 0  # alpha 0 outside the object
        # The disc moves in the output as it moved in the input, scaled by the clip's one crop box.
        cx, cy = centroid(job.frames_dir / "ref" / f"{f}_rgba.png")
        assert abs(cx - ((disc_x(src, 20) + 0.5 - x0) * scale - 0.5)) < 0.75
        assert abs(cy - ((32.5 - y0) * scale - 0.5)) < 0.75
    # The union of the object's boxes is centred and its larger side fills `fraction` (0.75) of the output.
    ux0, uy0 = min(b[0] for b in union), min(b[1] for b in union)
    ux1, uy1 = max(b[2] for b in union), max(b[3] for b in union)
    assert abs((ux0 + ux1) / 2 - 32) <= 1 and abs((uy0 + uy1) / 2 - 32) <= 1
    assert abs(max(ux1 - ux0, uy1 - uy0) - 0.75 * 64) <= 2
    assert pp.is_done(job, opts)
    assert not pp.is_done(job, dict(opts, stride=3))
    write_video(video, n=21)  # the input replaced: preprocess again
    assert not pp.is_done(job, opts)
    pp.run(job, opts)
    video.unlink()  # the input gone (a temporary upload): the frames made from it still count on resume
    assert pp.is_done(job, opts) and not pp.is_done(job, dict(opts, frames=4))
    (job.frames_dir / "ref" / "4_rgba.png").unlink()
    assert not pp.is_done(job, opts)


def test_rgb_video_without_matting_model_is_a_clear_error(tmp_path, no_matting):
    video = write_video(tmp_path / "clip.mp4", n=4)
    job = Job(tmp_path / "job")
    with pytest.raises(PreprocessError, match=r"no alpha and no matting model.*stag4d models download matting"):
        pp.run(job, {"input": str(video)})
    with pytest.raises(PreprocessError, match="no matting model"):
        pp.run(job, {"input": str(video), "matting": "model"})
    with pytest.raises(PreprocessError, match="matting='none' but the input has no alpha"):
        pp.run(job, {"input": str(video), "matting": "none"})
    assert not (job.frames_dir / "ref").exists() and not (job.frames_dir / "meta.json").exists()


def test_rotated_video_is_upright(tmp_path):
    video = write_video(tmp_path / "rot.mp4", n=3, rotation=90)
    clip = pp.read_clip(video, pp.Selection())
    assert clip.images[0].size == (64, 96) and clip.fps == 10.0  # displayed as players show it


def test_corrupt_and_empty_inputs(tmp_path):
    job = Job(tmp_path / "job")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    truncated = tmp_path / "truncated.mp4"
    good = write_video(tmp_path / "good.mp4", n=10).read_bytes()
    truncated.write_bytes(good[: len(good) // 2])
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    for bad in (garbage, truncated, empty, tmp_path / "missing.mp4"):
        with pytest.raises(PreprocessError) as info:
            pp.run(job, {"input": str(bad), "matting": "color-key"})
        assert "\n" not in str(info.value) and str(bad) in str(info.value)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(PreprocessError, match="no images found"):
        pp.run(job, {"input": str(tmp_path / "nothing")})
    bad_png = tmp_path / "bad.png"
    bad_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    with pytest.raises(PreprocessError, match="cannot be read as an image"):
        pp.run(job, {"input": str(bad_png)})
    assert not job.frames_dir.exists() or not any(job.frames_dir.iterdir())


def test_selection_options_out_of_range(tmp_path):
    video = write_video(tmp_path / "clip.mp4", n=6)
    job = Job(tmp_path / "job")
    for opts, msg in [({"stride": 0}, "stride=0"), ({"frames": 0}, "frames=0"), ({"start": -1}, "start=-1"),
                      ({"start": 4, "end": 4}, "end=4 must be greater"), ({"start": 6}, "start=6 is past"),
                      ({"stride": "two"}, "whole number"), ({"stride": "auto"}, "needs frames"),
                      ({"size": 8}, "size=8"), ({"fraction": 1.5}, "fraction=1.5"), ({"matting": "magic"}, "magic"),
                      ({"fps": -3}, "fps=-3")]:
        with pytest.raises(PreprocessError, match=msg):
            pp.run(job, {"input": str(video), "matting": "color-key", **opts})
    with pytest.raises(PreprocessError, match="no input"):
        pp.run(job, {})


def test_rgba_sequence_order_auto_stride_and_fps_option(tmp_path):
    folder = write_rgba_sequence(tmp_path / "seq")
    job = Job(tmp_path / "job")
    opts = {"input": str(folder), "stride": "auto", "frames": 4, "size": 96, "fps": 12}
    pp.run(job, opts)
    m = meta(job)
    assert m["source_frames"] == [0, 3, 6, 9] and m["stride"] == 3
    assert m["fps"] == 12.0 and m["fps_source"] == "option" and m["matting"] == "input"
    x0, y0, x1, _ = m["crop_box"]
    scale = 96 / (x1 - x0)
    for f, src in enumerate(m["source_frames"]):
        cx, cy = centroid(job.frames_dir / "ref" / f"{f}_rgba.png")
        assert abs(cx - ((10 + 4 * src + 5 - x0) * scale - 0.5)) < 0.6
        assert abs(cy - ((8 + 2 * src + 8 - y0) * scale - 0.5)) < 0.6
        a = np.asarray(Image.open(job.frames_dir / "ref" / f"{f}_rgba.png"))
        assert (a[..., 3] == 0).mean() > 0.8 and (a[a[..., 3] == 0][:, :3] == 0).all()


def test_single_image_modes(tmp_path):
    yy, xx = np.mgrid[:40, :40]
    inside = (xx - 20) ** 2 + (yy - 20) ** 2 <= 100
    cases = {}
    la = np.zeros((40, 40, 2), np.uint8)
    la[inside] = (180, 255)
    cases["la.png"] = Image.fromarray(la, "LA")
    p = Image.new("P", (40, 40), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putdata(inside.astype(np.uint8).ravel().tolist())
    p.info["transparency"] = 0
    cases["p.png"] = p
    for name, im in cases.items():
        im.save(tmp_path / name, transparency=0) if name == "p.png" else im.save(tmp_path / name)
        job = Job(tmp_path / f"job-{name}")
        pp.run(job, {"input": str(tmp_path / name), "size": 32})
        m = meta(job)
        assert m["frames"] == 1 and m["fps"] is None and m["matting"] == "input" and m["source_kind"] == "image"
        out = Image.open(job.frames_dir / "ref" / "0_rgba.png")
        assert out.mode == "RGBA" and out.size == (32, 32)
        # The 21 px disc at 0.75 of 32 (24 px), centred; Lanczos may ring one pixel further.
        assert np.allclose(out.getchannel("A").getbbox(), (4, 4, 28, 28), atol=1)

    # 16-bit greyscale (I;16), CMYK, 16-bit RGBA PNG: converted, not rejected.
    def png16(path, arr):
        h, w, c = arr.shape
        raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
        chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, {1: 0, 4: 6}[c],
                                                                            0, 0, 0))
                         + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))

    grey = np.full((40, 40, 1), 60000, np.uint16)
    png16(tmp_path / "g16.png", grey)
    im = pp.to_rgb_or_rgba(Image.open(tmp_path / "g16.png"), "g16")
    assert im.mode == "RGB" and np.asarray(im)[0, 0, 0] == round(60000 / 257)
    assert pp.to_rgb_or_rgba(Image.new("CMYK", (4, 4)), "cmyk").mode == "RGB"
    rgba16 = np.zeros((40, 40, 4), np.uint16)
    rgba16[inside] = (65535, 0, 0, 65535)
    png16(tmp_path / "rgba16.png", rgba16)
    job = Job(tmp_path / "job16")
    pp.run(job, {"input": str(tmp_path / "rgba16.png"), "size": 32})
    assert np.allclose(Image.open(job.frames_dir / "ref" / "0_rgba.png").getchannel("A").getbbox(), (4, 4, 28, 28),
                       atol=1)
    with pytest.raises(PreprocessError, match="mode F is not supported"):
        pp.to_rgb_or_rgba(Image.new("F", (4, 4)), "float")


def test_bad_sequences(tmp_path):
    job = Job(tmp_path / "job")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGBA", (20, 20), (255, 0, 0, 255)).save(mixed / "0.png")
    Image.new("RGBA", (24, 20), (255, 0, 0, 255)).save(mixed / "1.png")
    with pytest.raises(PreprocessError, match="24x20 differs from the first frame's 20x20"):
        pp.run(job, {"input": str(mixed)})
    empty_alpha = tmp_path / "empty_alpha"
    empty_alpha.mkdir()
    a = np.zeros((20, 20, 4), np.uint8)
    a[5:10, 5:10, 3] = 255
    Image.fromarray(a, "RGBA").save(empty_alpha / "0.png")
    Image.fromarray(np.zeros((20, 20, 4), np.uint8), "RGBA").save(empty_alpha / "1.png")
    with pytest.raises(PreprocessError, match="frame 1 is empty after matting"):
        pp.run(job, {"input": str(empty_alpha)})
    half = tmp_path / "half"
    half.mkdir()
    Image.fromarray(a, "RGBA").save(half / "0.png")
    Image.new("RGB", (20, 20)).save(half / "1.png")
    with pytest.raises(PreprocessError, match="some frames have alpha and some do not"):
        pp.run(job, {"input": str(half)})
    assert not job.frames_dir.exists() or not any(job.frames_dir.iterdir())


def test_generated_video_folder_uses_the_white_key(tmp_path, no_matting):
    """The video stage's output: RGB frames on white + frames.json (fps, files, matting hint)."""
    folder = tmp_path / "video"
    folder.mkdir()
    files = []
    for i in range(3):
        a = np.full((48, 48, 3), 255, np.uint8)
        a[14:34, 10 + 3 * i:26 + 3 * i] = (30, 90, 160)
        a[20:26, 16 + 3 * i:20 + 3 * i] = 255  # a white hole inside the object stays opaque
        Image.fromarray(a).save(folder / f"{i:04d}.png")
        files.append(f"{i:04d}.png")
    Image.new("RGB", (48, 48), (255, 255, 255)).save(folder / "condition.png")  # not a frame
    (folder / "frames.json").write_text(json.dumps({"fps": 7, "files": files, "matting": "white-key"}))
    job = Job(tmp_path / "job")
    said = []
    result = pp.run(job, {"input": str(folder), "size": 64}, lambda s: said.append(s.get("message", "")))
    m = meta(job)
    assert m["frames"] == 3 and m["fps"] == 7.0 and m["matting"] == "white-key"
    # 'auto' says what it used and why the model did not run: in the progress, meta.json and the stage result
    # (the pipeline keeps result["record"] in job.json, the CLI prints result["note"])
    note = ("alpha from a white-background key (matting=auto) (the matting model cannot run: "
            + pp.NO_MATTING.rstrip(".") + "; the frames were generated on a plain background)")
    assert note in said and m["matting_note"] == note and result["note"] == note
    assert result["record"] == {"matting": {"method": "white-key", "note": note}}
    a = np.asarray(Image.open(job.frames_dir / "ref" / "0_rgba.png"))[..., 3]
    bbox = Image.fromarray(a).getbbox()
    assert a[(bbox[1] + bbox[3]) // 2, (bbox[0] + bbox[2]) // 2] == 255
    # A real photo background cannot be keyed: the same folder without the hint needs the model.
    (folder / "frames.json").write_text(json.dumps({"fps": 7, "files": files}))
    with pytest.raises(PreprocessError, match="no matting model"):
        pp.run(Job(tmp_path / "job2"), {"input": str(folder)})


def test_minions_frames_pass_through_centred(minions_dir, tmp_path):
    job = Job(tmp_path / "job")
    opts = {"input": str(minions_dir), "frames": 3, "size": 128}
    pp.run(job, opts)
    m = meta(job)
    assert m["matting"] == "input" and m["source_size"] == [720, 720] and m["source_frames"] == [0, 1, 2]
    boxes = []
    for f in range(3):
        out = Image.open(job.frames_dir / "ref" / f"{f}_rgba.png")
        src = Image.open(minions_dir / "ref" / f"{f}_rgba.png")
        assert out.size == (128, 128) and out.mode == "RGBA"
        boxes.append(out.getchannel("A").getbbox())
        # Same object: its coverage scales with the crop (binary alpha at 720 -> soft edges at 128).
        scale = 128 / (m["crop_box"][2] - m["crop_box"][0])
        cov_src = (np.asarray(src)[..., 3] / 255).sum() * scale ** 2
        assert abs((np.asarray(out)[..., 3] / 255).sum() / cov_src - 1) < 0.02
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    assert abs((x0 + x1) / 2 - 64) <= 1 and abs((y0 + y1) / 2 - 64) <= 1
    assert abs(max(x1 - x0, y1 - y0) - 96) <= 2
    assert pp.is_done(job, opts)
    from stag4d_backend.dataset import load_frames

    assert load_frames(job.frames_dir, 32).num_frames == 3  # the fit's reader accepts the output


def test_killed_run_leaves_previous_output_intact(tmp_path):
    folder = write_rgba_sequence(tmp_path / "seq", n=6)
    job = Job(tmp_path / "job")
    first = {"input": str(folder), "size": 32}
    pp.run(job, first)
    before = {p.name: p.read_bytes() for p in (job.frames_dir / "ref").iterdir()}
    (job.frames_dir / "zero123").mkdir()

    def killer(stats):
        if stats["message"] == "writing frame 2":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pp.run(job, {"input": str(folder), "size": 48}, killer)
    assert {p.name: p.read_bytes() for p in (job.frames_dir / "ref").iterdir()} == before
    assert pp.is_done(job, first) and (job.frames_dir / "zero123").is_dir()
    assert [p.name for p in job.frames_dir.iterdir() if p.name.startswith(".")] == []

    fresh = Job(tmp_path / "fresh")
    with pytest.raises(KeyboardInterrupt):
        pp.run(fresh, first, killer)
    assert not (fresh.frames_dir / "ref").exists() and not (fresh.frames_dir / "meta.json").exists()
    # A finished rerun replaces ref/ as a whole and drops the anchors made from the old frames.
    pp.run(job, {"input": str(folder), "size": 48, "frames": 2})
    assert sorted(p.name for p in (job.frames_dir / "ref").iterdir()) == ["0_rgba.png", "1_rgba.png"]
    assert not (job.frames_dir / "zero123").exists()


def test_cancel_between_frames(tmp_path):
    from stag4d_backend.job import JobStopped

    folder = write_rgba_sequence(tmp_path / "seq", n=4)
    job = Job(tmp_path / "job")
    with pytest.raises(JobStopped):
        pp.run(job, {"input": str(folder)}, should_stop=lambda: True)
    assert not (job.frames_dir / "ref").exists()


def _write_fake_birefnet(folder: Path) -> Path:
    """A stand-in with BiRefNet's folder layout: config.json with an auto_map, the model code as .py files, and
    model.safetensors; its "network" predicts foreground where the red channel is high."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "BiRefNet_config.py").write_text(
        "from transformers import PretrainedConfig\n\n"
        "class BiRefNetConfig(PretrainedConfig):\n    model_type = 'SegformerForSemanticSegmentation'\n\n"
        "    def __init__(self, bb_pretrained=False, **kwargs):\n"
        "        self.bb_pretrained = bb_pretrained\n        super().__init__(**kwargs)\n")
    (folder / "birefnet.py").write_text(
        "import torch\nfrom torch import nn\nfrom .BiRefNet_config import BiRefNetConfig\n\n"
        "class BiRefNet(nn.Module):\n"
        "    def __init__(self, bb_pretrained=True, config=BiRefNetConfig()):\n"
        "        super().__init__()\n        assert not bb_pretrained\n"
        "        self.head = nn.Conv2d(3, 1, 1)\n\n"
        "    def forward(self, x):\n        return [self.head(x) * 0.0, self.head(x)]\n")
    (folder / "config.json").write_text(json.dumps({"auto_map": {
        "AutoConfig": "BiRefNet_config.BiRefNetConfig", "AutoModelForImageSegmentation": "birefnet.BiRefNet"}}))
    w = torch.zeros(1, 3, 1, 1)
    w[0, 0] = 20.0  # red (normalised) -> large logit
    save_file({"head.weight": w, "head.bias": torch.tensor([-10.0])}, str(folder / "model.safetensors"))
    return folder


def test_matting_model_path_with_a_stand_in_birefnet(tmp_path, monkeypatch):
    from stag4d_backend.models import matting

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.delenv("STAG4D_MATTING_PATH", raising=False)
    assert not matting.is_available()
    folder = _write_fake_birefnet(tmp_path / "birefnet")
    monkeypatch.setenv("STAG4D_MATTING_PATH", str(folder))
    assert matting.unavailable_reason() is None
    video = write_video(tmp_path / "clip.mp4", n=4)
    job = Job(tmp_path / "job")
    pp.run(job, {"input": str(video), "size": 64, "device": "cpu"})
    m = meta(job)
    assert m["matting"] == "model" and m["frames"] == 4
    a = np.asarray(Image.open(job.frames_dir / "ref" / "0_rgba.png"))[..., 3]
    assert a[0, 0] == 0 and a.max() > 200
    # The model's code importing a package that is not installed: named, with the pip command.
    (folder / "birefnet.py").write_text("import kornia_not_installed_here\n" + (folder / "birefnet.py").read_text())
    assert "kornia_not_installed_here" in matting.unavailable_reason()
    with pytest.raises(PreprocessError, match="pip install kornia_not_installed_here"):
        pp.run(Job(tmp_path / "job2"), {"input": str(video), "matting": "model"})


def test_matting_names_a_missing_or_mismatched_torchvision(tmp_path, monkeypatch):
    """BiRefNet's code imports torchvision, which must be built for the installed torch: missing, or installed
    for another torch (its import fails), matting is unavailable with the install.sh command that fixes it,
    and 'auto' on frames without alpha stops with that reason instead of using the model."""
    from stag4d_backend.models import matting

    folder = _write_fake_birefnet(tmp_path / "birefnet")
    (folder / "birefnet.py").write_text("import torchvision\n" + (folder / "birefnet.py").read_text())
    monkeypatch.setenv("STAG4D_MATTING_PATH", str(folder))
    monkeypatch.setattr(matting, "_import_checks", {})
    fakes = tmp_path / "site"
    if importlib.util.find_spec("torchvision") is None:
        reason = matting.unavailable_reason()
        assert "not installed: torchvision" in reason and "install.sh --matting" in reason
    # A torchvision built for another torch (as PyPI's beside the CPU torch): found, but its import fails.
    (fakes / "torchvision").mkdir(parents=True)
    (fakes / "torchvision" / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.syspath_prepend(str(fakes))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fakes), os.environ.get("PYTHONPATH", "")]))
    reason = matting.unavailable_reason()
    assert reason == ("torchvision is installed but does not work with this torch (RuntimeError: operator "
                      "torchvision::nms does not exist); run `bash install_scripts/install.sh --matting`, which "
                      "installs the build that matches torch")
    with pytest.raises(PreprocessError, match="does not work with this torch"):
        pp.run(Job(tmp_path / "job"), {"input": str(write_video(tmp_path / "clip.mp4", n=2)), "size": 32})


def test_imageio_fallback_reader(tmp_path, monkeypatch):
    """Files PyAV cannot open go to imageio-ffmpeg's own ffmpeg, with the same selection rule and fps."""
    video = write_video(tmp_path / "clip.mp4", n=12)

    def refuse(*args, **kwargs):
        raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")

    monkeypatch.setattr(av, "open", refuse)
    for sel, expect in [(pp.Selection(start=1, stride=3), [1, 4, 7, 10]),
                        (pp.Selection(stride="auto", frames=3), [0, 4, 8])]:
        clip = pp.read_clip(video, sel)
        assert clip.indices == expect and clip.fps == 10.0 and clip.images[0].size == (96, 64)


def test_animated_gif_is_a_clip(tmp_path):
    frames = []
    for i in range(4):
        im = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
        im.paste((255, 0, 0, 255), (5 + 5 * i, 10, 15 + 5 * i, 20))
        frames.append(im)
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=100, loop=0, disposal=2)
    job = Job(tmp_path / "job")
    pp.run(job, {"input": str(tmp_path / "a.gif"), "size": 32, "stride": 2})
    m = meta(job)
    assert m["source_frames"] == [0, 2] and m["fps"] == 5.0 and m["matting"] == "input"
    assert centroid(job.frames_dir / "ref" / "1_rgba.png")[0] > centroid(job.frames_dir / "ref" / "0_rgba.png")[0]
