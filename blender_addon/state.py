"""The bridge between background threads and Blender data.

Threads (job submission, event watchers, cancel requests, connection checks) never touch ``bpy``; they put
plain dicts on one thread-safe queue with ``post``. ``process_updates()`` drains that queue on the main thread
and applies each update to the scene's job entries, imports previews and results, and asks the UI to redraw.
In Blender a persistent timer calls it; tests (the bpy module has no event loop, so timers never fire) call it
directly. Nothing here blocks: network and process work always runs on a thread.
"""

from __future__ import annotations

import time
from pathlib import Path
import traceback
import uuid

import bpy

from . import importer
from .backend.client import TERMINAL_STATES
from .backend.server_process import MANAGER
from .backend.session import (INFO, STATUS, busy, cancel, check_connection, follow, next_update, post, resume,
                              stop_all, submit)
from .preferences import get_prefs, local_jobs_dir, remote_jobs_dir, results_dir, token_file
from .props import ACTIVE_STATES

TIMER_BUSY_S = 0.25   # pump interval while something is in flight
TIMER_IDLE_S = 1.0

# ---- backend configuration (read on the main thread, used on threads) ----------------------------------------

def backend_config(prefs=None) -> dict:
    prefs = prefs or get_prefs()
    return {"backend": prefs.backend, "python_path": bpy.path.abspath(prefs.python_path or ""),
            "port": int(prefs.local_port), "remote_url": prefs.remote_url, "token": prefs.remote_token,
            "jobs_dir": str(local_jobs_dir(prefs)), "remote_dir": str(remote_jobs_dir(prefs)),
            "token_file": str(token_file(prefs)), "live_preview": bool(prefs.live_preview),
            "preview_dir": str(results_dir(prefs) / "previews")}


def reattach(cfg: dict) -> None:
    """After a .blend is opened: follow its unfinished jobs again (remote server or a local one still running)."""
    items = [(it.key, it.job_id, it.last_event + 1) for _, it in iter_items()
             if it.state in ACTIVE_STATES and it.job_id]
    if not items:
        return
    if cfg["backend"] == "LOCAL" and not MANAGER.running:
        for key, _, _ in items:
            post({"type": "job", "key": key, "job": {"state": "interrupted"}, "final": False,
                  "message": "The local server stopped (Blender was closed); press Resume to continue"})
        return
    follow(cfg, items)


# ---- the main-thread pump ----------------------------------------------------------------------------------

def iter_items():
    for scene in bpy.data.scenes:
        settings = getattr(scene, "stag4d", None)
        if settings is None:
            continue
        for item in settings.jobs:
            yield scene, item


def find_item(key: str):
    for scene, item in iter_items():
        if item.key == key:
            return scene, item
    return None, None


def new_item(scene, name: str, kind: str, backend: str, import_mesh: bool = False):
    settings = scene.stag4d
    item = settings.jobs.add()
    item.key = uuid.uuid4().hex
    item.name = name
    item.kind = kind
    item.backend = backend
    item.state = "submitting"
    item.created = time.time()
    item.import_mesh = import_mesh
    settings.active_job = len(settings.jobs) - 1
    return item


def process_updates(max_items: int = 500) -> int:
    """Apply queued updates (main thread). Returns how many were applied. Never raises."""
    n = 0
    while n < max_items:
        update = next_update()
        if update is None:
            break
        n += 1
        try:
            _apply(update)
        except Exception as exc:  # noqa: BLE001 - one bad update must not stop the pump
            traceback.print_exc()
            _, item = find_item(update.get("key", ""))
            if item is not None:
                item.error = f"{type(exc).__name__}: {exc}"
    if n:
        _redraw()
    return n


def timer() -> float:
    process_updates()
    return TIMER_BUSY_S if busy() else TIMER_IDLE_S


def ensure_timer() -> None:
    if not bpy.app.timers.is_registered(timer):
        bpy.app.timers.register(timer, first_interval=TIMER_BUSY_S, persistent=True)


