"""Where the hard set's held-out error comes from (issue 13): a fit of one scene scored at its training anchor views
(the six exact Zero123++ poses) beside its held-out views, for the whole clip or for one frame fitted alone.

    .venv/bin/python benchmarks/quality_ceiling.py SCENE full       OUT_DIR [KEY=JSON ...]   # the preview fit
    .venv/bin/python benchmarks/quality_ceiling.py SCENE static     OUT_DIR [KEY=JSON ...]   # frame 4 alone
    .venv/bin/python benchmarks/quality_ceiling.py SCENE frames=A-B OUT_DIR [KEY=JSON ...]   # frames A..B only
    .venv/bin/python benchmarks/quality_ceiling.py SCENE repeat=F   OUT_DIR [KEY=JSON ...]   # frame F, F times over

``static`` fits only frame 4 (no motion to learn): its held-out PSNR is the ceiling that sparse views (front + six
anchors) leave to a perfect deformation. Anchors far below their static value in ``full`` mean the motion is not
fitted. ``frames=A-B`` fits a stretch of the clip (each frame scored; held-out views only at held-out frames);
``repeat=F`` fits a clip as long as the scene's whose every frame is frame F (the whole 4D fit with no motion),
scored at every held-out frame index against frame F. Prints one JSON line (also appended to OUT_DIR/../diag.jsonl).
ITERS=N in the environment shortens the fit. The scene comes from the cache of benchmarks/scenes/build.py.
"""
import json
import os
import shutil
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


def repeated_frame_data(exact: Path, frame: int, num_frames: int, out: Path) -> Path:
    """A STAG4D data folder of ``num_frames`` frames that are all frame ``frame`` of ``exact`` (front + anchors)."""
    (out / "ref").mkdir(parents=True, exist_ok=True)
    for f in range(num_frames):
        shutil.copyfile(exact / "ref" / f"{frame}_rgba.png", out / "ref" / f"{f}_rgba.png")
        shutil.copytree(exact / "zero123" / f"{frame}_rgba", out / "zero123" / f"{f}_rgba", dirs_exist_ok=True)
    return out


def main() -> None:
    scene, mode, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    sets = sys.argv[4:]
    folder = scene_dir(scene)
    meta = json.loads((folder / "scene.json").read_text())
    held = [OrbitCamera.from_dict(c) for c in meta["heldout_cameras"]]
    kind, _, arg = mode.partition("=")
    data, frames, repeat = folder / "exact", None, None
    if kind == "static":
        frames = [STATIC_FRAME]
    elif kind == "frames":
        a, b = (int(x) for x in arg.split("-"))
        frames = list(range(a, b + 1))
    elif kind == "repeat":
        repeat = int(arg)
        data = repeated_frame_data(data, repeat, meta["frames"], out.parent / f"{out.name}-data")
    elif kind != "full":
        raise SystemExit(f"unknown mode {mode!r}: full, static, frames=A-B or repeat=F")
    _, wall, cfg = _fit(data, out, "preview", int(os.environ.get("ITERS", 0)) or None, frames=frames,
                        threads=1, overrides=sets)
    anim, _ = load_fitted(out)
    anchors = anchor_cameras(320, cfg.anchor_radius or cfg.radius, cfg.fovy, cfg.input_elevation)
    res = {"scene": scene, "mode": mode, "set": sets, "wall": round(wall), "load_avg_1m": round(os.getloadavg()[0], 2)}
    # (scene frame whose images score it, frame index in the fit): a fit of some frames holds frame f at its index
    # in ``frames``; a repeated-frame fit is scored at the held-out frame indices against its one frame.
    if repeat is not None:
        pairs = [(repeat, i) for i in meta["heldout_frames"]]
    else:
        pairs = [(f, i) for i, f in enumerate(frames)] if frames else [(f, f) for f in meta["heldout_frames"]]
    for f, fitted_frame in pairs:
        key = f"f{fitted_frame}" if repeat is not None else f"f{f}"
        res[key] = {"anchors": round(float(np.mean([
            psnr(_render(anim, c, fitted_frame)[0],
                 read_rgba(folder / "exact" / "zero123" / f"{f}_rgba" / f"{k}.png")[0])
            for k, c in enumerate(anchors)])), 2)}
        if f in meta["heldout_frames"]:
            res[key]["held"] = round(float(np.mean([
                psnr(_render(anim, c, fitted_frame)[0], read_rgba(folder / "heldout" / str(f) / f"{v}.png")[0])
                for v, c in enumerate(held)])), 2)
    scored = [v for k, v in res.items() if k[0] == "f" and k[1:].isdigit()]
    if any("held" in v for v in scored):
        res["held_mean"] = round(float(np.mean([v["held"] for v in scored if "held" in v])), 2)
    res["anchors_mean"] = round(float(np.mean([v["anchors"] for v in scored])), 2)
    print(json.dumps(res))
    with open(out.parent / "diag.jsonl", "a") as fh:
        fh.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
