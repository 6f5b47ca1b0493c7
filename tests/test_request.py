"""The one table of request options (request.OPTIONS) against the CLI's flags and the server's JobOptions, the
sections each stage receives, and the request checks."""

import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from stag4d_backend import cli
from stag4d_backend.request import (BAKE_FORMATS, DEFAULT_BAKE_FORMATS, OPTION, OPTIONS, RequestError,
                                    check_options, make_request, parse_formats, stage_options)

REPO = Path(__file__).resolve().parents[1]


def _generate_flags() -> dict:
    sub = next(a for a in cli._build_parser()._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices["generate"]._actions if a.option_strings}


def test_cli_generate_flags_are_the_table():
    flags = _generate_flags()
    request_flags = {k: v for k, v in flags.items() if k not in ("help", "prompt", "example", "output")}
    assert set(request_flags) == {o.name for o in OPTIONS if o.cli}
    for name, action in request_flags.items():
        opt = OPTION[name]
        assert action.option_strings == [opt.flag]
        assert action.type == {int: int, float: float}.get(opt.type)
        if opt.choices and name != "preset":
            assert tuple(action.choices) == opt.choices


def _literal_values(annotation) -> tuple | None:
    for arg in typing.get_args(annotation) or (annotation,):
        if typing.get_origin(arg) is typing.Literal:
            return typing.get_args(arg)
    return None


def test_server_job_options_are_the_table():
    from stag4d_backend.server.schemas import JobOptions

    fields = JobOptions.model_fields
    assert set(fields) == {o.name for o in OPTIONS if o.http}
    for name, field in fields.items():
        opt = OPTION[name]
        if opt.choices:
            assert _literal_values(field.annotation) == opt.choices, name
        if opt.range and name != "formats":
            lo = next((m.ge if hasattr(m, "ge") else m.gt for m in field.metadata if hasattr(m, "ge")
                       or hasattr(m, "gt")), None)
            hi = next((m.le for m in field.metadata if hasattr(m, "le")), None)
            assert (lo, hi) == opt.range, name


def test_http_takes_the_options_the_cli_takes():
    """The disagreements fixed by the redesign: --anchor-steps and --video-frames were CLI-only."""
    from stag4d_backend.server.schemas import JobOptions

    shared = {o.name for o in OPTIONS if o.cli and o.http}
    assert {"anchor_steps", "video_frames"} <= shared
    assert {o.name for o in OPTIONS if o.cli and not o.http} == {"device"}  # the server picks the device
    assert JobOptions(anchor_steps=2, video_frames=14).model_dump(exclude_none=True) == \
        {"anchor_steps": 2, "video_frames": 14}


def test_one_bake_default_for_jobs_and_stag4d_bake():
    from stag4d_backend.stages import bake

    flags = {a.dest: a for a in next(a for a in cli._build_parser()._actions if a.dest == "command")
             .choices["bake"]._actions}
    assert flags["formats"].default is None  # None means DEFAULT_BAKE_FORMATS, as a job
    assert bake.DEFAULT_FORMATS == DEFAULT_BAKE_FORMATS == parse_formats(None) == parse_formats(OPTION["formats"].default)
    assert bake.FORMATS == BAKE_FORMATS and set(bake.OUTPUTS) == set(BAKE_FORMATS)


def test_each_stage_gets_its_own_section_under_its_own_names():
    request = {"kind": "video", "input": "/x.mp4",
               "options": {"seed": 3, "anchor_steps": 2, "frames": 5, "iters": 40, "formats": "usd", "fps": 8.0}}
    assert stage_options(request, "anchors") == {"seed": 3, "steps": 2}
    assert stage_options(request, "preprocess") == {"frames": 5, "fps": 8.0}
    assert stage_options(request, "fit") == {"seed": 3, "iters": 40}
    assert stage_options(request, "bake") == {"formats": "usd", "fps": 8.0}
    assert stage_options({"kind": "example"}, "example") == {"example_frames": 16, "example_size": 256,
                                                             "example_gaussians": 12000}


def test_stages_for_composes_each_kind(tmp_path):
    from stag4d_backend.pipeline import stages_for

    names = lambda req: [s.name for s in stages_for(req, tmp_path)]  # noqa: E731
    assert names({"kind": "example"}) == ["example", "fit", "bake"]
    assert names({"kind": "prompt", "prompt": "a cat"}) == ["video", "preprocess", "anchors", "fit", "bake"]
    assert names({"kind": "image", "input": "in.png"}) == ["video", "preprocess", "anchors", "fit", "bake"]
    assert names({"kind": "folder", "input": "/clip"}) == ["preprocess", "anchors", "fit", "bake"]
    image = stages_for({"kind": "image", "input": "in.png"}, tmp_path)
    assert image[0].options["image"] == str(tmp_path / "in.png")
    assert image[1].options["input"] == str(tmp_path / "video")
    assert stages_for({"kind": "example"}, tmp_path)[1].options["preset"] == "preview"
    assert stages_for({"kind": "example"}, tmp_path, device="cpu")[1].options["device"] == "cpu"
    with pytest.raises(RequestError, match="unknown request kind"):
        stages_for({"kind": "audio"})


@pytest.mark.parametrize("options, message", [
    ({"preset": "huge"}, "--preset 'huge': choose one of paper"),
    ({"iters": 0}, "--iters 0: must be between 1 and"),
    ({"iters": 2.5}, "--iters 2.5: expected a whole number"),
    ({"anchor_steps": True}, "expected a whole number"),
    ({"stride": "auto"}, "stride 'auto' needs frames"),
    ({"start": 5, "end": 5}, "end=5 must be greater than start=5"),
    ({"formats": "usd,obj"}, "unknown format 'obj'"),
    ({"colour": "red"}, "unknown option 'colour'"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(RequestError, match=message):
        check_options(options)


def test_options_are_canonical():
    assert check_options({"stride": "3", "formats": ["ply", "usd", "ply"], "seed": None, "fps": 12}) == \
        {"stride": 3, "formats": "usd,ply", "fps": 12.0}
    assert make_request(prompt="a cat", iters=10) == {"kind": "prompt", "prompt": "a cat", "options": {"iters": 10}}
    assert make_request(example=True)["kind"] == "example"
    with pytest.raises(RequestError, match="takes no input"):
        make_request(prompt="a cat", example=True)


def test_request_module_does_not_import_torch():
    code = "import sys; import stag4d_backend.request, stag4d_backend.job; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.stdout.strip() == "False"
