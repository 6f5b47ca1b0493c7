"""The add-on's thread session, without bpy: connecting to the backend, submitting, cancelling, resuming and
following jobs on background threads.

Threads never touch Blender data; they put plain dicts on one thread-safe queue with ``post``. The main thread
drains it with ``next_update()`` (``state.process_updates``, called by a Blender timer) and applies each update
to the scene. Nothing here imports bpy, so it runs (and is tested) outside Blender.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

from .client import AuthError, BackendError, Client, JobWatcher
from .server_process import MANAGER

RETRY_S = 10.0        # how long a watcher keeps retrying an unreachable server before reporting an error

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


def next_update() -> dict | None:
    """The oldest queued update, or None (main thread)."""
    try:
        return _updates.get_nowait()
    except queue.Empty:
        return None


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


def follow(cfg: dict, jobs: list[tuple[str, str, int]]) -> None:
    """Follow already submitted jobs again, [(key, job_id, since)], on a thread (after a .blend is opened)."""

    def work():
        try:
            client, local = connect(cfg)
        except BackendError as exc:
            for key, _, _ in jobs:
                post({"type": "error", "key": key, "message": str(exc)})
            return
        for key, job_id, since in jobs:
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
