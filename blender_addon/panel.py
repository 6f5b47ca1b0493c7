"""3D Viewport > Sidebar > STAG4D. Drawing only reads properties and the cached server info: no network, no
file system walks, so the UI never stalls."""

from __future__ import annotations

import bpy

from . import splat_nodes, state
from .preferences import get_prefs
from .props import ACTIVE_STATES
from .backend.server_process import MANAGER

# Which registry models each input kind runs through (stag4d_backend/models/registry.py); the job object's
# own "licences" list replaces this once the server has accepted a job.
MODELS_BY_KIND = {
    "VIDEO": ("matting", "zero123plus", "zero123-xl"),
    "CLIP": ("matting", "zero123plus", "zero123-xl"),
    "IMAGE": ("matting", "svd", "zero123plus", "zero123-xl"),
    "BLEND_IMAGE": ("matting", "svd", "zero123plus", "zero123-xl"),
    "PROMPT": ("sdxl-turbo", "matting", "svd", "zero123plus", "zero123-xl"),
    "EXAMPLE": (),
}
STATE_ICONS = {"submitting": "SORTTIME", "queued": "SORTTIME", "running": "PLAY", "importing": "IMPORT",
               "finished": "CHECKMARK", "failed": "ERROR", "error": "ERROR", "cancelled": "CANCEL",
               "interrupted": "PAUSE"}


def fmt_seconds(s: float) -> str:
    if s is None or s < 0:
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def _wrap(layout, text: str, width: int = 42, icon: str = "NONE", alert: bool = False) -> None:
    """Labels do not wrap: split long messages into lines."""
    col = layout.column(align=True)
    col.alert = alert
    first = True
    for para in str(text).splitlines() or [""]:
        words, line = para.split(), ""
        for w in words:
            if line and len(line) + 1 + len(w) > width:
                col.label(text=line, icon=icon if first else "BLANK1")
                first, line = False, w
            else:
                line = f"{line} {w}" if line else w
        col.label(text=line, icon=icon if first else "BLANK1")
        first = False


def licence_lines(settings, item=None) -> list[str]:
    if item is not None and item.licences:
        return item.licences.splitlines()
    names = MODELS_BY_KIND.get(settings.input_kind, ())
    if not names:
        return ["No downloaded models: the example runs without weights."]
    models = {m.get("name"): m for m in state.INFO.get("models", []) if isinstance(m, dict)}
    if not models:
        return [f"Uses {', '.join(names)}; connect to see their licences (some are non-commercial)."]
    out = []
    for n in names:
        m = models.get(n)
        if m:
            missing = "" if m.get("present", True) else " (not downloaded)"
            out.append(f"{m.get('title', n)}: {m.get('licence', '?')}{missing}")
    return out


class STAG4D_PT_main(bpy.types.Panel):
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "STAG4D"
    bl_label = "STAG4D"
    bl_idname = "STAG4D_PT_main"

    def draw(self, context):
        layout = self.layout
        settings = context.scene.stag4d
        prefs = get_prefs()

        box = layout.box()
        row = box.row(align=True)
        if prefs.backend == "LOCAL":
            where = f"Local server: {MANAGER.server.url}" if MANAGER.running else "Local server: not started"
        else:
            where = f"Remote: {prefs.remote_url}"
        row.label(text=where, icon="WORLD" if prefs.backend == "REMOTE" else "CONSOLE")
        row.operator("stag4d.connect", text="", icon="FILE_REFRESH")
        if prefs.backend == "LOCAL" and MANAGER.running:
            row.operator("stag4d.stop_server", text="", icon="X")
        if state.STATUS["text"]:
            _wrap(box, state.STATUS["text"], icon="ERROR" if state.STATUS["error"] else "INFO",
                  alert=state.STATUS["error"])

        col = layout.column()
        col.prop(settings, "input_kind", text="Input")
        kind = settings.input_kind
        if kind == "VIDEO":
            col.prop(settings, "video_path", text="")
        elif kind == "IMAGE":
            col.prop(settings, "image_path", text="")
        elif kind == "CLIP":
            col.prop(settings, "clip", text="")
        elif kind == "BLEND_IMAGE":
            col.prop(settings, "image", text="")
        elif kind == "PROMPT":
            col.prop(settings, "prompt", text="")
        elif kind == "EXAMPLE":
            row = col.row(align=True)
            row.prop(settings, "example_frames")
            row.prop(settings, "example_size")
            col.prop(settings, "example_gaussians")
        if kind in ("VIDEO", "CLIP", "IMAGE", "BLEND_IMAGE"):
            row = col.row(align=True)
            row.prop(settings, "max_frames")
            row.prop(settings, "stride")
        row = col.row(align=True)
        row.prop(settings, "preset", text="")
        row.prop(settings, "seed")
        row = col.row(align=True)
        row.prop(settings, "iters")
        row.prop(settings, "preview_every", text="Preview")
        col.prop(settings, "import_mesh")
        row = col.row(align=True)
        row.label(text="Also bake:")
        row.prop(settings, "bake_gltf", toggle=True)
        row.prop(settings, "bake_spz", toggle=True)

        lic = layout.box()
        lic.label(text="Model licences", icon="COPY_ID")
        for line in licence_lines(settings):
            _wrap(lic, line)

        row = layout.row()
        row.scale_y = 1.5
        row.operator("stag4d.generate", icon="PLAY")


