"""The bridge between background threads and Blender data.

Threads (job submission, event watchers, cancel requests, connection checks) never touch ``bpy``; they put
plain dicts on one thread-safe queue with ``post``. ``process_updates()`` drains that queue on the main thread
and applies each update to the scene's job entries, imports previews and results, and asks the UI to redraw.
In Blender a persistent timer calls it; tests (the bpy module has no event loop, so timers never fire) call it
directly. Nothing here blocks: network and process work always runs on a thread.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
import uuid
from pathlib import Path

import bpy

from . import importer
from .client import AuthError, BackendError, Client, JobWatcher, TERMINAL_STATES
from .preferences import get_prefs, local_jobs_dir, remote_jobs_dir, results_dir, token_file
from .props import ACTIVE_STATES
from .server_process import MANAGER

RETRY_S = 10.0        # how long a watcher keeps retrying an unreachable server before reporting an error
TIMER_BUSY_S = 0.25   # pump interval while something is in flight
TIMER_IDLE_S = 1.0

_updates: "queue.Queue[dict]" = queue.Queue()
_lock = threading.Lock()
_watchers: dict[str, JobWatcher] = {}
_clients: dict[str, Client] = {}
_cancel_requested: set[str] = set()
_threads: list[threading.Thread] = []
# Not tied to one job: the connection line of the panel and the server's /v1/info (models, licences).
STATUS = {"text": "", "error": False, "url": "", "busy": False}
INFO: dict = {}


def post(update: dict) -> None:
    """Thread-safe: queue an update for the main thread."""
    _updates.put(update)


def busy() -> bool:
    with _lock:
        alive = any(w.is_alive() for w in _watchers.values()) or any(t.is_alive() for t in _threads)
    return alive or not _updates.empty()


def _spawn(target, *args, name="stag4d-worker") -> threading.Thread:
    t = threading.Thread(target=target, args=args, name=name, daemon=True)
    with _lock:
        _threads[:] = [x for x in _threads if x.is_alive()]
        _threads.append(t)
    t.start()
    return t


# ---- backend configuration (read on the main thread, used on threads) ----------------------------------------

def backend_config(prefs=None) -> dict:
    prefs = prefs or get_prefs()
    return {"backend": prefs.backend, "python_path": bpy.path.abspath(prefs.python_path or ""),
            "port": int(prefs.local_port), "remote_url": prefs.remote_url, "token": prefs.remote_token,
            "jobs_dir": str(local_jobs_dir(prefs)), "remote_dir": str(remote_jobs_dir(prefs)),
            "token_file": str(token_file(prefs)), "live_preview": bool(prefs.live_preview),
            "preview_dir": str(results_dir(prefs) / "previews")}


def connect(cfg: dict) -> tuple[Client, Path | None]:
    """(client, the server's jobs folder when it is on this machine). Starts the local server if needed.
    Runs on a worker thread; raises BackendError with a one-line message."""
    if cfg["backend"] == "LOCAL":
        if not MANAGER.running:
            post({"type": "status", "text": "Starting the local STAG4D server...", "busy": True})
        srv = MANAGER.ensure_local(cfg["python_path"], cfg["jobs_dir"], cfg["token_file"], cfg["port"])
        client = Client(srv.url, srv.token)
        local = Path(cfg["jobs_dir"])
    else:
        client = Client(cfg["remote_url"], cfg["token"])
        client.health()
        local = None
    info = client.info()  # also proves the token is right before a job is sent
    client.info_cache = info
    post({"type": "info", "info": info, "url": client.url})
    return client, local


def _fetch_dir(cfg: dict, local: Path | None) -> Path:
    return Path(cfg["jobs_dir"]) if local is not None else Path(cfg["remote_dir"])


def _start_watcher(client: Client, key: str, job_id: str, cfg: dict, local: Path | None, since: int = 0) -> None:
    w = JobWatcher(client, key, job_id, post, _fetch_dir(cfg, local),
                   local_job_dir=(local / job_id) if local is not None else None, since=since,
                   previews=cfg["live_preview"], retry_s=RETRY_S, preview_dir=cfg["preview_dir"])
    with _lock:
        old = _watchers.pop(key, None)
        if old is not None:
            old.stop()
        _watchers[key] = w
        _clients[key] = client
    w.start()


# ---- work started from operators ---------------------------------------------------------------------------

def submit(key: str, request: dict, cfg: dict) -> None:
    """Create a job on the server (thread), then follow it. ``request``: kind, options and either prompt,
    path (local server) or upload (a file to send)."""

    def work():
        try:
            client, local = connect(cfg)
            post({"type": "status", "text": f"Connected to {client.url}", "busy": False})
            if request.get("path") and local is None:
                size, limit = Path(request["path"]).stat().st_size, client.info_cache.get("max_upload_bytes")
                if limit and size > limit:  # the server would answer 413 only after the upload starts
                    raise BackendError(f"{Path(request['path']).name} is {size / 1e6:.0f} MB; the server accepts "
                                       f"at most {limit / 1e6:.0f} MB (its --max-upload-mb)")
                job = client.upload_job(request["path"], request.get("options"))
            else:
                job = client.create_job(request["kind"], request.get("options"), prompt=request.get("prompt"),
                                        path=request.get("path") if local is not None else None)
            post({"type": "created", "key": key, "job": job, "url": client.url})
            with _lock:
                cancel_now = key in _cancel_requested
            if cancel_now:
                client.cancel(job["id"])
            _start_watcher(client, key, job["id"], cfg, local)
        except AuthError as exc:
            post({"type": "error", "key": key, "message": str(exc), "auth": True})
            post({"type": "status", "text": str(exc), "error": True, "busy": False})
        except BackendError as exc:
            post({"type": "error", "key": key, "message": str(exc)})
            post({"type": "status", "text": str(exc), "error": True, "busy": False})
        except Exception as exc:  # noqa: BLE001 - report, never die silently on a thread
            post({"type": "error", "key": key, "message": f"{type(exc).__name__}: {exc}"})

    _spawn(work, name=f"stag4d-submit-{key[:8]}")


def cancel(key: str, job_id: str, cfg: dict) -> None:
    """Ask the server to cancel (thread). A job still being submitted is cancelled once it has an id."""
    with _lock:
        _cancel_requested.add(key)
        client = _clients.get(key)
    if not job_id:
        post({"type": "note", "key": key, "message": "Cancelling as soon as the server accepts the job"})
        return

    def work():
        try:
            c = client or connect(cfg)[0]
            job = c.cancel(job_id)
            post({"type": "job", "key": key, "job_id": job_id, "job": job, "final": False})
        except AuthError as exc:
            post({"type": "error", "key": key, "message": str(exc), "auth": True})
        except BackendError as exc:
            if exc.status == 409:  # it ended (finished or failed) before the request arrived
                post({"type": "note", "key": key, "message": "The job had already ended"})
            else:  # the server is gone: nothing runs any more, so the job is effectively stopped
                post({"type": "error", "key": key, "message": f"Cancel: {exc}"})

    _spawn(work, name=f"stag4d-cancel-{job_id}")


def resume(key: str, job_id: str, cfg: dict, since: int) -> None:
    def work():
        try:
            client, local = connect(cfg)
            job = client.resume(job_id)
            post({"type": "job", "key": key, "job_id": job_id, "job": job, "final": False})
            _start_watcher(client, key, job_id, cfg, local, since=since)
        except BackendError as exc:
            post({"type": "error", "key": key, "message": str(exc), "auth": isinstance(exc, AuthError)})

    _spawn(work, name=f"stag4d-resume-{job_id}")


def check_connection(cfg: dict) -> None:
    """Connect (starting the local server if needed) and fetch /v1/info, on a thread."""

    def work():
        try:
            client, _ = connect(cfg)
            post({"type": "status", "text": f"Connected to {client.url}", "busy": False})
        except BackendError as exc:
            post({"type": "status", "text": str(exc), "error": True, "busy": False})

    _spawn(work, name="stag4d-connect")


def reattach(cfg: dict) -> None:
    """After a .blend is opened: follow its unfinished jobs again (remote server or a local one still running)."""
    items = [(it.key, it.job_id, it.last_event + 1, it.backend) for _, it in iter_items()
             if it.state in ACTIVE_STATES and it.job_id]
    if not items:
        return
    if cfg["backend"] == "LOCAL" and not MANAGER.running:
        for key, _, _, _ in items:
            post({"type": "job", "key": key, "job": {"state": "interrupted"}, "final": False,
                  "message": "The local server stopped (Blender was closed); press Resume to continue"})
        return

    def work():
        try:
            client, local = connect(cfg)
        except BackendError as exc:
            for key, _, _, _ in items:
                post({"type": "error", "key": key, "message": str(exc)})
            return
        for key, job_id, since, _ in items:
            _start_watcher(client, key, job_id, cfg, local, since=max(0, since))

    _spawn(work, name="stag4d-reattach")


def stop_all(stop_server: bool = True) -> None:
    with _lock:
        watchers = list(_watchers.values())
        _watchers.clear()
        _clients.clear()
        _cancel_requested.clear()
    for w in watchers:
        w.stop()
    if stop_server:
        MANAGER.stop()
    while not _updates.empty():
        try:
            _updates.get_nowait()
        except queue.Empty:
            break


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
        try:
            update = _updates.get_nowait()
        except queue.Empty:
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
                                  standard_colors=prefs.standard_colors)
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
