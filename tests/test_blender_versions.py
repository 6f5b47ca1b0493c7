"""The add-on on every Blender release it claims (install_scripts/blender_versions.txt: 4.2 LTS, 4.5 LTS, 5.0).

For each release, tests/blender_version_check.py runs in a subprocess with that release's Python (the side
environment .venv-bpy-<series> that `install.sh --blender-versions` makes, or the main .venv for its own bpy):
it installs the built zip with Blender's Install from Disk, imports a baked job, renders, and lists the jobs of a
running `stag4d serve`. Here the results are checked against the PLYs the bake wrote, with the backend's tools:
the points at three frames, the splats' matrices (the geometry-nodes math, evaluated by that release), a 64x64
Cycles render that shows the creature, and the server's jobs. Releases whose environment is absent skip.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pxr")  # the bake writes USD
pytest.importorskip("fastapi")  # stag4d serve
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "install_scripts"))

import build_addon  # noqa: E402
from bake_fixtures import make_fit_dir, quat_to_matrix, splat_bound, to_blender  # noqa: E402
from stag4d_backend.gaussians.ply import load_ply  # noqa: E402
from stag4d_backend.fitted import load_fitted  # noqa: E402
from stag4d_backend.render.cameras import OrbitCamera, blender_camera_matrix, y_up_to_z_up_quats  # noqa: E402
from stag4d_backend.stages.bake import bake  # noqa: E402
from stag4d_backend.export.turntable import render_rgba  # noqa: E402

RELEASES_FILE = REPO / "install_scripts" / "blender_versions.txt"
CHECK = Path(__file__).with_name("blender_version_check.py")
N = 400  # Gaussians: a creature that fills a 64 px frame, quick on every release
FPS = 12.0
RENDER_FRAME = 2  # blender_version_check.RENDER_FRAME
CAMERA = OrbitCamera(size=64)  # the backend's front camera
BLUR_PX2 = 0.3  # splat_nodes.BLUR_PX2 (not imported: that module needs bpy)


def releases() -> list[tuple[str, str]]:
    """(series, bpy version) per line of blender_versions.txt."""
    out = []
    for line in RELEASES_FILE.read_text().splitlines():
        fields = line.split("#")[0].split()
        if fields:
            out.append((fields[0], fields[1]))
    return out


def release_python(series: str, wheel: str) -> Path | None:
    side = REPO / f".venv-bpy-{series}" / "bin" / "python"
    if side.exists():
        return side
    try:
        if importlib.metadata.version("bpy") == wheel:
            return Path(sys.executable)  # the main environment's own bpy (5.0 in this project)
    except importlib.metadata.PackageNotFoundError:
        pass
    return None


@pytest.fixture(scope="module")
def addon_zip(tmp_path_factory) -> Path:
    return build_addon.build(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory) -> Path:
    job = tmp_path_factory.mktemp("versionjob") / "job"
    make_fit_dir(job / "model", num_gaussians=N, num_frames=4, fps=FPS)
    bake(job / "model", job / "bake", formats="usd,ply")
    return job


@pytest.fixture(scope="module")
def camera_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("camera") / "camera.json"
    path.write_text(json.dumps({"matrix": blender_camera_matrix(CAMERA).tolist(), "fovy": CAMERA.fovy}))
    return path


@pytest.fixture(scope="module")
def exact_dir(job_dir, tmp_path_factory) -> Path:
    """The exact display's images for every frame through CAMERA (stag4d render --views), as the add-on asks for
    them: the camera in the imported splat object's space (the importer's +90 degrees about X)."""
    from stag4d_backend.export.camera_views import render_views

    obj = np.eye(4)
    obj[:3, :3] = [[1, 0, 0], [0, 0, -1], [0, 1, 0]]
    cam_in_obj = np.linalg.inv(obj) @ blender_camera_matrix(CAMERA)
    views = [{"index": f, "frame": f, "camera_in_object": cam_in_obj.tolist(), "K": CAMERA.K.tolist(),
              "width": CAMERA.size, "height": CAMERA.size} for f in range(4)]
    folder = tmp_path_factory.mktemp("exact")
    (folder / "views.json").write_text(json.dumps(views))
    render_views(job_dir / "model", folder / "views.json", folder, stop_depth=True)
    return folder


@pytest.fixture(scope="module")
def backend_view(job_dir) -> np.ndarray:
    """The backend's own render of the render frame through the same camera (RGBA uint8)."""
    animated, _ = load_fitted(job_dir / "model")
    return render_rgba(animated, CAMERA, RENDER_FRAME)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`stag4d serve` on 127.0.0.1 (any free port) with one job in its list."""
    root = tmp_path_factory.mktemp("serve")
    token_file, log = root / "token", root / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stag4d_backend.cli", "serve", "--host", "127.0.0.1", "--port", "0",
             "--token-file", str(token_file), "--jobs-dir", str(root / "jobs"), "--no-resume"],
            stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        address = None
        while address is None:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            first = log.read_text().split("\n", 1)
            if len(first) == 2 and first[0].startswith("{"):
                address = json.loads(first[0])
            time.sleep(0.1)
        url, token = address["url"], token_file.read_text().strip()

        def call(method, path, body=None):
            req = urllib.request.Request(url + path, method=method, data=json.dumps(body).encode() if body else None,
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
            for _ in range(50):  # the first line may come just before the socket accepts
                try:
                    with urllib.request.urlopen(req, timeout=10) as resp:
                        return json.loads(resp.read() or b"null")
                except urllib.error.URLError as exc:
                    if isinstance(exc, urllib.error.HTTPError):
                        raise
                    time.sleep(0.1)
            raise AssertionError(f"{url} does not answer")

        job = call("POST", "/v1/jobs", {"kind": "example", "options": {
            "preset": "tiny", "example_frames": 2, "example_size": 32, "example_gaussians": 100}})
        call("POST", f"/v1/jobs/{job['id']}/cancel")  # listed all the same; no CPU spent on it
        yield {"url": url, "token_file": token_file, "job_id": job["id"]}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def expected_splats(ply: dict, object_matrix: np.ndarray, camera: np.ndarray, pixel_angle: float) -> np.ndarray:
    """The splat instances' 3x3 in world space: the Gaussian's rotation (Z-up) times its sigmas widened by the
    backend's 0.3 px^2 blur at the point's distance to the camera (splat_nodes._blurred_scales)."""
    cam_obj = np.linalg.inv(object_matrix) @ np.append(camera, 1.0)  # the camera in the object's (Y-up) space
    dist = np.linalg.norm(ply["xyz"] - cam_obj[:3], axis=1)
    sigma = np.sqrt(np.exp(ply["scaling"]) ** 2 + BLUR_PX2 * (pixel_angle * dist)[:, None] ** 2)
    q = ply["rotation"] / np.linalg.norm(ply["rotation"], axis=1, keepdims=True)
    return quat_to_matrix(y_up_to_z_up_quats(q)) * sigma[:, None, :]


@pytest.mark.parametrize("series,wheel", releases(), ids=[s for s, _ in releases()])
def test_addon_on_blender_release(series, wheel, addon_zip, job_dir, camera_file, backend_view, server, exact_dir,
                                  tmp_path):
    python = release_python(series, wheel)
    if python is None:
        pytest.skip(f"no Blender {series} environment: run `bash install_scripts/install.sh --blender-versions "
                    f"{series}` (makes .venv-bpy-{series} with bpy {wheel}); CI installs every release")
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "BLENDER", "XDG_"))}
    env.update(BLENDER_USER_RESOURCES=str(home / "blender"), XDG_CACHE_HOME=str(home / "cache"),
               XDG_CONFIG_HOME=str(home / "config"), XDG_DATA_HOME=str(home / "data"), HOME=str(home),
               PYTHONNOUSERSITE="1")
    out = tmp_path / "out"
    t0 = time.perf_counter()
    proc = subprocess.run([str(python), str(CHECK), "--zip", str(addon_zip), "--job", str(job_dir),
                           "--camera", str(camera_file), "--server", server["url"], "--token-file", str(server["token_file"]), "--out", str(out),
                           "--exact", str(exact_dir)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert (out / "result.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "result.json").read_text())
    print(f"Blender {res['version_string']}: {time.perf_counter() - t0:.1f} s in all, "
          + ", ".join(f"{k} {v:.2f} s" for k, v in res.get("timings", {}).items()))
    assert "error" not in res, res["error"] + proc.stderr[-3000:]
    assert proc.returncode == 0
    assert res["version_string"].startswith(wheel)

    # Installed from the zip into the user's extension repository, and enabled.
    assert res["install"] == ["FINISHED"] and res["enabled"]
    assert Path(res["addon_file"]).parent == home / "blender" / "extensions" / "user_default" / "stag4d_blender"

    # Imported: the USD importer's point cloud + the add-on's modifier, the job's frame range and fps.
    assert res["import"] == ["FINISHED"]
    assert res["object"] == {"type": "POINTCLOUD", "modifiers": ["MESH_SEQUENCE_CACHE", "NODES"],
                             "state": "finished"}
    assert res["frame_range"] == [0, 3] and res["fps"] == pytest.approx(FPS)
    arrays = np.load(out / "arrays.npz")
    previous = None
    for frame in (0, 2, 3):
        ply = load_ply(job_dir / "bake" / "ply" / f"{frame:04d}.ply")
        pos = arrays[f"points_{frame}"]
        np.testing.assert_allclose(pos, to_blender(ply["xyz"]), atol=1e-5)  # Y-up -> Z-up: (x, -z, y)
        if previous is not None:
            assert np.abs(pos - previous).max() > 1e-3  # the timeline animates them
        previous = pos

    # The splat display: one instance per Gaussian, placed, rotated and scaled by the node group's math.
    ply = load_ply(job_dir / "bake" / "ply" / f"{RENDER_FRAME:04d}.ply")
    mats = arrays["splats"]
    assert mats.shape == (N, 4, 4)
    np.testing.assert_allclose(mats[:, :3, 3], to_blender(ply["xyz"]), atol=1e-5)
    pixel_angle = res["pixel_angle"]  # driven from the camera's vertical field of view at 64 px
    assert pixel_angle == pytest.approx(2 * np.tan(np.radians(CAMERA.fovy) / 2) / CAMERA.size, rel=1e-5)
    expected = expected_splats(ply, arrays["object_matrix"], arrays["camera"], pixel_angle)
    # Each instance is a square parallel to the camera's image plane: one rotation for all (the camera's) times
    # the box that bounds the splat: its footprint along the ray through its centre, for its opacity
    # (splat_nodes._splat_bound; the Gaussian's own frame goes to the material as attributes).
    sigma = np.linalg.norm(mats[:, :3, :3], axis=1)
    rot = mats[:, :3, :3] / sigma[:, None, :]
    np.testing.assert_allclose(rot, np.broadcast_to(rot[0], rot.shape), atol=1e-5)
    opacity = 1.0 / (1.0 + np.exp(-ply["opacity"].reshape(-1)))
    np.testing.assert_allclose(sigma, splat_bound(expected, mats[:, :3, 3], opacity, arrays["camera"], rot[0]),
                               rtol=1e-4)

    # The 64x64 Cycles render shows the creature as the backend's rasteriser draws it through the same camera.
    img = np.asarray(Image.open(out / "render.png").convert("RGBA"))
    assert img.shape == (64, 64, 4)
    opaque, ref = img[..., 3] > 127, backend_view[..., 3] > 127
    assert 0.05 < opaque.mean() < 0.7, opaque.mean()  # something drawn, not everything
    iou = (opaque & ref).sum() / (opaque | ref).sum()
    both = opaque & ref
    rgb_diff = np.abs(img[..., :3].astype(int) - backend_view[..., :3].astype(int))[both].mean()
    print(f"Blender {series}: render IoU {iou:.3f} against the backend, mean |rgb| {rgb_diff:.1f} / 255")
    assert iou >= 0.85 and rgb_diff < 30

    # The ray stop: on for this camera, and Cycles gives the same image with it.
    assert res["ray_stop"] == {"switch": 1.0, "off": ""}, res["ray_stop"]
    stopped = np.asarray(Image.open(out / "render_ray_stop.png").convert("RGBA")).astype(np.float64)
    plain = img.astype(np.float64)
    on_white = [x[..., :3] * x[..., 3:] / 255.0 + 255.0 * (1 - x[..., 3:] / 255.0) for x in (stopped, plain)]
    mse = np.mean((on_white[0] - on_white[1]) ** 2)
    print(f"Blender {series}: ray stop vs without, mean squared difference {mse:.4f}")
    assert mse <= 255.0 ** 2 * 10 ** (-4.5)  # >= 45 dB on white

    # The exact display's compositor (Alpha Over by depth) gives the backend's image back (8-bit rounding).
    exact = np.asarray(Image.open(out / "render_exact.png").convert("RGBA")).astype(np.float64)
    white = [x[..., :3] * x[..., 3:] / 255.0 + 255.0 * (1 - x[..., 3:] / 255.0)
             for x in (exact, backend_view.astype(np.float64))]
    psnr = 10 * np.log10(255.0 ** 2 / max(1e-12, np.mean((white[0] - white[1]) ** 2)))
    print(f"Blender {series}: exact display PSNR {psnr:.1f} dB on white against the backend")
    assert res["exact_hidden"] and psnr >= 40.0

    # Connected to the running server with the token from its token file, and listed its jobs.
    assert not res["status"]["error"] and res["status"]["text"] == f"Connected to {server['url']}", res["status"]
    assert server["job_id"] in [j["id"] for j in res["jobs"]]


def test_release_list_matches_the_wheels_and_the_main_environment():
    """Each line names a bpy wheel of its own series; the main environment's pin (pyproject.toml) is one of them,
    and the manifest's minimum is the oldest release tested."""
    import tomllib

    rel = releases()
    assert len({s for s, _ in rel}) == len(rel) >= 3
    for series, wheel in rel:
        assert wheel.split(".")[:2] == series.split("."), (series, wheel)
    test_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert any(f"bpy=={wheel}" in test_extra for _, wheel in rel)  # the main environment's release is listed
    manifest = tomllib.loads((REPO / "blender_addon" / "blender_manifest.toml").read_text())
    assert manifest["blender_version_min"].rsplit(".", 1)[0] == rel[0][0]  # 4.2.0 <-> 4.2


def test_install_rejects_an_unknown_release_before_installing_anything(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "install_scripts" / "install.sh"), "--blender-versions", "4.2,3.6"],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode != 0
    assert "'3.6' is not in" in proc.stderr and f"known: {' '.join(s for s, _ in releases())}" in proc.stderr
    assert "==> target" not in proc.stdout  # stopped before the first install step
