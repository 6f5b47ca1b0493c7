"""Operators (``bpy.ops.stag4d.*``). Each does its Blender-side work at once and hands anything slow (network,
starting the server) to a thread through ``state``; none of them waits for the backend."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import bpy
from bpy.props import BoolProperty, StringProperty
from bpy_extras.io_utils import ExportHelper

from . import export, importer, state
from .preferences import get_prefs, results_dir
from .props import ACTIVE_STATES

# What a job bakes when nothing is asked (the server's default); the panel's glTF / SPZ boxes add to it.
BASE_BAKE_FORMATS = ("usd", "ply", "mesh", "preview", "cameras")
VIDEO_EXT = {".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm", ".gif"}
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".exr"}


class RequestError(ValueError):
    """The panel's inputs cannot make a job (one line for the user)."""


def _file(path: str, what: str, exts: set[str]) -> str:
    if not path:
        raise RequestError(f"Choose a {what} file first")
    p = Path(bpy.path.abspath(path)).expanduser()
    if not p.is_file():
        raise RequestError(f"{what.capitalize()} file not found: {p}")
    if p.suffix.lower() not in exts:
        raise RequestError(f"{p.name}: not a {what} file this add-on knows ({', '.join(sorted(exts))})")
    return str(p.resolve())


def _blend_image_file(image, prefs) -> str:
    """A file holding the Image's pixels: its own file, or a PNG written for packed / generated images."""
    if image.source == "FILE" and not image.packed_file:
        p = Path(bpy.path.abspath(image.filepath, library=image.library)).expanduser()
        if p.is_file():
            return str(p.resolve())
    out_dir = results_dir(prefs) / "uploads"
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=bpy.path.clean_name(image.name) + "-", suffix=".png", dir=out_dir)
    os.close(fd)
    image.save(filepath=name)  # writes a copy; the Image keeps its own path
    return name


def build_request(settings, prefs) -> tuple[str, dict]:
    """(label, request) from the panel's inputs; raises RequestError with a message for the user."""
    preset = prefs.default_preset if settings.preset == "DEFAULT" else settings.preset
    options = {"preset": preset, "seed": int(settings.seed)}
    if settings.iters:
        options["iters"] = int(settings.iters)
    if not prefs.live_preview:
        options["preview_every"] = 0
    elif settings.preview_every:
        options["preview_every"] = int(settings.preview_every)
    extra = [f for f, on in (("gltf", settings.bake_gltf), ("spz", settings.bake_spz)) if on]
    if extra:
        options["formats"] = ",".join(BASE_BAKE_FORMATS + tuple(extra))
    kind = settings.input_kind
    if kind in ("VIDEO", "CLIP", "IMAGE", "BLEND_IMAGE"):
        if settings.max_frames:
            options["frames"] = int(settings.max_frames)
        if settings.stride > 1:
            options["stride"] = int(settings.stride)
    if kind == "VIDEO":
        path = _file(settings.video_path, "video", VIDEO_EXT)
        return Path(path).stem, {"kind": "path", "path": path, "options": options}
    if kind == "IMAGE":
        path = _file(settings.image_path, "image", IMAGE_EXT)
        return Path(path).stem, {"kind": "path", "path": path, "options": options}
    if kind == "CLIP":
        clip = settings.clip
        if clip is None:
            raise RequestError("Choose a Movie Clip first")
        # The whole file is sent; Frames / Stride trim it on the server.
        path = _file(bpy.path.abspath(clip.filepath, library=clip.library), "video", VIDEO_EXT | IMAGE_EXT)
        return clip.name, {"kind": "path", "path": path, "options": options}
    if kind == "BLEND_IMAGE":
        if settings.image is None:
            raise RequestError("Choose an Image first")
        return settings.image.name, {"kind": "path", "path": _blend_image_file(settings.image, prefs),
                                     "options": options}
    if kind == "PROMPT":
        prompt = settings.prompt.strip()
        if not prompt:
            raise RequestError("Type a prompt first")
        return prompt[:40], {"kind": "prompt", "prompt": prompt, "options": options}
    if kind == "EXAMPLE":
        options.update(example_frames=int(settings.example_frames), example_size=int(settings.example_size),
                       example_gaussians=int(settings.example_gaussians))
        return "Example", {"kind": "example", "options": options}
    raise RequestError(f"Unknown input kind {kind}")


