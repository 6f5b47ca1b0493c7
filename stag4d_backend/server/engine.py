"""The engine boundary: what runs a job's worker. The job manager (jobs.py) queues jobs and calls ``start``; the
:class:`Handle` it gets back is polled for the worker's end and stopped through it. Nothing else in the server
knows which engine runs a job.

- ``local`` (the default): one worker process per job on this machine (``python -m stag4d_backend.server.worker``),
  at most ``--jobs-per-device`` per device; the manager's queue decides what runs.
- ``ray``: one Ray task per job on a Ray cluster (ray_engine.py; ray is imported only there); every queued job is
  handed to Ray at once and Ray's scheduler runs it when the resources it asks for are free.

Either way the worker calls ``pipeline.run_job`` on the job directory, holds its ``.worker.lock`` and stops at a
step boundary when ``.cancel`` appears or it is told to stop (so cancel, resume and live previews are the same).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Protocol

from ..job import Job


class Handle(Protocol):
    """One started job worker."""

    def poll(self) -> int | None:
        """None while the worker runs (or waits for resources); else 0 (it ended and recorded how in job.json),
        or non-zero when it died or failed."""

    def stop(self) -> None:
        """Ask the worker to stop at its next step boundary: "cancelled" if the job's .cancel file exists, else
        "interrupted" (resumed later). A worker that has not started yet is dropped."""

    def kill(self) -> None:
        """End the worker now (the job resumes from its last checkpoint, or its files are about to go)."""

    def wait(self, timeout: float | None = None) -> None:
        """Block until the worker is gone (after ``kill``)."""

    def describe_exit(self, rc: int) -> str:
        """Why the worker ended without recording an end, for the job's error."""

    def close(self) -> None:
        """Release what the handle holds (log files), once it has ended."""


class Engine(Protocol):
    name: str
    hands_over_queue: bool  # True: every queued job is started at once and the engine queues it (Ray)

    def start(self, job_dir: Path, device: str) -> Handle:
        """Start the job's worker (OSError when it cannot be started)."""

    def close(self) -> None:
        """After the last worker has ended (server shutdown)."""


def parse_resources(text: str | None) -> dict[str, float]:
    """``--ray-resources '{"stag4d_job": 1}'`` -> {name: amount}; ValueError with a clear message otherwise."""
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--ray-resources: not JSON ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and k and isinstance(v, (int, float))
                                             and not isinstance(v, bool) and v > 0 for k, v in data.items()):
        raise ValueError('--ray-resources: a JSON object of positive amounts, e.g. \'{"stag4d_job": 1}\'')
    reserved = {"CPU", "GPU", "memory", "object_store_memory"} & set(data)
    if reserved:
        raise ValueError(f"--ray-resources: {', '.join(sorted(reserved))} are Ray's own; use --ray-gpus-per-job "
                         f"for GPUs")
    return {k: float(v) for k, v in data.items()}


def worker_env() -> dict:
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class LocalHandle:
    def __init__(self, proc: subprocess.Popen, log):
        self.proc, self.log = proc, log

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> None:
        self.proc.wait(timeout)

    def describe_exit(self, rc: int) -> str:
        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
        return f"the worker process {how}; see worker.log"

    def close(self) -> None:
        self.log.close()


class LocalEngine:
    """A worker process per job on this machine, started from the scheduler thread (PR_SET_PDEATHSIG fires when
    the thread that forked the child exits)."""

    name = "local"
    hands_over_queue = False

    def start(self, job_dir: Path, device: str) -> LocalHandle:
        Job(job_dir).update(state="running", device=device, error=None)
        log = open(job_dir / "worker.log", "ab")
        cmd = [sys.executable, "-m", "stag4d_backend.server.worker", str(job_dir.resolve()), "--device", device,
               "--parent-pid", str(os.getpid())]
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=worker_env(),
                                    start_new_session=True, close_fds=True)
        except OSError:
            log.close()
            raise
        return LocalHandle(proc, log)

    def close(self) -> None:
        pass
