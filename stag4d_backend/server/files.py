"""Job ids and the files of a job directory as the API exposes them: ids are made here and checked on every path;
a requested file name must stay inside its job directory after resolving symlinks."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

JOB_ID_RE = re.compile(r"^j[0-9a-f]{12}$")
JOB_ID_PATTERN = JOB_ID_RE.pattern
MAX_NAME = 1024
# What resolve_download accepts as a name, for the OpenAPI document: '/'-separated components, none empty, '.'
# or '..', no NUL or backslash (components starting with '.' pass the pattern; they are internal, so 404).
_PART = r"(?:[^/\x00\\.][^/\x00\\]*|\.[^/\x00\\.][^/\x00\\]*|\.\.[^/\x00\\]+)"
FILE_NAME_PATTERN = rf"^{_PART}(?:/{_PART})*$"


class BadName(ValueError):
    """A requested file name that is not a plain relative path inside the job directory."""


def new_job_id() -> str:
    return "j" + secrets.token_hex(6)


def is_job_id(text: str) -> bool:
    return isinstance(text, str) and JOB_ID_RE.fullmatch(text) is not None


def job_path(jobs_dir: Path, job_id: str) -> Path:
    if not is_job_id(job_id):
        raise BadName(f"{job_id!r} is not a job id (j + 12 lowercase hex digits)")
    return jobs_dir / job_id


def _hidden(part: str) -> bool:
    return part.startswith(".")


def resolve_download(job_dir: Path, name: str) -> Path:
    """The file ``name`` (relative, '/'-separated) inside ``job_dir``. BadName for absolute paths, '..', NUL,
    backslashes or hidden (internal) entries; FileNotFoundError when it does not exist, is not a regular file or
    resolves (through a symlink) outside the job directory."""
    if not name or len(name) > MAX_NAME or "\x00" in name or "\\" in name:
        raise BadName("a file name must be a non-empty relative path without NUL or backslash")
    if name.startswith("/") or os.path.isabs(name):
        raise BadName("a file name must be relative to the job directory")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise BadName("a file name must not contain '.', '..' or empty components")
    if any(_hidden(p) for p in parts):
        raise FileNotFoundError(name)  # internal files (locks, temporaries) are not offered
    root = job_dir.resolve()
    target = (root / name).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        raise FileNotFoundError(name)
    return target


def list_files(job_dir: Path) -> list[dict]:
    """Every regular file of the job (not symlinks, not hidden entries), sorted by name."""
    out = []
    root = job_dir
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d) and not os.path.islink(os.path.join(dirpath, d)))
        for fn in filenames:
            if _hidden(fn):
                continue
            full = os.path.join(dirpath, fn)
            try:
                st = os.lstat(full)
            except OSError:
                continue  # removed meanwhile (a pruned preview)
            if not os.path.isfile(full) or os.path.islink(full):
                continue
            out.append({"name": Path(os.path.relpath(full, root)).as_posix(), "size": st.st_size,
                        "mtime": round(st.st_mtime, 3)})
    out.sort(key=lambda f: f["name"])
    return out


MEDIA_TYPES = {".usdc": "application/octet-stream", ".usd": "application/octet-stream",
               ".usda": "text/plain; charset=utf-8", ".ply": "application/octet-stream",
               ".json": "application/json", ".jsonl": "application/x-ndjson", ".mp4": "video/mp4",
               ".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp", ".log": "text/plain; charset=utf-8",
               ".txt": "text/plain; charset=utf-8"}


def media_type(path: Path) -> str:
    return MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
