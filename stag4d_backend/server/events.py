"""Reading the jobs' events.jsonl as they grow: one incremental reader per job, one poller for all of them.

Workers append events (``Job.emit``: one line, flushed and fsynced); the server never parses a file twice: each
``EventLog`` keeps its byte offset and the events read so far. While clients wait on a job, one asyncio task stats
its file every ``poll_s`` (10 ms) and wakes them all when it grew, so 20 clients cost one stat per tick, not 20.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from pathlib import Path

from ..job import EVENTS_FILE, TERMINAL_STATES

POLL_S = 0.01


class EventLog:
    def __init__(self, path: Path):
        self.path = path
        self.events: list[dict] = []
        self.last_state: str | None = None      # state of the newest job_state event
        self.watchers = 0
        self.announced = 0                      # events count the waiters were last woken for
        self.closed = False                     # the job was deleted
        self.changed = asyncio.Event() if _loop_running() else None
        self._offset = 0
        self._ino = None
        self._partial = b""
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return len(self.events)

    @property
    def last_n(self) -> int:
        return self.events[-1]["n"] if self.events else -1

    def refresh(self) -> bool:
        """Read what was appended since the last call; True when new events arrived."""
        with self._lock:
            try:
                st = os.stat(self.path)
            except OSError:
                return False
            if st.st_ino != self._ino or st.st_size < self._offset:  # new or replaced file: start over
                self._ino, self._offset, self._partial = st.st_ino, 0, b""
                self.events, self.last_state = [], None
            if st.st_size == self._offset:
                return False
            try:
                with open(self.path, "rb") as fh:
                    fh.seek(self._offset)
                    data = fh.read(st.st_size - self._offset)
            except OSError:
                return False
            self._offset += len(data)
            lines = (self._partial + data).split(b"\n")
            self._partial = lines.pop()  # a line still being written
            before = len(self.events)
            for line in lines:
                if not line.strip():
                    continue
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(ev, dict) or ev.get("n") != len(self.events):
                    continue  # not ours / out of sequence: never hand a gap to a client
                self.events.append(ev)
                if ev.get("kind") == "job_state":
                    self.last_state = ev.get("state")
            return len(self.events) > before

    def since(self, n: int) -> list[dict]:
        return self.events[max(0, n):]  # events are numbered 0, 1, 2, ... in file order

    @property
    def ended(self) -> bool:
        """The newest job_state event is terminal (nothing follows unless the job is resumed)."""
        return self.last_state in TERMINAL_STATES


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


class EventHub:
    def __init__(self, jobs_dir: Path, poll_s: float = POLL_S):
        self.jobs_dir = jobs_dir
        self.poll_s = poll_s
        self._logs: dict[str, EventLog] = {}
        self._lock = threading.Lock()
        self._task: asyncio.Task | None = None

    def log(self, job_id: str) -> EventLog:
        with self._lock:
            log = self._logs.get(job_id)
            if log is None:
                log = self._logs[job_id] = EventLog(self.jobs_dir / job_id / EVENTS_FILE)
            return log

    def forget(self, job_id: str) -> None:
        with self._lock:
            log = self._logs.pop(job_id, None)
        if log is not None:
            log.closed = True
            if log.changed is not None:
                log.changed.set()  # waiters wake up and see the job is gone

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        while True:
            with self._lock:
                watched = [log for log in self._logs.values() if log.watchers > 0]
            for log in watched:
                log.refresh()
                self._wake(log)
            await asyncio.sleep(self.poll_s)

    @staticmethod
    def _wake(log: EventLog) -> None:
        """Wake the waiters of ``log`` if it holds events they have not been told about (whoever read them:
        a request thread refreshing a job's ``last_event`` reads new events too)."""
        if log.count == log.announced:
            return
        log.announced = log.count
        old = log.changed
        log.changed = asyncio.Event()
        if old is not None:
            old.set()

    async def wait(self, log: EventLog, count: int, timeout: float) -> bool:
        """Wait until ``log`` holds more than ``count`` events (True) or ``timeout`` seconds pass (False)."""
        if log.changed is None:
            log.changed = asyncio.Event()
        log.watchers += 1
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                log.refresh()
                self._wake(log)
                if log.count > count:
                    return True
                if log.closed:
                    return False
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                changed = log.changed
                try:
                    await asyncio.wait_for(changed.wait(), remaining)
                except asyncio.TimeoutError:
                    return log.count > count
        finally:
            log.watchers -= 1
