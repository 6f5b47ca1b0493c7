"""`stag4d submit`: a batch client for a `stag4d serve` (local or Ray engine) over its HTTP API.

    stag4d submit --server URL --token-file F clip1.mp4 clip2.mp4 [--seeds 1,2,3] [--preset ...] [--option K=V]
                  [--wait] [--download DIR]

One job per input and seed (``--example N``: N example jobs; ``--prompt TEXT``, repeatable: prompt jobs); files
are uploaded (multipart), so the server needs no access to this machine's disk. ``--wait`` shows one progress bar
per job until every job has ended; ``--download DIR`` (implies ``--wait``) fetches each finished job's bake/
folder into DIR/<input>-<job id>/ as soon as it finishes. Standard output gets one JSON line per job at the end.
Exit codes: 0 every job finished (or was submitted, without --wait), 1 a job failed or was cancelled, 2 bad
input or the server refused / cannot be reached. Stdlib HTTP only: nothing beyond the backend's dependencies.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

EXIT_FAILED, EXIT_USAGE = 1, 2
TERMINAL = ("finished", "failed", "cancelled")
POLL_S = 0.5
CHUNK = 1 << 20


class SubmitError(Exception):
    """Bad input, or the server refused or cannot be reached: one line for the user."""


@dataclass
class Spec:
    label: str                       # for the bar and the download folder: the input's stem, "example", ...
    payload: dict                    # the JSON request (kind, options, ...); for an upload, its options
    upload: Path | None = None
    job: dict = field(default_factory=dict)
    download: Path | None = None


class Api:
    """The server's v1 API with a bearer token (urllib; no extra dependency)."""

    def __init__(self, url: str, token: str, timeout: float = 60.0):
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout

    def call(self, method: str, path: str, body=None, headers: dict | None = None):
        headers = dict(headers or {}, Authorization=f"Bearer {self.token}")
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("detail")
            except (ValueError, AttributeError):
                detail = None
            raise SubmitError(f"{method} {path}: the server answered {exc.code}"
                              f"{': ' + str(detail) if detail else ''}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SubmitError(f"cannot reach the server at {self.url} ({reason})") from None

    def json(self, method: str, path: str, payload: dict | None = None) -> dict:
        body = None if payload is None else json.dumps(payload).encode()
        with self.call(method, path, body, {"Content-Type": "application/json"} if body else None) as r:
            return json.loads(r.read() or b"{}")

    def upload(self, path: Path, options: dict) -> dict:
        """POST /v1/jobs as multipart (field ``file``, field ``options``), streamed from disk."""
        boundary = uuid.uuid4().hex
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="options"\r\n\r\n{json.dumps(options)}\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
                f'Content-Type: application/octet-stream\r\n\r\n').encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        size = len(head) + path.stat().st_size + len(tail)

        def body():
            yield head
            with open(path, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk
            yield tail

        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(size)}
        with self.call("POST", "/v1/jobs", body(), headers) as r:
            return json.loads(r.read())

    def download(self, job_id: str, name: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        with self.call("GET", f"/v1/jobs/{job_id}/files/{urllib.parse.quote(name)}") as r, open(part, "wb") as fh:
            while chunk := r.read(CHUNK):
                fh.write(chunk)
        os.replace(part, dest)


def read_token(path: str) -> str:
    try:
        token = Path(path).expanduser().read_text().strip()
    except OSError as exc:
        raise SubmitError(f"--token-file {path}: {exc.strerror}") from None
    if not token:
        raise SubmitError(f"--token-file {path} is empty")
    return token


def parse_options(args) -> dict:
    """The request options from the flags (the one table, request.OPTIONS) and ``--option KEY=VALUE``."""
    from .request import OPTION, OPTIONS, check_options

    options = {o.name: getattr(args, o.name) for o in OPTIONS
               if o.cli and o.http and getattr(args, o.name, None) is not None}
    for item in args.option or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in OPTION or not OPTION[key].http:
            raise SubmitError(f"--option {item!r}: expected KEY=VALUE with a server option (docs/api.md)")
        options[key] = value
    try:
        return check_options(options)
    except ValueError as exc:
        raise SubmitError(str(exc)) from None


def make_specs(args, options: dict) -> list[Spec]:
    """One job per input (or prompt, or example) and seed."""
    seeds = [None]
    if args.seeds:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise SubmitError(f"--seeds {args.seeds!r}: a comma list of whole numbers") from None
    base = []
    for raw in args.inputs:
        path = Path(raw).expanduser()
        if not path.is_file():
            raise SubmitError(f"{raw}: no such file (folders: zip them or use the server's path jobs)")
        base.append((path.stem, {}, path))
    base += [("prompt", {"kind": "prompt", "prompt": text}, None) for text in args.prompt or []]
    base += [("example", {"kind": "example"}, None) for _ in range(args.example or 0)]
    if not base:
        raise SubmitError("give input files, --prompt TEXT or --example N")
    specs = []
    for label, payload, upload in base:
        for seed in seeds:
            opts = dict(options, **({"seed": seed} if seed is not None else {}))
            tag = label if seed is None else f"{label}-seed{seed}"
            specs.append(Spec(tag, opts if upload else dict(payload, options=opts), upload))
    return specs


def submit_all(api: Api, specs: list[Spec]) -> None:
    for spec in specs:
        spec.job = api.upload(spec.upload, spec.payload) if spec.upload else api.json("POST", "/v1/jobs",
                                                                                       spec.payload)


def download_bake(api: Api, spec: Spec, root: Path) -> Path:
    folder = root / f"{spec.label}-{spec.job['id']}"
    files = api.json("GET", f"/v1/jobs/{spec.job['id']}/files")["files"]
    for entry in files:
        if entry["name"].startswith("bake/"):
            api.download(spec.job["id"], entry["name"], folder / entry["name"])
    return folder


class Bars:
    """One tqdm bar per job (the current stage's steps); where stderr is no terminal, one line per change of
    state or stage instead."""

    def __init__(self, specs: list[Spec], quiet: bool):
        from tqdm import tqdm

        self.quiet = quiet
        self.live = not quiet and sys.stderr.isatty()
        width = max(len(s.label) for s in specs)
        self.bars = [tqdm(total=1, position=i, leave=True, desc=s.label.ljust(width), unit="step",
                          disable=not self.live, dynamic_ncols=True) for i, s in enumerate(specs)]
        self.last: list[tuple | None] = [None] * len(specs)
        self.t0 = time.monotonic()

    def update(self, i: int, spec: Spec) -> None:
        job = spec.job
        progress = job.get("progress") or {}
        stage = progress.get("stage") or job.get("stage")
        key = (job["state"], stage)
        if self.live:
            bar = self.bars[i]
            total, step = progress.get("total"), progress.get("step")
            if total:
                if bar.total != total:
                    bar.reset(total=total)
                bar.n = min(step or 0, total)
            if job["state"] == "finished":
                bar.n = bar.total
            text = f"{job['state']}{' ' + stage if stage and job['state'] == 'running' else ''}"
            if job["state"] in TERMINAL and key != self.last[i]:  # freeze the line: no clock after the end
                took = bar.format_interval(time.monotonic() - self.t0)
                bar.bar_format = "{l_bar}{bar}| {n_fmt}/{total_fmt} [" + f"{job['state']} {took} after submit]"
            bar.set_postfix_str(text, refresh=False)
            bar.refresh()
        elif not self.quiet and key != self.last[i]:
            print(f"{spec.label} ({job['id']}): {job['state']}{' ' + stage if stage else ''}", file=sys.stderr)
        self.last[i] = key

    def close(self) -> None:
        for bar in self.bars:
            bar.close()
        if self.live:  # clear what closed bars left below the cursor, so the JSON lines print on clean lines
            sys.stderr.write("\r\033[J")
            sys.stderr.flush()


def wait_all(api: Api, specs: list[Spec], download: Path | None, quiet: bool) -> None:
    bars = Bars(specs, quiet)
    try:
        while True:
            pending = [i for i, s in enumerate(specs) if s.job["state"] not in TERMINAL or
                       (download and s.job["state"] == "finished" and s.download is None)]
            if not pending:
                return
            for i in pending:
                spec = specs[i]
                spec.job = api.json("GET", f"/v1/jobs/{spec.job['id']}")
                if download and spec.job["state"] == "finished" and spec.download is None:
                    spec.download = download_bake(api, spec, download)
                bars.update(i, spec)
            time.sleep(POLL_S)
    finally:
        bars.close()


def run_submit(args) -> int:
    try:
        api = Api(args.server, read_token(args.token_file))
        specs = make_specs(args, parse_options(args))
        submit_all(api, specs)
        if args.wait or args.download:
            try:
                wait_all(api, specs, Path(args.download).expanduser() if args.download else None, args.quiet)
            except KeyboardInterrupt:
                print("stag4d submit: stopped waiting; the jobs go on on the server: "
                      + " ".join(s.job["id"] for s in specs), file=sys.stderr)
                return 130
    except SubmitError as exc:
        print(f"stag4d submit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for spec in specs:
        print(json.dumps({"label": spec.label, "input": str(spec.upload) if spec.upload else None,
                          "id": spec.job["id"], "state": spec.job["state"], "error": spec.job.get("error"),
                          "download": str(spec.download) if spec.download else None}))
    waited = args.wait or args.download
    return EXIT_FAILED if waited and any(s.job["state"] != "finished" for s in specs) else 0


def add_submit_arguments(p) -> None:
    from .request import OPTIONS

    p.add_argument("inputs", nargs="*", metavar="INPUT", help="video or image files (uploaded)")
    p.add_argument("--server", required=True, help="the server's URL, e.g. http://127.0.0.1:8765")
    p.add_argument("--token-file", required=True, help="file holding the server's bearer token")
    p.add_argument("--prompt", action="append", help="a text prompt job (repeatable)")
    p.add_argument("--example", type=int, metavar="N", help="N example jobs (no input; a smoke test of a cluster)")
    p.add_argument("--seeds", help="a comma list: one job per input and seed (variants)")
    for opt in OPTIONS:
        if opt.cli and opt.http and opt.name != "device":  # the server picks the device
            kind = {int: int, float: float}.get(opt.type)
            p.add_argument(opt.flag, dest=opt.name, type=kind, choices=opt.choices, help=opt.help)
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="any other server option (docs/api.md), e.g. --option checkpoint_every=50 (repeatable)")
    p.add_argument("--wait", action="store_true", help="show a progress bar per job until every job has ended")
    p.add_argument("--download", metavar="DIR", help="fetch each finished job's bake/ into DIR (implies --wait)")
    p.add_argument("--quiet", action="store_true", help="no progress output (the JSON lines only)")
