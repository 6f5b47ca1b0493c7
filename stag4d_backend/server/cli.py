"""`stag4d serve`: flags, start-up checks, the address line, then uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys
from pathlib import Path

EXIT_USAGE = 2
MAX_HEAD_BYTES = 16 * 1024  # request line + headers (h11's default, stated): more is a 400


def _ranged(convert, inside, not_a: str, outside: str):
    """An argparse type: ``convert(text)`` that ``inside(value)`` accepts; ``not_a`` follows the quoted text when it
    does not convert, ``outside`` is formatted with ``text`` and ``v`` when it is out of range."""
    def parse(text: str):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} {not_a}") from None
        if not inside(v):
            raise argparse.ArgumentTypeError(outside.format(text=text, v=v))
        return v
    return parse


_port = _ranged(int, lambda v: 0 <= v <= 65535, "is not a port number (0-65535; 0 picks a free one)",
                "{v} is not a port number (0-65535; 0 picks a free one)")
_positive_mb = _ranged(float, lambda v: 0 < v <= 1024 * 1024, "is not a number of megabytes",
                       "{text}: must be more than 0 and at most 1048576 (1 TB)")
_count = _ranged(int, lambda v: 0 <= v <= 64, "is not a whole number", "{v}: must be between 0 and 64")
_seconds = _ranged(float, lambda v: 0 < v <= 3600, "is not a number of seconds",
                   "{text}: must be more than 0 and at most 3600 seconds")
_connections = _ranged(int, lambda v: 1 <= v <= 100000, "is not a whole number",
                       "{v}: must be between 1 and 100000")
_gpus = _ranged(float, lambda v: 0 <= v <= 64, "is not a number of GPUs", "{text}: must be between 0 and 64")


def _devices(text: str) -> str:
    from .devices import parse_devices

    try:
        parse_devices(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _ray_resources(text: str) -> str:
    from .engine import parse_resources

    try:
        parse_resources(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_engine_arguments(p) -> None:
    """--engine and the Ray engine's flags (docs/scale-out.md)."""
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: worker processes on this machine (default); ray: one Ray task per job on a Ray "
                        "cluster (needs the [ray] extra and a jobs dir every node sees at the same path)")
    p.add_argument("--ray-address", default="auto",
                   help="the Ray cluster: auto (the one `ray start` made on this machine; default), HOST:PORT, or "
                        "local (a private one-machine cluster started with the server)")
    p.add_argument("--ray-gpus-per-job", type=_gpus, default=1.0,
                   help="GPUs each job asks Ray for (default 1; 0 runs jobs on CPUs)")
    p.add_argument("--ray-cpus-per-job", type=_gpus, default=1.0, help="CPUs each job asks Ray for (default 1)")
    p.add_argument("--ray-resources", type=_ray_resources, default=None,
                   help='custom Ray resources per job as JSON, e.g. \'{"stag4d_job": 1}\' (caps how many run at once '
                        'when the nodes declare that many)')
    p.add_argument("--ray-max-retries", type=_count, default=3,
                   help="times Ray retries a job whose worker or node was lost (from its checkpoint; default 3)")


