"""One writer per output folder: ``stag4d fit/generate/bake`` hold an exclusive ``flock`` on ``FOLDER/.stag4d.lock``
while they write there, and a second one is refused at once with a message naming the holder.

The kernel drops a ``flock`` when its holder's last descriptor closes, so a holder that exits, crashes or is
killed with SIGKILL never leaves the folder stuck; the file's text (pid, host, command, since) only names the
holder for the message. On a normal release the file is removed while still locked; a locker checks that the
file it locked is still the one at the path (else it retries), so removing it never lets two holders in."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows (an untested platform): no flock there, so the commands run without the lock
    fcntl = None

LOCK_NAME = ".stag4d.lock"


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock; ``holder`` is what it wrote (possibly empty)."""

    def __init__(self, folder: Path, holder: dict):
        self.folder, self.holder = folder, holder
        super().__init__(f"{folder} is in use by another stag4d process ({describe(holder)}); wait for it to "
                         f"finish or stop it, or choose another folder")


def describe(holder: dict) -> str:
    if not holder:
        return "holder unknown: it is just starting"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, `{holder.get('command')}`, since {since}"


def _read_holder(path: Path) -> dict:
    for _ in range(20):  # the holder writes its text right after locking: give it a moment
        try:
            text = path.read_text()
            if text:
                return json.loads(text)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    return {}


class FolderLock:
    """``with FolderLock(folder):`` holds the folder's lock or raises FolderBusy. A folder it had to create is
    removed again on release if it is still empty."""

    def __init__(self, folder: str | Path, command: str | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command if command is not None else " ".join(["stag4d", *sys.argv[1:]])
        self.fd: int | None = None
        self.created = False

    def acquire(self) -> "FolderLock":
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FolderBusy(self.folder, _read_holder(self.path)) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:  # the previous holder removed it after we opened it
                same = False
            if same:
                break
            os.close(fd)
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                           "since": time.time()}).encode()
        os.pwrite(fd, text, 0)
        os.ftruncate(fd, len(text))
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked (see the module's docstring)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        if self.created:  # made for a command that then wrote nothing (bad input): leave no trace
            try:
                self.folder.rmdir()
            except OSError:
                pass

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
