"""Add-on preferences: which backend (a local server the add-on starts, or a remote one), the default preset,
where results are stored."""

from __future__ import annotations

import os
from pathlib import Path

import bpy
from bpy.props import BoolProperty, EnumProperty, IntProperty, StringProperty

PRESETS = [
    ("preview", "Preview", "Minutes on a CPU, rough result"),
    ("standard", "Standard", "The default on an NVIDIA GPU"),
    ("paper", "Paper", "The STAG4D paper's settings (about an hour on a GPU)"),
    ("tiny", "Tiny", "Seconds; for smoke tests only"),
]
DEFAULT_RESULTS = "~/STAG4D"


def addon_package() -> str:
    return __package__ or "blender_addon"


class STAG4D_AddonPreferences(bpy.types.AddonPreferences):
    bl_idname = addon_package()

    backend: EnumProperty(
        name="Backend",
        items=[("LOCAL", "Local", "Start `stag4d serve` on this computer when needed (stopped when Blender quits)"),
               ("REMOTE", "Remote", "Use a running `stag4d serve`, e.g. on a GPU machine")],
        default="LOCAL")
    python_path: StringProperty(
        name="Backend Python", subtype="FILE_PATH",
        description="Python of the environment where stag4d is installed (empty: $STAG4D_PYTHON, the checkout's "
                    ".venv, or `stag4d` on PATH)")
    local_port: IntProperty(name="Port", default=0, min=0, max=65535,
                            description="Port of the local server (0: any free port)")
    remote_url: StringProperty(name="Server URL", default="http://127.0.0.1:8765",
                               description="Address of a running `stag4d serve`")
    remote_token: StringProperty(name="Token", subtype="PASSWORD",
                                 description="The server's token (the contents of its token file)")
    default_preset: EnumProperty(name="Default Preset", items=PRESETS, default="preview")
    results_dir: StringProperty(
        name="Results Folder", subtype="DIR_PATH", default=DEFAULT_RESULTS,
        description="Where jobs are stored (the local server's jobs, copies of remote results, previews)")
    live_preview: BoolProperty(name="Live Preview", default=True,
                               description="Show the Gaussians in the viewport while they are being fitted")
    standard_colors: BoolProperty(
        name="Standard View Transform", default=True,
        description="On import, set the scene's view transform to Standard so splat colours match the backend's "
                    "renders (AgX and Filmic desaturate them)")
    backend_look: BoolProperty(
        name="Match the Backend Render", default=True,
        description="On import, make the splats render as the backend's rasteriser does: overlapping splats "
                    "blended in sRGB values (sRGB emission, Raw view transform) and one sample at each pixel "
                    "centre (Cycles pixel filter 0.01 px). Other lit objects then show linear, aliased colours: "
                    "switch it off in the panel for mixed scenes, or use the Exact Display")

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "backend", expand=True)
        if self.backend == "LOCAL":
            layout.prop(self, "python_path")
            layout.prop(self, "local_port")
        else:
            layout.prop(self, "remote_url")
            layout.prop(self, "remote_token")
        layout.prop(self, "default_preset")
        layout.prop(self, "results_dir")
        layout.prop(self, "live_preview")
        layout.prop(self, "standard_colors")
        layout.prop(self, "backend_look")


class _Defaults:
    """Stand-in when the add-on was registered without Blender's add-on system (tests, scripts)."""

    backend = "LOCAL"
    python_path = ""
    local_port = 0
    remote_url = "http://127.0.0.1:8765"
    remote_token = ""
    default_preset = "preview"
    results_dir = DEFAULT_RESULTS
    live_preview = True
    standard_colors = True
    backend_look = True


_FALLBACK = _Defaults()


def get_prefs():
    addon = bpy.context.preferences.addons.get(addon_package())
    if addon is not None and addon.preferences is not None:
        return addon.preferences
    return _FALLBACK


def results_dir(prefs=None) -> Path:
    prefs = prefs or get_prefs()
    raw = prefs.results_dir or DEFAULT_RESULTS
    return Path(os.path.expanduser(bpy.path.abspath(raw))).resolve()


def local_jobs_dir(prefs=None) -> Path:
    return results_dir(prefs) / "jobs"


def remote_jobs_dir(prefs=None) -> Path:
    return results_dir(prefs) / "remote"


def token_file(prefs=None) -> Path:
    return results_dir(prefs) / "token"


classes = (STAG4D_AddonPreferences,)
