"""The resumable training state (``OUT_DIR/state.pt``): written atomically, checked against the request."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

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
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{STATE}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(dict(state, fingerprint=fp), tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / STATE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
