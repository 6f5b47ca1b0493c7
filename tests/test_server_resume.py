"""A job survives its server: kill -9 the server in the middle of a fit (its worker dies too), start it again,
the job resumes from its last checkpoint; then a graceful stop (SIGTERM) in the middle of the resumed fit, and
a third start. The outputs equal those of an uninterrupted run of the same request, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from stag4d_backend.job import Job
from test_server_support import REPO, TINY, Server, assert_same_deformation, pid_alive, wait_event, wait_job

REQUEST = {"kind": "example", "options": dict(TINY, iters=300, checkpoint_every=10)}  # room for the stops on a fast machine


def _worker_pid(job_dir) -> int:
    return json.loads((job_dir / "job.json").read_text())["worker_pid"]


def _wait_dead(pid: int, timeout: float = 5.0) -> float:
    t0 = time.monotonic()
    while pid_alive(pid):
        assert time.monotonic() - t0 < timeout, f"worker {pid} outlived its server"
        time.sleep(0.02)
    return time.monotonic() - t0


def _fit_step(ev: dict, at_least: int) -> bool:
    return ev["kind"] == "progress" and ev["stage"] == "fit" and ev["step"] >= at_least


def test_kill9_then_sigterm_mid_fit_resume_and_equal_an_uninterrupted_run(tmp_path):
    # The reference: the same request, uninterrupted, in a worker of its own.
    ref = tmp_path / "ref"
    Job(ref).create(REQUEST)
    subprocess.run([sys.executable, "-m", "stag4d_backend.server.worker", str(ref), "--device", "cpu"], check=True,
                   timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True)
    assert Job(ref).read()["state"] == "finished"

    jobs, token = tmp_path / "jobs", tmp_path / "token"
    first = Server(tmp_path / "1", jobs_dir=jobs, token_file=token).start()
    try:
        with first.client() as c:
            job_id = c.post("/v1/jobs", json=REQUEST).json()["id"]
            wait_event(c, job_id, lambda e: _fit_step(e, 25))
        job_dir = jobs / job_id
        pid = _worker_pid(job_dir)
        first.kill9()
    finally:
        first.stop()
    _wait_dead(pid)  # PR_SET_PDEATHSIG: no orphan fit keeps writing to the job
    assert Job(job_dir).read()["state"] == "running"  # nobody recorded an end
    shown = max(e["step"] for e in Job(job_dir).events() if e["kind"] == "progress" and e["stage"] == "fit")
    checkpoint = torch.load(job_dir / "model" / "state.pt", weights_only=False)["it"]
    assert checkpoint % 10 == 0 and abs(shown - checkpoint) <= 10  # at most one interval lost (events may lag the checkpoint)

    second = Server(tmp_path / "2", jobs_dir=jobs, token_file=token).start()
    try:
        with second.client() as c:
            assert [j["id"] for j in c.get("/v1/jobs").json()["jobs"]] == [job_id]  # listed after the restart
            wait_event(c, job_id, lambda e: _fit_step(e, checkpoint + 12))
        pid = _worker_pid(job_dir)
        assert second.stop() in (0, -15)  # graceful (uvicorn re-raises SIGTERM once it has shut down)
    finally:
        second.stop()
    _wait_dead(pid)
    assert not (token.parent / "token.address.json").exists()  # a stopped server leaves no stale address
    data = Job(job_dir).read()
    assert data["state"] == "interrupted"  # the worker checkpointed and recorded why it stopped
    second_checkpoint = torch.load(job_dir / "model" / "state.pt", weights_only=False)["it"]
    assert second_checkpoint > checkpoint

    third = Server(tmp_path / "3", jobs_dir=jobs, token_file=token).start()
    try:
        with third.client() as c:
            final = wait_job(c, job_id, timeout=300)
            assert final["state"] == "finished", final
            events = c.get(f"/v1/jobs/{job_id}/events").json()["events"]
    finally:
        third.stop()

    assert [e["n"] for e in events] == list(range(len(events)))  # one gapless log across three servers
    states = [e["state"] for e in events if e["kind"] == "job_state"]
    assert states == ["queued", "running", "interrupted", "queued", "running", "interrupted", "queued", "running",
                      "finished"]
    fits = [e["result"] for e in events if e["kind"] == "stage_finished" and e["stage"] == "fit"]
    assert fits[-1]["resumed_from"] == second_checkpoint and fits[-1]["iterations"] == 300
    stopped = [e for e in events if e["kind"] == "stage_stopped"]
    assert [(e["stage"], e["state"], e["step"]) for e in stopped] == [("fit", "interrupted", second_checkpoint)]

    # Equal to the uninterrupted run.
    for name in ("model/canonical.ply", "bake/gaussians.usdc", *(f"bake/ply/{k:04d}.ply" for k in range(4))):
        assert (job_dir / name).read_bytes() == (ref / name).read_bytes(), name
    assert_same_deformation(job_dir, ref)
