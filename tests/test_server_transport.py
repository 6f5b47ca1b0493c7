"""The server's transport under careless and hostile clients, through a real `stag4d serve` on 127.0.0.1 with short
timeouts: headers are checked before a file is opened (no 500, no descriptor leak), idle / slow-header /
slow-body connections are closed within their bounds while valid requests go on, connections over the limit get a
clean 503, and accepted sockets have TCP_NODELAY."""

from __future__ import annotations

import ctypes
import os
import socket
import threading
import time
from urllib.parse import quote

import pytest

from test_server_support import Server

KEEP_ALIVE_S, HEADER_S, BODY_S, MAX_CONNECTIONS = 1.0, 3.0, 2.0, 40
CLOSE_BOUND_S = 10.0  # "closed at all": the timeouts are 1-2 s; this only has to be finite on a busy machine
SYS_PIDFD_GETFD = 438  # Linux >= 5.6, same number on every architecture


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("transport")
    with Server(root, "--jobs-per-device", "0", "--max-upload-mb", "1",
                "--timeout-keep-alive", str(KEEP_ALIVE_S), "--timeout-header", str(HEADER_S),
                "--timeout-body", str(BODY_S), "--max-connections", str(MAX_CONNECTIONS)) as srv:
        yield srv


@pytest.fixture(scope="module")
def job_id(server):
    with server.client() as c:
        r = c.post("/v1/jobs", json={"kind": "example"})
        assert r.status_code == 201, r.text
        return r.json()["id"]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def connect(server) -> socket.socket:
    s = socket.create_connection((server.address["host"], server.address["port"]), timeout=CLOSE_BOUND_S)
    return s


def read_response(s: socket.socket) -> bytes:
    """One whole response (head and Content-Length body), however the segments arrive."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body


def closed_by_server(s: socket.socket, deadline: float) -> bool:
    """Read until the server closes (EOF or reset) or ``deadline`` (monotonic) passes; True if it closed."""
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if s.recv(65536) == b"":
                return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
    return False


def test_bad_ranges_and_odd_file_names_get_answers_not_500s_and_leak_no_descriptors(server, job_id):
    job_dir = server.jobs_dir / job_id
    data = bytes(range(256)) * 4
    odd = "naïve €.bin"  # not latin-1: cannot be a header value as it is
    (job_dir / "data.bin").write_bytes(data)
    (job_dir / odd).write_bytes(data)
    (job_dir / "evil\r\nX-Injected: 1.bin").write_bytes(data)  # reached through a symlink (URLs cannot hold CR LF)
    os.symlink("evil\r\nX-Injected: 1.bin", job_dir / "link.bin")
    base = f"/v1/jobs/{job_id}/files/"
    huge = "9" * 5000
    cases = [  # (Range header, status, body)
        (f"bytes={huge}-", 416, b""), (f"bytes=0-{huge}", 206, data), (f"bytes=-{huge}", 206, data),
        (f"bytes={huge}-{huge}", 416, b""), ("bytes=10-4", 416, b""), ("bytes=1024-", 416, b""),
        ("bytes=-0", 416, b""), ("bytes=2-5", 206, data[2:6]), ("bytes=-3", 206, data[-3:]),
        ("bytes=abc", 200, data), ("items=0-1", 200, data), ("bytes=0-1,4-5", 200, data), ("bytes=-", 200, data),
        (b"bytes=\xb2-", 200, data), ("bytes=\u0663-", 200, data),
    ]
    with server.client() as c:
        def check_all():
            for rng, status, body in cases:
                r = c.get(base + "data.bin", headers={"Range": rng if isinstance(rng, bytes) else rng.encode()})
                assert (r.status_code, r.content) == (status, body), (rng[:40], r.status_code, r.text[:200])
                if status == 416:
                    assert r.headers["content-range"] == f"bytes */{len(data)}"
            r = c.get(base + quote(odd))
            assert r.status_code == 200 and r.content == data, r.text
            assert r.headers["content-disposition"] == (
                "attachment; filename=\"na_ve _.bin\"; filename*=UTF-8''na%C3%AFve%20%E2%82%AC.bin")
            r = c.get(base + "link.bin")
            assert r.status_code == 200 and r.content == data and "x-injected" not in r.headers
            assert r.headers["content-disposition"].endswith("filename*=UTF-8''evil%0D%0AX-Injected%3A%201.bin")
            r = c.get(base + quote(odd), headers={"Range": f"bytes={huge}-"})
            assert r.status_code == 416

        check_all()  # warm-up: the thread pool and the connection exist from here on
        before = open_fds(server.proc.pid)
        for _ in range(11):  # 11 x 18 = 198 requests
            check_all()
        after = open_fds(server.proc.pid)
    assert after <= before + 2, (before, after)  # was one more descriptor per bad request
    assert "Traceback" not in server.stderr()


def _server_side_nodelay(pid: int, client: socket.socket) -> int:
    """TCP_NODELAY of the server's end of ``client``'s connection, read through a copy of the server's descriptor
    (pidfd_getfd: the test is the server's parent, which Yama's ptrace scope 1 allows)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                err = ctypes.get_errno()
                pytest.skip(f"pidfd_getfd is not permitted here ({os.strerror(err)})")
            with socket.socket(fileno=fd) as s:
                try:
                    if s.type == socket.SOCK_STREAM and s.getpeername() == client.getsockname():
                        return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                except OSError:
                    continue
    finally:
        os.close(pidfd)
    raise AssertionError("the server holds no socket connected to the client")


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs Linux pidfds")
def test_accepted_connections_have_tcp_nodelay(server):
    with connect(server) as s:
        for _ in range(2):  # a kept-alive connection: the second answer is the one Nagle used to hold back
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(s).startswith(b"HTTP/1.1 200 ")
        assert _server_side_nodelay(server.proc.pid, s) == 1


