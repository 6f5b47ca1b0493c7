"""The `stag4d` command line. The only place (with server/) that prints or parses argv."""

from __future__ import annotations

import argparse
import sys

from . import __version__

EXIT_USAGE = 2          # bad input: a clear one-line message, nothing half-written
EXIT_MISSING_WEIGHTS = 4  # a stage needs model weights that are not installed (the message says which)



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
    g.add_argument("--preset", default=None, help="paper, standard, preview or tiny (default: standard on a CUDA "
                   "GPU, preview on a CPU)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--frames", type=int, help="keep at most N frames of the input (evenly spaced)")
    g.add_argument("--stride", help="keep every k-th input frame, or 'auto' (with --frames: cover the whole clip)")
    g.add_argument("--start", type=int, help="first input frame")
    g.add_argument("--end", type=int, help="last input frame (exclusive)")
    g.add_argument("--iters", type=int, help="fit steps (the preset's schedule is rescaled)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA when present)")
    g.add_argument("--guidance", choices=["anchors", "sds", "sds+anchors"], help="default: the preset's")
    g.add_argument("--formats", help="bake formats: comma list of usd, ply, gltf, spz, mesh, preview, cameras, "
                   "or all (default: usd,ply,mesh,preview,cameras)")
    g.add_argument("--fusion", choices=["lockstep", "stored", "off"],
                   help="Zero123++ temporal-anchor fusion mode (default: lockstep)")
    g.add_argument("--anchor-steps", type=int, help="Zero123++ denoising steps (default 75, as the authors)")
    g.add_argument("--anchor-tile", type=int, help="Zero123++ output tile edge in px (default 320: the official "
                   "640x960 grid)")
    g.add_argument("--matting", choices=["auto", "model", "none", "white-key", "color-key"],
                   help="how an input without alpha is cut out (default auto: the matting model when installed)")
    g.add_argument("--video-frames", type=int, help="image/prompt input: frames the video model generates")

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

    b = sub.add_parser("bake", help="bake per-frame Gaussians to USD / PLY / glTF / SPZ / mesh / preview "
                       "(OUT_DIR/bake)")
    b.add_argument("out_dir", help="a fit output folder, or a job folder with model/")
    b.add_argument("--formats", default="usd,ply",
                   help="comma list of usd, ply, gltf, spz, mesh, preview, cameras, or all")
    b.add_argument("--fps", type=float, help="playback rate (default: the input's, else 24)")
    b.add_argument("--frames", type=int, help="resample the motion at N evenly spaced times")
    b.add_argument("--mesh-resolution", type=int, default=128)
    b.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("serve", help="run the local HTTP backend for the Blender add-on")
    from .server.cli import add_serve_arguments

    add_serve_arguments(s)

    m = sub.add_parser("models", help="list or download the diffusion models")
    from .models.cli import add_models_arguments

    add_models_arguments(m)

    sub.add_parser("doctor", help="report device, memory, disk, CPU kernel, installed weights")
    return p


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
    from .config import config_from_options
    from .dataset import DataError
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
    from .generate import load_sds_if_present
    from .models.registry import MissingWeightsError, ModelLoadError

    try:
        # Zero123-XL when the guidance uses SDS and the weights are installed; a preset's default falls back to
        # the anchor views without them (the fit says so), an explicit --guidance sds stops here.
        sds = load_sds_if_present(cfg, {"guidance": args.guidance})
    except (MissingWeightsError, ModelLoadError) as exc:
        print(f"stag4d fit: {exc}", file=sys.stderr)
        return EXIT_MISSING_WEIGHTS
    bar = None if args.quiet else FitProgressBar(cfg.iters)
    try:
        outcome = fit(args.data_dir, args.output, cfg, sds=sds, guidance_explicit=args.guidance is not None,
                      frames=frames, progress=bar.update if bar else None)
    except (DataError, FitError) as exc:
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
    from .stages.render import CamerasError, render_cameras, render_turntable

    if not args.cameras and not args.turntable:
        print("stag4d render: give --cameras CAMERAS.json and/or --turntable OUT.mp4", file=sys.stderr)
        return EXIT_USAGE
    try:
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
    from .progress import StageProgressBars
    from .stages.bake import CLI_ERRORS, bake_job

    bars = None if args.quiet else StageProgressBars()
    try:
        res = bake_job(args.out_dir, formats=args.formats, fps=args.fps, frames=args.frames,
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


def _generate_from_input(args) -> int:
    """`stag4d generate INPUT|--prompt TEXT -o JOB_DIR`: every stage it can, then stops at missing weights."""
    from pathlib import Path

    from .generate import RequestError, generative_stages, make_request
    from .job import Job
    from .models.registry import MissingWeightsError, ModelLoadError
    from .pipeline import run_stages
    from .progress import StageProgressBars

    if args.input is None and args.prompt is None:
        print("stag4d generate: give a video/image file or folder, --prompt TEXT, or --example", file=sys.stderr)
        return EXIT_USAGE
    if args.input is not None and args.prompt is not None:
        print("stag4d generate: give either an input file or --prompt, not both", file=sys.stderr)
        return EXIT_USAGE
    formats = args.formats.split(",") if args.formats else None
    try:
        request = make_request(args.input, args.prompt, preset=args.preset, seed=args.seed, frames=args.frames,
                               stride=args.stride, start=args.start, end=args.end, iters=args.iters,
                               device=args.device, guidance=args.guidance, formats=formats, fusion=args.fusion,
                               anchor_steps=args.anchor_steps, anchor_tile=args.anchor_tile, matting=args.matting,
                               video_frames=args.video_frames)
        stages = generative_stages(request)  # checks the options before anything is written
        job = Job(args.output)
        if (job.path / "job.json").is_file() and job.read().get("request") != request:
            raise RequestError(f"{job.path} holds another job; choose a new folder (or delete it to start over)")
        job.create(request)
    except (RequestError, ValueError) as exc:  # ValueError: e.g. an unknown --preset
        print(f"stag4d generate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    bars = StageProgressBars()
    try:
        summary = run_stages(job, stages, progress=bars.update)
    except (MissingWeightsError, ModelLoadError) as exc:
        bars.close()
        print(f"stag4d generate: stopped: {exc}", file=sys.stderr)
        print(f"Everything before this stage is saved in {job.path}; run the same command again to go on.",
              file=sys.stderr)
        return EXIT_MISSING_WEIGHTS
    except (RequestError, ValueError) as exc:
        bars.close()
        print(f"stag4d generate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        bars.close()
    _print_summary(summary)
    bake = Path(job.path).resolve() / "bake"
    print(f"Wrote {job.path}; open {bake / 'gaussians.usdc'} in Blender (File > Import > USD) or use the add-on.")
    return 0


def _generate(args) -> int:
    if not args.example:
        return _generate_from_input(args)
    if args.input or args.prompt:
        print("stag4d generate: --example takes no input file or prompt", file=sys.stderr)
        return EXIT_USAGE
    import dataclasses
    from pathlib import Path

    from .config import get_preset
    from .pipeline import generate_example
    from .progress import StageProgressBars

    try:
        cfg = get_preset(args.preset or "preview")
    except ValueError as exc:
        print(f"stag4d generate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    bars = StageProgressBars()
    try:
        summary = generate_example(args.output, cfg, progress=bars.update)
    finally:
        bars.close()
    job = Path(args.output).resolve()
    _print_summary(summary)
    print(f"""
Wrote the example job to {job}
  frames/   the input in the STAG4D layout (ref/ front views, zero123/ the six anchor views per frame)
  model/    the fitted 4D Gaussians (canonical.ply, deformation.safetensors, meta.json)
  bake/     gaussians.usdc (animated points + splats), ply/ (per-frame 3DGS PLY), mesh.usdc, preview.mp4,
            cameras.json
Open it in Blender: File > Import > Universal Scene Description, choose {job / 'bake' / 'gaussians.usdc'}
  (or {job / 'bake' / 'mesh.usdc'} for the animated mesh), then press play.""")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "doctor":
        return _doctor()
    if args.command == "fit":
        return _fit(args)
    if args.command == "generate":
        return _generate(args)
    if args.command == "bake":
        return _bake(args)
    if args.command == "render":
        return _render(args)
    if args.command == "serve":
        from .server.cli import run_serve

        return run_serve(args)
    if args.command == "models":
        from .models.cli import run_models

        return run_models(args)
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
