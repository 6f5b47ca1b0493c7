"""Adaptive densification (densify.py): algorithm spec sections 6 and 12."""

import math

import pytest
import torch

from stag4d_backend.gaussians.densify import AdaptiveDensification, to_ndc_grad
from stag4d_backend.gaussians.model import PARAM_NAMES, GaussianModel, inverse_sigmoid


def _model(scales, opacities, seed=0):
    """Gaussians with given per-point (isotropic-ish) max scales and opacities."""
    g = torch.Generator().manual_seed(seed)
    n = len(scales)
    s = torch.as_tensor(scales, dtype=torch.float32)
    aniso = torch.stack([s, s * 0.5, s * 0.75], 1)
    return GaussianModel.from_arrays(
        xyz=torch.rand(n, 3, generator=g) - 0.5,
        f_dc=torch.rand(n, 3, generator=g),
        opacity=inverse_sigmoid(torch.as_tensor(opacities, dtype=torch.float32)),
        scaling=torch.log(aniso),
        rotation=torch.randn(n, 4, generator=g),
    )


def _set_grads(strategy, state, g, visible=None):
    """Accumulate one iteration whose mean gradient is exactly ``g`` (norm of (g, 0))."""
    g = torch.as_tensor(g, dtype=torch.float32)
    vis = g > 0 if visible is None else visible
    strategy.accumulate(state, torch.stack([g, torch.zeros_like(g)], 1), vis)


# ------------------------------------------------------------------------------------------------ threshold


def test_tau_is_the_floor_fraction_th_largest_nonzero():
    s = AdaptiveDensification()
    g = torch.rand(1500, generator=torch.Generator().manual_seed(0)) + 1e-3
    g[torch.randperm(1500, generator=torch.Generator().manual_seed(1))[:500]] = 0.0  # M = 1000 non-zero
    nz = torch.sort(g[g > 0], descending=True).values
    assert s.threshold(g) == float(nz[math.floor(0.025 * 1000)])  # index 25
    assert s.threshold(torch.tensor([0.0, 0.5, 0.0])) == 0.5  # M = 1 -> index 0
    assert s.threshold(torch.zeros(10)) is None  # M = 0 guard
    assert s.threshold(torch.tensor([float("nan"), 0.0, 0.2, 0.1])) == pytest.approx(0.2)
    for m in (1, 39, 40, 41, 79, 80, 1000):
        g = torch.arange(1, m + 1, dtype=torch.float32)
        assert s.threshold(g) == float(m - int(0.025 * m))
    assert AdaptiveDensification(threshold_mode="fixed").threshold(torch.zeros(3)) == 2e-4


def test_event_schedule():
    s = AdaptiveDensification()
    events = [it for it in range(1, 8002) if s.is_event_step(it)]
    assert events == list(range(1201, 5902, 100)) and len(events) == 48
    assert not s.is_stats_step(1199) and s.is_stats_step(1200) and s.is_stats_step(6000)
    assert not s.is_stats_step(6001)


# ------------------------------------------------------------------------------------------------ statistics


def test_accumulate_sum_then_norm_vs_per_render():
    grads = torch.tensor([[[1.0, 0], [0, 1], [1, 1]], [[-1.0, 0], [0, 1], [0, 0]]])  # [R=2, N=3, 2]
    vis = torch.tensor([[True, True, False], [True, False, False]])
    s = AdaptiveDensification()
    st = s.initialize_state()
    s.accumulate(st, grads, vis)
    assert torch.allclose(st["grad2d"], torch.tensor([0.0, 2.0, 0.0]))  # ||sum||: opposite grads cancel
    assert torch.equal(st["count"], torch.tensor([1.0, 1.0, 0.0]))
    v = AdaptiveDensification(grad_mode="per_render")
    st = v.initialize_state()
    v.accumulate(st, grads, vis)
    assert torch.allclose(st["grad2d"], torch.tensor([2.0, 1.0, 0.0]))
    assert torch.equal(st["count"], torch.tensor([2.0, 1.0, 0.0]))
    # already-summed [N, 2] input with [N] visibility
    st = s.initialize_state()
    s.accumulate(st, grads.sum(0), vis.any(0))
    s.accumulate(st, grads.sum(0), vis.any(0))
    assert torch.allclose(s.mean_grads(st, 3), torch.tensor([0.0, 2.0, 0.0]))  # 0/0 -> 0
    with pytest.raises(ValueError):
        s.accumulate(st, torch.zeros(4, 2), torch.ones(4, dtype=torch.bool))