def _item(context, key: str = ""):
    settings = context.scene.stag4d
    if key:
        _, item = state.find_item(key)
        return item
    return settings.active_item()


class STAG4D_OT_generate(bpy.types.Operator):
    """Send the input to the STAG4D backend; the result appears in the scene when it is done"""

    bl_idname = "stag4d.generate"
    bl_label = "Generate"
    bl_options = {"REGISTER"}

    def execute(self, context):
        settings = context.scene.stag4d
        prefs = get_prefs()
        try:
            label, request = build_request(settings, prefs)
        except RequestError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        cfg = state.backend_config(prefs)
        item = state.new_item(context.scene, label, request["kind"], cfg["backend"], settings.import_mesh)
        state.submit(item.key, request, cfg)
        state.ensure_timer()
        self.report({"INFO"}, f"STAG4D: submitting '{label}'")
        return {"FINISHED"}


class STAG4D_OT_cancel(bpy.types.Operator):
    """Stop the job, here and on the server"""

    bl_idname = "stag4d.cancel"
    bl_label = "Cancel"
    key: StringProperty(options={"SKIP_SAVE", "HIDDEN"})

    def execute(self, context):
        item = _item(context, self.key)
        if item is None or item.state not in ACTIVE_STATES:
            self.report({"WARNING"}, "No running job to cancel")
            return {"CANCELLED"}
        item.message = "Cancelling..."
        state.cancel(item.key, item.job_id, state.backend_config())
        state.ensure_timer()
        return {"FINISHED"}


class STAG4D_OT_resume(bpy.types.Operator):
    """Continue a cancelled, interrupted or failed job from its last checkpoint"""

    bl_idname = "stag4d.resume"
    bl_label = "Resume"
    key: StringProperty(options={"SKIP_SAVE", "HIDDEN"})

    def execute(self, context):
        item = _item(context, self.key)
        if item is None or not item.job_id:
            return {"CANCELLED"}
        item.state, item.error, item.message = "queued", "", "Resuming..."
        state.resume(item.key, item.job_id, state.backend_config(), item.last_event + 1)
        state.ensure_timer()
        return {"FINISHED"}


class STAG4D_OT_import_job(bpy.types.Operator):
    """Import a finished job folder (one with bake/gaussians.usdc)"""

    bl_idname = "stag4d.import_job"
    bl_label = "Import Job Folder"
    bl_options = {"REGISTER", "UNDO"}

    directory: StringProperty(subtype="DIR_PATH", name="Job Folder")
    filter_folder: BoolProperty(default=True, options={"HIDDEN"})
    mesh: BoolProperty(name="Import Mesh", default=False, description="Also import bake/mesh.usdc")
    points: BoolProperty(name="Points Display", default=False, description="Start with the light points display")
    key: StringProperty(options={"SKIP_SAVE", "HIDDEN"})

    def invoke(self, context, event):
        if self.key or self.directory:
            return self.execute(context)
        self.mesh = context.scene.stag4d.import_mesh
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context):
        scene = context.scene
        item = _item(context, self.key) if self.key else None
        directory = self.directory or (item.directory if item else "")
        mesh = self.mesh or (item.import_mesh if item else False)
        reuse = {}
        if item is not None and item.gaussians is not None and item.gaussians.users_collection:
            # Still in the scene: refresh it in place rather than stacking a second copy.
            reuse = {"gaussians": item.gaussians, "collection": item.collection}
            mesh = mesh and (item.mesh is None or not item.mesh.users_collection)
        try:
            job_dir = importer.resolve_job_dir(directory)
            res = importer.import_job(job_dir, scene, name=item.name if item else None, mesh=mesh,
                                      points=self.points, job_key=item.key if item else "",
                                      standard_colors=get_prefs().standard_colors,
                                      backend_look=get_prefs().backend_look, **reuse)
        except importer.ImportError_ as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        if item is None:
            item = state.new_item(scene, res.collection.name.removeprefix("STAG4D "), "folder", "", self.mesh)
            item.state, item.directory = "finished", str(job_dir)
            try:
                import json
                item.job_id = json.loads((job_dir / "job.json").read_text()).get("id", "") or ""
            except (OSError, ValueError):
                pass
        item.collection, item.gaussians, item.imported = res.collection, res.gaussians, True
        if res.mesh is not None:
            item.mesh = res.mesh
        item.message = f"Imported ({res.frames or '?'} frames at {res.fps or '?'} fps)"
        for note in res.notes:
            self.report({"WARNING"}, note)
        self.report({"INFO"}, f"Imported {res.gaussians.name} in {res.timings['total']:.2f} s")
        return {"FINISHED"}


