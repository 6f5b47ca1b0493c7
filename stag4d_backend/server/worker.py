"""One job in its own process: ``python -m stag4d_backend.server.worker JOB_DIR --device D --parent-pid P``.

A fit in a separate process cannot block the server's event loop or hold its GIL. The worker
- dies with the server: PR_SET_PDEATHSIG(SIGKILL) on Linux, and a thread that polls ``os.getppid()`` elsewhere
  (or if the server was gone before the prctl), so a killed server leaves no orphan writing to the job;
- holds an exclusive ``flock`` on ``JOB_DIR/.worker.lock`` while it runs (the server checks it on start-up, and a
  second worker on the same job refuses to start);
- stops at the next step boundary on SIGTERM/SIGINT or when ``JOB_DIR/.cancel`` appears: the job then ends as
  "cancelled" if the cancel file exists (a user's cancel), else as "interrupted" (the server is shutting down;
  it resumes the job on its next start).
Exit codes: 0 finished / cancelled / interrupted, 1 failed, 75 another worker holds the job, 80 + i the disk
was full at stage ``DISK_FULL_STAGES[i]`` and not even the failure could be recorded (the server records it).

The Ray engine's task (ray_engine.py) runs a job through the same ``StopSignals`` and ``run_locked``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_FILE = ".worker.lock"
CANCEL_FILE = ".cancel"
EXIT_BUSY = 75
EXIT_DISK_FULL = 80
DISK_FULL_STAGES = ("start", "example", "video", "preprocess", "anchors", "fit", "bake")
PR_SET_PDEATHSIG = 1
PARENT_POLL_S = 0.5


def disk_full_exit(stage: str) -> int:
    return EXIT_DISK_FULL + (DISK_FULL_STAGES.index(stage) if stage in DISK_FULL_STAGES else 0)


def disk_full_stage_of(code: int) -> str | None:
    """The stage a worker's exit code says the disk was full at, or None."""
    i = code - EXIT_DISK_FULL
    return DISK_FULL_STAGES[i] if 0 <= i < len(DISK_FULL_STAGES) else None


def try_lock(job_dir: Path) -> int | None:
    """An fd holding the job's exclusive lock, or None when another process holds it."""
    fd = os.open(job_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def die_with_parent(parent_pid: int) -> None:
    def _die():
        os.kill(os.getpid(), signal.SIGKILL)

    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if parent_pid and os.getppid() != parent_pid:  # the parent died before the prctl took effect
        _die()

    def watch():
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != parent_pid:
                _die()

    if parent_pid:
        threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def wait_lock(job_dir: Path, wait_s: float, every_s: float = 0.5) -> int | None:
    """The job's lock, waiting up to ``wait_s`` for a previous holder to let go (None if it does not)."""
    deadline = time.monotonic() + wait_s
    while True:
        fd = try_lock(job_dir)
        if fd is not None or time.monotonic() >= deadline:
            return fd
        time.sleep(every_s)


class StopSignals:
    """The job's ``should_stop()``: a signal arrived or the cancel file exists. ``restore()`` puts the previous
    signal handlers back (a Ray worker process runs other tasks after this one)."""

    def __init__(self, job_dir: Path, signals=(signal.SIGTERM, signal.SIGINT)):
        self.cancel_file = job_dir / CANCEL_FILE
        self.signalled = False
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in signals}

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def __call__(self) -> bool:
        return self.signalled or self.cancel_file.exists()

    def state(self) -> str:
        return "cancelled" if self.cancel_file.exists() else "interrupted"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stag4d-worker")
    p.add_argument("job_dir")
    p.add_argument("--device", default=None)
    p.add_argument("--parent-pid", type=int, default=0)
    args = p.parse_args(argv)
    die_with_parent(args.parent_pid)
    job_dir = Path(args.job_dir)
    stop = StopSignals(job_dir)
    lock = try_lock(job_dir)
    if lock is None:
        print(f"{job_dir}: another worker is running this job", file=sys.stderr)
        return EXIT_BUSY
    from ..job import Job, disk_full_stage

    try:
        state = run_locked(job_dir, args.device, stop)
    except Exception as exc:
        stage = disk_full_stage(exc)
        if stage is None:
            raise
        with contextlib.suppress(OSError):  # worker.log is on the same full disk
            print(f"disk full at {stage}: {exc!r}", file=sys.stderr)
        return disk_full_exit(stage)
    finally:
        os.close(lock)
    if state == "failed":  # the details for worker.log (the job and its events carry the one-line error)
        with contextlib.suppress(OSError, ValueError):
            print(Job(job_dir).read().get("traceback") or "", file=sys.stderr)
    return 1 if state == "failed" else 0


def run_locked(job_dir: Path, device: str | None, stop: StopSignals, **record) -> str:
    """Run (or resume) the job whose lock the caller holds; returns its final state. ``record``: extra job.json
    facts about this worker (the engine's)."""
    from ..job import Job
    from ..pipeline import run_job

    Job(job_dir).update(worker_pid=os.getpid(), worker_host=socket.gethostname(), device=device, **record)
    return run_job(job_dir, should_stop=stop, device=device, stop_state=stop.state)


if __name__ == "__main__":
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # a full disk under worker.log must not change the exit code
            stream.flush()
    os._exit(code)  # everything is on disk; skip the interpreter's (torch's) slow teardown
