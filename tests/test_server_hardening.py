"""`stag4d serve` under hostile and unlucky conditions, through the real server process on 127.0.0.1: a full disk
(a 16 MB tmpfs), truncated uploads on raw sockets, a scheduler exception in one job, junk Last-Event-ID headers,
strict option types, and many concurrent create/cancel/resume/delete calls. No request may get a 5xx other than
the 507 of a full disk, and the scheduler must keep scheduling."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import stat
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from test_server_support import REPO, TINY, Server, create_job, wait_job

PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"
       b"\x00\x00\x00\rIDATx\x9cc\xf8\xcf\xc0\xf0\x1f\x00\x05\x00\x01\xff\x89\x99=\x1d\x00\x00\x00\x00IEND\xaeB`\x82")
ERROR_ID = re.compile(r"\(error id (E[0-9a-f]{10})\); see the server's log$")


def _job_dirs(jobs_dir: Path) -> list[str]:
    return sorted(p.name for p in jobs_dir.iterdir() if re.fullmatch(r"j[0-9a-f]{12}", p.name))


def _uploads(jobs_dir: Path) -> list[str]:
    d = jobs_dir / ".uploads"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def _multipart(content: bytes, boundary: str = "B") -> tuple[bytes, bytes]:
    """(everything up to the file's bytes included, the closing boundary)."""
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + content
    return head, f"\r\n--{boundary}--\r\n".encode()


def _raw_post(server: Server, body: bytes, content_length: int, half_close: bool = False) -> bytes:
    """POST /v1/jobs on a raw socket with a Content-Length of our choosing; the server's whole answer (b"" when it
    closed the connection without one)."""
    host, port = server.address["host"], server.address["port"]
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {server.token}\r\n"
            f"Content-Type: multipart/form-data; boundary=B\r\nContent-Length: {content_length}\r\n"
            f"Connection: close\r\n\r\n").encode()
    with socket.create_connection((host, port), timeout=20) as s:
        s.sendall(head + body)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out


def _status(answer: bytes) -> int | None:
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------- no jobs run

@pytest.fixture(scope="module")
def idle_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-hard")
    with Server(root, "--jobs-per-device", "0", "--max-upload-mb", "1") as srv:
        yield srv


def test_truncated_uploads_are_refused_and_leave_nothing(idle_server):
    srv = idle_server
    head, tail = _multipart(PNG + b"\x00" * 5000)
    whole = head + tail
    answer = _raw_post(srv, whole, len(whole))
    assert _status(answer) == 201, answer[:300]  # the raw request is right: complete, it makes a job
    before = _job_dirs(srv.jobs_dir)
    # No closing boundary, Content-Length true to what was sent.
    answer = _raw_post(srv, head, len(head))
    assert _status(answer) == 400 and b"incomplete" in answer, answer[:300]
    # Content-Length shorter than the body: the body ends inside the file part.
    answer = _raw_post(srv, whole, len(whole) - len(tail) - 10)
    assert _status(answer) == 400 and b"incomplete" in answer, answer[:300]
    # Content-Length longer than the body, and the client stops sending: no job; an answer, if any, is a 400.
    answer = _raw_post(srv, whole, len(whole) + 1000, half_close=True)
    assert answer == b"" or _status(answer) == 400, answer[:300]
    time.sleep(0.5)  # the server sees the end of the connection on its own schedule
    assert _job_dirs(srv.jobs_dir) == before
    assert _uploads(srv.jobs_dir) == []
    with srv.client() as c:
        assert sorted(j["id"] for j in c.get("/v1/jobs").json()["jobs"]) == before
    assert "Traceback" not in srv.stderr()


