"""Sending one file of a job: opened first, then measured (fstat) and streamed from that open file, so a file
that a worker replaces (atomic rename) or prunes meanwhile is still sent whole, as it was when opened. Starlette's
FileResponse stats the path and opens it later, which can send a body that disagrees with its Content-Length.
A single ``Range: bytes=a-b`` is honoured (206); other Range forms get the whole file (RFC 9110 allows that)."""

from __future__ import annotations

import os
import re

import anyio
from starlette.responses import Response

CHUNK = 1024 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def open_snapshot(path) -> tuple[int, int]:
    """(fd, size) of ``path``, opened without following a final symlink swapped in after the check."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    return fd, os.fstat(fd).st_size


class SnapshotResponse(Response):
    def __init__(self, fd: int, size: int, media_type: str, filename: str, range_header: str | None = None):
        self.fd, self.size = fd, size
        self.start, self.end = 0, size  # [start, end)
        status = 200
        headers = {"accept-ranges": "bytes",
                   "content-disposition": f"attachment; filename=\"{filename.replace(chr(34), '')}\""}
        m = _RANGE.match((range_header or "").strip())
        if m and (m.group(1) or m.group(2)):
            a, b = m.group(1), m.group(2)
            if a:
                start, end = int(a), (min(int(b) + 1, size) if b else size)
            else:  # the last N bytes
                start, end = max(0, size - int(b)), size
            if start >= size or start >= end:
                status = 416
                headers["content-range"] = f"bytes */{size}"
                self.start = self.end = 0
            else:
                status = 206
                self.start, self.end = start, end
                headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
        super().__init__(status_code=status, headers=headers, media_type=media_type)
        self.headers["content-length"] = str(self.end - self.start)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            pos = self.start
            if pos >= self.end:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            while pos < self.end:
                n = min(CHUNK, self.end - pos)
                chunk = await anyio.to_thread.run_sync(os.pread, self.fd, n, pos)
                if not chunk:  # cannot happen for a file we hold open, unless it was truncated in place
                    raise OSError(f"file shrank while being sent ({pos} of {self.end} bytes)")
                pos += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": pos < self.end})
        finally:
            os.close(self.fd)
