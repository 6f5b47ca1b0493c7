"""The Blender add-on in real Blender (bpy 5.0.1), without a server: packaging, register/unregister, importing a
baked job (positions, frame range, fps, the splat display), the Cycles render against the backend's own render,
live-preview replacement, export, and the panel drawn with a stand-in layout (Panel.draw never runs headless)."""

from __future__ import annotations

import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")
pytest.importorskip("pxr")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import blender_addon  # noqa: E402
from blender_addon import panel, splat_nodes, state  # noqa: E402
from bake_fixtures import make_fit_dir, quat_to_matrix, splat_bound, to_blender  # noqa: E402
import bake_fixtures  # noqa: E402
from stag4d_backend.gaussians.ply import load_ply  # noqa: E402
from stag4d_backend.render.cameras import y_up_to_z_up_quats  # noqa: E402
from stag4d_backend.stages.bake import bake  # noqa: E402

N = 1500  # Gaussians of the test job: enough for a closed silhouette at 128 px, quick to render
ADDON_CLASSES = [c.__name__ for c in blender_addon._classes]


def _registered() -> list[str]:
    """Names of the add-on's classes Blender knows (operators and panels also by their bpy.types name)."""
    out = []
    for cls in blender_addon._classes:
        if cls.is_registered:
            out.append(cls.__name__)
        else:
            assert not hasattr(bpy.types, cls.__name__) or cls.__name__.endswith(("Item", "Settings"))
    return out


@pytest.fixture(scope="module")
def addon():
    if not _registered():
        blender_addon.register()
    yield blender_addon
    # Leave it registered for other modules of the session; they register idempotently via this check.


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory) -> Path:
    """A finished job folder: model/ (1500 Gaussians, 4 frames at 12 fps) and bake/ (usd, ply, gltf, spz, mesh,
    cameras)."""
    job = tmp_path_factory.mktemp("addonjob") / "job"
    make_fit_dir(job / "model", num_gaussians=N, num_frames=4, fps=12.0)
    bake(job / "model", job / "bake", formats="usd,ply,gltf,spz,mesh,cameras", mesh_resolution=40)
    return job


def clean_scene():
    """Empty the file without read_factory_settings (which would also reset the add-on preferences)."""
    state.stop_all(stop_server=False)
    for coll in (bpy.data.objects, bpy.data.collections, bpy.data.meshes, bpy.data.pointclouds,
                 bpy.data.cache_files, bpy.data.materials, bpy.data.node_groups, bpy.data.cameras):
        bpy.data.batch_remove(list(coll))
    for scene in bpy.data.scenes:
        scene.stag4d.jobs.clear()
        scene.frame_set(1)
    state.STATUS.update(text="", error=False, busy=False, url="")
    state.INFO.clear()


@pytest.fixture
def scene(addon):
    clean_scene()
    yield bpy.context.scene
    clean_scene()


# ---- packaging and registration ----------------------------------------------------------------------------

