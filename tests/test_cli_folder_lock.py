"""One writer per output folder (stag4d_backend/folder_lock.py): a second `stag4d fit/bake/generate` on a folder in
use is refused at once, naming the holder; the lock goes with its holder on exit and on `kill -9`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stag4d_backend.folder_lock import LOCK_NAME, FolderBusy, FolderLock

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO))
EXIT_BUSY = 75


def stag4d(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stag4d_backend.cli", *args], capture_output=True, text=True,
                          env=ENV, timeout=120, **kw)


def test_a_second_lock_on_the_folder_is_refused_and_names_the_holder(tmp_path):
    folder = tmp_path / "out"
    with FolderLock(folder, command="stag4d fit data -o out") as held:
        holder = json.loads((folder / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["command"] == "stag4d fit data -o out" and abs(holder["since"] - time.time()) < 60
        with pytest.raises(FolderBusy) as err:
            FolderLock(folder).acquire()
        assert err.value.holder == holder
        assert f"pid {os.getpid()} on {socket.gethostname()}, `stag4d fit data -o out`, since " in str(err.value)
        assert held.fd is not None
    assert not folder.exists()  # the lock file is removed on release, and the folder it made (still empty)
    with FolderLock(folder):  # free again
        (folder / "model.ply").write_text("x")
    assert sorted(p.name for p in folder.iterdir()) == ["model.ply"]  # a folder with results stays


def _wait_for_holder(lock_file: Path, pid: int, proc: subprocess.Popen, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            holder = json.loads(lock_file.read_text())
            if holder.get("pid") == pid:
                return holder
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{pid} never took {lock_file}")


def test_a_second_writer_is_refused_at_once_and_kill_9_of_the_holder_frees_the_folder(tmp_path):
    job = tmp_path / "job"
    holder_proc = subprocess.Popen(
        [sys.executable, "-m", "stag4d_backend.cli", "generate", "--example", "--preset", "tiny", "--iters", "100000",
         "--formats", "ply", "-o", str(job)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    try:
        holder = _wait_for_holder(job / LOCK_NAME, holder_proc.pid, holder_proc)
        assert holder["command"].startswith("stag4d generate --example") and holder["command"].endswith(str(job))
        for args in (("bake", str(job), "--formats", "ply"),
                     ("fit", str(tmp_path / "no-data"), "-o", str(job), "--preset", "tiny")):
            r = stag4d(*args)
            assert r.returncode == EXIT_BUSY, (args, r.returncode, r.stderr)
            assert f"is in use by another stag4d process (pid {holder_proc.pid} on {socket.gethostname()}, " \
                   f"`stag4d generate --example" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr
        assert holder_proc.poll() is None  # the holder goes on
    finally:
        holder_proc.send_signal(signal.SIGKILL)
        holder_proc.wait(30)
    assert json.loads((job / LOCK_NAME).read_text())["pid"] == holder_proc.pid  # its text stays, its lock does not
    # A writer after the kill gets past the lock to the command's own check (another request in that folder).
    r = stag4d("generate", "--example", "--preset", "tiny", "--iters", "5", "-o", str(job))
    assert r.returncode == 2 and "holds another job" in r.stderr and "in use" not in r.stderr, r.stderr
    assert not (job / LOCK_NAME).exists()  # the second writer took it and removed it on exit
