"""Failures the server did not expect: clients get a stable one-line message with an error id, the server's log
(stderr) gets the id with the whole story (traceback, paths, exception text)."""

from __future__ import annotations

import secrets
import sys
import traceback

DISK_FULL = "the server's disk is full; free space (or delete jobs) and try again"


def new_error_id() -> str:
    return "E" + secrets.token_hex(5)


def log_error(what: str, exc: BaseException | None = None) -> str:
    """Write ``what`` (and the traceback of ``exc``) to the server's log under a new error id; returns the id."""
    eid = new_error_id()
    text = f"stag4d serve: error {eid}: {what}\n"
    if exc is not None:
        text += "".join(traceback.format_exception(exc))
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):  # a log on a full disk or a closed stream must not take the caller down
        pass
    return eid


def internal_error(what: str, exc: BaseException | None = None) -> str:
    """The client's message for an unexpected failure: ``what`` went wrong, the id, where the detail is."""
    return f"{what} (error id {log_error(what, exc)}); see the server's log"