def test_junk_last_event_id_and_strict_types(idle_server):
    with idle_server.client() as c:
        job = c.post("/v1/jobs", json={"kind": "example"}).json()
        base = f"/v1/jobs/{job['id']}/events"
        for header, first in (("9" * 5000, 0), ("\u00b2", 0), ("0", 1), ("-1", 0), ("1e3", 0)):
            r = c.get(base, params={"format": "json"}, headers={"Last-Event-ID": header.encode("utf-8")})
            assert r.status_code == 200, (header[:10], r.text[:200])
            assert r.json()["next"] == first + len(r.json()["events"]) and r.json()["next"] >= first
            assert r.json()["events"][:1] == [] or r.json()["events"][0]["n"] == first
        for options, field in (({"iters": True}, "iters"), ({"iters": "10"}, "iters"), ({"iters": 10.0}, "iters"),
                               ({"fps": True}, "fps"), ({"seed": [1]}, "seed")):
            r = c.post("/v1/jobs", json={"kind": "example", "options": options})
            assert r.status_code == 422 and f"options.{field}" in r.json()["detail"], (options, r.text)
            # An upload's options field is the same JSON, checked the same way.
            r = c.post("/v1/jobs", files={"file": ("x.png", PNG)}, data={"options": json.dumps(options)})
            assert r.status_code == 422 and r.json()["detail"].startswith(f"options.{field}:"), (options, r.text)
            assert r.json()["errors"][0]["loc"] == ["options", field]
        doc = json.loads((REPO / "docs" / "openapi.json").read_text())
        pattern = doc["components"]["schemas"]["PromptJob"]["properties"]["prompt"]["pattern"]
        for prompt in ("a\u0000", "\u0000a", "\u0000", "a\u0000b", " ", "a dancing robot"):
            r = c.post("/v1/jobs", json={"kind": "prompt", "prompt": prompt})
            documented = re.search(pattern, prompt) is not None
            assert (r.status_code == 201) == documented == ("\u0000" not in prompt and prompt.strip() != ""), \
                (prompt, r.status_code)
            if r.status_code == 201:
                c.delete(f"/v1/jobs/{r.json()['id']}")
        r = c.post("/v1/jobs", json={"kind": "example", "options": {"iters": 5}})
        assert r.status_code == 201 and r.json()["request"]["options"] == {"iters": 5}
    assert "Traceback" not in idle_server.stderr()


# ---------------------------------------------------------------------------------------------- a scheduler error

def test_an_exception_in_one_job_fails_that_job_with_an_error_id_and_the_scheduler_goes_on(tmp_path):
    jobs_dir = tmp_path / "custom-jobs"
    with Server(tmp_path / "root", jobs_dir=jobs_dir) as srv, srv.client() as c:
        a = create_job(c, iters=100_000)
        b = create_job(c)
        (jobs_dir / b["id"] / "worker.log").mkdir(0o700)  # the scheduler cannot open B's log: an OSError in _spawn
        up = c.post("/v1/jobs", files={"file": ("x.png", PNG)})
        assert up.status_code == 201
        upload_modes = [stat.S_IMODE((jobs_dir / up.json()["id"] / name).stat().st_mode)
                        for name in ("", "input", "input/source.png", "job.json", "events.jsonl")]
        assert upload_modes == [0o700, 0o700, 0o600, 0o600, 0o600]
        deadline = time.monotonic() + 90
        while c.get(f"/v1/jobs/{a['id']}").json()["stage"] != "fit":  # the worker has written the frames
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert c.post(f"/v1/jobs/{a['id']}/cancel").status_code == 202
        failed = wait_job(c, b["id"], timeout=60)
        assert failed["state"] == "failed", failed
        m = ERROR_ID.search(failed["error"])
        assert failed["error"].startswith("cannot start the worker (Is a directory) (error id") and m, failed
        assert str(jobs_dir) not in failed["error"] and "Error" not in failed["error"]
        log = srv.stderr()
        assert f"error {m.group(1)}: cannot start the worker" in log and "IsADirectoryError" in log
        assert str(jobs_dir / b["id"] / "worker.log") in log  # the detail is in the server's log
        assert json.loads((jobs_dir / b["id"] / "job.json").read_text())["error"] == failed["error"]
        assert c.delete(f"/v1/jobs/{up.json()['id']}").status_code == 204
        # The scheduler is alive: the next job starts, and cancels.
        d = create_job(c, iters=100_000)
        wait_job(c, d["id"], states=("running",), timeout=60)
        assert c.post(f"/v1/jobs/{d['id']}/cancel").status_code == 202
        assert wait_job(c, d["id"], timeout=60)["state"] == "cancelled"
        assert wait_job(c, a["id"], timeout=30)["state"] == "cancelled"
        assert "Exception in thread" not in srv.stderr()
        # One permission policy under a custom --jobs-dir: owner-only files and folders, whoever wrote them.
        modes = {p.relative_to(jobs_dir): stat.S_IMODE(p.lstat().st_mode)
                 for p in [jobs_dir, *jobs_dir.rglob("*")] if not p.is_symlink()}
        assert {"worker.log", "job.json", "frames"} <= {p.name for p in modes} and len(modes) > 20
        loose = {str(p): oct(m) for p, m in modes.items() if m & 0o077}
        assert loose == {}, loose


