"""The fit stage on a tiny two-frame toy scene: loss goes down, resume equals an uninterrupted run, bad input."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from stag4d_backend import cli
from stag4d_backend.config import FitConfig, get_preset
from stag4d_backend.dataset import DataError
from stag4d_backend.example_scene import ExampleCreature, write_stag4d_layout
from stag4d_backend.fitted import load_fitted
from stag4d_backend.gaussians.ply import load_ply
from stag4d_backend.guidance.base import INPUT_VIEW, SDSRequest
from stag4d_backend.stages.fit import FitError, fit


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    write_stag4d_layout(ExampleCreature(1500, seed=3), root, num_frames=2, size=32, anchor_size=32)
    return root


def _tiny(**kw) -> FitConfig:
    return dataclasses.replace(get_preset("tiny"), **kw)


def test_short_fit_lowers_the_loss_and_writes_outputs(toy_dir, tmp_path):
    history = []
    out = fit(toy_dir, tmp_path / "out", _tiny(iters=60).with_iters(60), progress=history.append)
    assert out.status == "finished" and out.iterations == 60
    first = np.mean([h["ref_rgb"] for h in history[:5]])
    last = np.mean([h["ref_rgb"] for h in history[-5:]])
    assert last < 0.6 * first, (first, last)
    assert [h["step"] for h in history] == list(range(1, 61))
    assert history[0]["stage"] == "coarse" and history[-1]["stage"] == "fine"
    for name in ("canonical.ply", "deformation.safetensors", "meta.json", "state.pt"):
        assert (tmp_path / "out" / name).is_file()
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["num_frames"] == 2 and meta["guidance"] == "anchors" and meta["iterations"] == 60
    animated, _ = load_fitted(tmp_path / "out")
    assert animated.model.num_points == out.num_gaussians == meta["num_gaussians"]
    ply = load_ply(tmp_path / "out" / "canonical.ply")
    assert ply["xyz"].shape == (out.num_gaussians, 3)


def test_same_seed_same_result_and_resume_equals_uninterrupted(toy_dir, tmp_path):
    cfg = _tiny(checkpoint_every=10)
    fit(toy_dir, tmp_path / "a", cfg)
    fit(toy_dir, tmp_path / "b", cfg)

    class Killed(RuntimeError):
        pass

    def crash_at_25(stats):
        if stats["step"] == 25:
            raise Killed

    with pytest.raises(Killed):
        fit(toy_dir, tmp_path / "c", cfg, progress=crash_at_25)
    assert torch.load(tmp_path / "c" / "state.pt", weights_only=False)["it"] == 20
    steps = []
    resumed = fit(toy_dir, tmp_path / "c", cfg, progress=lambda s: steps.append(s["step"]))
    assert resumed.resumed_from == 20 and steps[0] == 21 and steps[-1] == cfg.iters

    a, b, c = (load_ply(tmp_path / d / "canonical.ply") for d in "abc")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(a[key], c[key])
    da, dc = (load_fitted(tmp_path / d)[0].deformation.state_dict() for d in "ac")
    for key in da:
        torch.testing.assert_close(da[key], dc[key], rtol=0, atol=0)
    # A finished fit is not repeated.
    assert fit(toy_dir, tmp_path / "c", cfg).status == "already_finished"


def test_rigid_motion_fits_and_loads(toy_dir, tmp_path):
    tiny = get_preset("tiny")
    out = fit(toy_dir, tmp_path / "out", _tiny(deformation=dataclasses.replace(tiny.deformation, motion="rigid")))
    assert out.status == "finished"
    animated, _ = load_fitted(tmp_path / "out")
    net = animated.deformation
    assert net.cfg.motion == "rigid" and net.head_names[-1] == "rigid"
    # Zero-initialised, then trained through the fine stage: the rotation head has learnt something.
    assert float(net.deformation_net.rotvec_deform[3].weight.detach().abs().sum()) > 0
    g = animated.at_frame(1)
    assert bool(torch.isfinite(g.means).all()) and bool(torch.isfinite(g.quats).all())


def test_depth_spread_term_is_reported_and_equals_the_renders_spread(toy_dir):
    """The optional one-surface term: off by default (no spread computed), and when on, the reported value is the
    sum over the step's renders of their mean depth spread, which is positive on a fresh fit."""
    from stag4d_backend.dataset import load_frames
    from stag4d_backend.fitting.trainer import Trainer

    cfg = _tiny(lambda_depth_spread=1000.0)
    trainer = Trainer(cfg, load_frames(toy_dir, cfg.ref_resolution, cfg.anchor_resolution))
    stats = trainer.step()
    assert stats["depth_spread"] > 0
    g = trainer.gaussians_at(None)
    out = trainer.render(g, trainer.front, (1.0, 1.0, 1.0))
    assert out.depth_spread is not None and float(Trainer.depth_spread_loss([out])) > 0
    plain = Trainer(_tiny(), load_frames(toy_dir, cfg.ref_resolution, cfg.anchor_resolution))
    assert "depth_spread" not in plain.step()
    assert plain.render(g, plain.front, (1.0, 1.0, 1.0)).depth_spread is None


