"""The add-on against a real `stag4d serve` process (started by the add-on itself, as for a user with the local
backend): generate the example job (tiny preset) from the operator, pump the main-thread function until the
result is in the scene, check it against the baked PLYs; cancel; a wrong token; the server killed mid-job.
Timers never fire in the bpy module, so the tests call ``state.process_updates()`` themselves."""

from __future__ import annotations

import http.server
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")
pytest.importorskip("fastapi")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import blender_addon  # noqa: E402
from blender_addon import panel, preferences, splat_nodes, state  # noqa: E402
from blender_addon.backend.client import AuthError, BackendError, Client, Unreachable  # noqa: E402
from blender_addon.backend import session  # noqa: E402
from blender_addon.backend.server_process import MANAGER  # noqa: E402
from bake_fixtures import to_blender  # noqa: E402
from stag4d_backend.gaussians.ply import load_ply  # noqa: E402

EXAMPLE = dict(input_kind="EXAMPLE", example_frames=4, example_size=48, example_gaussians=400, preset="tiny")


@pytest.fixture(scope="module")
def addon(tmp_path_factory):
    if not blender_addon.operators.STAG4D_OT_generate.is_registered:
        blender_addon.register()
    prefs = preferences._FALLBACK
    saved = dict(vars(prefs))
    results = tmp_path_factory.mktemp("stag4d-results")
    # The add-on starts `python -m stag4d_backend.cli serve` with this interpreter (the project's .venv).
    prefs.backend, prefs.python_path, prefs.results_dir = "LOCAL", sys.executable, str(results)
    yield SimpleNamespace(prefs=prefs, results=results)
    state.stop_all(stop_server=True)
    for k in list(vars(prefs)):
        delattr(prefs, k)
    prefs.__dict__.update(saved)


@pytest.fixture
def scene(addon):
    state.stop_all(stop_server=False)
    bpy.data.batch_remove(list(bpy.data.objects) + list(bpy.data.collections) + list(bpy.data.pointclouds)
                          + list(bpy.data.cache_files))
    sc = bpy.context.scene
    sc.stag4d.jobs.clear()
    for k, v in EXAMPLE.items():
        setattr(sc.stag4d, k, v)
    sc.stag4d.iters = 0
    sc.stag4d.preview_every = 10
    session.RETRY_S = 10.0
    yield sc


