"""Request and response shapes of the HTTP API (pydantic; the OpenAPI document is generated from them).

The server process never imports torch: the preset and format names come from the torch-free ``request`` module
(tests hold them equal to ``config.PRESETS`` and ``stages.bake.FORMATS``), and a test holds ``JobOptions`` equal to
the one table of request options, ``request.OPTIONS``."""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from .. import job, request

PRESETS = request.PRESETS
BAKE_FORMATS = request.BAKE_FORMATS
STATES = tuple(s for s in job.STATES if s != "created")  # a job is queued the moment the server creates it
STAGES = ("example", "video", "preprocess", "anchors", "fit", "bake")
INT31 = 2**31 - 1


_Format = Literal[BAKE_FORMATS + ("all",)]
_FORMAT_NAMES = "|".join(BAKE_FORMATS + ("all",))
_FORMATS_RE = rf"^ *({_FORMAT_NAMES}) *(, *({_FORMAT_NAMES}) *)*$"


class JobOptions(BaseModel):
    """Options of a job; all optional. Unknown keys are refused (422) so that a typo is not silently ignored, and
    types are strict: ``true`` is no number and ``"10"`` no integer (JSON numbers only)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    preset: Literal["paper", "standard", "preview", "tiny"] | None = Field(
        None, description="fit preset (default: standard on a CUDA device, preview on a CPU; example: preview)")
    seed: int | None = Field(None, ge=0, le=INT31)
    iters: int | None = Field(None, ge=1, le=1_000_000, description="fit steps (rescales the preset's schedules)")
    resolution: int | None = Field(None, ge=16, le=2048, description="cap on every fit render size")
    guidance: Literal["anchors", "sds", "sds+anchors"] | None = None
    checkpoint_every: int | None = Field(None, ge=1, le=1_000_000, description="fit steps between checkpoints")
    preview_every: int | None = Field(None, ge=0, le=1_000_000,
                                      description="fit steps between live previews (default: the checkpoint "
                                                  "interval; 0 = off)")
    # Which input frames (video / image sequence): range(start, end, stride), then the first `frames` of those.
    frames: int | None = Field(None, ge=1, le=10_000, description="max frames kept")
    stride: int | Literal["auto"] | None = Field(None, description="source frames between kept ones, or 'auto'")
    start: int | None = Field(None, ge=0, le=10_000_000, description="first source frame")
    end: int | None = Field(None, ge=1, le=10_000_000, description="source frame where to stop (exclusive)")
    fps: float | None = Field(None, gt=0, le=1000, description="playback rate (default: the input's)")
    size: int | None = Field(None, ge=16, le=4096, description="side of the preprocessed square frames")
    fraction: float | None = Field(None, ge=0.05, le=1.0, description="object's share of the frame side")
    matting: Literal["auto", "model", "none", "white-key", "color-key"] | None = None
    fusion: Literal["lockstep", "stored", "off"] | None = Field(None, description="Zero123++ temporal fusion")
    anchor_steps: int | None = Field(None, ge=1, le=1000, description="Zero123++ denoising steps (default 75)")
    anchor_tile: int | None = Field(None, ge=8, le=2048,
                                    description="Zero123++ output tile edge in px (default 320: the official grid)")
    video_frames: int | None = Field(None, ge=2, le=128,
                                     description="image/prompt input: frames the video model generates")
    formats: Annotated[str, Field(pattern=_FORMATS_RE)] | Annotated[list[_Format], Field(min_length=1)] | None = \
        Field(None, description="bake formats: a comma list (or list) of usd, ply, gltf, spz, mesh, preview, "
                    "cameras, or all")
    example_frames: int | None = Field(None, ge=1, le=64, description="kind example only")
    example_size: int | None = Field(None, ge=16, le=1024, description="kind example only")
    example_gaussians: int | None = Field(None, ge=10, le=200_000, description="kind example only")

    @field_validator("stride")
    @classmethod
    def _stride(cls, v):
        if isinstance(v, int) and not 1 <= v <= 100_000:
            raise ValueError("stride must be between 1 and 100000, or 'auto'")
        return v

    @field_validator("formats", mode="before")
    @classmethod
    def _formats_message(cls, v):
        """A readable message instead of the union's pattern errors."""
        if isinstance(v, (str, list)):
            items = v.split(",") if isinstance(v, str) else v
            names = [s.strip() if isinstance(s, str) else s for s in items]
            bad = [n for n in names if n not in BAKE_FORMATS + ("all",)]
            if bad or not names:
                what = f"unknown format {bad[0]!r}" if bad else "no format given"
                raise ValueError(f"{what}; choose from {', '.join(BAKE_FORMATS)} or 'all'")
        return v

    @field_validator("formats")
    @classmethod
    def _formats(cls, v):
        """One canonical spelling: "usd,ply"."""
        if v is None:
            return v
        items = v.split(",") if isinstance(v, str) else list(v)
        return ",".join(dict.fromkeys(s.strip() for s in items))

    @model_validator(mode="after")
    def _range(self):
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError(f"end={self.end} must be greater than start={self.start} (end is exclusive)")
        if self.stride == "auto" and self.frames is None:
            raise ValueError("stride 'auto' needs frames=N")
        return self


