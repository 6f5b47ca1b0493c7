"""Zero123-XL SDS (spec section 8) on a tiny random-weight model saved in the real folder layout and loaded
through the same code path as the real weights (models/zero123_xl.py)."""

import dataclasses
import json
import math
import shutil

import pytest
import torch

from stag4d_backend.config import get_preset
from stag4d_backend.dataset import load_frames
from stag4d_backend.example_scene import ExampleCreature, write_stag4d_layout
from stag4d_backend.fitting.trainer import WHITE, Trainer, _CameraTensors
from stag4d_backend.fitting.views import RandomView, choose_conditioning, sample_random_view
from stag4d_backend.gaussians.deformation import DeformationConfig
from stag4d_backend.guidance.base import INPUT_VIEW, ScoreDistillation, SDSRequest
from stag4d_backend.models.registry import MissingWeightsError
from stag4d_backend.models.zero123_xl import load_zero123_sds, save_random_zero123, sds_options
from stag4d_backend.render.cameras import ANCHOR_AZIMUTHS, ANCHOR_ELEVATIONS, OrbitCamera
from stag4d_backend.stages.fit import fit


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_random_zero123(tmp_path_factory.mktemp("zero123-xl"), tiny=True, seed=0)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    write_stag4d_layout(ExampleCreature(1500, seed=3), root, num_frames=2, size=32, anchor_size=32)
    return root


@pytest.fixture(autouse=True)
def _no_env_path(monkeypatch):
    monkeypatch.delenv("STAG4D_ZERO123_XL_PATH", raising=False)


SMALL = dict(image_size=64)   # 8x8 latents: same code path, ~16x cheaper VAE than the default 256 px


def _tiny(**kw):
    return dataclasses.replace(get_preset("tiny"), **kw)


def test_loads_from_the_real_layout_and_implements_the_interface(model_dir):
    sds = load_zero123_sds("cpu", model_dir, seed=0)
    assert isinstance(sds, ScoreDistillation)
    assert sds.unet.config.in_channels == 8 and sds.dtype == torch.float32 and sds.image_size == 256
    # The default 256 px path end to end: renders -> 32x32 latents, a finite loss with a gradient on the image.
    sds.prepare(torch.rand(1, 32, 32, 3), None)
    assert sds.cond_latents.shape == (1, 7, 4, 32, 32)
    image = torch.rand(40, 40, 3, requires_grad=True)
    sds.loss(image, SDSRequest(0, INPUT_VIEW, 10.0, 90.0), 1, 40).backward()
    assert image.grad is not None and torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
    assert sds.camera_projection.proj.in_features == 36 and sds.camera_projection.proj.out_features == 32
    assert sds.num_train_timesteps == 1000 and sds.scaling_factor == pytest.approx(0.18215)
    assert json.loads((model_dir / "model_index.json").read_text())["clip_camera_projection"][1] == \
        "CLIPCameraProjection"


def test_sds_gradient_reaches_every_gaussian_parameter(toy_dir, model_dir):
    # Non-zero deformation heads ("authors" init) so the fine stage's field is on the gradient path.
    cfg = _tiny(guidance="sds", lambda_rgb=0.0, lambda_alpha=0.0, deformation=dataclasses.replace(
        get_preset("tiny").deformation, head_init="authors"))
    data = load_frames(toy_dir, cfg.ref_resolution, cfg.anchor_resolution)
    trainer = Trainer(cfg, data, load_zero123_sds("cpu", model_dir, **SMALL), "cpu")
    # The init is isotropic (equal log-scales on all axes), so rotation has no effect yet; any anisotropy (as
    # after the first Adam step) puts it on the gradient path.
    with torch.no_grad():
        trainer.model.params["scaling"] += 0.3 * torch.rand(trainer.model.params["scaling"].shape,
                                                            generator=torch.Generator().manual_seed(0))
    cam = _CameraTensors(OrbitCamera(10.0, 40.0, 2.0, cfg.fovy, 32), "cpu")
    request = SDSRequest(1, 0, -10.0, 10.0)
    for t in (None, 0.5):   # coarse (canonical) and fine (deformed)
        trainer.optimizer.zero_grad(set_to_none=True)
        out = trainer.render(trainer.gaussians_at(t), cam, WHITE)
        trainer.sds.loss(out.rgb, request, 1, cfg.iters).backward()
        for name in ("xyz", "f_dc", "opacity", "scaling", "rotation"):
            grad = trainer.model.params[name].grad
            assert grad is not None and grad.abs().sum() > 0, name
        for name, p in trainer.deformation.named_parameters():
            if t is None:
                assert p.grad is None or p.grad.abs().sum() == 0, name
            else:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
    stats = trainer.step()   # and the trainer's own SDS path runs
    assert math.isfinite(stats["sds"]) and stats["sds"] > 0


