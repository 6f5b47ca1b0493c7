"""Stage "example": the embedded example's input (`stag4d generate --example`): a procedural animated creature
with exact anchor views, written in the STAG4D layout (no weights, no GPU needed).

Options: example_frames, example_size, example_gaussians (request.OPTIONS).
"""

from __future__ import annotations

import json
import shutil
from typing import Callable

from ..job import check_stop
from ..request import EXAMPLE_FRAMES, EXAMPLE_GAUSSIANS, EXAMPLE_SIZE

EXAMPLE_FPS = 12.0


def _frames(options: dict) -> int:
    return int(options.get("example_frames") or EXAMPLE_FRAMES)


def is_done(job, options: dict) -> bool:
    return (job.frames_dir / "zero123" / f"{_frames(options) - 1}_rgba" / "5.png").is_file()


def run(job, options: dict, progress: Callable[[dict], None] | None = None, should_stop=None) -> dict:
    """Render the creature's front and anchor views into a temporary folder, then move it into place."""
    from ..example_scene import ExampleCreature, write_stag4d_layout

    frames = _frames(options)
    size = int(options.get("example_size") or EXAMPLE_SIZE)
    gaussians = int(options.get("example_gaussians") or EXAMPLE_GAUSSIANS)
    progress = progress or (lambda stats: None)

    def on_frame(f: int) -> None:
        progress({"step": f + 1, "total": frames})
        check_stop(should_stop, "stopped during example")

    tmp = job.path / ".frames.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    write_stag4d_layout(ExampleCreature(gaussians, seed=0), tmp, frames, size, size, on_frame=on_frame)
    (tmp / "meta.json").write_text(json.dumps({"fps": EXAMPLE_FPS, "source": "stag4d example creature"}) + "\n")
    shutil.rmtree(job.frames_dir, ignore_errors=True)
    tmp.replace(job.frames_dir)
    return {"frames": frames, "size": size}


__all__ = ["run", "is_done", "EXAMPLE_FPS"]
