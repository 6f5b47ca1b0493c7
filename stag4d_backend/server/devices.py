"""Which devices the server runs jobs on. The server process never imports torch (it stays small and starts
fast): ``--device auto`` asks a short-lived Python process what torch sees."""

from __future__ import annotations

import json
import re
import subprocess
import sys

DEVICE_RE = re.compile(r"^(cpu|cuda(:\d{1,2})?)$")
_PROBE = ("import json, torch; print(json.dumps([f'cuda:{i}' for i in range(torch.cuda.device_count())] "
          "if torch.cuda.is_available() else []))")


def parse_devices(text: str) -> list[str] | None:
    """'auto' -> None (probe); 'cpu' / 'cuda' / 'cuda:0,cuda:1' -> the list; ValueError otherwise."""
    text = (text or "auto").strip().lower()
    if text == "auto":
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        if not DEVICE_RE.fullmatch(part):
            raise ValueError(f"{part!r} is not a device; use auto, cpu, cuda or cuda:N (comma-separated for several)")
        part = "cuda:0" if part == "cuda" else part
        if part not in out:
            out.append(part)
    return out


def probe_devices(timeout_s: float = 180.0) -> tuple[list[str], str | None]:
    """(CUDA devices torch sees, or ["cpu"]; a note when the probe failed)."""
    try:
        res = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout_s)
        cuda = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 and res.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        return ["cpu"], f"device probe failed ({exc}); running jobs on the CPU"
    if cuda is None:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return ["cpu"], f"device probe failed ({tail}); running jobs on the CPU"
    return (cuda or ["cpu"]), None
