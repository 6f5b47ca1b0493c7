"""The hard evaluation set (benchmarks/scenes/): Blender's cameras are the backend's orbit cameras, and the noisy
anchors are deterministic, bounded degradations. The Blender part runs bpy in a child process (the scene
builder resets Blender's state, which must not leak into the add-on tests)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCENES = REPO / "benchmarks" / "scenes"

_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    import bpy, build, motions
    from stag4d_backend.render.cameras import OrbitCamera, anchor_cameras, front_camera, y_up_to_z_up_points
    scene, cam = build._setup(bpy, 4)
    cams = [front_camera(256), *anchor_cameras(320), OrbitCamera(45, 270, size=256), OrbitCamera(20, 30, 6.0, size=256)]
    pts = np.array([[0.3, 0.2, -0.1], [-0.4, -0.3, 0.25], [0.1, 0.45, 0.3], [0.0, 0.0, 0.0]])
    err = max(build.projection_error_px(scene, cam, c, pts) for c in cams)
    # A small emissive ball at a known off-centre point, rendered through two cameras: where is it?
    p = np.array([0.3, 0.2, -0.1])
    ball = motions._ellipsoid(bpy, "probe", 0.03, motions._material(bpy, "m", "solid", [(1, 0, 0)]),
                              location=tuple(y_up_to_z_up_points(p)))
    seen = []
    for c in (OrbitCamera(30, 30, size=64), OrbitCamera(-20, 210, size=64)):
        build.render(bpy, scene, cam, c, __import__("pathlib").Path(sys.argv[3]) / f"{c.azimuth}.png")
        from PIL import Image
        a = np.asarray(Image.open(sys.argv[3] + f"/{c.azimuth}.png").convert("RGBA"))[..., 3] / 255.0
        ys, xs = np.mgrid[0:64, 0:64] + 0.5
        uv = c.K @ (c.viewmat @ np.append(p, 1.0))[:3]
        seen.append([float((a * xs).sum() / a.sum()), float((a * ys).sum() / a.sum()),
                     float(uv[0] / uv[2]), float(uv[1] / uv[2])])
    print("RESULT", json.dumps({"err": err, "seen": seen}))
""")


def test_blender_cameras_match_the_backend_orbit_cameras(tmp_path):
    pytest.importorskip("bpy")
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(tmp_path / "bl"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", _CHILD, str(REPO), str(SCENES), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, out.stderr[-2000:]
    res = json.loads(lines[0][len("RESULT "):])
    assert res["err"] < 1e-3                           # projection of points: Blender == K @ viewmat
    for cx, cy, u, v in res["seen"]:                   # a rendered probe lands where the backend projects it
        assert abs(cx - u) < 0.35 and abs(cy - v) < 0.35, res["seen"]
        assert not (abs(u - 32) < 3 and abs(v - 32) < 3)  # off-centre: a flipped axis could not pass


def test_noisy_anchor_is_deterministic_and_bounded():
    sys.path.insert(0, str(SCENES))
    from noise import NOISE, anchor_seed, degrade_anchor

    size = 96
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    disk = ((xs - 48) ** 2 + (ys - 48) ** 2 < 20 ** 2)
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[disk] = [200, 100, 50, 255]
    a = degrade_anchor(rgba, anchor_seed("ball", 3, 1))
    assert np.array_equal(a, degrade_anchor(rgba, anchor_seed("ball", 3, 1)))
    b = degrade_anchor(rgba, anchor_seed("ball", 3, 2))
    assert not np.array_equal(a, b)
    for out in (a, b):
        w = out[..., 3] / 255.0
        cx, cy = (w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()
        assert np.hypot(cx - 48, cy - 48) <= NOISE["shift_px"] * np.sqrt(2) + 0.5   # pose jitter, bounded
        assert abs(np.sqrt(w.sum() / np.pi) / 20 - 1) < 2 * NOISE["scale"] + 0.05  # scale jitter, bounded
        inside = out[disk & (np.hypot(xs - cx, ys - cy) < 10)][:, :3].mean(0)
        assert np.all(np.abs(inside - [200, 100, 50]) <= 255 * (NOISE["offset"] + NOISE["gain"]) + 2)
        assert np.abs(out[..., :3].astype(int) - rgba[..., :3]).max() > 0           # it did change
