"""What the per-frame splat formats lose: render one baked frame from its PLY, its .glb (read back with pygltflib)
and its .spz (read back with gsply, an independent decoder) with the project's rasteriser, and compare.

    .venv/bin/python benchmarks/splat_formats_quality.py [--gaussians 12000] [--size 256] [--out /tmp/splat_q]

The model is the example creature (SH degree 0, as every preset) moved by a random deformation field, baked with
``--formats ply,gltf,spz``. Prints PSNR of each format's render against the PLY's (front and a side view) and writes
``sheet.png`` (rows: front, side; columns: PLY, glTF, SPZ, 8x |SPZ - PLY|).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bake import creature_model, random_field  # noqa: E402
from stag4d_backend.export.frames import SH_C0  # noqa: E402
from stag4d_backend.fitted import save_fitted  # noqa: E402
from stag4d_backend.gaussians.ply import load_ply  # noqa: E402
from stag4d_backend.render.cameras import OrbitCamera, front_camera  # noqa: E402
from stag4d_backend.render.view import render_view  # noqa: E402
from stag4d_backend.stages.bake import bake  # noqa: E402


def splats(xyz, quats_wxyz, scales, opacities, f_dc):
    t = lambda a: torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    colors = np.clip(0.5 + SH_C0 * np.asarray(f_dc).reshape(-1, 3), 0.0, 1.0)
    return SimpleNamespace(means=t(xyz), quats=t(quats_wxyz), scales=t(scales), opacities=t(opacities).reshape(-1),
                           colors=t(colors))


def from_ply(path):
    p = load_ply(path)
    return splats(p["xyz"], p["rotation"], np.exp(p["scaling"]), 1 / (1 + np.exp(-p["opacity"])), p["f_dc"])


def from_glb(path):
    import pygltflib

    doc = pygltflib.GLTF2.load_binary(str(path))
    blob, attrs = doc.binary_blob(), doc.meshes[0].primitives[0].attributes.__dict__
    def get(name, width):
        acc = doc.accessors[attrs[name]]
        return np.frombuffer(blob, "<f4", acc.count * width, doc.bufferViews[acc.bufferView].byteOffset or 0
                             ).reshape(acc.count, width)
    ext = "KHR_gaussian_splatting:"
    q = get(ext + "ROTATION", 4)[:, [3, 0, 1, 2]]
    return splats(get("POSITION", 3), q, get(ext + "SCALE", 3), get(ext + "OPACITY", 1),
                  get(ext + "SH_DEGREE_0_COEF_0", 3))


def from_spz(path):
    import gsply

    g = gsply.read_spz(path)
    return splats(g.means, g.quats, np.exp(g.scales), 1 / (1 + np.exp(-np.asarray(g.opacities))), g.sh0)


def psnr(a, b):
    mse = float(((a - b) ** 2).mean())
    return 10 * np.log10(1.0 / max(mse, 1e-12))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gaussians", type=int, default=12000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--frame", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="splat-quality-"))
    fit = out / "fit"
    save_fitted(fit, creature_model(args.gaussians), random_field("preview"),
                {"num_frames": 10, "fps": 24.0, "source_size": 512})
    bake(fit, out / "bake", formats="ply,gltf,spz")
    k = f"{args.frame:04d}"
    sets = {"PLY": from_ply(out / "bake" / "ply" / f"{k}.ply"), "glTF": from_glb(out / "bake" / "gltf" / f"{k}.glb"),
            "SPZ": from_spz(out / "bake" / "spz" / f"{k}.spz")}
    cams = {"front": front_camera(args.size), "side": OrbitCamera(15.0, 70.0, 2.0, 49.1, args.size)}
    rows = []
    with torch.no_grad():
        for view, cam in cams.items():
            imgs = {name: render_view(g, cam).rgb.clamp(0, 1).numpy() for name, g in sets.items()}
            for name in ("glTF", "SPZ"):
                print(f"{view:5s} {name:4s} PSNR vs PLY: {psnr(imgs[name], imgs['PLY']):.1f} dB")
            diff = np.clip(8 * np.abs(imgs["SPZ"] - imgs["PLY"]), 0, 1)
            rows.append(np.concatenate([imgs["PLY"], imgs["glTF"], imgs["SPZ"], diff], axis=1))
    from PIL import Image

    sheet = out / "sheet.png"
    Image.fromarray((np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)).save(sheet)
    print("wrote", sheet, "(rows: front, side; columns: PLY, glTF, SPZ, 8x |SPZ - PLY|)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
