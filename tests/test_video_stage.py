"""The video stage and its loaders on tiny random-weight models saved in the real checkpoints' folder layouts
(stabilityai/stable-video-diffusion-img2vid-xt with fp16-variant weights, stabilityai/sdxl-turbo with
vocab.json/merges.txt tokenizers), loaded through the very same code path as real weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stag4d_backend.job import Job
from stag4d_backend.stages import preprocess, video

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _no_real_weights(monkeypatch, tmp_path):
    for var in ("STAG4D_SVD_PATH", "STAG4D_SDXL_TURBO_PATH", "STAG4D_MATTING_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_clip_tokenizer(folder: Path, size: int = 1000) -> None:
    """A CLIP BPE tokenizer in the hub layout (vocab.json, merges.txt, tokenizer_config.json): byte symbols,
    their end-of-word forms, letter-pair merges up to ``size`` tokens, then the two special tokens."""
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = []
    letters = "abcdefghijklmnopqrstuvwxyz"
    for a in letters:
        for b in letters:
            if len(vocab) < size - 2:
                merges.append(f"{a} {b}</w>")
                vocab[a + b + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        stale.unlink()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}))


def build_tiny_svd(folder: Path) -> Path:
    from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline,
                           UNetSpatioTemporalConditionModel)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=32,
        num_attention_heads=(2, 4), projection_class_embeddings_input_dim=96, addition_time_embed_dim=32,
        num_frames=3)
    scheduler = EulerDiscreteScheduler(  # the img2vid-xt scheduler config
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
        steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True)
    vae = AutoencoderKLTemporalDecoder(block_out_channels=(32, 64), in_channels=3, out_channels=3,
                                       down_block_types=("DownEncoderBlock2D",) * 2, latent_channels=4,
                                       layers_per_block=1)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, image_size=224,
        intermediate_size=37, patch_size=32))
    pipe = StableVideoDiffusionPipeline(vae=vae, image_encoder=encoder, unet=unet, scheduler=scheduler,
                                        feature_extractor=CLIPImageProcessor(crop_size=224, size=224))
    # Like the real repo: fp16 weights stored as the "fp16" variant.
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    return folder


def build_tiny_sdxl_turbo(folder: Path, vocab_size: int = 1000) -> Path:
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=1)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=64)
    scheduler = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                timestep_spacing="trailing", steps_offset=1)
    cfg = dict(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
               hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
               vocab_size=vocab_size, projection_dim=32, max_position_embeddings=77)
    tok_dir = folder.parent / f"{folder.name}-tokenizer"
    write_tiny_clip_tokenizer(tok_dir, vocab_size)
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**cfg)),
                                     text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg)),
                                     tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder)
    for sub in ("tokenizer", "tokenizer_2"):  # the hub's tokenizer files (vocab.json + merges.txt), not tokenizer.json
        write_tiny_clip_tokenizer(folder / sub, vocab_size)
    shutil.rmtree(tok_dir)
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny-models")
    out = {"svd": build_tiny_svd(root / "svd"), "sdxl": build_tiny_sdxl_turbo(root / "sdxl-turbo")}
    torch.set_num_threads(n)
    return out


def disc_rgba(path: Path, size=(80, 60), centre=(34, 30), r=14) -> Path:
    yy, xx = np.mgrid[:size[1], :size[0]]
    arr = np.zeros((size[1], size[0], 4), np.uint8)
    inside = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= r * r
    arr[inside] = (200, 80, 40, 255)
    Image.fromarray(arr, "RGBA").save(path)
    return path


def _opts(models, **kw) -> dict:
    base = {"svd_model_path": str(models["svd"]), "sdxl_turbo_model_path": str(models["sdxl"]), "device": "cpu",
            "video_size": SIZE, "image_size": SIZE, "video_steps": 2, "decode_chunk_size": 2, "seed": 3}
    base.update(kw)
    return base


def _frames(job: Job) -> list[np.ndarray]:
    meta = json.loads((job.path / "video" / "frames.json").read_text())
    return [np.asarray(Image.open(job.path / "video" / f)) for f in meta["files"]]


def test_loaders_read_the_real_layouts(tiny_models):
    from diffusers import StableDiffusionXLPipeline, StableVideoDiffusionPipeline

    from stag4d_backend.models import registry
    from stag4d_backend.models.video_models import load_sdxl_turbo, load_svd

    assert registry.variant_for("svd", tiny_models["svd"]) == "fp16"
    svd = load_svd(tiny_models["svd"], device="cpu")
    assert isinstance(svd, StableVideoDiffusionPipeline)
    assert svd.unet.dtype == torch.float32  # fp16 files, upcast for the CPU
    sdxl = load_sdxl_turbo(tiny_models["sdxl"], device="cpu")
    assert isinstance(sdxl, StableDiffusionXLPipeline) and len(sdxl.tokenizer_2) == 1000
    with pytest.raises(registry.ModelLoadError, match="only 1000 tokens"):
        load_sdxl_turbo(tiny_models["sdxl"], device="cpu", min_vocab=49408)


def test_image_to_video_frames_and_determinism(tiny_models, tmp_path):
    img = disc_rgba(tmp_path / "disc.png")
    events = []
    opts = _opts(tiny_models, kind="image", image=str(img))
    job = Job(tmp_path / "job")
    res = video.run(job, opts, events.append)
    meta = json.loads((job.path / "video" / "frames.json").read_text())
    assert res["frames"] == meta["frames"] == 3  # the model's own num_frames (unet config) by default
    assert meta["fps"] == 7.0 and meta["matting"] == "white-key" and meta["condition"]["cut_out"] == "input"
    frames = _frames(job)
    assert [f.shape for f in frames] == [(SIZE, SIZE, 3)] * 3
    assert events[-1]["step"] == events[-1]["total"] == 2
    # The conditioning image: the disc centred on white, its diameter at video_fraction of the side.
    cond = np.asarray(Image.open(job.path / "video" / "condition.png"))
    assert cond.shape == (SIZE, SIZE, 3) and (cond[0, 0] == 255).all()
    ys, xs = np.nonzero((np.abs(cond.astype(int) - 255).max(-1)) > 60)
    assert abs((xs.min() + xs.max()) / 2 - (SIZE - 1) / 2) <= 1.0
    assert abs((xs.max() - xs.min() + 1) - 0.6 * SIZE) <= 2
    assert video.is_done(job, opts)
    assert not video.is_done(job, dict(opts, seed=4))

    again = Job(tmp_path / "again")
    video.run(again, opts)
    assert all((a == b).all() for a, b in zip(frames, _frames(again)))
    other = Job(tmp_path / "other")
    video.run(other, dict(opts, seed=4, video_frames=2))
    assert len(_frames(other)) == 2 and not (frames[0] == _frames(other)[0]).all()
    img.unlink()  # a temporary upload gone: the finished stage still counts on resume
    assert video.is_done(job, opts)


def test_prompt_to_image_to_video(tiny_models, tmp_path, monkeypatch):
    from stag4d_backend.models import matting

    # Random weights draw noise, not an object on white: stand in for the matting model (a centred disc).
    def fake_matte(images, device="auto", local_path=None):
        out = []
        for im in images:
            rgba = im.convert("RGBA")
            w, h = rgba.size
            yy, xx = np.mgrid[:h, :w]
            a = (((xx - w / 2) ** 2 + (yy - h / 2) ** 2) <= (w / 4) ** 2).astype(np.uint8) * 255
            rgba.putalpha(Image.fromarray(a, "L"))
            out.append(rgba)
        return out

    monkeypatch.setattr(video, "matting_problem", lambda options=None: None)
    monkeypatch.setattr(matting, "matte", fake_matte)
    opts = _opts(tiny_models, kind="prompt", prompt="a dancing robot", image_steps=1, video_frames=2)
    job = Job(tmp_path / "job")
    events = []
    video.run(job, opts, events.append)
    meta = json.loads((job.path / "video" / "frames.json").read_text())
    assert meta["prompt_used"] == "a 3D render of a dancing robot, full body, centred, plain white background"
    assert meta["condition"]["cut_out"] == "model" and meta["models"]["text_to_image"] == "sdxl-turbo"
    assert Image.open(job.path / "video" / "text_image.png").size == (SIZE, SIZE)
    assert len(_frames(job)) == 2 and events[-1]["step"] == events[-1]["total"] == 3  # 1 image + 2 video steps
    assert video.is_done(job, opts) and not video.is_done(job, dict(opts, prompt="a cat"))


def test_generated_noise_without_matting_is_a_clear_error(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(video, "matting_problem", lambda options=None: preprocess.NO_MATTING)
    job = Job(tmp_path / "job")
    with pytest.raises(video.VideoError, match="not a uniform colour.*stag4d models download matting"):
        video.run(job, _opts(tiny_models, kind="prompt", prompt="a cat", video_frames=2))
    assert not (job.path / "video").exists()


def test_missing_weights_message(tmp_path):
    from stag4d_backend.models.registry import MissingWeightsError

    img = disc_rgba(tmp_path / "disc.png")
    job = Job(tmp_path / "job")
    with pytest.raises(MissingWeightsError, match=r"stag4d models download svd"):
        video.run(job, {"kind": "image", "image": str(img), "device": "cpu"})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingWeightsError, match=r"not a complete copy.*model_index\.json"):
        video.run(job, {"kind": "image", "image": str(img), "device": "cpu", "svd_model_path": str(empty)})
    assert not (job.path / "video").exists()


def test_bad_requests_and_cancel(tiny_models, tmp_path):
    from stag4d_backend.job import JobStopped

    img = disc_rgba(tmp_path / "disc.png")
    job = Job(tmp_path / "job")
    for bad, msg in [({"kind": "prompt", "prompt": "  "}, "prompt is empty"),
                     ({"kind": "image", "image": str(tmp_path / "nope.png")}, "no such image"),
                     ({"kind": "image", "image": str(img), "video_steps": 0}, "video_steps=0"),
                     ({"kind": "image", "image": str(img), "video_frames": "many"}, "whole number"),
                     ({"kind": "audio"}, "kind=")]:
        with pytest.raises(video.VideoError, match=msg):
            video.run(job, bad)
    calls = []
    with pytest.raises(JobStopped):
        video.run(job, _opts(tiny_models, kind="image", image=str(img), video_frames=2),
                  should_stop=lambda: calls.append(1) or len(calls) > 2)
    assert not (job.path / "video").exists()
