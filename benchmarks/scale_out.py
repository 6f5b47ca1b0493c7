"""Throughput of N tiny example jobs: the Ray engine on a one-machine Ray cluster vs the local engine, in the same
run (issue 16), printed as a Markdown table for docs/benchmarks.md (and as JSON with --json).

    .venv/bin/python benchmarks/scale_out.py                   # N=6 jobs, 3 rounds, CPUs of this machine
    .venv/bin/python benchmarks/scale_out.py --jobs 8 --rounds 5 --slots 2

Configurations, each a fresh `stag4d serve` on its own jobs dir, rounds alternated (A B C A B C ...):
- local x1:  the local engine, one job at a time (the default), torch's own thread count;
- local x{slots}: the local engine, --jobs-per-device {slots}, one torch thread per job;
- ray x{slots}: --engine ray on a `ray start --head` cluster of {slots} CPUs (loopback), one CPU per job.
A round submits N jobs at once and waits for all; throughput = N / (last job finished - first submitted), in jobs
per minute; the server's and the cluster's start-up are measured apart (they are paid once, not per job).
CPU timings move with other load on the machine: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from ray_cluster import RayCluster  # noqa: E402
from test_server_support import TINY, Server, wait_job  # noqa: E402


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def one_round(server: Server, n: int, options: dict) -> dict:
    with server.client() as c:
        t0 = time.time()
        ids = [c.post("/v1/jobs", json={"kind": "example", "options": options}).json()["id"] for _ in range(n)]
        finals = [wait_job(c, job_id, timeout=1800) for job_id in ids]
        t1 = time.time()
        assert all(f["state"] == "finished" for f in finals), [f["error"] for f in finals]
        for job_id in ids:
            c.delete(f"/v1/jobs/{job_id}")
    return {"wall_s": round(t1 - t0, 2), "jobs_per_min": round(n / (t1 - t0) * 60, 2)}


def start_server(root: Path, args: list[str], env: dict) -> tuple[Server, float]:
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        t0 = time.time()
        server = Server(root, *args).start(timeout=300)
        return server, round(time.time() - t0, 2)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--slots", type=int, default=2, help="jobs at once (local x slots, ray CPUs)")
    p.add_argument("--iters", type=int, default=40, help="fit steps per job (tiny preset: 40)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    options = dict(TINY, iters=args.iters)
    root = Path(tempfile.mkdtemp(prefix="stag4d-scale-out-"))
    load0 = os.getloadavg()
    t0 = time.time()
    cluster = RayCluster(num_cpus=args.slots, resources={"stag4d_job": args.slots}).start()
    cluster_s = round(time.time() - t0, 2)
    one_thread = {"OMP_NUM_THREADS": "1"}
    configs = {
        "local x1": (["--jobs-per-device", "1"], {}),
        f"local x{args.slots}": (["--jobs-per-device", str(args.slots)], one_thread),
        f"ray x{args.slots}": (["--engine", "ray", "--ray-address", cluster.address, "--ray-gpus-per-job", "0",
                                "--ray-resources", '{"stag4d_job": 1}'], cluster.env),
    }
    servers, rows = {}, {name: [] for name in configs}
    try:
        start_s = {}
        for name, (extra, env) in configs.items():
            servers[name], start_s[name] = start_server(root / name.replace(" ", "_"), extra, env)
            one_round(servers[name], 1, dict(options, iters=1))  # warm: the first worker imports torch from cold
        for r in range(args.rounds):
            for name in configs:
                rows[name].append(one_round(servers[name], args.jobs, options))
                print(f"round {r + 1} {name}: {rows[name][-1]}", file=sys.stderr)
    finally:
        for server in servers.values():
            server.stop()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    load1 = os.getloadavg()
    report = {"cpu_model": cpu_model(), "cpus": os.cpu_count(), "jobs": args.jobs, "rounds": args.rounds,
              "slots": args.slots, "iters": args.iters, "ray_cluster_start_s": cluster_s, "server_start_s": start_s,
              "loadavg_start": [round(x, 2) for x in load0], "loadavg_end": [round(x, 2) for x in load1],
              "results": {name: {"median_wall_s": statistics.median(x["wall_s"] for x in runs),
                                 "median_jobs_per_min": statistics.median(x["jobs_per_min"] for x in runs),
                                 "runs": runs} for name, runs in rows.items()}}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.jobs} tiny example jobs ({args.iters} fit steps each), {args.rounds} rounds, median; "
          f"{report['cpu_model']}, {report['cpus']} CPUs; load {load0[0]:.1f} -> {load1[0]:.1f}\n")
    print("| engine | jobs at once | wall for the batch (s) | jobs / min | server start (s) |")
    print("|---|---|---|---|---|")
    for name, res in report["results"].items():
        at_once = name.split("x")[-1]
        print(f"| {name.split(' ')[0]} | {at_once} | {res['median_wall_s']:.1f} | {res['median_jobs_per_min']:.1f} "
              f"| {start_s[name]:.1f} |")
    print(f"\nRay cluster start-up (`ray start --head`): {cluster_s:.1f} s, paid once.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
