"""The job queue: job directories under JOBS_DIR, a FIFO queue, at most N running workers per device.

Who writes a job's job.json and events.jsonl: the server only while no worker runs the job (created, queued,
cancelled while queued, interrupted, worker crashed), the worker while it runs. So the two never append events
at the same time and the numbering stays gapless.

The scheduler survives any exception in any job: the job fails with the cause ("disk full at fit", "cannot start
the worker (...)", or an error id whose traceback is in the server's log) and the loop goes on. A state change the
server cannot write (a full disk) is kept in memory, shown to clients, and written once space is back.

Workers are started by the engine (engine.py: local processes or Ray tasks) only from the scheduler thread, which
lives as long as the server: PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so spawning
from a short-lived request thread would kill the job.

On start-up every job directory is looked at: a job left "running" (the server was killed) is marked
"interrupted" and, like "queued" ones and ones interrupted by a shutdown, queued again (``auto_resume``); its
worker resumes from the last fit checkpoint and skips finished stages.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..job import ENDED_STATES, EVENTS_FILE, JOB_FILE, STATES, TERMINAL_STATES, Job, disk_full_stage
from .engine import Engine, Handle, LocalEngine
from .errors import internal_error
from .files import is_job_id, job_path, new_job_id
from .worker import CANCEL_FILE, LOCK_FILE, disk_full_stage_of

SERVER_LOCK = ".server.lock"
TRASH_DIR = ".trash"
UPLOAD_DIR = ".uploads"
CANCEL_GRACE_S = 30.0     # a worker that has not stopped this long after SIGTERM is killed
SHUTDOWN_GRACE_S = 10.0
ORPHAN_WAIT_S = 5.0
TICK_S = 0.05


class JobError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class ServerLockError(RuntimeError):
    pass


@dataclass
class Running:
    job_id: str
    handle: Handle
    device: str
    started: float
    stop_sent: float | None = None
    cancel_requested: bool = False
    deleting: bool = False


def _is_our_worker(pid: int, job_dir: Path) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\x00")
    except OSError:
        return False
    return b"stag4d_backend.server.worker" in cmd and str(job_dir).encode() in cmd


def repair_events(job_dir: Path) -> None:
    """Drop a partial last line (a worker killed in the middle of an append) so the next event starts a line."""
    path = job_dir / EVENTS_FILE
    try:
        with open(path, "rb+") as fh:
            data = fh.read()
            if data and not data.endswith(b"\n"):
                fh.truncate(data.rfind(b"\n") + 1)
    except OSError:
        pass


class JobManager:
    def __init__(self, jobs_dir: Path, devices: list[str] | None, jobs_per_device: int = 1,
                 auto_resume: bool = True, probe: Callable[[], tuple[list[str], str | None]] | None = None,
                 on_note: Callable[[str], None] | None = None, engine: Engine | None = None):
        self.jobs_dir = Path(jobs_dir)
        self.engine: Engine = engine or LocalEngine()
        self.jobs_per_device = jobs_per_device
        self.auto_resume = auto_resume
        self.devices: list[str] | None = devices
        self._probe = probe
        self._note = on_note or (lambda msg: None)
        self.devices_ready = threading.Event()
        self._cond = threading.Condition(threading.RLock())
        self._queue: list[str] = []
        self._running: dict[str, Running] = {}
        self._deleting: set[str] = set()
        self._unrecorded: dict[str, dict] = {}   # job id -> state change not yet written (a full disk)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._server_lock: int | None = None

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> list[str]:
        """Lock the jobs dir, recover its jobs, start the scheduler; returns notes for the operator."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.jobs_dir / SERVER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ServerLockError(f"--jobs-dir {self.jobs_dir}: another stag4d serve is using it; stop it or use "
                                  f"another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._server_lock = fd
        for leftover in (TRASH_DIR, UPLOAD_DIR):
            shutil.rmtree(self.jobs_dir / leftover, ignore_errors=True)
        notes = self._recover()
        self._thread = threading.Thread(target=self._loop, name="stag4d-scheduler", daemon=True)
        self._thread.start()
        return notes

    def shutdown(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Stop the scheduler; running jobs checkpoint and end as "interrupted" (resumed on the next start).
        Idempotent."""
        with self._cond:
            if self._stopping and self._server_lock is None:
                return
            self._stopping = True
            for r in self._running.values():
                self._signal(r, signal.SIGTERM)
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(grace_s)
            if self._thread.is_alive():  # a worker ignores SIGTERM: the job is resumed from its checkpoint
                with self._cond:
                    for r in self._running.values():
                        self._signal(r, signal.SIGKILL)
                self._thread.join(10)
        with self._cond:
            self._reap()
        self.engine.close()
        if self._server_lock is not None:
            os.close(self._server_lock)
            self._server_lock = None

    def _recover(self) -> list[str]:
        notes = []
        found = []
        for entry in self.jobs_dir.iterdir():
            if not is_job_id(entry.name) or not (entry / JOB_FILE).is_file():
                continue
            try:
                found += self._recover_one(entry, notes)
            except (OSError, ValueError) as exc:
                why = "the disk is full" if disk_full_stage(exc) else "unreadable job files"
                notes.append(f"{entry.name}: cannot be recovered ({why}); left alone")
        self._queue = [job_id for _, job_id in sorted(found)]
        return notes

    def _recover_one(self, entry: Path, notes: list[str]) -> list[tuple[float, str]]:
        """[(created, id)] when the job at ``entry`` is queued again."""
        data = Job(entry).read()
        state = data.get("state")
        if state not in ("running", "queued", "created", "interrupted"):
            return []
        if not self._wait_for_old_worker(entry, data):
            notes.append(f"{entry.name}: another process holds {LOCK_FILE}; left alone")
            return []
        repair_events(entry)
        job = Job(entry)
        if state == "running":
            job.update(state="interrupted")
            job.emit("job_state", state="interrupted",
                     message="the server stopped while this job ran; it resumes from its last checkpoint")
            state = "interrupted"
        if state in ("queued", "created") or self.auto_resume:
            if state != "queued":
                job.update(state="queued")
                job.emit("job_state", state="queued", resumed=True)
            notes.append(f"{entry.name}: {'resuming' if state == 'interrupted' else 'queued'}")
            return [(float(data.get("created") or 0.0), entry.name)]
        return []

    def _wait_for_old_worker(self, job_dir: Path, data: dict) -> bool:
        """A worker of an earlier server may still hold the job (it dies within PARENT_POLL_S of its parent):
        wait for it, kill it if it is still there and recognisably ours; False if the lock stays held."""
        t0 = time.monotonic()
        killed = False
        while time.monotonic() - t0 < 3 * ORPHAN_WAIT_S:
            fd = os.open(job_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            finally:
                os.close(fd)
            if not killed and time.monotonic() - t0 > ORPHAN_WAIT_S:
                pid = int(data.get("worker_pid") or 0)
                if pid and _is_our_worker(pid, job_dir):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                killed = True
            time.sleep(0.1)
        return False

    # ------------------------------------------------------------------------------------------ scheduler

    def _loop(self) -> None:
        if self.devices is None:
            devices, note = self._probe() if self._probe else (["cpu"], None)
            if note:
                self._note(note)
            self.devices = devices
        self.devices_ready.set()
        with self._cond:
            # On shutdown this thread stays until its workers are gone: they die with it (PDEATHSIG).
            while not self._stopping or self._running:
                try:
                    self._reap()
                    self._escalate()
                    self._write_unrecorded()
                    if not self._stopping:
                        self._start_queued()
                except Exception as exc:  # a bug outside any one job: say so and keep scheduling
                    internal_error("the scheduler's tick failed; it goes on", exc)
                self._cond.wait(TICK_S)

    def _start_queued(self) -> None:
        if not self._queue or not self.devices:
            return
        for device in self.devices:
            # An engine that queues jobs itself (Ray) gets every queued job at once.
            while (self.engine.hands_over_queue
                   or sum(r.device == device for r in self._running.values()) < self.jobs_per_device):
                # A resumed job whose previous worker is still exiting waits for it (the worker lock).
                ready = [j for j in self._queue if j not in self._running]
                if not ready:
                    break
                job_id = ready[0]
                self._queue.remove(job_id)
                if not (self.jobs_dir / job_id / JOB_FILE).is_file():
                    continue  # deleted while queued
                try:
                    self._spawn(job_id, device)
                except Exception as exc:
                    self._job_failed(job_id, exc, "start", "cannot start the worker")

    def _spawn(self, job_id: str, device: str) -> None:
        handle = self.engine.start(self.jobs_dir / job_id, device)
        self._running[job_id] = Running(job_id, handle, device, time.time())

    def _reap(self) -> None:
        for job_id, r in list(self._running.items()):
            rc = r.handle.poll()
            if rc is None:
                continue
            del self._running[job_id]
            with contextlib.suppress(OSError):
                r.handle.close()
            # Deleted, or resumed after the worker recorded its end but before this reap: nothing to record
            # (recording here would overwrite the resumed job's "queued" with the old run's end).
            if r.deleting or job_id in self._queue:
                continue
            try:
                self._record_end(job_id, r, rc)
            except Exception as exc:
                self._job_failed(job_id, exc, "end", "cannot record how the worker ended")
        self._cond.notify_all()

    def _record_end(self, job_id: str, r: Running, rc: int) -> None:
        """The state of a job whose worker exited, where the worker could not record it itself."""
        disk_full_at = disk_full_stage_of(rc)
        if disk_full_at is not None:  # the worker could not write its failure: the disk was full
            self._set_state(job_id, "failed", error=f"disk full at {disk_full_at}")
            return
        try:
            state = Job(self.jobs_dir / job_id).read().get("state")
        except FileNotFoundError:
            return  # deleted meanwhile
        if state in ENDED_STATES and not (r.cancel_requested and state == "interrupted"):
            return  # the worker recorded how it ended (a cancel without its .cancel file ends "interrupted")
        if r.cancel_requested:
            self._set_state(job_id, "cancelled", message="the worker did not stop in time and was killed")
        elif self._stopping:
            self._set_state(job_id, "interrupted", message="the server stopped")
        else:
            self._set_state(job_id, "failed", error=r.handle.describe_exit(rc))

    def _job_failed(self, job_id: str, exc: BaseException, stage: str, what: str) -> None:
        """An exception while the scheduler handled one job: that job fails with the cause, nothing else does."""
        at = disk_full_stage(exc)
        if at is not None:
            error = f"disk full at {stage if at == 'start' else at}"
        else:  # an OSError's strerror is the cause without the server's paths
            why = f"{what} ({exc.strerror})" if isinstance(exc, OSError) and exc.strerror else what
            error = internal_error(why, exc)
        self._set_state(job_id, "failed", error=error)

    def _set_state(self, job_id: str, state: str, **fields) -> None:
        """``_server_write``, or, when that fails (a full disk), the change kept in memory: clients see it at
        once and the scheduler writes it when it can."""
        self._unrecorded.pop(job_id, None)
        try:
            self._server_write(job_id, state, **fields)
        except FileNotFoundError:
            pass  # the job was deleted
        except Exception as exc:
            if disk_full_stage(exc) is None:
                internal_error(f"job {job_id}: cannot record the state {state!r}; retrying", exc)
            self._unrecorded[job_id] = dict(fields, state=state)

    def _write_unrecorded(self) -> None:
        for job_id, change in list(self._unrecorded.items()):
            fields = dict(change)
            state = fields.pop("state")
            with contextlib.suppress(Exception):  # still no room: next tick
                self._server_write(job_id, state, **fields)
                del self._unrecorded[job_id]
            if not (self.jobs_dir / job_id).is_dir():
                self._unrecorded.pop(job_id, None)

    def _escalate(self) -> None:
        now = time.monotonic()
        for r in self._running.values():
            if r.stop_sent is not None and now - r.stop_sent > CANCEL_GRACE_S and r.handle.poll() is None:
                self._signal(r, signal.SIGKILL)

    @staticmethod
    def _signal(r: Running, sig: int) -> None:
        """SIGTERM: stop at the next step boundary; SIGKILL: end now (whatever the engine, these two meanings)."""
        if sig == signal.SIGKILL:
            r.handle.kill()
        elif r.stop_sent is None:
            r.handle.stop()
        if r.stop_sent is None:
            r.stop_sent = time.monotonic()

    def _server_write(self, job_id: str, state: str, **fields) -> None:
        """Record a state change while no worker runs the job: job.json, then a job_state event."""
        job_dir = self.jobs_dir / job_id
        repair_events(job_dir)
        job = Job(job_dir)
        job.update(state=state, **{k: v for k, v in fields.items() if k == "error"})
        job.emit("job_state", state=state, **fields)

    # ------------------------------------------------------------------------------------------ requests

    def _dir(self, job_id: str) -> Path:
        try:
            path = job_path(self.jobs_dir, job_id)
        except ValueError:
            raise JobError(404, f"no job {job_id!r}") from None
        if job_id in self._deleting or not (path / JOB_FILE).is_file():
            raise JobError(404, f"no job {job_id}")
        return path

    def _state(self, job_id: str, path: Path) -> str | None:
        """The job's state (one not yet written included); JobError 404 when it was deleted meanwhile."""
        if job_id in self._deleting:
            raise JobError(404, f"no job {job_id}")
        if job_id in self._unrecorded:
            return self._unrecorded[job_id]["state"]
        try:
            return Job(path).read().get("state")
        except FileNotFoundError:
            raise JobError(404, f"no job {job_id}") from None
        except (OSError, ValueError, AttributeError):  # not JSON, or not an object
            raise JobError(409, f"job {job_id} has an unreadable job.json; delete it") from None

    def create(self, request: dict, upload_path: Path | None = None, upload_suffix: str = "") -> str:
        while True:
            job_id = new_job_id()
            job_dir = self.jobs_dir / job_id
            try:
                job_dir.mkdir()
                break
            except FileExistsError:
                continue
        try:
            if upload_path is not None:
                (job_dir / "input").mkdir()
                name = f"input/source{upload_suffix}"
                os.replace(upload_path, job_dir / name)
                request = dict(request, input=name)
            job = Job(job_dir).create(request)
            with self._cond:
                job.update(state="queued", error=None)
                job.emit("job_state", state="queued")
                self._queue.append(job_id)
                self._cond.notify_all()
        except BaseException:  # a full disk: no half-made job stays behind
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        return job_id

    def read(self, job_id: str) -> tuple[Path, dict, dict]:
        """(job dir, job.json, live facts: cancel_requested, running)."""
        path = self._dir(job_id)
        try:
            data = Job(path).read()
            if not isinstance(data, dict):
                raise ValueError("job.json holds no object")
        except (OSError, ValueError):
            raise JobError(404, f"no job {job_id} (its job.json is unreadable)") from None
        with self._cond:
            if job_id in self._unrecorded:
                data = dict(data, **self._unrecorded[job_id])
            r = self._running.get(job_id)
            live = {"running": r is not None, "cancel_requested": bool(r and r.cancel_requested)
                    or (path / CANCEL_FILE).exists() and data.get("state") == "running"}
        return path, data, live

    def list_ids(self) -> list[str]:
        out = []
        for entry in self.jobs_dir.iterdir():
            if is_job_id(entry.name) and (entry / JOB_FILE).is_file():
                out.append(entry.name)
        return out

    def cancel(self, job_id: str) -> None:
        path = self._dir(job_id)
        with self._cond:
            state = self._state(job_id, path)
            r = self._running.get(job_id)
            # A worker that has recorded its end but is not reaped yet (the 50 ms tick) has nothing left to cancel.
            if r is not None and state not in TERMINAL_STATES:
                if not r.cancel_requested:
                    with contextlib.suppress(OSError):  # a full disk: SIGTERM still stops it (_reap records it)
                        (path / CANCEL_FILE).touch()
                    r.cancel_requested = True
                    self._signal(r, signal.SIGTERM)
                return
            if job_id in self._queue:
                self._queue.remove(job_id)
                self._set_state(job_id, "cancelled")
                return
            if state == "cancelled":
                return
            if state == "interrupted":
                self._set_state(job_id, "cancelled")
                return
            raise JobError(409, f"job {job_id} has {state}; there is nothing to cancel")

    def resume(self, job_id: str) -> None:
        path = self._dir(job_id)
        with self._cond:
            state = self._state(job_id, path)
            if job_id in self._queue or (job_id in self._running and state not in ENDED_STATES):
                return  # already waiting or running
            if state == "finished":
                raise JobError(409, f"job {job_id} has finished; there is nothing to resume")
            if self._stopping:
                raise JobError(503, "the server is shutting down")
            (path / CANCEL_FILE).unlink(missing_ok=True)
            repair_events(path)
            job = Job(path)
            job.update(state="queued", error=None)  # a full disk: OSError (507), the job stays as it was
            self._unrecorded.pop(job_id, None)
            job.emit("job_state", state="queued", resumed=True)
            self._queue.append(job_id)
            self._cond.notify_all()

    def delete(self, job_id: str) -> None:
        """From the moment it is called the job is gone for every other request (404), and the scheduler never
        starts it again, even while its worker is still being stopped."""
        with self._cond:
            path = self._dir(job_id)
            self._deleting.add(job_id)
            if job_id in self._queue:
                self._queue.remove(job_id)
            r = self._running.get(job_id)
            if r is not None:
                r.deleting = True
                self._signal(r, signal.SIGKILL)  # its files are about to go: no checkpoint needed
        try:
            if r is not None:
                r.handle.wait()
            with self._cond:
                self._unrecorded.pop(job_id, None)
                target = self.jobs_dir / TRASH_DIR / f"{job_id}-{new_job_id()}"
                try:
                    target.parent.mkdir(exist_ok=True)
                    os.replace(path, target)
                except FileNotFoundError:
                    raise JobError(404, f"no job {job_id}") from None
                except OSError:  # no room even for the trash folder: remove it in place
                    target = path
            shutil.rmtree(target, ignore_errors=True)
        finally:
            with self._cond:
                self._deleting.discard(job_id)

    def queue_position(self, job_id: str) -> int | None:
        with self._cond:
            return self._queue.index(job_id) if job_id in self._queue else None

    @property
    def upload_dir(self) -> Path:
        return self.jobs_dir / UPLOAD_DIR


def job_view(manager: JobManager, hub, job_id: str) -> dict:
    """The API's view of one job (schemas.JobOut): job.json's fields, the live cancel flag, the newest event
    number (``hub``: the server's EventHub) and the queue position. JobError 404 for an unknown job."""
    path, data, live = manager.read(job_id)
    log = hub.log(job_id)
    log.refresh()
    state = data.get("state") or "queued"
    state = "queued" if state == "created" else state
    if state not in STATES:
        state = "failed"
    request = data.get("request") or {}
    return {"id": job_id, "state": state, "kind": str(request.get("kind") or "unknown"), "request": request,
            "created": float(data.get("created") or 0.0), "updated": data.get("updated"),
            "stage": data.get("stage"), "progress": data.get("progress"), "error": data.get("error"),
            "last_event": log.last_n, "result": data.get("result"), "licences": data.get("licences") or [],
            "cancel_requested": live["cancel_requested"] and state == "running", "device": data.get("device"),
            "queue_position": manager.queue_position(job_id)}
