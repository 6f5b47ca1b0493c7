"""`stag4d serve` figures (issue "The backend server"), printed as a Markdown table for docs/benchmarks.md.

    .venv/bin/python benchmarks/server.py                    # all three figures
    .venv/bin/python benchmarks/server.py --only latency     # latency | keepalive | download | overhead
    .venv/bin/python benchmarks/server.py --write-openapi    # regenerate docs/openapi.json and exit

- Event latency: a tiny example job runs under a real server; one SSE client records, for every event, the time
  it arrived minus the time the worker stamped on it in the fit loop (``Job.emit``: just before the append +
  fsync). Target: median under 50 ms.
- Keep-alive request latency: ``GET /v1/jobs/{id}`` (the add-on's poll) 500 times on one kept-alive
  connection, 3 rounds, the median of the rounds' medians; once with http.client (the standard library: little
  client cost), once with httpx (more Python per request). Target: at most 2 ms (without TCP_NODELAY on the
  server's sockets every answer waited ~40 ms for a delayed ACK). Includes the client's own cost.
- Download throughput: a 100 MB file in a job directory fetched over loopback with httpx (streamed, 1 MB reads),
  one client, then 4 at once. The client's own Python cost is included.
- Serving overhead on the fit: the same fit (tiny preset, longer) run by the worker alone (no server) and under
  the server with 5 SSE clients attached, alternated A B A B; the fit's own steps per second from its meta.json
  (start-up excluded). Target: under 5 % slower.
CPU timings move with other load on the machine: say so next to figures taken on a busy one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from stag4d_backend.job import Job  # noqa: E402
from test_server_support import TINY, Server, sse_events, wait_job  # noqa: E402


def write_openapi() -> Path:
    from stag4d_backend.server.app import Settings, create_app

    app = create_app(Settings(jobs_dir=Path(tempfile.gettempdir()) / "stag4d-openapi", token="x" * 32))
    path = REPO / "docs" / "openapi.json"
    path.write_text(json.dumps(app.openapi(), indent=2) + "\n")
    return path


def latency(root: Path, iters: int) -> dict:
    with Server(root / "lat") as srv, srv.client() as c:
        job = c.post("/v1/jobs", json={"kind": "example", "options": dict(TINY, iters=iters)}).json()
        lags = {"progress": [], "other": []}
        for ev, received in sse_events(c, job["id"], timeout=600):
            if ev["n"] == 0:
                continue  # written before the client connected
            lags["progress" if ev["kind"] == "progress" else "other"].append((received - ev["time"]) * 1000)
    every = lags["progress"] + lags["other"]
    q = statistics.quantiles(every, n=20)
    return {"events": len(every), "median_ms": statistics.median(every), "p95_ms": q[18], "max_ms": max(every),
            "progress_median_ms": statistics.median(lags["progress"])}


def download(root: Path, size_mb: int = 100, repeats: int = 3) -> dict:
    with Server(root / "dl", "--jobs-per-device", "0") as srv, srv.client(timeout=120) as c:
        job_id = c.post("/v1/jobs", json={"kind": "example"}).json()["id"]
        big = srv.jobs_dir / job_id / "bake" / "big.bin"
        big.parent.mkdir(parents=True)
        with open(big, "wb") as fh:
            for _ in range(size_mb):
                fh.write(os.urandom(1024 * 1024))
        url = f"/v1/jobs/{job_id}/files/bake/big.bin"

        def fetch(client) -> int:
            n = 0
            with client.stream("GET", url) as r:
                assert r.status_code == 200
                for chunk in r.iter_raw(1024 * 1024):
                    n += len(chunk)
            assert n == size_mb * 1024 * 1024
            return n

        fetch(c)  # warm the page cache
        single = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fetch(c)
            single.append(size_mb / (time.perf_counter() - t0))
        clients = [srv.client(timeout=120) for _ in range(4)]
        t0 = time.perf_counter()
        threads = [threading.Thread(target=fetch, args=(cl,)) for cl in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        together = 4 * size_mb / (time.perf_counter() - t0)
        for cl in clients:
            cl.close()
    return {"single_MBps": max(single), "single_all": single, "four_clients_MBps": together}


def _poll_times(get, requests: int) -> list[float]:
    for _ in range(20):  # warm-up
        get()
    times = []
    for _ in range(requests):
        t0 = time.perf_counter()
        get()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def keepalive(root: Path, requests: int = 500, rounds: int = 3) -> dict:
    """Latency of a job poll (``GET /v1/jobs/{id}``) on one kept-alive connection, with the standard library's
    http.client (little client cost) and with httpx (what the tests use; more Python per request)."""
    import http.client

    out = {}
    with Server(root / "ka", "--jobs-per-device", "0") as srv, srv.client() as c:
        job_id = c.post("/v1/jobs", json={"kind": "example"}).json()["id"]
        conn = http.client.HTTPConnection(srv.address["host"], srv.address["port"], timeout=30)

        def stdlib_get():
            conn.request("GET", f"/v1/jobs/{job_id}", headers=srv.headers)
            r = conn.getresponse()
            assert r.status == 200 and r.read()

        def httpx_get():
            assert c.get(f"/v1/jobs/{job_id}").status_code == 200

        for name, get in (("http.client", stdlib_get), ("httpx", httpx_get)):
            rounds_times = [_poll_times(get, requests) for _ in range(rounds)]
            every = [t for ts in rounds_times for t in ts]
            out[name] = {"requests": requests * rounds,
                         "median_ms": statistics.median(statistics.median(ts) for ts in rounds_times),
                         "round_medians_ms": [statistics.median(ts) for ts in rounds_times],
                         "p95_ms": statistics.quantiles(every, n=20)[18]}
        conn.close()
    return out


def _fit_rate(job_dir: Path) -> float:
    meta = json.loads((job_dir / "model" / "meta.json").read_text())
    return meta["iterations"] / meta["elapsed_s"]


def overhead(root: Path, iters: int, rounds: int) -> dict:
    request = {"kind": "example", "options": dict(TINY, iters=iters, preview_every=0)}
    env = dict(os.environ, PYTHONPATH=str(REPO))
    alone, served = [], []
    for r in range(rounds):
        job_dir = root / f"alone{r}"
        Job(job_dir).create(request)
        subprocess.run([sys.executable, "-m", "stag4d_backend.server.worker", str(job_dir), "--device", "cpu"],
                       check=True, env=env, capture_output=True)
        alone.append(_fit_rate(job_dir))
        with Server(root / f"srv{r}") as srv, srv.client() as c:
            job_id = c.post("/v1/jobs", json=request).json()["id"]
            stop = threading.Event()

            def watch():
                with srv.client() as wc:
                    for _ in sse_events(wc, job_id, timeout=600):
                        if stop.is_set():
                            return

            watchers = [threading.Thread(target=watch, daemon=True) for _ in range(5)]
            for w in watchers:
                w.start()
            assert wait_job(c, job_id, timeout=900)["state"] == "finished"
            stop.set()
            for w in watchers:
                w.join(30)
            served.append(_fit_rate(srv.jobs_dir / job_id))
    a, s = statistics.median(alone), statistics.median(served)
    return {"alone_steps_per_s": alone, "served_steps_per_s": served, "slowdown_pct": 100.0 * (a - s) / a}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["latency", "keepalive", "download", "overhead"])
    p.add_argument("--iters", type=int, default=200, help="fit steps of the latency / overhead jobs")
    p.add_argument("--rounds", type=int, default=2, help="A/B rounds of the overhead measurement")
    p.add_argument("--write-openapi", action="store_true")
    args = p.parse_args()
    if args.write_openapi:
        print(f"wrote {write_openapi()}")
        return 0
    out = {}
    with tempfile.TemporaryDirectory(prefix="stag4d-bench-server-") as tmp:
        root = Path(tmp)
        if args.only in (None, "latency"):
            out["latency"] = latency(root, args.iters)
        if args.only in (None, "keepalive"):
            out["keepalive"] = keepalive(root)
        if args.only in (None, "download"):
            out["download"] = download(root)
        if args.only in (None, "overhead"):
            out["overhead"] = overhead(root, args.iters, args.rounds)
    print(json.dumps(out, indent=2))
    print("\n| measure | value | target |\n|---|---|---|")
    if "latency" in out:
        L = out["latency"]
        print(f"| event latency, fit loop -> SSE client ({L['events']} events) | median {L['median_ms']:.1f} ms, "
              f"p95 {L['p95_ms']:.1f} ms, max {L['max_ms']:.1f} ms | median < 50 ms |")
    for client, K in out.get("keepalive", {}).items():
        print(f"| job poll on a kept-alive connection ({K['requests']} requests, {client} client) | median "
              f"{K['median_ms']:.2f} ms, p95 {K['p95_ms']:.2f} ms | median <= 2 ms |")
    if "download" in out:
        D = out["download"]
        print(f"| download of a 100 MB file over loopback | {D['single_MBps']:.0f} MB/s (1 client), "
              f"{D['four_clients_MBps']:.0f} MB/s (4 clients together) | |")
    if "overhead" in out:
        O = out["overhead"]
        print(f"| fit speed, worker alone vs under the server + 5 SSE clients | "
              f"{statistics.median(O['alone_steps_per_s']):.2f} vs {statistics.median(O['served_steps_per_s']):.2f} "
              f"steps/s ({O['slowdown_pct']:+.1f} %) | < 5 % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
