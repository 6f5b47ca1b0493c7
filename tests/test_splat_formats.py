"""The 2026 splat formats of the bake: glTF with KHR_gaussian_splatting (``gltf/{k}.glb``, ``canonical.glb``) and
Niantic SPZ version 4 (``spz/{k}.spz``). Every attribute of frame k, read back by readers other than our writers
(pygltflib + numpy, Blender's glTF importer, gsply's SPZ reader, and a small SPZ reader written here from the
format description), is compared with the PLY of frame k. Tolerances are the formats' own:

- glTF: float32 throughout; positions and SH bit-exact, quaternions = the PLY's normalised (x, y, z, w),
  scales = exp(log-scale) and opacities = sigmoid(logit) to float32 rounding; COLOR_0 to 1/65535.
- SPZ: positions to half a step of 1/4096 m; log-scales to 1/32 (steps of 1/16); alphas to 0.5/255;
  DC colour to 0.5 / (0.15 * 255); quaternions up to sign, components to ~2e-3 (9-bit smallest three);
  SH to half a bucket (degree 1: 4/128, degree 2: 8/128) plus 0.5/128.
The Khronos validator runs on the .glb files (skipped only where node is absent)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bake_fixtures import make_fit_dir, to_blender
from stag4d_backend.export.frames import SH_C0, srgb_to_linear
from stag4d_backend.export.gltf_splats import EXTENSION, sh_attribute_names
from stag4d_backend.fitted import load_fitted
from stag4d_backend.gaussians.ply import load_ply
from stag4d_backend.stages.bake import FORMATS, bake, parse_formats

REPO = Path(__file__).resolve().parents[1]
VALIDATOR = REPO / ".tools" / "node_modules" / "gltf-validator"
T, N, SH_DEGREE = 3, 300, 2


@pytest.fixture(scope="module")
def baked(tmp_path_factory):
    fit = make_fit_dir(tmp_path_factory.mktemp("splatfit") / "out", num_gaussians=N, num_frames=T, fps=10.0,
                       sh_degree=SH_DEGREE, seed=3)
    out = fit.parent / "bake"
    bake(fit, out, formats="ply,gltf,spz")
    return fit, out


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def unit_xyzw(rot_wxyz):
    q = rot_wxyz / np.linalg.norm(rot_wxyz, axis=1, keepdims=True)
    return q[:, [1, 2, 3, 0]]


# ------------------------------------------------------------------------------------------------------- glTF

def read_glb(path):
    """(document, {semantic: array}) via pygltflib; accessor data decoded here with numpy."""
    import pygltflib

    doc = pygltflib.GLTF2.load_binary(str(path))
    blob = doc.binary_blob()
    dtypes = {5126: "<f4", 5123: "<u2", 5121: "u1"}
    widths = {"SCALAR": 1, "VEC3": 3, "VEC4": 4}
    prim = doc.meshes[0].primitives[0]
    out = {}
    for name, index in prim.attributes.__dict__.items():
        if index is None:
            continue
        acc = doc.accessors[index]
        view = doc.bufferViews[acc.bufferView]
        start = (view.byteOffset or 0) + (acc.byteOffset or 0)
        arr = np.frombuffer(blob, dtypes[acc.componentType], acc.count * widths[acc.type], start)
        out[name] = arr.reshape(acc.count, widths[acc.type]) if widths[acc.type] > 1 else arr
    return doc, out


def test_bake_json_lists_the_new_formats(baked):
    _, out = baked
    manifest = json.loads((out / "bake.json").read_text())
    assert manifest["formats"]["gltf"]["files"] == [f"gltf/{k:04d}.glb" for k in range(T)] + ["canonical.glb"]
    assert manifest["formats"]["spz"]["files"] == [f"spz/{k:04d}.spz" for k in range(T)]
    assert {"gltf", "spz"} <= set(parse_formats("all")) and parse_formats("spz,gltf") == ("gltf", "spz")
    assert FORMATS.index("gltf") > FORMATS.index("ply")


def test_gltf_frames_equal_the_plys(baked):
    _, out = baked
    for k in range(T):
        ply = load_ply(out / "ply" / f"{k:04d}.ply")
        doc, a = read_glb(out / "gltf" / f"{k:04d}.glb")
        assert doc.extensionsUsed == [EXTENSION] and not doc.extensionsRequired
        prim = doc.meshes[0].primitives[0]
        assert prim.mode == 0 and prim.indices is None and prim.material is None
        assert prim.extensions[EXTENSION] == {"kernel": "ellipse", "colorSpace": "srgb_rec709_display",
                                              "projection": "perspective", "sortingMethod": "cameraDistance"}
        names = {"POSITION", "COLOR_0", f"{EXTENSION}:ROTATION", f"{EXTENSION}:SCALE", f"{EXTENSION}:OPACITY",
                 *sh_attribute_names(SH_DEGREE)}
        assert set(a) == names and len(sh_attribute_names(SH_DEGREE)) == 9  # degrees 0, 1, 2 complete
        types = {n: (doc.accessors[i].type, doc.accessors[i].componentType, bool(doc.accessors[i].normalized))
                 for n, i in prim.attributes.__dict__.items() if i is not None}
        assert types[f"{EXTENSION}:ROTATION"] == ("VEC4", 5126, False)
        assert types[f"{EXTENSION}:SCALE"] == ("VEC3", 5126, False)
        assert types[f"{EXTENSION}:OPACITY"] == ("SCALAR", 5126, False)
        assert types["COLOR_0"] == ("VEC4", 5123, True)
        pos_acc = doc.accessors[prim.attributes.POSITION]
        assert pos_acc.min == ply["xyz"].min(0).tolist() and pos_acc.max == ply["xyz"].max(0).tolist()
        assert doc.asset.extras["frame"] == k and doc.asset.extras["fps"] == 10.0
        assert doc.asset.extras["time"] == pytest.approx(k / T)

        np.testing.assert_array_equal(a["POSITION"], ply["xyz"])                     # exact
        q = a[f"{EXTENSION}:ROTATION"]
        np.testing.assert_allclose(q, unit_xyzw(ply["rotation"]), atol=2e-7)           # x, y, z, w; unit
        np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-6)
        np.testing.assert_allclose(a[f"{EXTENSION}:SCALE"], np.exp(ply["scaling"]), rtol=1e-6)  # linear
        np.testing.assert_allclose(a[f"{EXTENSION}:OPACITY"], sigmoid(ply["opacity"][:, 0]), rtol=1e-6)
        sh = np.concatenate([ply["f_dc"], ply["f_rest"]], axis=1)                     # [N, 9, 3]
        for i, name in enumerate(sh_attribute_names(SH_DEGREE)):
            np.testing.assert_array_equal(a[name], sh[:, i])                           # exact, m = -l .. l
        rgba = a["COLOR_0"] / 65535.0
        want = srgb_to_linear(np.clip(0.5 + SH_C0 * ply["f_dc"][:, 0], 0, 1))
        np.testing.assert_allclose(rgba[:, :3], want, atol=1 / 65535)
        np.testing.assert_allclose(rgba[:, 3], sigmoid(ply["opacity"][:, 0]), atol=1 / 65535)


def test_canonical_glb_is_the_fits_canonical_gaussians(baked):
    fit, out = baked
    animated, _ = load_fitted(fit)
    p = {k: v.detach().numpy() for k, v in animated.model.params.items()}
    doc, a = read_glb(out / "canonical.glb")
    assert doc.asset.extras["frame"] == "canonical"
    np.testing.assert_array_equal(a["POSITION"], p["xyz"])
    np.testing.assert_allclose(a[f"{EXTENSION}:ROTATION"], unit_xyzw(p["rotation"]), atol=2e-7)
    np.testing.assert_allclose(a[f"{EXTENSION}:SCALE"], np.exp(p["scaling"]), rtol=1e-6)


def _validate(paths):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Khronos glTF validator (npm gltf-validator) cannot run")
    assert VALIDATOR.is_dir(), "gltf-validator is missing: run bash install_scripts/install.sh"
    res = subprocess.run([node, str(REPO / "tests" / "gltf_validate.js"), *map(str, paths)], capture_output=True,
                         text=True, timeout=120, env={"NODE_PATH": str(VALIDATOR.parent), "PATH": ""})
    assert res.returncode == 0, res.stderr
    return [json.loads(line)["issues"] for line in res.stdout.splitlines()]


def test_khronos_validator(baked, tmp_path):
    """The validator (2.0.0-dev.3.10, the newest) predates KHR_gaussian_splatting: it reports the extension as
    unsupported (info) and each of its attribute semantics as an unknown name (error). Those are the only issues;
    with the extension's semantics renamed to application-specific ones (leading '_'), which it then checks like
    any attribute, the same files have no error and no warning at all."""
    import pygltflib

    _, out = baked
    files = sorted((out / "gltf").glob("*.glb")) + [out / "canonical.glb"]
    for issues in _validate(files):
        msgs = issues["messages"]
        errors = [m for m in msgs if m["severity"] == 0]
        assert issues["numWarnings"] == 0, msgs
        assert {m["code"] for m in errors} == {"MESH_PRIMITIVE_INVALID_ATTRIBUTE"}
        assert sorted(m["pointer"].rsplit("/", 1)[1] for m in errors) == sorted(
            [f"{EXTENSION}:{n}" for n in ("ROTATION", "SCALE", "OPACITY")] + sh_attribute_names(SH_DEGREE))
        assert [m["code"] for m in msgs if m["severity"] == 2] == ["UNSUPPORTED_EXTENSION"]
    renamed = []
    for f in files[:1] + files[-1:]:
        doc = pygltflib.GLTF2.load_binary(str(f))
        attrs = doc.meshes[0].primitives[0].attributes
        for name in [n for n in attrs.__dict__ if n.startswith(EXTENSION)]:
            setattr(attrs, "_" + name.replace(":", "_"), attrs.__dict__.pop(name))
        renamed.append(tmp_path / f.name)
        renamed[-1].write_bytes(b"".join(doc.save_to_bytes()))
    for issues in _validate(renamed):
        assert issues["numErrors"] == 0 and issues["numWarnings"] == 0, issues["messages"]


def test_blender_imports_the_glb_at_the_ply_positions(baked):
    bpy = pytest.importorskip("bpy")
    _, out = baked
    bpy.ops.wm.read_factory_settings(use_empty=True)
    try:
        assert bpy.ops.import_scene.gltf(filepath=str(out / "gltf" / "0002.glb")) == {"FINISHED"}
        objs = [o for o in bpy.data.objects if o.type == "MESH"]
        assert len(objs) == 1 and objs[0].name == "STAG4D"
        mesh = objs[0].data
        co = np.zeros(len(mesh.vertices) * 3, np.float32)
        mesh.vertices.foreach_get("co", co)
        world = co.reshape(-1, 3) @ np.array(objs[0].matrix_world)[:3, :3].T + np.array(objs[0].matrix_world)[:3, 3]
        ply = load_ply(out / "ply" / "0002.ply")
        assert len(mesh.vertices) == N and len(mesh.polygons) == 0  # points, not faces
        np.testing.assert_allclose(world, to_blender(ply["xyz"]), atol=1e-6)  # Y-up glTF -> Z-up Blender
        # The COLOR_0 fallback becomes the mesh's colour attribute (linear RGBA, stored as sRGB bytes).
        col = np.zeros(N * 4, np.float32)
        mesh.attributes["Color"].data.foreach_get("color", col)
        _, a = read_glb(out / "gltf" / "0002.glb")
        np.testing.assert_allclose(col.reshape(N, 4), a["COLOR_0"] / 65535.0, atol=4e-3)
    finally:
        bpy.ops.wm.read_factory_settings(use_empty=True)


# -------------------------------------------------------------------------------------------------------- SPZ

def read_spz_from_spec(path):
    """A minimal SPZ v4 reader written from the format description (README 'File Format' of nianticlabs/spz)."""
    import zstandard

    data = Path(path).read_bytes()
    magic, version, n, degree, frac, flags, nstreams, toc = struct.unpack_from("<IIIBBBBI", data, 0)
    assert data[20:32] == bytes(12)
    header = dict(magic=magic, version=version, n=n, sh_degree=degree, fractional_bits=frac, flags=flags,
                  num_streams=nstreams, toc=toc)
    dim = {0: 0, 1: 3, 2: 8, 3: 15}[degree]
    sizes = dict(positions=9 * n, alphas=n, colors=3 * n, scales=3 * n, rotations=4 * n, sh=dim * 3 * n)
    names = [k for k, v in sizes.items() if v]
    raw, off = {}, toc + 16 * nstreams
    for i, name in enumerate(names):
        csize, usize = struct.unpack_from("<QQ", data, toc + 16 * i)
        assert usize == sizes[name]
        raw[name] = np.frombuffer(zstandard.ZstdDecompressor().decompress(data[off:off + csize],
                                                                          max_output_size=usize), np.uint8)
        off += csize
    assert off == len(data)
    p = raw["positions"].reshape(n, 3, 3).astype(np.int32)
    fixed = p[..., 0] | (p[..., 1] << 8) | (p[..., 2] << 16)
    fixed = np.where(fixed & 0x800000, fixed - (1 << 24), fixed)
    comp = raw["rotations"].reshape(n, 4).astype(np.uint32)
    comp = comp[:, 0] | (comp[:, 1] << 8) | (comp[:, 2] << 16) | (comp[:, 3] << 24)
    largest = comp >> 30
    q = np.zeros((n, 4))
    for i in range(3, -1, -1):  # the smallest three sit in the low 30 bits, last component lowest
        mag, neg = (comp & 511).astype(np.float64), (comp >> 9) & 1
        val = np.where(neg == 1, -1.0, 1.0) * mag / 511 / np.sqrt(2)
        q[:, i] = np.where(largest == i, 0.0, val)
        comp = np.where(largest == i, comp, comp >> 10)
    q[np.arange(n), largest] = np.sqrt(np.maximum(0.0, 1 - (q ** 2).sum(1)))
    out = {"xyz": fixed / float(1 << frac), "quats_xyzw": q,
           "log_scales": raw["scales"].reshape(n, 3) / 16.0 - 10.0,
           "alpha": raw["alphas"] / 255.0,
           "f_dc": (raw["colors"].reshape(n, 3) / 255.0 - 0.5) / 0.15,
           "f_rest": (raw["sh"].reshape(n, dim, 3) - 128.0) / 128.0 if dim else np.zeros((n, 0, 3))}
    return header, out


def assert_quats_equal_up_to_sign(a_xyzw, b_xyzw, atol):
    sign = np.where((a_xyzw * b_xyzw).sum(1) < 0, -1.0, 1.0)[:, None]
    np.testing.assert_allclose(a_xyzw * sign, b_xyzw, atol=atol)


SH_TOL = np.array([4.5 / 128] * 3 + [8.5 / 128] * 5)[None, :, None]  # half a bucket + rounding, per coefficient


def test_spz_header_and_values_with_a_reader_from_the_spec(baked):
    _, out = baked
    for k in range(T):
        ply = load_ply(out / "ply" / f"{k:04d}.ply")
        header, d = read_spz_from_spec(out / "spz" / f"{k:04d}.spz")
        assert header == dict(magic=0x5053474E, version=4, n=N, sh_degree=SH_DEGREE, fractional_bits=12, flags=0,
                              num_streams=6, toc=32)
        assert (out / "spz" / f"{k:04d}.spz").read_bytes()[:4] == b"NGSP"
        np.testing.assert_allclose(d["xyz"], ply["xyz"], atol=0.5 / 4096 + 1e-7)
        assert_quats_equal_up_to_sign(d["quats_xyzw"], unit_xyzw(ply["rotation"]), atol=2.5e-3)
        np.testing.assert_allclose(d["log_scales"], ply["scaling"], atol=1 / 32 + 1e-6)
        np.testing.assert_allclose(d["alpha"], sigmoid(ply["opacity"][:, 0]), atol=0.5 / 255 + 1e-6)
        np.testing.assert_allclose(d["f_dc"], ply["f_dc"][:, 0], atol=0.5 / (0.15 * 255) + 1e-6)
        assert (np.abs(d["f_rest"] - ply["f_rest"]) <= SH_TOL + 1e-6).all()


def test_spz_decoded_by_gsply(baked):
    """gsply (OpsiClear, an independent implementation) reads our files to the same values."""
    gsply = pytest.importorskip("gsply", reason="gsply is a test dependency (pip install -e .[test])")
    _, out = baked
    for k in (0, T - 1):
        ply = load_ply(out / "ply" / f"{k:04d}.ply")
        g = gsply.read_spz(out / "spz" / f"{k:04d}.spz")
        assert g.means.shape == (N, 3) and g.get_sh_degree() == SH_DEGREE
        np.testing.assert_allclose(g.means, ply["xyz"], atol=0.5 / 4096 + 1e-7)
        assert_quats_equal_up_to_sign(np.asarray(g.quats)[:, [1, 2, 3, 0]], unit_xyzw(ply["rotation"]), 2.5e-3)
        np.testing.assert_allclose(g.scales, ply["scaling"], atol=1 / 32 + 1e-6)             # log-scales
        np.testing.assert_allclose(sigmoid(g.opacities.reshape(-1)), sigmoid(ply["opacity"][:, 0]),
                                   atol=0.5 / 255 + 1e-5)
        np.testing.assert_allclose(g.sh0, ply["f_dc"][:, 0], atol=0.5 / (0.15 * 255) + 1e-6)
        assert (np.abs(np.asarray(g.shN) - ply["f_rest"]) <= SH_TOL + 1e-6).all()


def test_spz_quantisation_matches_the_reference_packer():
    """Spot values computed by hand from the reference's packGaussians (C rounding, buckets, smallest three)."""
    from stag4d_backend.export.spz import pack_positions, pack_rotations, pack_sh

    assert pack_positions(np.array([[1.0, -1.0, 0.5 / 4096]])) == bytes([0, 16, 0, 0, 240, 255, 1, 0, 0])
    # the identity (w = 1 largest, index 3) and a 90-degree turn about z (x, y, z, w) = (0, 0, .7071, .7071)
    ident = struct.unpack("<I", pack_rotations(np.array([[1.0, 0, 0, 0]])))[0]
    assert ident == 3 << 30
    turn = struct.unpack("<I", pack_rotations(np.array([[np.sqrt(0.5), 0, 0, np.sqrt(0.5)]])))[0]
    assert turn >> 30 == 2 and (turn & 1023) == 511  # z is the first maximum; w stored, positive, full magnitude
    sh = pack_sh(np.array([[[0.1, -0.1, 1.5]] * 3 + [[0.1, -0.1, -2.0]]]))
    # 0.1 -> 13 + 128 = 141 -> bucket 8: 144; -0.1 -> 115 -> 112; 1.5 -> 320 -> 255; degree 2 bucket 16: 141 -> 144
    assert list(sh[:3]) == [144, 112, 255] and list(sh[9:]) == [144, 112, 0]