# ---------------------------------------------------------------------------------------------- a full disk

@pytest.fixture
def tmpfs(tmp_path):
    """A 16 MB tmpfs, unmounted afterwards; skipped where mounting is not permitted."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(path: Path) -> None:
    """Write ``path`` until the file system has no byte left."""
    with open(path, "ab", buffering=0) as fh:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    fh.write(b"\x00" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC


def test_a_full_disk_fails_the_job_with_its_stage_and_the_server_recovers(tmpfs, tmp_path):
    jobs_dir = tmpfs / "jobs"
    with Server(tmp_path / "root", "--max-upload-mb", "64", jobs_dir=jobs_dir) as srv, srv.client() as c:
        a = create_job(c, iters=100_000)
        deadline = time.monotonic() + 90
        while (job := c.get(f"/v1/jobs/{a['id']}").json())["stage"] != "fit":
            assert time.monotonic() < deadline and job["state"] in ("queued", "running"), job
            time.sleep(0.1)
        filler = tmpfs / "filler"
        _fill(filler)
        failed = wait_job(c, a["id"], timeout=60)
        assert failed["state"] == "failed" and failed["error"] == "disk full at fit", failed
        # While the disk is full: no new job, clear answers, nothing left behind.
        r = c.post("/v1/jobs", json={"kind": "example", "options": TINY})
        assert r.status_code == 507 and "disk is full" in r.json()["detail"], r.text
        r = c.post("/v1/jobs", files={"file": ("x.png", PNG + b"\x00" * 300_000)})
        assert r.status_code == 507 and "does not fit" in r.json()["detail"], r.text
        answer = _raw_post(srv, b"", 40 * 1024 * 1024)  # declared bigger than the disk: refused before reading
        assert _status(answer) == 507 and b"does not fit on the server's disk" in answer, answer[:300]
        assert c.post(f"/v1/jobs/{a['id']}/cancel").status_code == 409  # it has failed: nothing to cancel
        assert _job_dirs(jobs_dir) == [a["id"]] and _uploads(jobs_dir) == []
        assert c.get("/v1/jobs").status_code == 200
        # Space is back: the failure reaches job.json, new jobs run and cancel.
        filler.unlink()
        deadline = time.monotonic() + 10
        while json.loads((jobs_dir / a["id"] / "job.json").read_text())["state"] != "failed":
            assert time.monotonic() < deadline, "the kept failure was never written"
            time.sleep(0.1)
        assert json.loads((jobs_dir / a["id"] / "job.json").read_text())["error"] == "disk full at fit"
        events = c.get(f"/v1/jobs/{a['id']}/events").json()["events"]
        assert events[-1]["kind"] == "job_state" and events[-1]["state"] == "failed"
        b = create_job(c, iters=100_000)
        wait_job(c, b["id"], states=("running",), timeout=60)
        assert c.post(f"/v1/jobs/{b['id']}/cancel").status_code == 202
        assert wait_job(c, b["id"], timeout=60)["state"] == "cancelled"
        assert c.post("/v1/jobs", files={"file": ("x.png", PNG)}).status_code == 201
        assert "Exception in thread" not in srv.stderr()


# ---------------------------------------------------------------------------------------------- races

def test_concurrent_create_cancel_resume_delete_never_5xx_and_end_consistent(tmp_path):
    """30 rounds; in each, 8 clients released at once on one job: delete, delete, resume, resume, cancel, get,
    events, and a create (the issue's race: a resume or a cancel between a delete's check and its removal), while
    the scheduler starts workers for whatever is queued. Every answer is a documented one, none a 5xx; afterwards
    the server's list, the jobs folder and the deletions agree, and the scheduler still starts jobs."""
    rounds = 30
    ops = ["delete", "delete", "resume", "resume", "cancel", "get", "events", "create"]
    with Server(tmp_path, "--jobs-per-device", "1") as srv, srv.client() as c:
        targets = [create_job(c, iters=100_000)["id"] for _ in range(rounds)]
        created: list[str] = []
        answers: list[tuple[str, int]] = []
        lock = threading.Lock()
        barrier = threading.Barrier(len(ops), timeout=60)

        def client_run(op: str) -> None:
            with srv.client(timeout=60) as cc:
                for job_id in targets:
                    barrier.wait()
                    if op == "create":
                        r = cc.post("/v1/jobs", json={"kind": "example", "options": dict(TINY, iters=100_000)})
                    elif op in ("cancel", "resume"):
                        r = cc.post(f"/v1/jobs/{job_id}/{op}")
                    elif op == "delete":
                        r = cc.delete(f"/v1/jobs/{job_id}")
                    elif op == "get":
                        r = cc.get(f"/v1/jobs/{job_id}")
                    else:
                        r = cc.get(f"/v1/jobs/{job_id}/events", params={"format": "json"},
                                   headers={"Last-Event-ID": "2"})
                    with lock:
                        answers.append((op, r.status_code))
                        if op == "create" and r.status_code == 201:
                            created.append(r.json()["id"])

        with ThreadPoolExecutor(len(ops)) as pool:
            list(pool.map(client_run, ops))
        allowed = {"create": {201}, "cancel": {202, 404, 409}, "resume": {202, 404, 409}, "delete": {204, 404},
                   "get": {200, 404}, "events": {200, 404}}
        bad = [(op, code) for op, code in answers if code not in allowed[op]]
        assert len(answers) == rounds * len(ops) and bad == [], bad
        deletes = sorted(code for op, code in answers if op == "delete")
        assert deletes == [204] * rounds + [404] * rounds  # each job deleted exactly once
        assert "Traceback" not in srv.stderr() and "Exception in thread" not in srv.stderr()

        # Consistent: the deleted are gone everywhere, the created are listed and in the folder, the queue holds
        # no deleted id (the scheduler would start it), and every live job can still be stopped and removed.
        listed = sorted(j["id"] for j in c.get("/v1/jobs").json()["jobs"])
        assert listed == sorted(created) and _job_dirs(srv.jobs_dir) == sorted(created)
        assert all(c.get(f"/v1/jobs/{job_id}").status_code == 404 for job_id in targets)
        for job_id in created:
            assert c.delete(f"/v1/jobs/{job_id}").status_code == 204
        assert c.get("/v1/jobs").json() == {"jobs": []} and _job_dirs(srv.jobs_dir) == []
        last = create_job(c, iters=100_000)
        wait_job(c, last["id"], states=("running",), timeout=60)
        assert c.delete(f"/v1/jobs/{last['id']}").status_code == 204
        assert "Traceback" not in srv.stderr() and "Exception in thread" not in srv.stderr()


