"""Stray Gaussians: a Gaussian the deformation field pushes out of every training view at some time must not
survive as a floater (fitting/in_view.py; docs/fitting.md "Every Gaussian inside every view")."""

import dataclasses

import pytest
import torch

from stag4d_backend.config import get_preset
from stag4d_backend.dataset import load_frames
from stag4d_backend.example_scene import ExampleCreature, write_stag4d_layout
from stag4d_backend.fitting.in_view import TrainingViews, silhouette_distance
from stag4d_backend.fitting.trainer import Trainer

FAR = 1.7  # floaters: farther than 1.7 object radii from the centre at some frame


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_overshoot_is_zero_inside_every_view_and_pulls_a_far_point_back():
    views = TrainingViews.for_fit(2.0, 49.1)
    inside = torch.tensor([[0.0, 0.0, 0.0], [0.3, -0.2, 0.25]])
    assert torch.equal(views.overshoot(inside), torch.zeros(7, 2))
    far = torch.tensor([[0.0, 4.0, 0.0], [6.0, 0.5, -1.0]], requires_grad=True)
    assert views.outside_any(far).all()
    # (0, 4, 0): 4 - 2 tan(49.1 / 2) above the front camera's pyramid, in units of its distance 2.
    front = views.overshoot(far.detach())[0, 0]
    assert front == pytest.approx((4.0 - 2.0 * torch.tan(torch.deg2rad(torch.tensor(24.55))).item()) / 2.0, rel=1e-4)
    # Gradient descent on the loss alone brings both points inside every view; an inside point gets no gradient.
    opt = torch.optim.Adam([far], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        views.loss(far).backward()
        opt.step()
    assert views.overshoot(far.detach()).max().item() < 0.05  # within 0.1 world units of every view (Adam jitter)
    assert far.detach().norm(dim=1).max().item() < 1.3
    p = inside.clone().requires_grad_(True)
    views.loss(p).backward()
    assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy4")
    creature = ExampleCreature(1500, seed=3)
    write_stag4d_layout(creature, root, num_frames=4, size=32, anchor_size=32)
    means = torch.stack([creature.at(f / 4).means for f in range(4)])  # [F, N, 3]
    centre = 0.5 * (means.amin((0, 1)) + means.amax((0, 1)))
    radius = (means - centre).norm(dim=-1).max().item()
    return load_frames(root, 32, 32), centre, radius


def _push_out(trainer: Trainer, index: int, frame: int, target: torch.Tensor, shrink: float = 0.0) -> None:
    """Teach the (real) deformation field to carry Gaussian ``index`` to ``target`` at ``frame`` (and to shrink
    its log-scales by ``shrink`` there) while the others and the other frames stay where they are: a floater at
    one time, built directly."""
    net, xyz = trainer.deformation, trainer.model.params["xyz"].detach()
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    F = trainer.num_frames
    for _ in range(300):
        opt.zero_grad()
        d = [net.deltas(xyz, f / F) for f in range(F)]
        dx, ds = torch.stack([x for x, _, _ in d]), torch.stack([s for _, s, _ in d])  # [F, N, 3] each
        want, want_s = torch.zeros_like(dx), torch.zeros_like(ds)
        want[frame, index] = target - xyz[index]
        want_s[frame, index] = -shrink
        weight = torch.ones(F, xyz.shape[0], 1)
        weight[frame, index] = 100.0
        (weight * ((dx - want) ** 2 + (ds - want_s) ** 2)).sum().backward()
        opt.step()
    # Adam's moments of the construction must not leak into the fit.
    trainer.optimizer = trainer._make_optimizer()


def _floaters(trainer: Trainer, centre, radius) -> torch.Tensor:
    with torch.no_grad():
        op = torch.sigmoid(trainer.model.params["opacity"]).reshape(-1)
        far = torch.zeros_like(op, dtype=torch.bool)
        for f in range(trainer.num_frames):
            means = trainer.gaussians_at(f / trainer.num_frames).means
            far |= (means - centre).norm(dim=1) > FAR * radius
        return far & (op > 0.05)


@pytest.mark.parametrize("lambda_in_view", [0.0, None])
def test_a_gaussian_pushed_out_of_every_view_at_one_frame_does_not_survive(toy_data, lambda_in_view):
    data, centre, radius = toy_data
    cfg = get_preset("tiny")
    if lambda_in_view is not None:  # None: the preset's own values (the fix); 0: the control without either term
        cfg = dataclasses.replace(cfg, lambda_in_view=lambda_in_view, lambda_in_silhouette=0.0)
    cfg = dataclasses.replace(cfg, iters=160, coarse_iters=10, densify=dataclasses.replace(
        cfg.densify, refine_start=1000, refine_stop=1000))  # no densification: follow one Gaussian by index
    torch.manual_seed(0)
    trainer = Trainer(cfg, data)
    for _ in range(cfg.coarse_iters):
        trainer.step()
    op = torch.sigmoid(trainer.model.params["opacity"].detach()).reshape(-1)
    index = int(torch.argmax(op))  # the most opaque Gaussian: it certainly counts as visible
    _push_out(trainer, index, frame=3, target=torch.tensor([0.0, 4.0, 0.0]))
    pushed = trainer.gaussians_at(3 / 4).means.detach()
    assert trainer.training_views.outside_all(pushed[index : index + 1]).item()
    assert (pushed[index] - centre).norm() > 4 * radius
    assert _floaters(trainer, centre, radius)[index]

    while trainer.it < cfg.iters:
        trainer.step()
    floaters = _floaters(trainer, centre, radius)
    at_frame_3 = trainer.gaussians_at(3 / 4).means.detach()[index]
    if lambda_in_view == 0.0:
        # Without the term nothing reaches it at frame 3: it is still out there (the test can fail).
        assert floaters[index] and (at_frame_3 - centre).norm() > 2 * radius
    else:
        assert cfg.lambda_in_view > 0
        assert not floaters.any(), int(floaters.sum())
        assert not trainer.training_views.outside_any(at_frame_3[None], tolerance=0.05).item()


def test_bake_reports_gaussians_outside_every_view_and_removes_nothing(tmp_path):
    import json

    from bake_fixtures import creature_model, moving_deformation

    from stag4d_backend.fitted import save_fitted
    from stag4d_backend.gaussians.ply import load_ply
    from stag4d_backend.stages.bake import bake

    model = creature_model(200, seed=0)
    with torch.no_grad():
        model.params["xyz"][:3] = torch.tensor([[0.0, 4.0, 0.0], [6.0, 0.5, -1.0], [0.0, -5.0, 0.2]])
        model.params["opacity"][2] = -8.0  # nearly transparent: not counted
    save_fitted(tmp_path / "fit", model, moving_deformation(0, 0.02), {"num_frames": 3, "fps": 12.0})
    res = bake(tmp_path / "fit", tmp_path / "bake", formats="ply")
    manifest = json.loads((tmp_path / "bake" / "bake.json").read_text())
    assert manifest["out_of_view"]["count"] == 2 and manifest["out_of_view"]["frames"] == [2, 2, 2]
    assert res.out_of_view["count"] == 2 and "2 outside every training view" in res.summary()
    assert load_ply(tmp_path / "bake" / "ply" / "0002.ply")["xyz"].shape[0] == 200  # reported, not removed


def test_off_silhouette_counts_views_where_the_centre_is_on_background():
    views = TrainingViews.for_fit(2.0, 49.1)
    full, empty = torch.ones(32, 32), torch.zeros(32, 32)
    disc = torch.zeros(32, 32)
    disc[12:20, 12:20] = 1.0  # the object: a small square in the middle of every view
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.7], [0.0, 4.0, 0.0]])
    assert views.off_silhouette(pts, [full] * 7).tolist() == [0, 0, 7]  # (0, 4, 0) is outside every image
    assert views.off_silhouette(pts, [empty] * 7).tolist() == [7, 7, 7]
    # (0, 0, 0.7) is on the front camera's axis (on the square) but off it from every anchor pose.
    assert views.off_silhouette(pts, [disc] * 7, margin=0.0).tolist() == [0, 6, 7]