# An absolute path of the server's OS, no NUL.
_ABS_PATH = r"^[A-Za-z]:[\\/][^\x00]*$" if os.name == "nt" else r"^/[^\x00]*$"
_TEXT = r"^[^\x00]*[^\x00\s][^\x00]*$"  # not blank, no NUL (\S alone would match a NUL)


class ExampleJob(BaseModel):
    """The bundled example (no input, no weights): runs anywhere, for smoke tests."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["example"]
    options: JobOptions = Field(default_factory=JobOptions)


class PromptJob(BaseModel):
    """Text -> image -> video -> 4D (needs the generative models)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["prompt"]
    prompt: str = Field(min_length=1, max_length=2000, pattern=_TEXT)
    options: JobOptions = Field(default_factory=JobOptions)


class PathJob(BaseModel):
    """A video, image or image folder already on the server (needs ``--allow-server-paths``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["path"]
    path: str = Field(min_length=1, max_length=4096, pattern=_ABS_PATH, description="an absolute path on the server")

    @field_validator("path", mode="before")
    @classmethod
    def _absolute(cls, v):
        if isinstance(v, str) and not re.match(_ABS_PATH, v):
            raise ValueError("give an absolute path on the server (a video, an image or a folder of images)")
        return v
    options: JobOptions = Field(default_factory=JobOptions)


# JSON body of ``POST /v1/jobs``; uploads use multipart instead (field ``file`` + field ``options``).
JobCreate = Annotated[Union[ExampleJob, PromptJob, PathJob], Field(discriminator="kind")]
JOB_CREATE = TypeAdapter(JobCreate)


class Progress(BaseModel):
    model_config = ConfigDict(extra="allow")

    stage: str | None = None
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None


class JobResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    usd: str | None = None
    mesh: str | None = None
    ply_dir: str | None = None
    fps: float | None = None
    frames: int | None = None
    preview: str | None = None


class Licence(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    licence: str
    licence_note: str | None = None


class JobOut(BaseModel):
    """The job object."""

    id: str
    state: Literal["queued", "running", "finished", "failed", "cancelled", "interrupted"]
    kind: str
    request: dict[str, Any]
    created: float
    updated: float | None = None
    stage: str | None = None
    progress: Progress | None = None
    error: str | None = None
    last_event: int = Field(description="number of the newest event (-1: none yet)")
    result: JobResult | None = None
    licences: list[Licence] = Field(default_factory=list)
    cancel_requested: bool = False
    device: str | None = Field(None, description="where it runs / ran")
    queue_position: int | None = Field(None, description="0 = next to start; null when not queued")


class JobList(BaseModel):
    jobs: list[JobOut]


class FileEntry(BaseModel):
    name: str
    size: int
    mtime: float


class FileList(BaseModel):
    files: list[FileEntry]


class Event(BaseModel):
    model_config = ConfigDict(extra="allow")

    n: int
    time: float
    kind: str


class EventPage(BaseModel):
    events: list[Event]
    next: int = Field(description="the `since` to ask for next")
    state: str = Field(description="the job's state now")


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    title: str
    present: bool
    size_gb: float | None = None
    licence: str | None = None
    licence_note: str | None = None


class Info(BaseModel):
    version: str
    api: int
    device: str
    devices: list[str]
    presets: list[str]
    models: list[ModelInfo]
    jobs_per_device: int
    max_upload_bytes: int
    allow_server_paths: bool
    formats: list[str]


class Health(BaseModel):
    status: str
    api: int


class ErrorOut(BaseModel):
    detail: str