def test_spz_refuses_positions_out_of_range():
    from stag4d_backend.export.spz import pack_positions

    with pytest.raises(ValueError, match="2048 m"):
        pack_positions(np.array([[0.0, 3000.0, 0.0]]))


def test_stale_gltf_outputs_are_removed_with_their_canonical_glb(tmp_path):
    fit = make_fit_dir(tmp_path / "fit", num_gaussians=60, num_frames=2, fps=8.0)
    out = tmp_path / "bake"
    bake(fit, out, formats="gltf,spz")
    assert (out / "canonical.glb").is_file() and len(list((out / "gltf").iterdir())) == 2
    res = bake(fit, out, formats="ply", frames=3)  # another frame count: the glTF and SPZ files are stale
    assert not (out / "gltf").exists() and not (out / "canonical.glb").exists() and not (out / "spz").exists()
    assert {p.name for p in res.removed} == {"gltf", "canonical.glb", "spz"}
    assert set(json.loads((out / "bake.json").read_text())["formats"]) == {"ply", "cameras"}


def test_server_job_options_accept_the_new_formats():
    from pydantic import ValidationError

    from stag4d_backend.server.schemas import JobOptions

    assert JobOptions(formats="usd, gltf,spz").formats == "usd,gltf,spz"
    assert JobOptions(formats=["gltf", "spz"]).formats == "gltf,spz"
    with pytest.raises(ValidationError, match="unknown format 'glb'"):
        JobOptions(formats="usd,glb")