class STAG4D_OT_match_camera(bpy.types.Operator):
    """Size the splats' anti-aliasing blur for the scene's current camera and resolution (after switching
    cameras)"""

    bl_idname = "stag4d.match_camera"
    bl_label = "Match Camera"
    bl_options = {"REGISTER", "UNDO"}
    key: StringProperty(options={"SKIP_SAVE", "HIDDEN"})

    def execute(self, context):
        from . import splat_nodes

        item = _item(context, self.key)
        obj = item.gaussians if item is not None else None
        if obj is None or splat_nodes.MODIFIER_NAME not in obj.modifiers:
            self.report({"ERROR"}, "Import the job first")
            return {"CANCELLED"}
        splat_nodes.drive_pixel_angle(obj, context.scene)
        return {"FINISHED"}


def _start_camera_views(op, scene, item, obj, folder: str, kind: str = "exact", extra_args=()) -> int | None:
    """The scene camera for every frame (exact_display.views_for_scene) sent to ``stag4d render --views`` on a
    thread, into <job>/<folder>/<camera>; the number of frames, or None (reported on ``op``) if it cannot start."""
    from . import exact_display
    from .backend.client import BackendError
    from .backend.server_process import find_backend_command

    job_dir = Path(item.collection.get("stag4d_dir", "") or item.directory)
    try:
        command = find_backend_command(bpy.path.abspath(get_prefs().python_path or ""))
        manifest = importer.read_manifest(job_dir / "bake")
        views = exact_display.views_for_scene(scene, obj, manifest.get("frame_values"))
    except (BackendError, exact_display.ExactDisplayError) as exc:
        op.report({"ERROR"}, str(exc))
        return None
    out = job_dir / folder / bpy.path.clean_name(scene.camera.name)
    exact_display.ExactRender(item.key, command, exact_display.model_dir(job_dir), views, out, kind=kind,
                              extra_args=extra_args).start()
    item.error = ""
    return len(views)


class STAG4D_OT_exact_display(bpy.types.Operator):
    """Render the splats with the backend's own rasteriser through the scene camera for every frame of the scene
    and composite them over the scene by depth (exact colours; F12 and Render Animation use it). Run it again
    after changing the camera, its lens or the resolution"""

    bl_idname = "stag4d.exact_display"
    bl_label = "Exact Display"
    bl_options = {"REGISTER"}
    key: StringProperty(options={"SKIP_SAVE", "HIDDEN"})
    remove: BoolProperty(default=False, options={"SKIP_SAVE"},
                         description="Back to the splat object's own display (removes the compositor nodes)")

    def execute(self, context):
        from . import exact_display

        item = _item(context, self.key)
        obj = item.gaussians if item is not None else None
        if obj is None or item.collection is None:
            self.report({"ERROR"}, "Import the job first")
            return {"CANCELLED"}
        scene = context.scene
        if self.remove:
            exact_display.remove_compositor(scene, obj)
            item.message = "Exact display off: the splat object renders itself again"
            return {"FINISHED"}
        count = _start_camera_views(self, scene, item, obj, exact_display.FOLDER)
        if count is None:
            return {"CANCELLED"}
        item.message = f"Exact display: the backend renders {count} frames..."
        return {"FINISHED"}


