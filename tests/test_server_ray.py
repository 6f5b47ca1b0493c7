"""`stag4d serve --engine ray` against a real one-machine Ray cluster (`ray start --head` on 127.0.0.1, 2 CPUs,
the custom resource ``stag4d_job: 2``), one cluster and one server for the whole module (Ray starts slowly):

- four jobs submitted at once run two at a time (each asks for ``stag4d_job: 1``), all finish, and their outputs
  equal the local engine's worker for the same request, bit for bit; one of them loses its Ray worker process
  (kill -9) in the middle of its fit, and Ray's retry resumes it from its checkpoint with the same outputs;
- cancel and delete reach a running Ray job; a server killed with a Ray job in flight resubmits it on restart;
- `stag4d submit` (the batch client) against it;
- the add-on's remote-backend test passes unchanged against the Ray-engine server.

A CPU fit's floats depend on the torch thread count: the Ray task uses as many threads as CPUs it asked for (1
here), so the local reference runs with one thread too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray", reason="the [ray] extra is not installed (install_scripts/install.sh installs it)")

from stag4d_backend.job import Job  # noqa: E402
from ray_cluster import RayCluster  # noqa: E402
from test_server_support import REPO, TINY, Server, assert_same_deformation, pid_alive, wait_job  # noqa: E402

try:  # the add-on's remote-backend tests, collected here again and run against this module's Ray-engine server
    from test_blender_addon_server import (addon, scene, test_remote_backend_downloads_the_result,  # noqa: F401
                                           test_remote_backend_uploads_the_input_file)
except pytest.skip.Exception as exc:  # no bpy here
    ADDON_SKIP = str(exc)

    def test_remote_backend_downloads_the_result():
        pytest.skip(ADDON_SKIP)

REQUEST = {"kind": "example", "options": dict(TINY, iters=100, checkpoint_every=10, seed=7)}
OUTPUTS = ("model/canonical.ply", "bake/gaussians.usdc", *(f"bake/ply/{k:04d}.ply" for k in range(4)))


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """REQUEST run by the local engine's worker process with one torch thread, started at once (it runs while
    the Ray cluster starts); call the fixture's value to wait for it and get its job directory."""
    ref = tmp_path_factory.mktemp("local-ref") / "job"
    Job(ref).create(REQUEST)
    proc = subprocess.Popen([sys.executable, "-m", "stag4d_backend.server.worker", str(ref), "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))

    def finished():
        assert proc.wait(600) == 0 and Job(ref).read()["state"] == "finished"
        return ref

    yield finished
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory, local_reference):
    root = tmp_path_factory.mktemp("ray-engine")
    cluster = RayCluster(num_cpus=2, resources={"stag4d_job": 2}).start()
    saved = dict(os.environ)
    os.environ.update(cluster.env)  # the server's Ray driver: loopback only, the cluster's token
    server = Server(root, "--engine", "ray", "--ray-address", cluster.address, "--ray-gpus-per-job", "0",
                    "--ray-resources", '{"stag4d_job": 1}', "--ray-max-retries", "2")
    try:
        server.start(timeout=120)
        server.cluster = cluster
        yield server
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved)
        cluster.stop()


def wait_event(client, job_id: str, pred, timeout: float = 120.0) -> dict:
    """The first event of the job that ``pred`` accepts (long-polled JSON pages; bounded by ``timeout``)."""
    deadline, since = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        page = client.get(f"/v1/jobs/{job_id}/events", params={"format": "json", "since": since, "wait": 1}).json()
        for ev in page["events"]:
            if pred(ev):
                return ev
        since = page["next"]
    raise AssertionError(f"no such event of {job_id} within {timeout} s: {client.get(f'/v1/jobs/{job_id}').json()}")


def _attempts(events: list[dict]) -> list[tuple[float, float]]:
    """(start, end) of each run of a job: from a "running" job_state to the last event before the next one."""
    out = []
    for ev in events:
        if ev["kind"] == "job_state" and ev["state"] == "running":
            out.append([ev["time"], ev["time"]])
        elif out:
            out[-1][1] = ev["time"]
    return [tuple(a) for a in out]