def remove_timer() -> None:
    if bpy.app.timers.is_registered(timer):
        bpy.app.timers.unregister(timer)


def _redraw() -> None:
    wm = bpy.context.window_manager
    if wm is None:
        return
    for window in wm.windows:
        for area in window.screen.areas:
            if area.type in ("VIEW_3D", "PROPERTIES"):
                area.tag_redraw()


def _apply(update: dict) -> None:
    kind = update.get("type")
    if kind == "status":
        STATUS["text"] = update.get("text", "")
        STATUS["error"] = bool(update.get("error"))
        STATUS["busy"] = bool(update.get("busy"))
        return
    if kind == "info":
        INFO.clear()
        INFO.update(update.get("info") or {})
        STATUS["url"] = update.get("url", "")
        return
    scene, item = find_item(update.get("key", ""))
    if item is None:
        return  # the entry was removed, or belongs to a file that is no longer open
    if update.get("job_id") and item.job_id and update["job_id"] != item.job_id:
        return  # a stale watcher of an earlier submission
    if kind == "created":
        job = update["job"]
        item.job_id = job.get("id", "")
        item.server_url = update.get("url", "")
        _apply_job(item, job)
    elif kind == "event":
        _apply_event(item, update["event"])
    elif kind == "preview":
        _apply_preview(scene, item, update)
    elif kind == "done":
        _apply_job(item, update["job"])
        _apply_done(scene, item, update["directory"])
    elif kind == "job":
        _apply_job(item, update["job"])
        if update.get("message"):
            item.message = update["message"]
    elif kind == "error":
        if item.state in ACTIVE_STATES or item.state in ("importing", ""):
            item.state = "error"
        item.error = update.get("message", "error")
    elif kind == "note":
        item.message = update.get("message", "")
    elif kind == "exact":
        _apply_exact(scene, item, update)
    elif kind == "ray_stop":
        _apply_ray_stop(scene, item, update)


def _apply_exact(scene, item, update: dict) -> None:
    """Progress of the exact display's backend render; when it is done, the compositor set-up."""
    from . import exact_display

    if update.get("error"):
        item.error = update["error"]
        return
    if update.get("folder"):
        first, count = scene.frame_start, scene.frame_end - scene.frame_start + 1
        exact_display.setup_compositor(scene, Path(update["folder"]), first, count, item.gaussians)
        item.message = f"Exact display: {update['total']} frames by the backend's rasteriser, in the compositor"
    else:
        item.message = f"Exact display: the backend renders frame {update['done']} / {update['total']}"


def _apply_ray_stop(scene, item, update: dict) -> None:
    """Progress of the ray stop's backend maps; when they are done, the splat material uses them."""
    from . import ray_stop

    if update.get("error"):
        item.error = update["error"]
        return
    if update.get("folder"):
        first, count = int(update.get("first", scene.frame_start)), int(update["total"])
        camera = scene.camera.name if scene.camera is not None else ""
        try:
            ray_stop.enable(scene, Path(update["folder"]), first, count, camera, item.gaussians.name)
        except (RuntimeError, OSError) as exc:
            item.error = f"Ray stop: {exc}"
            return
        off = scene.get(ray_stop.OFF_REASON_KEY, "")
        item.message = (f"Ray stop: {update['total']} frames of stop maps; Cycles ends camera rays at them"
                        if not off else f"Ray stop made, but off now: {off}")
    else:
        item.message = f"Ray stop: the backend maps frame {update['done']} / {update['total']}"


def _apply_job(item, job: dict) -> None:
    state = job.get("state")
    if state:
        item.state = state
    if job.get("error"):
        item.error = str(job["error"])
    if job.get("stage"):
        item.stage = job["stage"]
    prog = job.get("progress") or None
    if isinstance(prog, dict):
        _apply_progress(item, prog)
    if job.get("licences"):
        item.licences = "\n".join(_licence_line(x) for x in job["licences"])
    if isinstance(job.get("last_event"), int):
        item.last_event = max(item.last_event, job["last_event"])
    if state == "cancelled":
        item.message = "Cancelled"