class STAG4D_OT_ray_stop(bpy.types.Operator):
    """Cycles: let the backend map, for the scene camera and every frame, the depth past which the splats hide
    everything; camera rays end there (the same image, ~4x fewer splat crossings). Run it again after changing
    the camera's animation"""

    bl_idname = "stag4d.ray_stop"
    bl_label = "Ray Stop"
    bl_options = {"REGISTER"}
    key: StringProperty(options={"SKIP_SAVE", "HIDDEN"})
    remove: BoolProperty(default=False, options={"SKIP_SAVE"}, description="Turn the ray stop off")

    def execute(self, context):
        from . import ray_stop

        item = _item(context, self.key)
        obj = item.gaussians if item is not None else None
        if obj is None or item.collection is None:
            self.report({"ERROR"}, "Import the job first")
            return {"CANCELLED"}
        scene = context.scene
        if self.remove:
            ray_stop.disable(scene)
            item.message = "Ray stop off: Cycles rays cross every splat again"
            return {"FINISHED"}
        count = _start_camera_views(self, scene, item, obj, ray_stop.FOLDER, kind="ray_stop",
                                    extra_args=("--stop-depth", "--stop-transmittance",
                                                f"{scene.stag4d.ray_stop_transmittance:.6g}"))
        if count is None:
            return {"CANCELLED"}
        item.message = f"Ray stop: the backend maps {count} frames..."
        return {"FINISHED"}


class STAG4D_OT_open_folder(bpy.types.Operator):
    """Open the job's folder in the file browser of the system"""

    bl_idname = "stag4d.open_folder"
    bl_label = "Open Folder"
    key: StringProperty(options={"SKIP_SAVE", "HIDDEN"})

    def execute(self, context):
        item = _item(context, self.key)
        path = item.directory if item is not None and item.directory else str(results_dir())
        if not Path(path).is_dir():
            self.report({"ERROR"}, f"Folder not found: {path}")
            return {"CANCELLED"}
        bpy.ops.wm.path_open(filepath=path)
        return {"FINISHED"}


class STAG4D_OT_remove_job(bpy.types.Operator):
    """Remove the entry from this list (the job folder and the imported objects stay)"""

    bl_idname = "stag4d.remove_job"
    bl_label = "Remove From List"
    key: StringProperty(options={"SKIP_SAVE", "HIDDEN"})

    def execute(self, context):
        settings = context.scene.stag4d
        for i, it in enumerate(settings.jobs):
            if it.key == self.key or (not self.key and i == settings.active_job):
                settings.jobs.remove(i)
                settings.active_job = min(settings.active_job, max(0, len(settings.jobs) - 1))
                return {"FINISHED"}
        return {"CANCELLED"}


class STAG4D_OT_connect(bpy.types.Operator):
    """Check the connection to the backend (starts the local server if needed) and fetch its models' licences"""

    bl_idname = "stag4d.connect"
    bl_label = "Connect"

    def execute(self, context):
        state.STATUS.update(text="Connecting...", error=False, busy=True)
        state.check_connection(state.backend_config())
        state.ensure_timer()
        return {"FINISHED"}


