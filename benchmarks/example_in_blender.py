"""Render a job's baked result in Blender (bpy): the picture of the product in README and docs.

    .venv/bin/python benchmarks/example_in_blender.py JOB_DIR docs/example_blender.png [--frames 0 4 8]
Imports JOB_DIR/bake/gaussians.usdc and mesh.usdc with Blender's USD importer and renders them (Cycles point
cloud with the displayColor attribute; Workbench mesh with vertex colours) from four views, as a contact sheet.
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bake import contact_sheet, render_in_blender  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job_dir")
    ap.add_argument("out_png")
    ap.add_argument("--frames", type=int, nargs="+", default=[0, 4, 8])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stag4d-blender-"))
    paths = render_in_blender(Path(args.job_dir) / "bake", work, args.frames)
    points = [p for p in paths if p.name.startswith("gaussians")]
    mesh = [p for p in paths if p.name.startswith("mesh")]
    out = Path(args.out_png)
    contact_sheet(points, out)
    contact_sheet(mesh, out.with_name(out.stem + "_mesh.png"))
    print(f"wrote {out} and {out.with_name(out.stem + '_mesh.png')}")


if __name__ == "__main__":
    main()