def test_build_zip_is_a_valid_extension(tmp_path):
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, str(REPO / "install_scripts" / "build_addon.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    zips = list(tmp_path.glob("stag4d_blender-*.zip"))
    assert len(zips) == 1
    names = zipfile.ZipFile(zips[0]).namelist()
    assert "blender_manifest.toml" in names and "__init__.py" in names  # at the zip's root
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert "Blender's validator" in out.stdout  # bpy's own extension tool accepted it
    assert time.perf_counter() - t0 < 20


def test_build_rejects_bad_manifest_and_foreign_imports(tmp_path):
    sys.path.insert(0, str(REPO / "install_scripts"))
    import build_addon

    good = {"schema_version": "1.0.0", "id": "stag4d_blender", "version": "0.1.0", "name": "STAG4D",
            "tagline": "Animated 3D Gaussians", "maintainer": "x", "type": "add-on",
            "blender_version_min": "4.2.0", "license": ["SPDX:GPL-3.0-or-later"], "permissions": {"network": "Talk"}}
    build_addon.validate_manifest(good)
    for bad in ({"tagline": "Ends with a full stop."}, {"blender_version_min": "4.1.0"}, {"id": "Bad-Id"},
                {"permissions": {"gpu": "x"}}, {"license": ["GPL"]}, {"tagline": "x" * 65}):
        with pytest.raises(build_addon.ManifestError):
            build_addon.validate_manifest(dict(good, **bad))
    src = tmp_path / "addon"
    src.mkdir()
    (src / "__init__.py").write_text("import torch\n")
    with pytest.raises(build_addon.ManifestError, match="torch"):
        build_addon.check_imports(src)
    build_addon.check_imports(REPO / "blender_addon")  # the real add-on: stdlib, bpy, numpy only


def test_register_unregister_register_leaves_nothing_behind():
    if _registered():
        blender_addon.unregister()
    assert _registered() == []
    handlers_before = len(bpy.app.handlers.load_post)  # the add-on's handler is not among them now
    blender_addon.register()
    assert _registered() == list(ADDON_CLASSES)
    assert hasattr(bpy.types.Scene, "stag4d") and bpy.app.timers.is_registered(state.timer)
    blender_addon.unregister()
    assert _registered() == [] and not hasattr(bpy.types.Scene, "stag4d")
    assert not bpy.app.timers.is_registered(state.timer)
    assert blender_addon._on_load not in bpy.app.handlers.load_post
    assert len(bpy.app.handlers.load_post) == handlers_before
    blender_addon.register()
    assert _registered() == list(ADDON_CLASSES)
    assert bpy.app.handlers.load_post[:].count(blender_addon._on_load) == 1
    assert "generate" in dir(bpy.ops.stag4d) and "import_job" in dir(bpy.ops.stag4d)


def test_enable_disable_through_blenders_addon_system():
    import addon_utils

    if _registered():
        blender_addon.unregister()
    try:
        mod = addon_utils.enable("blender_addon", default_set=True, handle_error=None)
        assert mod is not None and _registered() == list(ADDON_CLASSES)
        prefs = bpy.context.preferences.addons["blender_addon"].preferences
        assert prefs.backend == "LOCAL" and prefs.default_preset == "preview"
        from blender_addon.preferences import get_prefs

        assert get_prefs() == prefs
        for backend in ("LOCAL", "REMOTE"):  # the preferences page draws (with a stand-in layout)
            prefs.backend = backend
            log = []
            view = type("PrefsView", (), {"layout": Layout(log), "__getattr__": lambda s, k: getattr(prefs, k)})()
            type(prefs).draw(view, bpy.context)
            assert ("prop", "remote_token" if backend == "REMOTE" else "python_path", None) in log
        prefs.backend = "LOCAL"
        addon_utils.disable("blender_addon", default_set=True)
        assert _registered() == []
        addon_utils.enable("blender_addon", default_set=True)
        assert _registered() == list(ADDON_CLASSES)
    finally:
        addon_utils.disable("blender_addon", default_set=True)
        blender_addon.register()


# ---- import ------------------------------------------------------------------------------------------------

def _rodrigues(rotvec: np.ndarray) -> np.ndarray:
    """Rotation matrices of rotation vectors (axis x angle)."""
    angle = np.linalg.norm(rotvec, axis=1)
    axis = rotvec / np.maximum(angle, 1e-12)[:, None]
    K = np.zeros((len(rotvec), 3, 3))
    K[:, 0, 1], K[:, 0, 2], K[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    K -= K.transpose(0, 2, 1)
    s, c = np.sin(angle)[:, None, None], np.cos(angle)[:, None, None]
    return np.eye(3) + s * K + (1 - c) * K @ K


def _instances(obj):
    """World matrices of the evaluated splat instances of ``obj``, in point order."""
    dg = bpy.context.evaluated_depsgraph_get()
    out = []
    for inst in dg.object_instances:
        if inst.is_instance and inst.parent is not None and inst.parent.original == obj:
            out.append((inst.persistent_id[1], np.array(inst.matrix_world)))
    out.sort(key=lambda x: x[0])
    return np.stack([m for _, m in out])


def test_the_tests_copy_of_the_splat_bound_constants_is_current():
    assert (bake_fixtures.SPLAT_EXTENT, bake_fixtures.SPLAT_MIN_OPACITY, bake_fixtures.QUAD_MARGIN,
            bake_fixtures.PERSPECTIVE_MARGIN, bake_fixtures.SLANT_LIMIT) == (
        splat_nodes.DEFAULT_EXTENT, splat_nodes.DEFAULT_MIN_OPACITY, splat_nodes.QUAD_MARGIN,
        splat_nodes.PERSPECTIVE_MARGIN, splat_nodes.SLANT_LIMIT)


def test_import_job_puts_animated_splats_on_the_timeline(scene, job_dir):
    assert bpy.ops.stag4d.import_job(directory=str(job_dir)) == {"FINISHED"}
    item = scene.stag4d.jobs[0]
    obj = item.gaussians
    assert obj.type == "POINTCLOUD" and item.state == "finished" and item.collection.name.startswith("STAG4D")
    assert [m.type for m in obj.modifiers] == ["MESH_SEQUENCE_CACHE", "NODES"]
    assert obj.modifiers[-1].name == "Gaussian splats"
    # Frame range and fps from bake.json (4 frames at 12 fps).
    assert (scene.frame_start, scene.frame_end) == (0, 3)
    assert scene.render.fps / scene.render.fps_base == pytest.approx(12.0)

    previous = None
    for frame in (0, 2, 3):
        ply = load_ply(job_dir / "bake" / "ply" / f"{frame:04d}.ply")
        opacity = 1 / (1 + np.exp(-ply["opacity"].reshape(-1)))
        keep = opacity > splat_nodes.DEFAULT_MIN_OPACITY  # the display skips invisible Gaussians
        scene.frame_set(frame)
        mats = _instances(obj)
        assert len(mats) == keep.sum() > 0.7 * N
        # The issue's check: evaluated positions = the per-frame PLY positions in Z-up, p = (x, -z, y).
        np.testing.assert_allclose(mats[:, :3, 3], to_blender(ply["xyz"][keep]), atol=1e-5)
        # Each splat's axes: the Gaussian's rotation in Z-up times its linear sigmas.
        q = ply["rotation"][keep] / np.linalg.norm(ply["rotation"][keep], axis=1, keepdims=True)
        # ... widened by the 0.3 px^2 blur at the point's distance to the scene camera (whatever camera and
        # resolution the scene has: the origin when there is none), as splat_nodes._blurred_scales does.
        cam = np.zeros(3) if scene.camera is None else np.array(scene.camera.matrix_world)[:3, 3]
        cam_obj = (np.linalg.inv(np.array(obj.matrix_world)) @ np.append(cam, 1.0))[:3]
        blur = splat_nodes.get_modifier_input(obj, "Pixel Angle") * np.linalg.norm(ply["xyz"][keep] - cam_obj, axis=1)
        sigma = np.sqrt(np.exp(ply["scaling"][keep]) ** 2 + splat_nodes.BLUR_PX2 * blur[:, None] ** 2)
        expected = quat_to_matrix(y_up_to_z_up_quats(q)) * sigma[:, None, :]
        # The instance is a square parallel to the image plane: the camera's rotation (one for all) times the box
        # that bounds the splat. The material's frame (rotation vector R^-1 F, 1 / sigma) takes offsets in the
        # camera's space to the Gaussian's: camera rotation x Rot^-1 x diag(sigma) are the Gaussian's axes.
        evaluated = obj.evaluated_get(bpy.context.evaluated_depsgraph_get())
        geometry = evaluated.evaluated_geometry()  # kept alive while its point cloud is read
        geo = geometry.instances_pointcloud()
        rotvec, inv_sigma = (np.array([a.vector for a in geo.attributes[n].data])
                             for n in (splat_nodes.ROTVEC_ATTR, splat_nodes.INV_SIGMA_ATTR))
        bound = np.linalg.norm(mats[:, :3, :3], axis=1)
        camera_rot = mats[:, :3, :3] / bound[:, None, :]
        np.testing.assert_allclose(camera_rot, np.broadcast_to(camera_rot[0], camera_rot.shape), atol=1e-5)
        np.testing.assert_allclose(camera_rot @ _rodrigues(rotvec).transpose(0, 2, 1) / inv_sigma[:, None, :],
                                   expected, atol=1e-5)
        # The bound: the footprint's box for the splat's slant and opacity (the renders show it hides nothing).
        np.testing.assert_allclose(bound, splat_bound(expected, mats[:, :3, 3], opacity[keep], cam, camera_rot[0]),
                                   rtol=1e-4)
        if previous is not None:  # scrubbing moves them
            assert np.abs(mats[:, :3, 3] - previous).max() > 1e-3
        previous = mats[:, :3, 3]


def test_points_display_toggle_and_mesh_option(scene, job_dir):
    assert bpy.ops.stag4d.import_job(directory=str(job_dir), mesh=True, points=True) == {"FINISHED"}
    item = scene.stag4d.jobs[0]
    obj, mesh = item.gaussians, item.mesh
    assert mesh is not None and mesh.type == "MESH" and mesh.name in item.collection.objects
    scene.frame_set(1)
    dg = bpy.context.evaluated_depsgraph_get()
    ev = obj.evaluated_get(dg)
    assert ev.data.__class__.__name__ == "PointCloud" and not _has_instances(obj)
    ply = load_ply(job_dir / "bake" / "ply" / "0001.ply")
    pos = np.zeros(len(ev.data.points) * 3, np.float32)
    ev.data.attributes["position"].data.foreach_get("vector", pos)
    world = pos.reshape(-1, 3) @ np.array(ev.matrix_world)[:3, :3].T
    np.testing.assert_allclose(world, to_blender(ply["xyz"]), atol=1e-5)
    radius = np.zeros(len(ev.data.points), np.float32)
    ev.data.attributes["radius"].data.foreach_get("value", radius)
    np.testing.assert_allclose(radius, np.exp(ply["scaling"]).max(1), rtol=1e-5)
    assert [m.name for m in ev.data.materials] == [splat_nodes.POINTS_MATERIAL]
    splat_nodes.set_points_display(obj, False)
    assert _has_instances(obj)
    # The mesh follows the timeline too (constant vertex count, moving vertices).
    counts, firsts = set(), []
    for f in (0, 3):
        scene.frame_set(f)
        me = mesh.evaluated_get(bpy.context.evaluated_depsgraph_get()).data
        counts.add(len(me.vertices))
        firsts.append(np.array(me.vertices[0].co))
    assert len(counts) == 1 and np.abs(firsts[0] - firsts[1]).max() > 0


def _has_instances(obj) -> bool:
    dg = bpy.context.evaluated_depsgraph_get()
    return any(i.is_instance and i.parent is not None and i.parent.original == obj for i in dg.object_instances)


def test_import_rejects_a_folder_without_a_bake(scene, tmp_path):
    with pytest.raises(RuntimeError, match="no bake/gaussians.usdc"):
        bpy.ops.stag4d.import_job(directory=str(tmp_path))
    assert len(scene.stag4d.jobs) == 0 and not bpy.data.objects


def test_splat_node_group_is_rebuilt_once_and_survives_save(scene, job_dir, tmp_path):
    bpy.ops.stag4d.import_job(directory=str(job_dir))
    bpy.ops.stag4d.import_job(directory=str(job_dir))
    assert len([g for g in bpy.data.node_groups if g.name.startswith(splat_nodes.GROUP_NAME)]) == 1
    ng = bpy.data.node_groups[splat_nodes.GROUP_NAME]
    assert ng.use_fake_user and ng["stag4d_version"] == splat_nodes.VERSION
    names = {i.name for i in ng.interface.items_tree if getattr(i, "in_out", "") == "INPUT"}
    assert {"Points", "Extent", "Min Opacity", "Realize for Render", "Splat Material", "Points Material"} <= names
    mat = bpy.data.materials[splat_nodes.SPLAT_MATERIAL]
    assert mat.surface_render_method == "DITHERED"
    # every per-splat value read from the instancer (instanced squares) and from the geometry (realized ones)
    attrs = {(n.attribute_type, n.attribute_name) for n in mat.node_tree.nodes if n.type == "ATTRIBUTE"}
    per_splat = ("displayColor", "opacity", splat_nodes.ROTVEC_ATTR, splat_nodes.INV_SIGMA_ATTR)
    assert attrs == ({(kind, name) for kind in ("INSTANCER", "GEOMETRY") for name in per_splat}
                     | {("GEOMETRY", splat_nodes.CENTRE_ATTR), ("GEOMETRY", splat_nodes.FINAL_ATTR)})


# ---- renders -------------------------------------------------------------------------------------------------

def test_cycles_render_matches_the_backend_render(scene, job_dir, tmp_path):
    """Headless Cycles render of frame 2 through the backend's front camera: the alpha silhouette overlaps the
    backend's own render of the same camera and frame with IoU >= 0.9."""
    from blender import ensure_camera, render_and_compare

    ensure_camera(scene)  # the user's scene camera, there before the import (the splats' blur follows it)
    bpy.ops.stag4d.import_job(directory=str(job_dir))
    t0 = time.perf_counter()
    res = render_and_compare(job_dir, scene, frame=2, size=128, samples=16, out_png=tmp_path / "compare.png")
    elapsed = time.perf_counter() - t0
    print(f"IoU {res['iou']:.3f}, mean |rgb| {res['rgb_diff']:.1f}/255, render {res['render_s']:.2f} s "
          f"(total {elapsed:.1f} s)")
    assert res["iou"] >= 0.9
    assert res["rgb_diff"] < 25  # colours agree where both are opaque (0..255 scale)
    assert 0.03 < res["coverage"] < 0.6  # something was drawn, not everything


# ---- live preview ------------------------------------------------------------------------------------------

def test_preview_snapshots_replace_the_cache_in_place(scene, job_dir, tmp_path):
    # Two "snapshots" of different sizes (a fit densifies), then the final result.
    snaps = []
    for i, n in enumerate((150, 250)):
        fit = make_fit_dir(tmp_path / f"fit{i}", num_gaussians=n, num_frames=4, fps=12.0, seed=i)
        bake(fit, tmp_path / f"snap{i}", formats="usd")
        snaps.append(tmp_path / f"snap{i}" / "gaussians.usdc")
    item = state.new_item(scene, "live", "example", "LOCAL")
    item.state = "running"
    for i, snap in enumerate(snaps):
        state.post({"type": "preview", "key": item.key, "path": str(snap), "event": {"frames": 4, "step": i}})
        assert state.process_updates() == 1
        obj = item.gaussians
        if i == 0:
            first = obj
        assert obj == first and len([o for o in bpy.data.objects if o.type == "POINTCLOUD"]) == 1
        scene.frame_set(0)
        ev = obj.evaluated_get(bpy.context.evaluated_depsgraph_get())
        assert ev.modifiers[0].cache_file.filepath == str(snap)
        assert len(_instances(obj)) <= (150, 250)[i] and len(_instances(obj)) > (150, 250)[i] * 0.7
    state.post({"type": "done", "key": item.key, "job": {"state": "finished"}, "directory": str(job_dir)})
    state.process_updates()
    assert item.state == "finished" and item.imported and item.gaussians == first, item.error
    assert item.gaussians.modifiers[0].cache_file.filepath == str(job_dir / "bake" / "gaussians.usdc")
    assert len(_instances(first)) > 0.7 * N  # now the final result


# ---- export ------------------------------------------------------------------------------------------------

def test_export_usd_and_alembic(scene, job_dir, tmp_path):
    from pxr import Usd, UsdGeom

    bpy.ops.stag4d.import_job(directory=str(job_dir), mesh=True)
    item = scene.stag4d.jobs[0]
    assert bpy.ops.stag4d.export_usd(filepath=str(tmp_path / "out.usdc"), key=item.key) == {"FINISHED"}
    assert bpy.ops.stag4d.export_alembic(filepath=str(tmp_path / "out.abc"), key=item.key) == {"FINISHED"}
    stage = Usd.Stage.Open(str(tmp_path / "out.usdc"))
    points = [p for p in stage.Traverse() if p.GetTypeName() == "Points"]
    assert len(points) == 1  # the points themselves, not N ico-sphere instances
    attrs = {a.GetName(): a.GetNumTimeSamples() for a in points[0].GetAttributes() if a.HasValue()}
    assert attrs["points"] == 4 and attrs["primvars:orientations"] == 4 and attrs["primvars:scales"] == 4
    assert "primvars:displayColor" in attrs and "primvars:opacity" in attrs
    assert stage.GetTimeCodesPerSecond() == pytest.approx(12.0)
    assert [p for p in stage.Traverse() if p.GetTypeName() == "Mesh"]
    ply = load_ply(job_dir / "bake" / "ply" / "0002.ply")
    xf = UsdGeom.Xformable(points[0]).ComputeLocalToWorldTransform(2)
    world = np.array([list(xf.Transform(tuple(map(float, p)))) for p in UsdGeom.Points(points[0]).GetPointsAttr().Get(2)])
    np.testing.assert_allclose(world, to_blender(ply["xyz"]), atol=1e-5)  # Z-up stage, as Blender sees it
    assert item.gaussians.modifiers["Gaussian splats"].show_render  # switched back on
    # Alembic holds the animated mesh: re-import it and count frames of motion.
    clean_scene()
    bpy.ops.wm.alembic_import(filepath=str(tmp_path / "out.abc"))
    mesh = next(o for o in bpy.data.objects if o.type == "MESH")
    a = [np.array(mesh.evaluated_get(bpy.context.evaluated_depsgraph_get()).data.vertices[0].co)
         for _ in [bpy.context.scene.frame_set(f) for f in (0,)]][0]
    bpy.context.scene.frame_set(3)
    b = np.array(mesh.evaluated_get(bpy.context.evaluated_depsgraph_get()).data.vertices[0].co)
    assert np.abs(a - b).max() > 0


# ---- the panel ---------------------------------------------------------------------------------------------

class Layout:
    """Stand-in for bpy.types.UILayout that records what a panel draws and checks every property and operator
    it names exists (so a typo fails here, not in front of a user)."""

    def __init__(self, log):
        self.log = log
        self.alert = False
        self.enabled = True
        self.active = True
        self.scale_x = self.scale_y = 1.0
        self.use_property_split = False

    def row(self, **kw):
        return Layout(self.log)

    column = box = split = row

    def label(self, text="", icon="NONE", **kw):
        self.log.append(("label", text, icon, self.alert))

    def prop(self, data, name, text=None, **kw):
        if name.startswith('["'):
            assert name[2:-2] in data.keys(), name
        else:
            assert name in data.bl_rna.properties, f"{type(data).__name__}.{name}"
        self.log.append(("prop", name, text))

    def operator(self, idname, text="", icon="NONE", **kw):
        group, op = idname.split(".")
        rna = getattr(getattr(bpy.ops, group), op).get_rna_type()
        self.log.append(("operator", idname, text))
        return _OpProps(rna)

    def progress(self, factor=0.0, type="BAR", text=""):
        assert 0.0 <= factor <= 1.0
        self.log.append(("progress", factor, text))

    def template_list(self, listtype, list_id, data, prop, active_data, active_prop, **kw):
        assert hasattr(bpy.types, listtype) and prop in data.bl_rna.properties
        assert active_prop in active_data.bl_rna.properties
        self.log.append(("list", listtype))

    def separator(self, **kw):
        pass


class _OpProps:
    def __init__(self, rna):
        object.__setattr__(self, "_rna", rna)

    def __setattr__(self, name, value):
        assert name in self._rna.properties, f"{self._rna.identifier} has no property {name}"


def draw(panel_cls, context=None) -> list:
    log = []
    panel_cls.draw(SimpleNamespace(layout=Layout(log)), context or bpy.context)
    return log


def texts(log) -> str:
    """Everything drawn as one line of words (long messages are wrapped over several labels)."""
    return " ".join(str(e[1]) for e in log if e[0] in ("label", "progress", "operator"))


def test_panel_draws_inputs_status_and_errors(scene, job_dir):
    settings = scene.stag4d
    for kind in ("VIDEO", "IMAGE", "CLIP", "BLEND_IMAGE", "PROMPT", "EXAMPLE"):
        settings.input_kind = kind
        log = draw(panel.STAG4D_PT_main)
        assert ("operator", "stag4d.generate", "") in log
        assert any(e[0] == "label" and e[1] == "Model licences" for e in log)
    settings.input_kind = "PROMPT"
    state.INFO.update(models=[{"name": "sdxl-turbo", "title": "SDXL-Turbo", "licence": "SAI-NC-Community",
                               "present": False}])
    assert "SDXL-Turbo: SAI-NC-Community (not downloaded)" in texts(draw(panel.STAG4D_PT_main))
    assert not panel.STAG4D_PT_job.poll(bpy.context)

    item = state.new_item(scene, "walk", "path", "LOCAL")
    state.post({"type": "created", "key": item.key, "url": "http://x", "job": {"id": "j0123456789ab", "state": "running",
               "licences": [{"model": "zero123plus", "licence": "CC-BY-NC-4.0", "licence_note": "non-commercial"}]}})
    state.post({"type": "event", "key": item.key, "job_id": "j0123456789ab",
                "event": {"n": 5, "kind": "progress", "stage": "fit", "step": 250, "total": 1000, "loss": 0.0123,
                          "elapsed_s": 75.0, "eta_s": 225.0}})
    assert state.process_updates() == 2
    assert panel.STAG4D_PT_job.poll(bpy.context)
    log = draw(panel.STAG4D_PT_job)
    assert ("progress", 0.25, "fit 250 / 1000") in log
    text = texts(log)
    assert "loss 0.0123" in text and "elapsed 1 min 15 s" in text and "remaining 3 min 45 s" in text
    assert ("operator", "stag4d.cancel", "") in log
    assert "zero123plus: CC-BY-NC-4.0 - non-commercial" in text

    state.post({"type": "error", "key": item.key, "message": "Lost the STAG4D server while following job "
                "j0123456789ab: Cannot reach the STAG4D server at http://x (connection refused)"})
    state.process_updates()
    log = draw(panel.STAG4D_PT_job)
    assert item.state == "error"
    alerts = " ".join(e[1] for e in log if e[0] == "label" and e[3])  # drawn in red
    assert "Lost the STAG4D server" in alerts and "connection refused" in alerts
    assert ("operator", "stag4d.resume", "") in log

    bpy.ops.stag4d.import_job(directory=str(job_dir))
    log = draw(panel.STAG4D_PT_jobs)
    assert ("list", "STAG4D_UL_jobs") in log and ("operator", "stag4d.import_job", "Import") in log
    ul_log = []
    panel.STAG4D_UL_jobs.draw_item(None, bpy.context, Layout(ul_log), settings, settings.jobs[0], 0, settings,
                                   "active_job", 0)
    assert ("label", "walk", "ERROR", False) in ul_log
    log = draw(panel.STAG4D_PT_job)  # the imported job is active now: display toggle and export buttons
    assert ("prop", f'["{splat_nodes._input_id(settings.jobs[-1].gaussians.modifiers[-1].node_group, "Points")}"]',
            "Points Display") in log
    assert ("operator", "stag4d.export_usd", "USD") in log
    assert ("operator", "stag4d.export_gltf", "glTF Splats") in log and ("operator", "stag4d.export_spz", "SPZ") in log


def test_export_gltf_and_spz_sequences(scene, job_dir, tmp_path):
    bpy.ops.stag4d.import_job(directory=str(job_dir))
    item = scene.stag4d.jobs[0]
    assert bpy.ops.stag4d.export_gltf(directory=str(tmp_path / "glb"), key=item.key) == {"FINISHED"}
    assert bpy.ops.stag4d.export_spz(directory=str(tmp_path / "spz"), key=item.key) == {"FINISHED"}
    assert sorted(p.name for p in (tmp_path / "glb").iterdir()) == ["0000.glb", "0001.glb", "0002.glb", "0003.glb",
                                                                   "canonical.glb"]
    assert sorted(p.name for p in (tmp_path / "spz").iterdir()) == [f"{k:04d}.spz" for k in range(4)]
    for k in (0, 3):
        assert (tmp_path / "spz" / f"{k:04d}.spz").read_bytes() == (job_dir / "bake" / "spz" / f"{k:04d}.spz"
                                                                     ).read_bytes()
    # A job baked without them: one clear line, nothing written.
    bare = tmp_path / "bare"
    (bare / "bake").mkdir(parents=True)
    from blender_addon import export

    with pytest.raises(export.ExportError, match="baked without spz.*--formats spz"):
        export.export_sequence(bare, "spz", tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_bake_format_boxes_add_to_the_request(scene):
    from blender_addon import operators
    from blender_addon.preferences import get_prefs

    settings = scene.stag4d
    settings.input_kind = "EXAMPLE"
    _, request = operators.build_request(settings, get_prefs())
    assert "formats" not in request["options"]  # the server's default
    settings.bake_gltf = settings.bake_spz = True
    _, request = operators.build_request(settings, get_prefs())
    assert request["options"]["formats"] == "usd,ply,mesh,preview,cameras,gltf,spz"
    settings.bake_gltf = settings.bake_spz = False


def test_generate_validates_inputs_without_touching_the_network(scene, tmp_path):
    settings = scene.stag4d
    settings.input_kind = "VIDEO"
    settings.video_path = str(tmp_path / "missing.mp4")
    with pytest.raises(RuntimeError, match="Video file not found"):
        bpy.ops.stag4d.generate()
    settings.input_kind = "PROMPT"
    settings.prompt = "  "
    with pytest.raises(RuntimeError, match="Type a prompt"):
        bpy.ops.stag4d.generate()
    assert len(settings.jobs) == 0

    from blender_addon.operators import build_request
    from blender_addon.preferences import get_prefs

    (tmp_path / "walk.mp4").write_bytes(b"\0")
    settings.input_kind, settings.video_path, settings.max_frames, settings.stride = "VIDEO", str(
        tmp_path / "walk.mp4"), 8, 2
    settings.preset, settings.seed = "tiny", 7
    label, req = build_request(settings, get_prefs())
    assert label == "walk" and req == {"kind": "path", "path": str((tmp_path / "walk.mp4").resolve()),
                                       "options": {"preset": "tiny", "seed": 7, "frames": 8, "stride": 2}}
    img = bpy.data.images.new("painted", 8, 8)  # a generated image: written to a PNG for upload
    settings.input_kind, settings.image = "BLEND_IMAGE", img
    label, req = build_request(settings, SimpleNamespace(default_preset="preview", live_preview=False,
                                                         results_dir=str(tmp_path)))
    assert label == "painted" and Path(req["path"]).is_file() and req["options"]["preview_every"] == 0
    bpy.data.images.remove(img)


def test_a_missing_backend_is_reported_on_the_job(scene, tmp_path, monkeypatch):
    from blender_addon import preferences

    prefs = preferences._FALLBACK
    monkeypatch.setattr(prefs, "python_path", str(tmp_path / "no-such-python"), raising=False)
    monkeypatch.setattr(prefs, "results_dir", str(tmp_path / "results"), raising=False)
    scene.stag4d.input_kind = "EXAMPLE"
    assert bpy.ops.stag4d.generate() == {"FINISHED"}  # returns at once; the thread finds out
    item = scene.stag4d.jobs[0]
    deadline = time.monotonic() + 10
    while item.state != "error" and time.monotonic() < deadline:
        state.process_updates()
        time.sleep(0.02)
    assert item.state == "error" and "Backend interpreter not found" in item.error
    assert state.STATUS["error"] and "preferences" in state.STATUS["text"]