def add_serve_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; anything else makes the token "
                        "the only protection)")
    p.add_argument("--port", type=_port, default=0, help="TCP port (default 0: a free one, printed on start)")
    p.add_argument("--token-file", help="bearer token file, created (0600) if absent (default $STAG4D_TOKEN_FILE "
                                        "or ~/.stag4d/token)")
    p.add_argument("--jobs-dir", help="where job directories live (default $STAG4D_JOBS_DIR or ~/.stag4d/jobs)")
    p.add_argument("--allow-server-paths", action="store_true",
                   help="allow jobs on files/folders already on the server (kind 'path'); off: uploads only")
    p.add_argument("--max-upload-mb", type=_positive_mb, default=2048.0, help="upload size limit (default 2048)")
    p.add_argument("--device", type=_devices, default="auto",
                   help="auto (every CUDA device, else the CPU), cpu, cuda, cuda:N, or a comma list")
    p.add_argument("--jobs-per-device", type=_count, default=1,
                   help="jobs running at once on each device (default 1; 0 = accept and queue, run nothing)")
    p.add_argument("--no-resume", action="store_true",
                   help="do not resume jobs interrupted by a crash or shutdown on start (resume them on request)")
    p.add_argument("--max-connections", type=_connections, default=1000,
                   help="open connections at most; more get a 503 at once (default 1000, lowered to fit the "
                        "process's descriptor limit)")
    p.add_argument("--timeout-keep-alive", type=_seconds, default=5.0,
                   help="close a kept-alive connection idle this long after a response (default 5 s)")
    p.add_argument("--timeout-header", type=_seconds, default=10.0,
                   help="a request's head must arrive within this long (default 10 s; also bounds a new connection "
                        "that sends nothing)")
    p.add_argument("--timeout-body", type=_seconds, default=20.0,
                   help="a request's body must arrive within this long plus 1 s per 500 bytes received (default 20 s)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="warning")
    add_engine_arguments(p)
    prog = p.prog

    def one_line_error(message: str):  # argparse's default prints the whole usage first
        print(f"{prog}: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)

    p.error = one_line_error


def _default_jobs_dir() -> Path:
    return Path(os.environ.get("STAG4D_JOBS_DIR") or Path.home() / ".stag4d" / "jobs").expanduser()


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    # proto=IPPROTO_TCP, not 0: accepted sockets inherit it, and asyncio sets TCP_NODELAY only on sockets whose
    # proto says TCP. Without it every response on a kept-alive connection waits ~40 ms (Nagle + delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.listen(2048)  # connections made right after the address line wait in the backlog until uvicorn accepts
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(bound: str) -> str:
    ip = ipaddress.ip_address(bound)
    if ip.is_unspecified:  # listening everywhere: a local parent reaches it on loopback
        return "127.0.0.1" if ip.version == 4 else "[::1]"
    return f"[{bound}]" if ip.version == 6 else bound


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _make_engine(args, notes: list[str]):
    """(the engine, the devices the job manager schedules on: None = probe). RuntimeError with a one-line reason
    when the Ray engine cannot start."""
    from .devices import parse_devices
    from .engine import LocalEngine

    if getattr(args, "engine", "local") != "ray":
        return LocalEngine(), parse_devices(args.device)
    from .engine import parse_resources

    if args.ray_address == "local":  # a private one-machine cluster: Ray on loopback only (read when ray loads)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        from .ray_engine import RayEngine
    except ImportError as exc:
        raise RuntimeError(f"--engine ray needs Ray: pip install 'stag4d-backend[ray]' ({exc})") from None
    engine = RayEngine(args.ray_address, gpus_per_job=args.ray_gpus_per_job, cpus_per_job=args.ray_cpus_per_job,
                       resources=parse_resources(args.ray_resources), max_retries=args.ray_max_retries)
    notes.append(f"engine ray: cluster {engine.cluster()}; each job asks for {args.ray_cpus_per_job:g} CPU, "
                 f"{args.ray_gpus_per_job:g} GPU{', ' + args.ray_resources if args.ray_resources else ''}")
    return engine, [engine.name]  # Ray places the jobs: one pseudo-device, every queued job handed over


def run_serve(args) -> int:
    import uvicorn

    from .app import Settings, create_app
    from .connections import ClientLimits, connection_cap, guarded_protocol, raise_fd_limit
    from .auth import TokenFileError, default_token_file, load_or_create_token
    from .devices import probe_devices
    from .jobs import JobManager, ServerLockError

    def fail(message: str) -> int:
        print(f"stag4d serve: {message}", file=sys.stderr)
        return EXIT_USAGE

    # Everything the server and its workers write (job folders, inputs, outputs, logs) is the owner's only:
    # files 0600, folders 0700, whatever --jobs-dir is (docs/server.md, "Permissions").
    os.umask(0o077)
    token_file = Path(args.token_file).expanduser() if args.token_file else default_token_file()
    try:
        token, notes = load_or_create_token(token_file)
    except (TokenFileError, OSError) as exc:
        return fail(str(exc))
    token_file = token_file.resolve()
    jobs_dir = Path(args.jobs_dir).expanduser() if args.jobs_dir else _default_jobs_dir()
    try:
        jobs_dir.mkdir(parents=True, exist_ok=True)
        jobs_dir = jobs_dir.resolve()
        if not os.access(jobs_dir, os.W_OK):
            return fail(f"--jobs-dir {jobs_dir}: not writable")
    except OSError as exc:
        return fail(f"--jobs-dir {jobs_dir}: {exc.strerror}")
    try:
        sock = _bind(args.host, args.port)
    except (OSError, socket.gaierror) as exc:
        return fail(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc})")
    bound_host, bound_port = sock.getsockname()[:2]

    try:
        engine, devices = _make_engine(args, notes)
    except RuntimeError as exc:
        sock.close()
        return fail(str(exc))
    settings = Settings(jobs_dir=jobs_dir, token=token, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                        allow_server_paths=args.allow_server_paths, jobs_per_device=args.jobs_per_device,
                        devices=devices, auto_resume=not args.no_resume)
    manager = JobManager(jobs_dir, settings.devices, settings.jobs_per_device, settings.auto_resume,
                         probe=probe_devices, on_note=lambda m: print(f"stag4d serve: {m}", file=sys.stderr),
                         engine=engine)
    try:
        notes += manager.start()
    except ServerLockError as exc:
        sock.close()
        engine.close()
        return fail(str(exc))

    address = {"url": f"http://{_url_host(bound_host)}:{bound_port}", "host": bound_host, "port": bound_port,
               "token_file": str(token_file), "pid": os.getpid(), "jobs_dir": str(jobs_dir), "api": 1}
    line = json.dumps(address)
    address_file = token_file.with_name(token_file.name + ".address.json")
    try:  # before the line: whoever reads the line may look for the file at once
        _write_private(address_file, line + "\n")
    except OSError as exc:
        notes.append(f"cannot write {address_file} ({exc.strerror})")
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    if not _is_loopback(bound_host):
        print(f"stag4d serve: warning: listening on {bound_host}:{bound_port}, reachable from other machines. The "
              f"token is the only protection, and the traffic (token included) is not encrypted: prefer an SSH "
              f"tunnel to a server on 127.0.0.1, or a TLS reverse proxy.", file=sys.stderr)
    for note in notes:
        print(f"stag4d serve: {note}", file=sys.stderr)

    def remove_address_file():
        try:
            if json.loads(address_file.read_text()).get("pid") == os.getpid():
                address_file.unlink()
        except (OSError, ValueError):
            pass

    # uvicorn re-raises SIGTERM/SIGINT after its shutdown, so cleanup lives in the app's lifespan.
    app = create_app(settings, manager, on_shutdown=remove_address_file)
    limits = ClientLimits(keep_alive_s=args.timeout_keep_alive, header_s=args.timeout_header,
                          body_s=args.timeout_body,
                          max_connections=connection_cap(args.max_connections, raise_fd_limit()))
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level in ("info", "debug"),
                            timeout_graceful_shutdown=3, lifespan="on", http=guarded_protocol(limits),
                            timeout_keep_alive=limits.keep_alive_s, h11_max_incomplete_event_size=MAX_HEAD_BYTES)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        manager.shutdown()
        remove_address_file()
    return 0
