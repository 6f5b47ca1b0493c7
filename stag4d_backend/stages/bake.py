"""The bake stage: a finished fit -> per-frame files for viewers and DCCs (``OUT_DIR/bake/``).

``bake(fit_dir, bake_dir, formats=("usd", "ply"), fps=None, frames=None, progress=None)`` evaluates the
deformation at every output frame (batched, see ``export.frames``) and writes, per requested format:

- ``usd``:     ``gaussians.usdc``, UsdGeomPoints + UsdVol ParticleField3DGaussianSplat, time-sampled;
- ``ply``:     ``ply/{k:04d}.ply``, per-frame 3DGS PLY, same count and order in every frame;
- ``gltf``:    ``gltf/{k:04d}.glb``, per-frame glTF with KHR_gaussian_splatting (``export.gltf_splats``), plus
  ``canonical.glb`` (the fit's canonical Gaussians);
- ``spz``:     ``spz/{k:04d}.spz``, per-frame Niantic SPZ version 4 (``export.spz``);
- ``mesh``:    ``mesh.usdc``, animated fixed-topology mesh (marching cubes of the canonical density);
- ``preview``: ``preview.mp4``, turntable video (``export.turntable.render_turntable``);
- always:      ``cameras.json`` (input view + six anchors, with Blender camera matrices; format name ``cameras``)
  and ``bake.json`` (what was baked: frames, fps, times, counts, files, timings; written last).

Frames: ``frames=None`` bakes the fit's F frames (output frame k = source frame k, t = k / F); ``frames=N`` bakes
N evenly spaced times t = k / N, k = 0..N-1 (retiming; same [0, 1) span). fps: ``fps`` if given; else the fit's fps
(``meta.json``), multiplied by N / F when retimed so that the clip keeps its duration; else 24 (``DEFAULT_FPS``,
reported in ``BakeResult.notes``).

Mesh: a closed surface is extracted once from the canonical Gaussians (``export.mesh_extract``) and its vertices
move per frame by the deformation field's position offset: ``mesh_motion="gaussians"`` (default) evaluates the
field at the Gaussians (where it was fitted) and blends the offsets of each vertex's 16 nearest Gaussians with their
kernel weights; ``mesh_motion="field"`` evaluates the field at the vertex itself. The field is defined everywhere,
but off the Gaussians it was never fitted: on a regressed creature the "field" mode crumples thin parts (arms)
while "gaussians" follows the splats (see docs/bake.md).

Bad input (not a finished fit, unknown format, fps <= 0, frames < 1) raises ``BakeError`` or ``FittedModelError``
(both ``ValueError``; see ``CLI_ERRORS``) before anything is written. Every file is written to a temporary name and
renamed into place (``ply/`` is swapped as a whole), so an interrupted bake leaves the previous outputs intact and
a rerun overwrites consistently. Outputs of formats that this run does not write are kept only if they were baked
from the same fit files, frames and fps; otherwise they are deleted as stale.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .. import __version__
from ..atomic import remove_stale_temps, write_json
from ..export.cameras_json import write_cameras_json
from ..fitted import CANONICAL, DEFORMATION, META, FittedModelError, load_fitted
from ..job import check_stop
from ..request import BAKE_FORMATS, BAKE_OUTPUTS, DEFAULT_BAKE_FORMATS, RequestError
from ..request import parse_formats as _parse_formats

ProgressFn = Callable[[dict], None]

FORMATS = BAKE_FORMATS                  # the names and files live in request.BAKE_OUTPUTS (one table)
DEFAULT_FORMATS = DEFAULT_BAKE_FORMATS  # what a job and `stag4d bake` write when no format is named
DEFAULT_FPS = 24.0
MAX_FRAMES = 100_000
MANIFEST = "bake.json"
MESH_MOTIONS = ("gaussians", "field")
OUTPUTS = BAKE_OUTPUTS
EXTRA_OUTPUTS = {"gltf": ("canonical.glb",)}  # further files of a format, beside OUTPUTS[format]
SEQUENCE_FORMATS = ("usd", "ply", "gltf", "spz")  # the formats written from the per-frame evaluation


class BakeError(ValueError):
    """A bake request that cannot run as asked (one line, names the fix)."""


CLI_ERRORS = (BakeError, FittedModelError)  # the CLI maps these to exit code 2


@dataclass
class BakeResult:
    bake_dir: Path
    formats: tuple[str, ...]           # formats written by this run (cameras always included)
    num_frames: int                    # output frames
    fps: float
    fps_source: str                    # "--fps" | "fit" | "fit, retimed" | "default"
    num_gaussians: int
    files: dict[str, list[Path]]       # format -> files written
    timings: dict[str, float]          # seconds per step ("evaluate", "usd", "ply", "mesh", "preview", ...)
    elapsed_s: float
    mesh: dict | None = None           # vertices, faces, level, voxel size, component stats
    notes: tuple[str, ...] = ()
    removed: tuple[Path, ...] = ()     # stale outputs deleted
    out_of_view: dict | None = None    # the reported stray-Gaussian check (_out_of_view_check)

    @property
    def paths(self) -> list[Path]:
        """Every file or folder written, flat (``files`` grouped by format)."""
        return [p for ps in self.files.values() for p in ps]

    def summary(self) -> str:
        parts = [f"{self.num_frames} frames at {self.fps:g} fps", f"{self.num_gaussians} Gaussians"]
        if self.out_of_view is not None:
            parts.append(f"{self.out_of_view['count']} outside every training view at some frame")
        return f"baked {', '.join(self.formats)} ({'; '.join(parts)}) in {self.elapsed_s:.1f} s -> {self.bake_dir}"


def parse_formats(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """"usd,ply" / ["usd", "ply"] / "all" -> validated, de-duplicated tuple in canonical order."""
    try:
        return _parse_formats(spec)
    except RequestError as exc:
        raise BakeError(str(exc)) from None


def resolve_fit_dir(path: str | Path) -> Path:
    """A fit output folder (``meta.json`` inside) or a job folder whose fit lives in ``model/``."""
    path = Path(path)
    if not path.exists():
        raise BakeError(f"{path}: no such directory")
    if not (path / META).is_file() and (path / "model").is_dir():
        return path / "model"
    return path


def _validate(fps, frames) -> tuple[float | None, int | None]:
    if fps is not None:
        try:
            fps = float(fps)
        except (TypeError, ValueError):
            raise BakeError(f"--fps {fps!r}: not a number") from None
        if not (math.isfinite(fps) and 0 < fps <= 1000):
            raise BakeError(f"--fps {fps:g}: must be > 0 and <= 1000")
    if frames is not None:
        try:
            ok = not isinstance(frames, bool) and int(frames) == float(frames)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise BakeError(f"--frames {frames!r}: must be a whole number")
        frames = int(frames)
        if not 1 <= frames <= MAX_FRAMES:
            raise BakeError(f"--frames {frames}: must be between 1 and {MAX_FRAMES}")
    return fps, frames


def _check_settings(mesh_resolution, mesh_motion, threads) -> None:
    if not 16 <= int(mesh_resolution) <= 1024:
        raise BakeError(f"mesh resolution {mesh_resolution}: must be between 16 and 1024")
    if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
        raise BakeError(f"--threads {threads}: must be at least 1")
    if mesh_motion not in MESH_MOTIONS:
        raise BakeError(f"mesh motion {mesh_motion!r}: choose {' or '.join(MESH_MOTIONS)}")


def _fingerprint(fit_dir: Path, num_frames: int, fps: float) -> dict:
    files = {}
    for name in (CANONICAL, DEFORMATION):
        st = (fit_dir / name).stat()
        files[name] = [st.st_size, st.st_mtime_ns]
    return {"fit_files": files, "num_frames": num_frames, "fps": fps}


def _read_manifest(bake_dir: Path) -> dict:
    import json

    try:
        data = json.loads((bake_dir / MANIFEST).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def _torch_threads(n: int | None):
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def bake(fit_dir: str | Path, bake_dir: str | Path, formats: str | Iterable[str] = DEFAULT_FORMATS,
         fps: float | None = None, frames: int | None = None, progress: ProgressFn | None = None, *,
         mesh_resolution: int = 128, mesh_motion: str = "gaussians", preview_size: int = 256,
         threads: int | None = None) -> BakeResult:
    """Bake the fit in ``fit_dir`` into ``bake_dir`` (see the module docstring)."""
    t_start = time.perf_counter()
    formats = parse_formats(formats)
    fps_arg, frames = _validate(fps, frames)
    _check_settings(mesh_resolution, mesh_motion, threads)
    fit_dir = resolve_fit_dir(fit_dir)
    bake_dir = Path(bake_dir)
    try:
        animated, meta = load_fitted(fit_dir)
    except FittedModelError:
        raise
    except Exception as exc:  # corrupt files raise many types (OSError, SafetensorError, KeyError, ...)
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BakeError(f"{fit_dir}: cannot read the fitted model ({msg}); re-run the fit") from None
    n_gauss = animated.model.num_points
    if n_gauss == 0:
        raise BakeError(f"{fit_dir}: the fitted model has no Gaussians; re-run the fit")

    src_frames = animated.num_frames
    T = frames or src_frames
    frame_values = np.arange(T, dtype=np.float64) * (src_frames / T)
    notes: list[str] = []
    meta_fps = meta.get("fps")
    if fps_arg is not None:
        out_fps, fps_source = fps_arg, "--fps"
    elif meta_fps:
        out_fps = float(meta_fps) * (T / src_frames)
        fps_source = "fit" if T == src_frames else "fit, retimed"
    else:
        out_fps, fps_source = DEFAULT_FPS, "default"
        notes.append(f"the fit records no fps; using {DEFAULT_FPS:g} (pass --fps to choose)")

    total_steps = 1 + len(formats) + (0 if "cameras" in formats else 1)
    state = {"step": 0}

    def emit(message: str, files=None, advance: bool = True):
        if advance:
            state["step"] += 1
        if progress is not None:
            ev = {"stage": "bake", "step": state["step"], "total": total_steps, "message": message}
            if files:
                ev["files"] = [str(f) for f in files]
            progress(ev)

    bake_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(bake_dir)
    custom = {"stag4d_version": __version__, "source_num_frames": src_frames, "fps_source": fps_source,
              "time": "output frame k (time code k) is t = k / num_frames",
              "up_axis": "Y", "blender": "p_blender = (x, -z, y)"}
    timings: dict[str, float] = {}
    files: dict[str, list[Path]] = {}
    mesh_info = None
    with _torch_threads(threads):
        # The mesh first: its extraction is the step most likely to refuse (no opaque Gaussians).
        if "mesh" in formats:
            t0 = time.perf_counter()
            mesh_info, path = _bake_mesh(animated, frame_values, bake_dir / OUTPUTS["mesh"], out_fps, custom,
                                         mesh_resolution, mesh_motion)
            timings["mesh"] = time.perf_counter() - t0
            files["mesh"] = [path]
            emit(f"wrote mesh.usdc ({mesh_info['vertices']} vertices)", [path])
        sampled = None
        if any(f in formats for f in SEQUENCE_FORMATS):
            from ..export.frames import sample_frames

            t0 = time.perf_counter()
            sampled = sample_frames(animated, frame_values,
                                    on_chunk=lambda e, n: emit(f"evaluating frames {e}/{n}", advance=False))
            timings["evaluate"] = time.perf_counter() - t0
        emit(f"evaluated {T} frames")

        _write_sequence_formats(formats, sampled, animated, bake_dir, out_fps, custom, emit, timings, files)
        sampled = None
        if "preview" in formats:
            from ..export.turntable import render_turntable

            t0 = time.perf_counter()
            path = render_turntable(fit_dir, bake_dir / OUTPUTS["preview"], size=int(preview_size), fps=out_fps)
            timings["preview"] = time.perf_counter() - t0
            files["preview"] = [path]
            emit("wrote preview.mp4", [path])
        size = int(meta.get("source_size") or (meta.get("config") or {}).get("ref_resolution") or 512)
        path = write_cameras_json(bake_dir / OUTPUTS["cameras"], input_size=size,
                                  input_elevation=float(meta.get("input_elevation", 0.0) or 0.0))
        files["cameras"] = [path]
        emit("wrote cameras.json", [path])

        out_of_view = _out_of_view_check(animated, frame_values, meta)
    written, removed = _write_manifest(bake_dir, fit_dir, files, frame_values, src_frames, out_fps, fps_source,
                                       animated, mesh_info, timings, notes, out_of_view)
    elapsed = time.perf_counter() - t_start
    return BakeResult(bake_dir, written, T, out_fps, fps_source, n_gauss, files, timings, elapsed, mesh_info,
                      tuple(notes), tuple(removed), out_of_view)


def _out_of_view_check(animated, frame_values, meta: dict) -> dict:
    """How many visible Gaussians (opacity > 0.05) are outside the image of every training view (the front and
    the six anchor poses) at some baked frame: stray splats no input constrains. Reported in bake.json and the
    CLI; nothing is moved or removed."""
    from ..export.frames import deform_points
    from ..fitting.in_view import VISIBLE_OPACITY, TrainingViews, count_out_of_view

    cfg = meta.get("config") or {}
    views = TrainingViews.for_fit(float(cfg.get("radius", 2.0)), float(cfg.get("fovy", 49.1)),
                                  float(cfg.get("input_elevation", 0.0)), float(cfg.get("anchor_radius", 0.0)))
    xyz = animated.model.params["xyz"].detach().float().cpu().numpy()
    times = np.asarray(frame_values, dtype=np.float64) / animated.num_frames
    positions = torch.from_numpy(deform_points(animated.deformation, xyz, times))
    opacity = torch.sigmoid(animated.model.params["opacity"].detach().float().cpu())
    return dict(count_out_of_view(views, positions, opacity),
                rule=f"opacity > {VISIBLE_OPACITY} and outside the image of every training view at some frame")


def _bake_mesh(animated, frame_values, path: Path, fps: float, custom: dict, resolution: int, motion: str):
    from ..export.frames import deform_points
    from ..export.mesh_extract import MeshExtractionError, extract_mesh
    from ..export.usd_mesh import write_mesh_usd

    m = animated.model
    with torch.no_grad():
        means = m.params["xyz"].detach().float().cpu().numpy()
        scales = m.scales.detach().float().cpu().numpy()
        quats = m.rotations.detach().float().cpu().numpy()
        opac = m.opacities.detach().float().cpu().numpy().reshape(-1)
        colors = m.colors(degree=0).detach().float().cpu().numpy()  # view-independent (DC) colour
    try:
        mesh = extract_mesh(means, scales, quats, opac, colors, resolution=resolution)
    except MeshExtractionError as exc:
        raise BakeError(f"mesh: {exc}") from None
    times = np.asarray(frame_values, dtype=np.float64) / animated.num_frames
    if motion == "field":  # the field evaluated at the vertices themselves
        points = deform_points(animated.deformation, mesh.vertices, times)
    else:  # the field evaluated at the Gaussians (where it was fitted), blended onto the vertices
        offsets = deform_points(animated.deformation, means, times) - means[None]
        points = mesh.vertices[None] + mesh.skin(offsets)
    write_mesh_usd(path, mesh.faces, points, mesh.colors, fps, dict(custom, mesh_level=mesh.level,
                                                                    voxel_size=mesh.voxel_size, mesh_motion=motion))
    info = {"vertices": int(mesh.vertices.shape[0]), "faces": int(mesh.faces.shape[0]), "level": mesh.level,
            "voxel_size": mesh.voxel_size, "grid_shape": list(mesh.grid_shape), "resolution": int(resolution),
            "motion": motion}
    info.update(mesh.stats)
    return info, path


def _write_sequence_formats(formats, sampled, animated, bake_dir: Path, out_fps: float, custom: dict, emit,
                            timings: dict, files: dict) -> None:
    """The formats written from the per-frame evaluation (SEQUENCE_FORMATS), each timed and announced."""
    if sampled is None:  # none of them was asked for
        return
    T = sampled.num_frames
    if "usd" in formats:
        from ..export.usd_points import write_gaussians_usd

        t0 = time.perf_counter()
        path = write_gaussians_usd(sampled, bake_dir / OUTPUTS["usd"], out_fps, custom)
        timings["usd"] = time.perf_counter() - t0
        files["usd"] = [path]
        emit("wrote gaussians.usdc", [path])
    if "ply" in formats:
        from ..export.ply_sequence import write_ply_sequence

        t0 = time.perf_counter()
        files["ply"] = write_ply_sequence(sampled, bake_dir / OUTPUTS["ply"])
        timings["ply"] = time.perf_counter() - t0
        emit(f"wrote {T} PLY files", [bake_dir / OUTPUTS["ply"]])
    if "gltf" in formats:
        from ..export.gltf_splats import write_canonical_glb, write_gltf_sequence

        t0 = time.perf_counter()
        files["gltf"] = write_gltf_sequence(sampled, bake_dir / OUTPUTS["gltf"], out_fps, custom)
        files["gltf"].append(write_canonical_glb(animated.model.params, bake_dir / EXTRA_OUTPUTS["gltf"][0],
                                                 dict(custom, fps=out_fps)))
        timings["gltf"] = time.perf_counter() - t0
        emit(f"wrote {T} glTF files and canonical.glb", [bake_dir / OUTPUTS["gltf"]])
    if "spz" in formats:
        from ..export.spz import write_spz_sequence

        t0 = time.perf_counter()
        files["spz"] = write_spz_sequence(sampled, bake_dir / OUTPUTS["spz"])
        timings["spz"] = time.perf_counter() - t0
        emit(f"wrote {T} SPZ files", [bake_dir / OUTPUTS["spz"]])


def _write_manifest(bake_dir: Path, fit_dir: Path, files: dict, frame_values, src_frames: int, out_fps: float,
                    fps_source: str, animated, mesh_info, timings: dict, notes: list,
                    out_of_view: dict | None = None) -> tuple[tuple, list]:
    """bake.json: this run's formats, plus earlier outputs that still match this fit / frames / fps (stale ones
    are removed and noted). Returns the formats written now and the paths removed."""
    T = len(frame_values)
    n_gauss = animated.model.num_points
    written = tuple(f for f in FORMATS if f in files)
    fingerprint = _fingerprint(fit_dir, T, out_fps)
    old = _read_manifest(bake_dir)
    entries = {}
    removed = []
    for fmt, entry in (old.get("formats") or {}).items():
        if fmt in files or fmt not in OUTPUTS:
            continue
        target = bake_dir / OUTPUTS[fmt]
        if isinstance(entry, dict) and entry.get("fingerprint") == fingerprint and target.exists():
            entries[fmt] = entry
            continue
        for stale in (target, *(bake_dir / name for name in EXTRA_OUTPUTS.get(fmt, ()))):
            if stale.exists():
                _remove(stale)
                removed.append(stale)
                notes.append(f"removed stale {stale.name} (baked from another fit, frame count or fps)")
    for fmt in written:
        entries[fmt] = {"fingerprint": fingerprint, "files": [str(p.relative_to(bake_dir)) for p in files[fmt]]}
    write_json(bake_dir / MANIFEST, {
        "format_version": 1, "stag4d_version": __version__, "fit_dir": str(fit_dir.resolve()),
        "num_frames": T, "fps": out_fps, "fps_source": fps_source, "source_num_frames": src_frames,
        "frame_values": [float(v) for v in frame_values], "times": [float(v / src_frames) for v in frame_values],
        "num_gaussians": n_gauss, "sh_degree": int(animated.model.sh_degree), "up_axis": "Y",
        "meters_per_unit": 1.0, "mesh": mesh_info, "out_of_view": out_of_view,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "formats": entries,
    })
    return written, removed


def bake_job(out_dir: str | Path, formats: str | Iterable[str] = DEFAULT_FORMATS, fps: float | None = None,
             frames: int | None = None, progress: ProgressFn | None = None, **kw) -> BakeResult:
    """``stag4d bake OUT_DIR``: bake the fit in OUT_DIR (or OUT_DIR/model) into OUT_DIR/bake."""
    out_dir = Path(out_dir)
    return bake(resolve_fit_dir(out_dir), out_dir / "bake", formats, fps=fps, frames=frames, progress=progress,
                **kw)


# -- the stage contract (pipeline) --------------------------------------------------------------------------

def is_done(job, options: dict) -> bool:
    return (job.bake_dir / MANIFEST).is_file()


def run(job, options: dict, progress: ProgressFn | None = None, should_stop=None) -> dict:
    """Bake the job's fit into JOB/bake; options: formats, fps (request.OPTIONS)."""
    def on_progress(stats: dict) -> None:
        if progress is not None:
            progress(stats)
        check_stop(should_stop, "stopped during bake")

    res = bake(job.model_dir, job.bake_dir, formats=options.get("formats") or DEFAULT_FORMATS,
               fps=options.get("fps"), progress=on_progress)
    return {"files": [p.relative_to(job.path).as_posix() if p.is_relative_to(job.path) else str(p)
                      for p in res.paths]}


__all__ = ["run", "is_done", "bake", "bake_job", "BakeResult", "BakeError", "CLI_ERRORS", "FORMATS", "DEFAULT_FORMATS",
           "DEFAULT_FPS", "parse_formats", "resolve_fit_dir"]
