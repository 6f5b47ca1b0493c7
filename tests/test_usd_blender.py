"""The baked USD files in real Blender (bpy 5.0.1): gaussians.usdc becomes an animated point cloud whose evaluated
positions equal the per-frame PLY positions in Z-up, with the documented attributes; mesh.usdc becomes an animated
mesh with a constant vertex count; cameras.json gives Blender cameras that see what our cameras see."""

from __future__ import annotations

import json

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")
pytest.importorskip("pxr")

from bake_fixtures import mesh_fit, quat_to_matrix, small_fit, to_blender  # noqa: E402,F401
from stag4d_backend.export.frames import srgb_to_linear  # noqa: E402
from stag4d_backend.gaussians.ply import load_ply  # noqa: E402
from stag4d_backend.render.cameras import y_up_to_z_up_quats  # noqa: E402
from stag4d_backend.stages.bake import bake  # noqa: E402


@pytest.fixture(scope="module")
def baked(small_fit, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("bpybake") / "bake"
    bake(small_fit, out, formats="usd,ply,cameras")
    return out


@pytest.fixture(scope="module")
def baked_mesh(mesh_fit, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("bpymesh") / "bake"
    bake(mesh_fit, out, formats="mesh", mesh_resolution=48)
    return out


@pytest.fixture
def empty_scene():
    bpy.ops.wm.read_factory_settings(use_empty=True)
    yield bpy.context.scene
    bpy.ops.wm.read_factory_settings(use_empty=True)


def _import(path):
    assert bpy.ops.wm.usd_import(filepath=str(path)) == {"FINISHED"}


def _evaluated(obj, frame):
    scene = bpy.context.scene
    scene.frame_set(frame)
    ev = obj.evaluated_get(bpy.context.evaluated_depsgraph_get())
    return ev, ev.data


def _attr(data, name, width, prop):
    a = data.attributes[name]
    out = np.zeros(len(a.data) * width, np.float32)
    a.data.foreach_get(prop, out)
    return out.reshape(len(a.data), width) if width > 1 else out


def _world(ev, local):
    m = np.array(ev.matrix_world)
    return local @ m[:3, :3].T + m[:3, 3]


def test_gaussians_usdc_imports_as_animated_point_cloud(baked, empty_scene):
    _import(baked / "gaussians.usdc")
    assert [o.name for o in bpy.data.objects] == ["gaussians"]  # the ParticleField prim is not imported
    obj = bpy.data.objects["gaussians"]
    assert obj.type == "POINTCLOUD"
    assert [m.type for m in obj.modifiers] == ["MESH_SEQUENCE_CACHE"]
    assert (empty_scene.frame_start, empty_scene.frame_end) == (0, 3)  # the importer sets the frame range

    for frame in (0, 2, 3):
        ply = load_ply(baked / "ply" / f"{frame:04d}.ply")
        ev, data = _evaluated(obj, frame)
        types = {a.name: (a.data_type, a.domain) for a in data.attributes}
        assert types["position"] == ("FLOAT_VECTOR", "POINT")
        assert types["radius"] == ("FLOAT", "POINT")
        assert types["displayColor"] == ("FLOAT_COLOR", "POINT")
        assert types["opacity"] == ("FLOAT", "POINT") and types["displayOpacity"] == ("FLOAT", "POINT")
        assert types["scales"] == ("FLOAT_VECTOR", "POINT")
        assert types["orientations"] == ("QUATERNION", "POINT")
        assert len(data.points) == len(ply["xyz"])

        # The check: evaluated positions = per-frame PLY positions in Z-up, p_blender = (x, -z, y).
        pos = _world(ev, _attr(data, "position", 3, "vector"))
        np.testing.assert_allclose(pos, to_blender(ply["xyz"]), atol=1e-5)

        scales = np.exp(ply["scaling"])
        np.testing.assert_allclose(_attr(data, "scales", 3, "vector"), scales, rtol=1e-5)
        np.testing.assert_allclose(_attr(data, "radius", 1, "value"), scales.max(1), rtol=1e-5)
        opac = 1 / (1 + np.exp(-ply["opacity"].reshape(-1)))
        np.testing.assert_allclose(_attr(data, "opacity", 1, "value"), opac, atol=1e-6)
        rgb = np.maximum(0.5 + 0.28209479177387814 * ply["f_dc"].reshape(-1, 3), 0)
        np.testing.assert_allclose(_attr(data, "displayColor", 4, "color")[:, :3], srgb_to_linear(rgb), atol=1e-6)

        # Orientations: local (Y-up) unit quaternions; composed with the object's rotation they are the Blender
        # world orientations y_up_to_z_up_quats(q).
        q_local = _attr(data, "orientations", 4, "value")
        q_ply = ply["rotation"] / np.linalg.norm(ply["rotation"], axis=1, keepdims=True)
        np.testing.assert_allclose(np.abs(np.sum(q_local * q_ply, 1)), 1.0, atol=1e-5)
        R_world = np.array(ev.matrix_world)[:3, :3] @ quat_to_matrix(q_local)
        np.testing.assert_allclose(R_world, quat_to_matrix(y_up_to_z_up_quats(q_ply)), atol=1e-5)

    # The animation really plays: frame 3 differs from frame 0.
    a = _world(*(lambda e: (e[0], _attr(e[1], "position", 3, "vector")))(_evaluated(obj, 0)))
    b = _world(*(lambda e: (e[0], _attr(e[1], "position", 3, "vector")))(_evaluated(obj, 3)))
    assert np.abs(a - b).max() > 0.005


def test_mesh_usdc_imports_as_animated_mesh(baked_mesh, empty_scene):
    from pxr import Sdf, Usd, UsdGeom

    layer = Sdf.Layer.FindOrOpen(str(baked_mesh / "mesh.usdc"))
    layer.Reload(force=True)
    stage = Usd.Stage.Open(layer)
    usd_mesh = UsdGeom.Mesh(stage.GetPrimAtPath("/STAG4D/mesh"))
    usd_points = [np.array(usd_mesh.GetPointsAttr().Get(f)) for f in range(3)]
    num_faces = len(usd_mesh.GetFaceVertexCountsAttr().Get())
    _import(baked_mesh / "mesh.usdc")
    obj = bpy.data.objects["mesh"]
    assert obj.type == "MESH" and [m.type for m in obj.modifiers] == ["MESH_SEQUENCE_CACHE"]
    counts = set()
    previous = None
    for frame in (0, 1, 2):
        ev, data = _evaluated(obj, frame)
        counts.add((len(data.vertices), len(data.polygons)))
        pos = _world(ev, _attr(data, "position", 3, "vector"))
        np.testing.assert_allclose(pos, to_blender(usd_points[frame]), atol=1e-5)
        assert "displayColor" in data.color_attributes
        if previous is not None:
            assert np.abs(pos - previous).max() > 1e-3
        previous = pos
    assert counts == {(len(usd_points[0]), num_faces)}


def test_cameras_json_gives_matching_blender_cameras(baked, empty_scene):
    from bpy_extras.object_utils import world_to_camera_view
    from mathutils import Matrix, Vector

    cams = json.loads((baked / "cameras.json").read_text())
    pts = np.random.default_rng(0).uniform(-0.4, 0.4, (20, 3))
    for c in cams:
        data = bpy.data.cameras.new(c["name"])
        b = c["blender"]
        data.sensor_fit, data.lens_unit, data.angle = b["sensor_fit"], b["lens_unit"], b["angle"]
        cam = bpy.data.objects.new(c["name"], data)
        empty_scene.collection.objects.link(cam)
        cam.matrix_world = Matrix(b["matrix_world"])
        empty_scene.render.resolution_x, empty_scene.render.resolution_y = b["resolution"]
        bpy.context.view_layer.update()
        assert abs(data.lens - b["lens"]) < 1e-4 and abs(data.sensor_height - b["sensor_height"]) < 1e-6
        K, V = np.array(c["K"]), np.array(c["viewmat"])
        for p in pts:
            cv = K @ (V @ np.append(p, 1.0))[:3]
            u, v = cv[:2] / cv[2] / c["size"]
            ndc = world_to_camera_view(empty_scene, cam, Vector(to_blender(p)))
            np.testing.assert_allclose([ndc.x, ndc.y], [u, 1.0 - v], atol=1e-5)