def test_cancel_checkpoints_and_resumes(toy_dir, tmp_path):
    cfg = _tiny()
    seen = []
    out = fit(toy_dir, tmp_path / "o", cfg, progress=lambda s: seen.append(s["step"]),
              should_stop=lambda: len(seen) >= 7)
    assert out.status == "cancelled" and out.iterations == 7
    assert fit(toy_dir, tmp_path / "o", cfg).resumed_from == 7


def test_time_budget_writes_the_outputs_of_the_last_step(toy_dir, tmp_path):
    out = fit(toy_dir, tmp_path / "o", _tiny(), time_budget_s=0.0)
    assert out.status == "time_budget" and out.iterations < _tiny().iters
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["stopped_by_time_budget"] is True and meta["iterations"] == out.iterations
    assert load_fitted(tmp_path / "o")[0].model.num_points == out.num_gaussians


def test_other_options_in_the_same_folder_are_refused(toy_dir, tmp_path):
    fit(toy_dir, tmp_path / "o", _tiny(iters=12, checkpoint_every=5).with_iters(12))
    with pytest.raises(FitError, match="other data or options"):
        fit(toy_dir, tmp_path / "o", _tiny(seed=7))


def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "data" / "ref").mkdir(parents=True)
    rc = cli.main(["fit", str(tmp_path / "data"), "-o", str(tmp_path / "out"), "--preset", "tiny", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "no frames named" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_sds_without_weights(toy_dir, tmp_path):
    # A preset whose default is SDS falls back to anchors and says so; an explicit request is refused.
    out = fit(toy_dir, tmp_path / "o", _tiny(guidance="sds+anchors"))
    assert any("anchors" in n for n in out.notes)
    with pytest.raises(FitError, match="Zero123-XL"):
        fit(toy_dir, tmp_path / "p", _tiny(guidance="sds"), guidance_explicit=True)


class RecordingSDS:
    """A test double for the score-distillation interface: pulls renders toward mid-grey, records requests."""

    def __init__(self):
        self.requests: list[SDSRequest] = []
        self.prepared = None

    def prepare(self, ref_rgb, anchor_rgb):
        self.prepared = (ref_rgb.shape, None if anchor_rgb is None else anchor_rgb.shape)

    def loss(self, image, request, step, total_steps):
        self.requests.append(request)
        return ((image - 0.5) ** 2).mean()


def test_sds_interface_receives_renders_and_conditioning(toy_dir, tmp_path):
    sds = RecordingSDS()
    out = fit(toy_dir, tmp_path / "o", _tiny(guidance="sds+anchors", iters=30).with_iters(30), sds=sds,
              guidance_explicit=True)
    assert out.status == "finished" and sds.prepared[0][0] == 2
    assert len(sds.requests) == 30
    assert {r.source for r in sds.requests} <= {INPUT_VIEW, 0, 1, 2, 3, 4, 5}
    assert all(0 <= r.frame < 2 for r in sds.requests)


def test_render_command_writes_rgba_pngs(toy_dir, tmp_path, capsys):
    fit(toy_dir, tmp_path / "o", _tiny())
    cams = [{"index": 3, "frame": 1, "elevation": 0, "azimuth": 0, "radius": 2, "fovy": 49.1, "size": 40},
            {"index": 7, "frame": 0, "elevation": 30, "azimuth": 90, "radius": 2.5, "fovy": 40, "size": 24}]
    (tmp_path / "cams.json").write_text(json.dumps(cams))
    assert cli.main(["render", str(tmp_path / "o"), "--cameras", str(tmp_path / "cams.json"),
                     "-o", str(tmp_path / "img")]) == 0
    from PIL import Image

    a, b = Image.open(tmp_path / "img" / "0003.png"), Image.open(tmp_path / "img" / "0007.png")
    assert a.mode == "RGBA" and a.size == (40, 40) and b.size == (24, 24)
    alpha = np.asarray(a)[..., 3]
    assert alpha.max() > 200 and alpha[0, 0] == 0  # object in the middle, transparent corners
    (tmp_path / "bad.json").write_text('[{"index": 0}]')
    assert cli.main(["render", str(tmp_path / "o"), "--cameras", str(tmp_path / "bad.json"),
                     "-o", str(tmp_path / "img2")]) == 2
    assert "lacks" in capsys.readouterr().err


def test_config_overrides_copy_the_preset_and_check_names_and_types():
    from stag4d_backend.config import preview, with_overrides

    base = preview()
    cfg = with_overrides(base, ["anchors_per_step=6", "densify.max_gaussians=20000", "lambda_rgb=1",
                                "view_resolutions=[[0, 128], [1500, 256]]"])
    assert (cfg.anchors_per_step, cfg.densify.max_gaussians, cfg.lambda_rgb) == (6, 20000, 1.0)
    assert cfg.view_resolutions == ((0, 128), (1500, 256))
    assert (base.anchors_per_step, base.densify.max_gaussians) == (2, 60000)   # the preset is left alone
    for bad, why in [("nope=1", "no field"), ("densify.nope=1", "no field"), ("nope.x=1", "no config section"),
                     ("anchors_per_step=1.5", "is a int"), ("anchors_per_step", "KEY=VALUE"),
                     ("lambda_rgb=x", "not JSON")]:
        with pytest.raises(ValueError, match=why):
            with_overrides(base, [bad])


def test_progressive_time_window_widens_from_the_middle_frame_to_the_clip():
    from stag4d_backend.fitting.trainer import frame_window

    # 12 frames, coarse stage 300 steps, window over the next 1200: one frame, then +-1, ..., then all
    assert frame_window(301, 12, 300, 0) == (0, 11)  # off: the whole clip (the authors' sampling)
    assert frame_window(300, 12, 300, 1200) == (6, 6)
    assert frame_window(301, 12, 300, 1200) == (5, 7)
    assert frame_window(900, 12, 300, 1200) == (3, 9)
    windows = [frame_window(it, 12, 300, 1200) for it in range(301, 1501)]
    assert all(a[0] >= b[0] and a[1] <= b[1] for a, b in zip(windows, windows[1:]))  # only ever widens
    assert windows[-1] == (0, 11) and frame_window(1500, 12, 300, 1200) == (0, 11)
    assert frame_window(400, 2, 0, 1000) == (0, 1)  # two frames: the middle and its one neighbour
    cfg = _tiny(time_window_iters=20).with_iters(400)
    assert cfg.time_window_iters == 200 and FitConfig.from_dict(cfg.to_dict()).time_window_iters == 200


def test_fit_with_a_time_window_trains_only_frames_inside_it(tmp_path, monkeypatch):
    from stag4d_backend.fitting import trainer

    data = tmp_path / "toy5"
    write_stag4d_layout(ExampleCreature(600, seed=4), data, num_frames=5, size=24, anchor_size=24)
    windows, frames = {}, {}
    real_window, real_at = trainer.Trainer.frame_window, trainer.Trainer.gaussians_at

    def spy_window(self, it):
        windows[it] = real_window(self, it)
        return windows[it]

    def spy_at(self, t, campos=None):
        if t is not None:
            frames.setdefault(self.it + 1, set()).add(round(t * self.num_frames))
        return real_at(self, t, campos)

    monkeypatch.setattr(trainer.Trainer, "frame_window", spy_window)
    monkeypatch.setattr(trainer.Trainer, "gaussians_at", spy_at)
    cfg = _tiny(iters=40, coarse_iters=4, time_window_iters=24, batch_size=2)
    assert fit(data, tmp_path / "out", cfg).status == "finished"
    assert windows[5] == windows[16] == (1, 3) and windows[17] == windows[40] == (0, 4)
    for it, fs in frames.items():
        lo, hi = windows[it]
        assert all(lo <= f <= hi for f in fs), (it, fs, windows[it])
    assert set().union(*frames.values()) == {0, 1, 2, 3, 4}
    assert all(fs <= {1, 2, 3} for it, fs in frames.items() if it <= 16)
