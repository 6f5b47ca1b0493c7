"""The HTTP API under /v1 (docs/api.md is the contract, docs/server.md the design).

Every route but ``GET /v1/health`` needs the bearer token. Errors are ``{"detail": "<one line>"}`` (validation
errors add ``errors``). The OpenAPI document is served at ``/v1/openapi.json`` (behind the token too).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .. import __version__
from ..job import TERMINAL_STATES
from .auth import token_matches
from .downloads import SnapshotResponse, open_snapshot
from .events import EventHub
from .files import FILE_NAME_PATTERN, JOB_ID_PATTERN, MAX_NAME, BadName, list_files, media_type, resolve_download
from .jobs import JobError, JobManager
from .schemas import (BAKE_FORMATS, JOB_CREATE, PRESETS, STATES, ErrorOut, EventPage, FileList, Health, Info,
                      JobList, JobOptions, JobOut, PathJob)
from .uploads import ACCEPTED, UploadError, receive_upload, sniff_file

API_VERSION = 1
MAX_JSON_BYTES = 1024 * 1024
KEEPALIVE_S = 15.0
MODELS_TTL_S = 30.0


@dataclass
class Settings:
    jobs_dir: Path
    token: str
    max_upload_bytes: int = 2 * 1024**3
    allow_server_paths: bool = False
    jobs_per_device: int = 1
    devices: list[str] | None = None           # None: probe (CUDA devices, else the CPU)
    auto_resume: bool = True
    notes: list[str] = field(default_factory=list)


def _err(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _one_line_validation(errors: list, request_errors: bool = False) -> tuple[str, list]:
    """One line for ``detail`` and a short list for ``errors``; ``request_errors``: FastAPI's, whose locations
    start with where the value was (body, query, path, header)."""
    items = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ())]
        if request_errors and loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        items.append({"loc": loc, "msg": msg, "type": str(e.get("type", ""))})
    if not items:
        return "invalid request", items
    first = items[0]
    where = ".".join(first["loc"])
    text = f"{where}: {first['msg']}" if where else first["msg"]
    if len(items) > 1:
        text += f" (and {len(items) - 1} more)"
    return text.replace("\n", " "), items


_bearer = HTTPBearer(auto_error=False, description="the token from the server's token file")


def _responses(*codes: int) -> dict:
    text = {400: "malformed request", 401: "missing or wrong token", 403: "not allowed by the server's flags",
            404: "no such job or file", 409: "not possible in the job's state", 413: "upload too large",
            415: "unsupported content", 422: "invalid values"}
    return {c: {"model": ErrorOut, "description": text[c]} for c in codes}


JobId = Annotated[str, PathParam(pattern=JOB_ID_PATTERN, description="j + 12 lowercase hex digits")]
# Documented, not enforced by FastAPI: resolve_download checks it and answers 400 with its own message
# (tests/test_server_support.py holds the two equal).
FileName = Annotated[str, PathParam(description="a relative, '/'-separated name from the file list",
                                    json_schema_extra={"pattern": FILE_NAME_PATTERN, "maxLength": MAX_NAME})]

CREATE_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/JobCreate"}},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"], "additionalProperties": False,
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": f"the input ({ACCEPTED}), recognised by content"},
                           "options": {"$ref": "#/components/schemas/JobOptions"}}},
            "encoding": {"options": {"contentType": "application/json"}}},
    },
}


def create_app(settings: Settings, manager: JobManager | None = None, on_shutdown=None) -> FastAPI:
    """The app; its lifespan starts the event poller and, on shutdown, stops the manager (running jobs become
    "interrupted") and calls ``on_shutdown()``."""
    hub = EventHub(settings.jobs_dir)
    manager = manager or JobManager(settings.jobs_dir, settings.devices, settings.jobs_per_device,
                                    settings.auto_resume)
    models_cache: dict = {"at": -1e9, "models": []}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        hub.start()
        try:
            yield
        finally:
            await hub.stop()
            await run_in_threadpool(manager.shutdown)
            if on_shutdown is not None:
                on_shutdown()

    app = FastAPI(title="STAG4D backend", version=__version__, openapi_url=None, docs_url=None, redoc_url=None,
                  lifespan=lifespan,
                  description="Jobs that turn a video, an image or a prompt into animated 3D Gaussians. "
                              "See docs/api.md.")
    app.state.manager, app.state.hub, app.state.settings = manager, hub, settings

    # ------------------------------------------------------------------------------------------ errors

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _err(400, "the body is not valid JSON")
        text, items = _one_line_validation(errors, request_errors=True)
        return JSONResponse({"detail": text, "errors": items}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # Starlette lists the methods of one route only; a path may have several
            methods = set()
            for route in app.router.routes:
                if getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE:
                    methods |= route.methods
            if methods:
                headers["Allow"] = ", ".join(sorted(methods))
        return _err(exc.status_code, str(exc.detail), headers or None)

    @app.exception_handler(JobError)
    async def _job_error(request: Request, exc: JobError):
        return _err(exc.status, exc.detail)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        traceback.print_exception(exc, file=sys.stderr)
        return _err(500, f"internal error ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                         f"see the server's log")

    # ------------------------------------------------------------------------------------------ auth

    async def require_token(request: Request,
                            _cred: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        if not token_matches(request.headers.get("authorization"), settings.token):
            raise HTTPException(401, "missing or wrong token: send 'Authorization: Bearer <token>' with the token "
                                     "from the server's token file", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/v1/health", response_model=Health, tags=["server"])
    async def health():
        """Liveness; the only route without a token."""
        return {"status": "ok", "api": API_VERSION}

    def v1(method: str, path: str, **kw):
        """A route under /v1 behind the token (registered on the app itself, so that 405 answers can list
        every method of a path)."""
        kw["responses"] = {**_responses(401), **kw.get("responses", {})}
        return app.api_route("/v1" + path, methods=[method], dependencies=[Depends(require_token)], **kw)

    @v1("GET", "/openapi.json", include_in_schema=False)
    async def openapi_doc():
        return JSONResponse(app.openapi())

    # ------------------------------------------------------------------------------------------ info

    def _models() -> list[dict]:
        now = time.monotonic()
        if now - models_cache["at"] < MODELS_TTL_S:
            return models_cache["models"]
        out = []
        try:
            from ..models import registry
        except ImportError:
            registry = None
        for name in getattr(registry, "MODELS", {}) if registry else {}:
            try:
                st = registry.status(name)
                spec = st.spec
                out.append({"name": name, "title": spec.title, "present": st.location is not None,
                            "size_gb": spec.size_gb, "licence": spec.licence, "licence_note": spec.licence_note,
                            "problem": st.problem})
            except Exception as exc:  # a registry problem must not break /info
                out.append({"name": name, "title": name, "present": False, "problem": str(exc)})
        models_cache.update(at=now, models=out)
        return out

    @v1("GET", "/info", response_model=Info, tags=["server"])
    async def info():
        """Version, devices, presets, models and their licences, limits."""
        if not manager.devices_ready.is_set():
            await run_in_threadpool(manager.devices_ready.wait, 180)
        devices = manager.devices or ["cpu"]
        return {"version": __version__, "api": API_VERSION, "device": devices[0], "devices": devices,
                "presets": list(PRESETS), "models": await run_in_threadpool(_models),
                "jobs_per_device": settings.jobs_per_device, "max_upload_bytes": settings.max_upload_bytes,
                "allow_server_paths": settings.allow_server_paths, "formats": list(BAKE_FORMATS)}

    # ------------------------------------------------------------------------------------------ jobs

    def view(job_id: str) -> dict:
        path, data, live = manager.read(job_id)
        log = hub.log(job_id)
        log.refresh()
        state = data.get("state") or "queued"
        state = "queued" if state == "created" else state
        if state not in STATES:
            state = "failed"
        request = data.get("request") or {}
        return {"id": job_id, "state": state, "kind": str(request.get("kind") or "unknown"), "request": request,
                "created": float(data.get("created") or 0.0), "updated": data.get("updated"),
                "stage": data.get("stage"), "progress": data.get("progress"), "error": data.get("error"),
                "last_event": log.last_n, "result": data.get("result"), "licences": data.get("licences") or [],
                "cancel_requested": live["cancel_requested"] and state == "running", "device": data.get("device"),
                "queue_position": manager.queue_position(job_id)}

    async def _read_json_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_JSON_BYTES:
            raise HTTPException(413, f"a JSON body may be at most {MAX_JSON_BYTES} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_JSON_BYTES:
                raise HTTPException(413, f"a JSON body may be at most {MAX_JSON_BYTES} bytes")
        return bytes(body)

    def _path_request(req: PathJob) -> dict:
        if not settings.allow_server_paths:
            raise HTTPException(403, "jobs on server-side paths are off; upload the file instead, or start the "
                                     "server with --allow-server-paths")
        p = Path(req.path).expanduser()
        if not p.is_absolute():
            raise HTTPException(400, f"path {req.path!r}: give an absolute path on the server")
        try:
            if p.is_dir():
                kind, mtype = "folder", None
            elif p.is_file():
                sniffed = sniff_file(p)
                if sniffed is None:
                    raise HTTPException(415, f"{p}: not a supported video or image ({ACCEPTED})")
                kind, mtype = sniffed[0], sniffed[1]
            else:
                raise HTTPException(404, f"{p}: no such file or folder on the server")
        except PermissionError as exc:
            raise HTTPException(403, f"{p}: the server may not read it ({exc.strerror})") from None
        except OSError as exc:  # a name too long, a file in place of a folder, a loop: nothing to read there
            raise HTTPException(404, f"{p}: no such file or folder on the server ({exc.strerror})") from None
        except ValueError:  # characters the file system encoding cannot represent: no such file either
            raise HTTPException(404, f"path {req.path!r}: no such file or folder on the server") from None
        return {"kind": kind, "input": str(p.resolve()), "source": "path", "media_type": mtype,
                "options": req.options.model_dump(exclude_none=True)}

    @v1("POST", "/jobs", status_code=201, response_model=JobOut, tags=["jobs"],
        openapi_extra={"requestBody": CREATE_BODY}, responses=_responses(400, 403, 404, 413, 415, 422))
    async def create_job(request: Request):
        """A new job from JSON (example, prompt, server path) or from an upload (multipart: file + options)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json" or ctype.endswith("+json"):
            body = await _read_json_body(request)
            try:
                req = JOB_CREATE.validate_json(body)
            except ValidationError as exc:
                if any(e.get("type") == "json_invalid" for e in exc.errors()):
                    raise HTTPException(400, "the body is not valid JSON") from None
                text, items = _one_line_validation(exc.errors())
                return JSONResponse({"detail": text, "errors": items}, status_code=422)
            if req.kind == "path":
                job_request = await run_in_threadpool(_path_request, req)
            else:
                job_request = {"kind": req.kind, "options": req.options.model_dump(exclude_none=True)}
                if req.kind == "prompt":
                    job_request["prompt"] = req.prompt
            job_id = await run_in_threadpool(manager.create, job_request)
        elif ctype == "multipart/form-data":
            try:
                up = await receive_upload(request, manager.upload_dir, settings.max_upload_bytes)
            except UploadError as exc:
                raise HTTPException(exc.status, exc.detail) from None
            try:
                raw = up.fields.get("options") or "{}"
                try:
                    options = JobOptions.model_validate_json(raw)
                except ValidationError as exc:
                    if any(e.get("type") == "json_invalid" for e in exc.errors()):
                        raise HTTPException(400, "the 'options' field is not valid JSON") from None
                    text, items = _one_line_validation(exc.errors())
                    return JSONResponse({"detail": f"options.{text}", "errors": items}, status_code=422)
                job_request = {"kind": up.kind, "media_type": up.media_type, "filename": up.filename,
                               "size": up.size, "source": "upload", "options": options.model_dump(exclude_none=True)}
                job_id = await run_in_threadpool(manager.create, job_request, up.path, up.suffix)
            finally:
                up.path.unlink(missing_ok=True)
        else:
            raise HTTPException(415, "send application/json or multipart/form-data (file + options)")
        return await run_in_threadpool(view, job_id)

    @v1("GET", "/jobs", response_model=JobList, tags=["jobs"])
    async def list_jobs():
        """Every job in the jobs directory, newest first."""
        def collect():
            out = []
            for job_id in manager.list_ids():
                try:
                    out.append(view(job_id))
                except JobError:
                    continue  # deleted meanwhile
            out.sort(key=lambda j: j["created"], reverse=True)
            return {"jobs": out}

        return await run_in_threadpool(collect)

    @v1("GET", "/jobs/{job_id}", response_model=JobOut, tags=["jobs"], responses=_responses(404, 422))
    async def get_job(job_id: JobId):
        return await run_in_threadpool(view, job_id)

    @v1("POST", "/jobs/{job_id}/cancel", status_code=202, response_model=JobOut, tags=["jobs"],
             responses=_responses(404, 409, 422))
    async def cancel_job(job_id: JobId):
        """Stops the job at its next step boundary (within 2 s); a queued job is cancelled at once."""
        await run_in_threadpool(manager.cancel, job_id)
        return await run_in_threadpool(view, job_id)

    @v1("POST", "/jobs/{job_id}/resume", status_code=202, response_model=JobOut, tags=["jobs"],
             responses=_responses(404, 409, 422))
    async def resume_job(job_id: JobId):
        """Queues a cancelled, interrupted or failed job again; it resumes from its last checkpoint."""
        await run_in_threadpool(manager.resume, job_id)
        return await run_in_threadpool(view, job_id)

    @v1("DELETE", "/jobs/{job_id}", status_code=204, tags=["jobs"], responses=_responses(404, 422))
    async def delete_job(job_id: JobId):
        """Stops the job if it runs, then removes its directory."""
        await run_in_threadpool(manager.delete, job_id)
        hub.forget(job_id)
        return Response(status_code=204)

    # ------------------------------------------------------------------------------------------ events

    def _sse(ev: dict) -> str:
        return f"id: {ev['n']}\nevent: {ev.get('kind', 'message')}\ndata: {json.dumps(ev, default=str)}\n\n"

    def _state_now(job_id: str) -> str:
        try:
            return view(job_id)["state"]
        except JobError:
            return "deleted"

    sse_event = {"type": "object", "properties": {  # one event (OpenAPI 3.1 has no itemSchema)
        "id": {"type": "string"}, "event": {"type": "string"}, "data": {"type": "string"},
        "retry": {"type": "integer"}}}

    @v1("GET", "/jobs/{job_id}/events", tags=["jobs"], responses={
        200: {"description": "SSE stream (Accept: text/event-stream or format=sse) or a JSON page",
              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EventPage"}},
                          "text/event-stream": {"schema": sse_event}}},
        **_responses(404, 422)})
    async def job_events(request: Request, job_id: JobId,
                         since: Annotated[int | None, Query(ge=0, le=10**9, description="first event number")] = None,
                         format: Literal["sse", "json"] | None = None,
                         wait: Annotated[float, Query(ge=0, le=30, description="long-poll seconds (json)")] = 0.0,
                         last_event_id: Annotated[str | None, Header(include_in_schema=False)] = None):
        """The job's events from number ``since`` on (or after ``Last-Event-ID``)."""
        await run_in_threadpool(manager.read, job_id)  # 404 for an unknown job
        start = since
        if start is None and last_event_id is not None and last_event_id.strip().isdigit():
            start = int(last_event_id.strip()) + 1
        start = start or 0
        log = hub.log(job_id)
        sse = format == "sse" or (format is None and "text/event-stream" in request.headers.get("accept", ""))
        if not sse:
            log.refresh()
            if log.count <= start and wait > 0:
                await hub.wait(log, start, wait)
            evs = log.since(start)
            return JSONResponse({"events": evs, "next": start + len(evs), "state": _state_now(job_id)})

        async def stream():
            n = start
            yield "retry: 1000\n\n"
            while True:
                log.refresh()
                evs = log.since(n)
                if evs:
                    n = evs[-1]["n"] + 1
                    yield "".join(_sse(e) for e in evs)
                    continue
                if log.closed:
                    return
                if log.ended and await run_in_threadpool(_state_now, job_id) in TERMINAL_STATES + ("deleted",):
                    return
                if not await hub.wait(log, n, KEEPALIVE_S):
                    if not log.closed:
                        yield ": keepalive\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------------------------------ files

    @v1("GET", "/jobs/{job_id}/files", response_model=FileList, tags=["files"], responses=_responses(404, 422))
    async def job_files(job_id: JobId):
        """Every file the job wrote (relative names, '/'-separated)."""
        path, _, _ = await run_in_threadpool(manager.read, job_id)
        return {"files": await run_in_threadpool(list_files, path)}

    @v1("GET", "/jobs/{job_id}/files/{name:path}", tags=["files"], responses={
        200: {"description": "the file's bytes (Range requests supported)",
              "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
        **_responses(400, 404, 422)})
    async def job_file(request: Request, job_id: JobId, name: FileName):
        """One file of the job, by its relative name; nothing outside the job directory."""
        path, _, _ = await run_in_threadpool(manager.read, job_id)

        def open_it():
            target = resolve_download(path, name)
            return target, *open_snapshot(target)

        try:
            target, fd, size = await run_in_threadpool(open_it)
        except BadName as exc:
            raise HTTPException(400, str(exc)) from None
        except OSError:  # missing, outside, not a regular file, or gone since the check
            raise HTTPException(404, f"job {job_id} has no file {name!r}") from None
        return SnapshotResponse(fd, size, media_type(target), target.name, request.headers.get("range"))

    def custom_openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, js in (("JobCreate", JOB_CREATE.json_schema(ref_template="#/components/schemas/{model}")),
                         ("EventPage", EventPage.model_json_schema(ref_template="#/components/schemas/{model}"))):
            comps.update(js.pop("$defs", {}))
            comps[name] = js
        schema["servers"] = [{"url": "/"}]
        app.openapi_schema = schema
        return schema

    app.openapi = custom_openapi
    return app