def test_the_last_resort_handler_answers_with_an_error_id_and_logs_the_story(tmp_path, capsys):
    """The app's handler for what nobody foresaw (in-process: no route of the real server raises one any more):
    a 500 with a stable line and an error id, the traceback only in the log; a full disk anywhere is a 507."""
    from fastapi.testclient import TestClient

    from stag4d_backend.server.app import Settings, create_app

    app = create_app(Settings(jobs_dir=tmp_path, token="t" * 43))

    @app.get("/boom")
    def boom():
        raise RuntimeError(f"cannot read {tmp_path}/secret.bin: exploded")

    @app.get("/full")
    def full():
        try:
            open(tmp_path / "x", "rb")
        except OSError:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x")) from None

    client = TestClient(app, raise_server_exceptions=False)
    r = client.get("/boom")
    detail = r.json()["detail"]
    m = re.fullmatch(r"internal error in GET /boom \(error id (E[0-9a-f]{10})\); see the server's log", detail)
    assert r.status_code == 500 and m, detail
    log = capsys.readouterr().err
    assert f"stag4d serve: error {m.group(1)}: internal error in GET /boom" in log
    assert f"RuntimeError: cannot read {tmp_path}/secret.bin: exploded" in log
    r = client.get("/full")
    assert r.status_code == 507 and r.json() == {"detail": "the server's disk is full; free space (or delete jobs) "
                                                           "and try again"}
