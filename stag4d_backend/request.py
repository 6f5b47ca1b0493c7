"""A generative request, torch-free: what it may ask for, how its input is recognised, and which stage gets what.

    {"kind": "video" | "image" | "folder" | "prompt" | "example", "input": PATH | "prompt": TEXT,
     "options": {name: value, ...}}

``OPTIONS`` is the one table of the request's options: name, type, range or choices, default, the stages that
read it, and where it is offered (a ``stag4d generate`` flag, a field of the server's ``JobOptions``). The CLI
builds its flags from it; a test holds ``server.schemas.JobOptions`` equal to it (the server never imports torch,
and its schema is committed as docs/openapi.json). ``stage_options(request, stage)`` is the section one stage
receives: only the options it owns, under the stage's own names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .media import sniff_file

INPUT_KINDS = ("video", "image", "folder")   # a file or folder the request names
KINDS = INPUT_KINDS + ("prompt", "example")
PRESETS = ("paper", "standard", "preview", "tiny")          # config.PRESETS (a test holds them equal)
GUIDANCE = ("anchors", "sds", "sds+anchors")                # config.GUIDANCE_CHOICES
FUSION_MODES = ("lockstep", "stored", "off")                # stages.anchors.FUSION_MODES
MATTING_CHOICES = ("auto", "model", "none", "white-key", "color-key")  # stages.preprocess.MATTING_CHOICES

# Bake formats: the names, the file each writes in bake/, and what a job bakes when it names none (also
# `stag4d bake`'s default). New formats are added here; stages.bake and the server's schema read this table.
BAKE_OUTPUTS = {"usd": "gaussians.usdc", "ply": "ply", "gltf": "gltf", "spz": "spz", "mesh": "mesh.usdc",
                "preview": "preview.mp4", "cameras": "cameras.json"}
BAKE_FORMATS = tuple(BAKE_OUTPUTS)
DEFAULT_BAKE_FORMATS = ("usd", "ply", "mesh", "preview", "cameras")

EXAMPLE_FRAMES = 16
EXAMPLE_SIZE = 256
EXAMPLE_GAUSSIANS = 12000
INT31 = 2**31 - 1


class RequestError(ValueError):
    """A request that cannot run as asked (one line, names the fix)."""


@dataclass(frozen=True)
class Option:
    name: str
    type: type                        # int, float or str
    stages: tuple[str, ...]           # the stages whose section holds it
    help: str = ""
    range: tuple | None = None        # (minimum, maximum), inclusive
    choices: tuple | None = None
    default: object = None            # None: the owning stage's (or preset's) own default
    cli: bool = True                  # a `stag4d generate --flag`
    http: bool = True                 # a field of the server's JobOptions
    stage_name: str | None = None     # its name inside the stage's section, when it differs

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("preset", str, ("fit",), "fit preset (default: standard on a CUDA device, preview on a CPU; "
           "example: preview)", choices=PRESETS),
    Option("seed", int, ("video", "anchors", "fit"), "random seed", range=(0, INT31)),
    Option("iters", int, ("fit",), "fit steps (rescales the preset's schedules)", range=(1, 1_000_000)),
    Option("resolution", int, ("fit",), "cap on every fit render size", range=(16, 2048), cli=False),
    Option("device", str, ("video", "preprocess", "anchors", "fit"), "cpu, cuda, cuda:1 (default: CUDA when "
           "present)", http=False),
    Option("guidance", str, ("fit",), "fit guidance (default: the preset's)", choices=GUIDANCE),
    Option("checkpoint_every", int, ("fit",), "fit steps between checkpoints", range=(1, 1_000_000), cli=False),
    Option("preview_every", int, ("fit",), "fit steps between live previews (default: the checkpoint interval; "
           "0 = off)", range=(0, 1_000_000), cli=False),
    # Which input frames (video / image sequence): range(start, end, stride), then the first `frames` of those.
    Option("frames", int, ("preprocess",), "keep at most N frames of the input (evenly spaced)",
           range=(1, 10_000)),
    Option("stride", str, ("preprocess",), "keep every k-th input frame, or 'auto' (with --frames: cover the "
           "whole clip)"),
    Option("start", int, ("preprocess",), "first input frame", range=(0, 10_000_000)),
    Option("end", int, ("preprocess",), "last input frame (exclusive)", range=(1, 10_000_000)),
    Option("fps", float, ("preprocess", "bake"), "playback rate (default: the input's)", range=(0, 1000),
           cli=False),
    Option("size", int, ("preprocess",), "side of the preprocessed square frames", range=(16, 4096), cli=False),
    Option("fraction", float, ("preprocess",), "object's share of the frame side", range=(0.05, 1.0), cli=False),
    Option("matting", str, ("preprocess",), "how an input without alpha is cut out (default auto: the matting "
           "model when installed)", choices=MATTING_CHOICES),
    Option("fusion", str, ("anchors",), "Zero123++ temporal-anchor fusion mode (default: lockstep)",
           choices=FUSION_MODES),
    Option("anchor_steps", int, ("anchors",), "Zero123++ denoising steps (default 75, as the authors)",
           range=(1, 1000), stage_name="steps"),
    Option("anchor_tile", int, ("anchors",), "Zero123++ output tile edge in px (default 320: the official 640x960 "
           "grid)", range=(8, 2048), stage_name="tile"),
    Option("video_frames", int, ("video",), "image/prompt input: frames the video model generates",
           range=(2, 128)),
    Option("formats", str, ("bake",), "bake formats: a comma list of " + ", ".join(BAKE_FORMATS) + ", or all "
           "(default: " + ",".join(DEFAULT_BAKE_FORMATS) + ")", default=",".join(DEFAULT_BAKE_FORMATS)),
    Option("example_frames", int, ("example",), "kind example only", range=(1, 64), default=EXAMPLE_FRAMES,
           cli=False),
    Option("example_size", int, ("example",), "kind example only", range=(16, 1024), default=EXAMPLE_SIZE,
           cli=False),
    Option("example_gaussians", int, ("example",), "kind example only", range=(10, 200_000),
           default=EXAMPLE_GAUSSIANS, cli=False),
)
OPTION = {o.name: o for o in OPTIONS}


def _check(opt: Option, value):
    """The value in its canonical form; RequestError naming the option otherwise."""
    name = opt.flag
    if opt.name == "stride":
        if value == "auto":
            return value
        opt = Option("stride", int, opt.stages, range=(1, 100_000))
    if opt.name == "formats":
        return ",".join(parse_formats(value))
    if opt.type is int:
        try:
            x = int(value)
            if isinstance(value, bool) or x != float(value):
                raise ValueError
        except (TypeError, ValueError):
            raise RequestError(f"{name} {value!r}: expected a whole number") from None
    elif opt.type is float:
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise RequestError(f"{name} {value!r}: expected a number") from None
    else:
        x = str(value)
    if opt.choices is not None and x not in opt.choices:
        raise RequestError(f"{name} {x!r}: choose one of {', '.join(opt.choices)}")
    if opt.range is not None and not opt.range[0] <= x <= opt.range[1]:
        raise RequestError(f"{name} {x}: must be between {opt.range[0]} and {opt.range[1]}")
    return x


def parse_formats(spec) -> tuple[str, ...]:
    """'usd,ply' / ['usd', 'ply'] / 'all' -> formats in BAKE_FORMATS order; None -> DEFAULT_BAKE_FORMATS."""
    if spec is None:
        return DEFAULT_BAKE_FORMATS
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [str(s).strip().lower() for s in items if str(s).strip()]
    if not names:
        raise RequestError(f"no format given; choose from {', '.join(BAKE_FORMATS)} (or 'all')")
    if "all" in names:
        return BAKE_FORMATS
    unknown = [n for n in names if n not in BAKE_FORMATS]
    if unknown:
        raise RequestError(f"unknown format {unknown[0]!r}; choose from {', '.join(BAKE_FORMATS)} (or 'all')")
    return tuple(f for f in BAKE_FORMATS if f in names)


def check_options(options: dict) -> dict:
    """The options with None dropped and each value checked against OPTIONS; RequestError on the first bad one."""
    out = {}
    for name, value in options.items():
        if value is None:
            continue
        if name not in OPTION:
            raise RequestError(f"unknown option {name!r}; known: {', '.join(OPTION)}")
        out[name] = _check(OPTION[name], value)
    if out.get("stride") == "auto" and "frames" not in out:
        raise RequestError("stride 'auto' needs frames=N")
    if "start" in out and "end" in out and out["end"] <= out["start"]:
        raise RequestError(f"end={out['end']} must be greater than start={out['start']} (end is exclusive)")
    return out


def sniff_input(path: str | Path) -> str:
    """'video', 'image' or 'folder' from the content (not the file name); RequestError otherwise."""
    path = Path(path)
    if path.is_dir():
        return "folder"
    if not path.is_file():
        raise RequestError(f"{path}: no such file or folder")
    found = sniff_file(path)
    if found is not None:
        return found[0]
    raise RequestError(f"{path}: not a video (mp4, mov, webm, avi) or an image (png, jpeg, webp, gif, bmp, tiff)")


def make_request(input_path: str | Path | None = None, prompt: str | None = None, *, example: bool = False,
                 **options) -> dict:
    """The job.json request of `stag4d generate INPUT|--prompt TEXT|--example` (the server builds the same
    shape); options are checked against OPTIONS."""
    options = check_options(options)
    if example:
        if input_path is not None or prompt is not None:
            raise RequestError("--example takes no input file or prompt")
        return {"kind": "example", "options": options}
    if (input_path is None) == (prompt is None):
        raise RequestError("give either an input file/folder or --prompt TEXT")
    if prompt is not None:
        if not prompt.strip():
            raise RequestError("--prompt is empty")
        return {"kind": "prompt", "prompt": prompt, "options": options}
    path = Path(input_path).expanduser().resolve()
    return {"kind": sniff_input(path), "input": str(path), "options": options}


def request_kind(request: dict) -> str:
    kind = request.get("kind")
    if kind not in KINDS:
        raise RequestError(f"unknown request kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind


def stage_options(request: dict, stage: str) -> dict:
    """The section of ``request``'s options that ``stage`` reads, under the stage's names, defaults filled in."""
    options = request.get("options") or {}
    section = {}
    for opt in OPTIONS:
        if stage in opt.stages:
            value = options.get(opt.name, opt.default)
            if value is not None:
                section[opt.stage_name or opt.name] = value
    return section


__all__ = ["OPTIONS", "OPTION", "Option", "RequestError", "KINDS", "INPUT_KINDS", "BAKE_FORMATS", "BAKE_OUTPUTS",
           "DEFAULT_BAKE_FORMATS", "check_options", "make_request", "parse_formats", "request_kind",
           "sniff_input", "stage_options"]
