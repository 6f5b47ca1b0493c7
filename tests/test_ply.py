"""3DGS PLY read/write (ply.py): layout of architecture.md and algorithm spec section 7."""

import os

import numpy as np
import pytest
import torch
from plyfile import PlyData

from stag4d_backend.gaussians.model import PARAM_NAMES, GaussianModel
from stag4d_backend.gaussians.ply import load_model_ply, load_ply, ply_attribute_names, save_model_ply, save_ply


def _random_model(n, degree, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = (degree + 1) ** 2 - 1
    return GaussianModel.from_arrays(
        xyz=torch.randn(n, 3, generator=g),
        f_dc=torch.randn(n, 1, 3, generator=g),
        f_rest=torch.randn(n, k, 3, generator=g),
        opacity=torch.randn(n, 1, generator=g),
        scaling=torch.randn(n, 3, generator=g) - 4,
        rotation=torch.randn(n, 4, generator=g),
    )


@pytest.mark.parametrize("degree", [0, 1, 3])
def test_round_trip_is_exact(tmp_path, degree):
    model = _random_model(257, degree)
    path = tmp_path / "sub" / "model.ply"  # the directory is created
    save_model_ply(path, model)
    data = load_ply(path)
    assert set(data) == set(PARAM_NAMES)
    for name in PARAM_NAMES:
        assert data[name].dtype == np.float32
        assert np.array_equal(data[name], model.params[name].detach().numpy()), name
    again = load_model_ply(path)
    assert again.sh_degree == degree
    for name in PARAM_NAMES:
        assert torch.equal(again.params[name], model.params[name])
    assert [p.name for p in os.scandir(path.parent)] == ["model.ply"]  # no temp file left behind


def test_layout_matches_3dgs(tmp_path):
    model = _random_model(5, 1)
    path = tmp_path / "m.ply"
    save_model_ply(path, model)
    ply = PlyData.read(str(path))
    assert not ply.text and ply.byte_order == "<"
    assert [e.name for e in ply.elements] == ["vertex"]
    v = ply["vertex"]
    names = [p.name for p in v.properties]
    assert names == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(9)] \
        + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert names == ply_attribute_names(3)
    assert all(v[nm].dtype == np.dtype("<f4") for nm in names)
    assert np.all(v["nx"] == 0) and np.all(v["ny"] == 0) and np.all(v["nz"] == 0)
    rest = model.f_rest.detach().numpy()  # [N, K=3, 3]
    for c in range(3):  # channel-major: f_rest_{c*K + k} = coefficient k of channel c
        for k in range(3):
            assert np.array_equal(v[f"f_rest_{c * 3 + k}"], rest[:, k, c])
    assert np.array_equal(v["rot_0"], model.rotation.detach().numpy()[:, 0])  # w first, raw (unnormalised)
    assert np.array_equal(v["opacity"], model.opacity.detach().numpy()[:, 0])  # logit
    assert os.path.getsize(path) > 5 * 4 * len(names)


def test_plain_arrays_and_overwrite(tmp_path):
    n = 4
    path = tmp_path / "plain.ply"
    save_ply(path, np.zeros((n, 3)), np.ones((n, 3)), None, np.zeros(n), np.full((n, 3), -3.0),
             np.tile([1.0, 0, 0, 0], (n, 1)))
    d = load_ply(path)
    assert d["f_rest"].shape == (n, 0, 3) and d["f_dc"].shape == (n, 1, 3) and d["opacity"].shape == (n, 1)
    model = _random_model(3, 0)
    save_model_ply(path, model)  # atomic replace of an existing file
    assert load_ply(path)["xyz"].shape == (3, 3)
    with pytest.raises(ValueError):
        save_ply(path, np.zeros((n, 3)), np.ones((n, 3)))
    assert load_ply(path)["xyz"].shape == (3, 3)  # a failed write leaves the old file alone
    assert sorted(p.name for p in os.scandir(tmp_path)) == ["plain.ply"]


def test_deformed_params_can_be_saved(tmp_path):
    model = _random_model(10, 0)
    frame = dict(model.state())
    frame["xyz"] = frame["xyz"] + 1.0
    save_model_ply(tmp_path / "f.ply", None, params=frame)
    assert np.allclose(load_ply(tmp_path / "f.ply")["xyz"], model.xyz.detach().numpy() + 1.0)