def test_pixel_to_ndc_units():
    g = torch.tensor([[1.0, 2.0]])
    assert torch.equal(to_ndc_grad(g, 512, 256), torch.tensor([[256.0, 256.0]]))
    s = AdaptiveDensification()
    st = s.initialize_state()
    per_render = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two renders of one Gaussian
    s.accumulate(st, per_render, torch.ones(2, 1, dtype=torch.bool), image_sizes=[(512, 512), (128, 128)])
    assert torch.allclose(st["grad2d"], torch.tensor([math.hypot(256.0, 64.0)]))


def test_step_post_backward_accumulates_then_densifies():
    model = _model([0.01] * 10, [0.5] * 10)
    s = AdaptiveDensification()
    st = s.initialize_state()
    info = {"grad2d": torch.tensor([[1e-3, 0.0]] * 10), "visible": torch.ones(10, dtype=torch.bool)}
    assert s.step_post_backward(model.params, None, st, 1199, info) is None
    assert st["grad2d"] is None  # outside the window: nothing accumulated
    assert s.step_post_backward(model.params, None, st, 1200, info) is None
    assert torch.equal(st["count"], torch.ones(10))
    summary = s.step_post_backward(model.params, None, st, 1201, info)
    assert summary["step"] == 1201 and summary["num_before"] == 10
    assert summary["num_clone"] == 10  # all equal: everything >= tau, all small
    assert len(model) == 20 and st["grad2d"].shape == (20,) and float(st["grad2d"].sum()) == 0
    assert st["last_event"] is summary and st["num_events"] == 1


# ------------------------------------------------------------------------------------------------ clone / split / prune


def test_clone_split_prune_counts():
    groups = {  # name: (count, max scale, opacity, has gradient)
        "small": (100, 0.02, 0.5, True),
        "large": (60, 0.12, 0.5, True),
        "transparent": (10, 0.02, 0.005, False),
        "tiny": (10, 0.0005, 0.5, False),
        "huge": (10, 0.3, 0.5, False),
        "idle": (10, 0.02, 0.5, False),
    }
    scales, opac, has_g, labels = [], [], [], []
    for name, (k, sc, op, hg) in groups.items():
        scales += [sc] * k
        opac += [op] * k
        has_g += [hg] * k
        labels += [name] * k
    n = len(scales)
    model = _model(scales, opac)
    parent = model.state()
    gen = torch.Generator().manual_seed(3)
    g = torch.where(torch.tensor(has_g), torch.rand(n, generator=gen) + 0.01, torch.zeros(n))
    s = AdaptiveDensification(densify_fraction=0.2, seed=0)
    st = s.initialize_state()
    _set_grads(s, st, g)
    ids = torch.arange(n)
    extras = {"ids": ids.clone(), "table": torch.ones(n, dtype=torch.bool)}
    summary = s.densify_and_prune(model.params, None, st, extras=extras)

    m = 160  # non-zero gradients
    tau = float(torch.sort(g[g > 0], descending=True).values[int(0.2 * m)])
    assert summary["tau"] == pytest.approx(tau)
    sel = g >= tau
    is_small = torch.tensor([lab == "small" for lab in labels])
    is_large = torch.tensor([lab == "large" for lab in labels])
    n_clone, n_split = int((sel & is_small).sum()), int((sel & is_large).sum())
    assert n_clone > 0 and n_split > 0 and n_clone + n_split == int(0.2 * m) + 1
    assert summary["num_clone"] == n_clone and summary["num_split"] == n_split
    # prune: transparent + tiny + huge, and every *unsplit* large one (max scale 0.12 > 0.1 * extent), which is
    # the faithful rule; clones and split children (0.12 / 1.6 = 0.075) are healthy
    n_prune = 30 + (60 - n_split)
    assert summary["num_prune"] == n_prune
    assert summary["num_after"] == n + n_clone + 2 * n_split - n_split - n_prune == len(model)
    assert extras["ids"].shape == (len(model),) and bool(extras["table"].all())

    # layout: surviving originals in order, then clones, then split children (2 per parent)
    out_ids = extras["ids"]
    keep = torch.tensor([lab in ("small", "idle") for lab in labels])
    n_keep = int(keep.sum())
    assert torch.equal(out_ids[:n_keep], ids[keep])
    clone_ids = out_ids[n_keep:n_keep + n_clone]
    assert torch.equal(clone_ids, ids[sel & is_small])
    child_ids = out_ids[n_keep + n_clone:]
    split_ids = ids[sel & is_large]
    assert torch.equal(child_ids, split_ids.repeat(2))
    now = model.state()
    for name in PARAM_NAMES:  # clones are exact copies
        assert torch.equal(now[name][n_keep:n_keep + n_clone], parent[name][clone_ids])
    c = slice(n_keep + n_clone, None)
    assert torch.allclose(now["scaling"][c], parent["scaling"][child_ids] - math.log(1.6), atol=1e-6)
    assert torch.equal(now["rotation"][c], parent["rotation"][child_ids])
    assert torch.equal(now["opacity"][c], parent["opacity"][child_ids])
    # children sit at mu + R (s * n): the Mahalanobis distance in the parent's frame is |n|
    from stag4d_backend.gaussians.model import quaternion_to_rotation_matrix

    rot = quaternion_to_rotation_matrix(parent["rotation"][child_ids])
    local = (rot.transpose(1, 2) @ (now["xyz"][c] - parent["xyz"][child_ids]).unsqueeze(-1)).squeeze(-1)
    z = local / torch.exp(parent["scaling"][child_ids])
    assert float(z.norm(dim=1).max()) < 6.0 and float(z.abs().mean()) > 0.1
    assert st["grad2d"].shape == (len(model),) and float(st["count"].sum()) == 0