def test_latent_gradient_is_w_times_eps_hat_minus_eps(toy_dir, model_dir):
    sds = load_zero123_sds("cpu", model_dir, seed=5, **SMALL)
    data = load_frames(toy_dir, 32, 32)
    sds.prepare(data.ref_rgb, data.anchor_rgb)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    request = SDSRequest(1, 3, 12.0, -75.0)
    state = sds.generator.get_state()
    loss = sds.latent_loss(z, request, step=1500)
    loss.backward()

    # Independent computation from the components, same random draws (t first, then the noise).
    g = torch.Generator()
    g.set_state(state)
    assert sds.t_range(1500) == (260, 725)
    t = int(torch.randint(260, 726, (1,), generator=g).item())
    eps = torch.randn(1, 4, 8, 8, generator=g)
    a = sds.scheduler.alphas_cumprod[t]
    z_t = a.sqrt() * z.detach() + (1 - a).sqrt() * eps
    c, v = sds.image_embeds[1, 4], sds.cond_latents[1, 4][None]     # slot 1 + k for anchor k = 3
    pose = torch.tensor([math.radians(12.0), math.sin(math.radians(-75.0)), math.cos(math.radians(-75.0)), 0.0])
    with torch.no_grad():
        cc = sds.camera_projection(torch.cat([c, pose])[None, None])
        out = sds.unet(torch.cat([torch.cat([z_t, v], 1), torch.cat([z_t, torch.zeros_like(v)], 1)]),
                       torch.tensor([t, t]), encoder_hidden_states=torch.cat([cc, torch.zeros_like(cc)])).sample
    eps_c, eps_u = out.chunk(2)
    expected = (1 - a) * (eps_u + 5.0 * (eps_c - eps_u) - eps)
    torch.testing.assert_close(z.grad, expected, rtol=1e-4, atol=1e-5)
    assert loss.item() == pytest.approx(0.5 * float((expected ** 2).sum()), rel=1e-4)


def test_conditioning_choice_follows_the_spec_table():
    g = torch.Generator().manual_seed(0)
    table = {30: 0, 59: 0, 60: 1, 179: 2, -30: 5, -90: 4, -150: 3, -180: 3}
    for hor, k in table.items():
        view = RandomView(OrbitCamera(-7.0, float(hor)), ver=7, hor=hor)
        r = choose_conditioning(view, 1, g, input_probability=0.0)   # force the anchor branch
        assert r.source == k, hor
        assert r.delta_azimuth == hor - ANCHOR_AZIMUTHS[k]
        assert r.delta_polar == 7 + ANCHOR_ELEVATIONS[k]            # ver - DG elevation of anchor k
    for hor in range(-29, 30):
        view = RandomView(OrbitCamera(0.0, float(hor)), ver=0, hor=hor)
        assert choose_conditioning(view, 0, g, input_probability=0.0).source == INPUT_VIEW
    n, inputs = 20000, 0
    for _ in range(n):
        view = sample_random_view(g, 32)
        inputs += choose_conditioning(view, 0, g).source == INPUT_VIEW
    assert inputs / n == pytest.approx(59 / 360 + 301 / 360 * 0.6, abs=0.015)   # ~ 0.67


def test_each_request_uses_the_matching_precomputed_embedding(toy_dir, model_dir):
    sds = load_zero123_sds("cpu", model_dir, latent="mode", **SMALL)   # deterministic latents
    data = load_frames(toy_dir, 32, 32)
    sds.prepare(data.ref_rgb, data.anchor_rgb)
    assert sds.image_embeds.shape[:2] == (2, 7)
    for f in range(2):
        for source in (INPUT_VIEW, 0, 1, 2, 3, 4, 5):
            image = data.ref_rgb[f] if source == INPUT_VIEW else data.anchor_rgb[f, source]
            c_ref, v_ref = sds.encode_condition_images(image[None])
            c, v = sds.conditioning(SDSRequest(f, source, 0.0, 0.0))
            torch.testing.assert_close(c, c_ref)
            # The tiny random VAE on near-constant white images is ill-conditioned (GroupNorm of ~zero
            # variance): repeated encodings differ by ~1e-2, while other views' latents differ by far more.
            torch.testing.assert_close(v, v_ref, atol=3e-2, rtol=0)
            others = [s for s in range(7) if s != source + 1]
            assert (sds.cond_latents[f, others] - v).abs().amax(dim=(1, 2, 3)).min() > 0.1
    # Without anchors only the input frame can condition.
    sds.prepare(data.ref_rgb, None)
    sds.conditioning(SDSRequest(0, INPUT_VIEW, 0.0, 0.0))
    with pytest.raises(ValueError, match="anchor"):
        sds.conditioning(SDSRequest(0, 2, 0.0, 0.0))