def _trickle(s: socket.socket, chunks, every_s: float, stop: threading.Event) -> None:
    try:
        for chunk in chunks:
            if stop.wait(every_s):
                return
            s.sendall(chunk)
    except OSError:
        pass  # the server closed it: what the test waits for


def test_idle_slow_header_and_slow_body_connections_are_closed_while_valid_requests_go_on(server):
    auth = f"Authorization: Bearer {server.token}\r\n".encode()
    idle = [connect(server) for _ in range(8)]
    kept = connect(server)  # answered once, then idle: uvicorn's keep-alive timeout
    kept.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(kept).startswith(b"HTTP/1.1 200 ")
    slow_head = [connect(server) for _ in range(6)]
    heads = [b"GET /v1/info HTTP/1.1\r\n"] + [b"X-Pad-%d: %d\r\n" % (i, i) for i in range(200)]
    slow_body = [connect(server) for _ in range(6)]
    for i, s in enumerate(slow_body):
        if i % 2:
            s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Type: application/json\r\n"
                      b"Content-Length: 100000\r\n\r\n{\"kind\": ")
        else:
            s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Type: multipart/form-data; "
                      b"boundary=XyZ\r\nContent-Length: 100000\r\n\r\n--XyZ\r\nContent-Disposition: form-data; "
                      b"name=\"file\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n\x89PNG\r\n\x1a\n")
    stop = threading.Event()
    threads = [threading.Thread(target=_trickle, args=(s, heads, 0.25, stop)) for s in slow_head]
    threads += [threading.Thread(target=_trickle, args=(s, [b"0"] * 400, 0.25, stop)) for s in slow_body]
    for t in threads:
        t.start()
    try:
        statuses = []
        with server.client() as c:
            for _ in range(10):  # meanwhile, valid requests are answered
                statuses.append(c.get("/v1/info").status_code)
                time.sleep(0.1)
        assert statuses == [200] * 10
        deadline = time.monotonic() + CLOSE_BOUND_S
        results = {name: [closed_by_server(s, deadline) for s in socks]
                   for name, socks in (("idle", idle), ("kept-alive", [kept]), ("slow head", slow_head),
                                       ("slow body", slow_body))}
    finally:
        stop.set()
        for t in threads:
            t.join()
        for s in idle + slow_head + slow_body + [kept]:
            s.close()
    assert all(all(v) for v in results.values()), results
    with server.client() as c:  # no job came of a body that never arrived, and no upload was left behind
        assert all(j["request"]["kind"] == "example" for j in c.get("/v1/jobs").json()["jobs"])
    time.sleep(0.5)  # the app's cleanup after the disconnect
    uploads = server.jobs_dir / ".uploads"
    assert uploads.is_dir() and list(uploads.iterdir()) == []
    assert "Traceback" not in server.stderr()


def test_connections_over_the_limit_get_a_503_at_once_and_the_server_recovers(server):
    socks = []
    try:
        for _ in range(MAX_CONNECTIONS - 5):  # many idle sockets, under the limit: valid requests still succeed
            socks.append(connect(server))
        with server.client() as c:
            assert c.get("/v1/health").status_code == 200
        extra = [connect(server) for _ in range(10)]  # 5 fit (the client above has gone), 5 are over
        socks += extra
        time.sleep(0.5)  # the refusals are written at once; the accepted ones wait (HEADER_S) for a request
        answers = []
        for s in extra:
            s.setblocking(False)
            try:
                answers.append(s.recv(65536))
            except BlockingIOError:
                answers.append(None)
        refused = [a for a in answers if a is not None]
        assert len(refused) == 5, answers
        for a in refused:
            assert a.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and b"too many connections" in a
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + CLOSE_BOUND_S
    while True:  # the idle ones time out (or are closed here); the server takes new connections again
        with server.client() as c:
            try:
                if c.get("/v1/health").status_code == 200:
                    break
            except Exception:
                pass
        assert time.monotonic() < deadline, "the server did not recover"
        time.sleep(0.2)
    assert "Traceback" not in server.stderr()
