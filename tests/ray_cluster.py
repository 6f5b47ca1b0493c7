"""A one-machine Ray cluster for the Ray-engine tests and benchmark: `ray start --head --block` in a process group
of its own, bound to the loopback address, in a private temp dir; ``stop()`` ends that group (and nothing else)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Ray resolves 127.0.0.1 to the machine's outward address unless it runs as a single-machine cluster: with this
# every Ray process (the head's and the server's driver) talks over loopback only.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayCluster:
    def __init__(self, num_cpus: int = 2, resources: dict | None = None):
        self.num_cpus, self.resources = num_cpus, dict(resources or {})
        self.port = _free_port()
        self.temp_dir = Path(tempfile.mkdtemp(prefix="s4dray-"))  # short: Ray's socket paths must fit 107 bytes
        self.log_path = self.temp_dir / "ray-start.log"
        self.proc: subprocess.Popen | None = None
        # Ray's token authentication with a token of this cluster's own (nothing is written to ~/.ray).
        self.env = dict(LOOPBACK_ENV, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "RayCluster":
        ray_cli = Path(sys.executable).with_name("ray")
        cmd = [str(ray_cli), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
               "--num-cpus", str(self.num_cpus), "--num-gpus", "0", "--resources", json.dumps(self.resources),
               "--include-dashboard", "false", "--temp-dir", str(self.temp_dir),
               "--object-store-memory", str(80 * 1024 * 1024), "--disable-usage-stats", "--block"]
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, **self.env), start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while b"Ray runtime started" not in self.log_path.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = self.log_path.read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"`ray start --head` did not start: {text[-2000:]}")
            time.sleep(0.2)
        return self

    def pids(self) -> list[int]:
        """The processes of this cluster: `ray start` and its descendants (Ray's workers have sessions of their
        own, so the process group is not enough)."""
        parents = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                    parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    pass
        out = []
        for pid in parents:
            p = pid
            while p > 1 and p != self.proc.pid:
                p = parents.get(p, 0)
            if p == self.proc.pid:
                out.append(pid)
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for pid in self.pids():  # `ray start --block` ignores SIGTERM; these are ours, by id
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