def _licence_line(x) -> str:
    if isinstance(x, dict):
        note = x.get("licence_note") or ""
        return f"{x.get('model', '?')}: {x.get('licence', '?')}{' - ' + note if note else ''}"
    return str(x)


def _apply_progress(item, p: dict) -> None:
    if p.get("stage"):
        item.stage = p["stage"]
    if p.get("step") is not None:
        item.step = int(p["step"])
    if p.get("total") is not None:
        item.total = int(p["total"])
    if p.get("loss") is not None:
        item.loss = float(p["loss"])
    if p.get("elapsed_s") is not None:
        item.elapsed = float(p["elapsed_s"])
    eta = p.get("eta_s")
    if eta is None and item.step > 0 and item.total > item.step and item.elapsed > 0:
        eta = item.elapsed / item.step * (item.total - item.step)
    item.eta = float(eta) if eta is not None else -1.0


def _apply_event(item, ev: dict) -> None:
    n = ev.get("n")
    if isinstance(n, int):
        item.last_event = max(item.last_event, n)
    k = ev.get("kind")
    if k == "job_state":
        if ev.get("state"):
            item.state = ev["state"] if ev["state"] != "finished" else "importing"
        if ev.get("error"):
            item.error = str(ev["error"])
    elif k == "stage_started":
        item.stage = ev.get("stage", "")
        item.step, item.total, item.loss, item.eta = 0, 0, -1.0, -1.0
        item.message = f"{item.stage}: started"
    elif k == "progress":
        _apply_progress(item, ev)
        if ev.get("message"):
            item.message = str(ev["message"])
    elif k == "stage_finished":
        item.message = f"{ev.get('stage', '')}: done in {float(ev.get('elapsed_s') or 0):.1f} s"
    elif k == "stage_skipped":
        item.message = f"{ev.get('stage', '')}: already done"
    elif k == "stage_failed":
        item.error = f"{ev.get('stage', '')}: {ev.get('error', 'failed')}"
    elif k == "preview":
        item.message = f"preview at step {ev.get('step', '?')}"
    elif k == "note":
        item.message = str(ev.get("message", ""))


def _apply_preview(scene, item, update: dict) -> None:
    if item.state not in ACTIVE_STATES and item.state != "importing":
        return  # the result is already in: a late snapshot must not replace it
    ev = update.get("event") or {}
    coll, obj = importer.show_preview(scene, update["path"], label=item.name, job_key=item.key,
                                      collection=item.collection, gaussians=item.gaussians,
                                      frames=ev.get("frames"))
    item.collection, item.gaussians = coll, obj
    item.previews += 1


def _apply_done(scene, item, directory: str) -> None:
    item.directory = directory
    item.state = "importing"
    prefs = get_prefs()
    try:
        res = importer.import_job(directory, scene, name=item.name, mesh=item.import_mesh, job_key=item.key,
                                  collection=item.collection, gaussians=item.gaussians,
                                  standard_colors=prefs.standard_colors,
                                  backend_look=prefs.backend_look)
    except Exception as exc:  # noqa: BLE001
        item.state = "finished"
        item.error = f"Import failed: {exc}"
        raise
    item.collection, item.gaussians, item.imported = res.collection, res.gaussians, True
    if res.mesh is not None:
        item.mesh = res.mesh
    item.state = "finished"
    item.error = ""
    item.message = f"Imported ({res.frames or '?'} frames at {res.fps or '?'} fps)"


def is_terminal(state: str) -> bool:
    return state in TERMINAL_STATES or state == "error"


__all__ = ["post", "process_updates", "timer", "ensure_timer", "submit", "cancel", "resume", "check_connection",
           "reattach", "stop_all", "backend_config", "new_item", "find_item", "iter_items", "STATUS", "INFO"]
