"""Uploads: a multipart body streamed to disk with a size cap, its file recognised by its first bytes (never by
its name). Fields: ``file`` (the video or image) and ``options`` (a JSON string, optional).

Only a complete body makes a job: one that ends before the multipart's closing boundary (cut off, a
Content-Length shorter than what was meant, a client gone) is 400, and one the disk cannot hold is 507; either way
the temporary file is removed."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartState, parse_options_header
from starlette.requests import ClientDisconnect

from .. import media
from ..job import is_disk_full
from ..media import SNIFF_BYTES

MAX_FIELD_BYTES = 64 * 1024   # the options field (JSON)
FLUSH_BYTES = 4 * 1024 * 1024


class UploadError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


# The server takes the common web formats only (the CLI also reads BMP and TIFF from local disk).
UPLOAD_MEDIA_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif", "video/quicktime",
                                "video/mp4", "video/webm", "video/x-msvideo"})
ACCEPTED = "PNG, JPEG, WebP or GIF images; MP4, MOV, WebM/MKV or AVI videos"


def sniff(head: bytes) -> tuple[str, str, str] | None:
    """(kind, media type, suffix) of an uploadable file from its first bytes, or None."""
    found = media.sniff(head)
    return found if found is not None and found[1] in UPLOAD_MEDIA_TYPES else None


def sniff_file(path: Path) -> tuple[str, str, str] | None:
    with open(path, "rb") as fh:
        return sniff(fh.read(SNIFF_BYTES))


@dataclass
class Upload:
    path: Path                 # the temporary file holding the upload
    size: int
    kind: str                  # "video" | "image"
    media_type: str
    suffix: str
    filename: str | None
    fields: dict[str, str] = field(default_factory=dict)


class _Parser:
    def __init__(self, tmp_dir: Path, max_bytes: int):
        self.tmp_dir, self.max_bytes = tmp_dir, max_bytes
        self.fields: dict[str, str] = {}
        self.file_fh = None
        self.file_path: Path | None = None
        self.file_size = 0
        self.file_seen = False
        self.filename = None
        self.head = b""
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self._hname = b""
        self._hvalue = b""
        self._disposition = b""
        self._name = None
        self._is_file = False
        self._field = bytearray()

    # python-multipart callbacks (synchronous; file bytes are queued and written by ``feed``).
    def on_part_begin(self):
        self._disposition, self._name, self._is_file = b"", None, False
        self._field = bytearray()

    def on_header_field(self, data, start, end):
        self._hname += data[start:end]

    def on_header_value(self, data, start, end):
        self._hvalue += data[start:end]

    def on_header_end(self):
        if self._hname.lower() == b"content-disposition":
            self._disposition = self._hvalue
        self._hname, self._hvalue = b"", b""

    def on_headers_finished(self):
        _, params = parse_options_header(self._disposition)
        name = params.get(b"name")
        if name is None:
            raise UploadError(400, "multipart part without a name in its Content-Disposition")
        self._name = name.decode("utf-8", "replace")
        if self._name == "file":
            if self.file_seen:
                raise UploadError(400, "more than one 'file' part")
            self.file_seen = self._is_file = True
            fn = params.get(b"filename")
            self.filename = fn.decode("utf-8", "replace")[:255] if fn else None
            fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".part", dir=self.tmp_dir)
            self.file_fh = os.fdopen(fd, "wb")
            self.file_path = Path(tmp)
        elif self._name != "options":
            raise UploadError(400, f"unknown multipart field {self._name!r}; send 'file' and optionally 'options'")

    def on_part_data(self, data, start, end):
        chunk = data[start:end]
        if self._is_file:
            self.file_size += len(chunk)
            if self.file_size > self.max_bytes:
                raise UploadError(413, f"the upload is larger than the server's limit of {self.max_bytes} bytes")
            if len(self.head) < SNIFF_BYTES:
                self.head += chunk[:SNIFF_BYTES - len(self.head)]
            self.pending.append(bytes(chunk))
            self.pending_bytes += len(chunk)
        else:
            self._field += chunk
            if len(self._field) > MAX_FIELD_BYTES:
                raise UploadError(413, f"the '{self._name}' field is larger than {MAX_FIELD_BYTES} bytes")

    def on_part_end(self):
        if not self._is_file and self._name is not None:
            if self._name in self.fields:
                raise UploadError(400, f"more than one {self._name!r} field")
            try:
                self.fields[self._name] = self._field.decode("utf-8")
            except UnicodeDecodeError:
                raise UploadError(400, f"the '{self._name}' field is not UTF-8 text") from None

    def flush(self) -> None:
        if self.pending:
            self.file_fh.write(b"".join(self.pending))
            self.file_fh.flush()  # a full disk shows here, not in close()
            self.pending.clear()
            self.pending_bytes = 0

    def close(self, remove: bool) -> None:
        if self.file_fh is not None:
            try:
                self.file_fh.close()
            except OSError:  # unflushed bytes of a refused upload on a full disk
                pass
        if remove and self.file_path is not None:
            self.file_path.unlink(missing_ok=True)


async def receive_upload(request, tmp_dir: Path, max_bytes: int) -> Upload:
    """Stream the multipart body of ``request`` into a temporary file in ``tmp_dir``; UploadError (400/413/415)
    on a malformed body, a body over ``max_bytes`` or a file that is not a known video/image format."""
    ctype = request.headers.get("content-type", "")
    _, params = parse_options_header(ctype)
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "multipart/form-data without a boundary")
    declared = request.headers.get("content-length", "")
    declared = int(declared) if declared.isascii() and declared.isdigit() and len(declared) < 20 else None
    if declared is not None and declared > max_bytes + MAX_FIELD_BYTES + 64 * 1024:
        raise UploadError(413, f"the upload ({declared} bytes) is larger than the server's limit of {max_bytes} bytes")
    try:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(tmp_dir).free
    except OSError as exc:
        raise _disk_error(exc) from None
    if declared is not None and declared > free:
        raise UploadError(507, f"the upload ({declared} bytes) does not fit on the server's disk ({free} bytes "
                               f"free); free space (or delete jobs) and try again")
    p = _Parser(tmp_dir, max_bytes)
    parser = MultipartParser(boundary, {
        "on_part_begin": p.on_part_begin, "on_part_data": p.on_part_data, "on_part_end": p.on_part_end,
        "on_header_field": p.on_header_field, "on_header_value": p.on_header_value,
        "on_header_end": p.on_header_end, "on_headers_finished": p.on_headers_finished})
    ok = False
    try:
        try:
            async for chunk in request.stream():
                parser.write(chunk)
                if p.pending_bytes >= FLUSH_BYTES:
                    await anyio.to_thread.run_sync(p.flush)
            parser.finalize()
            p.flush()
        except ClientDisconnect:
            raise UploadError(400, "the client went away before the body was complete") from None
        except OSError as exc:
            raise _disk_error(exc) from None
        if parser.state != MultipartState.END:
            raise UploadError(400, "the multipart body is incomplete (no closing boundary): it was cut off, or "
                                   "shorter than its Content-Length said")
        if not p.file_seen:
            raise UploadError(400, "the multipart body has no 'file' part")
        if p.file_size == 0:
            raise UploadError(415, "the uploaded file is empty; send a video or an image")
        kind = sniff(p.head)
        if kind is None:
            raise UploadError(415, f"the uploaded file is not a supported video or image ({ACCEPTED}); "
                                   f"recognised by its content, not its name")
        ok = True
        return Upload(p.file_path, p.file_size, kind[0], kind[1], kind[2], p.filename, p.fields)
    except FormParserError as exc:
        raise UploadError(400, f"malformed multipart body ({exc})") from None
    finally:
        p.close(remove=not ok)


def _disk_error(exc: OSError) -> Exception:
    """507 for a full disk; any other OSError stays itself (a 500 with an error id)."""
    if is_disk_full(exc):
        return UploadError(507, "the upload does not fit on the server's disk; free space (or delete jobs) and try "
                                "again")
    return exc
