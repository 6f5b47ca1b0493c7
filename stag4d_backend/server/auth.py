"""The bearer token: a random secret in a file only its owner can read, compared in constant time."""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

MIN_TOKEN_CHARS = 16


class TokenFileError(RuntimeError):
    """The token file cannot be used (one line, names the fix)."""


def default_token_file() -> Path:
    return Path(os.environ.get("STAG4D_TOKEN_FILE") or Path.home() / ".stag4d" / "token").expanduser()


def load_or_create_token(path: str | os.PathLike) -> tuple[str, list[str]]:
    """(token, notes). Creates the file (0600, parent 0700 when new) with ``secrets.token_urlsafe(32)`` if it is
    absent; tightens a group/world-accessible file to 0600 (refuses when that is not possible)."""
    path = Path(path).expanduser()
    notes = []
    if not path.exists():
        if not path.parent.exists():
            path.parent.mkdir(parents=True, mode=0o700)
        token = secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it just now: use theirs
            return load_or_create_token(path)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        notes.append(f"created a new token in {path}")
        return token, notes
    if not path.is_file():
        raise TokenFileError(f"--token-file {path}: not a regular file")
    st = path.stat()
    if st.st_mode & 0o077:
        try:
            os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
        except OSError as exc:
            raise TokenFileError(f"--token-file {path}: readable by other users (mode {oct(st.st_mode & 0o777)}) "
                                 f"and cannot be fixed ({exc.strerror}); chmod 600 it or use another file") from None
        notes.append(f"{path} was readable by other users; its mode is now 0600")
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"--token-file {path}: cannot read it ({exc})") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise TokenFileError(f"--token-file {path}: holds no usable token (at least {MIN_TOKEN_CHARS} characters, "
                             f"no spaces); delete the file to get a new one")
    return token, notes


def token_matches(header: str | None, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode("utf-8", "surrogateescape"), token.encode())