def pump(until, timeout: float, every: float = 0.05, on_tick=None):
    """Call the main-thread pump (what the add-on's timer does in Blender) until ``until()`` or the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state.process_updates()
        if on_tick is not None:
            on_tick()
        if until():
            return True
        time.sleep(every)
    state.process_updates()
    return until()


def draw_job_panel() -> list:
    from test_blender_addon import Layout

    log = []
    panel.STAG4D_PT_job.draw(SimpleNamespace(layout=Layout(log)), bpy.context)
    return log


def _instances(obj) -> np.ndarray:
    dg = bpy.context.evaluated_depsgraph_get()
    out = sorted(((i.persistent_id[1], np.array(i.matrix_world)) for i in dg.object_instances
                  if i.is_instance and i.parent is not None and i.parent.original == obj), key=lambda x: x[0])
    return np.stack([m for _, m in out])


def test_generate_example_from_the_operator_end_to_end(scene, addon):
    t0 = time.perf_counter()
    assert bpy.ops.stag4d.generate() == {"FINISHED"}
    item = scene.stag4d.jobs[0]
    assert item.state == "submitting" and item.name == "Example"
    seen = {"states": set(), "progress": [], "previews": 0, "panel_progress": False}

    def tick():
        seen["states"].add(item.state)
        if item.stage == "fit" and item.total:
            seen["progress"].append((item.step, item.total))
            if not seen["panel_progress"]:
                seen["panel_progress"] = any(e[0] == "progress" for e in draw_job_panel())
        seen["previews"] = max(seen["previews"], item.previews)

    assert pump(lambda: item.imported or item.state in ("error", "failed"), 240, on_tick=tick), item.state
    elapsed = time.perf_counter() - t0
    print(f"generate -> imported in {elapsed:.1f} s; states {sorted(seen['states'])}; previews {seen['previews']}")
    assert item.state == "finished" and not item.error, item.error
    assert item.job_id.startswith("j") and MANAGER.running
    assert {"queued", "running"} & seen["states"]
    assert seen["progress"] and seen["progress"][-1][1] == 40  # tiny preset: 40 fitting steps
    assert seen["panel_progress"]  # the progress bar was drawn while it ran
    assert seen["previews"] >= 1  # live previews arrived (every 10 steps) and were shown

    job_dir = Path(item.directory)
    assert job_dir == addon.results / "jobs" / item.job_id  # read in place from the local server's folder
    obj = item.gaussians
    assert obj is not None and splat_nodes.MODIFIER_NAME in obj.modifiers
    assert obj.modifiers[0].cache_file.filepath == str(job_dir / "bake" / "gaussians.usdc")
    assert len([o for o in bpy.data.objects if o.type == "POINTCLOUD"]) == 1  # the preview object was reused
    assert (scene.frame_start, scene.frame_end) == (0, 3)
    assert scene.render.fps / scene.render.fps_base == pytest.approx(12.0)

    splat_nodes.set_modifier_input(obj, "Min Opacity", 0.0)  # every Gaussian, in point order
    previous = None
    for frame in (0, 2, 3):
        ply = load_ply(job_dir / "bake" / "ply" / f"{frame:04d}.ply")
        scene.frame_set(frame)
        pos = _instances(obj)[:, :3, 3]
        np.testing.assert_allclose(pos, to_blender(ply["xyz"]), atol=1e-5)
        if previous is not None:
            assert np.abs(pos - previous).max() > 1e-6  # scrubbing changes them (a 40-step fit barely moves)
        previous = pos

    # The same job through the long-poll fallback of the client.
    srv = MANAGER.server
    events, nxt = Client(srv.url, srv.token).poll_events(item.job_id, since=0, wait=1)
    assert nxt == len(events) and events[-1]["kind"] == "job_state" and events[-1]["state"] == "finished"


def test_cancel_stops_the_job_on_the_server(scene, addon):
    scene.stag4d.iters = 3000  # long enough to cancel mid-fit
    bpy.ops.stag4d.generate()
    item = scene.stag4d.jobs[0]
    assert pump(lambda: item.stage == "fit" and item.step > 0 or item.state == "error", 120), item.error
    assert ("operator", "stag4d.cancel", "") in draw_job_panel()
    t0 = time.perf_counter()
    assert bpy.ops.stag4d.cancel() == {"FINISHED"}
    assert pump(lambda: item.state in ("cancelled", "error", "finished"), 60)
    print(f"cancelled {time.perf_counter() - t0:.1f} s after the request")
    assert item.state == "cancelled", item.error
    srv = MANAGER.server
    assert Client(srv.url, srv.token).get_job(item.job_id)["state"] == "cancelled"
    assert not item.imported
    log = draw_job_panel()
    assert ("operator", "stag4d.resume", "") in log  # a cancelled job can be resumed


def test_wrong_token_is_reported_as_such(scene, addon):
    assert pump(lambda: MANAGER.running, 1) or True
    if not MANAGER.running:
        MANAGER.ensure_local(sys.executable, addon.results / "jobs", addon.results / "token")
    url = MANAGER.server.url
    with pytest.raises(AuthError, match="refused the token"):
        Client(url, "not-the-token").info()
    prefs = addon.prefs
    prefs.backend, prefs.remote_url, prefs.remote_token = "REMOTE", url, "not-the-token"
    try:
        bpy.ops.stag4d.generate()
        item = scene.stag4d.jobs[0]
        assert pump(lambda: item.state == "error", 30)
        assert "refused the token (401" in item.error and "preferences" in item.error
        assert state.STATUS["error"] and "token" in state.STATUS["text"]
        alerts = " ".join(e[1] for e in draw_job_panel() if e[0] == "label" and e[3])
        assert "refused the token" in alerts
    finally:
        prefs.backend, prefs.remote_token = "LOCAL", ""


def test_server_killed_mid_job_is_reported_and_blender_keeps_working(scene, addon, tmp_path):
    scene.stag4d.iters = 3000
    session.RETRY_S = 1.5  # give up on the dead server quickly (10 s in normal use)
    bpy.ops.stag4d.generate()
    item = scene.stag4d.jobs[0]
    assert pump(lambda: item.stage == "fit" and item.step > 0 or item.state == "error", 120), item.error
    proc = MANAGER.server.proc
    os.killpg(proc.pid, signal.SIGKILL)  # the server (and its job worker) we started, gone without a word
    proc.wait(10)
    t0 = time.perf_counter()
    assert pump(lambda: item.state == "error", 30)
    print(f"error reported {time.perf_counter() - t0:.1f} s after the kill: {item.error}")
    assert "STAG4D server" in item.error
    alerts = " ".join(e[1] for e in draw_job_panel() if e[0] == "label" and e[3])
    assert "Lost the STAG4D server" in alerts
    # Blender keeps working: operators run, the scene evaluates, a new job can be sent (the server restarts).
    assert bpy.ops.stag4d.cancel() == {"CANCELLED"}  # nothing running any more
    scene.frame_set(2)
    scene.stag4d.iters = 0
    bpy.ops.stag4d.generate()
    item2 = scene.stag4d.jobs[-1]
    assert pump(lambda: item2.imported or item2.state in ("error", "failed"), 240), item2.state
    assert item2.state == "finished" and MANAGER.running, item2.error


# ---- error paths that a real server does not produce on demand ----------------------------------------------

class _NotStag4d(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = b"<html>hello</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_client_errors_name_the_problem():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotStag4d)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        with pytest.raises(BackendError, match="not JSON.*STAG4D server"):
            Client(url, "t").health()
    finally:
        srv.shutdown()
        srv.server_close()
    with pytest.raises(Unreachable, match="connection refused"):
        Client(url, "t").health(timeout=2)
    with pytest.raises(BackendError, match="No server address"):
        Client("", "t")


@pytest.fixture
def remote_server(addon):
    """The server the remote-backend tests talk to (url, token): here the add-on's own local server;
    test_server_ray.py runs the same tests against a `stag4d serve --engine ray` by overriding this fixture."""
    if not MANAGER.running:
        MANAGER.ensure_local(sys.executable, addon.results / "jobs", addon.results / "token")
    return MANAGER.server


def test_remote_backend_uploads_the_input_file(scene, addon, remote_server, tmp_path):
    """Remote servers get the file itself (multipart upload), not a path on this machine."""
    from PIL import Image

    srv = remote_server
    img = tmp_path / "toy.png"
    Image.new("RGBA", (48, 48), (200, 60, 40, 255)).save(img)
    prefs = addon.prefs
    prefs.backend, prefs.remote_url, prefs.remote_token = "REMOTE", srv.url, srv.token
    try:
        scene.stag4d.input_kind, scene.stag4d.image_path = "IMAGE", str(img)
        bpy.ops.stag4d.generate()
        item = scene.stag4d.jobs[0]
        assert pump(lambda: bool(item.job_id) or item.state == "error", 30), item.error
        job = Client(srv.url, srv.token).get_job(item.job_id)
        assert job["request"]["source"] == "upload" and job["request"]["filename"] == "toy.png"
        bpy.ops.stag4d.cancel()  # whether or not image-to-video weights are installed here, stop it
        assert pump(lambda: item.state in ("cancelled", "failed", "error"), 60)
        assert item.state in ("cancelled", "failed"), item.error
    finally:
        prefs.backend, prefs.remote_token = "LOCAL", ""


def test_remote_backend_downloads_the_result(scene, addon, remote_server):
    """A remote server's results are mirrored under <results>/remote/<job id> and imported from there."""
    srv = remote_server
    prefs = addon.prefs
    prefs.backend, prefs.remote_url, prefs.remote_token = "REMOTE", srv.url, srv.token
    try:
        bpy.ops.stag4d.generate()
        item = scene.stag4d.jobs[0]
        assert pump(lambda: item.imported or item.state in ("error", "failed"), 240), item.state
        assert item.state == "finished", item.error
        mirror = addon.results / "remote" / item.job_id
        assert Path(item.directory) == mirror
        assert sorted(p.name for p in (mirror / "bake").iterdir()) == [
            "bake.json", "cameras.json", "gaussians.usdc", "mesh.usdc", "preview.mp4"]
        assert item.previews >= 1 and (addon.results / "previews" / item.job_id).is_dir()
        assert item.gaussians.modifiers[0].cache_file.filepath == str(mirror / "bake" / "gaussians.usdc")
    finally:
        prefs.backend, prefs.remote_token = "LOCAL", ""
