"""Explain the floaters of a finished fit of a hard-set scene: where are they at the frames where they are far?

    .venv/bin/python benchmarks/floaters_explain.py FIT_DIR SCENE_DIR     # SCENE_DIR: benchmarks/scenes/build.py --list

Floaters: opacity > 0.05 and, at some frame, farther than 1.7 x the scene's bounding radius (scene.json
``bounds_train``) from its centre. For each floater at each of its far frames and each training camera (front +
six anchors) it counts whether the centre falls outside the image, over the silhouette, or over background.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stag4d_backend.dataset import load_frames  # noqa: E402
from stag4d_backend.fitted import load_fitted  # noqa: E402
from stag4d_backend.fitting.in_view import TrainingViews  # noqa: E402
from stag4d_backend.render.cameras import OrbitCamera  # noqa: E402


def explain(fit_dir: Path, scene: Path) -> dict:
    meta = json.loads((scene / "scene.json").read_text())
    animated, _ = load_fitted(fit_dir)
    F = meta["frames"]
    b = torch.tensor(meta["bounds_train"], dtype=torch.float32)
    with torch.no_grad():
        means = torch.stack([animated.at_frame(f).means for f in range(F)])
    op = animated.at_frame(0).opacities
    vis = op > 0.05
    d = (means - b[:, None, :3]).norm(dim=-1) / b[:, 3][:, None]
    far_f = (d > 1.7) & vis
    far = far_f.any(0)
    out = {"fit": str(fit_dir), "visible": int(vis.sum()), "floaters": int(far.sum()),
           "floaters_pct": round(100.0 * float(far.sum()) / max(int(vis.sum()), 1), 3),
           "farthest_over_radius": round(float((d * vis).max()), 2), "far_per_frame": far_f.sum(1).tolist()}
    if not far.any():
        return out
    out["floater_opacity_q10_50_90"] = np.quantile(op[far].numpy(), [0.1, 0.5, 0.9]).round(3).tolist()
    out["other_opacity_median"] = round(float(op[vis & ~far].median()), 3)
    data = load_frames(scene / "exact", 256, 320)
    cams = [OrbitCamera.from_dict(meta["front_camera"])] + [OrbitCamera.from_dict(c) for c in meta["anchor_cameras"]]
    masks = [data.ref_mask] + [data.anchor_mask[:, k] for k in range(6)]
    views = TrainingViews(cams)
    counts = {"outside_every_image": 0, "outside_some_image": 0, "pairs_outside_image": 0,
              "pairs_over_silhouette": 0, "pairs_over_background": 0}
    for f in range(F):
        p = means[f][far_f[f]]
        if len(p) == 0:
            continue
        o = views.overshoot(p) > 0
        counts["outside_every_image"] += int(o.all(0).sum())
        counts["outside_some_image"] += int(o.any(0).sum())
        for c, (cam, mask) in enumerate(zip(cams, masks)):
            K = cam.K
            pc = p @ torch.as_tensor(cam.viewmat[:3, :3], dtype=p.dtype).T + torch.as_tensor(cam.viewmat[:3, 3],
                                                                                             dtype=p.dtype)
            uv = pc[:, :2] / pc[:, 2:3] * float(K[0, 0]) + float(K[0, 2])
            inside = (pc[:, 2] > 0) & (uv >= 0).all(1) & (uv < cam.size).all(1)
            counts["pairs_outside_image"] += int((~inside).sum())
            uv = uv.long().clamp(0, cam.size - 1)
            on = mask[f][uv[:, 1], uv[:, 0]] > 0.5
            counts["pairs_over_silhouette"] += int((inside & on).sum())
            counts["pairs_over_background"] += int((inside & ~on).sum())
    out.update(counts, far_frames=[f for f in range(F) if far_f[f].any()])
    return out


if __name__ == "__main__":
    print(json.dumps(explain(Path(sys.argv[1]), Path(sys.argv[2])), indent=1))
