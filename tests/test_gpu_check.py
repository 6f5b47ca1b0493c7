"""benchmarks/gpu_check.py --cpu-dry-run: every step of the GPU check runs at tiny sizes on the CPU and reports
its figures (or its error) in gpu_check.json and the markdown table, so the script is ready the day a GPU is lent."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
STEPS = ["environment", "cuda_tests", "rasterizer", "zero123plus", "zero123_xl_sds", "fit", "bake"]


def _run(out: Path, *extra: str) -> dict:
    r = subprocess.run([sys.executable, str(SCRIPT), str(out), "--cpu-dry-run", "--threads", "1", *extra],
                       capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert (out / "gpu_check.md").read_text().strip() == r.stdout.strip()   # the printed table is the file
    return report


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    return _run(out), out


def test_every_step_ran_with_its_figures(dry):
    report, out = dry
    assert report["dry_run"] is True and [r["step"] for r in report["steps"]] == STEPS
    by = {r["step"]: r for r in report["steps"]}
    for r in report["steps"]:
        assert r["status"] == "ok", (r["step"], r.get("error"), r.get("traceback"))
        assert 0 < r["seconds"] <= r["time_box_s"] and isinstance(r["figures"], dict)

    env = by["environment"]["figures"]
    assert env["torch"] == torch.__version__ and env["cuda_available"] is False
    assert env["gsplat_usable"] is False and env["gsplat_reason"] == "no CUDA device"
    assert env["doctor_gsplat"] == "not used (no CUDA device)" and "torch" in env["rasteriser_backends"]

    tests = by["cuda_tests"]["figures"]
    assert "tests/test_rasterize.py" in tests["files"] and tests["returncode"] == 0
    assert tests["passed"] == tests["failed"] == tests["errors"] == 0 and tests["skipped"] >= 1
    assert all(t["result"] == "skipped" and "CUDA" in t["message"] for t in tests["tests"])

    cases = by["rasterizer"]["figures"]["cases"]
    sizes = report["sizes"]
    grid = {(c["backend"], c["gaussians"], c["size"]): c for c in cases}
    for n in sizes["raster_counts"]:
        for px in sizes["raster_sizes"]:
            g, t = grid[("gsplat", n, px)], grid[("torch", n, px)]
            assert g["status"] == "unavailable" and g["error"] == "no CUDA device"
            assert t["status"] == "ok" and t["ran"] == "torch" and t["runs"] == sizes["raster_repeats"]
            assert 0 < t["fwd_ms"] <= t["fwd_bwd_ms"] and t["fwd_bwd_min_ms"] <= t["fwd_bwd_ms"]
            assert 0 < t["drawn"] <= n and t["peak_rss_rise_mb"] >= 0


def test_zero123plus_sds_fit_bake_figures(dry):
    report, _ = dry
    by = {r["step"]: r["figures"] for r in report["steps"]}
    z = by["zero123plus"]
    assert (z["model"], z["dtype"], z["tile"], z["latent"], z["attn1"]) == ("tiny", "float32", 32, [24, 16], 16)
    assert z["sdpa_kernel"] == "n/a (CPU)" and any("scaled_dot_product" in o for o in z["sdpa_ops"])
    assert set(z["modes"]) == {"lockstep", "stored"}
    steps = report["sizes"]["z123pp_steps"]
    # lockstep: one batch [0, 1] of steps; stored: frame 0 alone, then frame 1 with the stored tokens
    assert z["modes"]["lockstep"]["denoising_steps"] == steps and z["modes"]["lockstep"]["stored_bytes"] == 0
    assert z["modes"]["stored"]["denoising_steps"] == 2 * steps and z["modes"]["stored"]["stored_bytes"] > 0
    assert set(z["modes"]["lockstep"]["step_s_by_batch"]) == {"x2"}
    assert set(z["modes"]["stored"]["step_s_by_batch"]) == {"x1"}
    for m in z["modes"].values():
        assert 0 < m["step_s_median"] < m["wall_s"] and m["latents_finite"] is True

    s = by["zero123_xl_sds"]
    assert (s["model"], s["dtype"], s["calls"], s["sds_px"]) == ("tiny", "float32", 2, 64)
    assert 0 < s["loss_backward_s_min"] <= s["loss_backward_s_median"] and s["grad_finite"] is True

    fit = by["fit"]
    for preset, iters in report["sizes"]["fit_iters"].items():
        p = fit["presets"][preset]
        assert p["status"] == "finished" and p["iterations"] == iters == p["planned_iterations"]
        assert p["preset_iters"] == {"standard": 6000, "paper": 8000}[preset]
        assert math.isclose(p["minutes_per_asset"], p["s_per_step_mean"] * p["preset_iters"] / 60)
        assert p["gaussians"] > 0

    b = by["bake"]
    assert (b["gaussians"], b["frames"], b["ply_files"], b["evaluated_points"]) == (2000, 4, 4, 2000)
    assert b["evaluate_device"] == "cpu" and b["usd_mb"] > 0 and b["bake_s"] > 0


def test_markdown_table_lists_every_step(dry):
    _, out = dry
    text = (out / "gpu_check.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and " | ok | " in line]
    assert [r.split(" | ")[0][2:] for r in rows[:len(STEPS)]] == STEPS
    assert "CPU dry run" in text and "SDPA: n/a (CPU)" in text and "min per asset" in text


def test_a_failing_or_overrunning_step_is_recorded_and_the_rest_goes_on(tmp_path):
    report = _run(tmp_path, "--only", "environment,cuda_tests,bake", "--fail-step", "environment",
                  "--box", "cuda_tests=0.5")
    env, tests, bake = report["steps"]
    assert env["status"] == "failed" and "injected failure in environment" in env["error"]
    assert "Traceback" in env["traceback"]
    assert tests["status"] == "timeout" and tests["error"].startswith("time box of 0 s reached")
    assert bake["status"] == "ok" and bake["figures"]["frames"] == 4
    text = (tmp_path / "gpu_check.md").read_text()
    assert "| environment | failed |" in text and "| cuda_tests | timeout |" in text
