"""Start, health-check and stop a local `stag4d serve` (docs/api.md "Starting the server"). No bpy.

The server prints one JSON line first, ``{"url", "host", "port", "token_file", "pid"}``; the token is in
``token_file``. Its log (everything after that line, and stderr) goes to ``server.log`` beside the jobs folder,
so a user has something to read when it fails. The server is stopped when Blender quits (atexit), when the
add-on is disabled, or from the panel.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from .client import BackendError, Client

REPO_GUESS = Path(__file__).resolve().parents[2]  # when the add-on runs from a checkout (development)


def find_backend_command(python_path: str = "") -> list[str]:
    """How to run the backend: the configured interpreter, ``$STAG4D_PYTHON``, the checkout's ``.venv``, or a
    ``stag4d`` executable on PATH."""
    candidates = []
    if python_path:
        candidates.append(("pref", Path(os.path.expanduser(python_path))))
    if os.environ.get("STAG4D_PYTHON"):
        candidates.append(("env", Path(os.environ["STAG4D_PYTHON"])))
    for rel in (".venv/bin/python", ".venv/Scripts/python.exe"):
        candidates.append(("repo", REPO_GUESS / rel))
    for source, path in candidates:
        if path.is_file():
            return [str(path), "-m", "stag4d_backend.cli"]
        if source == "pref":
            raise BackendError(f"Backend interpreter not found: {path} (fix it in the add-on preferences)")
    exe = shutil.which("stag4d")
    if exe:
        return [exe]
    raise BackendError("No STAG4D backend found: set 'Backend Python' in the add-on preferences to the python of "
                       "the environment where stag4d is installed (e.g. <repo>/.venv/bin/python)")


class LocalServer:
    """One `stag4d serve` child process."""

    def __init__(self, command: list[str], jobs_dir: str | Path, token_file: str | Path, port: int = 0,
                 host: str = "127.0.0.1", extra_args: tuple[str, ...] = ("--allow-server-paths", "--no-resume")):
        self.command = list(command)
        self.jobs_dir = Path(jobs_dir)
        self.token_file = Path(token_file)
        self.port, self.host, self.extra_args = int(port), host, tuple(extra_args)
        self.log_path = self.jobs_dir.parent / "server.log"
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.token: str | None = None
        self.address: dict = {}

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self) -> list[str]:
        return self.command + ["serve", "--host", self.host, "--port", str(self.port),
                               "--token-file", str(self.token_file), "--jobs-dir", str(self.jobs_dir),
                               *self.extra_args]

    def start(self, timeout: float = 90.0) -> "LocalServer":
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.token_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab", buffering=0)
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.argv())}\n".encode())
        kwargs = {}
        if os.name == "posix":
            kwargs["start_new_session"] = True  # Ctrl-C in Blender's terminal must not kill jobs mid-write
        else:
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                     env=env, **kwargs)
        lines: queue.Queue = queue.Queue()

        def pump():
            first = True
            for raw in iter(self.proc.stdout.readline, b""):
                if first:
                    lines.put(raw)
                    first = False
                else:
                    log.write(raw)  # drained, so the server never blocks on a full pipe
            lines.put(None)
            log.close()

        threading.Thread(target=pump, name="stag4d-serve-stdout", daemon=True).start()
        try:
            raw = lines.get(timeout=timeout)
        except queue.Empty:
            self.stop()
            raise BackendError(f"stag4d serve printed nothing in {timeout:.0f} s (log: {self.log_path})") from None
        if raw is None:
            code = self.proc.wait()
            raise BackendError(f"stag4d serve exited with code {code} before starting: "
                               f"{self._log_tail() or 'no output'} (log: {self.log_path})")
        try:
            self.address = json.loads(raw.decode("utf-8"))
            self.url = self.address["url"]
            token_file = Path(self.address.get("token_file") or self.token_file)
            self.token = token_file.read_text().strip()
        except (ValueError, KeyError, OSError) as exc:
            self.stop()
            raise BackendError(f"stag4d serve's first line is not its address ({exc}): {raw[:200]!r}") from None
        deadline = time.monotonic() + 15.0
        while True:  # the line comes before the socket accepts on some servers: retry briefly
            try:
                Client(self.url, self.token).health(timeout=3.0)
                break
            except BackendError as exc:
                if time.monotonic() > deadline or not self.running:
                    self.stop()
                    raise BackendError(f"stag4d serve at {self.url} failed its health check: {exc}") from None
                time.sleep(0.2)
        return self

    def _log_tail(self, n: int = 3) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return " | ".join(lines[-n:])[-500:]

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            if os.name == "posix":
                os.killpg(proc.pid, signal.SIGTERM)
            else:
                proc.terminate()
            proc.wait(timeout)
        except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
            try:
                if os.name == "posix":
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
                proc.wait(timeout)
            except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
                pass


class ServerManager:
    """The one local server this Blender session owns (thread-safe: jobs are submitted from threads)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.server: LocalServer | None = None
        self.last_error: str = ""

    def ensure_local(self, python_path: str, jobs_dir: str | Path, token_file: str | Path, port: int = 0
                     ) -> LocalServer:
        with self._lock:
            srv = self.server
            if srv is not None and srv.running and Path(srv.jobs_dir) == Path(jobs_dir):
                return srv
            if srv is not None:
                srv.stop()
                self.server = None
            try:
                srv = LocalServer(find_backend_command(python_path), jobs_dir, token_file, port).start()
            except BackendError as exc:
                self.last_error = str(exc)
                raise
            self.server, self.last_error = srv, ""
            return srv

    def stop(self) -> None:
        with self._lock:
            if self.server is not None:
                self.server.stop()
                self.server = None

    @property
    def running(self) -> bool:
        return self.server is not None and self.server.running


MANAGER = ServerManager()
atexit.register(MANAGER.stop)  # Blender quitting stops the server it started

__all__ = ["LocalServer", "ServerManager", "MANAGER", "find_backend_command"]
