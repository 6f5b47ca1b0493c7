"""`stag4d serve`: argument definitions and the entry point (filled in by the server issue)."""

from __future__ import annotations

import sys


def add_serve_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--token-file")
    p.add_argument("--jobs-dir")


def run_serve(args) -> int:
    print("stag4d serve: not implemented yet in this version: the HTTP backend arrives with the server issue.",
          file=sys.stderr)
    return 3
