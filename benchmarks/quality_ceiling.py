"""Where the hard set's held-out error comes from (issue 13): a fit of one scene scored at its training anchor views
(the six exact Zero123++ poses) beside its held-out views, for the whole clip or for one frame fitted alone.

    .venv/bin/python benchmarks/quality_ceiling.py SCENE full   OUT_DIR [KEY=JSON ...]   # the preview fit
    .venv/bin/python benchmarks/quality_ceiling.py SCENE static OUT_DIR [KEY=JSON ...]   # frame 4 alone

``static`` fits only frame 4 (no motion to learn): its held-out PSNR is the ceiling that sparse views (front + six
anchors) leave to a perfect deformation. Anchors far below their static value in ``full`` mean the motion is not
fitted. Prints one JSON line (also appended to OUT_DIR/../diag.jsonl). ITERS=N in the environment shortens the fit.
The scene comes from the cache of benchmarks/scenes/build.py.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from quality import _fit, _render, read_rgba  # noqa: E402
from scenes.build import scene_dir  # noqa: E402
from stag4d_backend.fitted import load_fitted  # noqa: E402
from stag4d_backend.metrics import psnr  # noqa: E402
from stag4d_backend.render.cameras import OrbitCamera, anchor_cameras  # noqa: E402

STATIC_FRAME = 4


def main() -> None:
    scene, mode, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    sets = sys.argv[4:]
    folder = scene_dir(scene)
    meta = json.loads((folder / "scene.json").read_text())
    held = [OrbitCamera.from_dict(c) for c in meta["heldout_cameras"]]
    frames = [STATIC_FRAME] if mode == "static" else None
    _, wall, cfg = _fit(folder / "exact", out, "preview", int(os.environ.get("ITERS", 0)) or None, frames=frames,
                        threads=1, overrides=sets)
    anim, _ = load_fitted(out)
    anchors = anchor_cameras(320, cfg.anchor_radius or cfg.radius, cfg.fovy, cfg.input_elevation)
    res = {"scene": scene, "mode": mode, "set": sets, "wall": round(wall), "load_avg_1m": round(os.getloadavg()[0], 2)}
    for f in frames or meta["heldout_frames"]:
        fitted_frame = 0 if mode == "static" else f  # a one-frame fit holds its frame at index 0
        hp = [psnr(_render(anim, c, fitted_frame)[0], read_rgba(folder / "heldout" / str(f) / f"{v}.png")[0])
              for v, c in enumerate(held)]
        ap = [psnr(_render(anim, c, fitted_frame)[0], read_rgba(folder / "exact" / "zero123" / f"{f}_rgba" /
                                                                 f"{k}.png")[0]) for k, c in enumerate(anchors)]
        res[f"f{f}"] = {"held": round(float(np.mean(hp)), 2), "anchors": round(float(np.mean(ap)), 2)}
    res["held_mean"] = round(float(np.mean([v["held"] for k, v in res.items() if k[1:].isdigit()])), 2)
    res["anchors_mean"] = round(float(np.mean([v["anchors"] for k, v in res.items() if k[1:].isdigit()])), 2)
    print(json.dumps(res))
    with open(out.parent / "diag.jsonl", "a") as fh:
        fh.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
