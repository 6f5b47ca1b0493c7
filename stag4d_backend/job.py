"""A job directory: one job = one folder, one stage after another (docs/architecture.md).

    JOB_DIR/job.json        request, options, seed, versions, state; written atomically
    JOB_DIR/events.jsonl    append-only progress log, one JSON object per line, numbered from 0
    JOB_DIR/frames/         ref/{f}_rgba.png, zero123/{f}_rgba/{k}.png (the STAG4D layout)
    JOB_DIR/model/          the fit (canonical.ply, deformation.safetensors, meta.json, state.pt)
    JOB_DIR/bake/           exports

Stages skip themselves when their outputs exist, so a killed job resumes where it stopped.

This module owns the job's states and the one stop signal: a stage is handed ``should_stop`` (a callable) and
raises :class:`JobStopped` at a step boundary when it returns true; the orchestrator (``pipeline``) records the
stop as the state ``cancelled`` (asked for) or ``interrupted`` (the server went away).
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path
from typing import Callable

from . import __version__
from .atomic import write_json

JOB_FILE = "job.json"
EVENTS_FILE = "events.jsonl"

# The job's states, in the order a job meets them. "interrupted" is a stop the user did not ask for (the server
# shut down); such a job resumes when the server starts again.
STATES = ("created", "queued", "running", "finished", "failed", "cancelled", "interrupted")
TERMINAL_STATES = ("finished", "failed", "cancelled")        # nothing more will happen to the job
ENDED_STATES = TERMINAL_STATES + ("interrupted",)           # no worker runs it now

ShouldStop = Callable[[], bool]


class JobStopped(RuntimeError):
    """A stage stopped at a step boundary because ``should_stop()`` said so; the job directory is consistent and
    the job resumes where it stopped. ``step`` is the last step done, when known."""

    def __init__(self, message: str = "stopped", step: int | None = None):
        super().__init__(message)
        self.step = step


class DiskFullError(RuntimeError):
    """A write failed for want of space (ENOSPC, EDQUOT) while ``stage`` ran: the job fails with "disk full at
    <stage>" rather than an errno text, and the server knows to say so."""

    def __init__(self, stage: str):
        super().__init__(f"disk full at {stage}")
        self.stage = stage


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from or while handling) is a full disk or quota. (Writers
    that hide the errno, such as torch.save to a path, should write through a Python file object instead.)"""
    return any(isinstance(e, DiskFullError) or isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
               for e in _chain(exc))


def disk_full_stage(exc: BaseException) -> str | None:
    """The stage a full disk stopped (the innermost DiskFullError's), "start" when it hit outside any stage, or
    None when ``exc`` is no full disk."""
    stages = [e.stage for e in _chain(exc) if isinstance(e, DiskFullError)]
    return stages[0] if stages else "start" if is_disk_full(exc) else None


def check_stop(should_stop: ShouldStop | None, message: str) -> None:
    """Raise JobStopped(message) when a stop was asked for."""
    if should_stop is not None and should_stop():
        raise JobStopped(message)


class Job:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._next_event = None

    # Folders of the stages.
    @property
    def frames_dir(self) -> Path:
        return self.path / "frames"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def bake_dir(self) -> Path:
        return self.path / "bake"

    def create(self, request: dict) -> "Job":
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / JOB_FILE).exists():
            write_json(self.path / JOB_FILE, {"request": request, "state": "created", "created": time.time(),
                                              "versions": {"stag4d": __version__}}, sort_keys=True)
        return self

    def read(self) -> dict:
        return json.loads((self.path / JOB_FILE).read_text())

    def update(self, **fields) -> dict:
        with self._lock:
            data = self.read()
            data.update(fields, updated=time.time())
            write_json(self.path / JOB_FILE, data, sort_keys=True)
            return data

    def _count_events(self) -> int:
        path = self.path / EVENTS_FILE
        if not path.exists():
            return 0
        with open(path, "rb") as fh:
            return sum(1 for line in fh if line.endswith(b"\n"))

    def emit(self, kind: str, **fields) -> dict:
        """Append one event (numbered, timestamped) to events.jsonl and flush it to disk."""
        with self._lock:
            if self._next_event is None:
                self._next_event = self._count_events()
            event = {"n": self._next_event, "time": round(time.time(), 3), "kind": kind, **fields}
            line = json.dumps(event, default=str) + "\n"
            with open(self.path / EVENTS_FILE, "a") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            self._next_event += 1
            return event

    def events(self, since: int = 0) -> list[dict]:
        path = self.path / EVENTS_FILE
        if not path.exists():
            return []
        out = []
        with open(path) as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break  # a line being written
                ev = json.loads(line)
                if ev["n"] >= since:
                    out.append(ev)
        return out
