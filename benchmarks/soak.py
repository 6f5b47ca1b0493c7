"""A bounded soak of `stag4d serve` (issue 15): N mixed clients for S seconds against a real server on 127.0.0.1,
reporting errors, 5xx answers, and the server's RSS and open descriptors over time.

    .venv/bin/python benchmarks/soak.py                         # 60 s, 50 clients (the docs/benchmarks.md figure)
    .venv/bin/python benchmarks/soak.py --seconds 5 --clients 10

The clients (threads, one httpx connection each, round-robin over the roles): pollers (the add-on's job poll,
the job list, file lists, a ranged download), SSE readers (a job's event stream for up to 2 s, then again from
the last id), uploaders (a multipart PNG job, half of them cancelled at once; beyond 40 jobs they delete the
oldest first, so the job count stays steady), cancellers and deleters (any job
they see; 404 and 409 are fair answers when another client got there first). The server runs no jobs
(--jobs-per-device 0): the soak loads the transport and the API, not the CPU. An *error* is a request that got
no answer (a reset, a timeout) or a 5xx; the RSS and descriptor samples are taken once a second from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from test_server_support import Server  # noqa: E402

PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"
       b"\x00\x00\x00\rIDATx\x9cc\xf8\xcf\xc0\xf0\x1f\x00\x05\x00\x01\xff\x89\x99=\x1d\x00\x00\x00\x00IEND\xaeB`\x82")
SSE_S = 2.0    # one SSE session lasts this long
MAX_JOBS = 40  # uploaders delete the oldest job beyond this
ROLES = ("poll", "poll", "sse", "upload", "poll", "cancel", "sse", "delete", "poll", "upload")


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.statuses: Counter = Counter()
        self.errors: Counter = Counter()
        self.requests = 0
        self.jobs: list[str] = []

    def record(self, what: str, response: httpx.Response | None = None, error: Exception | None = None) -> None:
        with self.lock:
            self.requests += 1
            if error is not None:
                self.errors[f"{what}: {type(error).__name__}"] += 1
            else:
                self.statuses[response.status_code] += 1
                if response.status_code >= 500:
                    self.errors[f"{what}: {response.status_code}"] += 1

    def some_job(self, rng: random.Random) -> str | None:
        with self.lock:
            return rng.choice(self.jobs) if self.jobs else None


def _call(tally: Tally, what: str, fn):
    try:
        r = fn()
    except httpx.HTTPError as exc:
        tally.record(what, error=exc)
        return None
    tally.record(what, r)
    return r


def _poll(c: httpx.Client, tally: Tally, rng: random.Random) -> None:
    job = tally.some_job(rng)
    _call(tally, "list", lambda: c.get("/v1/jobs"))
    if job:
        _call(tally, "poll", lambda: c.get(f"/v1/jobs/{job}"))
        _call(tally, "files", lambda: c.get(f"/v1/jobs/{job}/files"))
        _call(tally, "download", lambda: c.get(f"/v1/jobs/{job}/files/job.json", headers={"Range": "bytes=0-99"}))
    time.sleep(0.05)


def _sse(c: httpx.Client, tally: Tally, rng: random.Random, last: dict) -> None:
    job = tally.some_job(rng)
    if not job:
        time.sleep(0.1)
        return
    headers = {"Accept": "text/event-stream"}
    if job in last:
        headers["Last-Event-ID"] = str(last[job])
    t0 = time.monotonic()
    try:
        # A queued job may send nothing for 15 s (the keepalive): a read timeout ends this session, not an error.
        with c.stream("GET", f"/v1/jobs/{job}/events", headers=headers, timeout=httpx.Timeout(10.0, read=SSE_S)) as r:
            tally.record("sse", r)
            if r.status_code == 200:
                try:
                    for line in r.iter_lines():
                        if line.startswith("id:"):
                            last[job] = int(line[3:].strip())
                        if time.monotonic() - t0 > SSE_S:
                            break
                except httpx.ReadTimeout:
                    pass
    except httpx.HTTPError as exc:
        tally.record("sse", error=exc)


def _upload(c: httpx.Client, tally: Tally, rng: random.Random) -> None:
    with tally.lock:  # a steady population of jobs, so that the RSS can be flat
        oldest = tally.jobs.pop(0) if len(tally.jobs) >= MAX_JOBS else None
    if oldest is not None:
        _call(tally, "delete", lambda: c.delete(f"/v1/jobs/{oldest}"))
    r = _call(tally, "upload", lambda: c.post("/v1/jobs", files={"file": ("photo.png", PNG)},
                                              data={"options": json.dumps({"seed": rng.randrange(1000)})}))
    if r is not None and r.status_code == 201:
        job = r.json()["id"]
        with tally.lock:
            tally.jobs.append(job)
        if rng.random() < 0.5:
            _call(tally, "cancel", lambda: c.post(f"/v1/jobs/{job}/cancel"))
    time.sleep(0.2)


def _cancel(c: httpx.Client, tally: Tally, rng: random.Random) -> None:
    job = tally.some_job(rng)
    if job:
        _call(tally, "cancel", lambda: c.post(f"/v1/jobs/{job}/cancel"))
    time.sleep(0.2)


def _delete(c: httpx.Client, tally: Tally, rng: random.Random) -> None:
    job = tally.some_job(rng)
    if job:
        r = _call(tally, "delete", lambda: c.delete(f"/v1/jobs/{job}"))
        if r is not None and r.status_code in (200, 204, 404):
            with tally.lock:
                if job in tally.jobs:
                    tally.jobs.remove(job)
    time.sleep(0.3)


def _client(srv: Server, role: str, seed: int, tally: Tally, stop: threading.Event) -> None:
    rng = random.Random(seed)
    last: dict = {}
    with srv.client(timeout=30.0) as c:
        while not stop.is_set():
            if role == "poll":
                _poll(c, tally, rng)
            elif role == "sse":
                _sse(c, tally, rng, last)
            elif role == "upload":
                _upload(c, tally, rng)
            elif role == "cancel":
                _cancel(c, tally, rng)
            else:
                _delete(c, tally, rng)


def _sample(pid: int) -> tuple[float, int]:
    rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if line.startswith("VmRSS:"))
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def soak(root: Path, seconds: float, clients: int, seed: int = 0) -> dict:
    tally, stop = Tally(), threading.Event()
    samples: list[tuple[float, float, int]] = []
    with Server(root, "--jobs-per-device", "0", "--max-upload-mb", "1") as srv:
        assert httpx.get(f"{srv.url}/v1/health").status_code == 200  # the event loop runs: the start sample
        start_rss, start_fds = _sample(srv.proc.pid)
        threads = [threading.Thread(target=_client, args=(srv, ROLES[i % len(ROLES)], seed + i, tally, stop))
                   for i in range(clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        while time.monotonic() - t0 < seconds:
            time.sleep(1.0)
            samples.append((time.monotonic() - t0, *_sample(srv.proc.pid)))
        stop.set()
        for t in threads:
            t.join(60)
        time.sleep(1.0)  # the server closes its side of the finished connections
        end_rss, end_fds = _sample(srv.proc.pid)
        log = srv.stderr()
        tracebacks = log.count("Traceback")
        first_traceback = log[log.find("Traceback"):][:4000] if tracebacks else ""
    rss = [s[1] for s in samples]
    fds = [s[2] for s in samples]
    half = len(samples) // 2
    return {
        "seconds": seconds, "clients": clients, "requests": tally.requests,
        "errors": sum(tally.errors.values()), "error_kinds": dict(tally.errors),
        "5xx": sum(n for code, n in tally.statuses.items() if code >= 500),
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())}, "server_tracebacks": tracebacks,
        "first_traceback": first_traceback,
        "rss_mb": {"start": start_rss, "max": max(rss), "end": end_rss,
                   "first_half_median": statistics.median(rss[:half] or rss),
                   "second_half_median": statistics.median(rss[half:])},
        "fds": {"start": start_fds, "max": max(fds), "end": end_fds},
        "samples": samples,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="stag4d-soak-") as tmp:
        out = soak(Path(tmp), args.seconds, args.clients, args.seed)
    print(json.dumps({k: v for k, v in out.items() if k != "samples"}, indent=2))
    print("every 10 s (s, RSS MB, fds):", ", ".join(f"({t:.0f}, {r:.1f}, {f})" for t, r, f in out["samples"][9::10]))
    r, f = out["rss_mb"], out["fds"]
    print(f"\n| soak: {out['clients']} clients, {out['seconds']:.0f} s | {out['requests']} requests, "
          f"{out['errors']} errors, {out['5xx']} 5xx | RSS {r['start']:.1f} -> max {r['max']:.1f} -> end "
          f"{r['end']:.1f} MB (halves' medians {r['first_half_median']:.1f} / {r['second_half_median']:.1f}) | "
          f"fds {f['start']} -> max {f['max']} -> end {f['end']} |")
    return 0 if out["errors"] == 0 and out["5xx"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
