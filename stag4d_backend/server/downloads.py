"""Sending one file of a job: opened first, then measured (fstat) and streamed from that open file, so a file
that a worker replaces (atomic rename) or prunes meanwhile is still sent whole, as it was when opened. Starlette's
FileResponse stats the path and opens it later, which can send a body that disagrees with its Content-Length.

Everything that can be refused is decided before the file is opened (the Range header's syntax, the
Content-Disposition header), and the response owns the descriptor from the moment it exists, so no request
leaves a descriptor open. Range (RFC 9110 section 14): one ``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` gives 206;
a range starting at or past the end, or with ``b < a``, gives 416 with ``Content-Range: bytes */SIZE``; any other
Range value (another unit, several ranges, not the grammar) is ignored and the whole file is sent (200), as the
RFC allows. Numbers too long for any file size (the header may hold thousands of digits) count as "past the end"
without being converted."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import quote

import anyio
from starlette.responses import Response

CHUNK = 1024 * 1024
_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.ASCII)
_MAX_DIGITS = 18                 # 10**18 bytes is past the end of any file; longer numbers are not converted
_PAST_THE_END = 10**_MAX_DIGITS


@dataclass(frozen=True)
class ByteRange:
    first: int | None  # None: the last ``last`` bytes (a suffix range)
    last: int | None   # None: to the end


def _number(digits: str) -> int:
    return int(digits) if len(digits) <= _MAX_DIGITS else _PAST_THE_END


def parse_range(header: str | None) -> ByteRange | None:
    """The single byte range of a Range header, or None when there is none we honour (the header is ignored)."""
    m = _RANGE.fullmatch((header or "").strip())
    if not m or not (m.group(1) or m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:
        return ByteRange(None, _number(last))
    return ByteRange(_number(first), _number(last) if last else None)


def content_disposition(filename: str) -> str:
    """``attachment`` with a printable-ASCII ``filename`` and the exact name as RFC 5987 ``filename*`` (UTF-8):
    header values must be latin-1 and free of control characters, file names need not be."""
    plain = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in filename)
    exact = quote(filename.encode("utf-8", "replace"), safe="")
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{exact}"


def open_snapshot(path) -> tuple[int, int]:
    """(fd, size) of ``path``, opened without following a final symlink swapped in after the check."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        return fd, os.fstat(fd).st_size
    except BaseException:
        os.close(fd)
        raise


def _satisfy(byte_range: ByteRange | None, size: int) -> tuple[int, int, int]:
    """(status, start, end) with [start, end) the bytes to send."""
    if byte_range is None:
        return 200, 0, size
    if byte_range.first is None:  # the last N bytes
        return (416, 0, 0) if byte_range.last == 0 or size == 0 else (206, max(0, size - byte_range.last), size)
    start = byte_range.first
    end = size if byte_range.last is None else min(byte_range.last + 1, size)
    if start >= size or (byte_range.last is not None and byte_range.last < start):
        return 416, 0, 0
    return 206, start, end


class SnapshotResponse(Response):
    """The bytes of an open file (``fd``, which this response closes once sent), whole or one range."""

    def __init__(self, fd: int, size: int, media_type: str, disposition: str, byte_range: ByteRange | None = None):
        self.fd, self.size = fd, size
        try:
            status, self.start, self.end = _satisfy(byte_range, size)
            headers = {"accept-ranges": "bytes", "content-disposition": disposition}
            if status == 206:
                headers["content-range"] = f"bytes {self.start}-{self.end - 1}/{size}"
            elif status == 416:
                headers["content-range"] = f"bytes */{size}"
            super().__init__(status_code=status, headers=headers, media_type=media_type)
            self.headers["content-length"] = str(self.end - self.start)
        except BaseException:
            os.close(fd)
            raise

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