def test_split_children_can_be_pruned_when_still_too_big():
    # s = 0.2 > 0.16: children have 0.125 > 0.1 * extent and are pruned in the same event (faithful)
    model = _model([0.2], [0.5])
    s = AdaptiveDensification(seed=0, prune_big_scale=None)
    st = s.initialize_state()
    _set_grads(s, st, [1.0])
    summary = s.densify_and_prune(model.params, None, st)
    assert summary["num_split"] == 1 and len(model) == 2
    model = _model([0.2], [0.5])
    s = AdaptiveDensification(seed=0)
    st = s.initialize_state()
    _set_grads(s, st, [1.0])
    summary = s.densify_and_prune(model.params, None, st)
    assert summary["num_split"] == 1 and summary["num_prune_candidates"] == 2
    assert len(model) == 1  # never pruned to zero


def test_fixed_threshold_and_cap():
    model = _model([0.01] * 6, [0.5] * 6)
    s = AdaptiveDensification(threshold_mode="fixed")
    st = s.initialize_state()
    _set_grads(s, st, [1e-4, 2e-4, 3e-4, 0, 0, 5e-5])
    assert s.densify_and_prune(model.params, None, st)["num_clone"] == 2
    model = _model([0.01] * 6, [0.5] * 6)
    s = AdaptiveDensification(max_gaussians=6)
    st = s.initialize_state()
    _set_grads(s, st, [1.0] * 6)
    assert s.densify_and_prune(model.params, None, st)["num_clone"] == 0
    s = AdaptiveDensification(max_gaussians=0)  # 0 = no cap
    st = s.initialize_state()
    _set_grads(s, st, [1.0] * 6)
    assert s.densify_and_prune(model.params, None, st)["num_clone"] == 6


def test_split_is_seeded_and_state_is_saveable(tmp_path):
    outs = []
    for i in range(2):
        model = _model([0.12] * 5, [0.5] * 5)
        s = AdaptiveDensification(seed=7, densify_fraction=1.0, percent_dense=0.05)  # both events split
        st = s.initialize_state()
        _set_grads(s, st, [1.0] * 5)
        s.densify_and_prune(model.params, None, st)
        if i == 1:  # the state survives a weights-only save/load and the RNG continues
            torch.save(st, tmp_path / "st.pt")
            st = torch.load(tmp_path / "st.pt", weights_only=True)
        _set_grads(s, st, [1.0] * 10)
        assert s.densify_and_prune(model.params, None, st)["num_split"] == 10
        outs.append(model.xyz.detach().clone())
    assert outs[0].shape == (20, 3) and torch.equal(outs[0], outs[1])


# ------------------------------------------------------------------------------------------------ optimiser state


def _train_step(model, opt):
    for o in opt.values() if isinstance(opt, dict) else [opt]:
        o.zero_grad()
    loss = sum((p * (i + 1)).square().sum() for i, p in enumerate(model.params.values()))
    loss.backward()
    if isinstance(opt, dict):
        for o in opt.values():
            o.step()
    else:
        opt.step()


