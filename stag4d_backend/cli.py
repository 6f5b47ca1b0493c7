"""The `stag4d` command line. The only place (with server/) that prints or parses argv."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .request import BAKE_FORMATS, BAKE_OUTPUTS, DEFAULT_BAKE_FORMATS

EXIT_USAGE = 2          # bad input: a clear one-line message, nothing half-written
EXIT_MISSING_WEIGHTS = 4  # a stage needs model weights that are not installed (the message says which)
EXIT_BUSY = 75          # another stag4d process is writing the same folder (EX_TEMPFAIL: try again later)



def _add_request_flags(parser: argparse.ArgumentParser) -> None:
    """`stag4d generate`'s request flags, from the one table of request options (request.OPTIONS)."""
    from .request import OPTIONS

    for opt in OPTIONS:
        if opt.cli:
            kind = {int: int, float: float}.get(opt.type)
            # An unknown --preset gets config's message (exit 2) rather than argparse's, as it always did.
            choices = opt.choices if opt.name != "preset" else None
            parser.add_argument(opt.flag, dest=opt.name, type=kind, choices=choices, help=opt.help)


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stag4d",
        description="STAG4D for Blender: turn a video, an image or a prompt into animated 3D Gaussians.",
    )
    p.add_argument("--version", action="version", version=f"stag4d {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="full pipeline from a video/image file or --prompt TEXT into a job directory")
    g.add_argument("input", nargs="?", help="video or image file")
    g.add_argument("--prompt", help="text prompt instead of an input file")
    g.add_argument("--example", action="store_true", help="run the bundled example (CPU, minutes)")
    g.add_argument("-o", "--output", required=True, help="job directory")
    _add_request_flags(g)

    f = sub.add_parser("fit", help="fit 4D Gaussians to a STAG4D-layout data directory")
    f.add_argument("data_dir")
    f.add_argument("-o", "--output", required=True)
    f.add_argument("--preset", default=None, help="paper, standard, preview or tiny (default: standard on a CUDA "
                   "GPU, preview on a CPU)")
    f.add_argument("--iters", type=int)
    f.add_argument("--resolution", type=int)
    f.add_argument("--device")
    f.add_argument("--seed", type=int)
    f.add_argument("--guidance", choices=["anchors", "sds", "sds+anchors"],
                   help="default: the preset's (sds needs Zero123-XL weights; without them 'anchors' is used)")
    f.add_argument("--frames", help="frame selection, e.g. 0-15 or 0,2,4 (default: all frames in ref/)")
    f.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    f.add_argument("--quiet", action="store_true", help="no progress bar")

    r = sub.add_parser("render", help="render a fitted model from the cameras in a JSON file")
    r.add_argument("out_dir")
    r.add_argument("--cameras", help="JSON list of {index, frame, elevation, azimuth, radius, fovy, size}")
    r.add_argument("-o", "--output", required=True)
    r.add_argument("--turntable", metavar="MP4", help="also write a turntable video to this path")
    r.add_argument("--views", metavar="VIEWS.json", help="Blender cameras (4x4 in the splat object's space + K, "
                   "width, height, frame): writes rgba_NNNN.png + 16-bit depth_NNNN.png (the add-on's exact path)")
    r.add_argument("--stop-depth", action="store_true", help="with --views: also stop_NNNN.png, the 16-bit depth "
                   "past which nothing shows (the add-on's Cycles ray stop)")
    r.add_argument("--stop-transmittance", type=float, default=1e-4, metavar="T",
                   help="with --stop-depth: a pixel counts as stopped once its transmittance is T or less (default "
                   "1e-4, the rasteriser's own: exact; larger stops earlier, what lies behind adds at most T of "
                   "its colour)")

    b = sub.add_parser("bake", help="bake per-frame Gaussians to USD / PLY / glTF / SPZ / mesh / preview "
                       "(OUT_DIR/bake)")
    b.add_argument("out_dir", help="a fit output folder, or a job folder with model/")
    b.add_argument("--formats", help="comma list of " + ", ".join(BAKE_FORMATS) + ", or all (default: "
                   + ",".join(DEFAULT_BAKE_FORMATS) + ", as a job)")
    b.add_argument("--fps", type=float, help="playback rate (default: the input's, else 24)")
    b.add_argument("--frames", type=int, help="resample the motion at N evenly spaced times")
    b.add_argument("--mesh-resolution", type=int, default=128)
    b.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("serve", help="run the local HTTP backend for the Blender add-on")
    from .server.cli import add_serve_arguments

    add_serve_arguments(s)

    from .submit import add_submit_arguments

    add_submit_arguments(sub.add_parser("submit", help="send many inputs (and seeds) to a `stag4d serve`, show a "
                                                       "progress bar per job, download the bakes"))

    m = sub.add_parser("models", help="list or download the diffusion models")
    from .models.cli import add_models_arguments

    add_models_arguments(m)

    sub.add_parser("doctor", help="report device, memory, disk, CPU kernel, installed weights")
    return p


class _Busy(Exception):
    pass


def _lock_folder(command: str, folder) -> "FolderLock | None":
    """Hold ``folder``'s writer lock (folder_lock; the folder is created), or print who holds it and raise _Busy.
    None where the path is not a folder (the command's own check says so)."""
    from pathlib import Path

    from .folder_lock import FolderBusy, FolderLock

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return None
    try:
        return FolderLock(folder).acquire()
    except FolderBusy as exc:
        print(f"stag4d {command}: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"stag4d {command}: cannot lock {folder} ({exc.strerror or exc})", file=sys.stderr)
    raise _Busy


def _release(lock) -> None:
    if lock is not None:
        lock.release()


def _doctor() -> int:
    from .doctor import collect_report

    for key, value in collect_report().items():
        print(f"{key:>22}: {value}")
    return 0


def _parse_frames(text: str | None) -> list[int] | None:
    if not text:
        return None
    frames: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            frames.extend(range(int(a), int(b) + 1))
        else:
            frames.append(int(part))
    return frames


def _fit(args) -> int:
    lock = _lock_folder("fit", args.output)  # first: a second writer is refused before the slow imports
    try:
        return _fit_locked(args)
    finally:
        _release(lock)


def _fit_locked(args) -> int:
    from .config import config_from_options
    from .dataset import DataError
    from .device import DeviceError
    from .stages.fit import FitError, fit
    from .progress import FitProgressBar

    try:
        cfg = config_from_options({"preset": args.preset, "iters": args.iters, "resolution": args.resolution,
                                   "device": args.device, "seed": args.seed, "guidance": args.guidance,
                                   "num_threads": args.threads})
        frames = _parse_frames(args.frames)
    except ValueError as exc:
        print(f"stag4d fit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from .models.registry import MissingWeightsError, ModelLoadError
    from .stages.fit import load_sds_if_present

    try:
        # Zero123-XL when the guidance uses SDS and the weights are installed; a preset's default falls back to
        # the anchor views without them (the fit says so), an explicit --guidance sds stops here.
        sds = load_sds_if_present(cfg, args.guidance is not None)
    except (MissingWeightsError, ModelLoadError) as exc:
        print(f"stag4d fit: {exc}", file=sys.stderr)
        return EXIT_MISSING_WEIGHTS
    bar = None if args.quiet else FitProgressBar(cfg.iters)
    try:
        outcome = fit(args.data_dir, args.output, cfg, sds=sds, guidance_explicit=args.guidance is not None,
                      frames=frames, progress=bar.update if bar else None)
    except (DataError, DeviceError, FitError) as exc:
        print(f"stag4d fit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if bar:
            bar.close()
    for note in outcome.notes:
        print(f"note: {note}", file=sys.stderr)
    if outcome.status == "already_finished":
        print(f"{outcome.out_dir}: already fitted ({outcome.iterations} iterations); nothing to do")
    else:
        resumed = f", resumed from step {outcome.resumed_from}" if outcome.resumed_from else ""
        print(f"fitted {outcome.num_gaussians} Gaussians in {outcome.iterations} steps "
              f"({outcome.elapsed_s:.0f} s{resumed}) -> {outcome.out_dir}")
    return 0


def _render(args) -> int:
    from .fitted import FittedModelError
    from .export.turntable import CamerasError, render_cameras, render_turntable

    if not args.cameras and not args.turntable and not args.views:
        print("stag4d render: give --cameras CAMERAS.json, --views VIEWS.json and/or --turntable OUT.mp4",
              file=sys.stderr)
        return EXIT_USAGE
    if not 1e-4 <= args.stop_transmittance < 1.0:
        print(f"stag4d render: --stop-transmittance must be in [1e-4, 1) (got {args.stop_transmittance:g})",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.views:
            from .export.camera_views import render_views

            written = render_views(args.out_dir, args.views, args.output,
                                   on_view=lambda i, p: print(f"view {i} {p}", flush=True),
                                   stop_depth=args.stop_depth, stop_transmittance=args.stop_transmittance)
            print(f"wrote {len(written)} views to {args.output}")
        if args.cameras:
            written = render_cameras(args.out_dir, args.cameras, args.output)
            print(f"wrote {len(written)} images to {args.output}")
        if args.turntable:
            print(f"wrote {render_turntable(args.out_dir, args.turntable)}")
    except (CamerasError, FittedModelError) as exc:
        print(f"stag4d render: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _bake(args) -> int:
    lock = _lock_folder("bake", args.out_dir) if os.path.isdir(args.out_dir) else None  # absent: bake says so
    try:
        return _bake_locked(args)
    finally:
        _release(lock)


def _bake_locked(args) -> int:
    from .progress import StageProgressBars
    from .stages.bake import CLI_ERRORS, bake_job

    bars = None if args.quiet else StageProgressBars()
    try:
        res = bake_job(args.out_dir, formats=args.formats or DEFAULT_BAKE_FORMATS, fps=args.fps, frames=args.frames,
                       mesh_resolution=args.mesh_resolution, threads=args.threads or None,
                       progress=(lambda ev: bars.update("bake", ev)) if bars else None)
    except CLI_ERRORS as exc:
        print(f"stag4d bake: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if bars:
            bars.close()
    for note in res.notes:
        print(f"note: {note}", file=sys.stderr)
    print(res.summary())
    plys = [p for p in res.paths if p.suffix == ".ply"]
    for p in res.paths:
        if p.suffix != ".ply":
            print(f"  {p}")
    if plys:
        print(f"  {plys[0].parent}/ ({len(plys)} per-frame PLY files)")
    return 0


def _print_summary(summary: dict) -> None:
    """One line per stage: done (and how long) or skipped, plus the stage's note (e.g. how it matted)."""
    for stage, result in summary.items():
        if not isinstance(result, dict):
            print(f"  {stage}: {result}")
            continue
        took = f" ({result['elapsed_s']:.0f} s)" if "elapsed_s" in result else ""
        note = f"; {result['note']}" if result.get("note") else ""
        print(f"  {stage}: done{took}{note}")


EXAMPLE_NOTE = """
Wrote the example job to {job}
  frames/   the input in the STAG4D layout (ref/ front views, zero123/ the six anchor views per frame)
  model/    the fitted 4D Gaussians (canonical.ply, deformation.safetensors, meta.json)
  bake/     gaussians.usdc (animated points + splats), ply/ (per-frame 3DGS PLY), mesh.usdc, preview.mp4,
            cameras.json
Open it in Blender: File > Import > Universal Scene Description, choose {usd}
  (or {mesh} for the animated mesh), then press play."""


def _generate(args) -> int:
    """`stag4d generate INPUT|--prompt TEXT|--example -o JOB_DIR`: the request's stages through the orchestrator
    (as the server's worker runs them); without weights it does every stage it can, then stops."""
    from .pipeline import stages_for
    from .request import OPTIONS, make_request

    if not args.example and args.input is None and args.prompt is None:
        print("stag4d generate: give a video/image file or folder, --prompt TEXT, or --example", file=sys.stderr)
        return EXIT_USAGE
    if args.input is not None and args.prompt is not None:
        print("stag4d generate: give either an input file or --prompt, not both", file=sys.stderr)
        return EXIT_USAGE
    try:
        request = make_request(args.input, args.prompt, example=args.example,
                               **{o.name: getattr(args, o.name) for o in OPTIONS if o.cli})
        stages_for(request)  # checks the options before anything is written
    except ValueError as exc:  # RequestError, or e.g. an unknown --preset
        print(f"stag4d generate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    lock = _lock_folder("generate", args.output)
    try:
        return _generate_locked(args, request)
    finally:
        _release(lock)


def _generate_locked(args, request: dict) -> int:
    from pathlib import Path

    from .job import Job
    from .pipeline import run_job, stage_summary
    from .progress import StageProgressBars
    from .request import RequestError

    try:
        job = Job(args.output)
        if (job.path / "job.json").is_file() and job.read().get("request") != request:
            raise RequestError(f"{job.path} holds another job; choose a new folder (or delete it to start over)")
        job.create(request)
    except ValueError as exc:
        print(f"stag4d generate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    since = len(job.events())
    bars = StageProgressBars()
    try:
        state = run_job(job.path, bars.update)
    finally:
        bars.close()
    data = job.read()
    if state != "finished":
        kind = data.get("error_kind")
        if kind == "missing_weights":
            print(f"stag4d generate: stopped: {data.get('error')}", file=sys.stderr)
            print(f"Everything before this stage is saved in {job.path}; run the same command again to go on.",
                  file=sys.stderr)
            return EXIT_MISSING_WEIGHTS
        if kind == "internal" and data.get("traceback"):
            print(data["traceback"], file=sys.stderr)
        print(f"stag4d generate: {data.get('error') or state}", file=sys.stderr)
        return EXIT_USAGE if kind == "request" else 1
    _print_summary(stage_summary(job, since))
    bake = Path(job.path).resolve() / "bake"
    if args.example:
        print(EXAMPLE_NOTE.format(job=Path(job.path).resolve(), usd=bake / BAKE_OUTPUTS["usd"],
                                  mesh=bake / BAKE_OUTPUTS["mesh"]))
    else:
        print(f"Wrote {job.path}; open {bake / BAKE_OUTPUTS['usd']} in Blender (File > Import > USD) or use the "
              f"add-on.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "doctor":
        return _doctor()
    writers = {"fit": _fit, "generate": _generate, "bake": _bake}
    if args.command in writers:
        try:
            return writers[args.command](args)
        except _Busy:
            return EXIT_BUSY
    if args.command == "render":
        return _render(args)
    if args.command == "serve":
        from .server.cli import run_serve

        return run_serve(args)
    if args.command == "submit":
        from .submit import run_submit

        return run_submit(args)
    if args.command == "models":
        from .models.cli import run_models

        return run_models(args)
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
