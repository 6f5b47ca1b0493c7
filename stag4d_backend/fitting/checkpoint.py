"""The resumable training state (``OUT_DIR/state.pt``): written atomically, checked against the request."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..atomic import atomic_path

STATE = "state.pt"
# Options that do not change the result: a resume may differ in these.
_NON_SEMANTIC = ("checkpoint_every", "num_threads", "device")


def fingerprint(config: dict, data_dir: str | Path, frames: list[int] | None = None) -> str:
    """Hash of the options that shape the result and of the input files (names and sizes)."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in config.items() if k not in _NON_SEMANTIC}, sort_keys=True,
                        default=str).encode())
    data_dir = Path(data_dir)
    for sub in ("ref", "zero123"):
        root = data_dir / sub
        if root.is_dir():
            for p in sorted(root.rglob("*.png")):
                h.update(f"{p.relative_to(data_dir)}:{p.stat().st_size};".encode())
    h.update(json.dumps(frames).encode())
    return h.hexdigest()


def save_checkpoint(out_dir: str | Path, state: dict, fp: str) -> Path:
    out_dir = Path(out_dir)
    path = out_dir / STATE
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        # Through a Python file, a full disk is an OSError(ENOSPC) (the job says "disk full at fit"); torch's
        # own writer reports it as a RuntimeError without an errno.
        torch.save(dict(state, fingerprint=fp), fh)
    return path


def load_checkpoint(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / STATE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
