"""`stag4d models list|download NAME` (filled in by the generative-stages issue)."""

from __future__ import annotations

import sys


def add_models_arguments(p) -> None:
    p.add_argument("action", nargs="?", choices=["list", "download"], default="list")
    p.add_argument("name", nargs="?")


def run_models(args) -> int:
    print("stag4d models: not implemented yet in this version: the model registry arrives with the "
          "generative-stages issue.", file=sys.stderr)
    return 3
