"""The example job through the stage runner (tiny sizes): stages run in order, skip when done, log events."""

import json

from stag4d_backend.config import get_preset
from stag4d_backend.job import Job
from stag4d_backend.pipeline import generate_example


def test_example_job_runs_all_stages_then_skips_them(tmp_path):
    seen = []
    opts = dict(frames=3, size=32, gaussians=1500, formats=("usd", "ply", "cameras"))
    summary = generate_example(tmp_path / "job", get_preset("tiny"), progress=lambda st, s: seen.append(st),
                               **opts)
    assert list(summary) == ["example", "fit", "bake"]
    assert seen and seen[0] == "example" and "fit" in seen
    job = tmp_path / "job"
    assert (job / "frames" / "ref" / "2_rgba.png").is_file()
    assert (job / "frames" / "zero123" / "2_rgba" / "5.png").is_file()
    assert json.loads((job / "frames" / "meta.json").read_text())["fps"] == 12.0
    assert (job / "model" / "canonical.ply").is_file()
    assert (job / "bake" / "gaussians.usdc").is_file() and (job / "bake" / "ply" / "0002.ply").is_file()
    meta = json.loads((job / "model" / "meta.json").read_text())
    assert meta["num_frames"] == 3 and meta["fps"] == 12.0
    kinds = [(e["kind"], e.get("stage")) for e in Job(job).events()]
    assert kinds == [("stage_started", "example"), ("stage_finished", "example"), ("stage_started", "fit"),
                     ("stage_finished", "fit"), ("stage_started", "bake"), ("stage_finished", "bake")]
    assert Job(job).read()["state"] == "finished"

    again = generate_example(tmp_path / "job", get_preset("tiny"), **opts)
    assert all(v == "skipped (outputs exist)" for v in again.values())
