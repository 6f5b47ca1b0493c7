"""The Ray engine (`stag4d serve --engine ray`): one Ray task per job on a Ray cluster. The only module that
imports ray.

Each job is a task asking for ``--ray-gpus-per-job`` GPUs (0: it runs on a CPU) plus ``--ray-resources`` (custom
resources, e.g. ``{"stag4d_job": 1}`` to cap how many run at once); every queued job is handed to Ray at once and
Ray's scheduler starts it when a node has the resources. The task runs ``pipeline.run_job`` on the job directory,
which must be on storage every node sees at the same path (docs/scale-out.md), so events, live previews and
checkpoints are where the server reads them.

Faults, and why a job never runs twice at once:
- The task holds the job's ``.worker.lock`` (flock; on NFS a lock held by a lost node expires with its lease)
  while it runs; an attempt that finds it held waits up to ``LOCK_WAIT_S`` for it.
- A worker process or node lost mid-fit: Ray retries the task (``max_retries``, system failures only, never a
  job that failed on its own); the retry takes the lock, repairs a torn last event line and resumes from the
  last fit checkpoint, so the outputs equal an uninterrupted run's.
- Stop: ``ray.cancel(force=False)`` drops a task that has not started; in a running one Ray raises SIGINT's
  Python handler (``_thread.interrupt_main``), which the task has pointed at its ``StopSignals``, so the fit
  checkpoints and stops at the next step boundary: "cancelled" when the job's ``.cancel`` file exists (a user's
  cancel, which the task also sees on its own through the shared folder), else "interrupted". ``kill`` is
  ``ray.cancel(force=True)`` (the worker process is killed; a cancelled task is not retried).
- The server restarting: the tasks are owned by the server's Ray driver, so Ray ends them with it (fate
  sharing); the new server finds those jobs "running" in job.json, waits for their locks and queues them again
  ("interrupted" -> resumed from the checkpoint), as with local workers.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import ray

from ..job import Job

LOCK_WAIT_S = 120.0
DEFAULT_MAX_RETRIES = 3
EXIT_FAILED, EXIT_BUSY = 1, 75


class RayEngineError(RuntimeError):
    pass


def run_job_task(job_dir: str, gpus: float, cpus: float) -> int:
    """The body of a job's Ray task (on whichever node Ray picked): 0 when the job recorded its end, 1 when it
    failed, 75 when another worker kept holding the job."""
    if gpus <= 0:  # a CPU fit's floats depend on the thread count: as many threads as CPUs asked for, always
        import torch

        torch.set_num_threads(max(1, int(cpus)))
    from ..job import disk_full_stage
    from .jobs import repair_events
    from .worker import StopSignals, disk_full_exit, run_locked, wait_lock

    path = Path(job_dir)
    # Before the job is touched: ray.cancel() of this running task now means "stop at the next step boundary".
    stop = StopSignals(path, signals=(signal.SIGINT,))
    try:
        lock = wait_lock(path, LOCK_WAIT_S)
        if lock is None:
            _log(path, f"another worker kept holding {path.name} for {LOCK_WAIT_S:.0f} s; not started\n")
            return EXIT_BUSY
        try:
            repair_events(path)  # a retried attempt: the lost one may have died in the middle of a line
            context = ray.get_runtime_context()
            state = run_locked(path, "cuda" if gpus > 0 else "cpu", stop, engine="ray",
                               ray_node=context.get_node_id(), ray_task=context.get_task_id())
        except Exception as exc:
            stage = disk_full_stage(exc)
            if stage is None:
                raise
            return disk_full_exit(stage)  # the job could not record its failure: the server does (as for local)
        finally:
            os.close(lock)
    finally:
        stop.restore()
    if state == "failed":
        _log(path, (Job(path).read().get("traceback") or "") + "\n")
        return EXIT_FAILED
    return 0


def _log(job_dir: Path, text: str) -> None:
    try:
        with open(job_dir / "worker.log", "a") as fh:
            fh.write(text)
    except OSError:
        pass


class RayHandle:
    def __init__(self, ref):
        self.ref = ref
        self.error: str | None = None
        self.rc: int | None = None

    def poll(self) -> int | None:
        if self.rc is not None:
            return self.rc
        try:
            ready, _ = ray.wait([self.ref], timeout=0)
        except Exception as exc:  # noqa: BLE001 - the driver lost the cluster (head gone): the job ends here
            self.rc, self.error = -1, f"lost the Ray cluster ({type(exc).__name__}: {exc})"
            return self.rc
        if not ready:
            return None
        try:
            self.rc = int(ray.get(self.ref))
        except ray.exceptions.TaskCancelledError:
            self.rc, self.error = -1, "the Ray task was cancelled"
        except ray.exceptions.RayError as exc:  # retries used up (worker or node lost), or a Ray failure
            self.rc = -1
            self.error = f"the Ray task failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}"
        return self.rc

    def stop(self) -> None:
        self._cancel(force=False)

    def kill(self) -> None:
        self._cancel(force=True)

    def _cancel(self, force: bool) -> None:
        try:
            ray.cancel(self.ref, force=force)
        except Exception:  # noqa: BLE001 - finished in the meantime, or the cluster is going away
            pass

    def wait(self, timeout: float | None = None) -> None:
        ray.wait([self.ref], timeout=timeout)

    def describe_exit(self, rc: int) -> str:
        if self.error:
            return f"{self.error}; see worker.log and Ray's logs"
        if rc == EXIT_BUSY:
            return "another worker kept holding this job (its .worker.lock); resume it once that one has gone"
        return f"the Ray task ended (code {rc}) without recording how the job ended; see Ray's logs"

    def close(self) -> None:
        pass


class RayEngine:
    """Connects to a Ray cluster (``address``: "auto", "HOST:PORT", or "local" for a private single-machine one)
    and starts one task per job."""

    name = "ray"
    hands_over_queue = True

    def __init__(self, address: str = "auto", gpus_per_job: float = 1.0, resources: dict | None = None,
                 max_retries: int = DEFAULT_MAX_RETRIES, cpus_per_job: float = 1.0):
        self.gpus_per_job, self.cpus_per_job = float(gpus_per_job), float(cpus_per_job)
        try:
            if not ray.is_initialized():
                ray.init(address=None if address == "local" else address, include_dashboard=False,
                         log_to_driver=False, namespace="stag4d", configure_logging=False)
        except Exception as exc:  # noqa: BLE001 - ConnectionError, or Ray's own start-up errors
            hint = "" if address == "local" else " (start one with `ray start --head`, or use --ray-address local)"
            raise RayEngineError(f"--ray-address {address}: cannot connect to a Ray cluster: "
                                 f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}{hint}") from None
        # Ray builds its serialization context on the first call; here, in the main thread, not in the scheduler
        # thread while uvicorn imports pydantic (a concurrent import there fails with KeyError 'pydantic.v1').
        ray.get(ray.put(None))
        self._task = ray.remote(run_job_task).options(
            num_cpus=cpus_per_job, num_gpus=self.gpus_per_job, resources=dict(resources or {}),
            max_retries=max_retries, retry_exceptions=False, name="stag4d-job")

    def start(self, job_dir: Path, device: str) -> RayHandle:
        # The job stays "queued" in job.json until Ray starts the task (run_job then says "running").
        Job(job_dir).update(device=f"ray ({'GPU' if self.gpus_per_job > 0 else 'CPU'})", error=None)
        try:
            ref = self._task.remote(str(Path(job_dir).resolve()), self.gpus_per_job, self.cpus_per_job)
        except Exception as exc:  # noqa: BLE001 - the cluster refused or is gone: the job fails with the reason
            raise OSError(f"Ray did not take the job ({type(exc).__name__}: {exc})") from None
        return RayHandle(ref)

    def cluster(self) -> dict:
        """What the cluster offers (for the operator's start-up note)."""
        return {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")}

    def close(self) -> None:
        if ray.is_initialized():
            ray.shutdown()
