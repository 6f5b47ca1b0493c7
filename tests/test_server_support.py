"""Helpers for the server tests: a real `stag4d serve` process on 127.0.0.1, SSE reading, tiny example jobs.
(Also checks that the server's torch-free copies of preset and format names match the real ones.)"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
# The smallest example job that still runs every stage: a few seconds of CPU.
TINY = {"preset": "tiny", "example_frames": 4, "example_size": 48, "example_gaussians": 400, "formats": "usd,ply"}
TERMINAL = ("finished", "failed", "cancelled")


class Server:
    """`stag4d serve` in a subprocess; ``start()`` returns once the address line is read."""

    def __init__(self, root: Path, *args: str, jobs_dir: Path | None = None, token_file: Path | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.jobs_dir = jobs_dir or self.root / "jobs"
        self.token_file = token_file or self.root / "token"
        self.args = list(args)
        self.proc: subprocess.Popen | None = None
        self.address: dict = {}
        self.stderr_path = self.root / f"server-{time.time_ns()}.err"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "stag4d_backend.cli", "serve", "--token-file", str(self.token_file),
                "--jobs-dir", str(self.jobs_dir), "--device", "cpu", *self.args]

    def start(self, timeout: float = 60.0) -> "Server":
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=self._err, env=env)
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.stop()
            raise RuntimeError(f"the server printed no address line: {self.stderr()}")
        self.address = json.loads(line)
        return self

    @property
    def url(self) -> str:
        return self.address["url"]

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=kw.pop("timeout", 30.0), **kw)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text()
        except OSError:
            return ""

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def create_job(client: httpx.Client, **options) -> dict:
    r = client.post("/v1/jobs", json={"kind": "example", "options": dict(TINY, **options)})
    assert r.status_code == 201, r.text
    return r.json()


def wait_job(client: httpx.Client, job_id: str, states=TERMINAL, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s: {job}")
        time.sleep(0.1)


def sse_events(client: httpx.Client, job_id: str, since: int = 0, until=None, timeout: float = 120.0):
    """Yield (event, received_at) from the SSE stream until it ends or ``until(event)`` is true."""
    headers = {"Accept": "text/event-stream"}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", params={"since": since}, headers=headers,
                       timeout=httpx.Timeout(timeout, connect=10.0)) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        fields: dict = {}
        for line in r.iter_lines():
            if line == "":
                if "data" in fields:
                    ev = json.loads(fields["data"])
                    assert int(fields["id"]) == ev["n"] and fields["event"] == ev["kind"]
                    yield ev, time.time()
                    if until is not None and until(ev):
                        return
                fields = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(":")
                fields[key] = value[1:] if value.startswith(" ") else value


def wait_event(client: httpx.Client, job_id: str, pred, timeout: float = 120.0) -> dict:
    for ev, _ in sse_events(client, job_id, until=pred, timeout=timeout):
        if pred(ev):
            return ev
    raise AssertionError(f"the event stream of {job_id} ended without the awaited event")


def pid_alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie is dead, only not yet reaped


def assert_same_deformation(job_a: Path, job_b: Path) -> None:
    """The deformation fields of two jobs hold the same tensors, bit for bit (the files' bytes may differ: the
    safetensors header lists its metadata in hash-map order)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    fa, fb = (j / "model" / "deformation.safetensors" for j in (job_a, job_b))
    ta, tb = load_file(str(fa)), load_file(str(fb))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    with safe_open(str(fa), "pt") as ha, safe_open(str(fb), "pt") as hb:
        assert ha.metadata() == hb.metadata()


def test_server_names_match_the_backend():
    from stag4d_backend.config import PRESETS
    from stag4d_backend.server.schemas import BAKE_FORMATS, PRESETS as SERVER_PRESETS
    from stag4d_backend.stages.bake import FORMATS

    assert tuple(SERVER_PRESETS) == tuple(PRESETS)
    assert tuple(BAKE_FORMATS) == tuple(FORMATS)


def test_server_modules_do_not_import_torch():
    code = ("import sys; import stag4d_backend.server.app, stag4d_backend.server.cli, stag4d_backend.server.jobs; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.stdout.strip() == "False"
