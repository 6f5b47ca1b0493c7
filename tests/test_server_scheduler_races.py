"""The job manager's scheduler against races that the real server hits only now and then, made deterministic with
an engine whose workers end exactly when the test says (no processes, no sleeps that decide the outcome)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from stag4d_backend.job import Job
from stag4d_backend.server.jobs import JobManager


class GatedHandle:
    """A worker that records "cancelled" itself when told to stop (as the real worker does at a step boundary)
    but whose process keeps exiting until ``exit`` is called."""

    def __init__(self, job_dir: Path):
        self.job_dir = job_dir
        self.rc: int | None = None

    def poll(self) -> int | None:
        return self.rc

    def stop(self) -> None:
        job = Job(self.job_dir)
        job.update(state="cancelled")
        job.emit("job_state", state="cancelled")

    def kill(self) -> None:
        self.rc = -9

    def wait(self, timeout: float | None = None) -> None:
        pass

    def describe_exit(self, rc: int) -> str:
        return f"exited with code {rc}"

    def close(self) -> None:
        pass

    def exit(self) -> None:
        self.rc = 0


class GatedEngine:
    name = "gated"
    hands_over_queue = False

    def __init__(self):
        self.started: list[GatedHandle] = []
        self.lock = threading.Lock()

    def start(self, job_dir: Path, device: str) -> GatedHandle:
        h = GatedHandle(job_dir)
        with self.lock:
            self.started.append(h)
        return h

    def close(self) -> None:
        pass


def _until(cond, timeout: float = 10.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.01)


def test_a_resume_before_the_cancelled_worker_is_reaped_stays_resumed_and_runs_again(tmp_path):
    engine = GatedEngine()
    mgr = JobManager(tmp_path / "jobs", devices=["cpu"], engine=engine)
    mgr.start()
    try:
        job_id = mgr.create({"kind": "fit"})
        _until(lambda: len(engine.started) == 1)
        mgr.cancel(job_id)                      # the worker records "cancelled" but its process is still exiting
        assert Job(tmp_path / "jobs" / job_id).read()["state"] == "cancelled"
        mgr.resume(job_id)                      # the client saw "cancelled" and resumes at once
        assert mgr.read(job_id)[1]["state"] == "queued"
        time.sleep(0.2)                         # several scheduler ticks: the job waits for its old worker
        assert len(engine.started) == 1 and mgr.read(job_id)[1]["state"] == "queued"
        engine.started[0].exit()                # the old worker is gone: the reap must not record its end again
        _until(lambda: len(engine.started) == 2)
        assert mgr.read(job_id)[1]["state"] == "queued"
        states = [e["state"] for e in Job(tmp_path / "jobs" / job_id).events() if e["kind"] == "job_state"]
        assert states == ["queued", "cancelled", "queued"]
        engine.started[1].exit()
    finally:
        mgr.shutdown(grace_s=1)