def _most_at_once(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_four_jobs_run_two_at_a_time_survive_a_lost_worker_and_equal_the_local_engine(ray_server, local_reference):
    with ray_server.client() as c:
        ids = [c.post("/v1/jobs", json=REQUEST).json()["id"] for _ in range(4)]
        victim = ids[0]
        wait_event(c, victim, lambda e: e["kind"] == "progress" and e["stage"] == "fit" and e["step"] >= 25)
        job_dir = ray_server.jobs_dir / victim
        pid = json.loads((job_dir / "job.json").read_text())["worker_pid"]
        assert pid in ray_server.cluster.pids()  # a Ray worker process of our cluster runs the fit
        os.kill(pid, signal.SIGKILL)
        finals = [wait_job(c, job_id, timeout=300) for job_id in ids]
        events = {job_id: c.get(f"/v1/jobs/{job_id}/events").json()["events"] for job_id in ids}

    assert [f["state"] for f in finals] == ["finished"] * 4, [f["error"] for f in finals]
    assert all(f["device"] == "cpu" for f in finals)  # the task's own record of where it ran
    attempts = {job_id: _attempts(evs) for job_id, evs in events.items()}
    assert [len(a) for a in attempts.values()] == [2, 1, 1, 1]  # the victim was retried once, by Ray
    assert _most_at_once([a for runs in attempts.values() for a in runs]) == 2  # stag4d_job: 2 available, 1 each

    evs = events[victim]
    assert [e["n"] for e in evs] == list(range(len(evs)))  # one gapless log across the two attempts
    states = [e["state"] for e in evs if e["kind"] == "job_state"]
    assert states == ["queued", "running", "running", "finished"]
    resumed = [e for e in evs if e["kind"] == "job_state" and e["state"] == "running"][1]
    assert resumed["resumed"] is True
    fit = [e["result"] for e in evs if e["kind"] == "stage_finished" and e["stage"] == "fit"][-1]
    assert fit["resumed_from"] >= 20 and fit["resumed_from"] % 10 == 0 and fit["iterations"] == 100
    assert not pid_alive(pid)

    reference = local_reference()
    for job_id in ids:  # bit for bit the local engine's outputs, the resumed job's included
        for name in OUTPUTS:
            assert (ray_server.jobs_dir / job_id / name).read_bytes() == (reference / name).read_bytes(), \
                (job_id, name)
        assert_same_deformation(ray_server.jobs_dir / job_id, reference)


def _fit_step(at_least: int):
    return lambda e: e["kind"] == "progress" and e["stage"] == "fit" and e["step"] >= at_least


def test_cancel_server_restart_and_delete_on_a_running_ray_job(ray_server):
    with ray_server.client() as c:
        job_id = c.post("/v1/jobs", json={"kind": "example", "options": dict(TINY, iters=3000)}).json()["id"]
        wait_event(c, job_id, _fit_step(3))
        job_dir = ray_server.jobs_dir / job_id
        pid = Job(job_dir).read()["worker_pid"]
        assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        final = wait_job(c, job_id, timeout=60)
        assert final["state"] == "cancelled", final
        stopped = [e for e in c.get(f"/v1/jobs/{job_id}/events").json()["events"] if e["kind"] == "stage_stopped"]
        assert [(e["stage"], e["state"]) for e in stopped] == [("fit", "cancelled")]  # at a step boundary
        checkpoint = torch.load(job_dir / "model" / "state.pt", weights_only=False)["it"]
        assert checkpoint == stopped[0]["step"] < 3000  # it checkpointed before it stopped
        assert pid_alive(pid)  # the Ray worker process lives on for the next task
        assert c.post(f"/v1/jobs/{job_id}/resume").status_code == 202
        wait_event(c, job_id, _fit_step(checkpoint + 2))

    # The server dies with the job in flight: Ray ends the tasks of its driver; the next server resubmits it.
    pid = Job(job_dir).read()["worker_pid"]
    ray_server.kill9()
    deadline = time.monotonic() + 30
    while pid_alive(pid):
        assert time.monotonic() < deadline, "Ray kept the task of a dead server running"
        time.sleep(0.1)
    n0 = len(Job(job_dir).events())
    ray_server.start(timeout=120)
    with ray_server.client() as c:
        wait_event(c, job_id, lambda e: e["n"] >= n0 and _fit_step(1)(e))  # a fit step of the resubmitted task
        states = [e["state"] for e in c.get(f"/v1/jobs/{job_id}/events").json()["events"] if e["kind"] == "job_state"]
        # Ray ends the dead server's task with SystemExit (recorded: "interrupted") or kills its process first
        # (the next server records it); either way the job is queued again and resumes.
        assert states[:5] == ["queued", "running", "cancelled", "queued", "running"], states
        assert states[-2:] == ["queued", "running"] and set(states[5:-2]) <= {"interrupted"}, states

        # Delete it while it runs: the worker stops, the directory goes, the id is unknown.
        assert c.delete(f"/v1/jobs/{job_id}").status_code == 204
        assert c.get(f"/v1/jobs/{job_id}").status_code == 404
        assert not job_dir.exists()
        again = c.post("/v1/jobs", json={"kind": "example", "options": dict(TINY, iters=5)}).json()["id"]
        assert wait_job(c, again, timeout=120)["state"] == "finished"  # the slots are free again


def test_submit_batch_client_waits_and_downloads_the_bakes(ray_server, tmp_path):
    """`stag4d submit`: two seed variants of the example, one progress line per change, the bakes downloaded;
    an uploaded input file becomes a job of its own (not waited for here)."""
    from PIL import Image

    out = tmp_path / "bakes"
    cmd = [sys.executable, "-m", "stag4d_backend.cli", "submit", "--server", ray_server.url, "--token-file",
           str(ray_server.token_file), "--example", "1", "--seeds", "3,4", "--preset", "tiny", "--iters", "5",
           "--formats", "usd,ply", "--option", "example_frames=4", "--option", "example_size=48",
           "--option", "example-gaussians=400", "--wait", "--download", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(x["label"], x["state"]) for x in lines] == [("example-seed3", "finished"), ("example-seed4", "finished")]
    for x in lines:
        job_dir = ray_server.jobs_dir / x["id"]
        assert Job(job_dir).read()["request"]["options"]["seed"] == int(x["label"][-1])
        got = sorted(p.relative_to(x["download"]).as_posix() for p in Path(x["download"]).rglob("*") if p.is_file())
        assert got == sorted(p.relative_to(job_dir).as_posix() for p in (job_dir / "bake").rglob("*") if p.is_file())
        assert {"bake/gaussians.usdc", *(f"bake/ply/{k:04d}.ply" for k in range(4))} <= set(got)
        for name in got:
            assert (Path(x["download"]) / name).read_bytes() == (job_dir / name).read_bytes()
    assert f"example-seed3 ({lines[0]['id']}): finished" in res.stderr  # no terminal: a line per change

    img = tmp_path / "toy.png"
    Image.new("RGBA", (48, 48), (200, 60, 40, 255)).save(img)
    res = subprocess.run(cmd[:8] + [str(img), "--quiet"], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.returncode == 0 and res.stderr == "", res.stderr
    (line,) = [json.loads(x) for x in res.stdout.splitlines()]
    assert line["label"] == "toy" and line["input"] == str(img)
    with ray_server.client() as c:
        job = c.get(f"/v1/jobs/{line['id']}").json()
        assert job["request"]["source"] == "upload" and job["request"]["filename"] == "toy.png"
        c.post(f"/v1/jobs/{line['id']}/cancel")
        assert wait_job(c, line["id"], timeout=60)["state"] in ("cancelled", "failed")  # failed: no video weights

    bad = subprocess.run(cmd[:8] + [str(tmp_path / "missing.mp4")], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert bad.returncode == 2 and "missing.mp4: no such file" in bad.stderr


@pytest.fixture
def remote_server(ray_server):
    """Overrides test_blender_addon_server's: the add-on's remote-backend tests talk to the Ray-engine server."""
    return ray_server


def test_bad_ray_flags_are_one_line_errors_before_ray_starts(tmp_path):
    for flag, value, message in (("--ray-resources", '{"CPU": 1}', "CPU are Ray's own"),
                                 ("--ray-resources", "{stag4d_job: 1}", "not JSON"),
                                 ("--ray-resources", '{"stag4d_job": -1}', "positive amounts"),
                                 ("--ray-gpus-per-job", "-1", "between 0 and 64")):
        res = subprocess.run([sys.executable, "-m", "stag4d_backend.cli", "serve", "--engine", "ray", flag, value,
                              "--jobs-dir", str(tmp_path / "jobs"), "--token-file", str(tmp_path / "token")],
                             capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert res.returncode == 2 and message in res.stderr and res.stdout == "", (flag, value, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1
