"""Job directory bookkeeping and the image metrics used by the benchmarks."""

import json
import math
import threading

import torch

from stag4d_backend.job import Job
from stag4d_backend.metrics import psnr, ssim


def test_job_events_are_numbered_ordered_and_survive_reopen(tmp_path):
    job = Job(tmp_path / "job").create({"input": "x.mp4", "preset": "preview"})
    assert job.read()["state"] == "created" and job.read()["request"]["preset"] == "preview"
    threads = [threading.Thread(target=lambda i=i: [job.emit("progress", step=i * 10 + j) for j in range(10)])
               for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    events = job.events()
    assert [e["n"] for e in events] == list(range(40))
    reopened = Job(tmp_path / "job")
    assert reopened.emit("done")["n"] == 40
    assert [e["n"] for e in reopened.events(since=38)] == [38, 39, 40]
    job.update(state="running")
    assert json.loads((tmp_path / "job" / "job.json").read_text())["state"] == "running"


def test_psnr_and_ssim_values():
    a = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0))
    assert psnr(a, a) == math.inf and abs(ssim(a, a) - 1.0) < 1e-6
    b = (a + 0.1).clamp(0, 1)
    mse = torch.mean((a - b) ** 2).item()
    assert abs(psnr(a, b) - (-10 * math.log10(mse))) < 1e-9
    # A constant offset keeps structure (high SSIM); noise destroys it.
    noisy = (a + 0.3 * torch.randn(32, 32, 3, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert ssim(a, b) > ssim(a, noisy) and ssim(a, noisy) < 0.8
