"""`stag4d generate INPUT` end to end through the CLI: preprocess -> anchors (tiny random Zero123++ saved in the
real layout) -> fit (tiny preset) -> bake; and the stop at the first stage whose weights are missing."""

import json

import pytest
from PIL import Image

from stag4d_backend import cli
from stag4d_backend.request import RequestError, make_request, sniff_input
from stag4d_backend.job import Job

from test_zero123pp_fusion import build_tiny_zero123plus, make_frame


@pytest.fixture(scope="module")
def tiny_zero123plus(tmp_path_factory):
    return build_tiny_zero123plus(tmp_path_factory.mktemp("zero123plus-v1.1"))


@pytest.fixture
def rgba_folder(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    for f in range(3):
        make_frame(f, size=48).save(folder / f"frame_{f:03d}.png")
    return folder


@pytest.fixture(autouse=True)
def _no_model_paths(monkeypatch):
    for name in ("ZERO123PLUS", "ZERO123_XL", "SVD", "SDXL_TURBO", "MATTING"):
        monkeypatch.delenv(f"STAG4D_{name}_PATH", raising=False)


def _events(job_dir):
    return Job(job_dir).events()


def test_stops_at_missing_zero123plus_after_preprocessing_then_resumes_when_installed(
        rgba_folder, tiny_zero123plus, tmp_path, monkeypatch, capsys):
    job_dir = tmp_path / "job"
    argv = ["generate", str(rgba_folder), "-o", str(job_dir), "--preset", "tiny", "--anchor-steps", "2", "--anchor-tile", "32",
            "--formats", "usd,ply", "--seed", "3"]
    assert cli.main(argv) == cli.EXIT_MISSING_WEIGHTS
    err = capsys.readouterr().err
    assert "Zero123++" in err and "stag4d models download zero123plus" in err and "Traceback" not in err
    # Every stage it could do is done and kept: the matted, cropped frames are there.
    refs = sorted((job_dir / "frames" / "ref").glob("*_rgba.png"))
    assert [p.name for p in refs] == ["0_rgba.png", "1_rgba.png", "2_rgba.png"]
    kinds = [(e["kind"], e.get("stage")) for e in _events(job_dir)]
    assert ("stage_finished", "preprocess") in kinds and ("stage_failed", "anchors") in kinds
    assert Job(job_dir).read()["state"] == "failed"
    assert Job(job_dir).read()["matting"] == {"method": "input", "note": "alpha from the input itself (matting=auto)"}
    mtime = refs[0].stat().st_mtime_ns

    # Weights installed (a local copy in the real layout): the same command goes on from the anchors.
    monkeypatch.setenv("STAG4D_ZERO123PLUS_PATH", str(tiny_zero123plus))
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "gaussians.usdc" in out
    assert refs[0].stat().st_mtime_ns == mtime  # preprocess was skipped, not redone
    for f in range(3):
        views = sorted((job_dir / "frames" / "zero123" / f"{f}_rgba").glob("*.png"))
        assert len(views) == 6
        with Image.open(views[0]) as im:
            assert im.mode == "RGBA"
    meta = json.loads((job_dir / "model" / "meta.json").read_text())
    assert meta["num_frames"] == 3 and meta["guidance"] == "anchors"  # no Zero123-XL: anchors, with a note
    assert (job_dir / "bake" / "gaussians.usdc").is_file()
    assert len(list((job_dir / "bake" / "ply").glob("*.ply"))) == 3
    assert Job(job_dir).read()["state"] == "finished"
    ns = [e["n"] for e in _events(job_dir)]
    assert ns == list(range(len(ns)))


def test_prompt_without_text_to_image_weights_stops_with_the_registry_message(tmp_path, capsys):
    assert cli.main(["generate", "--prompt", "a walking robot", "-o", str(tmp_path / "job")]) \
        == cli.EXIT_MISSING_WEIGHTS
    err = capsys.readouterr().err
    assert "SDXL-Turbo" in err and "stag4d models download sdxl-turbo" in err and "Traceback" not in err


def test_bad_requests_are_refused_before_anything_is_written(tmp_path, capsys, rgba_folder):
    text = tmp_path / "notes.txt"
    text.write_text("not a video")
    assert cli.main(["generate", str(text), "-o", str(tmp_path / "a")]) == cli.EXIT_USAGE
    assert "not a video" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert cli.main(["generate", str(tmp_path / "missing.mp4"), "-o", str(tmp_path / "b")]) == cli.EXIT_USAGE
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["generate", "-o", str(tmp_path / "c")]) == cli.EXIT_USAGE
    assert cli.main(["generate", str(rgba_folder), "--prompt", "x", "-o", str(tmp_path / "d")]) == cli.EXIT_USAGE
    # A job folder holding another request is not overwritten.
    Job(tmp_path / "e").create({"kind": "prompt", "prompt": "other", "options": {}})
    assert cli.main(["generate", str(rgba_folder), "-o", str(tmp_path / "e")]) == cli.EXIT_USAGE
    assert "another job" in capsys.readouterr().err


def test_inputs_are_sniffed_by_content_not_by_name(tmp_path):
    png = tmp_path / "looks_like.mp4"
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    assert sniff_input(png) == "image"
    assert sniff_input(tmp_path) == "folder"
    with pytest.raises(RequestError):
        make_request(None, "   ")
