"""A short soak (benchmarks/soak.py: 10 mixed clients for 5 s against a real server): no request without an
answer, no 5xx, no traceback in the server's log, and the server's descriptors come back to where they started."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak", REPO / "benchmarks" / "soak.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_short_soak_has_no_errors_no_5xx_and_no_descriptor_growth(tmp_path):
    out = _soak_module().soak(tmp_path, seconds=5, clients=10)
    assert out["errors"] == 0 and out["5xx"] == 0, out["error_kinds"]
    assert out["server_tracebacks"] == 0, out["first_traceback"]
    codes = {int(c) for c in out["statuses"]}
    assert {200, 201, 202, 206} <= codes and codes <= {200, 201, 202, 204, 206, 404, 409}, out["statuses"]
    assert out["requests"] > 100
    fds = out["fds"]
    # At most one socket per client plus a few files at the peak; all of them closed again at the end.
    assert fds["max"] <= fds["start"] + 3 * 10 + 10 and fds["end"] <= fds["start"] + 2, fds