def test_stray_gaussians_are_not_densified_and_are_pruned():
    from stag4d_backend.gaussians.densify import AdaptiveDensification
    from stag4d_backend.gaussians.model import GaussianModel

    def event(prune_stray):
        model = GaussianModel.init_random_ball(20, 0.3, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model.params["scaling"].fill_(-4.0)  # small: densified by cloning
            model.params["opacity"].fill_(2.0)
        strategy = AdaptiveDensification(refine_start=1, refine_stop=10, refine_every=1, event_offset=0,
                                         densify_fraction=0.5, prune_small_scale=None)
        state = strategy.initialize_state(20)
        grads = torch.zeros(20, 2)
        grads[:4] = 1.0  # the four with the largest gradients: candidates for cloning
        stray = torch.zeros(20, dtype=torch.bool)
        stray[:2] = True
        xyz0 = model.params["xyz"].detach().clone()
        out = strategy.step_post_backward(model.params, None, state, 1, info={
            "grad2d": grads, "visible": torch.ones(20, dtype=torch.bool), "stray": stray, "prune_stray": prune_stray})
        return out, model.params["xyz"].detach(), xyz0

    out, xyz, xyz0 = event(True)
    assert out["num_clone"] == 2 and out["num_stray"] == 2 and out["num_after"] == 20  # 20 + 2 clones - 2 strays
    kept = {tuple(p) for p in xyz.tolist()}
    assert tuple(xyz0[0].tolist()) not in kept and tuple(xyz0[1].tolist()) not in kept
    assert sum(tuple(p) == tuple(xyz0[2].tolist()) for p in xyz.tolist()) == 2  # the non-stray one was cloned
    out, xyz, xyz0 = event(False)  # early events: strays kept, but not copied
    assert out["num_clone"] == 2 and out["num_after"] == 22
    assert sum(tuple(p) == tuple(xyz0[0].tolist()) for p in xyz.tolist()) == 1


def test_an_unaligned_fit_is_not_pruned_away_by_the_silhouette_check(toy_data):
    """Strays are pruned only while they are outliers: a fit whose Gaussians are largely off the silhouettes (a
    random ball at step 2) keeps them (only their densification is held back)."""
    data, _, _ = toy_data

    def first_event(max_fraction):
        cfg = get_preset("tiny")
        cfg = dataclasses.replace(cfg, stray_min_views=2, stray_prune_from=0.0, iters=40, coarse_iters=1,
                                  stray_prune_max_fraction=max_fraction,
                                  densify=dataclasses.replace(cfg.densify, refine_start=2, refine_stop=2,
                                                              refine_every=1, event_offset=0))
        trainer = Trainer(cfg, data)
        events = [s["densify"] for s in (trainer.step(), trainer.step()) if "densify" in s]
        assert len(events) == 1
        return events[0], trainer.model.num_points

    kept, _ = first_event(0.05)      # the default bound
    pruned, _ = first_event(1.0)     # no bound: every stray goes
    assert kept["num_stray"] == pruned["num_stray"] > 0.2 * kept["num_before"]
    # Every stray that no other rule prunes (some are also too large) survives with the bound, none without it.
    saved = kept["num_after"] - pruned["num_after"]
    assert 0.1 * kept["num_before"] < saved <= kept["num_stray"]
    assert pruned["num_prune"] - kept["num_prune"] == saved


def test_silhouette_loss_is_zero_on_the_object_and_pulls_a_parked_point_onto_it():
    views = TrainingViews.for_fit(2.0, 49.1)
    square = torch.zeros(64, 64)
    square[24:40, 24:40] = 1.0  # the object: a square in the middle of every view (half-side 0.125 of the image)
    maps = torch.stack([silhouette_distance(square, 0.0)] * 7)
    assert maps[0, 32, 32] == 0 and maps[0, 32, 0] == pytest.approx(24 / 64)  # in units of the image side
    assert torch.equal(silhouette_distance(torch.zeros(64, 64), 0.02), torch.zeros(64, 64))  # no matte: no pull
    on = torch.tensor([[0.0, 0.0, 0.0], [0.05, -0.05, 0.02]], requires_grad=True)
    views.silhouette_loss(on, maps).backward()
    assert torch.equal(on.grad, torch.zeros_like(on))
    # Above the object, inside every image (so the in_view loss is 0 there) but off every silhouette.
    parked = torch.tensor([[0.0, 0.7, 0.0]], requires_grad=True)
    assert torch.equal(views.overshoot(parked.detach()), torch.zeros(7, 1))
    assert views.off_silhouette(parked.detach(), [square] * 7, margin=0.0).item() == 7
    opt = torch.optim.Adam([parked], lr=0.02)
    for _ in range(200):
        opt.zero_grad()
        views.silhouette_loss(parked, maps).backward()
        opt.step()
    assert views.off_silhouette(parked.detach(), [square] * 7, margin=0.03).item() == 0
    assert parked.detach().norm().item() < 0.35


@pytest.mark.parametrize("lambda_in_silhouette", [0.0, None])
def test_the_silhouette_term_reaches_the_field_at_the_trained_frame(toy_data, lambda_in_silhouette):
    """The squashing ball's floaters: the field hides a Gaussian at a frame by shrinking it to nothing and parking
    it beside the object, inside every image, where no photometric loss and no in_view loss sees it. Here the
    photometric terms and the field's regulariser are off, so only the silhouette term can bring it back: through the deformation field, at the
    frame the step trains (the control without the term leaves it parked: the test can fail)."""
    data, centre, radius = toy_data
    cfg = get_preset("tiny")
    cfg = dataclasses.replace(cfg, iters=160, coarse_iters=10, lambda_rgb=0.0, lambda_alpha=0.0,
                              lambda_anchor_rgb=0.0, lambda_anchor_alpha=0.0,
                              deformation=dataclasses.replace(cfg.deformation, plane_tv_weight=0.0,
                                                              time_smoothness_weight=0.0, l1_time_planes_weight=0.0),
                              densify=dataclasses.replace(
                                  cfg.densify, refine_start=1000, refine_stop=1000))  # follow one Gaussian by index
    if lambda_in_silhouette is not None:  # None: the preset's own value (the fix); 0: the control without it
        cfg = dataclasses.replace(cfg, lambda_in_silhouette=lambda_in_silhouette)
    torch.manual_seed(0)
    trainer = Trainer(cfg, data)
    for _ in range(cfg.coarse_iters):
        trainer.step()
    op = torch.sigmoid(trainer.model.params["opacity"].detach()).reshape(-1)
    index = int(torch.argmin((op - 0.15).abs()))  # as faint as the ball's floaters (median opacity 0.15)
    # 1.85 radii out on a diagonal: inside the image of every training view, off the object in most of them.
    target = centre + 1.85 * radius * torch.tensor([1.0, 1.0, 1.0]) / 3 ** 0.5
    _push_out(trainer, index, frame=3, target=target, shrink=8.0)
    pushed = trainer.gaussians_at(3 / 4)
    assert not trainer.training_views.outside_any(pushed.means.detach()[index: index + 1]).item()
    assert pushed.scales.detach()[index].max() < 1e-3
    assert _floaters(trainer, centre, radius)[index]

    while trainer.it < cfg.iters:
        trainer.step()
    at_frame_3 = trainer.gaussians_at(3 / 4).means.detach()[index]
    if lambda_in_silhouette == 0.0:
        assert _floaters(trainer, centre, radius)[index] and (at_frame_3 - centre).norm() > 1.7 * radius
    else:
        assert cfg.lambda_in_silhouette > 0
        assert not _floaters(trainer, centre, radius)[index]
        assert trainer.silhouette_views.off_silhouette(at_frame_3[None], [
            data.ref_mask[3]] + [data.anchor_mask[3, k] for k in range(6)], margin=0.05).item() <= 1