@pytest.mark.parametrize("layout", ["single", "dict"])
@pytest.mark.parametrize("clone_moments", ["zero", "copy"])
def test_adam_state_stays_aligned(layout, clone_moments):
    n = 40
    scales = [0.02] * 20 + [0.12] * 2 + [0.02] * 18
    opac = [0.5] * 30 + [0.001] * 5 + [0.5] * 5
    model = _model(scales, opac)
    if layout == "single":
        opt = model.make_optimizer()
        opt_of = lambda name: opt  # noqa: E731
    else:
        opt = {name: torch.optim.Adam([model.params[name]], lr=1e-3, eps=1e-15) for name in PARAM_NAMES}
        opt_of = lambda name: opt[name]  # noqa: E731
    for _ in range(2):
        _train_step(model, opt)
    old = {name: {k: v.clone() for k, v in opt_of(name).state[model.params[name]].items()} for name in PARAM_NAMES}
    g = torch.zeros(n)
    g[[1, 3, 5, 20, 21]] = 1.0  # 3 clones, 2 splits; indices 30..34 are pruned (transparent)
    s = AdaptiveDensification(densify_fraction=1.0, clone_moments=clone_moments, seed=0)
    st = s.initialize_state()
    _set_grads(s, st, g)
    extras = {"ids": torch.arange(n)}
    summary = s.densify_and_prune(model.params, opt, st, extras=extras)
    assert (summary["num_clone"], summary["num_split"], summary["num_prune"]) == (3, 2, 5)
    assert len(model) == n + 3 + 2 - 5
    ids = extras["ids"]
    n_keep = n - 2 - 5
    for name in PARAM_NAMES:
        p = model.params[name]
        o = opt_of(name)
        assert any(q is p for grp in o.param_groups for q in grp["params"])  # the optimizer holds the new tensor
        st_new = o.state[p]
        assert torch.equal(st_new["step"], old[name]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            m = st_new[key]
            assert m.shape == p.shape
            assert torch.equal(m[:n_keep], old[name][key][ids[:n_keep]])  # kept rows unchanged
            clones = m[n_keep:n_keep + 3]
            if clone_moments == "zero":
                assert float(clones.abs().sum()) == 0.0
            else:
                assert torch.equal(clones, old[name][key][ids[n_keep:n_keep + 3]])
            assert float(m[n_keep + 3:].abs().sum()) == 0.0  # split children start from zero
    if layout == "single":
        assert len(opt.state) == len(PARAM_NAMES)  # no stale entries for the replaced tensors
    _train_step(model, opt)  # shapes line up: Adam steps again
    assert all(bool(torch.isfinite(p).all()) for p in model.params.values())


def test_prune_only_keeps_moments():
    model = _model([0.02] * 8, [0.5, 0.001, 0.5, 0.001, 0.5, 0.5, 0.5, 0.5])
    opt = model.make_optimizer()
    _train_step(model, opt)
    before = opt.state[model.params["xyz"]]["exp_avg"].clone()
    s = AdaptiveDensification()
    summary = s.densify_and_prune(model.params, opt, s.initialize_state())  # no statistics at all
    assert summary["tau"] is None and summary["num_clone"] == 0 and summary["num_prune"] == 2
    keep = torch.tensor([1, 0, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    assert torch.equal(opt.state[model.params["xyz"]]["exp_avg"], before[keep])
    _train_step(model, opt)


# ------------------------------------------------------------------------------------------------ degenerate cases


def test_single_point():
    for scale, expected in ((0.02, 2), (0.12, 2)):
        model = _model([scale], [0.5])
        opt = model.make_optimizer()
        _train_step(model, opt)
        s = AdaptiveDensification(seed=0)
        st = s.initialize_state()
        _set_grads(s, st, [1e-3])
        summary = s.densify_and_prune(model.params, opt, st)
        assert len(model) == expected and summary["tau"] == pytest.approx(1e-3)
        _train_step(model, opt)


def test_never_prune_to_zero():
    model = _model([0.02] * 5, [0.001, 0.004, 0.002, 0.003, 0.0005])
    s = AdaptiveDensification()
    summary = s.densify_and_prune(model.params, None, s.initialize_state())
    assert len(model) == 1 and summary["num_prune_candidates"] == 5 and summary["num_prune"] == 4
    assert torch.sigmoid(model.opacity).item() == pytest.approx(0.004, rel=1e-4)  # the most opaque survives
    model = _model([0.02] * 5, [0.001, 0.004, 0.002, 0.003, 0.0005])
    s = AdaptiveDensification(min_gaussians=3)
    s.densify_and_prune(model.params, None, s.initialize_state())
    assert sorted(round(v, 4) for v in torch.sigmoid(model.opacity).detach().ravel().tolist()) == [0.002, 0.003,
                                                                                                   0.004]


def test_empty_and_sanity():
    model = GaussianModel(num_points=0)
    s = AdaptiveDensification()
    summary = s.densify_and_prune(model.params, None, s.initialize_state())
    assert summary["num_after"] == 0
    model = _model([0.02] * 3, [0.5] * 3)
    bad = dict(model.params)
    bad["extra"] = torch.zeros(2)
    with pytest.raises(ValueError):
        s.check_sanity(bad)
    opt = torch.optim.Adam([model.params["xyz"]])
    with pytest.raises(ValueError):
        s.check_sanity(model.params, opt)
    with pytest.raises(ValueError):
        AdaptiveDensification(grad_mode="mean")
