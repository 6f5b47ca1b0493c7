"""The ray stop: Cycles ends a camera ray where the backend's rasteriser stops compositing that pixel.

A Cycles camera ray through the splat display composites every square it crosses, also the hundreds behind a
surface that already hides everything (the rasteriser stops a pixel once its transmittance would fall to 1e-4).
On the 50k creature set a ray crosses ~540 squares where ~90 count (docs/benchmarks.md, issue 19). With the stop
map (``stag4d render --views --stop-depth``: per frame of the scene camera, the camera depth past which nothing
shows at or next to each pixel) the splat material makes a square past its pixel's stop depth opaque, and the ray
ends there: the same image (what lies behind adds at most the panel's "Stop At" fraction of its colour, by default
half an 8-bit step), ~4x fewer crossings.

1. ``STAG4D_OT_ray_stop`` (operators.py) sends the scene camera for every frame to the backend (the exact
   display's views and thread, exact_display.py) with ``--stop-depth``;
2. ``enable`` (main thread, when the maps are there): the splat material's RAY_STOP_MAP_NODE gets the
   stop_NNNN.png sequence and its RAY_STOP_SWITCH_NODE goes to 1;
3. ``refresh`` (on every depsgraph update and when a render starts, __init__.py): the switch stays on only
   while a render would trace the rays the maps were made for: the same camera, its matrix in the splat object's
   space at the current frame, its lens and the resolution, a scene frame range the maps cover, no depth of
   field or motion blur, a pixel filter at most 2 px wide (the maps are widened over each pixel's 3x3
   neighbourhood). Otherwise it is off (``stale_reason`` says why): the render is then as slow as without it,
   not wrong. Not checked: the camera's motion at frames other than the current one (an edited animation):
   make the maps again after changing it, as for the exact display.

Only camera rays on the squares realized for final renders stop (splat_nodes._ray_stop): reflections and shadows,
and the viewport, are untouched. The map holds for every splat object in the scene (anything past a saturated
pixel's stop depth is hidden whatever it belongs to).
"""

from __future__ import annotations

import json
from pathlib import Path

import bpy

from . import exact_display, splat_nodes

FOLDER = "ray_stop"                  # under the job folder: ray_stop/<camera name>/ (its own views.json: the
                                     # Exact Display's folder would rewrite it without remaking these maps)
SCENE_KEY = "stag4d_ray_stop"        # JSON: folder, first, count, camera, splat object (set by enable)
OFF_REASON_KEY = "stag4d_ray_stop_off"  # why the switch is off now ("" while it is on)
MAX_FILTER_PX = 2.0                  # the maps are widened by one pixel each way: filters up to 2 px wide
MATCH_TOL = 1e-5


def _nodes():
    mat = bpy.data.materials.get(splat_nodes.SPLAT_MATERIAL)
    tree = getattr(mat, "node_tree", None) if mat is not None else None
    if tree is None:
        return None, None
    return tree.nodes.get(splat_nodes.RAY_STOP_MAP_NODE), tree.nodes.get(splat_nodes.RAY_STOP_SWITCH_NODE)


def _set_switch(value: float) -> None:
    _, switch = _nodes()
    if switch is not None and switch.outputs[0].default_value != value:
        switch.outputs[0].default_value = value


def enable(scene, folder: Path, first: int, count: int, camera_name: str, splat_name: str) -> None:
    """Load ``folder``'s stop_NNNN.png (frames first .. first + count - 1) into the splat material; on."""
    stop_map, switch = _nodes()
    if stop_map is None or switch is None:
        raise RuntimeError("the splat material has no ray stop nodes: re-import the job")
    stop_map.image = exact_display.image_sequence(folder, "stop", first, count, "Non-Color")
    user = stop_map.image_user
    user.frame_start, user.frame_offset, user.frame_duration = first, first - 1, count
    user.use_auto_refresh = True
    scene[SCENE_KEY] = json.dumps({"folder": str(folder), "first": first, "count": count,
                                   "camera": camera_name, "splat_object": splat_name})
    refresh(scene)


def disable(scene) -> None:
    """Off, the map released and the scene's record removed."""
    stop_map, _ = _nodes()
    _set_switch(0.0)
    if stop_map is not None and stop_map.image is not None:
        img, stop_map.image = stop_map.image, None
        if img.users == 0:
            bpy.data.images.remove(img)
    scene.pop(SCENE_KEY, None)
    scene.pop(OFF_REASON_KEY, None)


def record(scene) -> dict | None:
    raw = scene.get(SCENE_KEY)
    try:
        return json.loads(raw) if raw else None
    except (TypeError, ValueError):
        return None


def _close(a, b) -> bool:
    try:
        return all(abs(float(x) - float(y)) <= MATCH_TOL * max(1.0, abs(float(y)))
                   for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    except (TypeError, ValueError):
        return False


_views_cache: dict = {}


def _views(folder: str) -> dict:
    """views.json of ``folder`` by frame index (parsed once per file version)."""
    path = Path(folder) / "views.json"
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _views_cache:
        _views_cache.clear()
        _views_cache[key] = {v["index"]: v for v in json.loads(path.read_text())}
    return _views_cache[key]


def stale_reason(scene, rec: dict) -> str:
    """Why a render now would trace other rays than the map was made for ("" if none)."""
    frame, last = scene.frame_current, rec["first"] + rec["count"] - 1
    for f in (frame, scene.frame_start, scene.frame_end):
        if not rec["first"] <= f <= last:
            return f"frame {f} is outside the frames the stop maps cover ({rec['first']}-{last})"
    camera, splat = scene.camera, bpy.data.objects.get(rec["splat_object"])
    if camera is None or camera.name != rec["camera"] or camera.type != "CAMERA":
        return f"the scene camera is not '{rec['camera']}'"
    if splat is None:
        return f"the splat object '{rec['splat_object']}' is gone"
    if camera.data.dof.use_dof or scene.render.use_motion_blur:
        return "depth of field or motion blur moves the rays off the pixels' lines"
    cycles = getattr(scene, "cycles", None)
    if cycles is not None and cycles.filter_width > MAX_FILTER_PX:
        return f"the pixel filter is wider than {MAX_FILTER_PX:g} px"
    try:
        view = _views(rec["folder"])[frame]
        K, width, height = exact_display.camera_intrinsics(scene, camera)
    except (OSError, ValueError, KeyError, TypeError, exact_display.ExactDisplayError):
        return "the stop maps' views are unreadable: make them again"
    if (width, height) != (view["width"], view["height"]) or not _close(K, view["K"]):
        return "the camera's lens or the resolution changed"
    if not _close(exact_display.camera_in_object(camera, splat), view["camera_in_object"]):
        return "the camera or the splat object moved"
    return ""


def refresh(scene) -> None:
    """The switch on exactly while this frame's render traces the rays the map was made for."""
    rec = record(scene)
    if rec is None:
        return
    reason = stale_reason(scene, rec)
    _set_switch(0.0 if reason else 1.0)
    if scene.get(OFF_REASON_KEY, "") != reason:
        scene[OFF_REASON_KEY] = reason