def test_t_range_annealing(model_dir):
    sds = load_zero123_sds("cpu", model_dir, **SMALL)
    assert sds.anneal_iters == 3000
    assert sds.t_range(0) == (500, 950) and sds.t_range(1500) == (260, 725)
    assert sds.t_range(3000) == (20, 500) and sds.t_range(8000) == (20, 500)
    ts = [sds.sample_t(1) for _ in range(400)]
    assert min(ts) >= 499 and max(ts) <= 949 and max(ts) - min(ts) > 350
    # --iters rescales the horizon with the other schedules: paper at 800 iterations anneals over 300.
    opts = sds_options(get_preset("paper").with_iters(800))
    assert opts["anneal_iters"] == 300 and opts["guidance_scale"] == 5.0
    short = load_zero123_sds("cpu", model_dir, **opts)
    assert short.t_range(0) == (500, 950) and short.t_range(150) == (260, 725) and short.t_range(300) == (20, 500)


def test_state_dict_makes_the_step_stream_resumable(toy_dir, model_dir):
    sds = load_zero123_sds("cpu", model_dir, seed=3, **SMALL)
    data = load_frames(toy_dir, 32, 32)
    sds.prepare(data.ref_rgb, data.anchor_rgb)
    image = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0))
    request = SDSRequest(0, INPUT_VIEW, 5.0, 100.0)
    saved = sds.state_dict()
    a = [sds.loss(image, request, 10, 40).item() for _ in range(2)]
    other = load_zero123_sds("cpu", model_dir, seed=3, **SMALL)
    other.prepare(data.ref_rgb, data.anchor_rgb)
    other.load_state_dict(saved)
    assert [other.loss(image, request, 10, 40).item() for _ in range(2)] == a
    assert a[0] != a[1]


def test_fit_with_sds_runs_on_the_cpu(toy_dir, model_dir, tmp_path):
    cfg = _tiny(guidance="sds").with_iters(5)   # coarse for 1 step, then fine
    history = []
    sds = load_zero123_sds("cpu", model_dir, **sds_options(cfg), **SMALL)
    out = fit(toy_dir, tmp_path / "o", cfg, sds=sds, guidance_explicit=True, progress=history.append)
    assert out.status == "finished" and out.iterations == 5
    assert [h["stage"] for h in history][0] == "coarse" and history[-1]["stage"] == "fine"
    assert all(math.isfinite(h["sds"]) and h["sds"] > 0 for h in history)
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["guidance"] == "sds"
    for name in ("canonical.ply", "deformation.safetensors", "state.pt"):
        assert (tmp_path / "o" / name).is_file()


def test_missing_or_incomplete_weights_raise_missing_weights_error(model_dir, tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        load_zero123_sds("cpu", tmp_path / "nowhere")
    msg = str(err.value)
    assert "Zero123-XL" in msg and "stag4d models download zero123-xl" in msg and "\n" not in msg
    broken = shutil.copytree(model_dir, tmp_path / "broken")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match="unet"):
        load_zero123_sds("cpu", broken)


def test_sds_fit_resumed_after_a_kill_equals_the_uninterrupted_fit(toy_dir, model_dir, tmp_path):
    """The SDS generator (t, noise) is part of the checkpoint, so a resumed fit is bit-identical."""
    import numpy as np

    from stag4d_backend.gaussians.ply import load_ply

    cfg = _tiny(guidance="sds", checkpoint_every=3).with_iters(6)

    def run(out, **kw):
        sds = load_zero123_sds("cpu", model_dir, **sds_options(cfg), **SMALL)
        return fit(toy_dir, out, cfg, sds=sds, guidance_explicit=True, **kw)

    run(tmp_path / "a")

    class Killed(RuntimeError):
        pass

    def crash_at_5(stats):
        if stats["step"] == 5:
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path / "b", progress=crash_at_5)
    assert 0 < run(tmp_path / "b").resumed_from < 5
    a, b = (load_ply(tmp_path / d / "canonical.ply") for d in "ab")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_loads_a_copy_holding_only_fp16_variant_files(model_dir, tmp_path):
    """Some copies hold only *.fp16.* weight files (saved with variant="fp16"): loading falls back to that
    variant, and the weights are the plain copy's rounded to half precision."""
    from stag4d_backend.models.registry import component_variant, missing_files, get_spec

    fp16_dir = save_random_zero123(tmp_path / "zero123-xl-fp16", tiny=True, seed=0, variant="fp16")
    names = sorted(p.name for p in (fp16_dir / "unet").iterdir())
    assert names == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    assert [component_variant(fp16_dir / s) for s in ("unet", "vae", "image_encoder", "clip_camera_projection")] \
        == ["fp16"] * 4
    assert component_variant(model_dir / "unet") is None
    assert missing_files(get_spec("zero123-xl"), fp16_dir) == []
    half = load_zero123_sds("cpu", fp16_dir, seed=0)
    plain = load_zero123_sds("cpu", model_dir, seed=0)
    assert half.dtype == torch.float32   # CPU: float32, whatever the files hold
    for a, b in ((half.unet, plain.unet), (half.vae, plain.vae), (half.image_encoder, plain.image_encoder),
                 (half.camera_projection, plain.camera_projection)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sb:
            if sb[k].is_floating_point():
                assert torch.equal(sa[k], sb[k].half().float()), k