class STAG4D_OT_stop_server(bpy.types.Operator):
    """Stop the local server this Blender started (its running jobs stop and can be resumed later)"""

    bl_idname = "stag4d.stop_server"
    bl_label = "Stop Server"

    def execute(self, context):
        from .backend.server_process import MANAGER

        MANAGER.stop()
        state.STATUS.update(text="Local server stopped", error=False, busy=False, url="")
        return {"FINISHED"}


def _export_target(context, key: str):
    item = _item(context, key)
    if item is None or item.collection is None:
        return None
    return item.collection


def _run_export(op, context, write) -> set:
    """The export operators' body: ``write(collection, filepath, scene)`` for the job named by ``op.key``."""
    coll = _export_target(context, op.key)
    if coll is None:
        op.report({"ERROR"}, "Import the job first")
        return {"CANCELLED"}
    try:
        path = write(coll, op.filepath, context.scene)
    except export.ExportError as exc:
        op.report({"ERROR"}, str(exc))
        return {"CANCELLED"}
    op.report({"INFO"}, f"Wrote {path}")
    return {"FINISHED"}


class STAG4D_OT_export_usd(bpy.types.Operator, ExportHelper):
    """Export the job's collection (animated Gaussians with their attributes, and the mesh) as USD"""

    bl_idname = "stag4d.export_usd"
    bl_label = "Export USD"
    filename_ext = ".usdc"
    filter_glob: StringProperty(default="*.usd;*.usdc;*.usda", options={"HIDDEN"})
    key: StringProperty(options={"SKIP_SAVE", "HIDDEN"})

    def execute(self, context):
        return _run_export(self, context, export.export_usd)


class STAG4D_OT_export_alembic(bpy.types.Operator, ExportHelper):
    """Export the job's animated mesh as Alembic"""

    bl_idname = "stag4d.export_alembic"
    bl_label = "Export Alembic"
    filename_ext = ".abc"
    filter_glob: StringProperty(default="*.abc", options={"HIDDEN"})
    key: StringProperty(options={"SKIP_SAVE", "HIDDEN"})

    def execute(self, context):
        return _run_export(self, context, export.export_alembic)


class _ExportSequence:
    """Copy the job's baked per-frame files into a folder the user picks."""

    directory: StringProperty(subtype="DIR_PATH", name="Folder")
    filter_folder: BoolProperty(default=True, options={"HIDDEN"})
    key: StringProperty(options={"SKIP_SAVE", "HIDDEN"})
    fmt = ""

    def invoke(self, context, event):
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context):
        item = _item(context, self.key)
        if item is None or not item.directory:
            self.report({"ERROR"}, "Import the job first")
            return {"CANCELLED"}
        try:
            paths = export.export_sequence(item.directory, self.fmt, self.directory)
        except export.ExportError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        self.report({"INFO"}, f"Wrote {len(paths)} files to {Path(paths[0]).parent}")
        return {"FINISHED"}


class STAG4D_OT_export_gltf(_ExportSequence, bpy.types.Operator):
    """Copy the job's glTF splat files (one .glb per frame, KHR_gaussian_splatting, and canonical.glb) to a folder"""

    bl_idname = "stag4d.export_gltf"
    bl_label = "Export glTF Splats"
    fmt = "gltf"


class STAG4D_OT_export_spz(_ExportSequence, bpy.types.Operator):
    """Copy the job's SPZ files (one .spz per frame, Niantic SPZ version 4) to a folder"""

    bl_idname = "stag4d.export_spz"
    bl_label = "Export SPZ"
    fmt = "spz"


classes = (STAG4D_OT_generate, STAG4D_OT_cancel, STAG4D_OT_resume, STAG4D_OT_import_job, STAG4D_OT_match_camera,
           STAG4D_OT_exact_display, STAG4D_OT_ray_stop, STAG4D_OT_open_folder,
           STAG4D_OT_remove_job, STAG4D_OT_connect, STAG4D_OT_stop_server, STAG4D_OT_export_usd,
           STAG4D_OT_export_alembic, STAG4D_OT_export_gltf, STAG4D_OT_export_spz)
