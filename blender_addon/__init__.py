"""STAG4D for Blender: generate animated 3D Gaussians from a video, an image or a prompt with the STAG4D backend,
watch the fit, scrub the result on the timeline, export it. See README.md in this folder.

Standard library and Blender's modules only; the heavy work runs in the backend process (`stag4d serve`).
"""

from __future__ import annotations

import bpy
from bpy.app.handlers import persistent

from . import operators, panel, preferences, props, state

_classes = preferences.classes + props.classes + operators.classes + panel.classes


@persistent
def _on_load(_dummy=None):
    # Jobs of the opened file that were still running: follow them again (never blocks: a thread connects).
    try:
        state.reattach(state.backend_config())
        state.ensure_timer()
    except Exception as exc:  # noqa: BLE001 - a load handler must not break file loading
        print(f"STAG4D: could not reattach jobs: {exc}")


@persistent
def _ray_stop_refresh(scene=None, _depsgraph=None):
    # The Cycles ray stop on only while a render would trace the rays its maps were made for (ray_stop.py).
    from . import ray_stop

    try:
        if scene is not None and scene.get(ray_stop.SCENE_KEY):
            ray_stop.refresh(scene)
    except Exception as exc:  # noqa: BLE001 - a handler must not break the update or the render
        print(f"STAG4D: ray stop check failed: {exc}")


_HANDLERS = (("load_post", _on_load), ("depsgraph_update_post", _ray_stop_refresh),
             ("render_init", _ray_stop_refresh))


def register():
    for cls in _classes:
        bpy.utils.register_class(cls)
    props.register_props()
    for name, handler in _HANDLERS:
        if handler not in getattr(bpy.app.handlers, name):
            getattr(bpy.app.handlers, name).append(handler)
    state.ensure_timer()


def unregister():
    state.remove_timer()
    for name, handler in _HANDLERS:
        if handler in getattr(bpy.app.handlers, name):
            getattr(bpy.app.handlers, name).remove(handler)
    state.stop_all(stop_server=True)
    props.unregister_props()
    for cls in reversed(_classes):
        if getattr(cls, "is_registered", False):
            bpy.utils.unregister_class(cls)
