"""`stag4d serve` keeps strangers out and refuses bad input: a real server process on 127.0.0.1 that runs no jobs
(--jobs-per-device 0), so every request here is answered in milliseconds."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from test_server_support import REPO, Server

PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"
       b"\x00\x00\x00\rIDATx\x9cc\xf8\xcf\xc0\xf0\x1f\x00\x05\x00\x01\xff\x89\x99=\x1d\x00\x00\x00\x00IEND\xaeB`\x82")
MP4 = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00" * 64
WEBM = b"\x1a\x45\xdf\xa3" + b"\x00" * 64


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    with Server(root, "--jobs-per-device", "0", "--max-upload-mb", "1", "--allow-server-paths") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def job_id(client):
    r = client.post("/v1/jobs", json={"kind": "example"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_address_line_token_file_and_health(server):
    addr = server.address
    assert addr["url"] == f"http://127.0.0.1:{addr['port']}" and addr["port"] > 0 and addr["pid"] == server.proc.pid
    assert Path(addr["token_file"]) == server.token_file.resolve()
    assert stat.S_IMODE(server.token_file.stat().st_mode) == 0o600
    assert len(server.token) >= 40
    address_file = server.token_file.with_name("token.address.json")
    assert json.loads(address_file.read_text()) == addr
    assert stat.S_IMODE(address_file.stat().st_mode) == 0o600
    r = httpx.get(f"{server.url}/v1/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "api": 1}


ENDPOINTS = [("GET", "/v1/info"), ("GET", "/v1/openapi.json"), ("GET", "/v1/jobs"), ("POST", "/v1/jobs"),
             ("GET", "/v1/jobs/{id}"), ("DELETE", "/v1/jobs/{id}"), ("POST", "/v1/jobs/{id}/cancel"),
             ("POST", "/v1/jobs/{id}/resume"), ("GET", "/v1/jobs/{id}/events"), ("GET", "/v1/jobs/{id}/files"),
             ("GET", "/v1/jobs/{id}/files/job.json")]


def test_every_endpoint_but_health_needs_the_token(server, client, job_id):
    wrong = [{}, {"Authorization": "Bearer " + "x" * 43}, {"Authorization": f"Bearer {server.token}x"},
             {"Authorization": f"Basic {server.token}"}, {"Authorization": server.token},
             {"Authorization": f"Bearer {server.token[:-1]}"}]
    with httpx.Client(base_url=server.url, timeout=10) as anon:
        for method, path in ENDPOINTS:
            url = path.replace("{id}", job_id)
            for headers in wrong:
                r = anon.request(method, url, headers=headers, json={"kind": "example"})
                assert r.status_code == 401, (method, url, headers, r.text)
                assert r.json()["detail"].startswith("missing or wrong token")
                assert r.headers["www-authenticate"] == "Bearer"
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200  # the job is still there (DELETE was refused)
    doc = client.get("/v1/openapi.json").json()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            secured = bool(op.get("security"))
            assert secured == (path != "/v1/health"), (method, path)


def test_info(client):
    info = client.get("/v1/info").json()
    assert info["api"] == 1 and info["device"] == "cpu" and info["devices"] == ["cpu"]
    assert info["presets"] == ["paper", "standard", "preview", "tiny"]
    assert info["max_upload_bytes"] == 1024 * 1024 and info["allow_server_paths"] is True
    for m in info["models"]:
        assert {"name", "title", "present", "licence"} <= set(m)


def test_file_names_stay_inside_the_job_directory(server, client, job_id, tmp_path):
    job_dir = server.jobs_dir / job_id
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("TOPSECRET")
    os.symlink(server.token_file, job_dir / "evil")              # a symlink to a file outside
    os.symlink(outside, job_dir / "outdir")                       # a symlink to a folder outside
    (job_dir / ".hidden").write_text("internal")
    (job_dir / "sub").mkdir()
    os.symlink("../job.json", job_dir / "sub" / "inside")        # a symlink that stays inside: allowed
    base = f"/v1/jobs/{job_id}/files/"
    assert client.get(base + "job.json").json()["request"] == {"kind": "example", "options": {}}
    assert client.get(base + "sub/inside").status_code == 200
    cases = {
        "..%2F..%2Ftoken": 400, "%2e%2e/%2e%2e/token": 400, "sub/%2e%2e/%2e%2e/token": 400,
        "%2Fetc%2Fpasswd": 400, "a%00b": 400, "..%5C..%5Ctoken": 400, "sub//job.json": 400, "%2e/job.json": 400,
        "evil": 404, "outdir/secret.txt": 404, ".hidden": 404, "sub/.hidden": 404, "nope.txt": 404, "sub": 404,
        ".worker.lock": 404,
    }
    for name, status in cases.items():
        r = client.get(base + name)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert "detail" in r.json() and "TOPSECRET" not in r.text and server.token not in r.text
    names = {f["name"] for f in client.get(f"/v1/jobs/{job_id}/files").json()["files"]}
    assert {"job.json", "events.jsonl"} <= names
    assert not names & {"evil", ".hidden", "outdir/secret.txt", "sub/inside", ".worker.lock"}


def test_job_ids_are_checked_on_every_path(client):
    for bad in ("J0123456789AB", "j0123", "j0123456789abc", "..", "%2e%2e", "j0123456789aG"):
        for method, path in ENDPOINTS[4:]:
            r = client.request(method, path.replace("{id}", bad))
            assert r.status_code in (404, 405, 422), (method, path, bad, r.status_code)
            assert r.status_code != 405 or bad in ("..", "%2e%2e")  # dot segments change the route itself
    r = client.get("/v1/jobs/j0123456789ab")
    assert r.status_code == 404 and "no job" in r.json()["detail"]


def _uploads(server) -> list:
    d = server.jobs_dir / ".uploads"
    return list(d.iterdir()) if d.is_dir() else []


def test_uploads_are_sniffed_capped_and_validated(server, client):
    r = client.post("/v1/jobs", files={"file": ("photo.png", PNG)}, data={"options": '{"seed": 3}'})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["kind"] == "image" and job["state"] == "queued" and job["request"]["options"] == {"seed": 3}
    assert job["request"]["input"] == "input/source.png" and job["request"]["filename"] == "photo.png"
    assert client.get(f"/v1/jobs/{job['id']}/files/input/source.png").content == PNG
    # The content decides, not the name.
    r = client.post("/v1/jobs", files={"file": ("clip.png", MP4)})
    assert r.status_code == 201 and r.json()["kind"] == "video" and r.json()["request"]["input"].endswith(".mp4")
    assert client.post("/v1/jobs", files={"file": ("x.bin", WEBM)}).json()["kind"] == "video"
    for content in (b"GIF87a" + b"\x00" * 10, b"RIFF\x00\x00\x00\x00WEBPVP8 "):
        assert client.post("/v1/jobs", files={"file": ("x", content)}).json()["kind"] == "image"

    expect = [
        ({"files": {"file": ("movie.mp4", b"just text, not a video")}}, 415, "not a supported video or image"),
        ({"files": {"file": ("x.pdf", b"%PDF-1.4\n")}}, 415, "content"),
        ({"files": {"file": ("empty.png", b"")}}, 415, "empty"),
        ({"files": {"other": ("x.png", PNG)}}, 400, "unknown multipart field"),
        ({"content": b'--B\r\nContent-Disposition: form-data; name="options"\r\n\r\n{}\r\n--B--\r\n',
          "headers": {"Content-Type": "multipart/form-data; boundary=B"}}, 400, "no 'file' part"),
        ({"data": {"options": "{}"}}, 415, "multipart/form-data"),
        ({"files": {"file": ("x.png", PNG)}, "data": {"options": "{not json"}}, 400, "not valid JSON"),
        ({"files": {"file": ("x.png", PNG)}, "data": {"options": '{"iterz": 5}'}}, 422, "options.iterz"),
        ({"files": {"file": ("x.png", PNG)}, "data": {"options": '{"iters": 0}'}}, 422, "iters"),
        ({"files": {"file": ("x.png", PNG + b"\x00" * (1024 * 1024))}}, 413, "limit"),
    ]
    for kw, status, text in expect:
        r = client.post("/v1/jobs", **kw)
        assert r.status_code == status and text in r.json()["detail"], (kw.keys(), r.status_code, r.text)

    # Oversized without a Content-Length (chunked): cut off while streaming.
    def chunks():
        yield PNG
        for _ in range(40):
            yield b"\x00" * 64 * 1024

    body = (b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n", b"\r\n--B--\r\n")

    def multipart():
        yield body[0]
        yield from chunks()
        yield body[1]

    try:
        r = client.post("/v1/jobs", content=multipart(), headers={"Content-Type": "multipart/form-data; boundary=B"})
        assert r.status_code == 413
    except httpx.TransportError:  # the server may close the connection before the client finished sending
        pass
    # Malformed multipart.
    for ctype, content in [("multipart/form-data", b"--x\r\n"), ("multipart/form-data; boundary=B", b"garbage"),
                           ("multipart/form-data; boundary=B", b"--B\r\nNo-Colon-Header\r\n\r\nx\r\n--B--\r\n"),
                           ("multipart/form-data; boundary=B", b"--B\r\nContent-Disposition: form-data\r\n\r\nx\r\n"
                                                               b"--B--\r\n")]:
        r = client.post("/v1/jobs", content=content, headers={"Content-Type": ctype})
        assert r.status_code == 400, (ctype, content, r.text)
    assert _uploads(server) == []  # nothing left behind by the refused uploads


def test_json_bodies_are_validated(server, client, tmp_path):
    def post(body: bytes):
        return client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})

    expect = [
        (b"{not json", 400, "not valid JSON"), (b"", 400, "not valid JSON"), (b"[]", 422, ""),
        (b'{"kind": "video"}', 422, "kind"), (b'{"kind": "example", "extra": 1}', 422, "extra"),
        (b'{"kind": "example", "options": {"iters": 0}}', 422, "iters"),
        (b'{"kind": "example", "options": {"preset": "huge"}}', 422, "preset"),
        (b'{"kind": "example", "options": {"formats": "usd,gif"}}', 422, "unknown format 'gif'"),
        (b'{"kind": "example", "options": {"start": 9, "end": 3}}', 422, "end=3"),
        (b'{"kind": "example", "options": {"stride": "auto"}}', 422, "frames"),
        (b'{"kind": "example", "options": {"device": "cuda"}}', 422, "device"),
        (b'{"kind": "prompt"}', 422, "prompt"), (b'{"kind": "prompt", "prompt": "   "}', 422, "prompt"),
        (b'{"kind": "path", "path": "relative/file.png"}', 422, "path"),
        (b'{"kind": "path", "path": "/tmp/\\udb41x.png"}', 400, "not valid JSON"),  # a lone surrogate
        (b'{"kind": "path", "path": "/no/such/file.png"}', 404, "no such file"),
        (b'{"kind": "example", "options": {"seed": "' + b"9" * (2 * 1024 * 1024) + b'"}}', 413, "at most"),
    ]
    for body, status, text in expect:
        r = post(body)
        assert r.status_code == status and text in r.json()["detail"], (body[:80], r.status_code, r.text[:300])
        assert "\n" not in r.json()["detail"]
    r = client.post("/v1/jobs", content=b"kind=example", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    # Server-side paths (this server allows them): content-sniffed like uploads.
    (tmp_path / "img.dat").write_bytes(PNG)
    (tmp_path / "notes.png").write_text("hello")
    (tmp_path / "frames").mkdir()
    r = client.post("/v1/jobs", json={"kind": "path", "path": str(tmp_path / "img.dat")})
    assert r.status_code == 201 and r.json()["kind"] == "image"
    assert r.json()["request"]["input"] == str(tmp_path / "img.dat")
    assert client.post("/v1/jobs", json={"kind": "path", "path": str(tmp_path / "notes.png")}).status_code == 415
    assert client.post("/v1/jobs", json={"kind": "path", "path": str(tmp_path / "frames")}).json()["kind"] == "folder"
    r = client.post("/v1/jobs", json={"kind": "prompt", "prompt": "a dancing robot", "options": {"seed": 1}})
    assert r.status_code == 201 and r.json()["request"] == {"kind": "prompt", "prompt": "a dancing robot",
                                                            "options": {"seed": 1}}


def test_event_query_values_are_checked(client, job_id):
    base = f"/v1/jobs/{job_id}/events"
    for params in ({"since": -1}, {"since": "x"}, {"format": "xml"}, {"wait": 100}, {"wait": -1}):
        r = client.get(base, params=params)
        assert r.status_code == 422 and r.json()["detail"], (params, r.text)
    page = client.get(base, params={"format": "json"}).json()
    assert [e["kind"] for e in page["events"]] == ["job_state"] and page["next"] == 1 and page["state"] == "queued"
    assert client.get(base, params={"since": 5}).json() == {"events": [], "next": 5, "state": "queued"}


def test_openapi_document_is_committed(client):
    served = client.get("/v1/openapi.json").json()
    committed = json.loads((REPO / "docs" / "openapi.json").read_text())
    assert served == committed, "docs/openapi.json is stale: run `python benchmarks/server.py --write-openapi`"


@pytest.mark.skipif(shutil.which("schemathesis", path=str(Path(sys.executable).parent)) is None,
                    reason="schemathesis is not installed")
def test_schemathesis_finds_no_server_error_and_no_ignored_auth(server, tmp_path):
    """Generated valid and invalid requests for every operation (coverage phase: boundary and negative values
    of every parameter; fuzzing phase: random ones). Reproducible: deterministic generation (no seed, no
    example database), one worker, a fixed number of examples and no time budget, so the same commit always
    sends the same requests and gets the same verdict; the subprocess timeout is only a safety net."""
    # 415 (a binary that is no video) and 422 (cross-field rules such as end > start) are answers to
    # schema-valid requests that the schema cannot express.
    # The event stream is read with format=json and no long-poll wait: an SSE stream or a 30 s wait on a queued
    # job (which never ends here) would only spend the time budget; test_event_query_values_are_checked and the
    # job tests cover them.
    (tmp_path / "schemathesis.toml").write_text(
        '[checks.positive_data_acceptance]\nexpected-statuses = ["2xx", "401", "403", "404", "409", "413", "415", '
        '"422"]\n\n[[operations]]\ninclude-name = "GET /v1/jobs/{job_id}/events"\n'
        'parameters = { format = "json", wait = 0 }\n')
    exe = str(Path(sys.executable).parent / "schemathesis")
    cmd = [exe, "run", f"{server.url}/v1/openapi.json", "-H", f"Authorization: Bearer {server.token}",
           "--checks", "all", "--phases", "coverage,fuzzing", "-n", "30", "--generation-deterministic",
           "--request-timeout", "35", "--no-shrink", "--workers", "1"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    tail = res.stdout[-6000:]
    assert res.returncode == 0, tail
    assert "5xx" not in tail and "Server error" not in tail
    assert " passed, " in tail and "No issues found" in tail  # it did send requests


def test_documented_file_name_pattern_is_what_the_server_accepts():
    """docs/openapi.json's pattern for file names against resolve_download's own checks, on names built from
    the characters that matter ('.', '/', '\\', NUL, letters, non-ASCII): accepted by the pattern exactly when
    the server does not answer 400."""
    import re

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from stag4d_backend.server.files import FILE_NAME_PATTERN, MAX_NAME, BadName, resolve_download

    doc = json.loads((REPO / "docs" / "openapi.json").read_text())
    param = next(p for p in doc["paths"]["/v1/jobs/{job_id}/files/{name}"]["get"]["parameters"]
                 if p["name"] == "name")
    assert param["schema"]["pattern"] == FILE_NAME_PATTERN and param["schema"]["maxLength"] == MAX_NAME
    root = Path(__file__).resolve().parent  # any folder: only BadName (400) matters here

    def server_accepts(name):
        try:
            resolve_download(root, name)
        except BadName:
            return False
        except OSError:  # 404: a valid name that is not there
            pass
        return True

    @settings(max_examples=400, derandomize=True, database=None, deadline=None)
    @given(st.text(alphabet=st.sampled_from(["a", ".", "/", "\\", "\x00", "é", "😀"]), max_size=8))
    def check(name):
        assert (re.fullmatch(FILE_NAME_PATTERN, name) is not None) == server_accepts(name), repr(name)

    check()
    assert not server_accepts("a" * (MAX_NAME + 1)) and server_accepts("a" * MAX_NAME)


def test_serve_help_lists_every_flag_and_bad_values_fail_in_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = lambda *a: subprocess.run([sys.executable, "-m", "stag4d_backend.cli", "serve", *a],  # noqa: E731
                                    capture_output=True, text=True, env=env, timeout=60)
    out = run("--help")
    assert out.returncode == 0
    for flag in ("--host", "--port", "--token-file", "--jobs-dir", "--allow-server-paths", "--max-upload-mb",
                 "--device", "--jobs-per-device", "--no-resume", "--max-connections", "--timeout-keep-alive",
                 "--timeout-header", "--timeout-body"):
        assert flag in out.stdout
    for args, text in [(("--port", "http"), "--port"), (("--port", "70000"), "--port"),
                       (("--max-upload-mb", "-1"), "--max-upload-mb"), (("--device", "gpu"), "not a device"),
                       (("--jobs-per-device", "x"), "--jobs-per-device"),
                       (("--max-connections", "0"), "--max-connections"),
                       (("--timeout-header", "0"), "--timeout-header"), (("--timeout-body", "x"), "--timeout-body")]:
        res = run(*args)
        assert res.returncode == 2 and res.stdout == "", args
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and text in lines[0], (args, res.stderr)


def test_one_server_per_jobs_dir(server, tmp_path):
    other = Server(tmp_path, jobs_dir=server.jobs_dir, token_file=tmp_path / "token")
    proc = subprocess.run(other.command(), capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 2 and proc.stdout == ""
    assert "another stag4d serve is using it" in proc.stderr


def test_token_file_rules(tmp_path):
    from stag4d_backend.server.auth import TokenFileError, load_or_create_token, token_matches
    from stag4d_backend.server.cli import _is_loopback, _url_host

    path = tmp_path / "new" / "token"
    token, notes = load_or_create_token(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_or_create_token(path)[0] == token and "created" in notes[0]
    path.chmod(0o644)
    assert load_or_create_token(path)[0] == token and stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("short\n")
    with pytest.raises(TokenFileError, match="no usable token"):
        load_or_create_token(path)
    assert token_matches(f"Bearer {token}", token) and token_matches(f"bearer  {token}", token)
    for header in (None, "", token, f"Basic {token}", f"Bearer {token[:-1]}", "Bearer"):
        assert not token_matches(header, token)
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.5")
    assert _url_host("0.0.0.0") == "127.0.0.1" and _url_host("::") == "[::1]" and _url_host("10.0.0.2") == "10.0.0.2"