class STAG4D_PT_job(bpy.types.Panel):
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "STAG4D"
    bl_label = "Job"
    bl_parent_id = "STAG4D_PT_main"
    bl_idname = "STAG4D_PT_job"

    @classmethod
    def poll(cls, context):
        return len(context.scene.stag4d.jobs) > 0

    def draw(self, context):
        layout = self.layout
        settings = context.scene.stag4d
        item = settings.active_item()
        if item is None:
            layout.label(text="No job yet")
            return
        draw_job_status(layout, item)
        obj = item.gaussians
        if obj is not None and splat_nodes.MODIFIER_NAME in obj.modifiers:
            mod = obj.modifiers[splat_nodes.MODIFIER_NAME]
            box = layout.box()
            box.label(text=obj.name, icon="OUTLINER_OB_POINTCLOUD")
            row = box.row(align=True)
            try:
                row.prop(mod, f'["{splat_nodes._input_id(mod.node_group, "Points")}"]', text="Points Display")
                row.prop(mod, f'["{splat_nodes._input_id(mod.node_group, "Extent")}"]', text="Extent")
            except (KeyError, AttributeError):
                pass
            row = box.row(align=True)
            bound = obj.get("stag4d_camera", "")
            row.label(text=f"Blur sized for: {bound or 'default camera'}", icon="CAMERA_DATA")
            op = row.operator("stag4d.match_camera", text="", icon="FILE_REFRESH")
            op.key = item.key
            row = box.row(align=True)
            row.prop(context.scene.stag4d, "backend_look")
            row = box.row(align=True)
            row.prop(context.scene.stag4d, "splat_sampling", text="Sampling")
            row = box.row(align=True)
            exact = bool(context.scene.get("stag4d_exact_folder"))
            op = row.operator("stag4d.exact_display", text="Exact Display (backend render)" if not exact
                              else "Re-render Exact Display", icon="RENDER_RESULT")
            op.key = item.key
            if exact:
                op = row.operator("stag4d.exact_display", text="", icon="X")
                op.key, op.remove = item.key, True
            _ray_stop_row(box, context.scene, item)
        if item.collection is not None:
            row = layout.row(align=True)
            op = row.operator("stag4d.export_usd", text="USD", icon="EXPORT")
            op.key = item.key
            op = row.operator("stag4d.export_alembic", text="Alembic (mesh)", icon="EXPORT")
            op.key = item.key
            row = layout.row(align=True)
            op = row.operator("stag4d.export_gltf", text="glTF Splats", icon="EXPORT")
            op.key = item.key
            op = row.operator("stag4d.export_spz", text="SPZ", icon="EXPORT")
            op.key = item.key
        lines = licence_lines(settings, item) if item.licences else []
        if lines:
            lic = layout.box()
            lic.label(text="Licences of this job's models", icon="COPY_ID")
            for line in lines:
                _wrap(lic, line)


