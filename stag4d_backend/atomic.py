"""Atomic file and directory replacement (temp name in the same directory, then rename): every writer of the
backend goes through here, so a killed process never leaves a half-written file under its final name.

A file or folder renamed into place gets the mode a plain ``open``/``mkdir`` would give it (0666/0777 less the
umask), not mkstemp's 0600: 0644/0755 for the CLI's outputs under the usual umask 022, 0600/0700 under
``stag4d serve``, which runs with umask 077 (docs/server.md, "Permissions")."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it (Linux); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path next to ``path`` (same suffix, so format-by-extension writers work); on success it is
    renamed onto ``path``, on any error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # writers such as USD refuse to "create" over an existing file
    try:
        yield Path(tmp)
        if not os.path.exists(tmp):
            raise RuntimeError(f"{path}: the writer produced no file")
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, data, indent: int = 2, sort_keys: bool = False) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=indent, sort_keys=sort_keys)
            fh.write("\n")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a fresh temporary directory next to ``path``; on success it replaces ``path`` as a whole (so files
    from an earlier, longer run never survive), on error it is deleted and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(directory: str | os.PathLike) -> None:
    """Delete leftovers of a killed run (``.*.tmp*`` / ``.*.old`` entries) in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if p.name.startswith(".") and (".tmp" in p.name or p.name.endswith(".old")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
