"""`stag4d models list|download|path`: the registry's command line (printing lives here, not in registry.py)."""

from __future__ import annotations

import json
import sys

EXIT_MISSING = 2   # unknown name, weights missing, download failed: one line on stderr, no traceback


def add_models_arguments(p) -> None:
    sub = p.add_subparsers(dest="models_action", metavar="ACTION")
    ls = sub.add_parser("list", help="each model: present or missing (and where), size, licence")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    dl = sub.add_parser("download", help="fetch weights into the Hugging Face cache (prints the licence first)")
    dl.add_argument("names", nargs="+", metavar="NAME", help="model name(s) from `stag4d models list`, or all")
    dl.add_argument("--yes", "-y", action="store_true", help="do not ask to confirm the licence on a terminal")
    pa = sub.add_parser("path", help="print the folder holding a model's weights")
    pa.add_argument("name", metavar="NAME")


def run_models(args) -> int:
    action = getattr(args, "models_action", None) or "list"
    if action == "list":
        return _list(getattr(args, "json", False))
    if action == "download":
        return _download(args.names, args.yes)
    return _path(args.name)


def _fail(message: str) -> int:
    print(f"stag4d models: {message}", file=sys.stderr)
    return EXIT_MISSING


def _list(as_json: bool) -> int:
    from .registry import MODELS, hf_cache_dir, status

    rows = [status(name) for name in MODELS]
    if as_json:
        print(json.dumps([{
            "name": s.spec.name, "title": s.spec.title, "repo_id": s.spec.repo_id, "revision": s.spec.revision,
            "size_gb": s.spec.size_gb, "licence": s.spec.licence, "licence_note": s.spec.licence_note,
            "purpose": s.spec.purpose, "gated": s.spec.gated, "env_var": s.spec.env_var,
            "dtype_cuda": s.spec.dtype_cuda, "dtype_cpu": s.spec.dtype_cpu,
            "present": s.location is not None,
            "path": str(s.location.path) if s.location else None,
            "source": s.location.source if s.location else None,
            "problem": s.problem,
        } for s in rows], indent=2))
        return 0
    header = ("NAME", "TITLE", "STATUS", "SIZE", "LICENCE", "WHERE")
    table = [header] + [(
        s.spec.name, s.spec.title, "present" if s.location else "missing", f"{s.spec.size_gb:g} GB",
        s.spec.licence, f"{s.location.source}: {s.location.path}" if s.location else "-",
    ) for s in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    print(f"\nHugging Face cache: {hf_cache_dir()}. Sizes are approximate download sizes.")
    if any(s.location is None for s in rows):
        print("Get a missing model with `stag4d models download NAME`; see docs/models.md for offline machines.")
    return 0


def _download(names: list[str], yes: bool) -> int:
    from .registry import MODELS, MissingWeightsError, download, get_spec, licence_notice

    if "all" in names:
        names = list(MODELS)
    try:
        specs = [get_spec(n) for n in names]
    except ValueError as exc:
        return _fail(str(exc))
    # Terms first: Zero123++ is non-commercial, SVD is gated, and so on.
    print(licence_notice(names), file=sys.stderr)
    if not yes and sys.stdin.isatty():
        answer = input(f"Download {', '.join(s.name for s in specs)} "
                       f"(about {sum(s.size_gb for s in specs):g} GB) under these terms? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            return _fail("download cancelled")
    status = 0
    for spec in specs:
        try:
            path = download(spec.name)
        except MissingWeightsError as exc:
            status = _fail(str(exc))
            continue
        print(f"{spec.name}: {path}")
    return status


def _path(name: str) -> int:
    from .registry import MissingWeightsError, resolve

    try:
        print(resolve(name))
    except (ValueError, MissingWeightsError) as exc:
        return _fail(str(exc))
    return 0