def draw_job_status(layout, item) -> None:
    col = layout.column(align=True)
    col.label(text=f"{item.name}  ({item.job_id or 'not sent yet'})", icon=STATE_ICONS.get(item.state, "DOT"))
    col.label(text=f"State: {item.state}" + (f", stage: {item.stage}" if item.stage else ""))
    if item.state in ACTIVE_STATES or item.state == "importing":
        if item.total > 0:
            factor = min(1.0, max(0.0, item.step / item.total))
            text = f"{item.stage or 'working'} {item.step} / {item.total}"
        else:
            factor, text = 0.0, item.stage or item.state
        if hasattr(col, "progress"):
            col.progress(factor=factor, type="BAR", text=text)
        else:
            col.label(text=f"{text} ({factor:.0%})")
        details = []
        if item.loss >= 0:
            details.append(f"loss {item.loss:.4g}")
        if item.elapsed >= 0:
            details.append(f"elapsed {fmt_seconds(item.elapsed)}")
        if item.eta >= 0:
            details.append(f"remaining {fmt_seconds(item.eta)}")
        if details:
            col.label(text=", ".join(details))
    if item.message:
        _wrap(col, item.message, icon="INFO")
    if item.error:
        _wrap(col, item.error, icon="ERROR", alert=True)
    row = layout.row(align=True)
    if item.state in ACTIVE_STATES:
        op = row.operator("stag4d.cancel", icon="CANCEL")
        op.key = item.key
    elif item.state in ("cancelled", "interrupted", "failed", "error") and item.job_id:
        op = row.operator("stag4d.resume", icon="FILE_REFRESH")
        op.key = item.key


class STAG4D_UL_jobs(bpy.types.UIList):
    bl_idname = "STAG4D_UL_jobs"

    def draw_item(self, context, layout, data, item, icon, active_data, active_propname, index=0):
        row = layout.row(align=True)
        row.label(text=item.name, icon=STATE_ICONS.get(item.state, "DOT"))
        row.label(text=item.state)


class STAG4D_PT_jobs(bpy.types.Panel):
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "STAG4D"
    bl_label = "Jobs in This File"
    bl_parent_id = "STAG4D_PT_main"
    bl_idname = "STAG4D_PT_jobs"

    def draw(self, context):
        layout = self.layout
        settings = context.scene.stag4d
        layout.template_list("STAG4D_UL_jobs", "", settings, "jobs", settings, "active_job", rows=3)
        item = settings.active_item()
        if item is not None:
            row = layout.row(align=True)
            sub = row.row(align=True)
            sub.enabled = bool(item.directory)
            op = sub.operator("stag4d.import_job", text="Import", icon="IMPORT")
            op.key = item.key
            op = sub.operator("stag4d.open_folder", text="Open Folder", icon="FILE_FOLDER")
            op.key = item.key
            op = row.operator("stag4d.remove_job", text="", icon="X")
            op.key = item.key
        layout.operator("stag4d.import_job", text="Import Job Folder...", icon="FILE_FOLDER")


def _ray_stop_row(layout, scene, item) -> None:
    """The Cycles ray stop (ray_stop.py): make / remake its maps, turn it off, and why it is off if it is."""
    from . import ray_stop

    row = layout.row(align=True)
    on = ray_stop.record(scene) is not None
    op = row.operator("stag4d.ray_stop", text="Ray Stop (Cycles, backend maps)" if not on else "Remake Ray Stop",
                      icon="RESTRICT_RENDER_OFF")
    op.key = item.key
    row.prop(scene.stag4d, "ray_stop_transmittance", text="Stop At")
    if on:
        op = row.operator("stag4d.ray_stop", text="", icon="X")
        op.key, op.remove = item.key, True
        off = scene.get(ray_stop.OFF_REASON_KEY, "")
        if off:
            layout.label(text=f"Ray stop off: {off}", icon="INFO")


classes = (STAG4D_UL_jobs, STAG4D_PT_main, STAG4D_PT_job, STAG4D_PT_jobs)

