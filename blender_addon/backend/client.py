"""HTTP client for the STAG4D backend (docs/api.md, API v1). Standard library only; never imports bpy.

Everything here runs on background threads: ``Client`` makes blocking calls, ``JobWatcher`` follows one job's
events (SSE, long-poll as a fallback), fetches the preview snapshots and the results, and reports what happened
as plain dicts through a callback (``state.post``, a thread-safe queue). Blender data is touched only by the
main-thread pump that drains that queue.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Iterator

API = 1
TERMINAL_STATES = ("finished", "failed", "cancelled", "interrupted")
# What an import needs from a finished job (PLYs stay on the server unless asked for: 100 MB for 30 x 50k).
SEQUENCE_PREFIXES = ("bake/gltf/", "bake/spz/", "bake/canonical.glb")
RESULT_FILES = ("bake/gaussians.usdc", "bake/mesh.usdc", "bake/bake.json", "bake/cameras.json",
                "bake/preview.mp4", "job.json")


class BackendError(Exception):
    """A failure a user can act on; ``str(e)`` is one line."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class AuthError(BackendError):
    """401: the token is missing or wrong."""


class Unreachable(BackendError):
    """No answer: connection refused or reset, DNS failure, timeout."""


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


class Client:
    """Blocking calls to one server. Thread-safe (no shared mutable state besides the opener)."""

    def __init__(self, url: str, token: str, timeout: float = 15.0):
        url = (url or "").strip().rstrip("/")
        if not url:
            raise BackendError("No server address: set the remote URL in the add-on preferences")
        if "://" not in url:
            url = "http://" + url
        self.url = url
        self.token = (token or "").strip()
        self.timeout = timeout
        self.info_cache: dict = {}  # the last /v1/info answer (state.connect fills it)
        # A system proxy must not see (or break) calls to a server on this machine.
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(url) else []
        self._opener = urllib.request.build_opener(*handlers)

    # -- plumbing -------------------------------------------------------------------------------------------
    def _open(self, method: str, path: str, *, body=None, headers=None, timeout=None, auth=True):
        hdrs = {"Accept": "application/json", "User-Agent": "stag4d-blender"}
        if auth and self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        hdrs.update(headers or {})
        req = urllib.request.Request(self.url + path, data=body, headers=hdrs, method=method)
        try:
            return self._opener.open(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc, method, path) from None
        except urllib.error.URLError as exc:
            raise Unreachable(self._unreachable_text(exc.reason)) from None
        except (ConnectionError, socket.timeout, TimeoutError, OSError) as exc:
            raise Unreachable(self._unreachable_text(exc)) from None

    def _unreachable_text(self, reason) -> str:
        if isinstance(reason, ConnectionRefusedError):
            why = "connection refused: is the server running?"
        elif isinstance(reason, (socket.timeout, TimeoutError)):
            why = "no answer in time"
        elif isinstance(reason, ConnectionResetError):
            why = "the connection was reset: did the server stop?"
        else:
            why = str(reason) or type(reason).__name__
        return f"Cannot reach the STAG4D server at {self.url} ({why})"

    def _http_error(self, exc: urllib.error.HTTPError, method: str, path: str) -> BackendError:
        detail = ""
        try:
            payload = json.loads(exc.read().decode("utf-8", "replace") or "{}")
            detail = payload.get("detail") if isinstance(payload, dict) else ""
            if not isinstance(detail, str):  # FastAPI validation errors are lists
                detail = json.dumps(detail)[:300]
        except (ValueError, OSError):
            pass
        if exc.code == 401:
            return AuthError(f"The server at {self.url} refused the token (401{': ' + detail if detail else ''}); "
                             "check the token in the add-on preferences", 401)
        text = detail or exc.reason or "error"
        return BackendError(f"{method} {path}: {exc.code} {text}", exc.code)

    def _json(self, method: str, path: str, payload=None, *, auth=True, timeout=None):
        body, headers = None, {}
        if payload is not None:
            body = json.dumps(payload).encode("utf-8")
            headers["Content-Type"] = "application/json"
        with self._open(method, path, body=body, headers=headers, auth=auth, timeout=timeout) as resp:
            raw = resp.read()
        if not raw:
            return None
        try:
            return json.loads(raw.decode("utf-8"))
        except ValueError:
            raise BackendError(f"{method} {path}: the server sent something that is not JSON "
                               f"(is {self.url} a STAG4D server?)") from None

    # -- endpoints ------------------------------------------------------------------------------------------
    def health(self, timeout: float = 5.0) -> dict:
        out = self._json("GET", "/v1/health", auth=False, timeout=timeout)
        if not isinstance(out, dict) or out.get("status") != "ok":
            raise BackendError(f"{self.url} answered /v1/health with {out!r}: not a STAG4D server")
        if out.get("api") != API:
            raise BackendError(f"{self.url} speaks API {out.get('api')}, this add-on speaks {API}: update one")
        return out

    def info(self) -> dict:
        return self._json("GET", "/v1/info")

    def create_job(self, kind: str, options: dict | None = None, *, prompt: str | None = None,
                   path: str | None = None) -> dict:
        body = {"kind": kind, "options": dict(options or {})}
        if prompt is not None:
            body["prompt"] = prompt
        if path is not None:
            body["path"] = path
        return self._json("POST", "/v1/jobs", body)

    def upload_job(self, file_path: str | Path, options: dict | None = None, timeout: float = 600.0) -> dict:
        """multipart/form-data: ``file`` (streamed from disk) and ``options`` (a JSON string)."""
        file_path = Path(file_path)
        boundary = "stag4d-" + uuid.uuid4().hex
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"options\"\r\n"
                f"Content-Type: application/json\r\n\r\n{json.dumps(dict(options or {}))}\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"{file_path.name.replace(chr(34), '_')}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode("utf-8")
        tail = f"\r\n--{boundary}--\r\n".encode("utf-8")
        size = file_path.stat().st_size

        def body():
            yield head
            with open(file_path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    yield chunk
            yield tail

        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}",
                   "Content-Length": str(len(head) + size + len(tail))}
        with self._open("POST", "/v1/jobs", body=body(), headers=headers, timeout=timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def get_job(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{_quote(job_id)}")

    def list_jobs(self) -> list[dict]:
        return (self._json("GET", "/v1/jobs") or {}).get("jobs", [])

    def cancel(self, job_id: str) -> dict:
        return self._json("POST", f"/v1/jobs/{_quote(job_id)}/cancel")

    def resume(self, job_id: str) -> dict:
        return self._json("POST", f"/v1/jobs/{_quote(job_id)}/resume")

    def delete(self, job_id: str) -> None:
        self._json("DELETE", f"/v1/jobs/{_quote(job_id)}")

    def files(self, job_id: str) -> list[dict]:
        return (self._json("GET", f"/v1/jobs/{_quote(job_id)}/files") or {}).get("files", [])

    def download(self, job_id: str, name: str, dest: str | Path, timeout: float = 300.0) -> Path:
        """Stream one job file to ``dest`` (atomically: temporary name, then rename)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".part-", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, self._open(
                    "GET", f"/v1/jobs/{_quote(job_id)}/files/{urllib.parse.quote(name, safe='/')}",
                    headers={"Accept": "*/*"}, timeout=timeout) as resp:
                shutil.copyfileobj(resp, out, 1 << 20)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest

    def poll_events(self, job_id: str, since: int = 0, wait: float = 10.0) -> tuple[list[dict], int]:
        """Long-poll: the events numbered ``since`` and later (waits up to ``wait`` s for the first one)."""
        out = self._json("GET", f"/v1/jobs/{_quote(job_id)}/events?since={int(since)}&format=json&wait={wait:g}",
                         timeout=wait + self.timeout)
        events = list(out.get("events", []))
        return events, int(out.get("next", since + len(events)))

    def stream_events(self, job_id: str, since: int = 0, read_timeout: float = 30.0) -> Iterator[dict]:
        """Server-sent events from ``since`` on; ends when the server closes the stream (after the job's
        terminal ``job_state``). A silent connection raises ``Unreachable`` after ``read_timeout`` s."""
        resp = self._open("GET", f"/v1/jobs/{_quote(job_id)}/events?since={int(since)}",
                          headers={"Accept": "text/event-stream"}, timeout=read_timeout)
        with resp:
            ctype = resp.headers.get("Content-Type", "")
            if "text/event-stream" not in ctype:
                # A server (or proxy) that answered with JSON: treat it as one long-poll answer.
                out = json.loads(resp.read().decode("utf-8") or "{}")
                yield from out.get("events", [])
                return
            data, kind, ev_id = [], None, None
            while True:
                try:
                    line = resp.readline()
                except (socket.timeout, TimeoutError) as exc:
                    raise Unreachable(self._unreachable_text(exc)) from None
                except (ConnectionError, OSError) as exc:
                    raise Unreachable(self._unreachable_text(exc)) from None
                if not line:
                    return
                line = line.decode("utf-8", "replace").rstrip("\r\n")
                if not line:
                    if data:
                        try:
                            event = json.loads("\n".join(data))
                        except ValueError:
                            event = {"kind": kind or "message", "data": "\n".join(data)}
                        if isinstance(event, dict):
                            event.setdefault("kind", kind)
                            if ev_id is not None and "n" not in event:
                                event["n"] = int(ev_id)
                            yield event
                    data, kind, ev_id = [], None, None
                    continue
                if line.startswith(":"):
                    continue  # keep-alive comment
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "data":
                    data.append(value)
                elif field == "event":
                    kind = value
                elif field == "id":
                    ev_id = value if value.isdigit() else None


def _quote(job_id: str) -> str:
    return urllib.parse.quote(str(job_id), safe="")


# ---- following a job ---------------------------------------------------------------------------------------

Sink = Callable[[dict], None]


class JobWatcher(threading.Thread):
    """Follows one job until it ends; reports through ``sink(update)``:

    ``{"type": "event", "event": {...}}`` for every job event, ``{"type": "preview", "path", "event"}`` once a
    preview snapshot is on this machine, ``{"type": "done", "job", "directory"}`` when a finished job's results
    are on this machine, ``{"type": "job", "job"}`` for other terminal states, ``{"type": "error", "message",
    "auth"}`` when it gives up (wrong token, server gone for longer than ``retry_s``). Every update also has
    ``"key"`` (the add-on's id of the job entry) and ``"job_id"``.
    """

    def __init__(self, client: Client, key: str, job_id: str, sink: Sink, fetch_dir: str | Path,
                 local_job_dir: str | Path | None = None, since: int = 0, previews: bool = True,
                 retry_s: float = 10.0, use_sse: bool = True, preview_dir: str | Path | None = None,
                 keep_previews: int = 4):
        super().__init__(name=f"stag4d-watch-{job_id}", daemon=True)
        self.client, self.key, self.job_id, self.sink = client, key, job_id, sink
        self.fetch_dir = Path(fetch_dir)
        # Our own copies of the snapshots: the server prunes its old ones while Blender may still show them.
        self.preview_dir = Path(preview_dir) if preview_dir else self.fetch_dir / "previews"
        self.keep_previews = keep_previews
        self.local_job_dir = Path(local_job_dir) if local_job_dir else None
        self.since, self.previews, self.retry_s, self.use_sse = int(since), previews, retry_s, use_sse
        self._halt = threading.Event()
        self.finished_state: str | None = None

    def stop(self) -> None:
        self._halt.set()

    @property
    def stopped(self) -> bool:
        return self._halt.is_set()

    def _post(self, **update) -> None:
        if not self._halt.is_set():
            self.sink(dict(update, key=self.key, job_id=self.job_id))

    def run(self) -> None:
        try:
            self._follow()
        except AuthError as exc:
            self._post(type="error", message=str(exc), auth=True)
        except BackendError as exc:
            self._post(type="error", message=str(exc), auth=False)
        except Exception as exc:  # noqa: BLE001 - a thread must report, never die silently
            self._post(type="error", message=f"{type(exc).__name__}: {exc}", auth=False)

    def _events(self) -> Iterator[dict]:
        if self.use_sse:
            yield from self.client.stream_events(self.job_id, self.since)
        else:
            events, _ = self.client.poll_events(self.job_id, self.since, wait=10.0)
            yield from events

    def _follow(self) -> None:
        down_since = None
        while not self._halt.is_set():
            try:
                terminal = False
                for event in self._events():
                    if self._halt.is_set():
                        return
                    down_since = None
                    n = event.get("n")
                    if isinstance(n, int):
                        self.since = max(self.since, n + 1)
                    self._post(type="event", event=event)
                    if event.get("kind") == "preview" and self.previews and event.get("file"):
                        self._fetch_preview(event)
                    if event.get("kind") == "job_state" and event.get("state") in TERMINAL_STATES:
                        terminal = True
                        break
                job = self.client.get_job(self.job_id)
                down_since = None
                if terminal or job.get("state") in TERMINAL_STATES:
                    if job.get("state") not in TERMINAL_STATES:
                        continue  # a resumed job: keep following
                    self.finished_state = job.get("state")
                    if job["state"] == "finished":
                        directory = self._fetch_results(job)
                        self._post(type="done", job=job, directory=str(directory))
                    else:
                        self._post(type="job", job=job)
                    return
            except AuthError:
                raise
            except Unreachable as exc:
                try:  # a quiet stream that timed out is not a dead server
                    self.client.health(timeout=3.0)
                    down_since = None
                    self._halt.wait(0.2)
                    continue
                except BackendError:
                    pass
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since > self.retry_s:
                    raise Unreachable(f"Lost the STAG4D server while following job {self.job_id}: {exc}") from None
                self._halt.wait(0.5)

    # -- files ----------------------------------------------------------------------------------------------
    def _local(self, name: str) -> Path | None:
        if self.local_job_dir is not None:
            p = self.local_job_dir / name
            if p.is_file():
                return p
        return None

    def _fetch_preview(self, event: dict) -> None:
        name = event["file"]
        dest = self.preview_dir / self.job_id / f"{int(event.get('step') or 0):06d}" / Path(name).name
        try:
            src = self._local(name)
            if src is not None:
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(".part-" + dest.name)
                shutil.copyfile(src, tmp)
                os.replace(tmp, dest)
            else:
                self.client.download(self.job_id, name, dest)
        except Unreachable:
            raise
        except (BackendError, OSError) as exc:  # e.g. already pruned on the server: the next one will do
            self._post(type="note", message=f"preview {name} skipped: {exc}")
            return
        self._post(type="preview", path=str(dest), event=event)
        self._prune_previews()

    def _prune_previews(self) -> None:
        root = self.preview_dir / self.job_id
        steps = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name)
        for old in steps[:-self.keep_previews]:
            shutil.rmtree(old, ignore_errors=True)

    def _fetch_results(self, job: dict) -> Path:
        """The directory the import reads: the server's own job folder when it is on this machine, else a
        mirror of the result files under ``fetch_dir/<job id>``."""
        if self.local_job_dir is not None and (self.local_job_dir / "bake" / "gaussians.usdc").is_file():
            return self.local_job_dir
        target = self.fetch_dir / self.job_id
        listing = {f.get("name"): f for f in self.client.files(self.job_id)}
        wanted = [n for n in RESULT_FILES if n in listing]
        result = job.get("result") or {}
        for extra in (result.get("usd"), result.get("mesh")):
            if extra and extra in listing and extra not in wanted:
                wanted.append(extra)
        # The per-frame splat files, when the job baked them (for the glTF / SPZ exports).
        wanted += sorted(n for n in listing if n.startswith(SEQUENCE_PREFIXES) and n not in wanted)
        if not any(n.endswith("gaussians.usdc") for n in wanted):
            raise BackendError(f"job {self.job_id} finished but has no bake/gaussians.usdc on the server")
        for name in wanted:
            dest = target / name
            size = listing[name].get("size")
            if dest.is_file() and size is not None and dest.stat().st_size == size:
                continue
            self.client.download(self.job_id, name, dest)
        return target


__all__ = ["Client", "JobWatcher", "BackendError", "AuthError", "Unreachable", "TERMINAL_STATES", "RESULT_FILES"]
